"""After training: batch-norm calibration and the loss of each split, in memory-bounded batches.

Batch norm trains with each minibatch's own statistics. To use the model on
single examples, the tutorial computes the mean and the unbiased variance of
the hidden pre-activations over the whole training split once ("calibration")
and uses those fixed statistics from then on (evaluation mode). With several
blocks, block ``l``'s statistics are those of ``hprebn[l]`` with the blocks
before it already in evaluation mode, so the blocks are calibrated one after
another, first to last.

The first layer is computed through per-position lookup tables instead of the
product ``concat(C[X]) @ W1``. With ``k`` context positions, embedding ``E``
and ``W1`` cut into ``k`` blocks of ``E`` rows, ``W1_j = W1[j*E:(j+1)*E]`` (E, H),
the product is a sum over positions::

    hprebn_i = sum_j C[X_ij] @ W1_j + b1 = sum_j T_j[X_ij] + b1,    T_j = C @ W1_j  (V, H)

exact algebra (row ``X_ij`` of ``C`` times ``W1_j`` is row ``X_ij`` of ``C @ W1_j``).
The ``k`` tables hold ``k·V·H`` numbers, so after one small program that
computes them, every example costs ``k`` gathered rows and ``k`` additions of
``H`` numbers instead of a ``(kE, H)`` product, and no ``(N, kE)`` embedded
input is ever built: at ``E = 100,000`` that is the difference between
minutes and seconds. Only the rounding differs from the product's: each
``T_j`` entry sums its ``E`` terms in the order of ``C @ W1_j``'s kernel and
the ``k`` partial sums are added last, where the product sums all ``kE`` terms
in one kernel's order. The two agree to a few float32 ulps of ``hprebn``
(relative differences ~1e-7), far below the 4 decimals a loss is reported to. Later
blocks take the previous block's ``h`` as input and run as :func:`jaxbirds.model.block`
does. The loss
itself is taken as ``logsumexp(logits) - logits[Y]``, ``-log_softmax(logits)[Y]`` rounded
in another order (see :func:`_summed_nll`).

Both functions stream a split through one jitted program of a fixed batch
size: the last batch is padded and its padding rows masked out, so every split
and every size compiles the program once. The batch size is the largest that
fits the memory budget (:mod:`jaxbirds.memory`), at most :data:`MAX_BATCH`.
Each waits for its batch to finish before the next, so that ``progress`` reports
rows really done and ``should_stop``, polled before every batch, ends a long
evaluation within one batch by raising :class:`Stopped`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import memory, model, ops
from jaxbirds.errors import ConfigError
from jaxbirds.model import BatchNormStats, ModelStats, Params
from jaxbirds.ops import check_batch_size

MAX_BATCH = 16_384
#: Buffers per row alive at once in the evaluation programs, in units of (hidden + vocabulary) values:
#: the block input, hprebn, hpreact and h of the block in flight; logits and log-softmax for the output;
#: with slack for XLA's temporaries. The embedded context (kE values a row) is never built: see the
#: module docstring.
LIVE_BUFFERS = 4
#: Bytes per row besides those: its context ids, its label and its padding mask.
ROW_OVERHEAD_BYTES = 64
#: Blocks in evaluation mode need no rule set (batch norm there is one affine map, :func:`ops.batch_norm_eval`);
#: :func:`jaxbirds.model.block` takes one all the same.
_EVALUATION_RULES = model.rule_set("autodiff")

#: ``progress(done_rows, total_rows)``: called after every batch; the last call has ``done_rows == total_rows``.
Progress = Callable[[int, int], None]
#: ``should_stop() -> bool``: polled before every batch; True ends the evaluation with :class:`Stopped`.
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """``should_stop`` returned True: the evaluation ended before its last batch, with no result."""


def context_size_of(params: Params) -> int:
    """Context positions ``k`` of a model (or of stacked models): ``W1`` has ``k·E`` rows for an embedding ``E``."""
    return params["W1"].shape[-2] // params["C"].shape[-1]


def models_of(params: Params, models: bool) -> int:
    """How many models ``params`` holds: the length of the leading axis of stacked parameters, or 1."""
    return params["W1"].shape[0] if models else 1


def widest_block(params: Params) -> int:
    """The largest block width ``max_l H_l`` of a model (or of stacked models)."""
    return max(params[model.block_param_names(layer)[0]].shape[-1] for layer in range(1, model.depth_of(params) + 1))


def batch_size_for(params: Params, budget: int | None = None, models: bool = False) -> int:
    """Rows per evaluation batch: as many as fit the memory budget, at most :data:`MAX_BATCH`.

    Fixed: the parameters (``W1`` included: the tables program reads it) and the
    ``k`` lookup tables (k, V, H_1) of each model. Per row: :data:`LIVE_BUFFERS` x
    (H + V) values of each model, ``H`` the widest block's width, and
    :data:`ROW_OVERHEAD_BYTES`. ``models``: the parameters are stacked on a
    leading models axis, evaluated together.
    """
    # The widest block, not the sum of the widths: the blocks run one after another, and once a block's h
    # is computed, XLA reuses the buffers of the one before, so a row holds one block's values at a time.
    vocab, hidden, count = params["C"].shape[-2], widest_block(params), models_of(params, models)
    itemsize = params["W1"].dtype.itemsize
    param_bytes = sum(p.size * p.dtype.itemsize for p in params.values())
    table_bytes = count * context_size_of(params) * vocab * params["W1"].shape[-1] * itemsize
    per_row = count * LIVE_BUFFERS * (hidden + vocab) * itemsize + ROW_OVERHEAD_BYTES
    return memory.rows_within(per_row, param_bytes + table_bytes, MAX_BATCH, budget)


@jax.jit
def position_tables(C: jax.Array, W1: jax.Array) -> jax.Array:
    """The first layer's lookup tables ``T_j = C @ W1[j*E:(j+1)*E]``, stacked: (k, V, H).

    Args:
      C: the embedding (V, E).
      W1: the first layer's weights (k·E, H), one block of ``E`` rows per context position.
    Returns:
      ``T`` (k, V, H), with ``T[j, v] = C[v] @ W1_j``: what a character ``v`` at position ``j``
      adds to ``hprebn``.
    """
    E = C.shape[1]
    # One product per contiguous block of rows: twice as fast on a CPU as an einsum over W1 reshaped to (k, E, H).
    return jnp.stack([C @ W1[j * E : (j + 1) * E] for j in range(W1.shape[0] // E)])


def lookup_hidden_preactivation(tables: jax.Array, b1: jax.Array, X: jax.Array) -> jax.Array:
    """``hprebn = sum_j T_j[X[:, j]] + b1`` (N, H): ``model.hidden_preactivation`` by table lookup.

    Args:
      tables: :func:`position_tables` (k, V, H).
      b1: the first layer's bias (H,).
      X: context ids (N, k).
    Returns:
      ``hprebn`` (N, H), equal to ``concat(C[X]) @ W1 + b1`` up to rounding (module docstring).
    """
    rows = [tables[j][X[:, j]] for j in range(X.shape[1])]  # k x (N, H)
    return sum(rows[1:], start=rows[0]) + b1


def throttled(progress: Progress, seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> Progress:
    """``progress`` for a phase that may be long: called once ``seconds`` (by ``clock``) have passed since the
    start or the last call, and for the last rows only if it was called before. A phase that ends within
    ``seconds`` reports nothing; a long one reports every ``seconds`` and ends at 100 %."""
    last, reported = [clock()], [False]

    def report(done: int, total: int) -> None:
        now = clock()
        if (done >= total and reported[0]) or (done < total and now - last[0] >= seconds):
            last[0], reported[0] = now, True
            progress(done, total)

    return report


def _never() -> bool:
    return False


def _ignore(done: int, total: int) -> None:
    pass


def _batches(
    n: int, batch: int, should_stop: ShouldStop, progress: Progress, done: int = 0, total: int | None = None
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each batch of ``n`` rows; ``should_stop`` is polled before each, ``progress``
    told ``done + stop`` of ``total`` rows after each (when the caller asks for the next one)."""
    total = n if total is None else total
    for start in range(0, n, batch):
        if should_stop():
            raise Stopped(f"stopped after {done + start:,} of {total:,} rows")
        stop = min(start + batch, n)
        yield start, stop
        progress(done + stop, total)


def pad_batch(X: np.ndarray, start: int, stop: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of ``X`` padded with zeros to ``batch`` rows, and ``valid`` (batch,): 1.0 for a real row."""
    rows = np.zeros((batch, *X.shape[1:]), X.dtype)
    rows[: stop - start] = X[start:stop]
    valid = np.zeros(batch, np.float32)
    valid[: stop - start] = 1.0
    return rows, valid


def after_lookup_names(params: Params) -> tuple[str, ...]:
    """The parameters the per-batch programs read: every one but ``C`` and ``W1``, which enter only through
    the lookup tables (``b1``, ``bngain1``, ``bnbias1``, the later blocks', the output layer's)."""
    blocks = (name for layer in range(1, model.depth_of(params) + 1) for name in model.block_param_names(layer))
    return (*(name for name in blocks if name != "W1"), *model.output_param_names(params))


def _after_lookup(params: Params) -> Params:
    return {name: jnp.asarray(params[name]) for name in after_lookup_names(params)}


def _check_stats(params: Params, stats: ModelStats) -> None:
    depth = model.depth_of(params)
    if len(stats) != depth:
        raise ConfigError(f"{len(stats)} sets of batch-norm statistics for a model of {depth} blocks")


def _hidden_in_evaluation_mode(tables: jax.Array, params: Params, stats: ModelStats, X: jax.Array) -> jax.Array:
    """``h[m]`` (N, H_m) of the first ``m = len(stats)`` blocks in evaluation mode, ``m >= 1``.

    Block 1 by the lookup tables, ``h[1] = tanh(bn(sum_j T_j[X_ij] + b1; stats[0]))``; each later block as
    :func:`jaxbirds.model.block` with its calibrated statistics, ``h[l] = tanh(bn(h[l-1] @ Wl + bl; stats[l-1]))``.
    ``params`` holds :func:`after_lookup_names` (or more).
    """
    hprebn = lookup_hidden_preactivation(tables, params["b1"], X)
    hpreact = ops.batch_norm_eval(hprebn, params["bngain1"], params["bnbias1"], stats[0].mean, stats[0].var)
    h = jnp.tanh(hpreact)
    for layer, layer_stats in enumerate(stats[1:], start=2):
        h = model.block(params, layer, h, _EVALUATION_RULES, layer_stats)
    return h


def _column_sums_of_one(
    tables: jax.Array, b1: jax.Array, X: jax.Array, valid: jax.Array, center: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sums of ``hprebn - center`` and of its square over the valid rows of one padded batch."""
    diff = (lookup_hidden_preactivation(tables, b1, X) - center) * valid[:, None]
    return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)


_column_sums = jax.jit(_column_sums_of_one)
#: The same for stacked models (tables, b1 and center with a leading models axis), in one program.
_column_sums_of_models = jax.jit(jax.vmap(_column_sums_of_one, in_axes=(0, 0, None, None, 0)))
_tables_of_models = jax.jit(jax.vmap(lambda C, W1: position_tables(C, W1)))


def _later_column_sums_of_one(
    tables: jax.Array, params: Params, stats: ModelStats, X: jax.Array, valid: jax.Array, center: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """:func:`_column_sums_of_one` for block ``l = len(stats) + 1 >= 2``: its ``hprebn[l] = h[l-1] @ Wl + bl``,
    with the ``l - 1`` blocks before it in evaluation mode with their calibrated ``stats``."""
    hprebn = model.linear(params, len(stats) + 1, _hidden_in_evaluation_mode(tables, params, stats, X))
    diff = (hprebn - center) * valid[:, None]
    return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)


#: One program per block (the length of ``stats`` is part of its structure), each compiled once.
_later_column_sums = jax.jit(_later_column_sums_of_one)
_later_column_sums_of_models = jax.jit(jax.vmap(_later_column_sums_of_one, in_axes=(0, 0, 0, None, None, 0)))


def calibrate(
    params: Params,
    X: np.ndarray,
    batch: int | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    models: bool = False,
) -> ModelStats:
    """Batch-norm statistics of a whole split, block by block: the mean and the *unbiased* variance of ``hprebn[l]``.

    ``mean_l = (1/n) sum_i hprebn[l]_i``, ``var_l = 1/(n-1) sum_i (hprebn[l]_i - mean_l)^2``,
    the same estimator training-mode batch norm uses on each minibatch, with the blocks before
    ``l`` in evaluation mode with their statistics just computed. (That is blocks ``1 .. l-1`` run in
    training mode on the whole split at once: the whole split's statistics are the calibrated ones.)
    Two passes per block for an accurate variance: the mean first, then the squared deviations
    from it. Block 1's ``hprebn`` comes from the lookup tables (module docstring), computed once.

    Args:
      params: the model's parameters (any depth).
      X: context ids (n, k) of the split, n >= 2.
      batch: rows per program call; by default :func:`batch_size_for`.
      progress: told the rows done of ``2 L n`` (both passes of each of the ``L`` blocks) after every batch.
      should_stop: polled before every batch; True raises :class:`Stopped`.
      models: ``params`` are K models stacked on a leading axis, calibrated together by one program
        (``vmap``); the statistics are then stacked too.
    Returns:
      One ``BatchNormStats`` per block, first to last, with ``mean`` and ``var`` (1, H_l), or (K, 1, H_l)
      for stacked models.
    """
    n = len(X)
    check_batch_size(n)
    batch = batch or batch_size_for(params, models=models)
    should_stop, progress = should_stop or _never, progress or _ignore
    tables = (_tables_of_models if models else position_tables)(params["C"], params["W1"])
    depth, leading = model.depth_of(params), tables.shape[:-3]
    first_sums = _column_sums_of_models if models else _column_sums
    later_sums = _later_column_sums_of_models if models else _later_column_sums
    b1, rest = jnp.asarray(params["b1"]), _after_lookup(params)
    stats: ModelStats = ()
    for layer in range(1, depth + 1):
        if layer == 1:
            column_sums = functools.partial(first_sums, tables, b1)
        else:
            column_sums = functools.partial(later_sums, tables, rest, stats)
        zero = jnp.zeros((*leading, 1, params[f"b{layer}"].shape[-1]), tables.dtype)
        done, total = 2 * n * (layer - 1), 2 * n * depth
        stats += (_block_statistics(column_sums, X, batch, zero, should_stop, progress, done, total),)
    return stats


def _block_statistics(
    column_sums: Callable[[np.ndarray, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    X: np.ndarray,
    batch: int,
    zero: jax.Array,
    should_stop: ShouldStop,
    progress: Progress,
    done: int,
    total: int,
) -> BatchNormStats:
    """One block's mean and unbiased variance over ``X``, in two passes of padded batches.

    ``column_sums(rows, valid, center)`` gives the sums of ``hprebn - center`` and of its square over
    the valid rows of a batch; ``zero`` (..., 1, H) is the first pass's center; ``progress`` is told
    ``done`` plus the rows of both passes of ``total``.
    """
    n = len(X)
    total_sum = zero
    for start, stop in _batches(n, batch, should_stop, progress, done=done, total=total):
        rows, valid = pad_batch(X, start, stop, batch)
        total_sum = (total_sum + column_sums(rows, valid.astype(zero.dtype), zero)[0]).block_until_ready()
    mean = total_sum / n
    squares = zero
    for start, stop in _batches(n, batch, should_stop, progress, done=done + n, total=total):
        rows, valid = pad_batch(X, start, stop, batch)
        squares = (squares + column_sums(rows, valid.astype(zero.dtype), mean)[1]).block_until_ready()
    return BatchNormStats(mean, squares / (n - 1))


def _summed_nll_of_one(
    tables: jax.Array, params: Params, stats: ModelStats, X: jax.Array, Y: jax.Array, valid: jax.Array
) -> jax.Array:
    """Summed cross-entropy of the valid rows of one padded batch, in evaluation mode.

    :func:`jaxbirds.model.forward` with calibrated ``stats`` (one per block), after its first layer:
    ``params`` holds :func:`after_lookup_names` only.
    """
    W, b = (params[name] for name in model.output_param_names(params))
    logits = _hidden_in_evaluation_mode(tables, params, stats, X) @ W + b
    # -log softmax(logits)[Y] as logsumexp - picked logit: XLA's CPU backend runs this form several
    # times faster than jax.nn.log_softmax here, where the gathered rows feed the fused kernel.
    nll = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, Y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * valid)


_summed_nll = jax.jit(_summed_nll_of_one)
#: The same for stacked models (tables, parameters and statistics with a leading models axis): (K,) sums.
_summed_nll_of_models = jax.jit(jax.vmap(_summed_nll_of_one, in_axes=(0, 0, 0, None, None, None)))


def split_loss(
    params: Params,
    stats: ModelStats,
    X: np.ndarray,
    Y: np.ndarray,
    batch: int | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    models: bool = False,
) -> float | list[float] | None:
    """Mean cross-entropy over a split in evaluation mode (calibrated batch norm); None for an empty split.

    ``loss = (1/n) sum_i -log softmax(logits_i)[Y_i]``, the first layer by lookup tables.

    Args:
      params: the model's parameters (any depth).
      stats: calibrated batch-norm statistics, one per block (:func:`calibrate`).
      X: context ids (n, k); Y: next-character ids (n,).
      batch: rows per program call; by default :func:`batch_size_for`.
      progress: told the rows done of ``n`` after every batch.
      should_stop: polled before every batch; True raises :class:`Stopped`.
      models: ``params`` and ``stats`` are K models stacked on a leading axis, evaluated together by one
        program (``vmap``).
    Returns:
      The mean loss (a list of K for stacked models), or None if ``n == 0``.
    """
    _check_stats(params, stats)
    if len(Y) == 0:
        return None
    batch = batch or batch_size_for(params, models=models)
    should_stop, progress = should_stop or _never, progress or _ignore
    tables = (_tables_of_models if models else position_tables)(params["C"], params["W1"])
    summed_nll = _summed_nll_of_models if models else _summed_nll
    rest = _after_lookup(params)
    total = np.zeros(models_of(params, models))
    for start, stop in _batches(len(Y), batch, should_stop, progress):
        rows, valid = pad_batch(X, start, stop, batch)
        labels, _ = pad_batch(Y, start, stop, batch)
        total += np.asarray(summed_nll(tables, rest, stats, rows, labels, valid.astype(tables.dtype)), np.float64)
    means = [float(t) / len(Y) for t in total]
    return means if models else means[0]
