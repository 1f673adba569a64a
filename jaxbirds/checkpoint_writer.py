"""The loss history beside a checkpoint, and the background thread that saves both.

The per-step losses go to :class:`LossLog` (``losses.f32``, raw little-endian
float32), appended chunk by chunk, so saving after a chunk costs the same at
step 1,000 as at step 1,000,000. The checkpoint's step says how many of its
entries are valid: a crash between the two writes leaves extra entries, which
a resume cuts off.

:class:`Writer` appends the losses and saves the checkpoint
(:func:`jaxbirds.checkpoint.save`, atomic) on a background thread, so the
training loop does not wait for the disk.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxbirds import checkpoint
from jaxbirds.checkpoint import Checkpoint, CheckpointError


class LossLog:
    """The per-step loss history of a run: raw little-endian float32, appended chunk by chunk.

    A run's log holds one value per step; a sweep's (``models=K``) holds the K models' losses of each
    step, step after step, so that it too only grows at its end. :meth:`read` returns ``(steps,)``, or
    ``(K, steps)`` for a sweep, and checks the CRC-32 of the bytes it returns when the checkpoint
    recorded one (:attr:`Checkpoint.loss_log_crc32`): a log that is not the checkpoint's own, such as
    the log of a run that a killed ``--overwrite`` was replacing, is an error, never a wrong history.
    """

    def __init__(self, path: str | Path, models: int | None = None):
        """A log at ``path`` (nothing is read or written yet); ``models``: K for a sweep's, None for a run's."""
        self.path, self.models = Path(path), models

    @property
    def _width(self) -> int:
        return self.models or 1

    def read(self, steps: int, crc32: int | None = None) -> np.ndarray:
        """The first ``steps`` steps' losses, checked against the checkpoint that counts them.

        Args:
          steps: how many steps to read (the checkpoint's step).
          crc32: the CRC-32 of those steps' bytes, as the checkpoint recorded it; None: not checked.

        Returns:
          The losses, float32: ``(steps,)``, or ``(K, steps)`` for a sweep's log.

        Raises:
          CheckpointError: the log holds fewer steps, or their bytes are not the ones ``crc32`` counted.
        """
        data = np.fromfile(self.path, "<f4") if self.path.is_file() else np.zeros(0, "<f4")
        held = len(data) // self._width
        if held < steps:
            raise CheckpointError(f"{self.path} holds {held:,} steps' losses, the checkpoint {steps:,} steps")
        data = data[: steps * self._width]
        if crc32 is not None and zlib.crc32(data.tobytes()) != crc32:
            raise CheckpointError(
                f"{self.path} does not hold this checkpoint's loss history (its first {steps:,} steps differ from "
                "the ones the checkpoint counted: a run that replaced another was stopped between its first two "
                "writes); start again with --overwrite"
            )
        data = data.astype(np.float32)
        return data if self.models is None else data.reshape(steps, self.models).T

    def crc32(self, steps: int) -> int:
        """The CRC-32 of the first ``steps`` steps' bytes (what :meth:`read` checks)."""
        return zlib.crc32(np.fromfile(self.path, "<f4", count=steps * self._width).tobytes()) if steps else 0

    def truncate(self, steps: int) -> None:
        """Keep the first ``steps`` steps (creating an empty log if there is none)."""
        with open(self.path, "ab") as f:
            f.truncate(4 * steps * self._width)

    def encode(self, losses: np.ndarray) -> bytes:
        """The bytes ``losses`` add to the log: ``(steps,)``, or ``(K, steps)`` for a sweep, step after step."""
        losses = np.asarray(losses, "<f4")
        return (losses if self.models is None else losses.T).tobytes()

    def append(self, losses: np.ndarray) -> None:
        """Append and make durable (fsync), before the checkpoint that counts these steps is written."""
        with open(self.path, "ab") as f:
            f.write(self.encode(losses))
            f.flush()
            os.fsync(f.fileno())


class Writer:
    """Saves checkpoints on a background thread, so the training loop never waits for the disk.

    :meth:`submit` hands over a checkpoint and the losses of the steps since the
    last one and returns at once. The thread appends every batch of losses to
    the :class:`LossLog`, in order, and writes the newest checkpoint (a newer one
    submitted meanwhile supersedes an older one not yet written), stamped with
    the CRC-32 of the log's bytes up to its step. Nothing on disk changes before
    the first submission: only then is the log cut to its first ``keep`` steps
    (the history the run continues), so a run refused before its first chunk
    leaves a saved run as it was.

    A run that *replaces* another (``replacing``: ``--overwrite``) writes its first
    checkpoint before it touches the old log, and calls ``after_first`` (which
    removes the old run's other files) only once that checkpoint is on disk: a
    kill at any moment leaves either the old run whole or the new one's first
    checkpoint (whose log the CRC then refuses if the kill came before the log
    was written: one chunk lost, never a wrong history).

    The writer runs at most one checkpoint behind: :meth:`submit` first waits
    until the previous checkpoint is on disk (its writing overlapped the chunk
    just trained), so a kill at any moment loses at most the last chunk
    completed, however fast chunks are. ``waited_seconds`` counts that waiting:
    zero unless writing a checkpoint takes longer than training a chunk.

    :meth:`close` waits for everything submitted. An error on the thread stops
    the writer for good; it is raised by :meth:`close` and by every later
    :meth:`submit`. ``seconds`` counts the time spent writing; ``steps_logged``
    the log's length; :attr:`crc32` the CRC-32 of the log once closed.
    """

    def __init__(
        self,
        path: str | Path,
        log: LossLog,
        keep: int = 0,
        replacing: bool = False,
        after_first: Callable[[], None] | None = None,
    ):
        self.path, self.log = Path(path), log
        self.seconds, self.waited_seconds = 0.0, 0.0
        self.steps_logged = keep
        self.crc32 = log.crc32(keep) if keep else 0
        self._keep, self._started, self.replacing, self._after_first = keep, False, replacing, after_first
        self._pending: list[tuple[Checkpoint, np.ndarray]] = []
        self._error: BaseException | None = None
        self._closed, self._busy = False, False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether anything was submitted (and so the log cut to ``keep`` and appended to)."""
        return self.steps_logged > self._keep or self._started

    def submit(self, saved: Checkpoint, new_losses: np.ndarray) -> None:
        """Hand over a checkpoint to save once the previous one is on disk (waiting for that, if need be).

        Args:
          saved: the state after the losses' last step (its ``loss_log_crc32`` is set when it is written).
          new_losses: the losses of the steps since the last submission: ``(steps,)``, or ``(K, steps)``.

        Raises:
          BaseException: the error that stopped the thread earlier.
        """
        with self._cv:
            t0 = time.perf_counter()
            while (self._pending or self._busy) and self._error is None:  # one checkpoint behind, at most
                self._cv.wait()
            self.waited_seconds += time.perf_counter() - t0
            self._raise_error()
            self._pending.append((saved, np.array(new_losses, np.float32)))
            self.steps_logged += np.shape(new_losses)[-1]
            self._cv.notify_all()

    def close(self) -> None:
        """Wait until everything submitted is on disk; raise the thread's error, if any."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                batch, self._pending, self._busy = self._pending, [], True
            t0 = time.perf_counter()
            try:
                self._write(batch)
            except BaseException as err:  # surfaced in the caller's thread
                with self._cv:
                    self._error = err
                    self._pending.clear()
                    self._busy = False
                    self._cv.notify_all()
                return
            finally:
                self.seconds += time.perf_counter() - t0
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _write(self, batch: list[tuple[Checkpoint, np.ndarray]]) -> None:
        crc = self.crc32
        for _, losses in batch:
            crc = zlib.crc32(self.log.encode(losses), crc)
        newest = batch[-1][0]._replace(loss_log_crc32=crc)
        first, replace_first = not self._started, not self._started and self.replacing
        if replace_first:  # the new run's first checkpoint replaces the old run's before its log is touched
            checkpoint.save(self.path, newest)
        if first:
            self.log.truncate(self._keep)
            self._started = True
        for _, losses in batch:
            self.log.append(losses)
        if not replace_first:
            checkpoint.save(self.path, newest)
        self.crc32 = crc
        if first and self._after_first is not None:
            self._after_first()
