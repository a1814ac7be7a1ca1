"""Result tables as text: the one Markdown table writer and the one atomic CSV writer.

Every report of the project (benchmarks, evaluation summaries, reproduce's tables, analyses) writes its
tables through these, so they all share one style: ``| a | b |`` rows and a ``|---|---|`` separator.
"""
from __future__ import annotations

import csv
import io
from typing import Iterable, Optional, Sequence

from utils.io import PathLike, atomic_write_text

__all__ = ["markdown_row", "markdown_table", "write_csv"]

_ALIGN = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}


def markdown_row(cells: Iterable[object]) -> str:
    """One table line, ``| a | b |``: each cell through ``str()``, as is (a ``|`` inside a cell is not
    escaped; the caller formats and escapes). For tables printed a row at a time, under the header
    lines of ``markdown_table(header, [])``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Optional[Sequence[Optional[str]]] = None) -> list[str]:
    """The lines of a Markdown table (no trailing newline): the header, the separator, one line per row.

    ``align``: one entry per column, ``None`` (``---``, the renderer's default), ``"left"`` (``:---``),
    ``"right"`` (``---:``) or ``"center"`` (``:---:``); all ``None`` when not given.

    >>> markdown_table(["name", "ms"], [["BRN", 1.5]], align=[None, "right"])
    ['| name | ms |', '|---|---:|', '| BRN | 1.5 |']
    """
    align = [None] * len(header) if align is None else list(align)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} entries for {len(header)} columns")
    unknown = [a for a in align if a not in _ALIGN]
    if unknown:
        raise ValueError(f"unknown alignment {unknown[0]!r}; valid: None, 'left', 'right', 'center'")
    return [markdown_row(header), "|" + "|".join(_ALIGN[a] for a in align) + "|", *(markdown_row(r) for r in rows)]


def write_csv(path: PathLike, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A CSV file (``csv.writer``'s dialect, ``\\r\\n`` line ends) of a header line and ``rows``, written
    atomically (a reader never sees half a file). Cells as ``csv`` writes them: format numbers first."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
