"""What the walkthrough notebook (``docs/walkthrough.ipynb``) needs to be a lesson: its checkers and its source display.

* :func:`source` shows a library function's code in a notebook cell, read from the module
  with :func:`inspect.getsource`: the notebook shows the code that runs, and the two cannot drift.
* :func:`check_backward`, :func:`check_dlogits`, :func:`check_dhprebn` and :func:`check_sgd_step`
  check a learner's answer to the tutorial's four exercises and print the tutorial's three
  columns (``cmp``: exact / approximate / max difference), one line per tensor.

The referee is ``jax.grad`` of :func:`jaxbirds.model.forward` under the tutorial's rules, with
respect to a zero added at each named intermediate (:mod:`jaxbirds.gradcheck`). The learner's
steps run in the same compiled program as the referee and read the same forward values: only
there do two computations that round alike come out bitwise equal (XLA fuses and orders the
operations of one program as a whole, and op-by-op execution rounds differently).

A blank is ``...``: a step written ``d.probs = ...`` is reported "not written yet", and a step
that reads a blank stops the pass there (the rows after it are not written either).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbirds import manual, model
from jaxbirds.gradcheck import PRECISION, gradients
from jaxbirds.model import Params

#: The tutorial's ``cmp`` lines for one block, in its order: the gradients of the atomic backward pass.
TUTORIAL_ORDER = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits",
    "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff",
    "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)  # fmt: skip

#: The tutorial's names of a one-block model's parameters, keyed by the library's.
PARAM_ALIASES = {"bngain1": "bngain", "bnbias1": "bnbias"}


# --------------------------------------------------------------------------- #
# Showing the library's code                                                  #
# --------------------------------------------------------------------------- #


class Source(NamedTuple):
    """Python source, shown as a highlighted block in a notebook (``_repr_markdown_``) and as text elsewhere."""

    text: str

    def _repr_markdown_(self) -> str:
        return f"```python\n{self.text}\n```"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def source(*objects: Any) -> Source:
    """The source of each function (or class) in ``objects``, read from its module, one after the other."""
    return Source("\n\n".join(inspect.getsource(obj).rstrip() for obj in objects))


# --------------------------------------------------------------------------- #
# The tutorial's cmp                                                          #
# --------------------------------------------------------------------------- #


class Check(NamedTuple):
    """One line of the tutorial's ``cmp``: ``exact`` and ``approximate`` are None when not written yet."""

    name: str
    exact: bool | None
    approximate: bool | None
    max_diff: float | None

    @property
    def written(self) -> bool:
        return self.exact is not None

    def line(self) -> str:
        if not self.written:
            return f"{self.name:15s} | not written yet"
        return (
            f"{self.name:15s} | exact: {str(self.exact):5s} | approximate: {str(self.approximate):5s} "
            f"| maxdiff: {self.max_diff:.3g}"
        )


def cmp(name: str, ours, ref) -> Check:
    """The tutorial's ``cmp(name, dt, t)``: bitwise equal, ``allclose`` (PyTorch's defaults: ``rtol=1e-5,
    atol=1e-8``) and the largest absolute difference. ``ours`` may be ``...`` (not written yet); a shape
    that does not match is reported as neither exact nor approximate, with an infinite difference."""
    if ours is Ellipsis or ours is None:
        return Check(name, None, None, None)
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return Check(name, False, False, float("inf"))
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref), initial=0.0))
    return Check(name, bool(np.array_equal(ours, ref)), bool(np.allclose(ours, ref, rtol=1e-5, atol=1e-8)), diff)


def report(checks: Sequence[Check], stopped: str | None = None) -> str:
    """The checks as the tutorial prints them, then one line of totals (and where the pass stopped, if it did)."""
    lines = [check.line() for check in checks]
    written = [c for c in checks if c.written]
    lines.append(
        f"-- {sum(c.exact for c in written)} exact, {sum(c.approximate for c in written)} approximate, "
        f"{len(written) - sum(c.approximate for c in written)} wrong, {len(checks) - len(written)} not written yet "
        f"(of {len(checks)})"
    )
    if stopped:
        lines.append(f"-- stopped: {stopped}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Blanks                                                                      #
# --------------------------------------------------------------------------- #


class NotWrittenYet(Exception):
    """A step read a gradient that is still a blank (``...``)."""


class Tensors:
    """Attribute access to named tensors (``v.probs``), as the tutorial's variables read. Reading a name
    that is missing or still ``...`` raises :class:`NotWrittenYet`; assignment records a step."""

    def __init__(self, values: dict[str, Any] | None = None, kind: str = "d"):
        object.__setattr__(self, "_values", dict(values or {}))
        object.__setattr__(self, "_kind", kind)

    def __getattr__(self, name: str):
        value = self._values.get(name, Ellipsis)
        if value is Ellipsis:
            raise NotWrittenYet(f"a step reads {self._kind}.{name}, which is not written yet")
        return value

    def __setattr__(self, name: str, value) -> None:
        self._values[name] = value

    def arrays(self) -> dict[str, jax.Array]:
        """The steps written so far (blanks left out)."""
        return {k: v for k, v in self._values.items() if v is not Ellipsis and v is not None}


def _run_steps(fn: Callable, *args) -> tuple[Any, str | None]:
    """``fn(*args)`` and ``None``, or ``(None, why)`` where it stopped at a blank."""
    try:
        return fn(*args), None
    except NotWrittenYet as err:
        return None, str(err)


# --------------------------------------------------------------------------- #
# Exercise 1: the atomic backward pass                                        #
# --------------------------------------------------------------------------- #


def tutorial_names(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A one-block model's tensors under the tutorial's names: ``hprebn[1]`` is ``hprebn``, ``bngain1`` ``bngain``."""
    return {PARAM_ALIASES.get(k, k.removesuffix("[1]")): v for k, v in values.items()}


def _reference_program(params: Params, X: jax.Array, Y: jax.Array):
    """One forward pass in the tutorial's steps and ``jax.grad`` of its loss for every intermediate and
    parameter, under the tutorial's names: ``(values, reference)``."""
    zeros = {
        name: jnp.zeros(value.shape, value.dtype)
        for name, value in jax.eval_shape(manual.forward_intermediates, params, X, Y).items()
        if name != "loss"
    }

    def loss(params, perturb):
        values = manual.forward_intermediates(params, X, Y, perturb)
        return values["loss"], values

    loss_value, pullback, values = jax.vjp(loss, params, zeros, has_aux=True)
    dparams, dinter = pullback(jnp.ones_like(loss_value))
    return tutorial_names({**values, **params}), tutorial_names({**dinter, **dparams})


def _check_one_block(params: Params) -> None:
    if model.depth_of(params) != 1:
        raise ValueError("the exercises are written for the tutorial's model of one block")


def check_backward(backward: Callable, params: Params, X: jax.Array, Y: jax.Array) -> list[Check]:
    """Exercise 1: check ``backward(v, d)``, the tutorial's atomic backward pass, and print the table.

    ``v`` holds the forward values, the parameters, ``Xb`` and ``Yb`` under the tutorial's names
    (``v.probs``, ``v.W2``, ``v.bngain``); ``backward`` writes each gradient into ``d``
    (``d.logprobs = ...``). It runs inside the same compiled program as ``jax.grad`` (see the module
    docstring), so a step that rounds as JAX does is bitwise equal.
    """
    _check_one_block(params)
    stopped: list[str | None] = [None]

    @jax.jit
    def program(params, X, Y):
        values, reference = _reference_program(params, X, Y)
        d = Tensors(kind="d")
        _, stopped[0] = _run_steps(backward, Tensors(values | {"Xb": X, "Yb": Y}, kind="v"), d)
        return d.arrays(), reference

    with jax.default_matmul_precision(PRECISION):
        ours, reference = program(params, X, Y)
    checks = [cmp(name, ours.get(name, Ellipsis), reference[name]) for name in TUTORIAL_ORDER]
    print(report(checks, stopped[0]))
    return checks


# --------------------------------------------------------------------------- #
# Exercises 2 and 3: the two closed forms                                     #
# --------------------------------------------------------------------------- #


def check_dlogits(dlogits_fn: Callable, params: Params, X: jax.Array, Y: jax.Array) -> Check:
    """Exercise 2: check ``dlogits_fn(logits, Yb) -> dlogits`` (N, V) against ``jax.grad``; print its line."""
    _check_one_block(params)

    def program(params, X, Y):
        values, reference = _reference_program(params, X, Y)
        return dlogits_fn(values["logits"], Y), reference["logits"]

    check = cmp("logits", *_run_blank_or(program, params, X, Y))
    print(check.line())
    return check


def check_dhprebn(dhprebn_fn: Callable, params: Params, X: jax.Array, Y: jax.Array) -> Check:
    """Exercise 3: check ``dhprebn_fn(dhpreact, bnraw, bnvar_inv, bngain) -> dhprebn`` (N, H), batch norm's
    backward pass in one expression, against ``jax.grad``; print its line. ``dhpreact`` is the reference's."""
    _check_one_block(params)

    def program(params, X, Y):
        values, reference = _reference_program(params, X, Y)
        args = (reference["hpreact"], values["bnraw"], values["bnvar_inv"], values["bngain"])
        return dhprebn_fn(*args), reference["hprebn"]

    check = cmp("hprebn", *_run_blank_or(program, params, X, Y))
    print(check.line())
    return check


def _run_blank_or(program: Callable, params: Params, X: jax.Array, Y: jax.Array) -> tuple[Any, jax.Array]:
    """``program(params, X, Y) -> (ours, reference)`` compiled as one program; ``ours`` is ``...`` when the
    learner's function returned a blank (or read one)."""
    blank = [False]

    @jax.jit
    def compiled(params, X, Y):
        ours, reference = _run_steps(program, params, X, Y)[0] or (Ellipsis, None)
        if ours is Ellipsis or reference is None:
            blank[0] = True
            return jnp.zeros(())  # nothing to compare
        return ours, reference

    with jax.default_matmul_precision(PRECISION):
        out = compiled(params, X, Y)
    return (Ellipsis, out) if blank[0] else out


# --------------------------------------------------------------------------- #
# Exercise 4: the training step                                               #
# --------------------------------------------------------------------------- #


def check_sgd_step(sgd_step: Callable, params: Params, X: jax.Array, Y: jax.Array, lr: float = 0.1) -> list[Check]:
    """Exercise 4: check ``sgd_step(params, grads, lr) -> new params`` (plain SGD, ``p - lr g``) against
    optax's SGD, the optimiser of the library's training loop, on the manual gradients of one batch
    (both in one compiled program); print the table."""
    blank = [False]

    @jax.jit
    def program(params, X, Y):
        grads = manual.fused_backward(params, X, Y).grads
        updates, _ = optax.sgd(lr).update(grads, optax.sgd(lr).init(params), params)
        reference = optax.apply_updates(params, updates)
        ours, _ = _run_steps(sgd_step, params, grads, lr)
        if ours is None or ours is Ellipsis:
            blank[0], ours = True, {}
        return {k: v for k, v in ours.items() if v is not Ellipsis}, reference

    ours, reference = program(params, X, Y)
    checks = [cmp(name, ours.get(name, Ellipsis), reference[name]) for name in reference]
    print(report(checks))
    return checks


def in_reference_program(fn: Callable, params: Params, X: jax.Array, Y: jax.Array):
    """``fn(values, reference)`` run inside the referee's compiled program, where ``values`` are the forward values
    and parameters and ``reference`` the ``jax.grad`` gradients, both under the tutorial's names.

    Returns:
      ``(fn's output, values, reference)``.
    """

    @jax.jit
    def program(params, X, Y):
        values, reference = _reference_program(params, X, Y)
        return fn(values, reference), values, reference

    with jax.default_matmul_precision(PRECISION):
        return program(params, X, Y)


def reference_gradients(params: Params, X: jax.Array, Y: jax.Array) -> dict[str, jax.Array]:
    """``jax.grad`` of the loss for every tutorial intermediate and parameter, under the tutorial's names."""
    names = tuple(n for n in manual.intermediates(model.depth_of(params)))
    with jax.default_matmul_precision(PRECISION):
        return tutorial_names(gradients(params, X, Y, "tutorial", names))
