"""The backward pass by hand: no ``jax.grad`` anywhere in this module.

Two versions, as in the tutorial:

* :func:`atomic_backward` walks back through every named intermediate of
  :func:`forward_intermediates`, one chain-rule step per line, and returns the
  gradient of the loss with respect to each intermediate and each parameter.
  It is for reading and for checking, not for speed.
* :func:`fused_backward` runs the model's training forward, recording the few
  values it needs (``embcat``, ``x_hat``, ``s``, ``h``, ``logits``), and uses the
  closed forms for cross-entropy and batch norm (derived in :mod:`jaxbirds.vjp`).
  It returns the loss and the parameter gradients, and is what ``manual``
  training calls.

Both read :func:`jaxbirds.model.forward`, the one definition of the forward pass.

Notation: ``n`` is the batch size, ``dX`` is ``dloss/dX`` and has ``X``'s shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxbirds import model
from jaxbirds.model import Params
from jaxbirds.ops import BN_EPS

#: The tutorial's intermediates, in forward order.
INTERMEDIATES = (
    "emb", "embcat", "hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw",
    "hpreact", "h", "logits", "logit_maxes", "norm_logits", "counts", "counts_sum",
    "counts_sum_inv", "probs", "logprobs",
)  # fmt: skip


def forward_intermediates(
    params: Params, X: jax.Array, Y: jax.Array, perturb: Mapping[str, jax.Array] | None = None
) -> dict[str, jax.Array]:
    """The model's forward pass in the tutorial's atomic steps; returns every named step and ``loss``.

    This is :func:`jaxbirds.model.forward` with ``rules="tutorial"`` and a tap
    that records each intermediate. ``perturb`` optionally adds an array to named
    intermediates as they are computed (``t = expression + perturb[t]``). With
    zeros it changes nothing, but ``jax.grad`` with respect to the perturbations
    then yields ``dloss/dt`` for every intermediate ``t``: that is how
    :mod:`jaxbirds.gradcheck` obtains its reference values.
    """
    perturb = perturb or {}
    values: dict[str, jax.Array] = {}

    def record(name: str, value: jax.Array) -> jax.Array:
        values[name] = value + perturb[name] if name in perturb else value
        return values[name]

    values["loss"] = model.forward(params, X, Y, rules="tutorial", tap=record)
    return values


def atomic_backward(params: Params, X: jax.Array, Y: jax.Array, v: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Gradients of the loss for every intermediate and parameter, one chain-rule step at a time.

    ``v`` is the output of :func:`forward_intermediates`. Each line reads
    ``d<input> = d<output> * d<output>/d<input>``, summed over every use of
    ``<input>``; where an input was broadcast in the forward pass, its
    gradient is summed over the broadcast axis in the backward pass.
    """
    n, V = v["logits"].shape
    g: dict[str, jax.Array] = {}
    # loss = -(1/n) sum_i logprobs[i, Y_i]: only the picked entries get -1/n.
    g["logprobs"] = jnp.zeros_like(v["logprobs"]).at[jnp.arange(n), Y].set(-1.0 / n)
    # logprobs = log(probs): d log(p) / dp = 1 / p
    g["probs"] = g["logprobs"] / v["probs"]
    # probs = counts * counts_sum_inv: counts_sum_inv (n, 1) was broadcast over columns.
    g["counts_sum_inv"] = jnp.sum(g["probs"] * v["counts"], axis=1, keepdims=True)
    # counts_sum_inv = counts_sum ** -1
    g["counts_sum"] = g["counts_sum_inv"] * (-(v["counts_sum"] ** -2))
    # counts feeds probs directly and counts_sum = sum_j counts_j (every column gets dcounts_sum).
    g["counts"] = v["counts_sum_inv"] * g["probs"] + jnp.ones_like(v["counts"]) * g["counts_sum"]
    # counts = exp(norm_logits): the derivative of exp is exp itself.
    g["norm_logits"] = g["counts"] * v["counts"]
    # norm_logits = logits - logit_maxes: logit_maxes (n, 1) was broadcast over columns.
    g["logit_maxes"] = -jnp.sum(g["norm_logits"], axis=1, keepdims=True)
    # logits feeds norm_logits directly and the row max. The max passes its gradient to the entry
    # that is the maximum; where several entries tie for it, JAX's rule splits it equally among
    # them (any split summing to one is a valid subgradient: this one is JAX's, and symmetric).
    is_max = (v["logits"] == v["logit_maxes"]).astype(v["logits"].dtype)
    counts = jnp.sum(is_max, axis=1, keepdims=True)
    g["logits"] = g["norm_logits"] + (g["logit_maxes"] / counts) * is_max
    # logits = h @ W2 + b2
    g["h"] = g["logits"] @ params["W2"].T
    g["W2"] = v["h"].T @ g["logits"]
    g["b2"] = jnp.sum(g["logits"], axis=0)
    # h = tanh(hpreact): tanh' = 1 - h^2 = (1 - h)(1 + h). Written with u = dh (1 - h) as u + u h,
    # the order in which JAX's own tanh rule rounds, so that the two agree bit for bit. (Near
    # h = +1 it also avoids the cancellation in 1 - h^2; near h = -1 the cancellation moves into
    # 1 + h, so this order is chosen for agreement, not for accuracy.)
    u = g["h"] * (1.0 - v["h"])
    g["hpreact"] = u + u * v["h"]
    # hpreact = bngain * bnraw + bnbias: gain and bias (1, H) were broadcast over rows.
    g["bngain"] = jnp.sum(v["bnraw"] * g["hpreact"], axis=0, keepdims=True)
    g["bnbias"] = jnp.sum(g["hpreact"], axis=0, keepdims=True)
    g["bnraw"] = params["bngain"] * g["hpreact"]
    # bnraw = bndiff * bnvar_inv: bnvar_inv (1, H) was broadcast over rows.
    g["bnvar_inv"] = jnp.sum(v["bndiff"] * g["bnraw"], axis=0, keepdims=True)
    # bnvar_inv = (bnvar + eps) ** -1/2
    g["bnvar"] = -0.5 * (v["bnvar"] + BN_EPS) ** -1.5 * g["bnvar_inv"]
    # bnvar = sum_i bndiff2_i / (n - 1): every row gets the same share.
    g["bndiff2"] = jnp.ones_like(v["bndiff2"]) * g["bnvar"] / (n - 1)
    # bndiff feeds bnraw directly and bndiff2 = bndiff ** 2.
    g["bndiff"] = g["bnraw"] * v["bnvar_inv"] + 2.0 * v["bndiff"] * g["bndiff2"]
    # bndiff = hprebn - bnmeani: bnmeani (1, H) was broadcast over rows.
    g["bnmeani"] = -jnp.sum(g["bndiff"], axis=0, keepdims=True)
    # hprebn feeds bndiff directly and bnmeani = sum_i hprebn_i / n.
    g["hprebn"] = g["bndiff"] + jnp.ones_like(v["hprebn"]) * g["bnmeani"] / n
    # hprebn = embcat @ W1 + b1
    g["embcat"] = g["hprebn"] @ params["W1"].T
    g["W1"] = v["embcat"].T @ g["hprebn"]
    g["b1"] = jnp.sum(g["hprebn"], axis=0)
    # embcat = emb.reshape(n, -1): undo the reshape.
    g["emb"] = g["embcat"].reshape(v["emb"].shape)
    # emb = C[X]: every use of row C[c] adds its gradient (a scatter-add, repeated ids accumulate).
    g["C"] = embedding_backward(params["C"], X, g["emb"])
    return g


def embedding_backward(C: jax.Array, X: jax.Array, demb: jax.Array) -> jax.Array:
    """``dC[c] = sum over (i, j) with X[i, j] == c of demb[i, j]``: the transpose of a gather."""
    chex.assert_shape(demb, (*X.shape, C.shape[1]))
    return jnp.zeros_like(C).at[X].add(demb)


class FusedGrads(NamedTuple):
    """Output of :func:`fused_backward`: the loss, the parameter gradients and two inner gradients."""

    loss: jax.Array
    grads: Params
    dlogits: jax.Array
    dhprebn: jax.Array


def fused_backward(params: Params, X: jax.Array, Y: jax.Array) -> FusedGrads:
    """Loss and parameter gradients with the closed forms; the ``manual`` training mode.

    Forward: ``hprebn = concat(C[X]) W1 + b1``; batch norm with ``x_hat`` and
    ``s = (var + eps)^(-1/2)``; ``h = tanh(hpreact)``; ``logits = h W2 + b2``.
    Backward::

        dlogits = (softmax(logits) - onehot(Y)) / n
        dW2 = h^T dlogits          db2 = sum_i dlogits_i       dh = dlogits W2^T
        dhpreact = (1 - h^2) dh
        dbngain = sum_i dhpreact_i x_hat_i          dbnbias = sum_i dhpreact_i
        dhprebn = bngain s / n (n dhpreact - dbnbias - n/(n-1) x_hat dbngain)
        dW1 = embcat^T dhprebn     db1 = sum_i dhprebn_i
        dC  = scatter-add of (dhprebn W1^T) into the rows X selected
    """
    n = X.shape[0]
    v: dict[str, jax.Array] = {}

    def record(name: str, value: jax.Array) -> jax.Array:
        v[name] = value
        return value

    loss = model.forward(params, X, Y, rules="autodiff", tap=record)  # the training forward, taps recorded
    C, W1, W2, gain = params["C"], params["W1"], params["W2"], params["bngain"]
    embcat, x_hat, inv_std, h, logits = (v[k] for k in ("embcat", "bnraw", "bnvar_inv", "h", "logits"))

    dlogits = (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(Y, logits.shape[1], dtype=logits.dtype)) / n
    dhpreact = (1.0 - h * h) * (dlogits @ W2.T)
    dbnbias = jnp.sum(dhpreact, axis=0, keepdims=True)
    dbngain = jnp.sum(dhpreact * x_hat, axis=0, keepdims=True)
    dhprebn = (gain * inv_std / n) * (n * dhpreact - dbnbias - (n / (n - 1)) * x_hat * dbngain)
    grads = {
        "C": embedding_backward(C, X, (dhprebn @ W1.T).reshape(*X.shape, -1)),
        "W1": embcat.T @ dhprebn,
        "b1": jnp.sum(dhprebn, axis=0),
        "W2": h.T @ dlogits,
        "b2": jnp.sum(dlogits, axis=0),
        "bngain": dbngain,
        "bnbias": dbnbias,
    }
    return FusedGrads(loss, grads, dlogits, dhprebn)
