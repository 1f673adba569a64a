"""Figures. matplotlib is an optional extra (``pip install -e ".[plots]"``), imported lazily.

Every figure is drawn on matplotlib's object-oriented API (:func:`_figure`) and
never through pyplot: the library chooses no backend and leaves no global state,
so a notebook or program that draws figures of its own keeps its backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxbirds.errors import ConfigError

MISSING = 'plots need matplotlib: pip install -e ".[plots]" (or pass --no-plot)'


def require() -> None:
    """Raise :class:`ConfigError` now, before any work, if figures cannot be drawn (without paying
    for matplotlib's import yet: that happens when the first figure is drawn)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(MISSING)


def preload() -> None:
    """Import matplotlib and draw one throwaway figure, so the first real figure is drawn at once.

    Half a second of Python work: the training run does it on a thread of its
    own while the device trains (XLA releases the interpreter lock), instead of
    after training, where it would compete with the evaluation.
    """
    import io

    fig, ax = subplots(figsize=(2, 2))
    ax.plot([0, 1])
    ax.set_title("warm-up")
    fig.savefig(io.BytesIO(), format="png")


def subplots(*grid, figsize, **kwargs):
    """``pyplot.subplots`` without pyplot: a :func:`_figure` and its axes (``Figure.subplots(*grid, **kwargs)``).

    Returns:
        ``(figure, axes)``: one ``Axes``, or an array of them as ``Figure.subplots`` returns.
    """
    fig = _figure(figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _figure(figsize):
    """A figure of matplotlib's object-oriented API, outside pyplot's global state.

    No backend is chosen and no pyplot state is touched: ``savefig`` picks the
    PNG canvas for this one figure, so a notebook's own ``plt.show()`` still
    works after the library has drawn, and drawing is safe on a thread of its
    own (the training run draws its loss curve while it evaluates). Nothing to
    close either: the figure is garbage once its caller drops it.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(MISSING) from None
    return Figure(figsize=figsize)


def dlogits_heatmap(dlogits: np.ndarray, labels: np.ndarray, chars: Sequence[str], path: Path) -> Path:
    """The tutorial's picture of ``dlogits``: one row per example, one column per character.

    Each row is ``(softmax - onehot) / n``: positive everywhere except the dark
    target cell, which is ``(p - 1)/n``. Targets are ringed so they stand out.
    """
    n, v = dlogits.shape
    fig, ax = subplots(figsize=(0.28 * v + 2, 0.2 * n + 1.5))
    lim = float(np.abs(dlogits).max())
    image = ax.imshow(dlogits, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.scatter(labels, np.arange(n), s=30, facecolors="none", edgecolors="black", linewidths=0.8, label="target")
    ax.set_xticks(range(v), labels=list(chars))
    ax.set_xlabel("next character")
    ax.set_ylabel("example in the batch")
    ax.set_title("dloss/dlogits = (softmax - onehot(target)) / n")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.12), fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return save_png(fig, path)


def tolerance_bars(tables: dict[str, Sequence], path: Path) -> Path:
    """Each tensor's largest difference as a share of what its tolerance allows, one panel per table.

    A bar below the line at 1 passes. Bitwise-exact tensors (difference 0) get
    no bar and the label "exact". The log scale shows how much room is left:
    a bar at 1e-2 would pass a hundred times the difference it has.
    """
    fig, axes = subplots(len(tables), 1, figsize=(10, 3.2 * len(tables)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], tables.items(), strict=True):
        shares = [r.max_abs / r.allowed if r.allowed > 0 else np.inf for r in rows]
        shown = [x for x in shares if 0 < x < np.inf]
        low = min(min(shown, default=1e-3) / 3, 1e-3)
        for i, (r, share) in enumerate(zip(rows, shares, strict=True)):
            if r.exact:
                ax.text(i, low * 1.5, "exact", rotation=90, ha="center", va="bottom", fontsize=7, color="tab:green")
            else:
                ax.bar(i, min(share, 1e3), color="tab:blue" if r.close else "tab:red")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylim(low, max(10.0, max(shown, default=1.0) * 3))
        ax.set_xticks(range(len(rows)), labels=[r.name for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("max diff / allowed")
        ax.set_title(f"{title}\n(below the dashed line: within tolerance; red: outside)", fontsize=10)
    return save_png(fig, path)


def loss_curve(losses: np.ndarray, path: Path, window: int = 1000, title: str = "training loss") -> Path:
    """log10 of the training loss, averaged over consecutive windows of ``window`` steps.

    May run on a background thread: no pyplot (see :func:`_figure`).
    """
    fig, ax = subplots(figsize=(8, 4.5))
    if len(losses) >= window:
        ax.plot(*_window_means(losses, window))
        ax.set_xlabel(f"step (mean over windows of {window:,})")
    else:
        ax.plot(np.log10(np.asarray(losses, dtype=np.float64)))
        ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def window_for(steps: int, window: int) -> int:
    """``window``, or for a history of fewer than ten windows a window a tenth of it (at least one step),
    so that every curve has points to draw."""
    return max(1, min(window, steps // 10))


def _window_means(losses: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The window centres and the mean of log10(loss) over each whole window of ``window`` steps."""
    log_loss = np.log10(np.asarray(losses, dtype=np.float64))
    means = log_loss[: len(log_loss) // window * window].reshape(-1, window).mean(axis=1)
    return np.arange(len(means)) * window + window / 2, means


def save_png(fig, path: Path) -> Path:
    """Save a figure of the object-oriented API (see :func:`_figure`) as a PNG at ``path``, creating its directory.

    Returns:
        ``path``, as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def sweep_figure(summary: Sequence[dict], runs: Sequence[dict], losses: np.ndarray, path: Path,
                 window: int = 1000) -> Path:  # fmt: skip
    """A sweep at a glance. Left: the dev loss against the learning rate (log scale), each seed a
    dot, the mean over seeds with ± one standard deviation; diverged runs are left out. Right: every
    model's training loss (log10, averaged over windows of ``window`` steps), coloured by rate."""
    fig, (left, right) = subplots(1, 2, figsize=(12, 4.5))
    rates = [row["learning_rate"] for row in summary]
    colours = {lr: f"C{i % 10}" for i, lr in enumerate(rates)}
    for run in runs:
        if run["diverged_at"] is None and run["loss"]["dev"] is not None:
            left.scatter(run["learning_rate"], run["loss"]["dev"], s=12, color=colours[run["learning_rate"]], alpha=0.6)
    kept = [row for row in summary if row["dev_mean"] is not None]
    x, y, spread = ([r[key] for r in kept] for key in ("learning_rate", "dev_mean", "dev_std"))
    left.errorbar(x, y, yerr=spread, color="black", marker="o", capsize=4, label="mean ± std")
    left.set_xscale("log")
    left.set_xticks(rates, labels=[f"{lr:g}" for lr in rates])
    left.minorticks_off()
    left.set_xlabel("learning rate")
    left.set_ylabel("dev loss (calibrated batch norm)")
    left.set_title("dev loss by learning rate, over seeds")
    left.legend()
    left.grid(alpha=0.3)
    window = window_for(np.shape(losses)[-1], window)  # a short sweep gets shorter windows, not an empty panel
    for run, history in zip(runs, losses, strict=True):
        finite = history[np.isfinite(history)]  # a diverged model's curve ends where it diverged
        if len(finite) >= window:
            right.plot(*_window_means(finite, window), color=colours[run["learning_rate"]], alpha=0.5, linewidth=0.8)
    for lr in rates:
        right.plot([], [], color=colours[lr], label=f"lr {lr:g}")
    right.set_xlabel(f"step (mean over windows of {window:,})" if window > 1 else "step")
    right.set_ylabel("log10(training loss)")
    right.set_title("training loss of every model")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return save_png(fig, path)
