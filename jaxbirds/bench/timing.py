"""What every study shares: how hard to measure (:class:`BenchConfig`), how a time is taken
(:func:`measure`, :class:`Timing`), what it was measured on (:func:`environment`), and the
dataset and default recipe the studies time training chunks of (:class:`Bench`)."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxbirds import train
from jaxbirds.bench.tables import Row
from jaxbirds.data import Dataset
from jaxbirds.model import ModelConfig
from jaxbirds.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How hard to measure. ``quick`` settings keep the whole suite under a minute."""

    repeats: int = 5
    steps: int = 10_000  # steps per timed scan call
    chunks: tuple[int, ...] = (10, 100, 1_000, 10_000)
    unrolls: tuple[int, ...] = (1, 4)
    batches: tuple[int, ...] = (32, 128, 512, 2_048, 4_096)
    hiddens: tuple[int, ...] = (64, 200, 512, 1_024)
    models: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256)
    ungrouped: tuple[int, ...] = (8, 16, 64)  # K also timed as one vmap per device, for comparison
    eager_steps: int = 5  # 0 skips the eager variant
    torch_steps: int = 300
    compile_chunks: tuple[int, ...] = (100, 1_000, 10_000)
    startup_steps: int = 200_000  # the training script's default run, twice
    accuracy_batches: tuple[int, ...] = (2, 32, 512, 4_096)
    accuracy_repeats: int = 20  # batches per point; the error is summarised by median and max
    accuracy_checkpoints: tuple[int, ...] = (0, 10_000, 200_000)  # training steps before measuring
    drift_steps: int = 200_000  # whole runs, one per gradient mode
    memory_batches: tuple[int, ...] = (32, 1_024, 65_536)
    memory_hiddens: tuple[int, ...] = (200, 4_096)
    diagnostics_every: tuple[int, ...] = (0, 1_000, 100, 10, 1)  # steps between records; 0: off
    diagnostics_models: tuple[tuple[int, ...], ...] = ((100, 100, 100, 100),)  # timed after the bench's model

    @classmethod
    def quick(cls) -> BenchConfig:
        """Every study, fewer points, under a minute on 2 cores (most of it compiling). The eager
        variant is left out: its warm-up alone compiles ~200 single-operation programs."""
        return cls(
            repeats=2,
            steps=2_000,
            chunks=(1_000,),
            unrolls=(1,),
            batches=(32, 2_048),
            hiddens=(1_024,),
            models=(8,),
            ungrouped=(),
            eager_steps=0,
            torch_steps=50,
            compile_chunks=(1_000,),
            startup_steps=20_000,
            accuracy_batches=(2, 512),
            accuracy_repeats=3,
            accuracy_checkpoints=(0, 2_000),
            drift_steps=4_000,
            memory_batches=(32, 4_096),
            memory_hiddens=(200,),
            diagnostics_every=(0, 10),
        )


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of several timed runs of one thing: their median and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        """The median, minimum and maximum of ``seconds`` (at least one run)."""
        return cls(statistics.median(seconds), min(seconds), max(seconds))


def measure(run: Callable[[], object], repeats: int) -> Timing:
    """Seconds per call of ``run``: one warm-up call (compiles, fills caches), then ``repeats`` timed calls.

    Args:
        run: a call that blocks until its work is done (``block_until_ready`` inside).
        repeats: timed calls, at least one.

    Returns:
        The :class:`Timing` of the timed calls.
    """
    run()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return Timing.of(seconds)


def model_label(hidden: Sequence[int]) -> str:
    """A model's hidden blocks in a table cell: ``"200"`` (one block), ``"4×100"`` (four of 100), ``"64-32"``."""
    if len(hidden) == 1:
        return f"{hidden[0]:,}"
    if len(set(hidden)) == 1:
        return f"{len(hidden)}×{hidden[0]:,}"
    return "-".join(f"{width:,}" for width in hidden)


def environment() -> dict:
    """What the numbers were measured on: the device, the CPU's model name, cores, JAX's version and the
    flags and thread settings that change its speed (printed above the tables, saved with the rows)."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "threads": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }


class Bench:
    """A dataset, the model and training recipe the studies measure, and helpers to time training chunks.

    Attributes:
        dataset, config: as given.
        X, Y: the training split on the device, ``(N, context_size)`` int ids and ``(N,)`` next characters.
        model_config: the model for the dataset's vocabulary, with ``hidden``'s blocks (by default the
            tutorial's one block of 200); every study measures at its depth.
        train_config: the tutorial's recipe.
    """

    def __init__(self, dataset: Dataset, config: BenchConfig, hidden: Sequence[int] | None = None):
        self.dataset, self.config = dataset, config
        self.X, self.Y = jnp.asarray(dataset.train.X), jnp.asarray(dataset.train.Y)
        widths = {} if hidden is None else {"hidden": tuple(hidden)}
        self.model_config = ModelConfig(vocab_size=dataset.vocab.size, context_size=dataset.context_size, **widths)
        self.train_config = TrainConfig()

    def time_chunks(
        self, mc: ModelConfig, tc: TrainConfig, length: int, calls: int, dtype=jnp.float32, loss_and_grads=None
    ) -> Row:
        """Compile a ``length``-step chunk, then time ``calls`` consecutive calls of it, ``repeats`` times.

        Args:
            mc, tc: the model and training recipe (``tc.grad_mode`` picks the gradient).
            length: steps per call of the compiled chunk.
            calls: consecutive calls per timed run.
            dtype: of the parameters.
            loss_and_grads: ``(params, X, Y) -> (loss, grads)`` in place of ``tc.grad_mode``'s, or ``None``.

        Returns:
            A row with ``compile_s``, ``us_per_step``, ``steps_per_s`` (from the median run) and
            ``spread_steps_per_s``, the ``(slowest, fastest)`` runs' steps per second.
        """
        params, opt_state, _ = train.init_state(mc, tc, dtype)
        key = train.keys_for(tc.seed).data
        t0 = time.perf_counter()
        chunk = train.make_chunk_fn(tc, length, loss_and_grads)
        chunk = chunk.lower(params, opt_state, jnp.int32(0), jnp.int32(0), self.X, self.Y, key).compile()
        compile_s = time.perf_counter() - t0
        timing = time_calls(chunk, params, opt_state, length, calls, (self.X, self.Y, key), self.config.repeats)
        steps = length * calls
        return {
            "compile_s": compile_s,
            "us_per_step": 1e6 * timing.median / steps,
            "steps_per_s": steps / timing.median,
            "spread_steps_per_s": (steps / timing.high, steps / timing.low),
        }


def time_calls(chunk, params, opt_state, length: int, calls: int, data: tuple, repeats: int) -> Timing:
    """Time ``calls`` consecutive calls of a compiled training chunk, threading the donated
    parameter and optimiser buffers from one call to the next.

    Args:
        chunk: compiled ``(params, opt_state, start, stop, X, Y, key) -> (params, opt_state, losses)``, or
            with a fourth output (the diagnostics a chunk with ``diagnostics_every`` records), waited for too.
        params, opt_state: the first call's; donated, so never used again by the caller.
        length: steps per call (call ``i`` runs steps ``i * length`` to ``(i + 1) * length``).
        calls: calls per timed run.
        data: ``(X, Y, key)``, the same for every call.
        repeats: timed runs, after one warm-up run.

    Returns:
        The :class:`Timing` of one run of ``calls`` calls.
    """
    carry = [params, opt_state]

    def run():
        for i in range(calls):
            start = jnp.int32(i * length)
            carry[0], carry[1], losses, *diagnosed = chunk(carry[0], carry[1], start, start + length, *data)
        jax.block_until_ready((losses, diagnosed))

    return measure(run, repeats)
