"""Accuracy: float32 gradients of every mode against a float64 reference, and how far whole runs drift."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import model, modes, plots, train
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench


def accuracy_tensors(params: model.Params) -> tuple[str, ...]:
    """The parameters whose gradient errors are compared, at any depth: ``C``, each block's ``Wl``, ``bngainl``
    and ``bnbiasl``, the output layer's ``W{L+1}`` and ``b{L+1}``. The blocks' biases ``b1 .. bL`` are left
    out: their exact gradient is zero (batch norm removes any shift of ``hprebn[l]``), a relative error
    means nothing there."""
    blocks = [model.block_param_names(layer) for layer in range(1, model.depth_of(params) + 1)]
    return ("C", *(name for W, _, gain, bias in blocks for name in (W, gain, bias)), *model.output_param_names(params))


def _grads_only(loss_and_grads: Callable) -> Callable:
    return lambda params, X, Y: loss_and_grads(params, X, Y)[1]


def gradient_functions() -> dict[str, Callable]:
    """``(params, X, Y) -> grads`` for every gradient mode of :data:`jaxbirds.modes.MODES`, by name."""
    return {name: _grads_only(mode.loss_and_grads) for name, mode in modes.MODES.items()}


def gradient_errors(grad_fns: dict[str, Callable], params, batches) -> dict[str, dict[str, np.ndarray]]:
    """Relative error of each float32 gradient, per tensor and batch: ``|g32 - g64| / |g64|`` (2-norms),
    against ``jax.grad`` of the plain model in float64 at the same parameters and batch.

    Args:
        grad_fns: ``{method: (params, X, Y) -> grads}``.
        params: float32; the reference sees them exactly (float64 holds every float32).
        batches: ``[(X, Y), ...]``.

    Returns:
        ``{method: {tensor: errors over batches, shape (len(batches),)}}``, for the :func:`accuracy_tensors`.
    """
    reference = jax.jit(jax.grad(model.loss))
    compiled = {name: jax.jit(fn) for name, fn in grad_fns.items()}
    tensors = accuracy_tensors(params)
    errors = {name: {t: [] for t in tensors} for name in grad_fns}
    for X, Y in batches:
        with jax.enable_x64(True):
            ref = jax.device_get(reference(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params), X, Y))
        for name, fn in compiled.items():
            with jax.default_matmul_precision("highest"):
                got = jax.device_get(fn(params, X, Y))
            for t in tensors:
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

    Returns:
        :func:`gradient_rows` for every point, then :func:`drift_rows`.
    """
    rng = np.random.default_rng(0)

    def batches(size):
        rows = [rng.integers(0, len(b.Y), size) for _ in range(b.config.accuracy_repeats)]
        return [(b.X[r], b.Y[r]) for r in rows]

    fns = gradient_functions()
    rows = []
    for label, steps, size, params in accuracy_points(b):
        rows += gradient_rows(label, steps, size, gradient_errors(fns, params, batches(size)))
    return rows + drift_rows(b)


def accuracy_points(b: Bench) -> list[tuple[str, int, int, dict]]:
    """Where gradients are compared: ``(label, steps trained, batch size, float32 params)``, batch 32 at
    each of ``accuracy_checkpoints`` (trained by autodiff), then every other batch size at initialisation."""
    mc, tc, cfg = b.model_config, b.train_config, b.config
    points = []
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
    return points


def gradient_rows(label: str, steps: int, size: int, errors: dict[str, dict[str, np.ndarray]]) -> list[Row]:
    """One row per method of :func:`gradient_errors`' result: the median and largest error over tensors and
    batches, and each tensor's median (``median_<tensor>``)."""
    rows = []
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
        rows.append(row)
    return rows


def drift_rows(b: Bench) -> list[Row]:
    """``drift_steps`` of training in every gradient mode from the same start, one row each: the largest gap
    between its loss and autodiff's (means over windows of 100 steps), and its last window's loss."""
    mc, tc, n = b.model_config, b.train_config, b.config.drift_steps
    drift = {}
    for mode in train.GRAD_MODES:
        config = dataclasses.replace(tc, steps=n, grad_mode=mode)
        drift[mode] = train.train(b.X, b.Y, config, train.init_state(mc, config)).losses
    windows = {m: v[: len(v) // 100 * 100].reshape(-1, 100).mean(axis=1) for m, v in drift.items()}
    return [
        {"point": f"run of {n:,} steps", "steps": n, "batch": 32, "mode": mode,
         "max_window_loss_gap": float(np.abs(windows[mode] - windows["autodiff"]).max()),
         "final_window_loss": float(windows[mode][-1])}
        for mode in train.GRAD_MODES
    ]  # fmt: skip


def draw(rows: Sequence[Row], path: Path) -> Path | None:
    """The median relative error of each mode at each point, grouped bars on a log scale (no figure
    without gradient rows)."""
    compared = [r for r in rows if "median_rel_error" in r]
    if not compared:
        return None
    points = list(dict.fromkeys((r["point"], r["batch"]) for r in compared))
    modes = list(dict.fromkeys(r["mode"] for r in compared))
    fig, ax = plots.subplots(figsize=(9, 4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        values = [next(r["median_rel_error"] for r in compared if (r["point"], r["batch"]) == p and
                       r["mode"] == mode) for p in points]  # fmt: skip
        ax.bar(np.arange(len(points)) + j * width, values, width, label=mode)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(points)) + 0.4 - width / 2, [f"{p} (batch {n:,})" for p, n in points], fontsize=8)
    ax.set_ylabel("median relative error vs float64")
    ax.set_title("float32 gradient error per mode (median over tensors and batches)")
    ax.legend(fontsize=7)
    return plots.save_png(fig, path)


STUDY = Study(
    name="accuracy",
    title="float32 gradients against float64 (relative 2-norm error per tensor, the blocks' biases left out; "
    "and whole runs)",
    columns=(
        ("point", "point", ""),
        ("batch", "batch", ","),
        ("mode", "mode", ""),
        ("median_rel_error", "median rel. error", ".2e"),
        ("max_rel_error", "max rel. error", ".2e"),
        ("median_C", "C", ".1e"),
        ("median_W1", "W1", ".1e"),
        ("median_bngain1", "bngain1", ".1e"),
        ("median_W2", "W2", ".1e"),
        ("max_window_loss_gap", "max gap to autodiff (loss)", ".1e"),
        ("final_window_loss", "final loss", ".4f"),
    ),
    run=accuracy_study,
    figure=Figure("accuracy.png", draw),
    renamed=(("median_bngain", "median_bngain1"),),  # results saved before issue 17 named it without its block
)
