"""A memory budget: sizes that cannot fit are refused with a clear error, before any work starts.

The budget is a share of the memory available *now* where the programs run:
the accelerator's own memory on a GPU, the host's (``MemAvailable`` in
``/proc/meminfo``, or the physical memory elsewhere) on the CPU.
Two kinds of check use it:

* :func:`require` - an estimate made before anything is allocated (the
  parameters of a model, the names to sample);
* :func:`require_compiled` - XLA's own memory analysis of a compiled program
  (arguments, outputs and temporaries), before the program first runs.

Large buffers are sized from the budget (see :func:`rows_within`), so a wide
model gets smaller evaluation batches instead of an out-of-memory kill.
"""

from __future__ import annotations

import os

import jax

from jaxbirds.errors import MemoryBudgetError

#: Share of the available memory one program may plan to use.
BUDGET_SHARE = 0.5


def available_bytes() -> int:
    """Memory available to a new allocation now, on the device programs run on.

    An accelerator reports its own (``bytes_limit - bytes_in_use``); on the CPU
    it is the host's ``MemAvailable`` (Linux), else its physical memory.
    """
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes() -> int:
    """The default budget: :data:`BUDGET_SHARE` of :func:`available_bytes`."""
    return int(BUDGET_SHARE * available_bytes())


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require(nbytes: float, what: str, hint: str, budget: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` if ``what`` needs more than the budget."""
    budget = budget_bytes() if budget is None else budget
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs about {format_bytes(nbytes)}, more than the memory budget of {format_bytes(budget)} "
            f"({BUDGET_SHARE:.0%} of what this machine has available); {hint}"
        )


def compiled_bytes(compiled) -> int | None:
    """Bytes a compiled program needs while it runs, by XLA's memory analysis: arguments,
    outputs and temporaries, less the outputs that reuse donated arguments. None if the
    backend gives no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def require_compiled(compiled, what: str, hint: str, budget: int | None = None, copies: int = 1) -> None:
    """:func:`require` with the program's own figure from :func:`compiled_bytes`, times ``copies``: the
    devices that run it in one memory (:func:`devices_sharing_memory`; XLA's analysis of a sharded program
    is the need of one device)."""
    needed = compiled_bytes(compiled)
    if needed is not None:
        where = f" on each of {copies} devices that share this machine's memory" if copies > 1 else ""
        require(needed * copies, what + where, hint, budget)


def devices_sharing_memory(devices) -> int:
    """How many of ``devices`` draw on the memory the budget is taken from: on a CPU, every host device of
    this process (``--xla_force_host_platform_device_count`` splits one memory into several devices); on an
    accelerator, one (each has its own memory, and the budget is the first device's)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    return max(1, len(local)) if local and local[0].platform == "cpu" else 1


def more_devices_help(devices) -> bool:
    """Whether more devices would give a program more memory: not on a CPU, whose devices share one."""
    return devices_sharing_memory(devices) == 1 and next(iter(devices)).platform != "cpu"


def rows_within(bytes_per_row: float, fixed_bytes: float, most: int, budget: int | None = None) -> int:
    """How many rows of ``bytes_per_row`` fit beside ``fixed_bytes`` in the budget, at most ``most``.

    Raises :class:`MemoryBudgetError` if not even one row fits.
    """
    budget = budget_bytes() if budget is None else budget
    rows = int((budget - fixed_bytes) // max(bytes_per_row, 1))
    if rows < 1:
        require(fixed_bytes + bytes_per_row, "one row of this computation", "use a smaller model", budget)
    return max(1, min(most, rows))
