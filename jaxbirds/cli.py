"""Helpers shared by the command-line scripts: clear one-line errors, argument checks."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax

from jaxbirds.errors import JaxbirdsError
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
    """Turn on JAX's persistent compilation cache unless ``--no-compile-cache``; returns its directory.

    Every program is cached, however fast it compiled (JAX's default skips those
    under a second, which here is nearly all of them). A cache that cannot be
    created is a warning, not an error: it only saves time.
    """
    if args.no_compile_cache:
        return None
    directory = compile_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"warning: no compilation cache ({directory}: {err.strerror or err})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # least recently used go first
    return directory


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
