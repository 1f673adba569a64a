"""``jax.grad`` as the referee for every hand-written gradient.

* :func:`atomic_vs_reference` - ``jax.grad`` of the loss with respect to every
  parameter *and* every named intermediate of :func:`jaxbirds.manual.forward_intermediates`,
  next to the atomic manual pass. JAX can only differentiate with respect to
  inputs, so each intermediate gets a zero perturbation ``t = expression + p_t``
  and we differentiate with respect to the ``p_t`` (``dloss/dp_t = dloss/dt``).
* :func:`fused_vs_reference`, :func:`custom_vjp_vs_reference` - the same for the
  fused manual pass and for the model built on the custom-VJP rules.
* :func:`compare` - the tutorial's ``cmp``, extended: exact (bitwise), close
  (``|a - b| <= atol + rtol |b|`` elementwise), max absolute and relative difference.
* :func:`atomic_rows`, :func:`fused_rows`, :func:`custom_vjp_rows` - the three tables.

Each comparison is one compiled program in which ours and the reference read
the same forward values. That is what makes bitwise equality possible at all:
two separately compiled forward passes may fuse and round differently, and a
one-ulp difference in ``logits`` is amplified by the sums of the backward pass.
With a shared forward, the atomic pass matches ``jax.grad`` bit for bit on
every tensor; the fused pass and the custom rules use different (closed-form)
arithmetic, so they agree to rounding error, not bitwise.
* :func:`finite_difference_check` - ``jax.test_util.check_grads`` on both custom rules.

A note on ``b1`` (and ``logit_maxes``): batch norm subtracts the batch mean, so
``b1`` cannot change the loss and its true gradient is exactly zero; likewise
the row maximum subtracted inside cross-entropy. What both computations return
is rounding noise (~1e-9 in float32), so their *relative* difference is
meaningless. That is why "close" uses an absolute floor ``atol`` as well.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from jaxbirds import manual, model, ops, vjp
from jaxbirds.model import PARAM_NAMES, Params


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


#: The acceptance tolerances, per dtype.
TOLERANCES = {
    np.dtype("float32"): Tolerance(rtol=1e-5, atol=1e-8),
    np.dtype("float64"): Tolerance(rtol=1e-10, atol=1e-14),
}


def tolerance_for(dtype) -> Tolerance:
    try:
        return TOLERANCES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no tolerance is defined for {dtype}; use float32 or float64") from None


class Row(NamedTuple):
    """One line of a comparison table."""

    name: str
    shape: tuple[int, ...]
    exact: bool
    close: bool
    max_abs: float
    max_rel: float
    max_ref: float  # the largest |reference| value, to put the differences in scale


def compare(name: str, ours: jax.Array, ref: jax.Array, tol: Tolerance) -> Row:
    """The tutorial's ``cmp``: is ``ours`` bitwise equal to, or close to, ``ref``?"""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} does not match the reference {ref.shape}")
    diff = np.abs(ours - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    return Row(
        name=name,
        shape=ref.shape,
        exact=bool(np.array_equal(ours, ref)),
        close=bool(np.all(diff <= tol.atol + tol.rtol * np.abs(ref))),
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        max_ref=float(np.abs(ref).max(initial=0.0)),
    )


def _zeros_like_shapes(shapes: Mapping[str, jax.ShapeDtypeStruct], names) -> dict[str, jax.Array]:
    return {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in names}


@jax.jit
def atomic_vs_reference(params: Params, X: jax.Array, Y: jax.Array) -> tuple[dict, dict]:
    """The atomic manual pass and ``jax.grad``, from one shared forward pass.

    ``jax.vjp`` of the perturbed forward returns the intermediates as well as
    the pullback, so the manual pass reads the very forward values that JAX
    differentiates, as in the tutorial (where both backward passes share the
    forward tensors). Returns ``(ours, reference)``, keyed by intermediate and
    parameter name.
    """
    shapes = jax.eval_shape(manual.forward_intermediates, params, X, Y)
    zeros = _zeros_like_shapes(shapes, manual.INTERMEDIATES)

    def loss(params, perturb):
        values = manual.forward_intermediates(params, X, Y, perturb)
        return values["loss"], values

    loss_value, pullback, values = jax.vjp(loss, params, zeros, has_aux=True)
    dparams, dinter = pullback(jnp.ones_like(loss_value))
    return manual.atomic_backward(params, X, Y, values), {**dinter, **dparams}


def _plain_loss_with_taps(params: Params, X, Y, d_hprebn, d_logits) -> jax.Array:
    """The plain model's loss with zero taps added to ``hprebn`` and ``logits`` (see the module doc)."""
    hprebn = model.hidden_preactivation(params, X) + d_hprebn
    h = jnp.tanh(ops.batch_norm(hprebn, params["bngain"], params["bnbias"]))
    return ops.cross_entropy(h @ params["W2"] + params["b2"] + d_logits, Y)


@jax.jit
def fused_vs_reference(params: Params, X: jax.Array, Y: jax.Array) -> tuple[dict, dict]:
    """The fused manual pass and ``jax.grad`` of the plain model: parameters, ``hprebn``, ``logits``."""
    n, dtype = X.shape[0], params["W1"].dtype
    taps = (jnp.zeros((n, params["W1"].shape[1]), dtype), jnp.zeros((n, params["W2"].shape[1]), dtype))
    dparams, d_hprebn, d_logits = jax.grad(_plain_loss_with_taps, argnums=(0, 3, 4))(params, X, Y, *taps)
    got = manual.fused_backward(params, X, Y)
    ours = {"logits": got.dlogits, "hprebn": got.dhprebn, **got.grads}
    return ours, {"logits": d_logits, "hprebn": d_hprebn, **dparams}


@jax.jit
def custom_vjp_vs_reference(params: Params, X: jax.Array, Y: jax.Array) -> tuple[dict, dict]:
    """``jax.grad`` through the custom-VJP rules and through the plain model: parameters."""
    ours = jax.grad(model.loss)(params, X, Y, None, "custom_vjp")
    return ours, jax.grad(model.loss)(params, X, Y)


def atomic_rows(params: Params, X, Y, tol: Tolerance) -> list[Row]:
    """Table rows for the atomic pass: every intermediate (loss side first), then every parameter."""
    ours, ref = atomic_vs_reference(params, X, Y)
    return [compare(name, ours[name], ref[name], tol) for name in (*reversed(manual.INTERMEDIATES), *PARAM_NAMES)]


def fused_rows(params: Params, X, Y, tol: Tolerance) -> list[Row]:
    """Table rows for the fused pass: ``logits``, ``hprebn``, then every parameter."""
    ours, ref = fused_vs_reference(params, X, Y)
    return [compare(name, ours[name], ref[name], tol) for name in ("logits", "hprebn", *PARAM_NAMES)]


def custom_vjp_rows(params: Params, X, Y, tol: Tolerance) -> list[Row]:
    """Table rows for the custom-VJP model: every parameter."""
    ours, ref = custom_vjp_vs_reference(params, X, Y)
    return [compare(name, ours[name], ref[name], tol) for name in PARAM_NAMES]


def format_table(rows: list[Row], title: str) -> str:
    """A markdown table of ``rows``."""
    lines = [
        f"### {title}",
        "",
        "| tensor | shape | exact | close | max abs diff | max rel diff | max abs ref |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = "x".join(map(str, r.shape)) or "scalar"
        lines.append(
            f"| {r.name} | {shape} | {'yes' if r.exact else 'no'} | {'yes' if r.close else '**NO**'} "
            f"| {r.max_abs:.3e} | {r.max_rel:.3e} | {r.max_ref:.3e} |"
        )
    return "\n".join(lines)


def finite_difference_check(key: jax.Array, dtype=jnp.float64, n: int = 8, classes: int = 5, hidden: int = 4) -> None:
    """``check_grads`` (reverse mode) on both custom rules; raises ``AssertionError`` on a mismatch.

    The finite differences are central differences with step ``eps``; in float32
    they are only good to a few digits, so float64 is the meaningful check.
    """
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    logits = jax.random.normal(k1, (n, classes), dtype)
    labels = jax.random.randint(k2, (n,), 0, classes)
    x = jax.random.normal(k3, (n, hidden), dtype) * 2.0 + 0.5
    gain = 1.0 + 0.1 * jax.random.normal(k4, (1, hidden), dtype)
    bias = 0.1 * jax.random.normal(k5, (1, hidden), dtype)
    precise = np.dtype(dtype) == np.float64
    eps, tol = (1e-6, 1e-6) if precise else (1e-2, 5e-2)
    # jit: check_grads evaluates each function at many perturbed points of one shape
    ce = jax.jit(lambda lg: vjp.cross_entropy(lg, labels))
    check_grads(ce, (logits,), order=1, modes=("rev",), eps=eps, atol=tol, rtol=tol)
    check_grads(jax.jit(vjp.batch_norm), (x, gain, bias), order=1, modes=("rev",), eps=eps, atol=tol, rtol=tol)
