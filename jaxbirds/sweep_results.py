"""A sweep's results: every model evaluated as a solo run would be, a summary per learning rate, the best run.

:func:`evaluate_members` calibrates batch norm and evaluates every split for each model of a sweep
(:func:`jaxbirds.sweep.train_models`); :func:`summary_by_rate` and :func:`best_run` read the runs
that :mod:`jaxbirds.sweep_runner` makes of them: dicts with ``learning_rate``, ``seed``, ``loss`` (by
split: a number, or None) and ``diverged_at`` (a step, or None); :func:`run_table` and
:func:`summary_table` print them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxbirds import evaluate, model
from jaxbirds.sweep import member


class Evaluation(NamedTuple):
    """One model evaluated as a solo run is."""

    stats: model.ModelStats  # one BatchNormStats per block, calibrated on the training split
    loss: dict[str, float | None]  # the mean cross-entropy of each split, by name


def evaluate_member(params: model.Params, splits: dict) -> Evaluation:
    """Batch norm calibrated on the training split, then every split's loss (as a solo run reports).

    Args:
      params: one model's parameters.
      splits: the data's splits by name (``Dataset.splits``); ``"train"`` calibrates.

    Returns:
      The statistics and every split's loss.
    """
    stats = evaluate.calibrate(params, splits["train"].X)
    return Evaluation(stats, {name: evaluate.split_loss(params, stats, s.X, s.Y) for name, s in splits.items()})


def evaluate_members(
    params: model.Params,
    splits: dict,
    progress: Callable[[str], evaluate.Progress] | None = None,
    should_stop: Callable[[], bool] | None = None,
    together: bool = False,
) -> list[Evaluation]:
    """:func:`evaluate_member` of every model of stacked ``params`` (K, ...).

    One model after another by default. ``together`` evaluates all K in one program per batch (``vmap``
    over the stacked parameters, one pass over the data): the same numbers to rounding, but on this
    project's 2-core CPUs 4-5x slower than one after another (16 default models: 7.1-7.6 s against
    1.4-1.8 s, measured 2026-12-01), the vmapped gathers being the cost; it is kept for accelerators,
    where it has not been measured.

    Args:
      params: the models' parameters, each leaf stacked on a leading models axis (K, ...).
      splits: the data's splits by name (``Dataset.splits``); ``"train"`` calibrates.
      progress: ``progress(label)`` makes the progress callback of each phase (see
        :func:`jaxbirds.runner.progress_line`); None: no progress.
      should_stop: polled between batches; None: never stops.
      together: all K models in one program per batch, rather than one model after another.

    Returns:
      The K models' evaluations, in order.

    Raises:
      jaxbirds.evaluate.Stopped: ``should_stop`` returned True.
    """
    progress_of = progress or (lambda label: None)
    count = params["W1"].shape[0]
    if not together:
        return [
            Evaluation(
                *_evaluate(
                    member(params, k),
                    splits,
                    _prefixed(progress_of, f"model {k + 1} of {count}: "),
                    should_stop,
                    models=False,
                )
            )  # fmt: skip
            for k in range(count)
        ]
    stats, losses = _evaluate(params, splits, progress_of, should_stop, models=True)
    return [
        Evaluation(member(stats, k), {name: None if loss is None else loss[k] for name, loss in losses.items()})
        for k in range(count)
    ]


def _prefixed(progress_of: Callable[[str], evaluate.Progress], prefix: str) -> Callable[[str], evaluate.Progress]:
    return lambda label: progress_of(prefix + label)


def _evaluate(params, splits, progress_of, should_stop, models: bool) -> tuple[model.ModelStats, dict]:
    """Calibrated statistics (one per block; stacked, (K, 1, H_l), for ``models``) and every split's loss
    (lists of K of them for stacked ``models``)."""
    stats = evaluate.calibrate(
        params, splits["train"].X, models=models, progress=progress_of("calibrating batch norm"),
        should_stop=should_stop,
    )  # fmt: skip
    losses = {
        name: evaluate.split_loss(
            params, stats, s.X, s.Y, models=models, progress=progress_of(f"evaluating the {name} split"),
            should_stop=should_stop,
        )
        for name, s in splits.items()
    }  # fmt: skip
    return stats, losses


def _is_finite(loss: float | None) -> bool:
    return loss is not None and math.isfinite(loss)


def _finished(run: dict) -> bool:
    """A run that did not diverge and has a finite dev loss."""
    return run["diverged_at"] is None and _is_finite(run["loss"]["dev"])


def summary_by_rate(runs: Sequence[dict]) -> list[dict]:
    """Per learning rate: the dev loss's mean and standard deviation over the seeds that did not
    diverge (sample standard deviation; 0 for a single seed), and how many diverged.

    Args:
      runs: the runs (see the module's docstring).

    Returns:
      A row per learning rate, in the order of their first run: ``learning_rate``, ``seeds``, ``diverged``,
      ``dev_mean`` and ``dev_std`` (None when no seed has a finite dev loss).
    """
    rows = []
    for lr in dict.fromkeys(run["learning_rate"] for run in runs):
        same = [run for run in runs if run["learning_rate"] == lr]
        dev = [run["loss"]["dev"] for run in same if _finished(run)]
        rows.append({
            "learning_rate": lr,
            "seeds": len(same),
            "diverged": sum(run["diverged_at"] is not None for run in same),
            "dev_mean": float(np.mean(dev)) if dev else None,
            "dev_std": float(np.std(dev, ddof=1)) if len(dev) > 1 else (0.0 if dev else None),
        })  # fmt: skip
    return rows


def best_run(runs: Sequence[dict]) -> int | None:
    """The best run: the lowest dev loss among those that did not diverge, or the lowest train loss
    when there is no dev split.

    Args:
      runs: the runs (see the module's docstring).

    Returns:
      Its index in ``runs``; None if every run diverged (or none has a finite loss).
    """
    trained = [i for i, run in enumerate(runs) if run["diverged_at"] is None]
    for split in ("dev", "train"):
        scored = [i for i in trained if _is_finite(runs[i]["loss"].get(split))]
        if scored:
            return min(scored, key=lambda i: runs[i]["loss"][split])
    return None


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_table(runs: Sequence[dict], best: int | None) -> list[str]:
    """The table of runs, in Markdown.

    Args:
      runs: per model, its learning rate, seed, loss by split and divergence step (see the module's docstring).
      best: the index of the best run (marked with ``*``), or None.

    Returns:
      Its lines: a blank one, the header, a line per run.
    """
    lines = ["", "| lr | seed | train | dev | test | |", "|---|---|---|---|---|---|"]
    for i, entry in enumerate(runs):
        loss = entry["loss"]
        note = (
            "best *"
            if i == best
            else (f"diverged at step {entry['diverged_at']:,}" if entry["diverged_at"] is not None else "")
        )
        lines.append(f"| {entry['learning_rate']:g} | {entry['seed']} | {_loss(loss['train'])} | "
                     f"{_loss(loss['dev'])} | {_loss(loss['test'])} | {note} |")  # fmt: skip
    return lines


def summary_table(summary: Sequence[dict], runs: Sequence[dict], best: int | None) -> list[str]:
    """The table of dev loss per learning rate, mean ± standard deviation over the seeds that did not diverge.

    Args:
      summary: the rows of :func:`jaxbirds.sweep_results.summary_by_rate`.
      runs: the runs they summarise; ``best`` the index of the best one (its learning rate is marked), or None.

    Returns:
      Its lines, in Markdown: a blank one, the header, a line per learning rate.
    """
    best_lr = runs[best]["learning_rate"] if best is not None else None
    lines = ["", "| lr | dev loss, mean ± std over seeds | seeds | diverged | |", "|---|---|---|---|---|"]
    for row in summary:
        mean = "-" if row["dev_mean"] is None else f"{row['dev_mean']:.4f} ± {row['dev_std']:.4f}"
        mark = "holds the best run *" if row["learning_rate"] == best_lr else ""
        lines.append(f"| {row['learning_rate']:g} | {mean} | {row['seeds']} | {row['diverged']} | {mark} |")
    return lines
