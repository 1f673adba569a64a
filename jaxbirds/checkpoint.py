"""Checkpoints: one ``.npz`` file with the state (the loss history beside it: :mod:`jaxbirds.checkpoint_writer`).

``checkpoint.npz`` holds the parameters (``params/<name>`` for every name of
:func:`jaxbirds.model.param_names`), the optimiser state (``opt/<i>``, its leaves
in tree order), the calibrated batch-norm statistics when there are any
(``stats/mean<l>`` and ``stats/var<l>`` for each block ``l``, from 1), and a
header with the step, the vocabulary, both configurations (the model's
``hidden`` as a list of widths) and the data's fingerprint. No pickle: the
file is plain arrays, loaded with ``allow_pickle=False``. Its size does not grow
with the run. :func:`load` checks every byte (the zip's CRC-32s) and every part
against the header's configurations: any file that is not a checkpoint is one
:class:`CheckpointError`.
Files of versions 2 and 3, from before models had more than one block, still
load: their one block's names (``bngain``, ``stats/mean``, ...) are read as
block 1's (:data:`ONE_BLOCK_NAMES`).

Writes are atomic (:func:`write_atomically`): the file is written next to its
destination under a temporary name, flushed to disk, then renamed over it. An
interrupted save leaves the previous checkpoint intact. Files are created with
the user's umask, like any other file the user makes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxbirds.data import Vocabulary
from jaxbirds.errors import JaxbirdsError
from jaxbirds.model import BatchNormStats, ModelConfig, ModelStats, param_names, param_shapes
from jaxbirds.sweep import injected_optimizer
from jaxbirds.train import TrainConfig, TrainState

FORMAT = "jaxbirds-checkpoint"
#: 4: any depth (blocks numbered: params/bngain1 ..., stats/mean1 ...; model_config.hidden a list of widths).
#: 3 added "sweep" and "loss_log_crc32". Versions 2 and 3 (one block, an integer hidden) still load.
VERSION = 4
OLDEST_READ = 2
FIRST_NUMBERED = 4  # the first version whose blocks are numbered
ZIP_SIGNATURE = b"PK\x03\x04"  # how every zip archive, and so every .npz file, begins
PARAM_DTYPE = np.dtype(np.float32)  # of parameters and statistics: every run trains in float32
HEADER_FIELDS = {
    2: {"format", "version", "step", "vocab", "model_config", "train_config", "has_stats", "data"},
    3: {"format", "version", "step", "vocab", "model_config", "train_config", "has_stats", "data", "sweep",
        "loss_log_crc32"},
}  # fmt: skip
HEADER_FIELDS[4] = HEADER_FIELDS[3]
#: The members of versions 2 and 3 (one block, whose names had no number) by their name since version 4.
#: The optimiser's leaves keep their order: the new names sort as the old ones did.
ONE_BLOCK_NAMES = {
    "params/bngain1": "params/bngain", "params/bnbias1": "params/bnbias",
    "stats/mean1": "stats/mean", "stats/var1": "stats/var",
}  # fmt: skip

#: Config fields newer than some files, by the version that first holds them: a file of an older version
#: lacks them, and they take their default (what the run it saved trained with).
FIELDS_SINCE = {"train_config": {"diagnostics_every": 4}}


def stats_names(layer: int) -> tuple[str, str]:
    """The members that hold a block's calibrated mean and variance.

    Args:
      layer: the block, from 1.

    Returns:
      ``("stats/mean<layer>", "stats/var<layer>")``.
    """
    return f"stats/mean{layer}", f"stats/var{layer}"


class CheckpointError(JaxbirdsError, ValueError):
    """The checkpoint is missing, unreadable, or does not fit what it is loaded for."""


class SweepMembers(NamedTuple):
    """What differs between the models of a sweep's checkpoint, model by model (see :mod:`jaxbirds.sweep`)."""

    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    diverged_at: tuple[int | None, ...]  # the first step whose loss was not finite; None: still training


class Checkpoint(NamedTuple):
    """A run's state on disk. A sweep's checkpoint (``sweep`` given) holds every model's parameters and
    optimiser state stacked on a leading models axis, and its ``train_config`` holds what they share."""

    state: TrainState
    stats: ModelStats | None  # one BatchNormStats per block, first to last
    vocab: Vocabulary
    model_config: ModelConfig
    train_config: TrainConfig
    data: DataSource | None = None  # where the training names came from, and their fingerprint
    sweep: SweepMembers | None = None
    loss_log_crc32: int | None = None  # of the loss log's first ``state.step`` steps (see LossLog.read)


class DataSource(NamedTuple):
    path: str
    sha256: str


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a new temporary file beside ``path``, fsync it, rename it over ``path``.

    ``os.open`` with mode 0o666 lets the kernel apply the user's umask, as for
    any file the user creates (``tempfile`` would make it 0600).

    Args:
      path: the destination; its directory must exist. A reader sees the old file or the new one, whole.
      payload: the file's new contents.

    Raises:
      OSError: the file cannot be written (the temporary file is removed; ``path`` is as it was).
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
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename: :func:`write_atomically`).

    Args:
      path: the ``.npz`` file; its directory is created if need be.
      checkpoint: the state; its ``stats``, if any, one ``BatchNormStats`` per block.

    Returns:
      ``path``, as a ``Path``.

    Raises:
      TypeError: ``stats`` are not one ``BatchNormStats`` per block (a file :func:`load` would refuse).
      OSError: the file cannot be written.
    """
    path = Path(path)
    config, state, stats = checkpoint.model_config, checkpoint.state, checkpoint.stats
    if stats is not None and not (
        isinstance(stats, tuple) and len(stats) == config.depth and all(isinstance(s, BatchNormStats) for s in stats)
    ):  # a file load would refuse: a bug, found here rather than when the run is resumed
        raise TypeError(f"stats must be one BatchNormStats per block ({config.depth}), got {type(stats).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(state.step),
        "vocab": "".join(checkpoint.vocab.chars),
        "model_config": dataclasses.asdict(checkpoint.model_config),
        "train_config": dataclasses.asdict(checkpoint.train_config),
        "has_stats": stats is not None,
        "data": checkpoint.data._asdict() if checkpoint.data else None,
        "sweep": {k: list(v) for k, v in checkpoint.sweep._asdict().items()} if checkpoint.sweep else None,
        "loss_log_crc32": checkpoint.loss_log_crc32,
    }
    arrays = {f"params/{name}": np.asarray(state.params[name]) for name in param_names(config)}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state.opt_state)):
        arrays[f"opt/{i:03d}"] = np.asarray(leaf)
    for layer, block_stats in enumerate(stats or (), start=1):
        mean, var = stats_names(layer)
        arrays[mean], arrays[var] = np.asarray(block_stats.mean), np.asarray(block_stats.var)
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())
    return path


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save`; a :class:`CheckpointError` that says what is wrong otherwise.

    Every way a file can fail to be a checkpoint ends here, as that one error:
    missing, a directory, unreadable, empty, not a zip, truncated or damaged
    (each member is read whole, so the zip's CRC-32 of every byte of it is
    checked: a flipped bit is an error, never a different state), a header that
    is not the expected JSON object or comes from a newer format version,
    missing or unexpected members, and arrays of another shape or dtype than the
    configurations in the header imply. Parameters and batch-norm statistics
    must be finite: a run saves only states whose loss is finite, and sampling
    from NaN or infinite weights gives garbage names rather than an error.

    Args:
        path: the ``.npz`` file.

    Returns:
        The checkpoint, with its arrays on the default device.
    """
    path = Path(path)
    members = _read_members(path)
    try:
        return _decode(members)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _read_members(path: Path) -> dict[str, bytes]:
    """The members of the zip archive at ``path``, by name, each read whole (which checks its CRC-32)."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file, so not a checkpoint")  # a device or a pipe
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {err.strerror or err}") from None
    if not raw:
        raise CheckpointError(f"{path} is not a readable checkpoint: the file is empty (0 bytes)")
    if not raw.startswith(ZIP_SIGNATURE):
        raise CheckpointError(f"{path} is not a readable checkpoint: not an .npz (zip) file; it starts {raw[:16]!r}")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
            members = {info.filename: archive.read(info) for info in infos}
    # Damaged bytes make zipfile raise BadZipFile, EOFError, NotImplementedError (an unknown compression
    # method), RuntimeError (an "encrypted" flag), ValueError (a seek before the start), ...
    except Exception as err:  # whichever it is, these bytes are not a readable archive
        raise CheckpointError(
            f"{path} is not a readable checkpoint: it is truncated or damaged ({type(err).__name__}: {err})"
        ) from None
    if len(members) != len(infos):
        raise CheckpointError(f"{path} is not a readable checkpoint: a member name occurs twice")
    return members


def _decode(members: dict[str, bytes]) -> Checkpoint:
    """The checkpoint held by ``members`` (an ``.npz`` archive's ``name.npy`` members, read whole)."""
    if "header.npy" not in members:
        names = ", ".join(sorted(members)) or "nothing"
        raise CheckpointError(f"not a readable checkpoint: an .npz file without a jaxbirds header (it holds {names})")
    header = _header(_array(members, "header", None, np.dtype(np.uint8)).tobytes())
    numbered = header["version"] >= FIRST_NUMBERED
    model_fields = header["model_config"] if numbered else _one_block_model_config(header["model_config"])
    model_config = _config(ModelConfig, model_fields, "model_config", header["version"])
    train_config = _config(TrainConfig, header["train_config"], "train_config", header["version"])
    try:
        vocab = Vocabulary(tuple(header["vocab"]))
    except ValueError as err:
        raise CheckpointError(f"its vocabulary {header['vocab']!r} is not one: {err}") from None
    if vocab.size != model_config.vocab_size:
        raise CheckpointError(
            f"its vocabulary has {vocab.size} characters, its model_config.vocab_size is {model_config.vocab_size}"
        )
    sweep = _sweep_members(header["sweep"], train_config)
    if sweep is not None and header["has_stats"]:
        raise CheckpointError("a sweep's checkpoint holds no batch-norm statistics, but its header says it does")
    stack = () if sweep is None else (len(sweep.seeds),)
    shapes = {name: (*stack, *shape) for name, shape in param_shapes(model_config).items()}
    opt_leaves, opt_tree = jax.tree_util.tree_flatten(_optimizer_template(train_config, shapes, sweep))
    expected = {f"params/{name}": (shape, PARAM_DTYPE) for name, shape in shapes.items()}
    expected |= {f"opt/{i:03d}": (leaf.shape, leaf.dtype) for i, leaf in enumerate(opt_leaves)}
    layers = range(1, model_config.depth + 1)
    if header["has_stats"]:
        for layer, width in zip(layers, model_config.hidden, strict=True):
            expected |= {name: ((1, width), PARAM_DTYPE) for name in stats_names(layer)}
    stored = {name: name if numbered else ONE_BLOCK_NAMES.get(name, name) for name in expected}  # the file's names
    _check_names("members", set(members) - {"header.npy"}, {f"{stored[name]}.npy" for name in expected})
    arrays = {name: _array(members, stored[name], shape, dtype) for name, (shape, dtype) in expected.items()}
    training = slice(None) if sweep is None else [k for k, at in enumerate(sweep.diverged_at) if at is None]
    for name, array in arrays.items():  # a diverged model of a sweep is frozen as it was: it may hold anything
        if not name.startswith("opt/") and not np.isfinite(array[training] if stack else array).all():
            raise CheckpointError(f"{stored[name]} holds NaN or infinite values (a run saves only finite states)")
    arrays = jax.device_put(arrays)  # one transfer; jnp.asarray would compile a program per shape (~20 ms each)
    params = {name: arrays[f"params/{name}"] for name in shapes}
    opt_state = jax.tree_util.tree_unflatten(opt_tree, [arrays[f"opt/{i:03d}"] for i in range(len(opt_leaves))])
    stats = None
    if header["has_stats"]:
        stats = tuple(BatchNormStats(*(arrays[name] for name in stats_names(layer))) for layer in layers)
    data = DataSource(**header["data"]) if header["data"] is not None else None
    state = TrainState(params, opt_state, header["step"])
    return Checkpoint(state, stats, vocab, model_config, train_config, data, sweep, header["loss_log_crc32"])


def _optimizer_template(train_config: TrainConfig, shapes: dict, sweep: SweepMembers | None):
    """The optimiser state's leaves for parameters of ``shapes``, as shapes and dtypes (nothing computed): the
    solo optimiser's, or for a sweep the models' stacked learning-rate-injected ones (:mod:`jaxbirds.sweep`)."""
    params = {name: jax.ShapeDtypeStruct(shape, PARAM_DTYPE) for name, shape in shapes.items()}
    if sweep is None:
        return jax.eval_shape(train_config.make_optimizer().init, params)
    return jax.eval_shape(jax.vmap(injected_optimizer(train_config).init), params)


def _sweep_members(fields: object, train_config: TrainConfig) -> SweepMembers | None:
    """The header's ``sweep`` field, checked: null, or a learning rate, a seed and a divergence step per model."""
    if fields is None:
        return None
    if not (isinstance(fields, dict) and set(fields) == set(SweepMembers._fields)):
        raise CheckpointError(f"its header's sweep is not an object of {', '.join(SweepMembers._fields)}")
    rates, seeds, diverged = (fields[name] for name in SweepMembers._fields)
    if (
        not all(isinstance(v, list) for v in (rates, seeds, diverged))
        or not len(rates) == len(seeds) == len(diverged)
        or not rates
    ):
        raise CheckpointError("its header's sweep does not list a learning rate, a seed and a step for every model")
    for lr, seed, at in zip(rates, seeds, diverged, strict=True):
        try:
            dataclasses.replace(train_config, learning_rate=lr, seed=seed)
        except (JaxbirdsError, TypeError) as err:
            raise CheckpointError(f"its header's sweep holds a model that is not valid: {err}") from None
        if not (_is_int(seed) and (at is None or (_is_int(at) and at >= 0))):
            raise CheckpointError(f"its header's sweep holds seed {seed!r} and divergence step {at!r}")
    return SweepMembers(tuple(float(r) for r in rates), tuple(seeds), tuple(diverged))


def _header(raw: bytes) -> dict:
    """The header's JSON object, checked field by field: format, version, then the type of each field."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"its header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} file (its header's format is {header.get('format')!r})")
    version = header.get("version")
    if not _is_int(version):
        raise CheckpointError(f"its header's version {version!r} is not an integer")
    if version > VERSION:
        raise CheckpointError(
            f"written by a newer jaxbirds (checkpoint format version {version}); this one reads version {VERSION}"
        )
    if version < OLDEST_READ:
        raise CheckpointError(
            f"an old checkpoint format (version {version}); this jaxbirds reads versions {OLDEST_READ} to {VERSION}"
        )
    _check_names("header fields", set(header), HEADER_FIELDS[version])
    header = {"sweep": None, "loss_log_crc32": None, **header}  # version 2 had neither
    checks = {
        "loss_log_crc32": (lambda crc: crc is None or (_is_int(crc) and 0 <= crc < 2**32), "null or a CRC-32"),
        "step": (lambda step: _is_int(step) and step >= 0, "a count of steps"),
        "vocab": (lambda vocab: isinstance(vocab, str), "a string of characters"),
        "has_stats": (lambda has_stats: isinstance(has_stats, bool), "true or false"),
        "data": (_is_data_source, f"null or an object of strings {', '.join(DataSource._fields)}"),
    }
    for field, (fits, kind) in checks.items():
        if not fits(header[field]):
            raise CheckpointError(f"its header's {field} is {header[field]!r}, not {kind}")
    return header


def _one_block_model_config(fields: object) -> object:
    """A version 2 or 3 header's ``model_config`` (one block: ``hidden`` an integer) as since version 4."""
    if not (isinstance(fields, dict) and "hidden" in fields):
        return fields  # _config says what is wrong
    if not _is_int(fields["hidden"]):
        raise CheckpointError(
            f"its model_config.hidden is {fields['hidden']!r}; before version {FIRST_NUMBERED} it must be of type int"
        )
    return {**fields, "hidden": [fields["hidden"]]}


def _is_data_source(data: object) -> bool:
    return data is None or (
        isinstance(data, dict)
        and set(data) == set(DataSource._fields)
        and all(isinstance(v, str) for v in data.values())
    )


def _config(cls: type, fields: object, what: str, version: int):
    """``cls(**fields)`` for a config dataclass, given exactly its fields, each of the type of its default
    (a tuple's field, such as ``hidden``: a JSON list of integers); a field newer than the file's ``version``
    (:data:`FIELDS_SINCE`) may be missing, and is then its default."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"its header's {what} is not a JSON object")
    defaults = {field.name: field.default for field in dataclasses.fields(cls)}
    since = FIELDS_SINCE.get(what, {})
    newer = {name: default for name, default in defaults.items() if version < since.get(name, OLDEST_READ)}
    fields = {**newer, **fields}
    _check_names(f"{what} fields", set(fields), set(defaults))
    for name, value in fields.items():
        kind = type(defaults[name])
        if kind is tuple:
            if not (isinstance(value, list) and all(_is_int(v) for v in value)):
                raise CheckpointError(f"its {what}.{name} is {value!r}; it must be a list of integers")
        elif not (_is_int(value) if kind is int else isinstance(value, kind) or (kind is float and _is_int(value))):
            raise CheckpointError(f"its {what}.{name} is {value!r}; it must be of type {kind.__name__}")
    try:
        return cls(**fields)
    except (JaxbirdsError, TypeError) as err:  # TypeError: numpy's isfinite of an int too large for a float
        raise CheckpointError(f"its {what} is not valid: {err}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_names(what: str, found: set[str], expected: set[str]) -> None:
    """Raise unless ``found`` is exactly ``expected``, naming what is missing and what is unexpected."""
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        problems = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unexpected {', '.join(extra)}"] * bool(extra)
        raise CheckpointError(f"its {what} are not a checkpoint's: {'; '.join(problems)}")


def _array(members: dict[str, bytes], name: str, shape: tuple[int, ...] | None, dtype: np.dtype) -> np.ndarray:
    """The ``.npy`` member ``name``, refused unless it has ``dtype`` and ``shape`` (None: any 1-D shape)."""
    try:
        array = np.lib.format.read_array(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
    except Exception as err:  # a .npy header that is not one: ValueError, SyntaxError, MemoryError, ...
        raise CheckpointError(f"its member {name} is not a readable array ({type(err).__name__}: {err})") from None
    if array.dtype != dtype:
        raise CheckpointError(f"{name} is {array.dtype}, not {dtype}")
    if array.shape != shape and not (shape is None and array.ndim == 1):
        raise CheckpointError(
            f"{name} has shape {array.shape}, the configuration needs {'1-D' if shape is None else shape}"
        )
    return array


def check_compatible(checkpoint: Checkpoint, vocab: Vocabulary, context_size: int) -> None:
    """Refuse a checkpoint trained on another vocabulary or context size than the data's.

    Args:
      checkpoint: the loaded checkpoint.
      vocab: the data's vocabulary.
      context_size: the data's context size.

    Raises:
      CheckpointError: the vocabularies or the context sizes differ.
    """
    if checkpoint.vocab != vocab:
        raise CheckpointError(
            f"the checkpoint's vocabulary {''.join(checkpoint.vocab.chars)!r} differs from the data's "
            f"{''.join(vocab.chars)!r}"
        )
    if checkpoint.model_config.context_size != context_size:
        raise CheckpointError(
            f"the checkpoint uses context {checkpoint.model_config.context_size}, the data {context_size}"
        )
