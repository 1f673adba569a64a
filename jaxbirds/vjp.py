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

from jaxbirds import closed_forms, ops
from jaxbirds.ops import BN_EPS
from jaxbirds.rules import RuleSet

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

    for an incoming cotangent ``g`` (:func:`jaxbirds.closed_forms.cross_entropy_backward`).
    Residuals: ``p`` (from the ``exp`` and row sums already computed for the loss
    by :func:`jaxbirds.ops.cross_entropy`) and ``labels``. ``labels`` are integers: their cotangent is ``None``.
    """
    loss, _ = _cross_entropy_fwd(logits, labels)
    return loss


def _cross_entropy_fwd(logits, labels):
    seen = {}
    loss = ops.cross_entropy(logits, labels, tap=lambda name, value: seen.setdefault(name, value))
    return loss, (seen["counts"] / seen["counts_sum"], labels)


def _cross_entropy_bwd(residuals, g):
    probs, labels = residuals
    return closed_forms.cross_entropy_backward(probs, labels, g), None


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
    computed once (:func:`jaxbirds.closed_forms.batch_norm_backward`, shared with
    the fused manual pass). Residuals: ``xh`` (N, H), ``s`` (1, H) and ``gamma`` (1, H),
    recorded from the forward of :func:`jaxbirds.ops.batch_norm`.

    ``x`` is (N, H) with N >= 2; ``gain`` and ``bias`` are (1, H).
    """
    y, _ = _batch_norm_fwd(x, gain, bias, eps)
    return y


def _batch_norm_fwd(x, gain, bias, eps):
    seen = {}
    y = ops.batch_norm(x, gain, bias, eps, tap=lambda name, value: seen.setdefault(name, value))
    return y, (seen["bnraw"], seen["bnvar_inv"], gain)


def _batch_norm_bwd(eps, residuals, dy):
    del eps  # enters only through inv_std, which the forward saved
    return closed_forms.batch_norm_backward(*residuals, dy)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


RULE_SET = RuleSet(
    name="custom_vjp",
    summary="hand-written reverse-mode rules (jax.custom_vjp) for batch norm and cross-entropy",
    batch_norm=lambda x, gain, bias, tap: batch_norm(x, gain, bias),
    cross_entropy=lambda logits, labels, tap: cross_entropy(logits, labels),
)
