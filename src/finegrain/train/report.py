"""Evaluation metrics as a terminal table."""

from __future__ import annotations

import math

from finegrain.tables import NOT_COMPUTED, NOT_COMPUTED_NOTE, format_table


def format_metrics(metrics: dict[str, float]) -> str:
    """Evaluation metrics (``"task/metric"`` keys) as a table of task, metric and value: two decimals, counts
    (integers, ``num_*``) as integers; a metric that could not be computed (NaN) as ``-*``, with a footnote."""
    rows = []
    for key, value in metrics.items():
        task, _, name = key.rpartition("/")
        count = isinstance(value, int) or name.startswith("num_")
        missing = isinstance(value, float) and math.isnan(value)
        rows.append([task, name, NOT_COMPUTED if missing else f"{value:.0f}" if count else f"{value:.2f}"])
    table = format_table(["task", "metric", "value"], rows, right=(2,))
    if any(row[2] == NOT_COMPUTED for row in rows):
        table += f"\n{NOT_COMPUTED_NOTE}"
    return table
