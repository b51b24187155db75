"""Small aligned text tables for the terminal (a leaf module: every layer may import it)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Columns padded to their widest cell; the columns in ``right`` are right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


NOT_COMPUTED = "-*"  # a metric that could not be computed (NaN / null: e.g. an AP without ground truth)
NOT_COMPUTED_NOTE = (f"{NOT_COMPUTED}: could not be computed (e.g. an AP of an area range or class group without "
                     "ground truth)")
