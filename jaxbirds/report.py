"""The benchmark report: the tables of ``scripts/bench.py`` written into marked blocks of a markdown file.

A block is the text between two markers, each on a line of its own, that name
a study (a key of :data:`jaxbirds.bench.STUDIES`)::

    <!-- bench:dispatch -->
    (generated: the study's table, then one line saying which command filled it, on what, when)
    <!-- /bench:dispatch -->

``scripts/bench.py --report FILE`` replaces the inside of the blocks of the
studies that ran, and nothing else: the prose around them, and the blocks of
studies not run (an ``--only`` run fills only some), stay byte for byte as they
were. The file is checked before the suite runs (every study to be run has
exactly one block, every marker is closed, in order, and names a known study),
so that a typo costs nothing instead of minutes of measuring, and it is
written atomically, so that an interrupted write leaves the old file.
"""

from __future__ import annotations

import datetime
import re
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from jaxbirds import bench, cli, model
from jaxbirds.checkpoint import write_atomically
from jaxbirds.errors import OutputError

#: ``<!-- bench:NAME -->`` opens a block, ``<!-- /bench:NAME -->`` closes it, each on a line of its own
#: (so that prose may quote a marker, as this module's docstring does).
MARKER = re.compile(r"^[ \t]*<!--\s*(/?)bench:([\w-]+)\s*-->[ \t]*$", re.MULTILINE)


def opening(name: str) -> str:
    """The marker that opens ``name``'s block."""
    return f"<!-- bench:{name} -->"


def closing(name: str) -> str:
    """The marker that closes ``name``'s block."""
    return f"<!-- /bench:{name} -->"


class Block(NamedTuple):
    """Where a block's inside lies in the text: ``text[start:end]``, between its two markers."""

    start: int
    end: int


def find_blocks(text: str, known: Collection[str], source: str = "the report") -> dict[str, Block]:
    """Every marked block of ``text``, by study name.

    Args:
        text: the markdown.
        known: the study names a marker may carry.
        source: how error messages name the text (its path).

    Returns:
        ``{name: Block}`` in the order of the text.

    Raises:
        OutputError: a marker names an unknown study, closes a block that is not open, opens one
            inside another, or is never closed; or a study has two blocks.
    """
    blocks: dict[str, Block] = {}
    open_name, open_at, open_line = None, 0, 0
    for match in MARKER.finditer(text):
        is_close, name = match.group(1) == "/", match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        where = f"{source}, line {line}"
        if name not in known:
            raise OutputError(f"{where}: {match.group(0).strip()} names no study; studies: {', '.join(known)}")
        if not is_close:
            if open_name is not None:
                raise OutputError(
                    f"{where}: {match.group(0).strip()} opens inside the {open_name} block of line {open_line}"
                )
            if name in blocks:
                raise OutputError(f"{where}: a second {name} block (one per study)")
            open_name, open_at, open_line = name, match.end(), line
        elif open_name != name:
            raise OutputError(f"{where}: {match.group(0).strip()} closes a block that is not open")
        else:
            blocks[name] = Block(open_at, match.start())
            open_name = None
    if open_name is not None:
        raise OutputError(f"{source}, line {open_line}: {opening(open_name)} is never closed by {closing(open_name)}")
    return blocks


def check(text: str, names: Iterable[str], known: Collection[str], source: str = "the report") -> dict[str, Block]:
    """:func:`find_blocks`, and every study of ``names`` has a block to fill.

    Raises:
        OutputError: as :func:`find_blocks`, or a study of ``names`` has no block.
    """
    blocks = find_blocks(text, known, source)
    missing = [name for name in names if name not in blocks]
    if missing:
        raise OutputError(
            f"{source} has no block for {', '.join(missing)}: mark where each table goes with "
            + ", ".join(f"{opening(n)} ... {closing(n)}" for n in missing)
        )
    return blocks


def rewrite(text: str, contents: Mapping[str, str], known: Collection[str], source: str = "the report") -> str:
    """``text`` with the inside of each block named in ``contents`` replaced; everything else unchanged.

    Args:
        text: the markdown.
        contents: ``{study: new inside of its block}``.
        known: the study names a marker may carry.
        source: how error messages name the text.

    Raises:
        OutputError: as :func:`check` for the studies of ``contents``.
    """
    blocks = check(text, contents, known, source)
    pieces, done = [], 0
    for name, block in blocks.items():  # in the order of the text
        if name in contents:
            pieces += [text[done : block.start], contents[name]]
            done = block.end
    return "".join(pieces) + text[done:]


def command_line(argv: Sequence[str], script: str = "scripts/bench.py") -> str:
    """The command a reader would type to run ``script`` with ``argv``."""
    return shlex.join(["python", script, *argv])


def timestamp() -> str:
    """Now, in UTC, to the minute: when a benchmark ran."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _setting(value) -> str:
    return str(value) if value not in ("", {}, None) else "none"


def provenance(results: Mapping, name: str, rendered_by: str | None = None) -> str:
    """One line under a table: the study's title, the command that measured it, when, in how many seconds, on what
    model and machine.

    Args:
        results: what ``scripts/bench.py`` saves: ``environment``, ``command``, ``date``, ``study_seconds`` and
            ``hidden`` (each may be missing from an older file: then it says so; a file without ``hidden``
            predates ``--hidden``, and measured the default model).
        name: the study.
        rendered_by: the command that wrote saved results into the file, if not the one that measured them.
    """
    title = bench.STUDIES[name].title
    command = results.get("command")
    seconds = results.get("study_seconds", {}).get(name)
    took = f"the {name} study took {seconds:.0f} s, compiles included" if seconds is not None else "time not recorded"
    machine = ", ".join(f"{key} {_setting(value)}" for key, value in results.get("environment", {}).items())
    line = (
        f"*{title}.* Measured by `{command}`" if command else f"*{title}.* Measured by a run that recorded no command"
    )
    hidden = results.get("hidden") or model.ModelConfig().hidden
    line += f" on {results.get('date', 'a date not recorded')} ({took}); model: {cli.describe_hidden(hidden)}; "
    line += f"machine: {machine or 'not recorded'}."
    if rendered_by:
        line += f" Written here from its saved results by `{rendered_by}`."
    return line


def _as_measured(row: Mapping) -> dict:
    """A row as a study returned it: JSON turned its (min, max) spreads into lists; tuples again."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in row.items()}


def render(results: Mapping, name: str, rendered_by: str | None = None) -> str:
    """The inside of a study's block: a blank line, its table, a blank line, its :func:`provenance`, a newline."""
    table = bench.STUDIES[name].table([_as_measured(row) for row in results[name]])
    return f"\n{table}\n\n{provenance(results, name, rendered_by)}\n"


def read(path: Path) -> str:
    """The markdown file at ``path``; :class:`OutputError` if there is none to rewrite."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OutputError(f"{path} does not exist: --report rewrites the marked blocks of a markdown file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise OutputError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def check_file(path: Path, names: Iterable[str]) -> None:
    """Before the suite runs: ``path`` can be read and has a well-formed block for each study of ``names``."""
    check(read(path), list(names), bench.STUDIES, str(path))


def update_file(path: Path, results: Mapping, names: Iterable[str], rendered_by: str | None = None) -> list[str]:
    """Fill the blocks of the studies of ``names`` that have rows in ``results``; write ``path`` atomically.

    A study that ran but has no rows (skipped: torch not installed) keeps its block as it was.

    Returns:
        the studies whose blocks were rewritten.
    """
    filled = [name for name in names if results.get(name)]
    text = read(path)
    new = rewrite(text, {name: render(results, name, rendered_by) for name in filled}, bench.STUDIES, str(path))
    try:
        write_atomically(Path(path), new.encode("utf-8"))
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    return filled
