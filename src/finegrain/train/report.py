"""Small aligned text tables for the terminal."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Columns padded to their widest cell; the columns in ``right`` are right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    """Evaluation metrics (``"task/metric"`` keys) as a table of task, metric and value: two decimals, counts
    (integers, ``num_*``) as integers."""
    rows = []
    for key, value in metrics.items():
        task, _, name = key.rpartition("/")
        count = isinstance(value, int) or name.startswith("num_")
        rows.append([task, name, f"{value:.0f}" if count else f"{value:.2f}"])
    return format_table(["task", "metric", "value"], rows, right=(2,))
