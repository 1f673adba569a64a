"""Scaling: batch and hidden sweeps, and float32 against float64."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxbirds import plots
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, model_label
from jaxbirds.model import ModelConfig


def model_flops(mc: ModelConfig, batch: int) -> float:
    """Matrix-multiply FLOPs of one training step: 2 per multiply-add, forward and backward.

    Forward: one product per layer (``embcat @ W1``, each block's ``h[l-1] @ Wl``, ``h[L] @ W{L+1}``);
    backward: two more per layer (the weight gradient and the input gradient; the first layer's input
    gradient feeds the embedding). Elementwise work is O(batch * sum(hidden)), small beside it.

    Args:
        mc: the model's shapes (any depth), with widths ``(w_0, ..., w_{L+1}) = (kE, H_1, ..., H_L, V)``.
        batch: examples per step, ``B``.

    Returns:
        ``2 * 3 * B * sum_l w_{l-1} * w_l``; at depth 1, ``2 * 3 * (B * kE * H + B * H * V)``.
    """
    return 2.0 * 3 * batch * sum(fan_in * fan_out for fan_in, fan_out in itertools.pairwise(mc.widths))


def chunk_for(work: int, steps: int) -> int:
    """Fewer steps for bigger steps, so every point takes a similar time.

    Args:
        work: a step's size, ``batch * sum(hidden)``.
        steps: the chunk length at the default size (batch 32, hidden 200).

    Returns:
        ``steps`` scaled by ``32 * 200 / work``, at most ``steps`` and at least 50.
    """
    return int(max(50, min(steps, steps * 32 * 200 // max(work, 1))))


def scaling_study(b: Bench) -> list[Row]:
    """Batch and hidden sweeps (each with the other at the bench's), then float32 vs float64. The hidden
    sweep gives each width to every block of the bench's model (its depth stays).

    Returns:
        One row per point: ``sweep`` (``batch``, ``hidden`` or ``dtype``), ``value`` (the batch, the width of
        every block, or the dtype), ``batch``, ``hidden`` (:func:`~jaxbirds.bench.timing.model_label`),
        ``dtype``, :meth:`Bench.time_chunks`'s columns, ``us_per_example`` and the achieved matmul
        ``gflops_per_s`` (:func:`model_flops` over the time per step).
    """
    rows = []
    tc = b.train_config
    points = [("batch", bs, b.model_config, bs) for bs in b.config.batches]
    depth = b.model_config.depth
    points += [("hidden", width, dataclasses.replace(b.model_config, hidden=(width,) * depth), tc.batch_size)
               for width in b.config.hiddens]  # fmt: skip
    for axis, value, mc, bs in points:
        length = chunk_for(bs * sum(mc.hidden), b.config.steps)
        row = b.time_chunks(mc, dataclasses.replace(tc, batch_size=bs), length, 1)
        rows.append(scaling_row(axis, value, mc, bs, "float32", row))
    with jax.enable_x64(True):
        length = chunk_for(tc.batch_size * sum(b.model_config.hidden), b.config.steps)
        row = b.time_chunks(b.model_config, tc, length, 1, dtype=jnp.float64)
    rows.append(scaling_row("dtype", "float64", b.model_config, tc.batch_size, "float64", row))
    return rows


def scaling_row(axis: str, value, mc: ModelConfig, batch: int, dtype: str, timed: Row) -> Row:
    """One point of :func:`scaling_study`: where it lies, and its timing per step, per example and in GFLOP/s."""
    return {
        "sweep": axis,
        "value": value,
        "batch": batch,
        "hidden": model_label(mc.hidden),
        "dtype": dtype,
        **timed,
        "us_per_example": timed["us_per_step"] / batch,
        "gflops_per_s": model_flops(mc, batch) / (timed["us_per_step"] * 1e3),
    }


def draw(rows: Sequence[Row], path: Path) -> Path:
    """Achieved matmul GFLOP/s against batch (left) and every block's width (right), log2 axes."""
    fig, axes = plots.subplots(1, 2, figsize=(10, 4))
    for ax, axis in zip(axes, ("batch", "hidden"), strict=True):
        line = [r for r in rows if r["sweep"] == axis]
        ax.plot([r["value"] for r in line], [r["gflops_per_s"] for r in line], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch" if axis == "batch" else "hidden width (of every block)")
        ax.set_ylabel("achieved matmul GFLOP/s")
        ax.set_title(f"{axis} sweep")
        ax.grid(alpha=0.3)
    return plots.save_png(fig, path)


STUDY = Study(
    name="scaling",
    title="Scaling (matmul FLOPs counted by the model's formula; the hidden sweep sets every block's width)",
    columns=(
        ("sweep", "sweep", ""),
        ("batch", "batch", ""),
        ("hidden", "hidden", ""),
        ("dtype", "dtype", ""),
        ("us_per_step", "µs/step", ",.1f"),
        ("us_per_example", "µs/example", ".3f"),
        ("steps_per_s", "steps/s", ",.0f"),
        ("gflops_per_s", "GFLOP/s", ".2f"),
    ),
    run=scaling_study,
    figure=Figure("scaling.png", draw),
)
