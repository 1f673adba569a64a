"""After training: batch-norm calibration and the loss of each split, in memory-bounded batches.

Batch norm trains with each minibatch's own statistics. To use the model on
single examples, the tutorial computes the mean and the unbiased variance of
the hidden pre-activations over the whole training split once ("calibration")
and uses those fixed statistics from then on (evaluation mode).

Both functions stream a split through one jitted program of a fixed batch
size: the last batch is padded and its padding rows masked out, so every split
and every size compiles the program once. The batch size is the largest that
fits the memory budget (:mod:`jaxbirds.memory`), at most :data:`MAX_BATCH`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import memory, model
from jaxbirds.model import BatchNormStats, Params
from jaxbirds.ops import check_batch_size

MAX_BATCH = 16_384
#: Buffers per row alive at once in the evaluation program, in units of (embedding inputs + hidden +
#: vocabulary) values: the embedded context; hprebn, hpreact and h for the hidden layer; logits and
#: log-softmax for the output; with slack for XLA's temporaries.
LIVE_BUFFERS = 4


def batch_size_for(params: Params, budget: int | None = None) -> int:
    """Rows per evaluation batch: as many as fit the memory budget, at most :data:`MAX_BATCH`."""
    (fan_in, hidden), vocab = params["W1"].shape, params["W2"].shape[1]
    itemsize = params["W1"].dtype.itemsize
    param_bytes = sum(p.size * p.dtype.itemsize for p in params.values())
    per_row = LIVE_BUFFERS * (fan_in + hidden + vocab) * itemsize + 64
    return memory.rows_within(per_row, param_bytes, MAX_BATCH, budget)


def _batches(n: int, batch: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch, n)) for start in range(0, n, batch)]


def _pad(X: np.ndarray, start: int, stop: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((batch, *X.shape[1:]), X.dtype)
    rows[: stop - start] = X[start:stop]
    valid = np.zeros(batch, np.float32)
    valid[: stop - start] = 1.0
    return rows, valid


@jax.jit
def _column_sums(params: Params, X: jax.Array, valid: jax.Array, center: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of ``hprebn - center`` and of its square over the valid rows of one padded batch."""
    diff = (model.hidden_preactivation(params, X) - center) * valid[:, None]
    return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)


def calibrate(params: Params, X: np.ndarray, batch: int | None = None) -> BatchNormStats:
    """Batch-norm statistics of a whole split: the mean and the *unbiased* variance of ``hprebn``.

    ``mean = (1/n) sum_i hprebn_i``, ``var = 1/(n-1) sum_i (hprebn_i - mean)^2``,
    the same estimator training-mode batch norm uses on each minibatch. Two passes
    for an accurate variance: the mean first, then the squared deviations from it.
    """
    n = len(X)
    check_batch_size(n)
    batch = batch or batch_size_for(params)
    hidden = params["W1"].shape[1]
    dtype = params["W1"].dtype
    zero = jnp.zeros((1, hidden), dtype)
    total = zero
    for start, stop in _batches(n, batch):
        rows, valid = _pad(X, start, stop, batch)
        total = total + _column_sums(params, rows, valid.astype(dtype), zero)[0]
    mean = total / n
    squares = zero
    for start, stop in _batches(n, batch):
        rows, valid = _pad(X, start, stop, batch)
        squares = squares + _column_sums(params, rows, valid.astype(dtype), mean)[1]
    return BatchNormStats(mean, squares / (n - 1))


@jax.jit
def _summed_nll(params: Params, stats: BatchNormStats, X: jax.Array, Y: jax.Array, valid: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(model.logits(params, X, stats), axis=1)
    nll = -jnp.take_along_axis(log_probs, Y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * valid)


def split_loss(
    params: Params, stats: BatchNormStats, X: np.ndarray, Y: np.ndarray, batch: int | None = None
) -> float | None:
    """Mean cross-entropy over a split in evaluation mode (calibrated batch norm); None for an empty split."""
    if len(Y) == 0:
        return None
    batch = batch or batch_size_for(params)
    total = 0.0
    for start, stop in _batches(len(Y), batch):
        rows, valid = _pad(X, start, stop, batch)
        labels, _ = _pad(Y, start, stop, batch)
        total += float(_summed_nll(params, stats, rows, labels, valid.astype(params["W1"].dtype)))
    return total / len(Y)
