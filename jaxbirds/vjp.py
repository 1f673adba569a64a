"""Hand-written reverse-mode rules (``jax.custom_vjp``) for cross-entropy and batch norm.

Each function computes the same value as its plain twin in :mod:`jaxbirds.ops`;
what differs is the backward pass, which JAX no longer derives by tracing the
forward but takes from the closed form derived below. The derivations are the
tutorial's "backward pass optimisation" section, written out in full.

Only reverse mode exists for a ``custom_vjp`` function: ``jax.jvp`` (and so
``jax.jacfwd`` and forward-mode ``check_grads``) is not available for these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbirds.ops import BN_EPS, check_batch_size

# --------------------------------------------------------------------------- #
# Cross-entropy                                                               #
# --------------------------------------------------------------------------- #


@jax.custom_vjp
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean negative log-likelihood of integer ``labels``, with a hand-written VJP.

    Forward (row ``i`` of ``n``, class ``j``; ``m_i = max_j l_ij`` for stability)::

        p_ij = exp(l_ij - m_i) / sum_k exp(l_ik - m_i)           (softmax)
        L    = (1/n) sum_i [ log sum_k exp(l_ik - m_i) - (l_{i,y_i} - m_i) ]

    Backward. The shift ``m_i`` cancels (``logsumexp(l - m) + m = logsumexp(l)``),
    so ``L = (1/n) sum_i [logsumexp(l_i) - l_{i,y_i}]`` and, since
    ``d logsumexp(l_i) / d l_ij = p_ij``::

        dL/dl_ij = (p_ij - [j == y_i]) / n,      so   dlogits = g * (p - onehot(y)) / n

    for an incoming cotangent ``g``. Residuals: ``p`` (already computed for the
    loss) and ``labels``. ``labels`` are integers: their cotangent is ``None``.
    """
    loss, _ = _cross_entropy_fwd(logits, labels)
    return loss


def _cross_entropy_fwd(logits, labels):
    shifted = logits - jnp.max(logits, axis=1, keepdims=True)
    counts = jnp.exp(shifted)
    counts_sum = jnp.sum(counts, axis=1, keepdims=True)
    picked = jnp.take_along_axis(shifted, labels[:, None], axis=1)
    loss = jnp.mean(jnp.log(counts_sum) - picked)
    probs = counts / counts_sum
    return loss, (probs, labels)


def _cross_entropy_bwd(residuals, g):
    probs, labels = residuals
    n, classes = probs.shape
    onehot = jax.nn.one_hot(labels, classes, dtype=probs.dtype)
    dlogits = (probs - onehot) * (g / n)
    return dlogits, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# --------------------------------------------------------------------------- #
# Batch norm (training mode)                                                  #
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, gain: jax.Array, bias: jax.Array, eps: float = BN_EPS) -> jax.Array:
    r"""Training-mode batch norm over axis 0 (unbiased variance), with a hand-written VJP.

    Forward, per column (``n`` rows, ``gamma = gain``, ``beta = bias``)::

        mu  = (1/n) sum_i x_i          d_i = x_i - mu
        v   = 1/(n-1) sum_i d_i^2      s   = (v + eps)^(-1/2)
        xh_i = d_i s                   y_i = gamma xh_i + beta

    Backward. ``dbeta = sum_i dy_i`` and ``dgamma = sum_i dy_i xh_i`` directly.
    For ``x``, ``xh_i`` depends on ``x_j`` through ``d_i`` and through ``s``::

        d d_i / d x_j = [i == j] - 1/n
        d s   / d x_j = -1/2 (v+eps)^(-3/2) * 2/(n-1) * d_j = -s^3 d_j / (n-1)
                        (the mean's share vanishes because sum_i d_i = 0)

    so, with ``dxh_i = gamma dy_i``::

        dx_j = sum_i gamma dy_i [ s([i==j] - 1/n) - s^3 d_i d_j / (n-1) ]
             = gamma s dy_j - gamma s/n sum_i dy_i - gamma s^3 d_j/(n-1) sum_i dy_i d_i
             = gamma s / n * ( n dy_j - sum_i dy_i - n/(n-1) xh_j sum_i dy_i xh_i )

    (using ``s^2 d_j sum_i dy_i d_i = xh_j sum_i dy_i xh_i``). The two column sums
    ``sum dy`` and ``sum dy xh`` are exactly ``dbeta`` and ``dgamma``, so they are
    computed once. Residuals: ``xh`` (N, H), ``s`` (1, H) and ``gamma`` (1, H).

    ``x`` is (N, H) with N >= 2; ``gain`` and ``bias`` are (1, H).
    """
    y, _ = _batch_norm_fwd(x, gain, bias, eps)
    return y


def _batch_norm_fwd(x, gain, bias, eps):
    n = x.shape[0]
    check_batch_size(n)
    diff = x - jnp.mean(x, axis=0, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.sum(diff * diff, axis=0, keepdims=True) / (n - 1) + eps)
    x_hat = diff * inv_std
    return gain * x_hat + bias, (x_hat, inv_std, gain)


def _batch_norm_bwd(eps, residuals, dy):
    del eps  # enters only through inv_std, which the forward saved
    x_hat, inv_std, gain = residuals
    n = x_hat.shape[0]
    dbias = jnp.sum(dy, axis=0, keepdims=True)
    dgain = jnp.sum(dy * x_hat, axis=0, keepdims=True)
    dx = (gain * inv_std / n) * (n * dy - dbias - (n / (n - 1)) * x_hat * dgain)
    return dx, dgain, dbias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
