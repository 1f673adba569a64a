"""Helpers shared by the command-line scripts: clear one-line errors, argument checks."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from jaxbirds.data import DataError

#: Errors that mean "the input was wrong": reported as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, ValueError, FileNotFoundError)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a user error becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
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
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value
