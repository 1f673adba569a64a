"""Hand-written forward-mode rules (``jax.custom_jvp``) for cross-entropy and batch norm.

The twins of :mod:`jaxbirds.vjp`: the same two functions, the same values, the
derivative supplied the other way. A ``custom_vjp`` rule says how a cotangent
flows *backward* (reverse mode only). A ``custom_jvp`` rule says how a tangent
flows *forward*: ``(x, dx) -> (f(x), J dx)``. From it JAX gets everything:

* forward mode (``jax.jvp``, ``jax.jacfwd``) uses the rule as written;
* reverse mode (``jax.grad``) *transposes* it: the rule is linearised, and the
  transpose of the linear map ``dx -> J dx`` is ``g -> J^T g``, the VJP;
* higher order (``jax.hessian``, ``grad`` of ``grad``) differentiates the rule
  itself, since it is ordinary JAX code.

For the transposition to work, the tangent output must be *linear* in the
tangent inputs and computed only with operations JAX knows how to transpose:
sums, means, broadcasts, and products of a tangent with values that depend on
the primal inputs alone (``x_hat``, ``s``, ``p``). No tangent may be squared,
divided by, or passed through a nonlinearity, and no primal value may be
computed from a tangent. Both rules below are of that form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbirds import closed_forms, ops
from jaxbirds.ops import BN_EPS
from jaxbirds.rules import RuleSet

# --------------------------------------------------------------------------- #
# Cross-entropy                                                               #
# --------------------------------------------------------------------------- #


@jax.custom_jvp
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean negative log-likelihood of integer ``labels``, with a hand-written JVP.

    ``L = (1/n) sum_i [logsumexp(l_i) - l_{i,y_i}]`` (the value of
    :func:`jaxbirds.ops.cross_entropy`). Tangent: since ``d logsumexp(l_i) =
    sum_j p_ij dl_ij`` with ``p = softmax(l)``, and ``d l_{i,y_i} = sum_j
    onehot_ij dl_ij``::

        dL = (1/n) sum_ij (p_ij - onehot(y)_ij) dl_ij

    linear in ``dl``: ``sum_ij c_ij dl_ij`` with the primal ``c = (p - onehot(y)) / n``, the
    closed form :func:`jaxbirds.closed_forms.cross_entropy_backward`. Its transpose sends a cotangent ``g`` to
    ``g (p - onehot(y)) / n``: exactly the VJP of :func:`jaxbirds.vjp.cross_entropy`.
    ``labels`` are integers: their tangent (``float0``) is ignored.
    """
    return ops.cross_entropy(logits, labels)


@cross_entropy.defjvp
def _cross_entropy_jvp(primals, tangents):
    logits, labels = primals
    dlogits, _ = tangents
    seen = {}
    loss = ops.cross_entropy(logits, labels, tap=lambda name, value: seen.setdefault(name, value))
    probs = seen["counts"] / seen["counts_sum"]
    return loss, jnp.sum(closed_forms.cross_entropy_backward(probs, labels) * dlogits)


# --------------------------------------------------------------------------- #
# Batch norm (training mode)                                                  #
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, gain: jax.Array, bias: jax.Array, eps: float = BN_EPS) -> jax.Array:
    r"""Training-mode batch norm over axis 0 (unbiased variance), with a hand-written JVP.

    Forward, per column: ``mu = mean(x)``, ``d = x - mu``, ``v = sum(d^2)/(n-1)``,
    ``s = (v + eps)^(-1/2)``, ``xh = d s``, ``y = gamma xh + beta``.

    Tangent. Push ``dx`` through each step::

        dd  = dx - mean(dx)                                   (the mean's tangent is removed)
        dv  = 2/(n-1) sum_j d_j dd_j
        ds  = -1/2 (v+eps)^(-3/2) dv = -s^3/(n-1) sum_j d_j dd_j
        dxh = dd s + d ds = s (dd - xh/(n-1) sum_j xh_j dd_j)
            = s (dx - mean(dx) - xh/(n-1) sum_j xh_j dx_j)    (sum_j xh_j = 0 drops mean(dx))
        dy  = dgamma xh + gamma dxh + dbeta

    Linear in ``(dx, dgamma, dbeta)``; ``xh``, ``s`` and ``gamma`` are primal
    values. Transposed, ``dx -> gamma dxh`` becomes
    ``g -> gamma s/n (n g - sum g - n/(n-1) xh sum(g xh))``: the closed form of
    :func:`jaxbirds.vjp.batch_norm`, which JAX derives here instead of us.
    """
    return ops.batch_norm(x, gain, bias, eps)


@batch_norm.defjvp
def _batch_norm_jvp(eps, primals, tangents):
    x, gain, bias = primals
    dx, dgain, dbias = tangents
    n = x.shape[0]
    saved = {}
    y = ops.batch_norm(x, gain, bias, eps, tap=lambda name, value: saved.setdefault(name, value))
    x_hat, inv_std = saved["bnraw"], saved["bnvar_inv"]
    centered = dx - jnp.mean(dx, axis=0, keepdims=True)
    dx_hat = inv_std * (centered - x_hat * jnp.sum(x_hat * centered, axis=0, keepdims=True) / (n - 1))
    return y, dgain * x_hat + gain * dx_hat + dbias


RULE_SET = RuleSet(
    name="custom_jvp",
    summary="hand-written forward-mode rules (jax.custom_jvp) for batch norm and cross-entropy; JAX transposes them",
    batch_norm=lambda x, gain, bias, tap: batch_norm(x, gain, bias),
    cross_entropy=lambda logits, labels, tap: cross_entropy(logits, labels),
)
