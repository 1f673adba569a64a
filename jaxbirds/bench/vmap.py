"""Many models at once: K independent models trained in one compiled step, as the sweep trains them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import plots, sweep, train
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, measure
from jaxbirds.train import TrainConfig


def vmap_study(b: Bench) -> list[Row]:
    """Many models at once, as ``scripts/sweep.py`` trains them (:mod:`jaxbirds.sweep`, in the sweep's
    gradient mode, custom_vjp): K models on 1 device and on every device, in groups of
    ``sweep.GROUP`` and, for comparison, all of a device's models in one ``vmap``; plus ``vmap`` over
    a single model without the unbatched shortcut, as the issue first measured it. The single-model
    loop in the same mode is timed first and last, so that drift of the machine shows.

    Returns:
        One row per variant and K: ``variant``, ``devices``, ``models``, ``group``, ``compile_s``,
        ``us_per_step``, ``model_steps_per_s``, ``spread`` and ``x_single_model`` (over the first row's).
    """
    mc, tc = b.model_config, dataclasses.replace(b.train_config, grad_mode="custom_vjp")
    steps = b.config.steps
    rows = [{"variant": "single-model loop (train.py)", "devices": 1, "models": 1,
             **_rate(b.time_chunks(mc, tc, steps, 1))}]  # fmt: skip
    rows.append({"variant": "vmap over 1 model, batched (before)", **time_models(b, tc, 1, 1, None, naive=True)})
    for devices in sorted({1, len(jax.devices())}):
        for k in b.config.models:
            if k % devices:
                continue
            rows.append({"variant": "sweep", **time_models(b, tc, k, devices, sweep.GROUP)})
            if k in b.config.ungrouped and k // devices > sweep.GROUP:
                rows.append({"variant": "sweep, one vmap per device", **time_models(b, tc, k, devices, None)})
    rows.append({"variant": "single-model loop (train.py), again", "devices": 1, "models": 1,
                 **_rate(b.time_chunks(mc, tc, steps, 1))})  # fmt: skip
    base = rows[0]["model_steps_per_s"]
    for row in rows:
        row["x_single_model"] = row["model_steps_per_s"] / base
    return rows


def time_models(b: Bench, tc: TrainConfig, k: int, devices: int, group: int | None, naive: bool = False) -> Row:
    """Compile and time one call of the sweep's chunk for ``k`` models (learning rates 0.1% apart) on ``devices``.

    Args:
        b: the bench (its data, steps and repeats).
        tc: the recipe of every model.
        k: models trained together.
        devices: devices the models are spread over.
        group: models per vmap on a device (``None``: all of a device's models in one).
        naive: ``vmap`` over the models axis whatever its size, without the sweep's program.

    Returns:
        A row: ``devices``, ``models``, ``group``, ``compile_s``, ``us_per_step`` (per call step),
        ``model_steps_per_s`` and its ``spread``.
    """
    length = max(200, b.config.steps * devices // k)
    members = sweep.grid([tc.learning_rate * (1 + i / 1000) for i in range(k)], [tc.seed])
    mesh = sweep.make_mesh(devices)
    per_model = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sweep.MODELS))
    params, opt_state, keys = sweep.init_models(b.model_config, tc, members, per_model)
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

    timing = measure(run, b.config.repeats)
    group = 1 if naive else sweep.group_size(k // devices, group or k)
    return {"devices": devices, "models": k, "group": group, "compile_s": compile_s,
            "us_per_step": 1e6 * timing.median / length, "model_steps_per_s": k * length / timing.median,
            "spread": (k * length / timing.high, k * length / timing.low)}  # fmt: skip


def _rate(timed: Row) -> Row:
    """A single-model row of :meth:`Bench.time_chunks` in the many-models study's columns."""
    return {"group": 1, "compile_s": timed["compile_s"], "us_per_step": timed["us_per_step"],
            "model_steps_per_s": timed["steps_per_s"], "spread": timed["spread_steps_per_s"]}  # fmt: skip


def draw(rows: Sequence[Row], path: Path) -> Path:
    """Model-steps per second against K, one line per sweep variant and device count, and the single-model loop."""
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
    return plots.save_png(fig, path)


STUDY = Study(
    name="vmap",
    title="Many models at once (custom_vjp, batch 32, the bench's model each; the sweep's program)",
    columns=(
        ("variant", "variant", ""),
        ("devices", "devices", ""),
        ("models", "K", ""),
        ("group", "models per vmap", ""),
        ("us_per_step", "µs per call step", ",.1f"),
        ("model_steps_per_s", "model-steps/s", ",.0f"),
        ("spread", "min–max", ",.0f"),
        ("x_single_model", "× single-model loop", ".2f"),
        ("compile_s", "compile s", ".2f"),
    ),
    run=vmap_study,
    figure=Figure("vmap.png", draw),
)
