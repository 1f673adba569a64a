"""One study of the suite as a value: its name, its table, how to run it, what it draws, what it needs.

Each study module defines one :class:`Study` as ``STUDY``; :data:`jaxbirds.bench.STUDIES` lists
them in the order the suite runs them, and ``scripts/bench.py`` runs, prints, saves and draws
them all the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jaxbirds.bench.tables import Column, Row, markdown_table
from jaxbirds.bench.timing import Bench


@dataclasses.dataclass(frozen=True)
class Figure:
    """The PNG a study draws (``scripts/bench.py --plot DIR`` writes ``DIR/file``)."""

    file: str  # the file's name in the plot directory
    draw: Callable[[Sequence[Row], Path], Path | None]  # (the study's rows, where) -> the path; None: nothing drawn


def available(bench: Bench) -> str | None:
    """The default :attr:`Study.skip_reason`: a study that can always run."""
    return None


@dataclasses.dataclass(frozen=True)
class Study:
    """A study of the suite.

    ``run(bench, **inputs)`` measures and returns the rows; ``inputs`` holds, by study name, the rows
    of each study of ``needs`` (run first even when not chosen: the XLA study's achieved GFLOP/s is
    the gradient-mode study's time per step) and of ``uses`` (never run for it: their rows if they ran
    before in this suite, ``[]`` otherwise; the PyTorch study's speed-up over the fastest scan, if dispatch ran).
    Both name studies earlier in :data:`jaxbirds.bench.STUDIES`.
    """

    name: str  # the --only choice, the key of the saved rows, the report's <!-- bench:NAME --> block
    title: str  # the table's heading
    columns: tuple[Column, ...]
    run: Callable[..., list[Row]]
    figure: Figure | None = None
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    skip_reason: Callable[[Bench], str | None] = available  # why it cannot run here, on this bench's model, or None
    renamed: tuple[tuple[str, str], ...] = ()  # (old key, key): rows saved under an old key still fill its column

    def measure(self, bench: Bench, earlier: Mapping[str, list[Row]]) -> tuple[list[Row], str | None]:
        """Run the study, or say why it cannot run here.

        Args:
            bench: the dataset, recipe and settings every study measures with.
            earlier: rows of the studies run before in this suite, by name (every study of ``needs`` included).

        Returns:
            ``(rows, None)``; or ``([], note)`` when :attr:`skip_reason` gives a note.
        """
        note = self.skip_reason(bench)
        if note:
            return [], note
        inputs = {name: earlier[name] for name in self.needs} | {name: earlier.get(name, []) for name in self.uses}
        return self.run(bench, **inputs), None

    def table(self, rows: Sequence[Row]) -> str:
        """The study's rows as a markdown table of its :attr:`columns` (see :func:`markdown_table`); a row saved
        by an earlier version under an old key of :attr:`renamed` shows that value in the new key's column."""
        return markdown_table([self.current(row) for row in rows], self.columns)

    def current(self, row: Row) -> Row:
        """``row`` with each old key of :attr:`renamed` that it has (and not the new one) under its new key."""
        old = {new: row[key] for key, new in self.renamed if key in row and new not in row}
        return {**row, **old} if old else row
