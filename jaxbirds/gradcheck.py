"""``jax.grad`` as the referee for every hand-written gradient.

* :func:`atomic_vs_reference` - ``jax.grad`` of the loss with respect to every
  parameter *and* every named intermediate of the tutorial's forward, next to
  the atomic manual pass. JAX can only differentiate with respect to inputs, so
  each intermediate gets a zero perturbation ``t = expression + p_t`` (a *tap*,
  see :func:`jaxbirds.model.forward`) and we differentiate with respect to the
  ``p_t`` (``dloss/dp_t = dloss/dt``). Both sides read one shared forward pass
  (``jax.vjp`` returns the intermediates with the pullback), as in the tutorial,
  where both backward passes read the same forward tensors.
* :func:`fused_vs_reference`, :func:`custom_vs_reference` - the fused manual
  pass, and ``jax.grad`` through the custom-VJP rules or through the custom-JVP
  rules (which JAX transposes), against ``jax.grad`` of the plain model:
  parameters, ``hprebn`` and ``logits``. Each side runs its own forward pass
  (the fused pass records what it needs from it).
* :func:`summary_table` - all methods side by side; :func:`backward_jaxprs` -
  what each rule set's backward pass of batch norm compiles from.
* :func:`compare` - the tutorial's ``cmp``, extended: exact (bitwise), close
  (within the tolerance below), the largest difference and what was allowed.
* :func:`finite_difference_check` - ``jax.test_util.check_grads`` on both custom rules.

Every reference is :func:`jaxbirds.model.forward`, the forward pass that trains.

**The tolerance.** A tensor ``T`` passes when ``max|ours - ref| <= rtol * max|ref|
+ noise * N_T``, two terms with two jobs:

* ``rtol * max|ref|`` is normwise: rounding in a different but correct order of
  operations moves each entry by a few units in the last place *of the largest
  terms that made it*, so small entries are judged against the tensor's largest,
  not against themselves. ``rtol`` is ~100 units of roundoff (float32: 1e-5),
  so a rule that is wrong by 1e-4 relative in a tensor's largest entries fails
  by a factor of ten.
* ``noise * N_T`` is the rounding noise of the reference itself on this tensor,
  at this point, measured: ``N_T = max|ref_T(float32) - ref_T(float64)|`` for the
  same parameters and batch (in a float64 check, scaled down by the ratio of the
  two unit roundoffs). Where the exact gradient is zero or nearly so, the
  computed values are pure rounding noise and no order of operations is more
  right than another: ``b1`` and ``logit_maxes`` always (batch norm removes a
  shift of ``hprebn``; softmax ignores a shift of the logits), and at batch 2
  everything below batch norm (``x_hat = +-1/sqrt(2)`` whatever ``x``, so
  ``dhprebn`` is ~``eps/var`` of the terms it is computed from). There the noise
  term dominates, and ``noise`` = 16 allows ours to be as noisy as JAX's own
  answer, with room for the luck of one sample. Elsewhere ``N_T`` is a few units
  of roundoff of ``max|ref|`` and the normwise term decides.

``b1`` and ``logit_maxes`` also get a floor from the gradient they are sums of
(see :data:`SUMMED_FROM`): "the size of the gradients they sit among".

Matrix products are pinned to full float32 precision here
(``jax.default_matmul_precision("highest")``): on NVIDIA GPUs JAX may otherwise
run float32 matmuls in TF32, with 10-bit mantissas, and every comparison would
measure TF32's rounding instead of the rules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from jaxbirds import jvp, manual, model, ops, vjp
from jaxbirds.errors import ConfigError
from jaxbirds.model import PARAM_NAMES, Params

#: The matmul precision every comparison runs at (see the module docstring).
PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # allowed max |ours - ref|, relative to max |ref| of the tensor
    noise: float  # allowed multiple of the reference's own rounding noise on the tensor


#: The acceptance tolerances, per dtype.
TOLERANCES = {
    np.dtype("float32"): Tolerance(rtol=1e-5, noise=16.0),
    np.dtype("float64"): Tolerance(rtol=1e-10, noise=16.0),
}


def tolerance_for(dtype) -> Tolerance:
    try:
        return TOLERANCES[np.dtype(dtype)]
    except KeyError:
        raise ConfigError(f"no tolerance is defined for {np.dtype(dtype)}; use float32 or float64") from None


class Row(NamedTuple):
    """One line of a comparison table."""

    name: str
    shape: tuple[int, ...]
    exact: bool
    close: bool
    max_abs: float  # max |ours - ref|
    allowed: float  # the largest max_abs that passes
    max_ref: float  # max |ref|, to put the differences in scale
    noise: float  # the reference's own rounding noise on this tensor

    @property
    def max_rel(self) -> float:
        """``max_abs / max_ref``: the normwise relative difference."""
        return 0.0 if self.max_abs == 0 else (self.max_abs / self.max_ref if self.max_ref else float("inf"))


def compare(name: str, ours, ref, tol: Tolerance, noise: float = 0.0, floor: float = 0.0) -> Row:
    """The tutorial's ``cmp``: is ``ours`` bitwise equal to, or within tolerance of, ``ref``?

    ``noise`` is the reference's own rounding noise on this tensor; ``floor`` a
    lower bound for the allowance (see :data:`SUMMED_FROM`).
    """
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} does not match the reference {ref.shape}")
    max_abs = float(np.abs(ours.astype(np.float64) - ref).max(initial=0.0))
    scale = float(np.abs(ref).max(initial=0.0))
    allowed = max(tol.rtol * scale + tol.noise * noise, floor)
    return Row(
        name=name,
        shape=ref.shape,
        exact=bool(np.array_equal(ours, ref)),
        close=bool(max_abs <= allowed),
        max_abs=max_abs,
        allowed=allowed,
        max_ref=scale,
        noise=noise,
    )


# --------------------------------------------------------------------------- #
# Gradients                                                                   #
# --------------------------------------------------------------------------- #


def _perturbing(perturb: Mapping[str, jax.Array]):
    def tap(name: str, value: jax.Array) -> jax.Array:
        return value + perturb[name] if name in perturb else value

    return tap


def _tap_zeros(params: Params, X, Y, rules: str, names: Sequence[str]) -> dict[str, jax.Array]:
    """Zeros shaped like the named intermediates of the forward pass under ``rules``."""

    def intermediates(params):
        seen = {}
        model.forward(params, X, Y, rules=rules, tap=lambda name, value: seen.setdefault(name, value))
        return seen

    shapes = jax.eval_shape(intermediates, params)
    return {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in names}


@functools.partial(jax.jit, static_argnames=("rules", "names"))
def gradients(params: Params, X, Y, rules: str = "autodiff", names: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """``jax.grad`` of the loss under ``rules`` for every parameter and the named intermediates."""
    zeros = _tap_zeros(params, X, Y, rules, names)

    def loss(params, perturb):
        return model.forward(params, X, Y, rules=rules, tap=_perturbing(perturb))

    dparams, dtaps = jax.grad(loss, argnums=(0, 1))(params, zeros)
    return {**dtaps, **dparams}


@jax.jit
def atomic_vs_reference(params: Params, X: jax.Array, Y: jax.Array) -> tuple[dict, dict]:
    """The atomic manual pass and ``jax.grad``, from one shared forward pass.

    ``jax.vjp`` of the perturbed forward returns the intermediates as well as
    the pullback, so the manual pass reads the very forward values that JAX
    differentiates. Returns ``(ours, reference)``, keyed by intermediate and
    parameter name.
    """
    zeros = _tap_zeros(params, X, Y, "tutorial", manual.INTERMEDIATES)

    def loss(params, perturb):
        values = manual.forward_intermediates(params, X, Y, perturb)
        return values["loss"], values

    loss_value, pullback, values = jax.vjp(loss, params, zeros, has_aux=True)
    dparams, dinter = pullback(jnp.ones_like(loss_value))
    return manual.atomic_backward(params, X, Y, values), {**dinter, **dparams}


BOUNDARY = ("hprebn", "logits")  # the intermediates the fused pass and the custom rules report


@jax.jit
def fused_vs_reference(params: Params, X: jax.Array, Y: jax.Array) -> tuple[dict, dict]:
    """The fused manual pass and ``jax.grad`` of the plain model: parameters, ``hprebn``, ``logits``."""
    got = manual.fused_backward(params, X, Y)
    ours = {"logits": got.dlogits, "hprebn": got.dhprebn, **got.grads}
    return ours, gradients(params, X, Y, "autodiff", BOUNDARY)


@functools.partial(jax.jit, static_argnames="rules")
def custom_vs_reference(params: Params, X: jax.Array, Y: jax.Array, rules: str) -> tuple[dict, dict]:
    """``jax.grad`` through hand-written rules (``custom_vjp``, or ``custom_jvp`` transposed) and
    through the plain model."""
    return gradients(params, X, Y, rules, BOUNDARY), gradients(params, X, Y, "autodiff", BOUNDARY)


def reference_noise(params: Params, X, Y, rules: str, names: tuple[str, ...]) -> dict[str, float]:
    """``max|ref(float32) - ref(float64)|`` per tensor, in units of ``params``' dtype.

    The same parameters and batch, differentiated by ``jax.grad`` under ``rules``
    in both precisions. For float64 parameters, the float32 side is computed from
    them rounded to float32, and the difference is scaled by ``eps64 / eps32``:
    the same algorithm on the same inputs makes rounding errors proportional to
    the unit roundoff.
    """
    dtype = params["W1"].dtype
    with jax.enable_x64(True):
        low = gradients(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), X, Y, rules, names)
        high = gradients(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params), X, Y, rules, names)
        diff = {k: float(jnp.max(jnp.abs(low[k].astype(jnp.float64) - high[k]))) for k in high}
    scale = float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)
    return {k: v * scale for k, v in diff.items()}


#: Gradients whose exact value is zero, and the gradient each is a plain sum of:
#: ``db1 = sum_i dhprebn_i`` (batch norm removes any shift of hprebn) and
#: ``dlogit_maxes = -sum_j dnorm_logits_ij`` (softmax ignores any shift of a row).
#: A sum carries the errors of its terms, so such a tensor may differ by as many
#: times the allowance of its terms as it sums of them. Elsewhere this is far
#: below the tensor's own allowance; here it is the only meaningful scale (the
#: reference noise can itself be exactly 0, when two terms cancel exactly).
SUMMED_FROM = {"b1": "hprebn", "logit_maxes": "norm_logits"}


def _rows(ours, ref, noise, names, tol) -> list[Row]:
    rows = {name: compare(name, ours[name], ref[name], tol, noise[name]) for name in names}
    for name, source in SUMMED_FROM.items():
        if name in rows and source in rows:
            terms = np.size(ref[source]) // np.size(ref[name])
            rows[name] = compare(name, ours[name], ref[name], tol, noise[name], floor=terms * rows[source].allowed)
    return [rows[name] for name in names]


def atomic_rows(params: Params, X, Y, tol: Tolerance) -> list[Row]:
    """Table rows for the atomic pass: every intermediate (loss side first), then every parameter."""
    with jax.default_matmul_precision(PRECISION):
        ours, ref = atomic_vs_reference(params, X, Y)
        noise = reference_noise(params, X, Y, "tutorial", manual.INTERMEDIATES)
    return _rows(ours, ref, noise, (*reversed(manual.INTERMEDIATES), *PARAM_NAMES), tol)


def boundary_noise(params: Params, X, Y) -> dict[str, float]:
    """:func:`reference_noise` of the plain model at the parameters and ``BOUNDARY``: the reference of
    the fused, custom_vjp and custom_jvp tables (compute it once, pass it to each)."""
    with jax.default_matmul_precision(PRECISION):
        return reference_noise(params, X, Y, "autodiff", BOUNDARY)


def fused_rows(params: Params, X, Y, tol: Tolerance, noise: dict[str, float] | None = None) -> list[Row]:
    """Table rows for the fused pass: ``logits``, ``hprebn``, then every parameter."""
    noise = noise or boundary_noise(params, X, Y)
    with jax.default_matmul_precision(PRECISION):
        ours, ref = fused_vs_reference(params, X, Y)
    return _rows(ours, ref, noise, ("logits", "hprebn", *PARAM_NAMES), tol)


def custom_vjp_rows(params: Params, X, Y, tol: Tolerance, noise: dict[str, float] | None = None) -> list[Row]:
    """Table rows for the custom-VJP model: ``logits``, ``hprebn``, then every parameter."""
    return _custom_rows(params, X, Y, tol, "custom_vjp", noise)


def custom_jvp_rows(params: Params, X, Y, tol: Tolerance, noise: dict[str, float] | None = None) -> list[Row]:
    """Table rows for the custom-JVP model (reverse mode by transposition): as :func:`custom_vjp_rows`."""
    return _custom_rows(params, X, Y, tol, "custom_jvp", noise)


def _custom_rows(params: Params, X, Y, tol: Tolerance, rules: str, noise: dict[str, float] | None) -> list[Row]:
    noise = noise or boundary_noise(params, X, Y)
    with jax.default_matmul_precision(PRECISION):
        ours, ref = custom_vs_reference(params, X, Y, rules)
    return _rows(ours, ref, noise, ("logits", "hprebn", *PARAM_NAMES), tol)


def all_tables(params: Params, X, Y, tol: Tolerance) -> dict[str, list[Row]]:
    """Every method's table against ``jax.grad``, keyed by method (the reference noise measured once)."""
    noise = boundary_noise(params, X, Y)
    return {
        "manual atomic": atomic_rows(params, X, Y, tol),
        "manual fused": fused_rows(params, X, Y, tol, noise),
        "custom_vjp": custom_vjp_rows(params, X, Y, tol, noise),
        "custom_jvp": custom_jvp_rows(params, X, Y, tol, noise),
    }


def summary_table(tables: Mapping[str, list[Row]], title: str) -> str:
    """One table, one column per method, over the tensors every method reports: each tensor's largest
    difference as a share of its allowance ("exact" when bitwise equal, bold when over 1)."""
    reported = [{row.name for row in rows} for rows in tables.values()]
    names = [row.name for row in next(iter(tables.values())) if all(row.name in r for r in reported)]
    cells = {(method, row.name): row for method, rows in tables.items() for row in rows}

    def cell(row: Row) -> str:
        if row.exact:
            return "exact"
        share = f"{row.max_abs / row.allowed:.2g}" if row.allowed > 0 else "inf"
        return share if row.close else f"**{share}**"

    lines = [f"### {title}", "", "| tensor | " + " | ".join(tables) + " |", "| --- |" + " ---: |" * len(tables)]
    lines += [f"| {name} | " + " | ".join(cell(cells[m, name]) for m in tables) + " |" for name in names]
    return "\n".join(lines)


def backward_jaxprs(n: int = 32, hidden: int = 200, dtype=jnp.float32) -> dict[str, jax.core.ClosedJaxpr]:
    """The backward pass of batch norm under each rule set, as a jaxpr: the pullback of a cotangent
    ``dy`` through ``y = batch_norm(x, gain, bias)``, with the forward's residuals as constants."""
    x = jnp.zeros((n, hidden), dtype) + jnp.arange(n, dtype=dtype)[:, None]
    gain, bias = jnp.ones((1, hidden), dtype), jnp.zeros((1, hidden), dtype)
    rules = {"autodiff": ops.batch_norm, "custom_vjp": vjp.batch_norm, "custom_jvp": jvp.batch_norm}
    out = {}
    for name, fn in rules.items():
        _, pullback = jax.vjp(fn, x, gain, bias)
        out[name] = jax.make_jaxpr(pullback)(jnp.ones_like(x))
    return out


def format_table(rows: list[Row], title: str) -> str:
    """A markdown table of ``rows``."""
    lines = [
        f"### {title}",
        "",
        "| tensor | shape | exact | close | max abs diff | allowed | max abs ref | ref noise |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = "x".join(map(str, r.shape)) or "scalar"
        lines.append(
            f"| {r.name} | {shape} | {'yes' if r.exact else 'no'} | {'yes' if r.close else '**NO**'} "
            f"| {r.max_abs:.3e} | {r.allowed:.3e} | {r.max_ref:.3e} | {r.noise:.3e} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Finite differences                                                          #
# --------------------------------------------------------------------------- #


def finite_difference_check(key: jax.Array, n: int = 4, classes: int = 5, hidden: int = 4) -> None:
    """``check_grads`` on every hand-written rule, in float64; ``AssertionError`` on a mismatch.

    The custom_vjp rules in reverse mode (all they support), the custom_jvp
    rules in forward and reverse mode (reverse by JAX's transposition).

    Always float64, whatever the precision being checked elsewhere: central
    differences in float32 are good to ~3 digits (step 1e-2), too coarse to see
    an error such as batch norm's missing ``n/(n-1)`` (a few percent of ``dx``
    at ``n = 32``). In float64 (step 1e-6) they are good to ~1e-9, and the
    default ``n = 4`` makes ``n/(n-1)`` a third. The rules are dtype-generic, so
    this checks the very code that runs in float32.
    """
    with jax.enable_x64(True):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        dtype = jnp.float64
        logits = jax.random.normal(k1, (n, classes), dtype)
        labels = jax.random.randint(k2, (n,), 0, classes)
        x = jax.random.normal(k3, (n, hidden), dtype) * 2.0 + 0.5
        gain = 1.0 + 0.1 * jax.random.normal(k4, (1, hidden), dtype)
        bias = 0.1 * jax.random.normal(k5, (1, hidden), dtype)
        tol = dict(eps=1e-6, atol=1e-7, rtol=1e-7)
        # jit: check_grads evaluates each function at many perturbed points of one shape
        for module, modes in ((vjp, ("rev",)), (jvp, ("fwd", "rev"))):
            ce = jax.jit(lambda lg, module=module: module.cross_entropy(lg, labels))
            check_grads(ce, (logits,), order=1, modes=modes, **tol)
            check_grads(jax.jit(module.batch_norm), (x, gain, bias), order=1, modes=modes, **tol)
