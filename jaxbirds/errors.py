"""The project's own error types: what a command-line script reports as bad input.

``scripts/*`` turn a :class:`JaxbirdsError` into one ``error: <message>`` line
and exit code 2 (see :func:`jaxbirds.cli.run`). Any other exception is a bug
and keeps its traceback. The subclasses also derive from ``ValueError`` where
that is what a library caller would expect to catch.
"""

from __future__ import annotations


class JaxbirdsError(Exception):
    """The input was wrong: a message for the user, not a bug."""


class ConfigError(JaxbirdsError, ValueError):
    """A setting is out of range or two settings contradict each other."""


class OutputError(JaxbirdsError):
    """An output path cannot be written, or writing it would destroy saved work."""


class MemoryBudgetError(JaxbirdsError):
    """A configuration needs more memory than this machine can give it."""
