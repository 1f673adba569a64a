"""The model's two interesting operations, written plainly in ``jax.numpy``.

JAX differentiates these by itself; they are the reference that the
hand-written rules in :mod:`jaxbirds.vjp` and :mod:`jaxbirds.manual` are checked
against, and the ``autodiff`` gradient mode trains through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BN_EPS = 1e-5


def check_batch_size(n: int) -> None:
    """Batch norm's unbiased variance divides by ``n - 1``: a batch needs two rows."""
    if n < 2:
        raise ValueError(
            f"batch norm needs a batch of at least 2 rows (its unbiased variance divides by n - 1); got {n}"
        )


def batch_norm(x: jax.Array, gain: jax.Array, bias: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """Training-mode batch norm over axis 0, as in the tutorial.

    ``mu = mean(x, 0)``, ``var = sum((x - mu)^2, 0) / (n - 1)`` (unbiased),
    ``y = gain * (x - mu) / sqrt(var + eps) + bias``. ``x`` is (N, H); ``gain``
    and ``bias`` are (1, H).
    """
    n = x.shape[0]
    check_batch_size(n)
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.var(x, axis=0, keepdims=True, ddof=1)
    return gain * (x - mean) * jax.lax.rsqrt(var + eps) + bias


def batch_norm_eval(
    x: jax.Array, gain: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, eps: float = BN_EPS
) -> jax.Array:
    """Evaluation-mode batch norm: the same affine map, with given (calibrated) statistics."""
    return gain * (x - mean) * jax.lax.rsqrt(var + eps) + bias


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased variance over axis 0, shaped (1, H): the calibration statistics."""
    check_batch_size(x.shape[0])
    return jnp.mean(x, axis=0, keepdims=True), jnp.var(x, axis=0, keepdims=True, ddof=1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits)``.

    ``loss = mean_i( logsumexp(logits_i) - logits_i[labels_i] )``, with the row
    maximum subtracted first so that ``exp`` cannot overflow.
    """
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    log_norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=1))
    picked = jnp.take_along_axis(shifted, labels[:, None], axis=1)[:, 0]
    return jnp.mean(log_norm - picked)
