"""Gradient modes: the time per step of each way to compute the gradient, same shapes, same run."""

from __future__ import annotations

import dataclasses

from jaxbirds import modes
from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench


def modes_study(b: Bench) -> list[Row]:
    """Time per step of each gradient mode (:data:`jaxbirds.modes.MODES`, autodiff first) in scan chunks of
    up to 2,000 steps.

    Returns:
        One row per mode: ``mode`` (its name), :meth:`Bench.time_chunks`'s columns and ``ratio_to_autodiff``,
        its time per step over autodiff's.
    """
    rows = []
    length = min(b.config.steps, 2_000)
    calls = max(1, b.config.steps // length)
    for name in modes.MODES:
        tc = dataclasses.replace(b.train_config, grad_mode=name)
        rows.append({"mode": name, **b.time_chunks(b.model_config, tc, length, calls)})
    base = next(row["us_per_step"] for row in rows if row["mode"] == "autodiff")
    for row in rows:
        row["ratio_to_autodiff"] = row["us_per_step"] / base
    return rows


STUDY = Study(
    name="modes",
    title="Gradient modes (scan chunks, batch 32): jax.grad three ways, and by hand fused (manual) and atomic",
    columns=(
        ("mode", "mode", ""),
        ("us_per_step", "µs/step", ".1f"),
        ("steps_per_s", "steps/s", ",.0f"),
        ("spread_steps_per_s", "min–max", ",.0f"),
        ("ratio_to_autodiff", "× autodiff", ".3f"),
        ("compile_s", "compile s", ".2f"),
    ),
    run=modes_study,
)
