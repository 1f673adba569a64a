"""``jax.grad`` as the referee for every hand-written gradient.

* :func:`atomic_vs_reference` - ``jax.grad`` of the loss with respect to every
  parameter *and* every named intermediate of the tutorial's forward, next to
  the atomic manual pass. JAX can only differentiate with respect to inputs, so
  each intermediate gets a zero perturbation ``t = expression + p_t`` (a *tap*,
  see :func:`jaxbirds.model.forward`) and we differentiate with respect to the
  ``p_t`` (``dloss/dp_t = dloss/dt``). Both sides read one shared forward pass
  (``jax.vjp`` returns the intermediates with the pullback), as in the tutorial,
  where both backward passes read the same forward tensors.
* :func:`mode_vs_reference` - every other gradient mode of
  :mod:`jaxbirds.modes` (the fused manual pass, ``jax.grad`` through the
  custom-VJP rules or through the custom-JVP rules, which JAX transposes)
  against ``jax.grad`` of the plain model: parameters, ``logits`` and each
  block's ``hprebn[l]`` (:func:`boundary`). Each side runs its own forward pass
  (the fused pass records what it needs from it).
* :func:`summary_table` - all modes side by side; :func:`by_layer` - a
  table's rows grouped per layer, as the script prints them; :func:`backward_jaxprs` -
  what each rule set's backward pass of batch norm compiles from.
* :func:`compare` - the tutorial's ``cmp``, extended: exact (bitwise), close
  (within the tolerance below), the largest difference and what was allowed.
* :mod:`jaxbirds.finite_differences` - ``jax.test_util.check_grads`` on both custom
  rule sets (the script runs it beside these tables).

Every reference is :func:`jaxbirds.model.forward`, the forward pass that trains.

**The tolerance.** A tensor ``T`` passes when ``max|ours - ref| <= rtol * max|ref|
+ noise * N_T``, two terms with two jobs:

* ``rtol * max|ref|`` is normwise: rounding in a different but correct order of
  operations moves each entry by a few units in the last place *of the largest
  terms that made it*, so small entries are judged against the tensor's largest,
  not against themselves. ``rtol`` is ~100 units of roundoff (float32: 1e-5),
  so a rule that is wrong by 1e-4 relative in a tensor's largest entries fails
  by a factor of ten.
* ``noise * N_T`` is rounding noise, measured on the spot: ``N_T`` is the larger
  of the reference's own noise and (for the fused pass and the custom rules)
  the mode's own, each ``max|m_T(float32) - m_T(float64)|`` for that mode
  ``m`` (in a float64 check, scaled down by the ratio of the two unit
  roundoffs). Where the exact gradient is zero or nearly so, the computed values
  are pure rounding noise and no order of operations is more right than
  another: each block's ``bl`` and ``logit_maxes`` always (batch norm removes
  a shift of ``hprebn[l]``; softmax ignores a shift of the logits), and at batch 2 everything
  below batch norm (``x_hat = +-1/sqrt(2)`` whatever ``x``, so ``dhprebn`` is
  ~``eps/var`` of the terms it is computed from). There the noise term
  dominates. ``|ours - ref| <= |ours - exact| + |ref - exact|`` when ours is
  right, so both sides' noise belongs in the allowance: at batch 2 the closed
  forms cancel differently from JAX's chain of steps and are up to ~12 times
  noisier than the reference, which the reference's noise alone did not
  allow for. A wrong rule is wrong the same way in both precisions, so its
  own noise does not grow with its error. The atomic pass rounds as the
  reference does (bitwise, on CPU) and is judged on the reference's noise.
  Elsewhere ``N_T`` is a few units of roundoff of ``max|ref|`` and the
  normwise term decides.

**How the noise is measured.** One float32-vs-float64 difference is a sample
of a random quantity, and a tensor of few entries (``hprebn`` at batch 2 and
hidden 1 has two, equal and opposite) can draw a small one by chance: at batch
2, hidden 1, seed 1, one sample gave ``hprebn`` 4.6e-10 where others of the
same problem give up to 1.6e-8, and correct code failed. So ``N_T`` is the
largest over :data:`NOISE_SAMPLES` variants of the problem that round
differently (:func:`noise_inputs`: the batch rows permuted, every parameter
nudged by a few ulps; sample 0 is the problem itself, so ``N_T`` is never
smaller than the one-sample figure). Over hidden 1-4, batch 2-8 and 30 seeds
(float32), with the reference's noise alone the worst share of the allowance
any correct tensor used was 1.9 with one sample, 1.06 with two, and 0.74 with
three to twelve: the remaining 0.74 was not bad luck but the closed forms'
larger noise at batch 2, hence the mode's own noise in ``N_T``. With both
(measured on CPU), the worst share of any correct tensor, by samples 1 / 8 / 16:

==================  =====================  =====================
region              float32                float64
==================  =====================  =====================
batch 2             0.13 / 0.095 / 0.091   0.33 / 0.19 / 0.19
batch 3-8           0.094 / 0.045 / 0.039  < 0.001
batch 16-64         0.025 / 0.023 / 0.022  < 0.001
==================  =====================  =====================

(hidden 1-4 x 30 seeds below batch 16; hidden 8, 64, 256 x 5 seeds from 16.)
Eight samples keep a tensor of two entries from drawing its noise small by
chance (one sample was 30 times too small in the case above) at little cost:
one compiled program per mode, run once per sample, ~1 s of compilation
and milliseconds per sample at the default sizes. A rule off by 1e-4 (in
batch norm's custom_vjp rule, 10 seeds, hidden 64) fails at batch 3, 4 and 32
in 10 of 10 seeds in float32 (share of the allowance 2.2 at least) and at every
batch in float64; batch norm without ``n/(n-1)`` fails everywhere.

Each ``bl`` and ``logit_maxes`` also get a floor from the gradient they are sums of
(see :func:`summed_from`): "the size of the gradients they sit among".

**Bitwise.** The atomic pass and ``jax.grad`` read one shared forward pass and
round in the same order, so in float32 on CPU (XLA's CPU backend, where it is
verified over the slow tests' grids and at batch x hidden up to 4096 x 200,
1000 x 1000 and 32768 x 16; at depth 3 in tests/test_manual.py and the script's
``--hidden 64 32 16``) every one of its tensors (26 for one block, 13 more per
block after it) is bitwise equal to the
reference, and the script fails a run where one is not (:data:`BITWISE_CLAIMS`,
:func:`atomic_bitwise_claimed`). In float64 they are bitwise equal at most
shapes but not all: at batch 3, hidden 64 XLA compiles one step of one side
differently and ``bndiff`` and everything below it differ by an ulp. There,
and on other backends (where the two sides may be compiled to different
kernels), the atomic pass is held to the tolerance only.

**What the check cannot see.** At batch 2 the exact gradients below batch norm
are ~``eps/var`` of the terms they are computed from: in float32, rounding
noise. A rule off by 1e-4 there passed in 10 of 10 seeds (it used 0.01-0.05 of
the allowance); from batch 3 on it fails (above). In float64 the gradients at
batch 2 are well above the noise and the error is seen.

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

from jaxbirds import jvp, manual, model, modes, ops, vjp
from jaxbirds.errors import ConfigError
from jaxbirds.model import Params, depth_of, layer_name

#: The matmul precision every comparison runs at (see the module docstring).
PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # allowed max |ours - ref|, relative to max |ref| of the tensor
    noise_multiple: float  # allowed multiple of the measured rounding noise on the tensor (Row.noise)


#: The acceptance tolerances, per dtype.
TOLERANCES = {
    np.dtype("float32"): Tolerance(rtol=1e-5, noise_multiple=16.0),
    np.dtype("float64"): Tolerance(rtol=1e-10, noise_multiple=16.0),
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
    noise: float  # the measured rounding noise on this tensor (the larger of the reference's and the mode's)

    @property
    def max_rel(self) -> float:
        """``max_abs / max_ref``: the normwise relative difference."""
        return 0.0 if self.max_abs == 0 else (self.max_abs / self.max_ref if self.max_ref else float("inf"))


def compare(name: str, ours, ref, tol: Tolerance, noise: float = 0.0, floor: float = 0.0) -> Row:
    """The tutorial's ``cmp``: is ``ours`` bitwise equal to, or within tolerance of, ``ref``?

    ``noise`` is the reference's own rounding noise on this tensor; ``floor`` a
    lower bound for the allowance (see :func:`summed_from`).
    """
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} does not match the reference {ref.shape}")
    max_abs = float(np.abs(ours.astype(np.float64) - ref).max(initial=0.0))
    scale = float(np.abs(ref).max(initial=0.0))
    allowed = max(tol.rtol * scale + tol.noise_multiple * noise, floor)
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
    """Zeros shaped like the named intermediates of the forward pass under ``rules``.

    Raises ``ValueError`` if the forward taps a name twice: its two values
    would share one perturbation, and the gradient would be their sum.
    """

    def intermediates(params):
        seen = {}

        def record(name, value):
            if name in seen:
                raise ValueError(f"the intermediate {name} is tapped twice under the {rules} rules")
            seen[name] = value
            return value

        model.forward(params, X, Y, rules=rules, tap=record)
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
    zeros = _tap_zeros(params, X, Y, "tutorial", manual.intermediates(depth_of(params)))

    def loss(params, perturb):
        values = manual.forward_intermediates(params, X, Y, perturb)
        return values["loss"], values

    loss_value, pullback, values = jax.vjp(loss, params, zeros, has_aux=True)
    dparams, dinter = pullback(jnp.ones_like(loss_value))
    return manual.atomic_backward(params, X, Y, values), {**dinter, **dparams}


def boundary(depth: int) -> tuple[str, ...]:
    """The intermediates the fused pass and the custom rules report: ``logits``, then each block's
    ``hprebn[l]`` from the last block to the first (the order the backward pass reaches them)."""
    return ("logits", *(layer_name("hprebn", layer) for layer in range(depth, 0, -1)))


def mode_vs_reference(params: Params, X: jax.Array, Y: jax.Array, mode: str) -> tuple[dict, dict]:
    """A gradient mode other than the atomic pass (``manual``, ``custom_vjp``, ``custom_jvp``, ...) and
    ``jax.grad`` of the plain model: every parameter and the :func:`boundary` intermediates. Each side
    runs its own forward pass (the fused pass records what it needs from it)."""
    return _mode_vs_reference(params, X, Y, mode, boundary(depth_of(params)))


@functools.partial(jax.jit, static_argnames=("mode", "names"))
def _mode_vs_reference(params, X, Y, mode: str, names: tuple[str, ...]) -> tuple[dict, dict]:
    return mode_gradients(params, X, Y, mode, names), gradients(params, X, Y, REFERENCE, names)


#: How many independent float32-vs-float64 samples :func:`reference_noise` takes (see the module docstring).
NOISE_SAMPLES = 8

#: How far, in units of float32 roundoff, each sample moves every parameter (relative, uniform in +-).
NOISE_NUDGE_ULPS = 4


def noise_inputs(params32: Params, X, Y, seed: int, samples: int) -> list[tuple[Params, np.ndarray, np.ndarray]]:
    """``samples`` variants of one float32 problem ``(params, X, Y)``, each rounding differently.

    Sample 0 is the problem itself. Sample ``s > 0`` permutes the batch rows
    (every sum over the batch adds in another order) and scales each parameter
    by ``1 + k u32`` for a random integer ``|k| <= NOISE_NUDGE_ULPS`` (every
    product rounds differently). The exact gradients move by a few ulps times
    their condition number, which does not matter: each sample's float64 side
    is evaluated at that sample's own float32 values, exactly representable in
    float64. Drawn with NumPy from ``seed`` (host-side: drawing them in a
    compiled program took seconds to compile, for microseconds of work).
    """
    rng = np.random.default_rng(seed)
    params32 = {name: np.asarray(value, np.float32) for name, value in params32.items()}
    X, Y = np.asarray(X), np.asarray(Y)
    u32 = np.finfo(np.float32).eps
    variants = [(params32, X, Y)]
    for _ in range(samples - 1):
        order = rng.permutation(len(X))
        nudged = {}
        for name, value in params32.items():
            steps = rng.integers(-NOISE_NUDGE_ULPS, NOISE_NUDGE_ULPS + 1, value.shape)
            nudged[name] = value * (1 + steps.astype(np.float32) * u32)  # 1 + k u32 is exact in float32
        variants.append((nudged, X[order], Y[order]))
    return variants


#: The reference every other gradient mode is checked against.
REFERENCE = "autodiff"


def mode_gradients(params: Params, X, Y, mode: str, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """What ``mode`` computes, keyed as in the tables: a gradient mode of :data:`jaxbirds.modes.MODES`
    (``manual``: the fused pass, which reports the :func:`boundary` intermediates only), or ``jax.grad``
    under a rule set of :data:`jaxbirds.model.RULE_SETS` (``tutorial``: the reference of the atomic pass)."""
    if mode != "manual":
        rules = modes.MODES[mode].rules if mode in modes.MODES else mode
        return gradients(params, X, Y, rules, names)
    if not set(names) <= set(boundary(depth_of(params))):
        raise ValueError(f"the fused pass reports {boundary(depth_of(params))} only, not {names}")
    got = manual.fused_backward(params, X, Y)
    return {**{name: got.inner[name] for name in names}, **got.grads}


@functools.partial(jax.jit, static_argnames=("mode", "names"))
def noise_sample(params32: Params, X, Y, mode: str, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """``max|m(float32) - m(float64)|`` per tensor, for ``m`` the :func:`mode_gradients` of ``mode``
    at float32 parameters (the float64 side at the same values). Needs float64 enabled."""
    low = mode_gradients(params32, X, Y, mode, names)
    high = mode_gradients(jax.tree.map(lambda a: a.astype(jnp.float64), params32), X, Y, mode, names)
    return {k: jnp.max(jnp.abs(low[k].astype(jnp.float64) - high[k])) for k in high}


def noise_samples(params32: Params, X, Y, seed: int, mode: str, names: tuple[str, ...], samples: int):
    """:func:`noise_sample` for each of the ``samples`` variants of :func:`noise_inputs`: a dict of
    ``(samples,)`` arrays. One compiled program, run once per sample (as the unbatched program, so
    that each rounds as the check's own program does; a loop or ``vmap`` in one program compiles
    several times slower, or batches the products differently)."""
    per_sample = [noise_sample(p, x, y, mode, names) for p, x, y in noise_inputs(params32, X, Y, seed, samples)]
    return {k: np.array([float(d[k]) for d in per_sample]) for k in per_sample[0]}


def reference_noise(
    params: Params,
    X,
    Y,
    mode: str,
    names: tuple[str, ...],
    samples: int = NOISE_SAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """The rounding noise of ``mode`` (see :func:`mode_gradients`) per tensor, in units of ``params``'
    dtype: the largest ``max|m(float32) - m(float64)|`` over ``samples`` variants of the problem
    (:func:`noise_inputs`).

    For float64 parameters, the float32 side is computed from them rounded to
    float32, and the difference is scaled by ``eps64 / eps32``: the same
    algorithm on the same inputs makes rounding errors proportional to the unit
    roundoff. ``seed`` draws the variants.
    """
    dtype = params["W1"].dtype
    with jax.enable_x64(True), jax.default_matmul_precision(PRECISION):
        params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        per_sample = noise_samples(params32, X, Y, seed, mode, names, samples)
        diff = {k: float(jnp.max(v)) for k, v in per_sample.items()}
    scale = float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)
    return {k: v * scale for k, v in diff.items()}


def noisier(*noises: Mapping[str, float]) -> dict[str, float]:
    """Per tensor, the largest of several noise estimates."""
    return {k: max(noise[k] for noise in noises) for k in noises[0]}


def summed_from(depth: int) -> dict[str, str]:
    """Gradients whose exact value is zero, and the gradient each is a plain sum of: each block's
    ``dbl = sum_i dhprebn[l]_i`` (batch norm removes any shift of its input) and
    ``dlogit_maxes = -sum_j dnorm_logits_ij`` (softmax ignores any shift of a row).

    A sum carries the errors of its terms, so such a tensor may differ by as many
    times the allowance of its terms as it sums of them. Elsewhere this is far
    below the tensor's own allowance; here it is the only meaningful scale (the
    reference noise can itself be exactly 0, when two terms cancel exactly).
    """
    blocks = {f"b{layer}": layer_name("hprebn", layer) for layer in range(1, depth + 1)}
    return blocks | {"logit_maxes": "norm_logits"}


def _rows(ours, ref, noise, names, tol) -> list[Row]:
    rows = {name: compare(name, ours[name], ref[name], tol, noise[name]) for name in names}
    for name, source in summed_from(depth_of(ref)).items():
        if name in rows and source in rows:
            terms = np.size(ref[source]) // np.size(ref[name])
            rows[name] = compare(name, ours[name], ref[name], tol, noise[name], floor=terms * rows[source].allowed)
    return [rows[name] for name in names]


def atomic_rows(params: Params, X, Y, tol: Tolerance) -> list[Row]:
    """Table rows for the atomic pass: every intermediate (loss side first, then block by block from
    the last), then every parameter."""
    names = manual.intermediates(depth_of(params))
    noise = reference_noise(params, X, Y, "tutorial", names)
    with jax.default_matmul_precision(PRECISION):
        ours, ref = atomic_vs_reference(params, X, Y)
    return _rows(ours, ref, noise, (*reversed(names), *params), tol)


def boundary_noise(params: Params, X, Y) -> dict[str, float]:
    """:func:`reference_noise` of the plain model at the parameters and the :func:`boundary`: the
    reference of every table but the atomic pass's (compute it once, pass it to each)."""
    return reference_noise(params, X, Y, REFERENCE, boundary(depth_of(params)))


def mode_rows(
    params: Params,
    X,
    Y,
    mode: str,
    tol: Tolerance,
    noise: dict[str, float] | None = None,
    own_noise: dict[str, float] | None = None,
) -> list[Row]:
    """Table rows for a gradient mode other than the atomic pass (``manual``, ``custom_vjp``,
    ``custom_jvp``, ...): the :func:`boundary` intermediates, then every parameter.

    ``noise``: the reference's (:func:`boundary_noise`); ``own_noise``: the mode's own
    (:func:`reference_noise` of ``mode``). Each is measured here when not given; the allowance
    uses the larger (see the module docstring).
    """
    names = boundary(depth_of(params))
    noise = noise or boundary_noise(params, X, Y)
    own_noise = own_noise or reference_noise(params, X, Y, mode, names)
    with jax.default_matmul_precision(PRECISION):
        ours, ref = mode_vs_reference(params, X, Y, mode)
    return _rows(ours, ref, noisier(noise, own_noise), (*names, *params), tol)


#: Where the atomic pass is claimed, and checked, to equal ``jax.grad`` bit for bit: (backend, dtype)
#: pairs. Verified on XLA's CPU backend in float32 (see the module docstring). In float64 the CPU
#: compiler rounds one step differently at some shapes (batch 3, hidden 64: 1 ulp in ``bndiff`` and
#: everything below it), and on other backends (GPU) the two sides may be compiled to different
#: kernels; there the atomic pass is checked to the tolerance only.
BITWISE_CLAIMS = frozenset({("cpu", np.dtype("float32"))})


def atomic_bitwise_claimed(dtype, backend: str | None = None) -> bool:
    """Whether the atomic pass must equal ``jax.grad`` bit for bit in ``dtype`` on ``backend`` (default:
    JAX's default backend)."""
    return (backend or jax.default_backend(), np.dtype(dtype)) in BITWISE_CLAIMS


def not_bitwise(rows: Sequence[Row]) -> list[str]:
    """The names of the rows that are not bitwise equal to the reference."""
    return [row.name for row in rows if not row.exact]


def checked_modes() -> tuple[str, ...]:
    """Every gradient mode but the reference, the atomic pass first (its table is the tutorial's)."""
    others = [name for name in modes.MODES if name not in (REFERENCE, "atomic")]
    return ("atomic", *others)


def all_tables(params: Params, X, Y, tol: Tolerance) -> dict[str, list[Row]]:
    """Every gradient mode's table against ``jax.grad``, keyed by mode (the reference noise measured once)."""
    noise = boundary_noise(params, X, Y)
    return {
        mode: atomic_rows(params, X, Y, tol) if mode == "atomic" else mode_rows(params, X, Y, mode, tol, noise)
        for mode in checked_modes()
    }


def layer_of(name: str, depth: int) -> str:
    """The part of the model a table row belongs to: ``"loss"``, ``"output layer"``, ``"block l"`` or
    ``"embedding"`` (for the per-layer tables)."""
    if name.endswith("]"):
        return f"block {name[name.index('[') + 1 : -1]}"
    if name in ("C", "emb", "embcat"):
        return "embedding"
    for prefix in ("bngain", "bnbias", "W", "b"):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            layer = int(name[len(prefix) :])
            return "output layer" if layer == depth + 1 else f"block {layer}"
    return "loss"


def by_layer(rows: Sequence[Row], depth: int) -> dict[str, list[Row]]:
    """``rows`` grouped by :func:`layer_of`, from the loss down to the embedding (the backward pass's order)."""
    order = ["loss", "output layer", *(f"block {layer}" for layer in range(depth, 0, -1)), "embedding"]
    groups: dict[str, list[Row]] = {part: [] for part in order}
    for row in rows:
        groups[layer_of(row.name, depth)].append(row)
    return {part: group for part, group in groups.items() if group}


def summary_table(tables: Mapping[str, list[Row]], title: str) -> str:
    """One table, one column per mode, over the tensors every mode reports: each tensor's largest
    difference as a share of its allowance ("exact" when bitwise equal, bold when over 1)."""
    reported = [{row.name for row in rows} for rows in tables.values()]
    names = [row.name for row in next(iter(tables.values())) if all(row.name in r for r in reported)]
    cells = {(mode, row.name): row for mode, rows in tables.items() for row in rows}

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
