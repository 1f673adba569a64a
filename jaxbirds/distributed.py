"""Many processes, one program: ``jax.distributed`` set up with checks and bounded waits, and the few
things the processes of a sweep must agree on.

After :func:`initialize`, every process runs the same Python program on its own devices, and
``jax.devices()`` lists the devices of every process. Each process must then call the same
collectives in the same order: one that waits for a call its peers never make waits until the
peers are declared dead. So every decision that could differ between processes is agreed on
through a collective before it is acted on:

* an error (:func:`agreed_errors`): a process that refuses its input (an ``--out`` it cannot write,
  a data file it cannot read) tells the others, and every process ends with the same ``error:`` line;
* a stop (:func:`any_process`): Ctrl-C or SIGTERM reaching any one process stops them all after the
  same chunk;
* the sweep itself (:func:`require_same`): processes started with different flags are refused.

A peer that dies is noticed in the next collective (its socket closes: :class:`PeerLostError`, one
``error:`` line, exit code :data:`PEER_LOST`; a sweep has one after every chunk). Two cases are
JAX's own: if process 0 dies (it hosts the coordinator), or a process stops sending heartbeats for
:data:`HEARTBEAT_TIMEOUT` seconds while the others are outside a collective, JAX ends the others
itself, at once or after that time, with a fatal log line (``Terminating process because the JAX
distributed service detected fatal errors``) and exit code 134. (jaxlib 0.10.2 has no working hook
to replace it: a ``missed_heartbeat_callback`` given to its client aborts with ``std::bad_cast``.)
On a CPU the collectives go over TCP (gloo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

import jax
import numpy as np

from jaxbirds.errors import ConfigError, JaxbirdsError

#: Seconds a process waits at start-up for every other process to connect (``--connect-timeout``).
CONNECT_TIMEOUT = 120
#: Seconds without a heartbeat after which the coordinator takes a process for dead (and ends the others).
HEARTBEAT_TIMEOUT = 30
#: Seconds a finishing process waits at exit for the others to finish too.
SHUTDOWN_TIMEOUT = 60
#: The exit code of a process whose peers are gone.
PEER_LOST = 1


class DistributedError(JaxbirdsError):
    """The processes could not connect to one another."""


class PeerLostError(JaxbirdsError):
    """Another process stopped answering in the middle of a collective: it died or was killed."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where a process stands among the processes of one program; None: found by
    ``jax.distributed`` in the cluster's environment (SLURM, Open MPI, ...)."""

    coordinator: str | None = None  # HOST:PORT where process 0 serves the coordinator and the others reach it
    num_processes: int | None = None
    process_id: int | None = None  # 0, 1, ..., num_processes - 1; process 0 hosts the coordinator


def check_address(text: str) -> str:
    """``HOST:PORT`` with a port from 1 to 65535 (an IPv6 host in brackets: ``[::1]:1234``)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator takes HOST:PORT (e.g. 127.0.0.1:12345), got {text!r}")
    return text


def check(cluster: Cluster) -> Cluster:
    """Refuse values that cannot describe a process of a cluster."""
    if cluster.coordinator is not None:
        check_address(cluster.coordinator)
    if cluster.num_processes is not None and cluster.num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {cluster.num_processes}")
    if cluster.process_id is not None and cluster.process_id < 0:
        raise ConfigError(f"--process-id must be 0 or more, got {cluster.process_id}")
    if None not in (cluster.num_processes, cluster.process_id) and cluster.process_id >= cluster.num_processes:
        raise ConfigError(
            f"--process-id {cluster.process_id} with --num-processes {cluster.num_processes}: "
            f"the process ids are 0 to {cluster.num_processes - 1}"
        )
    return cluster


#: What a missing setting is called on the command line, after ``jax.distributed``'s own message.
_MISSING = {
    "coordinator_address": "--coordinator HOST:PORT",
    "Number of processes": "--num-processes N",
    "process id": "--process-id I",
}


def initialize(
    cluster: Cluster,
    connect_timeout: int = CONNECT_TIMEOUT,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
    shutdown_timeout: int = SHUTDOWN_TIMEOUT,
) -> None:
    """Join the processes of ``cluster`` (``jax.distributed.initialize``), with CPU collectives over
    TCP (gloo), and every wait bounded. Call before anything uses a device.

    Args:
        cluster: this process's place; what it leaves None, ``jax.distributed`` looks for in the
            cluster's environment (SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``).
        connect_timeout: if the processes are not all connected after this many seconds, this one
            ends (one ``error:`` line, exit code :data:`PEER_LOST`): JAX's own time-out would end it
            with a fatal log and a C++ stack trace.
        heartbeat_timeout: seconds of silence after which a process is taken for dead.
        shutdown_timeout: seconds a process waits at exit for the others.

    Raises:
        ConfigError: ``cluster`` holds values no process can have.
        DistributedError: a setting is neither given nor found in the environment, or the
            coordinator cannot be started (e.g. its port is taken).
    """
    check(cluster)
    # Without it, a computation over the devices of several processes on a CPU has no way to communicate.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Set to go off before JAX's own time-out (connect_timeout + _CONNECT_GRACE).
    where = cluster.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the coordinator"
    process = "this process" if cluster.process_id is None else f"process {cluster.process_id}"
    too_late = threading.Timer(connect_timeout, _exit_with, [
        f"{process} could not join the other processes at {where} within {connect_timeout} s: start every "
        "process with the same --coordinator and --num-processes and its own --process-id (0 hosts the coordinator)"
    ])  # fmt: skip
    too_late.daemon = True
    too_late.start()
    try:
        jax.distributed.initialize(
            cluster.coordinator, cluster.num_processes, cluster.process_id,
            initialization_timeout=connect_timeout + _CONNECT_GRACE, heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=shutdown_timeout,
        )  # fmt: skip
    except ValueError as err:  # a setting neither given nor found in the environment
        missing = next((flag for text, flag in _MISSING.items() if text in str(err)), None)
        if missing is None:
            raise
        raise DistributedError(f"{missing} is needed: no cluster environment (SLURM, Open MPI, ...) gives it") from None
    except jax.errors.JaxRuntimeError as err:  # e.g. the coordinator's port is taken
        raise DistributedError(f"{process} could not join the other processes at {where}: {_first_line(err)}") from None
    finally:
        too_late.cancel()


#: Seconds JAX's own connection time-out is given beyond ours, so that ours ends the process first.
_CONNECT_GRACE = 30


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def allgather(x, tiled: bool = False) -> np.ndarray:
    """Every process's ``x``, on every process: stacked on a new leading axis (``tiled=False``; ``x``
    must have the same shape on every process), or, for an array over the devices of every process,
    its whole value (``tiled=True``). Every process must call it at the same point.

    Raises:
        PeerLostError: another process died or was killed before it sent its part.
    """
    from jax.experimental import multihost_utils

    try:
        return np.asarray(multihost_utils.process_allgather(x, tiled=tiled))
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if jax.process_count() == 1 or not _is_lost_peer(err):
            raise
        raise PeerLostError(f"{_LOST}: {_first_line(err)}") from None


_LOST = "lost contact with another process (it died or was killed)"


def _is_lost_peer(err: BaseException) -> bool:
    """Whether a failed collective failed because a peer went away (its connection closed or reset),
    rather than because of how it was called."""
    text = str(err)
    return any(sign in text for sign in ("Gloo", "Connection reset", "Connection closed", "UNAVAILABLE"))


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any: one flag per process, gathered. With one
    process, ``flag``. Every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(allgather(np.int32(bool(flag))).any())


def _gather_texts(text: str) -> list[str]:
    """Every process's ``text`` (UTF-8, any length), in process order."""
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = allgather(np.int32(len(data))).reshape(-1)
    if not lengths.any():
        return [""] * len(lengths)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = allgather(padded)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


@contextlib.contextmanager
def agreed_errors() -> Iterator[None]:
    """Run a block of checks on every process, then agree on its outcome: if the block raised a
    :class:`~jaxbirds.errors.JaxbirdsError` on any process, every process raises a
    :class:`~jaxbirds.errors.ConfigError` with the message of the first such process (by process id)
    and its id: one ``error:`` line, the same on every process. With one process, it changes nothing.

    The block must not use a collective itself: a process that raises skips what follows.
    """
    if jax.process_count() == 1:
        yield
        return
    error: JaxbirdsError | None = None
    try:
        yield
    except JaxbirdsError as err:
        error = err
    messages = _gather_texts("" if error is None else str(error) or type(error).__name__)
    first = next((i for i, message in enumerate(messages) if message), None)
    if first is not None:
        raise ConfigError(f"{messages[first]} (process {first} of {len(messages)})") from error


def require_same(description: str, what: str = "configuration") -> None:
    """Refuse to go on unless every process has the same ``description`` (e.g. of its flags and data):
    processes that disagree would train different programs and wait for each other for ever."""
    if jax.process_count() == 1:
        return
    descriptions = _gather_texts(description)
    differ = [i for i, d in enumerate(descriptions) if d != descriptions[0]]
    if differ:
        raise ConfigError(
            f"the processes were not given the same {what}: process {differ[0]}'s differs from process 0's "
            "(run the same command on every process, with only --process-id changed)"
        )


def barrier() -> None:
    """Wait until every process gets here (so that none waits at exit for one still writing)."""
    any_process(False)


@contextlib.contextmanager
def exit_if_peers_are_lost() -> Iterator[None]:
    """End this process if, within the block, a collective fails because another process is gone:
    one ``error:`` line, exit code :data:`PEER_LOST`. (JAX's own collectives, as the equality check of
    ``jax.device_put`` onto the devices of several processes, raise its runtime error instead of
    :class:`PeerLostError`: both end here.)"""
    try:
        yield
    except PeerLostError as err:
        _exit_with(str(err))
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if jax.process_count() == 1 or not _is_lost_peer(err):
            raise
        _exit_with(f"{_LOST}: {_first_line(err)}")


def _exit_with(message: str) -> NoReturn:
    """Print ``message`` as the ``error:`` line and end the process at once, exit code :data:`PEER_LOST`.

    Skips Python's exit handlers on purpose: among them is ``jax.distributed.shutdown()``, which
    would wait at a barrier for the missing peers until the coordinator gives up and aborts the process.
    """
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(PEER_LOST)


def local_device_counts() -> list[int]:
    """How many devices each process has, in process order (one entry without ``jax.distributed``)."""
    counts = [0] * jax.process_count()
    for device in jax.devices():
        counts[device.process_index] += 1
    return counts
