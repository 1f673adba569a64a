"""Diagnostics: what recording the per-step diagnostics inside the compiled loop costs a training step.

``TrainConfig.diagnostics_every = k`` makes every ``k``-th step of the scan also compute
:func:`jaxbirds.diagnostics.record` (per-block activation and gradient statistics, the weights'
gradient- and update-to-data ratios, and a snapshot of the step's ``h[l]`` and ``dloss/dh[l]``)
under ``lax.cond``; ``k = 0`` compiles the loop without them. This study times the same chunks
both ways, side by side, for the bench's model and the deeper ones of ``diagnostics_models``.
"""

from __future__ import annotations

import dataclasses

from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, model_label


def diagnostics_study(b: Bench) -> list[Row]:
    """Steps per second of the training chunk with the diagnostics recorded every ``k`` steps, for each ``k``
    of ``diagnostics_every`` (0: off), for the bench's model and each of ``diagnostics_models``, in scan
    chunks of up to 2,000 steps.

    Returns:
        One row per model and ``k``: ``model`` (:func:`~jaxbirds.bench.timing.model_label`), ``depth``,
        ``every`` (``"off"`` or ``k``), :meth:`Bench.time_chunks`'s columns and ``ratio_to_off``, its time
        per step over the same model's without diagnostics, measured in this run.
    """
    length = min(b.config.steps, 2_000)
    calls = max(1, b.config.steps // length)
    every = sorted(set(b.config.diagnostics_every) | {0}, key=lambda k: (k != 0, -k))  # off first, then sparse to dense
    rows = []
    for hidden in dict.fromkeys((b.model_config.hidden, *b.config.diagnostics_models)):
        mc = dataclasses.replace(b.model_config, hidden=hidden)
        mine = []
        for k in every:
            tc = dataclasses.replace(b.train_config, diagnostics_every=k)
            timed = b.time_chunks(mc, tc, length, calls)
            mine.append({"model": model_label(hidden), "depth": mc.depth, "every": k or "off", **timed})
        off = mine[0]["us_per_step"]
        rows += [{**row, "ratio_to_off": row["us_per_step"] / off} for row in mine]
    return rows


STUDY = Study(
    name="diagnostics",
    title="Per-step diagnostics recorded inside the compiled loop, on and off (scan chunks, batch 32)",
    columns=(
        ("model", "hidden", ""),
        ("every", "diagnostics every", ","),
        ("steps_per_s", "steps/s (median)", ",.0f"),
        ("spread_steps_per_s", "min–max", ",.0f"),
        ("us_per_step", "µs/step", ".1f"),
        ("ratio_to_off", "× off (time/step)", ".3f"),
        ("compile_s", "compile s", ".2f"),
    ),
    run=diagnostics_study,
)
