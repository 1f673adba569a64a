"""Checkpoints: one ``.npz`` file with the state, and an append-only loss history beside it.

``checkpoint.npz`` holds the parameters, the optimiser state (its leaves, in
tree order), the calibrated batch-norm statistics when there are any, and a
header with the step, the vocabulary, both configurations and the data's
fingerprint. No pickle: the file is plain arrays, loaded with
``allow_pickle=False``. Its size does not grow with the run.

The per-step losses go to :class:`LossLog` (``losses.f32``, raw little-endian
float32), appended chunk by chunk, so saving after a chunk costs the same at
step 1,000 as at step 1,000,000. The checkpoint's step says how many of its
entries are valid: a crash between the two writes leaves extra entries, which
a resume cuts off.

Writes are atomic: the file is written next to its destination under a
temporary name, flushed to disk, then renamed over it. An interrupted save
leaves the previous checkpoint intact. Files are created with the user's
umask, like any other file the user makes. :class:`Writer` does all of this on
a background thread, so the training loop does not wait for the disk.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds.data import Vocabulary
from jaxbirds.errors import JaxbirdsError
from jaxbirds.model import PARAM_NAMES, BatchNormStats, ModelConfig, check_params
from jaxbirds.train import TrainConfig, TrainState

FORMAT = "jaxbirds-checkpoint"
VERSION = 2
LOSS_LOG = "losses.f32"


class CheckpointError(JaxbirdsError, ValueError):
    """The checkpoint is missing, unreadable, or does not fit what it is loaded for."""


class Checkpoint(NamedTuple):
    state: TrainState
    stats: BatchNormStats | None
    vocab: Vocabulary
    model_config: ModelConfig
    train_config: TrainConfig
    data: DataSource | None = None  # where the training names came from, and their fingerprint


class DataSource(NamedTuple):
    path: str
    sha256: str


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a new temporary file beside ``path``, fsync it, rename it over ``path``.

    ``os.open`` with mode 0o666 lets the kernel apply the user's umask, as for
    any file the user creates (``tempfile`` would make it 0600).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = checkpoint.state
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(state.step),
        "vocab": "".join(checkpoint.vocab.chars),
        "model_config": dataclasses.asdict(checkpoint.model_config),
        "train_config": dataclasses.asdict(checkpoint.train_config),
        "has_stats": checkpoint.stats is not None,
        "data": checkpoint.data._asdict() if checkpoint.data else None,
    }
    arrays = {f"params/{name}": np.asarray(state.params[name]) for name in PARAM_NAMES}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state.opt_state)):
        arrays[f"opt/{i:03d}"] = np.asarray(leaf)
    if checkpoint.stats is not None:
        arrays["stats/mean"] = np.asarray(checkpoint.stats.mean)
        arrays["stats/var"] = np.asarray(checkpoint.stats.var)
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_atomically(path, buffer.getvalue())
    return path


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save`; a clear :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable checkpoint (its header is not a JSON object)")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} version {VERSION} file (it says {header.get('version')})")
    try:
        model_config = ModelConfig(**header["model_config"])
        train_config = TrainConfig(**header["train_config"])
        vocab = Vocabulary(tuple(header["vocab"]))
        params = {name: jnp.asarray(arrays[f"params/{name}"]) for name in PARAM_NAMES}
        check_params(params, model_config)
        template = train_config.make_optimizer().init(params)
        leaves, treedef = jax.tree_util.tree_flatten(template)
        saved = [arrays[f"opt/{i:03d}"] for i in range(len(leaves))]
        if (
            any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves, strict=True))
            or f"opt/{len(leaves):03d}" in arrays
        ):
            raise CheckpointError("its optimiser state does not match its optimiser")
        opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in saved])
        stats = None
        if header["has_stats"]:
            stats = BatchNormStats(jnp.asarray(arrays["stats/mean"]), jnp.asarray(arrays["stats/var"]))
        state = TrainState(params, opt_state, int(header["step"]))
        data = DataSource(**header["data"]) if header.get("data") else None
        return Checkpoint(state, stats, vocab, model_config, train_config, data)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not hold a consistent checkpoint ({type(err).__name__}: {err})") from None


def check_compatible(checkpoint: Checkpoint, vocab: Vocabulary, context_size: int) -> None:
    """Raise if the checkpoint was trained on another vocabulary or context size than the data."""
    if checkpoint.vocab != vocab:
        raise CheckpointError(
            f"the checkpoint's vocabulary {''.join(checkpoint.vocab.chars)!r} differs from the data's "
            f"{''.join(vocab.chars)!r}"
        )
    if checkpoint.model_config.context_size != context_size:
        raise CheckpointError(
            f"the checkpoint uses context {checkpoint.model_config.context_size}, the data {context_size}"
        )


class LossLog:
    """The per-step loss history of a run: raw little-endian float32, one value per step, appended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self, steps: int) -> np.ndarray:
        """The first ``steps`` losses; a :class:`CheckpointError` if the log holds fewer."""
        data = np.fromfile(self.path, "<f4") if self.path.is_file() else np.zeros(0, "<f4")
        if len(data) < steps:
            raise CheckpointError(f"{self.path} holds {len(data):,} losses, the checkpoint {steps:,} steps")
        return data[:steps].astype(np.float32)

    def truncate(self, steps: int) -> None:
        """Keep the first ``steps`` entries (creating an empty log if there is none)."""
        with open(self.path, "ab") as f:
            f.truncate(4 * steps)

    def append(self, losses: np.ndarray) -> None:
        """Append and make durable (fsync), before the checkpoint that counts these steps is written."""
        with open(self.path, "ab") as f:
            f.write(np.asarray(losses, "<f4").tobytes())
            f.flush()
            os.fsync(f.fileno())


class Writer:
    """Saves checkpoints on a background thread, so the training loop never waits for the disk.

    :meth:`submit` hands over a checkpoint and the losses of the steps since the
    last one and returns at once. The thread appends every batch of losses to
    the :class:`LossLog`, in order, and writes the newest checkpoint (a newer one
    submitted meanwhile supersedes an older one not yet written). Nothing on
    disk changes before the first submission: only then is the log cut to its
    first ``keep`` entries (the history the run continues), so a run refused
    before its first chunk leaves a saved run as it was. :meth:`close` waits for
    everything submitted. An error on the thread stops the writer for good; it
    is raised by :meth:`close` and by every later :meth:`submit`. ``seconds``
    counts the time spent writing; ``steps_logged`` the log's length.
    """

    def __init__(self, path: str | Path, log: LossLog, keep: int = 0):
        self.path, self.log = Path(path), log
        self.seconds = 0.0
        self.steps_logged = keep
        self._keep, self._started = keep, False
        self._pending: list[tuple[Checkpoint, np.ndarray]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether anything was submitted (and so the log cut to ``keep`` and appended to)."""
        return self.steps_logged > self._keep or self._started

    def submit(self, checkpoint: Checkpoint, new_losses: np.ndarray) -> None:
        with self._cv:
            self._raise_error()
            self._pending.append((checkpoint, np.array(new_losses, np.float32)))
            self.steps_logged += len(new_losses)
            self._cv.notify()

    def close(self) -> None:
        """Wait until everything submitted is on disk; raise the thread's error, if any."""
        with self._cv:
            self._closed = True
            self._cv.notify()
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
                batch, self._pending = self._pending, []
            t0 = time.perf_counter()
            try:
                if not self._started:
                    self.log.truncate(self._keep)
                    self._started = True
                for _, losses in batch:
                    self.log.append(losses)
                save(self.path, batch[-1][0])
            except BaseException as err:  # surfaced in the caller's thread
                with self._cv:
                    self._error = err
                    self._pending.clear()
                return
            finally:
                self.seconds += time.perf_counter() - t0
