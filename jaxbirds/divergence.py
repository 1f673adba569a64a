"""What counts as a diverged model: one definition for ``scripts/train.py``, ``scripts/sweep.py`` and sampling.

A model has diverged when its numbers stopped being numbers, at either of the two
places where they are computed:

* **in training**: a step's loss is not finite (``inf`` or ``nan``).
  :func:`jaxbirds.train.train` and :func:`jaxbirds.sweep.train_models` stop a
  model at its first such step (:func:`first_bad_step`);
* **in evaluation**: training kept finite losses, but the trained parameters are
  so large that batch norm's statistics over the whole training split, or the
  loss of a split, overflow, or the loss has *exploded*: it is finite but
  beyond :data:`EXPLODED_LOSS` (:func:`evaluation_problem`). A learning rate
  of 1e9 does this: the minibatch losses reach ~1e11 and stay finite, the
  variance of ``hprebn`` over 172,427 rows does not (at hidden 16 it does,
  and the split losses are ~4e9). Such a model is no result: it is reported
  as diverged, never printed as a loss or as ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def first_bad_step(losses: np.ndarray) -> int | None:
    """Index of the first loss in ``losses`` that is not finite, or None if all are."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses)))
    return int(bad[0]) if bad.size else None


def statistics_problem(stats) -> str | None:
    """Why calibrated batch-norm statistics are no result, or None when they are finite.

    Args:
      stats: a ``ModelStats``: one ``BatchNormStats`` per block, first to last, each the mean and the
        unbiased variance of the block's ``hprebn``, (1, H_l).

    Returns:
      None, or a sentence for the user naming the statistic, its block and how many of the block's H_l
      units are not finite (the first such statistic, blocks first to last, the mean before the variance).
    """
    for layer, block in enumerate(stats, start=1):
        for name, values in (("mean", block.mean), ("variance", block.var)):
            values = np.asarray(values)
            bad = int(values.size - np.isfinite(values).sum())
            if bad:
                return (
                    f"batch norm's {name} over the training split is not finite in {bad} of {values.size} units "
                    f"of block {layer}"
                )
    return None


#: A mean loss above this has exploded: ``-log(p) > 87.3`` means the average target character has a
#: probability below float32's smallest normal number (``exp(-87.3) = 1.2e-38``), less than any a float32
#: softmax can represent. A uniform guess scores ``log(29) = 3.37``; even the tutorial's badly scaled
#: initialisation scores ~27. Only parameters blown up by too large a learning rate go past it.
EXPLODED_LOSS = -math.log(float(np.finfo(np.float32).tiny))


def loss_problem(split_losses: Mapping[str, float | None]) -> str | None:
    """Why a model's split losses are no result, or None when every one is a finite loss below
    :data:`EXPLODED_LOSS`.

    Args:
      split_losses: the mean loss of each split; None stands for an empty split (it has no loss, and
        that is not a divergence).

    Returns:
      None, or a sentence for the user naming the splits whose loss is not finite or has exploded.
    """
    given = {name: loss for name, loss in split_losses.items() if loss is not None}
    bad = [name for name, loss in given.items() if not math.isfinite(loss)]
    if bad:
        return f"the loss of the {_splits(bad)} is not finite"
    exploded = [name for name, loss in given.items() if loss > EXPLODED_LOSS]
    if exploded:
        worst = max(given[name] for name in exploded)
        return (
            f"the loss of the {_splits(exploded)} has exploded (up to "
            f"{worst:.3g}, beyond {EXPLODED_LOSS:.1f}, where the right character's probability is below the "
            "smallest float32 number)"
        )
    return None


def _splits(names: list[str]) -> str:
    """``["train", "dev", "test"]`` -> ``"train, dev and test splits"``."""
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} split{'s' if len(names) > 1 else ''}"


def evaluation_problem(stats, split_losses: Mapping[str, float | None]) -> str | None:
    """:func:`statistics_problem`, then :func:`loss_problem`: None when the evaluation is a result."""
    return statistics_problem(stats) or loss_problem(split_losses)
