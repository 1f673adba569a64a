"""An output directory (``--out``): the one list of the files a run or a sweep writes there, and its checks.

``scripts/train.py`` and ``scripts/sweep.py`` share output directories (a sweep
saves its best model as an ordinary run, which ``train.py --resume`` continues),
so both use this module's lists for all three jobs:

* the up-front check (:func:`prepare`): before any work, every file either
  script may write or remove must be writable, and a saved run is not replaced
  unasked;
* the writers (:mod:`jaxbirds.runner`, :mod:`jaxbirds.sweep_runner`), which name
  their files from here;
* the clean-up when a run replaces another (:func:`remove_stale`): every file of
  either kind that the new run does not write itself is removed, so nothing
  left in ``--out`` describes another model.

One run at a time: a run holds its directory's lock (:func:`claimed`) from its
up-front check to its last write, and a second run into the same directory is
refused. The lock is an operating-system lock on a file (``flock``, through
``filelock``), which the kernel releases when its process ends however it ends,
so a run killed with ``kill -9`` never blocks the next one.

Nothing is created before the work has started: the checks prove that ``--out``
could be created and written without creating it, so a command refused for any
reason (a size that does not fit in memory, found after these checks) leaves
the disk as it was. The writer creates the directory when it first writes.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import filelock

from jaxbirds.errors import OutputError

CHECKPOINT = "checkpoint.npz"
LOSS_LOG = "losses.f32"
METRICS = "metrics.json"
LOSS_PLOT = "loss.png"
DIAGNOSTICS_PLOT = "diagnostics.png"
SWEEP_JSON = "sweep.json"
SWEEP_PLOT = "sweep.png"
SWEEP_STATE = "sweep-state.npz"
SWEEP_LOSSES = "sweep-losses.f32"

#: The lock a run holds on its output directory (:func:`claimed`); it stays in the directory, unlocked.
LOCK = ".jaxbirds.lock"

#: What ``scripts/train.py`` writes: the state, the loss history, the results and their pictures (the
#: diagnostics' only with ``--diagnostics``).
RUN_FILES = (CHECKPOINT, LOSS_LOG, METRICS, LOSS_PLOT, DIAGNOSTICS_PLOT)
#: What ``scripts/sweep.py`` writes: every model's state and loss history after every chunk (its checkpoint,
#: which ``--resume`` continues), its report and figure, and its best model as a run's state and history.
SWEEP_FILES = (SWEEP_STATE, SWEEP_LOSSES, SWEEP_JSON, SWEEP_PLOT, CHECKPOINT, LOSS_LOG)
#: Every file of an output directory: what a new run of either kind replaces.
ALL_FILES = tuple(dict.fromkeys(RUN_FILES + SWEEP_FILES))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path) -> Path:
    """Prove that files can be written in directory ``path`` (created later if missing); :class:`OutputError` if not.

    Creates nothing: for a directory that does not exist yet, the nearest
    existing ancestor must be a directory that takes a new entry (tested with
    a file that is removed at once). Called before any work starts, so a typo
    in an output path costs nothing.
    """
    path = Path(path)
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise OutputError(
            f"{existing} exists and is not a directory"
            + ("" if existing == path.absolute() else f", so {path} cannot be made")
        )
    probe = existing / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write into {existing}: {err.strerror or err}") from None
    return path


def check_writable_file(path: Path) -> Path:
    """Like :func:`check_writable_dir` for a file to be written later: its directory must take a file,
    and the path itself must not be a directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    check_writable_dir(path.parent)
    return path


def make_dir(path: Path) -> Path:
    """Create the output directory (and its parents) when the first file is written into it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {path}: {err.strerror or err}") from None
    return Path(path)


def prepare(
    out: Path, saved: Sequence[str], what: str, state: str, resume: bool = False, overwrite: bool = False
) -> None:
    """The up-front check of an output directory, before any work.

    Args:
      out: the output directory (it need not exist).
      saved: the files whose presence means ``out`` holds results that a new run must not replace unasked.
      what: what the script calls its own results, for the message ("a saved run", "results").
      state: the checkpoint the script's ``--resume`` continues (:data:`CHECKPOINT`, :data:`SWEEP_STATE`):
        the message offers ``--resume`` when ``out`` holds one.
      resume: the run continues the one saved in ``out`` (nothing is replaced).
      overwrite: the user asked to replace what ``out`` holds.

    Raises:
      OutputError: ``out`` holds results and neither ``resume`` nor ``overwrite`` was given; ``out`` cannot be
        written; or one of :data:`ALL_FILES` is a directory (every one of them may be written or removed).
    """
    out = Path(out)
    check_writable_dir(out)
    for name in ALL_FILES:
        if (out / name).is_dir():
            raise OutputError(f"{out / name} is a directory; a run writes (or replaces) a file there")
    found = [out / name for name in saved if (out / name).exists()]
    if found and not (resume or overwrite):
        resumable = (out / state).exists()
        advice = "pass --resume to continue it, --overwrite to replace it," if resumable else "pass --overwrite,"
        raise OutputError(f"{out} already holds {what} ({found[0]}); {advice} or another --out")


def remove_stale(out: Path, keep: Sequence[str] = ()) -> None:
    """Remove every file of :data:`ALL_FILES` in ``out`` except ``keep``: what a replaced run left."""
    for name in ALL_FILES:
        if name not in keep:
            (Path(out) / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[Path]:
    """Hold ``out``'s lock while the block runs: no other run can use ``out`` meanwhile.

    The directory is created to hold the lock file. If the block ends having written nothing (the run was
    refused before its first write), what this call created is removed again, the lock file while it is
    still held: a refused command leaves the disk as it was. A run refused *because* another holds the lock
    removes nothing (the directory and the lock are the other run's).

    Raises:
      OutputError: another process holds the lock (a run is using ``out``), or ``out`` cannot be created.
    """
    out = Path(out)
    absolute = out.absolute()
    created = [p for p in (absolute, *absolute.parents) if not p.exists()]
    check_writable_dir(out)
    make_dir(out)
    had_lock = (out / LOCK).exists()
    before = set(os.listdir(out)) - {LOCK}
    lock = filelock.FileLock(out / LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputError(
            f"{out} is in use by another run (it holds the lock {out / LOCK}); wait for that run to end, "
            "or give another --out"
        ) from None
    except OSError as err:
        raise OutputError(f"cannot lock {out / LOCK}: {err.strerror or err}") from None
    try:
        yield out
    finally:
        untouched = out.is_dir() and set(os.listdir(out)) - {LOCK} == before
        if untouched and not had_lock:
            (out / LOCK).unlink(missing_ok=True)  # still held: no other run can have taken it meanwhile
        lock.release()
        if untouched and not before:
            for directory in created:  # innermost first; a directory another process filled meanwhile stays
                try:
                    directory.rmdir()
                except OSError:
                    break
