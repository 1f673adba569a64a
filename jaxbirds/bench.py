"""JIT performance studies: the same training step computed and compiled in different ways.

Every study returns a list of rows (plain dicts) measured in this process, side
by side, so that ratios compare like with like on a noisy machine. Times are
medians of ``repeats`` runs after a warm-up run; the min-max spread is kept.

Studies:

* :func:`dispatch_study`  - eager vs jit-per-step vs scan-fused chunks (and unrolling);
* :func:`modes_study`     - autodiff vs custom_vjp vs custom_jvp vs fused manual vs atomic manual;
* :func:`xla_study`       - what XLA compiled: FLOPs, bytes, kernels (thunks) per step;
* :func:`scaling_study`   - batch and hidden sweeps, float32 vs float64;
* :func:`vmap_study`      - K independent models trained in one compiled step;
* :func:`torch_study`     - the tutorial's PyTorch loop, when ``torch`` is installed;
* :func:`accuracy_study`  - float32 gradients of every mode against a float64 reference; loss drift;
* :func:`memory_study`    - what each mode's compiled step needs, and what it keeps for the backward pass;
* :func:`compile_study`   - seconds to compile the training chunk, per gradient mode and chunk length;
* :func:`startup_study`   - ``scripts/train.py`` run twice in fresh processes sharing one new
  compilation cache: where the time outside training goes, cold and warm.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbirds import cli, manual, model, sweep, train
from jaxbirds.data import Dataset
from jaxbirds.model import ModelConfig
from jaxbirds.train import TrainConfig

Row = dict


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
        )


# --------------------------------------------------------------------------- #
# Measuring                                                                   #
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Timing:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        return cls(statistics.median(seconds), min(seconds), max(seconds))


def measure(run: Callable[[], object], repeats: int) -> Timing:
    """Seconds per call of ``run`` (which must block until done): one warm-up, then ``repeats`` timed."""
    run()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return Timing.of(seconds)


def environment() -> dict:
    """What the numbers were measured on."""
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
    """A dataset, a default model and training recipe, and helpers to time training chunks."""

    def __init__(self, dataset: Dataset, config: BenchConfig):
        self.dataset, self.config = dataset, config
        self.X, self.Y = jnp.asarray(dataset.train.X), jnp.asarray(dataset.train.Y)
        self.model_config = ModelConfig(vocab_size=dataset.vocab.size, context_size=dataset.context_size)
        self.train_config = TrainConfig()

    def time_chunks(
        self, mc: ModelConfig, tc: TrainConfig, length: int, calls: int, dtype=jnp.float32, loss_and_grads=None
    ) -> Row:
        """Compile a ``length``-step chunk, then time ``calls`` consecutive calls of it, ``repeats`` times."""
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
    parameter and optimiser buffers from one call to the next."""
    carry = [params, opt_state]

    def run():
        for i in range(calls):
            start = jnp.int32(i * length)
            carry[0], carry[1], losses = chunk(carry[0], carry[1], start, start + length, *data)
        losses.block_until_ready()

    return measure(run, repeats)


# --------------------------------------------------------------------------- #
# Studies                                                                     #
# --------------------------------------------------------------------------- #


def dispatch_study(b: Bench) -> list[Row]:
    """The same SGD step: op by op, one jit call per step, and fused into scan chunks."""
    mc, tc, steps = b.model_config, b.train_config, b.config.steps
    rows = []

    # Eager: the chunk function with jit disabled runs every primitive as its own dispatch.
    n = b.config.eager_steps
    if n:
        params, opt_state, _ = train.init_state(mc, tc)
        key = train.keys_for(tc.seed).data
        chunk1 = train.make_chunk_fn(tc, 1)

        def eager():
            p, o = params, opt_state
            with jax.disable_jit():
                for i in range(n):
                    p, o, losses = chunk1(p, o, jnp.int32(i), jnp.int32(i + 1), b.X, b.Y, key)
            jax.block_until_ready(losses)

        timing = measure(eager, max(1, b.config.repeats // 2))
        rows.append(
            {
                "variant": "eager (no jit)",
                "chunk": 1,
                "unroll": 1,
                "compile_s": 0.0,
                "us_per_step": 1e6 * timing.median / n,
                "steps_per_s": n / timing.median,
                "spread_steps_per_s": (n / timing.high, n / timing.low),
            }
        )
    per_step = min(steps, 1_000)
    rows.append({"variant": "jit, one call per step", "chunk": 1, "unroll": 1, **b.time_chunks(mc, tc, 1, per_step)})
    for length in b.config.chunks:
        for unroll in b.config.unrolls:
            if unroll > length:
                continue
            row = b.time_chunks(mc, dataclasses.replace(tc, unroll=unroll), length, max(1, steps // length))
            rows.append({"variant": "scan", "chunk": length, "unroll": unroll, **row})
    return rows


def atomic_loss_and_grads(params, X, Y):
    """The atomic manual pass as a training gradient (for timing only)."""
    values = manual.forward_intermediates(params, X, Y)
    grads = manual.atomic_backward(params, X, Y, values)
    return values["loss"], {name: grads[name] for name in model.PARAM_NAMES}


def modes_study(b: Bench) -> list[Row]:
    """Time per step of each gradient mode, same shapes, same run; ratio to autodiff."""
    rows = []
    length = min(b.config.steps, 2_000)
    calls = max(1, b.config.steps // length)
    for name, mode, grad_fn in [
        ("autodiff", "autodiff", None),
        ("custom_vjp", "custom_vjp", None),
        ("custom_jvp", "custom_jvp", None),
        ("manual (fused)", "manual", None),
        ("manual (atomic)", "manual", atomic_loss_and_grads),
    ]:
        tc = dataclasses.replace(b.train_config, grad_mode=mode)
        rows.append({"mode": name, **b.time_chunks(b.model_config, tc, length, calls, loss_and_grads=grad_fn)})
    base = rows[0]["us_per_step"]
    for row in rows:
        row["ratio_to_autodiff"] = row["us_per_step"] / base
    return rows


def _single_step(grad_fn, tc: TrainConfig):
    optimizer = tc.make_optimizer()

    def step(params, opt_state, X, Y):
        loss, grads = grad_fn(params, X, Y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def hlo_summary(compiled) -> dict:
    """Counts in the optimised HLO: instructions of the entry computation (each one a kernel/thunk
    launched per step, on CPU), how many of those are fusions, and how many compute a matrix
    product (a ``dot`` instruction, or a fusion whose fused computation contains one; a fusion of
    XNNPACK/YNNPACK kind may hold a reduction instead, and is not counted then)."""
    text = compiled.as_text()
    bodies = dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)\n\}", text, flags=re.M | re.S))
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    ops = [line for line in entry.splitlines()[1:] if " = " in line]
    kernels = [op for op in ops if not re.search(r"= \S+ (parameter|constant|get-tuple-element|tuple|bitcast)\(", op)]

    def is_dot(op: str) -> bool:
        called = re.search(r"calls=%([\w.\-]+)", op)
        return " dot(" in op or bool(called and " dot(" in bodies.get(called.group(1), ""))

    return {
        "kernels": len(kernels),
        "fusions": sum("fusion(" in op for op in kernels),
        "dots": sum(is_dot(op) for op in kernels),
    }


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return {
        "flops": float(analysis.get("flops", float("nan"))),
        "bytes": float(analysis.get("bytes accessed", float("nan"))),
    }


def xla_study(b: Bench, modes_rows: list[Row] | None = None) -> list[Row]:
    """Per mode: FLOPs and bytes of one step (XLA's cost analysis), kernels after fusion, GFLOP/s."""
    mc, tc = b.model_config, b.train_config
    params, opt_state, _ = train.init_state(mc, tc)
    Xb, Yb = b.X[: tc.batch_size], b.Y[: tc.batch_size]
    timed = {row["mode"]: row["us_per_step"] for row in modes_rows or []}
    rows = []
    for name, fn in [
        ("autodiff", train.loss_and_grads_fn("autodiff")),
        ("custom_vjp", train.loss_and_grads_fn("custom_vjp")),
        ("custom_jvp", train.loss_and_grads_fn("custom_jvp")),
        ("manual (fused)", train.loss_and_grads_fn("manual")),
        ("manual (atomic)", atomic_loss_and_grads),
    ]:
        compiled = jax.jit(_single_step(fn, tc)).lower(params, opt_state, Xb, Yb).compile()
        row = {"mode": name, **cost(compiled), **hlo_summary(compiled)}
        if name in timed:
            row["us_per_step"] = timed[name]
            row["gflops_per_s"] = row["flops"] / (timed[name] * 1e3)
        rows.append(row)
    return rows


def model_flops(mc: ModelConfig, batch: int) -> float:
    """Matrix-multiply FLOPs of one training step: 2 per multiply-add, forward and backward.

    Forward: ``embcat @ W1`` and ``h @ W2``; backward: two more products per
    layer (the weight gradient and the input gradient; the first layer's input
    gradient feeds the embedding). Elementwise work is O(batch * hidden), small beside it.
    """
    first = batch * mc.fan_in * mc.hidden
    second = batch * mc.hidden * mc.vocab_size
    return 2.0 * 3 * (first + second)


def scaling_study(b: Bench) -> list[Row]:
    """Batch and hidden sweeps (each with the other at its default), then float32 vs float64."""
    rows = []
    tc = b.train_config
    points = [("batch", bs, b.model_config, bs) for bs in b.config.batches]
    points += [("hidden", h, dataclasses.replace(b.model_config, hidden=h), tc.batch_size) for h in b.config.hiddens]
    for axis, value, mc, bs in points:
        length = _chunk_for(bs * mc.hidden, b.config.steps)
        row = b.time_chunks(mc, dataclasses.replace(tc, batch_size=bs), length, 1)
        flops = model_flops(mc, bs)
        rows.append(
            {
                "sweep": axis,
                "value": value,
                "batch": bs,
                "hidden": mc.hidden,
                "dtype": "float32",
                **row,
                "us_per_example": row["us_per_step"] / bs,
                "gflops_per_s": flops / (row["us_per_step"] * 1e3),
            }
        )
    with jax.enable_x64(True):
        length = _chunk_for(tc.batch_size * b.model_config.hidden, b.config.steps)
        row = b.time_chunks(b.model_config, tc, length, 1, dtype=jnp.float64)
    flops = model_flops(b.model_config, tc.batch_size)
    rows.append(
        {
            "sweep": "dtype",
            "value": "float64",
            "batch": tc.batch_size,
            "hidden": b.model_config.hidden,
            "dtype": "float64",
            **row,
            "us_per_example": row["us_per_step"] / tc.batch_size,
            "gflops_per_s": flops / (row["us_per_step"] * 1e3),
        }
    )
    return rows


def _chunk_for(work: int, steps: int) -> int:
    """Fewer steps for bigger steps, so every point takes a similar time."""
    return int(max(50, min(steps, steps * 32 * 200 // max(work, 1))))


def vmap_study(b: Bench) -> list[Row]:
    """Many models at once, as ``scripts/sweep.py`` trains them (:mod:`jaxbirds.sweep`, in the sweep's
    gradient mode, custom_vjp): K models on 1 device and on every device, in groups of
    ``sweep.GROUP`` and, for comparison, all of a device's models in one ``vmap``; plus ``vmap`` over
    a single model without the unbatched shortcut, as the issue first measured it. The single-model
    loop in the same mode is timed first and last, so that drift of the machine shows."""
    mc, tc = b.model_config, dataclasses.replace(b.train_config, grad_mode="custom_vjp")
    steps, repeats = b.config.steps, b.config.repeats
    rows = [{"variant": "single-model loop (train.py)", "devices": 1, "models": 1,
             **_rate(b.time_chunks(mc, tc, steps, 1))}]  # fmt: skip

    def time_models(k: int, devices: int, group: int | None, naive: bool = False) -> Row:
        length = max(200, steps * devices // k)
        members = sweep.grid([tc.learning_rate * (1 + i / 1000) for i in range(k)], [tc.seed])
        mesh = sweep.make_mesh(devices)
        per_model = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sweep.MODELS))
        params, opt_state, keys = sweep.init_models(mc, tc, members, per_model)
        stops = jax.device_put(np.full(k, 2**30, np.int32), per_model)
        data = (b.X, b.Y, keys)
        t0 = time.perf_counter()
        if naive:  # vmap over the models axis, whatever its size
            batched = jax.vmap(train.chunk_fn(tc, length, optimizer=sweep.injected_optimizer(tc)),
                               in_axes=(0, 0, None, 0, None, None, 0))  # fmt: skip
            chunk = jax.jit(batched, donate_argnums=(0, 1)).lower(params, opt_state, jnp.int32(0), stops, *data)
            chunk = chunk.compile()
        else:
            chunk = sweep.compile_models_chunk(tc, length, mesh, params, opt_state, jnp.int32(0), stops, *data,
                                               group=group or k)  # fmt: skip
        compile_s = time.perf_counter() - t0
        carry = [params, opt_state]

        def run():
            carry[0], carry[1], losses = chunk(carry[0], carry[1], jnp.int32(0), stops, *data)
            losses.block_until_ready()

        timing = measure(run, repeats)
        group = 1 if naive else sweep.group_size(k // devices, group or k)
        return {"devices": devices, "models": k, "group": group, "compile_s": compile_s,
                "us_per_step": 1e6 * timing.median / length, "model_steps_per_s": k * length / timing.median,
                "spread": (k * length / timing.high, k * length / timing.low)}  # fmt: skip

    rows.append({"variant": "vmap over 1 model, batched (before)", **time_models(1, 1, None, naive=True)})
    for devices in sorted({1, len(jax.devices())}):
        for k in b.config.models:
            if k % devices:
                continue
            rows.append({"variant": "sweep", **time_models(k, devices, sweep.GROUP)})
            if k in b.config.ungrouped and k // devices > sweep.GROUP:
                rows.append({"variant": "sweep, one vmap per device", **time_models(k, devices, None)})
    rows.append({"variant": "single-model loop (train.py), again", "devices": 1, "models": 1,
                 **_rate(b.time_chunks(mc, tc, steps, 1))})  # fmt: skip
    base = rows[0]["model_steps_per_s"]
    for row in rows:
        row["x_single_model"] = row["model_steps_per_s"] / base
    return rows


def _rate(timed: Row) -> Row:
    """A single-model row of :meth:`Bench.time_chunks` in the many-models study's columns."""
    return {"group": 1, "compile_s": timed["compile_s"], "us_per_step": timed["us_per_step"],
            "model_steps_per_s": timed["steps_per_s"], "spread": timed["spread_steps_per_s"]}  # fmt: skip


def torch_study(b: Bench, jax_steps_per_s: float | None) -> tuple[list[Row], str | None]:
    """The tutorial's PyTorch loop (manual gradients): its Python-loop embedding gradient and a
    vectorised one. Returns ``(rows, note)``; without torch, no rows and a note saying so."""
    try:
        import torch
    except ImportError:
        return [], "torch is not installed (pip install -e '.[torch]'): the PyTorch reference was skipped"
    from jaxbirds.torch_reference import tutorial_training_loop

    rows = []
    X, Y = torch.from_numpy(b.dataset.train.X.astype(np.int64)), torch.from_numpy(b.dataset.train.Y.astype(np.int64))
    for variant, vectorised in [("tutorial loop (Python loop for dC)", False), ("same, dC by index_add_", True)]:
        n = b.config.torch_steps
        loop = functools.partial(tutorial_training_loop, X, Y, b.model_config, n, vectorised)
        timing = measure(loop, max(1, b.config.repeats // 2))
        rate = n / timing.median
        rows.append(
            {
                "variant": variant,
                "steps_per_s": rate,
                "us_per_step": 1e6 / rate,
                "jaxbirds_speedup": (jax_steps_per_s / rate) if jax_steps_per_s else float("nan"),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    return rows, None


# --------------------------------------------------------------------------- #
# Accuracy and memory                                                         #
# --------------------------------------------------------------------------- #


def gradient_functions() -> dict[str, Callable]:
    """``(params, X, Y) -> grads`` for every gradient mode, the atomic manual pass included."""
    fns = {
        mode: jax.grad(functools.partial(model.loss, rules=mode)) for mode in ("autodiff", "custom_vjp", "custom_jvp")
    }
    fns["manual (fused)"] = lambda params, X, Y: manual.fused_backward(params, X, Y).grads
    fns["manual (atomic)"] = lambda params, X, Y: atomic_loss_and_grads(params, X, Y)[1]
    return fns


#: b1's exact gradient is zero (batch norm removes any shift of hprebn): a relative error means nothing there.
ACCURACY_TENSORS = tuple(name for name in model.PARAM_NAMES if name != "b1")


def gradient_errors(grad_fns: dict[str, Callable], params, batches) -> dict[str, dict[str, np.ndarray]]:
    """Relative error of each float32 gradient, per tensor and batch: ``|g32 - g64| / |g64|`` (2-norms),
    against ``jax.grad`` of the plain model in float64 at the same parameters and batch.

    ``params`` are float32; the reference sees them exactly (float64 holds every float32).
    Returns ``{method: {tensor: errors over batches}}``.
    """
    reference = jax.jit(jax.grad(model.loss))
    compiled = {name: jax.jit(fn) for name, fn in grad_fns.items()}
    errors = {name: {t: [] for t in ACCURACY_TENSORS} for name in grad_fns}
    for X, Y in batches:
        with jax.enable_x64(True):
            ref = jax.device_get(reference(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params), X, Y))
        for name, fn in compiled.items():
            with jax.default_matmul_precision("highest"):
                got = jax.device_get(fn(params, X, Y))
            for t in ACCURACY_TENSORS:
                diff = np.linalg.norm(np.asarray(got[t], np.float64) - ref[t])
                errors[name][t].append(diff / np.linalg.norm(ref[t]))
    return {name: {t: np.asarray(v) for t, v in per.items()} for name, per in errors.items()}


def accuracy_study(b: Bench) -> list[Row]:
    """Which mode computes the most accurate float32 gradient, and how far whole runs drift apart.

    Points: the default model at initialisation and after training (autodiff, the tutorial's
    recipe) for each of ``accuracy_checkpoints`` steps, batch 32; and at initialisation for each
    of ``accuracy_batches``. ``accuracy_repeats`` random batches per point. Then ``drift_steps``
    of training in every mode from the same start: the largest gap between its loss history and
    autodiff's (over windows of 100 steps), and the final batch's loss.
    """
    mc, tc, cfg = b.model_config, b.train_config, b.config
    rng = np.random.default_rng(0)

    def batches(size):
        rows = [rng.integers(0, len(b.Y), size) for _ in range(cfg.accuracy_repeats)]
        return [(b.X[r], b.Y[r]) for r in rows]

    points = []  # (label, steps trained, batch size, params)
    state = train.init_state(mc, tc)
    trained = 0
    for steps in sorted(set(cfg.accuracy_checkpoints)):
        if steps > trained:
            result = train.train(b.X, b.Y, dataclasses.replace(tc, steps=steps), state)
            state, trained = result.state, steps
        params = jax.device_get(state.params)
        points += [(f"after {steps:,} steps" if steps else "init", steps, 32, params)]
        if steps == 0:
            points += [("init", 0, size, params) for size in cfg.accuracy_batches if size != 32]
    fns = gradient_functions()
    rows = []
    for label, steps, size, params in points:
        errors = gradient_errors(fns, params, batches(size))
        for method, per_tensor in errors.items():
            stacked = np.stack(list(per_tensor.values()))  # tensors x batches
            row = {
                "point": label,
                "steps": steps,
                "batch": size,
                "mode": method,
                "median_rel_error": float(np.median(stacked)),
                "max_rel_error": float(stacked.max()),
            }
            row.update({f"median_{t}": float(np.median(v)) for t, v in per_tensor.items()})
            rows.append(row)  # fmt: skip

    drift = {}
    for mode in train.GRAD_MODES:
        config = dataclasses.replace(tc, steps=cfg.drift_steps, grad_mode=mode)
        drift[mode] = train.train(b.X, b.Y, config, train.init_state(mc, config)).losses
    windows = {m: v[: len(v) // 100 * 100].reshape(-1, 100).mean(axis=1) for m, v in drift.items()}
    for mode in train.GRAD_MODES:
        rows.append({"point": f"run of {cfg.drift_steps:,} steps", "steps": cfg.drift_steps, "batch": 32,
                     "mode": mode, "max_window_loss_gap": float(np.abs(windows[mode] - windows["autodiff"]).max()),
                     "final_window_loss": float(windows[mode][-1])})  # fmt: skip
    return rows


def _itemsize(short: str) -> int:
    """Bytes per element of a dtype as jaxprs print it: ``f32``, ``i64``, ``u8``, ``bf16``, ``bool``,
    ``key`` (a threefry key: two uint32)."""
    if short == "bool":
        return 1
    if short == "key":
        return 8
    match = re.fullmatch(r"(bf|f|i|u|c)(\d+)", short)
    if not match:
        raise ValueError(f"unknown dtype {short!r} in a residual")
    return int(match.group(2)) // 8


def _residuals(fn, *args) -> list[tuple[str, int]]:
    """What reverse mode keeps between forward and backward: ``(description, bytes)`` per residual,
    read from ``jax.ad_checkpoint.print_saved_residuals`` (arguments and literals left out)."""
    import contextlib
    import io

    from jax import ad_checkpoint

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ad_checkpoint.print_saved_residuals(fn, *args)
    kept = []
    for line in buffer.getvalue().splitlines():
        if not line.strip() or "from the argument" in line or re.search(r"\] from a (literal|constant)", line):
            continue
        match = re.match(r"\s*(\w+)(?:<\w+>)?\[([\d,]*)\] (.*)", line)
        if not match:
            raise ValueError(f"cannot read this residual line: {line!r}")
        dtype, dims, what = match.groups()
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        kept.append((re.sub(r" from /\S+", "", what), size * _itemsize(dtype)))
    return kept


def memory_study(b: Bench) -> list[Row]:
    """What XLA's memory analysis says each mode's compiled training step needs (arguments, outputs,
    temporaries), at ``memory_batches`` x ``memory_hiddens``; what reverse mode keeps between forward
    and backward; and the same for autodiff under ``jax.checkpoint`` (recompute instead of keep),
    with its time per step."""
    from jaxbirds import memory

    tc = b.train_config
    remat = jax.value_and_grad(jax.checkpoint(functools.partial(model.loss, rules="autodiff")))
    variants = {mode: train.loss_and_grads_fn(mode) for mode in train.GRAD_MODES}
    variants["autodiff + jax.checkpoint"] = remat
    rows = []
    for hidden in b.config.memory_hiddens:
        mc = dataclasses.replace(b.model_config, hidden=hidden)
        params, opt_state, _ = train.init_state(mc, tc)
        for batch in b.config.memory_batches:
            X, Y = b.X[:batch], b.Y[:batch]
            for name, fn in variants.items():
                compiled = jax.jit(_single_step(fn, tc)).lower(params, opt_state, X, Y).compile()
                analysis = compiled.memory_analysis()
                row = {
                    "mode": name,
                    "batch": batch,
                    "hidden": hidden,
                    "argument_bytes": analysis.argument_size_in_bytes,
                    "output_bytes": analysis.output_size_in_bytes,
                    "temp_bytes": analysis.temp_size_in_bytes,
                    "peak_bytes": memory.compiled_bytes(compiled),
                }
                if name != "manual":  # the fused pass has no forward/backward split to keep residuals across
                    loss_fn = (
                        jax.checkpoint(functools.partial(model.loss, rules="autodiff"))
                        if name.endswith("checkpoint")
                        else functools.partial(model.loss, rules=name)
                    )
                    kept = _residuals(lambda p, loss_fn=loss_fn, X=X, Y=Y: loss_fn(p, X, Y), params)
                    what = sorted({w.split(" (")[0].replace("output of ", "") for w, _ in kept})
                    row.update(residuals=len(kept), residual_bytes=sum(n for _, n in kept), kept=", ".join(what))
                rows.append(row)
    timed = dataclasses.replace(tc, grad_mode="autodiff")
    length = min(b.config.steps, 2_000)
    for name, fn in [("autodiff", None), ("autodiff + jax.checkpoint", remat)]:  # time: default model, batch 32
        t = b.time_chunks(b.model_config, timed, length, max(1, b.config.steps // length), loss_and_grads=fn)
        rows.append({"mode": name, "batch": tc.batch_size, "hidden": b.model_config.hidden,
                     "us_per_step": t["us_per_step"]})  # fmt: skip
    return rows


def compile_study(b: Bench) -> list[Row]:
    """Seconds to lower and compile one training chunk, per gradient mode and chunk length: real
    compiles as ``scripts/bench.py`` runs it (it enables no persistent cache; under one, such as
    the test suite's, the figures are cache loads)."""
    mc = b.model_config
    rows = []
    for mode in train.GRAD_MODES:
        tc = dataclasses.replace(b.train_config, grad_mode=mode)
        params, opt_state, _ = train.init_state(mc, tc)
        key = train.keys_for(tc.seed).data
        for length in b.config.compile_chunks:
            t0 = time.perf_counter()
            lowered = train.make_chunk_fn(tc, length).lower(
                params, opt_state, jnp.int32(0), jnp.int32(0), b.X, b.Y, key
            )
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            rows.append({"mode": mode, "chunk": length, "trace_lower_s": t1 - t0, "compile_s": t2 - t1})
    return rows


def evaluation_study(b: Bench, wide_subset_rows: int = 4_096) -> list[Row]:
    """Calibration and evaluation after training, the product way (before) and by lookup tables
    (:mod:`jaxbirds.evaluate`): calibration on the train split (two passes) and the loss of each split.

    Both ways run their programs in the batches their own memory estimates allow. At the default
    shape (embedding 10, hidden 200) both run on the whole splits, timed as every study times. At
    embedding 100,000 (W1 300,000 x 200) the product way is far too slow for the whole splits: it
    runs on the first ``wide_subset_rows`` training rows only (calibration on them and their loss),
    timed once after a one-batch warm-up; the lookup tables run both on that subset and on the whole
    splits. "row passes" counts each calibrated row twice (two passes) and each evaluated row once;
    ``s_per_100k_rows`` is seconds per 100,000 row passes, and ``x_faster`` the product's figure
    (at embedding 100,000: on its subset) over the row's. ``max_loss_diff`` is the largest difference
    between the two ways' losses of the same rows (model at initialisation).
    """
    from jaxbirds import evaluate, memory

    @jax.jit
    def product_column_sums(params, X, valid, center):
        diff = (model.hidden_preactivation(params, X) - center) * valid[:, None]
        return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)

    @jax.jit
    def product_summed_nll(params, stats, X, Y, valid):
        log_probs = jax.nn.log_softmax(model.logits(params, X, stats), axis=1)
        return jnp.sum(-jnp.take_along_axis(log_probs, Y[:, None], axis=1)[:, 0] * valid)

    def by_product(params, splits: dict) -> dict[str, float]:
        """The evaluation as it was: (N, kE) embedded inputs times W1, batches sized by counting them."""
        (fan_in, hidden), vocab = params["W1"].shape, params["W2"].shape[1]
        per_row = evaluate.LIVE_BUFFERS * (fan_in + hidden + vocab) * params["W1"].dtype.itemsize + 64
        batch = memory.rows_within(per_row, sum(p.nbytes for p in params.values()), evaluate.MAX_BATCH)
        X, n = splits["train"][0], len(splits["train"][0])

        def column_sum(power: int, center: jax.Array) -> jax.Array:  # of (hprebn - center) ** power
            total = jnp.zeros((1, hidden))
            for start in range(0, n, batch):
                rows, valid = evaluate._pad(X, start, min(start + batch, n), batch)
                total = total + product_column_sums(params, rows, valid, center)[power - 1]
            return total

        mean = column_sum(1, jnp.zeros((1, hidden))) / n  # two passes: the mean, then the deviations from it
        stats = model.BatchNormStats(mean, column_sum(2, mean) / (n - 1))
        losses = {}
        for name, (X, Y) in splits.items():
            total = 0.0
            for start in range(0, len(Y), batch):
                rows, valid = evaluate._pad(X, start, min(start + batch, len(Y)), batch)
                labels, _ = evaluate._pad(Y, start, min(start + batch, len(Y)), batch)
                total += float(product_summed_nll(params, stats, rows, labels, valid))
            losses[name] = total / len(Y)
        return losses

    def by_lookup(params, splits: dict) -> dict[str, float]:
        stats = evaluate.calibrate(params, splits["train"][0])
        return {name: evaluate.split_loss(params, stats, X, Y) for name, (X, Y) in splits.items()}

    ways = {"product (before)": by_product, "lookup tables": by_lookup}
    whole = {name: (s.X, s.Y) for name, s in b.dataset.splits.items()}
    subset = {"train": (b.dataset.train.X[:wide_subset_rows], b.dataset.train.Y[:wide_subset_rows])}
    warm_up = {"train": (b.dataset.train.X[:2], b.dataset.train.Y[:2])}  # one padded batch of each program
    rows = []
    for embedding in (b.model_config.embedding_dim, 100_000):
        mc = dataclasses.replace(b.model_config, embedding_dim=embedding)
        params = model.init_params(jax.random.key(0), mc)
        jax.block_until_ready(params)
        cheap = embedding == b.model_config.embedding_dim
        points = [(way, "all splits", whole) for way in ways] if cheap else [
            ("product (before)", f"first {len(subset['train'][0]):,} train rows", subset),
            ("lookup tables", f"first {len(subset['train'][0]):,} train rows", subset),
            ("lookup tables", "all splits", whole),
        ]  # fmt: skip
        losses = {}
        for way, measured, splits in points:
            run = functools.partial(ways[way], params, splits)
            if cheap or way == "lookup tables":
                timing, losses[way, measured] = measure(run, b.config.repeats), run()
            else:  # minutes a run: one, after compiling on one batch
                ways[way](params, warm_up)
                t0 = time.perf_counter()
                losses[way, measured] = run()
                timing = Timing.of([time.perf_counter() - t0])
            passes = 2 * len(splits["train"][0]) + sum(len(X) for X, _ in splits.values())
            rows.append({"embedding": embedding, "hidden": mc.hidden, "way": way, "measured": measured,
                         "timed_runs": b.config.repeats if cheap or way == "lookup tables" else 1,
                         "row_passes": passes, "seconds": timing.median, "spread": (timing.low, timing.high),
                         "s_per_100k_rows": 1e5 * timing.median / passes})  # fmt: skip
        product = next(r for r in rows[-len(points) :] if r["way"] == "product (before)")
        for row in rows[-len(points) :]:
            row["x_faster"] = product["s_per_100k_rows"] / row["s_per_100k_rows"]
            same = [v for (_, measured), v in losses.items() if measured == row["measured"]]
            if len(same) == 2:  # both ways on the same rows
                row["max_loss_diff"] = max(abs(same[0][k] - same[1][k]) for k in same[0])
    return rows


TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train.py"


def startup_study(b: Bench) -> tuple[list[Row], str | None]:
    """``scripts/train.py`` (the tutorial's recipe, ``startup_steps`` steps) run twice, each in a fresh
    process, sharing one new persistent compilation cache: the first compiles and fills it, the second
    loads from it. Each row is one run's wall time, training time and its phases outside training,
    as the script itself measured them (``metrics.json``); "unaccounted" is the rest of the wall
    time (the interpreter's start and exit, argument parsing, writing metrics.json, the host work
    between chunks)."""
    if not TRAIN_SCRIPT.is_file():
        return [], f"{TRAIN_SCRIPT} is not there (an installed package has no scripts/)"
    rows = []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        for i, run in enumerate(("first (empty cache)", "second (warm cache)")):
            args = [sys.executable, str(TRAIN_SCRIPT), "--steps", str(b.config.startup_steps), "--out", f"{out}/{i}"]
            # as a user starts it: without the host devices bench.py itself asked for (cli.split_host_into_devices)
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(cli.HOST_DEVICES_FLAG)]
            env = {**os.environ, "JAXBIRDS_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": " ".join(flags)}
            t0 = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True, env=env)
            wall = time.perf_counter() - t0
            timing = json.loads(Path(f"{out}/{i}/metrics.json").read_text())["timing"]
            phases = timing["outside_training"]
            measured = sum(phases.values())
            rows.append({"run": run, "wall_s": wall, "train_s": timing["train_seconds"],
                         "wall_minus_train_s": wall - timing["train_seconds"], "outside_s": measured, **phases,
                         "unaccounted": wall - timing["train_seconds"] - measured})  # fmt: skip
    return rows, None


# --------------------------------------------------------------------------- #
# Reporting                                                                   #
# --------------------------------------------------------------------------- #


def markdown_table(rows: list[Row], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Tuples print as min-max spreads."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key, "")
            if isinstance(value, tuple):
                cells.append("–".join(format(v, spec) for v in value))
            elif isinstance(value, (int, float)) and spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = {
    "dispatch": (
        "Dispatch and fusion (hidden 200, batch 32)",
        [
            ("variant", "variant", ""),
            ("chunk", "steps per call", ","),
            ("unroll", "unroll", ""),
            ("steps_per_s", "steps/s (median)", ",.0f"),
            ("spread_steps_per_s", "min–max", ",.0f"),
            ("us_per_step", "µs/step", ".1f"),
            ("compile_s", "compile s", ".2f"),
        ],
    ),
    "modes": (
        "Gradient modes (scan chunks, hidden 200, batch 32)",
        [
            ("mode", "mode", ""),
            ("us_per_step", "µs/step", ".1f"),
            ("steps_per_s", "steps/s", ",.0f"),
            ("spread_steps_per_s", "min–max", ",.0f"),
            ("ratio_to_autodiff", "× autodiff", ".3f"),
            ("compile_s", "compile s", ".2f"),
        ],
    ),
    "xla": (
        "What XLA compiled, per training step (one step, outside scan)",
        [
            ("mode", "mode", ""),
            ("flops", "FLOPs", ",.0f"),
            ("bytes", "bytes accessed", ",.0f"),
            ("kernels", "kernels (thunks)", ""),
            ("fusions", "of which fusions", ""),
            ("dots", "dots", ""),
            ("gflops_per_s", "achieved GFLOP/s", ".2f"),
        ],
    ),
    "scaling": (
        "Scaling (matmul FLOPs counted by the model's formula)",
        [
            ("sweep", "sweep", ""),
            ("batch", "batch", ""),
            ("hidden", "hidden", ""),
            ("dtype", "dtype", ""),
            ("us_per_step", "µs/step", ",.1f"),
            ("us_per_example", "µs/example", ".3f"),
            ("steps_per_s", "steps/s", ",.0f"),
            ("gflops_per_s", "GFLOP/s", ".2f"),
        ],
    ),
    "vmap": (
        "Many models at once (custom_vjp, batch 32, hidden 200 each; the sweep's program)",
        [
            ("variant", "variant", ""),
            ("devices", "devices", ""),
            ("models", "K", ""),
            ("group", "models per vmap", ""),
            ("us_per_step", "µs per call step", ",.1f"),
            ("model_steps_per_s", "model-steps/s", ",.0f"),
            ("spread", "min–max", ",.0f"),
            ("x_single_model", "× single-model loop", ".2f"),
            ("compile_s", "compile s", ".2f"),
        ],
    ),
    "accuracy": (
        "float32 gradients against float64 (relative 2-norm error per tensor, b1 left out; and whole runs)",
        [
            ("point", "point", ""),
            ("batch", "batch", ","),
            ("mode", "mode", ""),
            ("median_rel_error", "median rel. error", ".2e"),
            ("max_rel_error", "max rel. error", ".2e"),
            ("median_C", "C", ".1e"),
            ("median_W1", "W1", ".1e"),
            ("median_bngain", "bngain", ".1e"),
            ("median_W2", "W2", ".1e"),
            ("max_window_loss_gap", "max gap to autodiff (loss)", ".1e"),
            ("final_window_loss", "final loss", ".4f"),
        ],
    ),
    "memory": (
        "Memory of one compiled training step (XLA's memory analysis) and what reverse mode keeps",
        [
            ("mode", "mode", ""),
            ("batch", "batch", ","),
            ("hidden", "hidden", ","),
            ("argument_bytes", "arguments B", ","),
            ("output_bytes", "outputs B", ","),
            ("temp_bytes", "temporaries B", ","),
            ("peak_bytes", "peak B", ","),
            ("residuals", "residuals", ""),
            ("residual_bytes", "residual B", ","),
            ("us_per_step", "µs/step", ".1f"),
        ],
    ),
    "compile": (
        "Compile time of one training chunk (hidden 200, batch 32)",
        [
            ("mode", "mode", ""),
            ("chunk", "steps per chunk", ","),
            ("trace_lower_s", "trace + lower s", ".2f"),
            ("compile_s", "XLA compile s", ".2f"),
        ],
    ),
    "startup": (
        "scripts/train.py twice, fresh processes, one new compilation cache (seconds)",
        [
            ("run", "run", ""),
            ("wall_s", "wall", ".1f"),
            ("train_s", "training", ".1f"),
            ("wall_minus_train_s", "wall − training", ".2f"),
            ("outside_s", "phases measured", ".2f"),
            ("imports", "imports", ".2f"),
            ("data and initialisation", "data + init", ".2f"),
            ("compile", "compile", ".2f"),
            ("calibration and evaluation", "calibrate + evaluate", ".2f"),
            ("sampling", "sampling", ".2f"),
            ("plot", "plot", ".2f"),
            ("saving", "saving", ".2f"),
            ("waiting for checkpoints", "checkpoint wait", ".2f"),
            ("unaccounted", "unaccounted", ".2f"),
        ],
    ),
    "evaluation": (
        "Calibration and evaluation after training: the product (before) vs lookup tables (float32, seconds)",
        [
            ("embedding", "embedding", ","),
            ("hidden", "hidden", ""),
            ("way", "way", ""),
            ("measured", "rows measured", ""),
            ("timed_runs", "timed runs", ""),
            ("row_passes", "row passes", ","),
            ("seconds", "seconds (median)", ".3f"),
            ("spread", "min–max", ".3f"),
            ("s_per_100k_rows", "s per 100k row passes", ".3f"),
            ("x_faster", "× faster than product", ".1f"),
            ("max_loss_diff", "max loss difference", ".1e"),
        ],
    ),
    "torch": (
        "The tutorial's PyTorch loop (same recipe, manual gradients)",
        [
            ("variant", "variant", ""),
            ("steps_per_s", "steps/s", ",.0f"),
            ("us_per_step", "µs/step", ",.1f"),
            ("jaxbirds_speedup", "jaxbirds scan × faster", ".1f"),
            ("torch", "torch", ""),
            ("torch_threads", "threads", ""),
        ],
    ),
}


#: The figure :func:`plot_results` writes for each study that has one (``scripts/bench.py --plot`` lists them).
FIGURES: dict[str, str] = {
    "dispatch": "dispatch.png",
    "scaling": "scaling.png",
    "vmap": "vmap.png",
    "accuracy": "accuracy.png",
    "memory": "memory.png",
    "startup": "startup.png",
}


def plot_results(results: dict, out_dir) -> list:
    """PNG figures of the studies that a picture explains better than a table."""
    from jaxbirds import plots

    plots.require()
    out_dir, written = Path(out_dir), []
    if results.get("dispatch"):
        rows = results["dispatch"]
        fig, ax = plots.subplots(figsize=(8, 4))
        labels = [
            r["variant"]
            if r["variant"] != "scan"
            else f"scan {r['chunk']:,}" + (f" u{r['unroll']}" if r["unroll"] > 1 else "")
            for r in rows
        ]
        ax.barh(labels, [r["steps_per_s"] for r in rows], color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel("training steps per second (log scale)")
        ax.invert_yaxis()
        ax.set_title("the same SGD step, dispatched three ways")
        written.append(plots.write(fig, out_dir / FIGURES["dispatch"]))
    if results.get("scaling"):
        fig, axes = plots.subplots(1, 2, figsize=(10, 4))
        for ax, axis in zip(axes, ("batch", "hidden"), strict=True):
            rows = [r for r in results["scaling"] if r["sweep"] == axis]
            ax.plot([r["value"] for r in rows], [r["gflops_per_s"] for r in rows], "o-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(axis)
            ax.set_ylabel("achieved matmul GFLOP/s")
            ax.set_title(f"{axis} sweep")
            ax.grid(alpha=0.3)
        written.append(plots.write(fig, out_dir / FIGURES["scaling"]))
    if results.get("vmap"):
        rows = results["vmap"]
        fig, ax = plots.subplots(figsize=(7, 4.5))
        for (variant, devices), style in zip(
            dict.fromkeys((r["variant"], r["devices"]) for r in rows if r["variant"].startswith("sweep")),
            ["o-", "s--", "^-", "v--"], strict=False,
        ):  # fmt: skip
            line = [r for r in rows if r["variant"] == variant and r["devices"] == devices]
            ax.plot([r["models"] for r in line], [r["model_steps_per_s"] for r in line], style,
                    label=f"{variant}, {devices} device(s)")  # fmt: skip
        single = [r["model_steps_per_s"] for r in rows if r["variant"].startswith("single-model")]
        ax.axhline(single[0], color="gray", linestyle=":", label="single-model loop")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("models trained together (K)")
        ax.set_ylabel("model-steps per second")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        written.append(plots.write(fig, out_dir / FIGURES["vmap"]))
    gradient_rows = [r for r in results.get("accuracy", []) if "median_rel_error" in r]
    if gradient_rows:
        points = list(dict.fromkeys((r["point"], r["batch"]) for r in gradient_rows))
        modes = list(dict.fromkeys(r["mode"] for r in gradient_rows))
        fig, ax = plots.subplots(figsize=(9, 4))
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            values = [next(r["median_rel_error"] for r in gradient_rows if (r["point"], r["batch"]) == p and
                           r["mode"] == mode) for p in points]  # fmt: skip
            ax.bar(np.arange(len(points)) + j * width, values, width, label=mode)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(points)) + 0.4 - width / 2, [f"{p} (batch {n:,})" for p, n in points], fontsize=8)
        ax.set_ylabel("median relative error vs float64")
        ax.set_title("float32 gradient error per mode (median over tensors and batches)")
        ax.legend(fontsize=7)
        written.append(plots.write(fig, out_dir / FIGURES["accuracy"]))
    if results.get("memory"):
        rows = [r for r in results["memory"] if "peak_bytes" in r]
        hiddens = sorted({r["hidden"] for r in rows})
        fig, axes = plots.subplots(1, len(hiddens), figsize=(5 * len(hiddens), 4), squeeze=False)
        for ax, hidden in zip(axes[0], hiddens, strict=True):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                mine = [r for r in rows if r["mode"] == mode and r["hidden"] == hidden]
                style = "--" if "checkpoint" in mode else "o-"
                ax.plot([r["batch"] for r in mine], [r["peak_bytes"] / r["batch"] / 1024 for r in mine], style,
                        label=mode)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel("peak KiB per example (XLA memory analysis)")
            ax.set_title(f"one compiled training step, hidden {hidden:,}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        written.append(plots.write(fig, out_dir / FIGURES["memory"]))
    if results.get("startup"):
        rows = results["startup"]
        phases = [k for k in rows[0] if k not in ("run", "wall_s", "train_s", "outside_s", "wall_minus_train_s")]
        fig, ax = plots.subplots(figsize=(8, 3.6))
        left = np.zeros(len(rows))
        for phase in phases:
            values = np.array([r.get(phase, 0.0) for r in rows])
            ax.barh([r["run"] for r in rows], values, left=left, label=phase)
            left += values
        ax.set_xlabel("seconds of wall time outside training")
        ax.set_title("scripts/train.py: time outside training, empty then warm compilation cache")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        written.append(plots.write(fig, out_dir / FIGURES["startup"]))
    return written
