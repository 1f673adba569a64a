"""What XLA compiled: FLOPs, bytes and kernels of one training step per gradient mode."""

from __future__ import annotations

import re

import jax

from jaxbirds import modes as grad_modes
from jaxbirds import train
from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench
from jaxbirds.bench.variants import single_step


def hlo_summary(compiled) -> dict:
    """Counts in the optimised HLO: instructions of the entry computation (each one a kernel/thunk
    launched per step, on CPU), how many of those are fusions, and how many compute a matrix
    product (a ``dot`` instruction, or a fusion whose fused computation contains one; a fusion of
    XNNPACK/YNNPACK kind may hold a reduction instead, and is not counted then).

    Args:
        compiled: a ``jax.stages.Compiled``.

    Returns:
        ``{"kernels": int, "fusions": int, "dots": int}``.
    """
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
    """XLA's cost analysis of a compiled program.

    Returns:
        ``{"flops": float, "bytes": float}`` (bytes accessed); NaN where the analysis has no figure.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return {
        "flops": float(analysis.get("flops", float("nan"))),
        "bytes": float(analysis.get("bytes accessed", float("nan"))),
    }


def xla_study(b: Bench, modes: list[Row] | None = None) -> list[Row]:
    """Per mode: FLOPs and bytes of one step (XLA's cost analysis), kernels after fusion, GFLOP/s.

    Args:
        b: the bench; one step of its recipe on its first batch is compiled per mode.
        modes: the gradient-mode study's rows, whose time per step gives the achieved GFLOP/s.

    Returns:
        One row per gradient mode (:data:`jaxbirds.modes.MODES`): ``mode``, :func:`cost`'s and
        :func:`hlo_summary`'s columns, and ``us_per_step`` and ``gflops_per_s`` for the modes that ``modes`` timed.
    """
    mc, tc = b.model_config, b.train_config
    params, opt_state, _ = train.init_state(mc, tc)
    Xb, Yb = b.X[: tc.batch_size], b.Y[: tc.batch_size]
    timed = {row["mode"]: row["us_per_step"] for row in modes or []}
    rows = []
    for name, mode in grad_modes.MODES.items():
        compiled = jax.jit(single_step(mode.loss_and_grads, tc)).lower(params, opt_state, Xb, Yb).compile()
        row = {"mode": name, **cost(compiled), **hlo_summary(compiled)}
        if name in timed:
            row["us_per_step"] = timed[name]
            row["gflops_per_s"] = row["flops"] / (timed[name] * 1e3)
        rows.append(row)
    return rows


STUDY = Study(
    name="xla",
    title="What XLA compiled, per training step (one step, outside scan)",
    columns=(
        ("mode", "mode", ""),
        ("flops", "FLOPs", ",.0f"),
        ("bytes", "bytes accessed", ",.0f"),
        ("kernels", "kernels (thunks)", ""),
        ("fusions", "of which fusions", ""),
        ("dots", "dots", ""),
        ("gflops_per_s", "achieved GFLOP/s", ".2f"),
    ),
    run=xla_study,
    needs=("modes",),
)
