"""Figures. matplotlib is an optional extra (``pip install -e ".[plots]"``), imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError('plots need matplotlib: pip install -e ".[plots]" (or pass --no-plot)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dlogits_heatmap(dlogits: np.ndarray, labels: np.ndarray, chars: Sequence[str], path: Path) -> Path:
    """The tutorial's picture of ``dlogits``: one row per example, one column per character.

    Each row is ``(softmax - onehot) / n``: positive everywhere except the dark
    target cell, which is ``(p - 1)/n``. Targets are ringed so they stand out.
    """
    plt = _pyplot()
    n, v = dlogits.shape
    fig, ax = plt.subplots(figsize=(0.28 * v + 2, 0.2 * n + 1.5))
    lim = float(np.abs(dlogits).max())
    image = ax.imshow(dlogits, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.scatter(labels, np.arange(n), s=30, facecolors="none", edgecolors="black", linewidths=0.8, label="target")
    ax.set_xticks(range(v), labels=list(chars))
    ax.set_xlabel("next character")
    ax.set_ylabel("example in the batch")
    ax.set_title("dloss/dlogits = (softmax - onehot(target)) / n")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.12), fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def relative_error_bars(tables: dict[str, Sequence], path: Path, floor: float) -> Path:
    """Max relative difference per tensor, one panel per table, on a log scale.

    Bitwise-exact tensors (difference 0) are drawn as short green bars at
    ``floor`` and labelled "exact"; tensors whose reference has zeros where the
    difference is not zero (relative difference infinite: b1, logit_maxes) are
    labelled "ref = 0" instead of a bar.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 3.2 * len(tables)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], tables.items()):
        finite = [r.max_rel for r in rows if np.isfinite(r.max_rel) and r.max_rel > 0]
        top = max(finite, default=floor * 10) * 10
        for i, r in enumerate(rows):
            color = "tab:green" if r.exact else ("tab:blue" if r.close else "tab:red")
            if r.exact:
                ax.bar(i, floor, color=color)
                ax.text(i, floor * 1.3, "exact", rotation=90, ha="center", va="bottom", fontsize=7)
            elif np.isfinite(r.max_rel):
                ax.bar(i, r.max_rel, color=color)
            else:
                ax.text(i, floor * 1.3, "ref = 0", rotation=90, ha="center", va="bottom", fontsize=7, color=color)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, top)
        ax.set_xticks(range(len(rows)), labels=[r.name for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("max relative diff")
        ax.set_title(f"{title}\n(green: bitwise exact, blue: close, red: outside tolerance)", fontsize=10)
    return _save(fig, path)


def loss_curve(losses: np.ndarray, path: Path, window: int = 1000, title: str = "training loss") -> Path:
    """log10 of the training loss, averaged over consecutive windows of ``window`` steps."""
    plt = _pyplot()
    log_loss = np.log10(np.asarray(losses, dtype=np.float64))
    usable = len(log_loss) // window * window
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if usable:
        means = log_loss[:usable].reshape(-1, window).mean(axis=1)
        ax.plot(np.arange(len(means)) * window + window / 2, means)
        ax.set_xlabel(f"step (mean over windows of {window:,})")
    else:
        ax.plot(log_loss)
        ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
