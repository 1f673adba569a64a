"""The backward pass by hand, at any depth: no ``jax.grad`` anywhere in this module.

Two versions, as in the tutorial:

* :func:`atomic_backward` walks back through every named intermediate of
  :func:`forward_intermediates`, one chain-rule step per line, block by block
  from the last to the first, and returns the gradient of the loss with respect
  to each intermediate (``hprebn[2]`` ...) and each parameter. It is for reading
  and for checking, not for speed.
* :func:`fused_backward` runs the model's training forward, recording the few
  values it needs (each block's input, ``x_hat`` and ``s``, ``h``; the ``exp`` of the
  shifted logits and their row sums, which give ``softmax(logits)``),
  and uses the closed forms of :mod:`jaxbirds.closed_forms` (derived in
  :mod:`jaxbirds.vjp`). It returns the loss and the parameter gradients, and is
  what ``manual`` training calls.

Both read :func:`jaxbirds.model.forward`, the one definition of the forward pass.

Notation: ``n`` is the batch size, ``dX`` is ``dloss/dX`` and has ``X``'s shape;
``t[l]`` is block ``l``'s intermediate ``t`` (:func:`jaxbirds.model.layer_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbirds import closed_forms, model
from jaxbirds.closed_forms import embedding_backward
from jaxbirds.model import Params, block_param_names, depth_of, layer_name, output_param_names
from jaxbirds.ops import BN_EPS

#: One block's intermediates under the tutorial's rules, in forward order (numbered per block).
BLOCK_INTERMEDIATES = ("hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw", "hpreact", "h")

#: The loss side's intermediates, in forward order.
LOSS_INTERMEDIATES = (
    "logits", "logit_maxes", "norm_logits", "counts", "counts_sum", "counts_sum_inv", "probs", "logprobs",
)  # fmt: skip


def intermediates(depth: int) -> tuple[str, ...]:
    """Every tutorial intermediate of a model with ``depth`` blocks, in forward order."""
    blocks = (layer_name(name, layer) for layer in range(1, depth + 1) for name in BLOCK_INTERMEDIATES)
    return ("emb", "embcat", *blocks, *LOSS_INTERMEDIATES)


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
        if name in values:
            raise ValueError(f"the intermediate {name} is tapped twice")
        values[name] = value + perturb[name] if name in perturb else value
        return values[name]

    values["loss"] = model.forward(params, X, Y, rules="tutorial", tap=record)
    return values


def atomic_backward(
    params: Params, X: jax.Array, Y: jax.Array, v: Mapping[str, jax.Array], eps: float = BN_EPS
) -> dict[str, jax.Array]:
    """Gradients of the loss for every intermediate and parameter, one chain-rule step at a time.

    ``v`` is the output of :func:`forward_intermediates`; ``eps`` batch norm's
    (the forward's). Each line reads ``d<input> = d<output> * d<output>/d<input>``,
    summed over every use of ``<input>``; where an input was broadcast in the
    forward pass, its gradient is summed over the broadcast axis in the backward pass.
    """
    g = loss_backward(v, Y)
    depth = depth_of(params)
    W, b = output_param_names(params)
    # logits = h[L] @ W{L+1} + b{L+1}
    top = layer_name("h", depth)
    g[top], g[W], g[b] = closed_forms.linear_backward(v[top], params[W], g["logits"])
    for layer in range(depth, 0, -1):
        g |= block_backward(params, layer, v, g[layer_name("h", layer)], eps)
        below = "embcat" if layer == 1 else layer_name("h", layer - 1)
        W, b, _, _ = block_param_names(layer)
        # hprebn[l] = h[l-1] @ Wl + bl  (h[0] is embcat)
        g[below], g[W], g[b] = closed_forms.linear_backward(v[below], params[W], g[layer_name("hprebn", layer)])
    # embcat = emb.reshape(n, -1): undo the reshape.
    g["emb"] = g["embcat"].reshape(v["emb"].shape)
    # emb = C[X]: every use of row C[c] adds its gradient (a scatter-add, repeated ids accumulate).
    g["C"] = embedding_backward(params["C"], X, g["emb"])
    return g


def loss_backward(v: Mapping[str, jax.Array], Y: jax.Array) -> dict[str, jax.Array]:
    """The atomic pass from the loss back to ``dlogits``, through the tutorial's cross-entropy steps."""
    n, n_classes = v["logits"].shape
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
    ties = jnp.sum(is_max, axis=1, keepdims=True)  # how many entries share the row's maximum
    g["logits"] = g["norm_logits"] + (g["logit_maxes"] / ties) * is_max
    return g


def block_backward(
    params: Params, layer: int, v: Mapping[str, jax.Array], dh: jax.Array, eps: float = BN_EPS
) -> dict[str, jax.Array]:
    """The atomic pass through block ``layer``, from ``dh[l]`` back to ``dhprebn[l]``: its intermediates'
    and its batch norm's gradients, keyed ``hpreact[l]`` ... ``hprebn[l]``, ``bngainl``, ``bnbiasl``."""
    _, _, gain, bias = block_param_names(layer)
    n = dh.shape[0]
    t = {name: v[layer_name(name, layer)] for name in BLOCK_INTERMEDIATES}  # this block's forward values
    g: dict[str, jax.Array] = {"h": dh}
    # h = tanh(hpreact): tanh' = 1 - h^2, in the order JAX's rule rounds (see closed_forms.tanh_backward).
    g["hpreact"] = closed_forms.tanh_backward(t["h"], g["h"])
    # hpreact = bngain * bnraw + bnbias: gain and bias (1, H) were broadcast over rows.
    dgain = jnp.sum(t["bnraw"] * g["hpreact"], axis=0, keepdims=True)
    dbias = jnp.sum(g["hpreact"], axis=0, keepdims=True)
    g["bnraw"] = params[gain] * g["hpreact"]
    # bnraw = bndiff * bnvar_inv: bnvar_inv (1, H) was broadcast over rows.
    g["bnvar_inv"] = jnp.sum(t["bndiff"] * g["bnraw"], axis=0, keepdims=True)
    # bnvar_inv = (bnvar + eps) ** -1/2
    g["bnvar"] = -0.5 * (t["bnvar"] + eps) ** -1.5 * g["bnvar_inv"]
    # bnvar = sum_i bndiff2_i / (n - 1): every row gets the same share.
    g["bndiff2"] = jnp.ones_like(t["bndiff2"]) * g["bnvar"] / (n - 1)
    # bndiff feeds bnraw directly and bndiff2 = bndiff ** 2.
    g["bndiff"] = g["bnraw"] * t["bnvar_inv"] + 2.0 * t["bndiff"] * g["bndiff2"]
    # bndiff = hprebn - bnmeani: bnmeani (1, H) was broadcast over rows.
    g["bnmeani"] = -jnp.sum(g["bndiff"], axis=0, keepdims=True)
    # hprebn feeds bndiff directly and bnmeani = sum_i hprebn_i / n.
    g["hprebn"] = g["bndiff"] + jnp.ones_like(t["hprebn"]) * g["bnmeani"] / n
    return {layer_name(name, layer): value for name, value in g.items()} | {gain: dgain, bias: dbias}


class FusedGrads(NamedTuple):
    """Output of :func:`fused_backward`: the loss, the parameter gradients and the inner gradients the
    checker compares (``logits`` and each block's ``hprebn[l]``)."""

    loss: jax.Array
    grads: Params
    inner: dict[str, jax.Array]


def fused_backward(params: Params, X: jax.Array, Y: jax.Array) -> FusedGrads:
    """Loss and parameter gradients with the closed forms; the ``manual`` training mode.

    Forward: ``h[0] = concat(C[X])``; per block ``hprebn = h[l-1] Wl + bl``, batch
    norm with ``x_hat`` and ``s = (var + eps)^(-1/2)``, ``h[l] = tanh(hpreact)``;
    ``logits = h[L] W{L+1} + b{L+1}``. Backward, the output layer then each block
    from the last::

        dlogits = (softmax(logits) - onehot(Y)) / n
        dW{L+1} = h[L]^T dlogits     db{L+1} = sum_i dlogits_i     dh[L] = dlogits W{L+1}^T
        per block l = L .. 1:
          dhpreact = (1 - h[l]^2) dh[l]
          dbngainl = sum_i dhpreact_i x_hat_i          dbnbiasl = sum_i dhpreact_i
          dhprebn = bngainl s / n (n dhpreact - dbnbiasl - n/(n-1) x_hat dbngainl)
          dWl = h[l-1]^T dhprebn     dbl = sum_i dhprebn_i       dh[l-1] = dhprebn Wl^T
        dC  = scatter-add of dh[0] into the rows X selected
    """
    v: dict[str, jax.Array] = {}

    def record(name: str, value: jax.Array) -> jax.Array:
        v[name] = value
        return value

    loss = model.forward(params, X, Y, rules="autodiff", tap=record)  # the training forward, taps recorded
    depth = depth_of(params)
    grads: Params = {}
    probs = v["counts"] / v["counts_sum"]
    inner = {"logits": closed_forms.cross_entropy_backward(probs, Y)}
    W, b = output_param_names(params)
    dh, grads[W], grads[b] = closed_forms.linear_backward(v[layer_name("h", depth)], params[W], inner["logits"])
    for layer in range(depth, 0, -1):
        W, b, gain, bias = block_param_names(layer)
        x_hat, inv_std = v[layer_name("bnraw", layer)], v[layer_name("bnvar_inv", layer)]
        dhpreact = closed_forms.tanh_backward(v[layer_name("h", layer)], dh)
        dhprebn, grads[gain], grads[bias] = closed_forms.batch_norm_backward(x_hat, inv_std, params[gain], dhpreact)
        inner[layer_name("hprebn", layer)] = dhprebn
        below = v["embcat"] if layer == 1 else v[layer_name("h", layer - 1)]
        dh, grads[W], grads[b] = closed_forms.linear_backward(below, params[W], dhprebn)
    grads["C"] = embedding_backward(params["C"], X, dh.reshape(*X.shape, -1))
    return FusedGrads(loss, grads, inner)
