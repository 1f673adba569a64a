"""Rule sets: how the model's two non-trivial operations are written, behind one interface.

A rule set is a training-mode batch norm and a mean cross-entropy with the
same values as every other rule set (up to rounding) and its own way to the
gradient. :data:`jaxbirds.model.RULE_SETS` lists them; the forward pass looks
its rule set up there by name:

====================  ======================  =========================================================
name                  module                  the gradient
====================  ======================  =========================================================
``"autodiff"``        :mod:`jaxbirds.ops`     JAX derives it from the compact forward
``"tutorial"``        :mod:`jaxbirds.ops`     the tutorial's atomic steps, each tapped, for the atomic manual pass
``"custom_vjp"``      :mod:`jaxbirds.vjp`     hand-written reverse-mode rules
``"custom_jvp"``      :mod:`jaxbirds.jvp`     hand-written forward-mode rules, which JAX transposes
====================  ======================  =========================================================

A new rule set (say, batch norm's backward in another closed form, or in a
kernel language) is one new module that defines a :class:`RuleSet` and one
line in :data:`jaxbirds.model.RULE_SETS`; the forward pass, the trainer
(``--grad NAME`` for a rule set whose gradient ``jax.grad`` takes) and the
checker pick it up from there. The README's "Adding a rule set" walks through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

#: ``tap(name, value) -> value``: sees (and may perturb) a named intermediate.
Tap = Callable[[str, jax.Array], jax.Array]


def no_tap(name: str, value: jax.Array) -> jax.Array:
    del name
    return value


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """One way of writing the model's batch norm and cross-entropy.

    Attributes:
      name: the key in :data:`jaxbirds.model.RULE_SETS`.
      summary: one line for help texts.
      batch_norm: ``(x (N, H), gain (1, H), bias (1, H), tap) -> y (N, H)``, training mode
        (the batch's mean and unbiased variance).
      cross_entropy: ``(logits (N, V), labels (N,), tap) -> loss ()``, the mean negative log-likelihood.
      jax_grad_mode: whether ``jax.grad`` through this rule set is a gradient mode of its own, of the
        same name (:mod:`jaxbirds.modes`); the tutorial's steps are not: the atomic pass walks them.
    """

    name: str
    summary: str
    batch_norm: Callable[[jax.Array, jax.Array, jax.Array, Tap], jax.Array]
    cross_entropy: Callable[[jax.Array, jax.Array, Tap], jax.Array]
    jax_grad_mode: bool = True
