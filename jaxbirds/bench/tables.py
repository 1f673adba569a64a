"""Rows and markdown tables: what every study returns, and how ``scripts/bench.py`` prints it."""

from __future__ import annotations

from collections.abc import Sequence

#: One measured point of a study: column key -> value (a number, a label, or a ``(min, max)`` spread).
Row = dict

#: One column of a study's table: ``(row key, header, format spec)``; the spec is applied to numbers only.
Column = tuple[str, str, str]


def markdown_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """A markdown table of ``rows``, one line per row, one cell per column.

    Args:
        rows: the study's rows; a key a row lacks prints as an empty cell.
        columns: ``(key, header, format spec)`` per column. Numbers are formatted by the spec
            (when it is not empty), tuples print as min-max spreads (``1.0–2.0``), anything else as ``str``.

    Returns:
        The table's lines (header, separator, rows) joined by newlines, without a final newline.
    """
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key, "")
            if isinstance(value, tuple):
                cells.append("–".join(format(v, spec) for v in value))
            elif isinstance(value, (int, float)) and spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
