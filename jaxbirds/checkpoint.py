"""Checkpoints: one ``.npz`` file with every array, plus a JSON header inside it.

Contents: parameters, optimiser state (its leaves, in tree order), calibrated
batch-norm statistics when there are any, the per-step loss history, and a
header with the step, the vocabulary and both configurations. No pickle: the
file is plain arrays, loaded with ``allow_pickle=False``.

Writes are atomic: the file is written next to its destination under a
temporary name, flushed to disk, then renamed over it. An interrupted save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds.data import Vocabulary
from jaxbirds.model import PARAM_NAMES, BatchNormStats, ModelConfig, check_params
from jaxbirds.train import TrainConfig, TrainState

FORMAT = "jaxbirds-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or does not fit what it is loaded for."""


class Checkpoint(NamedTuple):
    state: TrainState
    stats: BatchNormStats | None
    losses: np.ndarray
    vocab: Vocabulary
    model_config: ModelConfig
    train_config: TrainConfig


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
    }
    arrays = {f"params/{name}": np.asarray(state.params[name]) for name in PARAM_NAMES}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state.opt_state)):
        arrays[f"opt/{i:03d}"] = np.asarray(leaf)
    if checkpoint.stats is not None:
        arrays["stats/mean"] = np.asarray(checkpoint.stats.mean)
        arrays["stats/var"] = np.asarray(checkpoint.stats.var)
    arrays["losses"] = np.asarray(checkpoint.losses, np.float32)
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} version {VERSION} file")
    try:
        model_config = ModelConfig(**header["model_config"])
        train_config = TrainConfig(**header["train_config"])
        vocab = Vocabulary(tuple(header["vocab"]))
        params = {name: jnp.asarray(arrays[f"params/{name}"]) for name in PARAM_NAMES}
        check_params(params, model_config)
        template = train_config.make_optimizer().init(params)
        leaves, treedef = jax.tree_util.tree_flatten(template)
        saved = [arrays[f"opt/{i:03d}"] for i in range(len(leaves))]
        if any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves)) or f"opt/{len(leaves):03d}" in arrays:
            raise CheckpointError("its optimiser state does not match its optimiser")
        opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in saved])
        stats = None
        if header["has_stats"]:
            stats = BatchNormStats(jnp.asarray(arrays["stats/mean"]), jnp.asarray(arrays["stats/var"]))
        state = TrainState(params, opt_state, int(header["step"]))
        return Checkpoint(state, stats, arrays["losses"], vocab, model_config, train_config)
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
