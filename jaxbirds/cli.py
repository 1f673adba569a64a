"""Helpers shared by the command-line scripts: clear one-line errors, argument checks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import filelock
import jax

from jaxbirds import model, train
from jaxbirds.errors import ConfigError, JaxbirdsError
from jaxbirds.train import SEED_LIMIT


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; the project's own errors (:class:`~jaxbirds.errors.JaxbirdsError`: bad
    input) become ``error: <message>`` on stderr and exit code 2. Anything else is a bug
    and keeps its traceback."""
    try:
        return main(argv)
    except JaxbirdsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def exit_process(code: int) -> NoReturn:
    """End a script's process with ``code``, skipping Python's last garbage collection.

    At exit, Python collects every object JAX, optax and matplotlib created:
    about 0.2 s of a run's start-up budget, spent on memory the operating system
    takes back anyway. Freezing them first leaves the collector nothing to do.
    Files are unaffected: every file a script writes is closed before this.
    For scripts only (after :func:`run`), never a process that goes on.
    """
    gc.freeze()
    sys.exit(code)


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def split_host_into_devices() -> None:
    """Give XLA's CPU platform one device per core, unless ``XLA_FLAGS`` already says how many.

    JAX reads the flag when it first uses a device, so a script calls this
    before anything touches one; on a machine with GPUs it changes nothing
    they do. Scripts that split work over devices (``sweep.py``, ``bench.py``)
    then have a device per core to split it over.
    """
    if HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}={cores}".strip()


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``<prog>: error: <message> (see --help)``, exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


#: The persistent compilation cache's size limit.
CACHE_MAX_BYTES = 2 * 2**30


def compile_cache_dir() -> Path:
    """Where compiled programs are kept between runs: ``$JAXBIRDS_CACHE_DIR``, else the user's cache
    directory (``$XDG_CACHE_HOME/jaxbirds/xla``, by default ``~/.cache/jaxbirds/xla``)."""
    if os.environ.get("JAXBIRDS_CACHE_DIR"):
        return Path(os.environ["JAXBIRDS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxbirds" / "xla"


def add_compile_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compile-cache", action="store_true",
        help=f"do not keep compiled programs between runs (default: kept in {compile_cache_dir()}, at most "
        "2 GiB, so a second run loads them instead of compiling; set JAXBIRDS_CACHE_DIR to move it)",
    )  # fmt: skip


def use_compile_cache(args: argparse.Namespace) -> Path | None:
    """Turn on JAX's persistent compilation cache unless ``--no-compile-cache``; returns its directory."""
    return None if args.no_compile_cache else enable_compile_cache(compile_cache_dir())


def enable_compile_cache(directory: Path) -> Path | None:
    """Keep every compiled program in ``directory``, at most :data:`CACHE_MAX_BYTES`; returns it.

    Every program is cached, however fast it compiled (JAX's default skips those
    under a second, which here is nearly all of them). Entries without a last-use
    time are given one first (:func:`repair_compile_cache`). A cache
    that cannot be created is a warning, not an error: it only saves time.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"warning: no compilation cache ({directory}: {err.strerror or err})", file=sys.stderr)
        return None
    timed, removed = repair_compile_cache(directory)
    if timed or removed:
        print(f"note: of the programs in the cache {directory} without a last-use time, {timed} now have the "
              f"oldest and {removed} that could not be read were removed", file=sys.stderr)  # fmt: skip
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # least recently used go first
    return directory


def repair_compile_cache(directory: Path) -> tuple[int, int]:
    """Repair the programs in the cache that have no last-use time; returns ``(timed, removed)``.

    JAX keeps a compiled program as two files, ``KEY-cache`` (the program,
    compressed) and ``KEY-atime`` (its last use, for evicting the least
    recently used), written one after the other under the cache's lock file.
    A ``KEY-cache`` alone is left by a process killed between the two writes,
    or during the first (then it is truncated), and by JAX with no size limit,
    which writes no times at all. JAX 0.10's eviction fails on such an entry
    before every later write, with a warning, so no new program is ever cached
    again and every run compiles from scratch (jax-ml/jax#39880, fixed upstream
    after 0.10.2). A complete entry is given the oldest time, as upstream does:
    it is the first to go when the cache is full. One that cannot be
    decompressed is deleted: kept, JAX would fail to read it, recompile, and
    never write it again, on every run.
    """
    timed = removed = 0
    try:
        with filelock.FileLock(directory / ".lockfile", timeout=10):
            for entry in directory.glob("*-cache"):
                atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
                if atime.exists():
                    continue
                if _decompresses(entry):
                    atime.write_bytes((0).to_bytes(8, "little"))
                    timed += 1
                else:
                    entry.unlink(missing_ok=True)
                    removed += 1
    except (OSError, filelock.Timeout) as err:
        print(f"warning: could not check the compilation cache {directory}: {err}", file=sys.stderr)
    return timed, removed


def _decompresses(entry: Path) -> bool:
    """Whether JAX can decompress a cache entry (with JAX's own function: a private one, so a JAX
    without it means the entry is kept)."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return True
    try:
        decompress_executable(entry.read_bytes())
    except Exception:  # zlib.error, zstandard.ZstdError, ...: whatever a truncated stream raises
        return False
    return True


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def batch_size(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least 2, got {value} (batch norm's unbiased variance divides by n - 1)"
        )
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_LIMIT - 1:,}, got {value}")
    return value


@contextlib.contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """While active, the first Ctrl-C (or SIGTERM) sets the yielded event instead of raising.

    The training loop polls the event between compiled chunks, so it can save
    the last completed state and stop cleanly. A second Ctrl-C aborts at once.
    """
    event = threading.Event()

    def request_stop(signum, frame):
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.set()
        print("\nstopping after the current chunk, then saving (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: The flag of each TrainConfig field, and of each ModelConfig field a flag sets.
TRAIN_FLAGS = {
    "steps": "--steps", "learning_rate": "--lr", "decay_step": "--decay-step", "chunk_size": "--chunk",
    "batch_size": "--batch-size", "optimizer": "--optimizer", "grad_mode": "--grad", "seed": "--seed",
    "diagnostics_every": "--diagnostics-every",  # scripts/train.py's own flag (with --diagnostics)
}  # fmt: skip
MODEL_FLAGS = {"hidden": "--hidden", "embedding_dim": "--embedding"}


def add_training_flags(
    parser: argparse.ArgumentParser,
    defaults: train.TrainConfig | None = None,
    skip: Sequence[str] = (),
    resumable: bool = True,
) -> None:
    """The flags of :data:`TRAIN_FLAGS` and :data:`MODEL_FLAGS`, shared by ``scripts/train.py`` and
    ``scripts/sweep.py`` (which skips ``--lr`` and ``--seed``: it takes lists). Each defaults to
    None, so a caller can tell a flag given from one left out (:func:`given`); ``defaults`` are the
    values the help names; ``resumable`` runs save checkpoints and can be resumed."""
    defaults, shapes = defaults or train.TrainConfig(), model.ModelConfig()
    flags = {
        "--steps": dict(type=positive_int, help=f"total SGD steps (default {defaults.steps:,})"
                        + ("; with --resume, a new total to train up to" if resumable else "")),
        "--batch-size": dict(type=batch_size, help=f"examples per step, at least 2 for batch norm (default "
                             f"{defaults.batch_size})"),
        "--hidden": dict(type=positive_int, nargs="+", metavar="H", help="the width of each Linear -> BatchNorm -> "
                         "tanh block, first to last: 200 is the tutorial's model, 100 100 100 100 four blocks "
                         f"(default {widths(shapes.hidden)})"),
        "--embedding": dict(type=positive_int, help=f"embedding size per character (default {shapes.embedding_dim})"),
        "--lr": dict(type=positive_float, help=f"learning rate; it drops 10x at --decay-step (default "
                     f"{defaults.learning_rate})"),
        "--decay-step": dict(type=non_negative_int, help=f"step at which the learning rate drops 10x (default "
                             f"{defaults.decay_step:,})"),
        "--optimizer": dict(choices=train.OPTIMIZERS, help=f"optax optimiser (default {defaults.optimizer})"),
        "--grad": dict(choices=train.GRAD_MODES, help="how gradients are computed: jax.grad of the plain model "
                       "(autodiff), jax.grad through the hand-written custom_vjp rules, jax.grad through the "
                       "hand-written custom_jvp rules (transposed by JAX), or the fused manual backward pass "
                       f"(default {defaults.grad_mode})"),
        "--seed": dict(type=seed, help=f"fixes initialisation, batches and samples (default {defaults.seed})"),
        "--chunk": dict(type=positive_int, help=f"steps per compiled call (default {defaults.chunk_size:,}); "
                        + ("progress and checkpoints happen" if resumable else "progress and Ctrl-C happen")
                        + " between chunks"),
    }  # fmt: skip
    for flag, options in flags.items():
        if flag not in skip:
            parser.add_argument(flag, **options)


def given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The fields whose flags were given on the command line (the training flags default to None); a flag of
    many values (``--hidden 100 100``) as a tuple, as its config field holds it."""
    values = {field: getattr(args, flag.lstrip("-").replace("-", "_"), None) for field, flag in flags.items()}
    return {field: tuple(v) if isinstance(v, list) else v for field, v in values.items() if v is not None}


def widths(hidden: Sequence[int]) -> str:
    """Block widths as ``--hidden`` takes them: ``"200"``, ``"100 100 100 100"``."""
    return " ".join(str(width) for width in hidden)


def describe_hidden(hidden: Sequence[int]) -> str:
    """The hidden layers for a summary line: ``"hidden 200"``; ``"hidden 100 100 100 100 (4 blocks)"``."""
    return f"hidden {widths(hidden)}" + (f" ({len(hidden)} blocks)" if len(hidden) > 1 else "")


def resumed_config(asked: dict, saved, changeable: Sequence[str]) -> tuple[train.TrainConfig, list[str]]:
    """The saved run's (or sweep's) training config with the changes ``asked`` for, and a line per change.

    Args:
      asked: the fields whose flags were given (:func:`given` of :data:`TRAIN_FLAGS` and :data:`MODEL_FLAGS`).
      saved: the :class:`~jaxbirds.checkpoint.Checkpoint` being resumed.
      changeable: the fields that may change on ``--resume`` (a flag for any other field must repeat the saved
        value, or be left out).

    Raises:
      ConfigError: a flag asks to change a field that belongs to the saved run, or ``--steps`` is below the
        saved step.
    """
    tc, mc = saved.train_config, saved.model_config
    saved_values = {**dataclasses.asdict(tc), **dataclasses.asdict(mc)}
    flags = {**TRAIN_FLAGS, **MODEL_FLAGS}
    refused = [
        f"{flags[field]} {_flag_value(value)} (the run's is {_flag_value(saved_values[field])})"
        for field, value in asked.items()
        if field not in changeable and value != saved_values[field]
    ]
    if refused:
        raise ConfigError(
            "these settings are fixed for a saved run and cannot change on --resume: "
            + "; ".join(refused)
            + ". Start a new run with another --out (or --overwrite) instead"
        )
    changes = {field: value for field, value in asked.items() if field in changeable}
    if changes.get("steps", tc.steps) < saved.state.step:
        raise ConfigError(f"--steps {changes['steps']:,} is below the saved run's step {saved.state.step:,}")
    new_tc = dataclasses.replace(tc, **changes)
    described = [
        f"{TRAIN_FLAGS[field]} {_number(getattr(tc, field))} -> {_number(getattr(new_tc, field))}"
        for field in changeable
        if getattr(tc, field) != getattr(new_tc, field)
    ]
    return new_tc, described


def _flag_value(value) -> str:
    """A value as its flag takes it: ``--hidden 32 32``, not ``--hidden (32, 32)``."""
    return widths(value) if isinstance(value, tuple) else str(value)


def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
