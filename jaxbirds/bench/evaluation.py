"""Calibration and evaluation after training: the embedded-input product (before) against lookup tables."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from jaxbirds import evaluate, memory, model
from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, Timing, measure, model_label

#: ``{split: (X, Y)}``: the rows a way calibrates on (``"train"``) and evaluates.
Splits = dict[str, tuple]

PRODUCT, LOOKUP = "product (before)", "lookup tables"
WIDE_EMBEDDING = 100_000  # W1 is 300,000 x 200: the product way's (N, kE) inputs no longer fit a cheap pass


_RULES = model.rule_set("autodiff")  # evaluation mode reads only the calibrated statistics: any rule set would do


@jax.jit
def product_column_sums(params, stats, X, valid, center):
    """Column sums of ``(hprebn[l] - center)`` and of its square over the valid rows of ``X``, each (1, H_l),
    for block ``l = len(stats) + 1``: the product ``embcat @ W1 + b1``, then the blocks before ``l`` in
    evaluation mode with their calibrated ``stats`` (one program per block: ``len(stats)`` is its structure)."""
    h = model.embed(params, X)
    for layer, layer_stats in enumerate(stats, start=1):
        h = model.block(params, layer, h, _RULES, layer_stats)
    diff = (model.linear(params, len(stats) + 1, h) - center) * valid[:, None]
    return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)


@jax.jit
def product_summed_nll(params, stats, X, Y, valid):
    """The summed negative log-likelihood of the valid rows of ``X, Y``, batch norm by ``stats`` (one per block)."""
    log_probs = jax.nn.log_softmax(model.logits(params, X, stats), axis=1)
    return jnp.sum(-jnp.take_along_axis(log_probs, Y[:, None], axis=1)[:, 0] * valid)


def by_product(params, splits: Splits) -> dict[str, float]:
    """The evaluation as it was: (N, kE) embedded inputs times W1, batches sized by counting them.

    Returns:
        ``{split: mean loss}``, batch norm calibrated on ``splits["train"]``, block by block (two passes each).
    """
    depth = model.depth_of(params)
    widths = (params["W1"].shape[0], *(params[f"W{layer}"].shape[1] for layer in range(1, depth + 2)))
    per_row = evaluate.LIVE_BUFFERS * sum(widths) * params["W1"].dtype.itemsize + 64
    batch = memory.rows_within(per_row, sum(p.nbytes for p in params.values()), evaluate.MAX_BATCH)
    X, n = splits["train"][0], len(splits["train"][0])

    def column_sum(stats, power: int, center: jax.Array) -> jax.Array:  # of (hprebn[l] - center) ** power
        total = jnp.zeros_like(center)
        for start in range(0, n, batch):
            rows, valid = evaluate.pad_batch(X, start, min(start + batch, n), batch)
            total = total + product_column_sums(params, stats, rows, valid, center)[power - 1]
        return total

    stats: model.ModelStats = ()
    for layer in range(1, depth + 1):  # two passes per block: the mean, then the deviations from it
        mean = column_sum(stats, 1, jnp.zeros((1, widths[layer]))) / n
        stats += (model.BatchNormStats(mean, column_sum(stats, 2, mean) / (n - 1)),)
    losses = {}
    for name, (X, Y) in splits.items():
        total = 0.0
        for start in range(0, len(Y), batch):
            rows, valid = evaluate.pad_batch(X, start, min(start + batch, len(Y)), batch)
            labels, _ = evaluate.pad_batch(Y, start, min(start + batch, len(Y)), batch)
            total += float(product_summed_nll(params, stats, rows, labels, valid))
        losses[name] = total / len(Y)
    return losses


def by_lookup(params, splits: Splits) -> dict[str, float]:
    """The evaluation as it is (:mod:`jaxbirds.evaluate`): ``{split: mean loss}``, calibrated on ``splits["train"]``."""
    stats = evaluate.calibrate(params, splits["train"][0])
    return {name: evaluate.split_loss(params, stats, X, Y) for name, (X, Y) in splits.items()}


WAYS = {PRODUCT: by_product, LOOKUP: by_lookup}


def evaluation_study(b: Bench, wide_subset_rows: int = 4_096) -> list[Row]:
    """Calibration and evaluation after training, the product way (before) and by lookup tables
    (:mod:`jaxbirds.evaluate`): calibration on the train split (two passes) and the loss of each split.

    Both ways run their programs in the batches their own memory estimates allow. At the default
    shape (embedding 10, hidden 200) both run on the whole splits, timed as every study times. At
    embedding 100,000 (W1 300,000 x 200) the product way is far too slow for the whole splits: it
    runs on the first ``wide_subset_rows`` training rows only (calibration on them and their loss),
    timed once after a one-batch warm-up; the lookup tables run both on that subset and on the whole
    splits. "row passes" counts each calibrated row twice (two passes) and each evaluated row once;
    ``s_per_100k_rows`` is seconds per 100,000 row passes, and ``x_faster`` the product's figure
    (at embedding 100,000: on its subset) over the row's. ``max_loss_diff`` is the largest difference
    between the two ways' losses of the same rows (model at initialisation).

    Returns:
        Two rows at the default embedding, three at embedding 100,000 (see :func:`embedding_rows`).
    """
    whole = {name: (s.X, s.Y) for name, s in b.dataset.splits.items()}
    train = b.dataset.train
    subset = {"train": (train.X[:wide_subset_rows], train.Y[:wide_subset_rows])}
    rows = []
    for embedding in (b.model_config.embedding_dim, WIDE_EMBEDDING):
        if embedding == b.model_config.embedding_dim:
            points = [(way, "all splits", whole) for way in WAYS]
        else:
            points = [
                (PRODUCT, f"first {len(subset['train'][0]):,} train rows", subset),
                (LOOKUP, f"first {len(subset['train'][0]):,} train rows", subset),
                (LOOKUP, "all splits", whole),
            ]
        rows += embedding_rows(b, embedding, points)
    return rows


def embedding_rows(b: Bench, embedding: int, points: list[tuple[str, str, Splits]]) -> list[Row]:
    """Time each ``(way, rows measured, splits)`` of ``points`` on the model at initialisation with ``embedding``.

    Returns:
        One row per point: ``embedding``, ``hidden``, ``way``, ``measured``, ``timed_runs``, ``row_passes``,
        ``seconds``, ``spread``, ``s_per_100k_rows``, ``x_faster`` and, where both ways ran on the same
        rows, ``max_loss_diff``.
    """
    mc = dataclasses.replace(b.model_config, embedding_dim=embedding)
    params = model.init_params(jax.random.key(0), mc)
    jax.block_until_ready(params)
    cheap = embedding == b.model_config.embedding_dim
    warm_up = {"train": (b.dataset.train.X[:2], b.dataset.train.Y[:2])}  # one padded batch of each program
    rows, losses = [], {}
    for way, measured, splits in points:
        run = functools.partial(WAYS[way], params, splits)
        if cheap or way == LOOKUP:
            timing, losses[way, measured] = measure(run, b.config.repeats), run()
        else:  # minutes a run: one, after compiling on one batch
            WAYS[way](params, warm_up)
            t0 = time.perf_counter()
            losses[way, measured] = run()
            timing = Timing.of([time.perf_counter() - t0])
        passes = 2 * len(splits["train"][0]) + sum(len(X) for X, _ in splits.values())
        rows.append({"embedding": embedding, "hidden": model_label(mc.hidden), "way": way, "measured": measured,
                     "timed_runs": b.config.repeats if cheap or way == LOOKUP else 1,
                     "row_passes": passes, "seconds": timing.median, "spread": (timing.low, timing.high),
                     "s_per_100k_rows": 1e5 * timing.median / passes})  # fmt: skip
    product = next(r for r in rows if r["way"] == PRODUCT)
    for row in rows:
        row["x_faster"] = product["s_per_100k_rows"] / row["s_per_100k_rows"]
        same = [v for (_, measured), v in losses.items() if measured == row["measured"]]
        if len(same) == 2:  # both ways on the same rows
            row["max_loss_diff"] = max(abs(same[0][k] - same[1][k]) for k in same[0])
    return rows


STUDY = Study(
    name="evaluation",
    title="Calibration and evaluation after training: the product (before) vs lookup tables (float32, seconds)",
    columns=(
        ("embedding", "embedding", ","),
        ("hidden", "hidden", ""),
        ("way", "way", ""),
        ("measured", "rows measured", ""),
        ("timed_runs", "timed runs", ""),
        ("row_passes", "row passes", ","),
        ("seconds", "seconds (median)", ".3f"),
        ("spread", "min–max", ".3f"),
        ("s_per_100k_rows", "s per 100k row passes", ".3f"),
        ("x_faster", "× faster than product", ".1f"),
        ("max_loss_diff", "max loss difference", ".1e"),
    ),
    run=evaluation_study,
)
