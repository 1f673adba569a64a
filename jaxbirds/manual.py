"""The backward pass by hand: no ``jax.grad`` anywhere in this module.

Two versions, as in the tutorial:

* :func:`atomic_backward` walks back through every named intermediate of
  :func:`forward_intermediates`, one chain-rule step per line, and returns the
  gradient of the loss with respect to each intermediate and each parameter.
  It is for reading and for checking, not for speed.
* :func:`fused_backward` runs a compact forward and uses the closed forms for
  cross-entropy and batch norm (derived in :mod:`jaxbirds.vjp`). It returns the
  loss and the parameter gradients, and is what ``manual`` training calls.

Notation: ``n`` is the batch size, ``dX`` is ``dloss/dX`` and has ``X``'s shape.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxbirds.model import Params
from jaxbirds.ops import BN_EPS, check_batch_size

#: The tutorial's intermediates, in forward order.
INTERMEDIATES = (
    "emb", "embcat", "hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw",
    "hpreact", "h", "logits", "logit_maxes", "norm_logits", "counts", "counts_sum",
    "counts_sum_inv", "probs", "logprobs",
)  # fmt: skip


def forward_intermediates(
    params: Params, X: jax.Array, Y: jax.Array, perturb: Mapping[str, jax.Array] | None = None
) -> dict[str, jax.Array]:
    """The forward pass split into the tutorial's named steps; returns every step and ``loss``.

    ``perturb`` optionally adds an array to each named intermediate right after
    it is computed (``t = expression + perturb[t]``). With zeros it changes
    nothing, but ``jax.grad`` with respect to the perturbations then yields
    ``dloss/dt`` for every intermediate ``t``: that is how :mod:`jaxbirds.gradcheck`
    obtains its reference values.
    """
    n = X.shape[0]
    check_batch_size(n)
    perturb = perturb or {}
    v: dict[str, jax.Array] = {}

    def put(name, value):
        v[name] = value + perturb[name] if name in perturb else value
        return v[name]

    C, W1, b1, W2, b2 = (params[k] for k in ("C", "W1", "b1", "W2", "b2"))
    emb = put("emb", C[X])  # (n, k, E)
    embcat = put("embcat", emb.reshape(n, -1))  # (n, kE)
    hprebn = put("hprebn", embcat @ W1 + b1)  # (n, H)
    bnmeani = put("bnmeani", jnp.sum(hprebn, axis=0, keepdims=True) / n)  # (1, H)
    bndiff = put("bndiff", hprebn - bnmeani)  # (n, H)
    bndiff2 = put("bndiff2", bndiff**2)  # (n, H)
    bnvar = put("bnvar", jnp.sum(bndiff2, axis=0, keepdims=True) / (n - 1))  # (1, H)
    bnvar_inv = put("bnvar_inv", (bnvar + BN_EPS) ** -0.5)  # (1, H)
    bnraw = put("bnraw", bndiff * bnvar_inv)  # (n, H)
    hpreact = put("hpreact", params["bngain"] * bnraw + params["bnbias"])  # (n, H)
    h = put("h", jnp.tanh(hpreact))  # (n, H)
    logits = put("logits", h @ W2 + b2)  # (n, V)
    logit_maxes = put("logit_maxes", jnp.max(logits, axis=1, keepdims=True))  # (n, 1)
    norm_logits = put("norm_logits", logits - logit_maxes)  # (n, V)
    counts = put("counts", jnp.exp(norm_logits))  # (n, V)
    counts_sum = put("counts_sum", jnp.sum(counts, axis=1, keepdims=True))  # (n, 1)
    counts_sum_inv = put("counts_sum_inv", counts_sum**-1)  # (n, 1)
    probs = put("probs", counts * counts_sum_inv)  # (n, V)
    logprobs = put("logprobs", jnp.log(probs))  # (n, V)
    v["loss"] = -jnp.mean(logprobs[jnp.arange(n), Y])
    return v


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
    # logits feeds norm_logits directly and the row max (through the arg-max position only).
    argmax = jax.nn.one_hot(jnp.argmax(v["logits"], axis=1), V, dtype=v["logits"].dtype)
    g["logits"] = g["norm_logits"] + g["logit_maxes"] * argmax
    # logits = h @ W2 + b2
    g["h"] = g["logits"] @ params["W2"].T
    g["W2"] = v["h"].T @ g["logits"]
    g["b2"] = jnp.sum(g["logits"], axis=0)
    # h = tanh(hpreact): tanh' = 1 - h^2 = (1 - h)(1 + h). With u = dh (1 - h) this is u + u h:
    # no cancellation in 1 - h^2 as |h| -> 1, and the very order JAX's tanh rule rounds in.
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
    check_batch_size(n)
    C, W1, W2, gain = params["C"], params["W1"], params["W2"], params["bngain"]
    embcat = C[X].reshape(n, -1)
    hprebn = embcat @ W1 + params["b1"]
    diff = hprebn - jnp.mean(hprebn, axis=0, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.sum(diff * diff, axis=0, keepdims=True) / (n - 1) + BN_EPS)
    x_hat = diff * inv_std
    h = jnp.tanh(gain * x_hat + params["bnbias"])
    logits = h @ W2 + params["b2"]

    shifted = logits - jnp.max(logits, axis=1, keepdims=True)
    counts = jnp.exp(shifted)
    counts_sum = jnp.sum(counts, axis=1, keepdims=True)
    loss = jnp.mean(jnp.log(counts_sum[:, 0]) - jnp.take_along_axis(shifted, Y[:, None], axis=1)[:, 0])

    dlogits = (counts / counts_sum - jax.nn.one_hot(Y, logits.shape[1], dtype=logits.dtype)) / n
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
