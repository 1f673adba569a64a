"""Dispatch and fusion: the same SGD step op by op, one jit call per step, and fused into scan chunks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxbirds import plots, train
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, measure


def dispatch_study(b: Bench) -> list[Row]:
    """The same SGD step: op by op (``eager_steps`` of them, if any), one jit call per step, and fused
    into scan chunks of each of ``chunks`` steps, unrolled by each of ``unrolls``.

    Returns:
        One row per variant: ``variant``, ``chunk``, ``unroll`` and :meth:`Bench.time_chunks`'s columns.
    """
    mc, tc, steps = b.model_config, b.train_config, b.config.steps
    rows = [eager_row(b)] if b.config.eager_steps else []
    per_step = min(steps, 1_000)
    rows.append({"variant": "jit, one call per step", "chunk": 1, "unroll": 1, **b.time_chunks(mc, tc, 1, per_step)})
    for length in b.config.chunks:
        for unroll in b.config.unrolls:
            if unroll > length:
                continue
            row = b.time_chunks(mc, dataclasses.replace(tc, unroll=unroll), length, max(1, steps // length))
            rows.append({"variant": "scan", "chunk": length, "unroll": unroll, **row})
    return rows


def eager_row(b: Bench) -> Row:
    """``eager_steps`` steps of the chunk function with jit disabled: every primitive its own dispatch."""
    mc, tc, n = b.model_config, b.train_config, b.config.eager_steps
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
    return {
        "variant": "eager (no jit)",
        "chunk": 1,
        "unroll": 1,
        "compile_s": 0.0,
        "us_per_step": 1e6 * timing.median / n,
        "steps_per_s": n / timing.median,
        "spread_steps_per_s": (n / timing.high, n / timing.low),
    }


def draw(rows: Sequence[Row], path: Path) -> Path:
    """Steps per second of each variant, one bar each, on a log scale."""
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
    return plots.save_png(fig, path)


STUDY = Study(
    name="dispatch",
    title="Dispatch and fusion (batch 32)",
    columns=(
        ("variant", "variant", ""),
        ("chunk", "steps per call", ","),
        ("unroll", "unroll", ""),
        ("steps_per_s", "steps/s (median)", ",.0f"),
        ("spread_steps_per_s", "min–max", ",.0f"),
        ("us_per_step", "µs/step", ".1f"),
        ("compile_s", "compile s", ".2f"),
    ),
    run=dispatch_study,
    figure=Figure("dispatch.png", draw),
)
