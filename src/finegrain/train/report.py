"""Evaluation metrics as a terminal table."""

from __future__ import annotations

from finegrain.tables import format_table


def format_metrics(metrics: dict[str, float]) -> str:
    """Evaluation metrics (``"task/metric"`` keys) as a table of task, metric and value: two decimals, counts
    (integers, ``num_*``) as integers."""
    rows = []
    for key, value in metrics.items():
        task, _, name = key.rpartition("/")
        count = isinstance(value, int) or name.startswith("num_")
        rows.append([task, name, f"{value:.0f}" if count else f"{value:.2f}"])
    return format_table(["task", "metric", "value"], rows, right=(2,))
