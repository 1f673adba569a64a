"""The diagnostics figure (``diagnostics.png``): the four pictures of the series' part 3, from a training run's records.

(a) each block's activation histogram ``h[l]`` at the last recorded step, its saturation share
(``|h| > 0.97``) in the legend; (b) each block's gradient histogram ``dloss/dh[l]`` at that step;
(c) each weight matrix's gradient-to-data ratio ``std(dloss/dW) / std(W)`` over the recorded steps;
(d) each weight matrix's update-to-data ratio ``log10(std(ΔW) / std(W))`` over the recorded steps,
with the series' guide at -3. The numbers are :mod:`jaxbirds.diagnostics`'; this module only draws
them, with :mod:`jaxbirds.plots`' figures (no pyplot, so it may run on a thread of its own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxbirds import diagnostics, plots
from jaxbirds.diagnostics import Recorded


def figure(recorded: Recorded, path: Path, title: str = "training diagnostics") -> Path:
    """Draw the four panels of ``recorded`` (at least one recorded step) into the PNG ``path``; returns ``path``."""
    fig, axes = plots.subplots(2, 2, figsize=(15, 9.5))
    records, snapshot = recorded.records, recorded.snapshot
    if snapshot is not None:
        _activations(axes[0, 0], snapshot)
        _gradients(axes[0, 1], snapshot)
    _grad_to_data(axes[1, 0], records)
    _update_to_data(axes[1, 1], records)
    fig.suptitle(title)
    return plots.save_png(fig, path)


def _block_label(layer: int) -> str:
    return f"block {layer} (tanh)"


def _activations(ax, snapshot: diagnostics.Snapshot) -> None:
    for layer, h in enumerate(snapshot.h, start=1):
        centres, density = diagnostics.histogram(h, -1.0, 1.0)
        share = float(diagnostics.saturation_share(np.asarray(h)))
        ax.plot(centres, density, label=f"{_block_label(layer)}: mean {np.mean(h):+.2f}, std {np.std(h):.2f}, "
                f"saturated {share:.1%}")  # fmt: skip
    ax.set_xlabel("h[l] = tanh(...)")
    ax.set_ylabel("density")
    ax.set_title(
        f"(a) activation distribution at step {int(snapshot.step):,} (saturated: |h| > {diagnostics.SATURATION})"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _gradients(ax, snapshot: diagnostics.Snapshot) -> None:
    reach = diagnostics.gradient_range(snapshot.dh)
    for layer, dh in enumerate(snapshot.dh, start=1):
        centres, density = diagnostics.histogram(dh, -reach, reach)
        ax.plot(centres, density, label=f"{_block_label(layer)}: mean {np.mean(dh):+.2e}, std {np.std(dh):.2e}")
    ax.set_xlabel("dloss/dh[l]")
    ax.set_ylabel("density")
    ax.set_title(f"(b) gradient distribution at step {int(snapshot.step):,}")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _per_weight(ax, records: diagnostics.Record, values: np.ndarray, fmt: str) -> None:
    steps = np.asarray(records.step)
    marker = "o" if len(steps) < 30 else None
    for i, name in enumerate(diagnostics.weight_names(values.shape[1] - 1)):
        shape = "output layer" if i == values.shape[1] - 1 else f"block {i + 1}"
        ax.plot(steps, values[:, i], marker=marker, markersize=3, label=f"{name} ({shape}): last {values[-1, i]:{fmt}}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _grad_to_data(ax, records: diagnostics.Record) -> None:
    _per_weight(ax, records, np.asarray(records.grad_to_data), ".2e")
    ax.set_yscale("log")
    ax.set_ylabel("std(dloss/dW) / std(W)")
    ax.set_title("(c) gradient-to-data ratio of each weight matrix")


def _update_to_data(ax, records: diagnostics.Record) -> None:
    _per_weight(ax, records, np.asarray(records.update_to_data), ".2f")
    ax.axhline(diagnostics.UPDATE_RATIO_GUIDE, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel("log10(std(update) / std(W))")
    ax.set_title(f"(d) update-to-data ratio (dashed: {diagnostics.UPDATE_RATIO_GUIDE:g}, the rule of thumb)")
