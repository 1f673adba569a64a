"""Memory: what each mode's compiled training step needs, and what reverse mode keeps for the backward pass."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax import ad_checkpoint

from jaxbirds import model, modes, plots, train
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, model_label
from jaxbirds.bench.variants import single_step
from jaxbirds.memory import compiled_bytes

REMAT = "autodiff + jax.checkpoint"  # autodiff of the loss under jax.checkpoint: recompute instead of keep


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


def loss_of(name: str) -> Callable:
    """``(params, X, Y) -> loss`` as reverse mode differentiates it for variant ``name``: the forward pass of a
    gradient mode's rules (:data:`jaxbirds.modes.MODES`), or (:data:`REMAT`) autodiff's under ``jax.checkpoint``."""
    if name == REMAT:
        return jax.checkpoint(functools.partial(model.loss, rules="autodiff"))
    return functools.partial(model.loss, rules=modes.grad_mode(name).rules)


def by_hand(name: str) -> bool:
    """Whether variant ``name`` computes its gradient by hand: no forward/backward split to keep residuals across."""
    return name != REMAT and modes.grad_mode(name).by_hand


def residuals(fn: Callable, *args) -> list[tuple[str, int]]:
    """What reverse mode keeps between forward and backward, read from ``jax.ad_checkpoint.print_saved_residuals``.

    Args:
        fn: the function to differentiate; ``args``: its arguments.

    Returns:
        ``(description, bytes)`` per residual, arguments and literals left out.
    """
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
    temporaries), at ``memory_batches`` x ``memory_hiddens`` (each width given to every block of the bench's
    model); what reverse mode keeps between forward and backward; and the same for autodiff under
    ``jax.checkpoint`` (recompute instead of keep), with its time per step.

    Returns:
        One row per hidden, batch and mode (``mode``, ``batch``, ``hidden`` and :func:`step_memory`'s
        columns); then autodiff's and the checkpointed autodiff's ``us_per_step`` at the bench's model and batch.
    """
    tc = b.train_config
    remat = jax.value_and_grad(loss_of(REMAT))
    variants = {name: mode.loss_and_grads for name, mode in modes.MODES.items()}
    variants[REMAT] = remat
    rows = []
    for width in b.config.memory_hiddens:
        mc = dataclasses.replace(b.model_config, hidden=(width,) * b.model_config.depth)
        params, opt_state, _ = train.init_state(mc, tc)
        hidden = model_label(mc.hidden)
        for batch in b.config.memory_batches:
            X, Y = b.X[:batch], b.Y[:batch]
            for name, fn in variants.items():
                measured = step_memory(name, fn, tc, params, opt_state, X, Y)
                rows.append({"mode": name, "batch": batch, "hidden": hidden, **measured})
    timed = dataclasses.replace(tc, grad_mode="autodiff")
    length = min(b.config.steps, 2_000)
    for name, fn in [("autodiff", None), (REMAT, remat)]:  # time: default model, batch 32
        t = b.time_chunks(b.model_config, timed, length, max(1, b.config.steps // length), loss_and_grads=fn)
        rows.append({"mode": name, "batch": tc.batch_size, "hidden": model_label(b.model_config.hidden),
                     "us_per_step": t["us_per_step"]})  # fmt: skip
    return rows


def step_memory(name: str, fn: Callable, tc: train.TrainConfig, params, opt_state, X, Y) -> Row:
    """The memory of one compiled step of gradient variant ``name`` (``fn``: its ``loss_and_grads``) on ``X, Y``.

    Returns:
        XLA's ``argument_bytes``, ``output_bytes``, ``temp_bytes`` and
        ``peak_bytes``; and, but for the passes by hand (:func:`by_hand`: no forward/backward split to keep
        residuals across), reverse mode's ``residuals``, ``residual_bytes`` and what they are (``kept``).
    """
    compiled = jax.jit(single_step(fn, tc)).lower(params, opt_state, X, Y).compile()
    analysis = compiled.memory_analysis()
    row = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "peak_bytes": compiled_bytes(compiled),
    }
    if not by_hand(name):
        loss_fn = loss_of(name)
        kept = residuals(lambda p: loss_fn(p, X, Y), params)
        what = sorted({w.split(" (")[0].replace("output of ", "") for w, _ in kept})
        row.update(residuals=len(kept), residual_bytes=sum(n for _, n in kept), kept=", ".join(what))
    return row


def draw(rows: Sequence[Row], path: Path) -> Path:
    """Peak bytes per example against batch, one panel per hidden width (in the rows' order), one line per mode."""
    rows = [r for r in rows if "peak_bytes" in r]
    hiddens = list(dict.fromkeys(r["hidden"] for r in rows))
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
        width = f"{hidden:,}" if isinstance(hidden, int) else hidden  # an int in results saved before issue 17
        ax.set_title(f"one compiled training step, hidden {width}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return plots.save_png(fig, path)


STUDY = Study(
    name="memory",
    title="Memory of one compiled training step (XLA's memory analysis) and what reverse mode keeps "
    "(each hidden width given to every block)",
    columns=(
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
    ),
    run=memory_study,
    figure=Figure("memory.png", draw),
)
