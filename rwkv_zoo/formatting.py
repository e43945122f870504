"""Plain-text tables and counts for the reports that the library prints (``ablate``) and the command line.

They live below the CLI so that library code can print the same tables without importing ``rwkv_zoo.cli``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A plain aligned text table. ``align`` has one character per column: ``<`` (default) or ``>``."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    ncol = len(headers)
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    align = align.ljust(ncol, "<")

    def fmt(row: list[str]) -> str:
        parts = [c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])])


def human_count(n: int) -> str:
    """4 significant figures with a K/M/B suffix, as release labels write parameter counts."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:#.4g}{suffix}"
    return str(n)
