"""Gradient modes: the one vocabulary for how a gradient is computed, in training and in the checker.

A mode is a forward pass (a rule set of :data:`jaxbirds.model.RULE_SETS`) and a
way back from its loss to the parameters:

================  ==============  ===========================================================
mode              forward rules   the gradient
================  ==============  ===========================================================
``autodiff``      ``autodiff``    ``jax.grad`` of the plain model: the reference every other mode is checked against
``custom_vjp``    ``custom_vjp``  ``jax.grad``, through hand-written reverse-mode rules
``custom_jvp``    ``custom_jvp``  ``jax.grad``, through hand-written forward-mode rules that JAX transposes
``manual``        ``autodiff``    by hand, the closed forms (:func:`jaxbirds.manual.fused_backward`)
``atomic``        ``tutorial``    by hand, every intermediate (:func:`jaxbirds.manual.atomic_backward`)
================  ==============  ===========================================================

Every rule set with ``jax_grad_mode=True`` is a ``jax.grad`` mode of its own name, so
a new rule set can be trained (``--grad NAME``) and checked without a line here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from jaxbirds import manual, model
from jaxbirds.errors import ConfigError
from jaxbirds.model import Params

LossAndGrads = Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, Params]]


@dataclasses.dataclass(frozen=True)
class GradMode:
    """One way to the gradient.

    Attributes:
      name: the mode's name (``--grad NAME``).
      summary: one line for help texts.
      rules: the rule set its forward pass runs.
      by_hand: whether the backward pass is written by hand in :mod:`jaxbirds.manual` (no ``jax.grad``).
      loss_and_grads: ``(params, X (N, k), Y (N,)) -> (loss (), grads)``, ``grads`` shaped like ``params``.
    """

    name: str
    summary: str
    rules: str
    by_hand: bool
    loss_and_grads: LossAndGrads


def _fused(params: Params, X: jax.Array, Y: jax.Array) -> tuple[jax.Array, Params]:
    result = manual.fused_backward(params, X, Y)
    return result.loss, result.grads


def _atomic(params: Params, X: jax.Array, Y: jax.Array) -> tuple[jax.Array, Params]:
    values = manual.forward_intermediates(params, X, Y)
    grads = manual.atomic_backward(params, X, Y, values)
    return values["loss"], {name: grads[name] for name in params}


def _jax_grad_mode(rules: model.RuleSet) -> GradMode:
    return GradMode(
        name=rules.name,
        summary=f"jax.grad through the {rules.name} rules: {rules.summary}",
        rules=rules.name,
        by_hand=False,
        loss_and_grads=jax.value_and_grad(functools.partial(model.loss, rules=rules.name)),
    )


def build_modes() -> dict[str, GradMode]:
    """Every mode: one ``jax.grad`` mode per rule set of :data:`jaxbirds.model.RULE_SETS` that has one,
    then the two passes by hand. :data:`MODES` is built by it at import."""
    modes = [_jax_grad_mode(rules) for rules in model.RULE_SETS.values() if rules.jax_grad_mode]
    modes.append(GradMode("manual", "by hand: the closed forms, block by block", "autodiff", True, _fused))
    modes.append(GradMode("atomic", "by hand: every intermediate of the tutorial's steps", "tutorial", True, _atomic))
    return {mode.name: mode for mode in modes}


#: Every gradient mode, by name; ``autodiff`` first (the reference).
MODES: dict[str, GradMode] = build_modes()
GRAD_MODES: tuple[str, ...] = tuple(MODES)


def grad_mode(name: str) -> GradMode:
    """The mode called ``name``; ``ConfigError`` naming the choices if there is none."""
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown gradient mode {name!r}; choose from {GRAD_MODES}") from None
