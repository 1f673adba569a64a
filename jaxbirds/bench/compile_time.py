"""Compile time: seconds to trace, lower and compile the training chunk, per gradient mode and chunk length."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp

from jaxbirds import train
from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench


def compile_study(b: Bench) -> list[Row]:
    """Seconds to lower and compile one training chunk, per gradient mode and chunk length: real
    compiles as ``scripts/bench.py`` runs it (it enables no persistent cache; under one, such as
    the test suite's, the figures are cache loads).

    Returns:
        One row per mode and each of ``compile_chunks``: ``mode``, ``chunk``, ``trace_lower_s``, ``compile_s``.
    """
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


STUDY = Study(
    name="compile",
    title="Compile time of one training chunk (batch 32)",
    columns=(
        ("mode", "mode", ""),
        ("chunk", "steps per chunk", ","),
        ("trace_lower_s", "trace + lower s", ".2f"),
        ("compile_s", "XLA compile s", ".2f"),
    ),
    run=compile_study,
)
