"""Finite differences: ``jax.test_util.check_grads`` on every hand-written rule, in float64.

The gradient checker (:mod:`jaxbirds.gradcheck`) compares each hand-written
gradient with ``jax.grad``; this is the other referee, independent of JAX's own
rules: central differences of the function itself, along random directions. It
checks the custom_vjp rules in reverse mode and the custom_jvp rules in forward
and reverse mode, at the user's shapes and at :data:`FD_SHAPES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from jaxbirds import jvp, vjp


class FDShape(NamedTuple):
    """The shapes of one finite-difference check: batch norm's ``x`` is (batch, hidden), the
    cross-entropy's logits (batch, classes)."""

    batch: int
    hidden: int
    classes: int


#: Shapes every finite-difference check runs at, whatever the user's: batch, hidden and classes
#: all different, one batch below hidden and one above, so that a rule that reads the wrong axis
#: (``n = x_hat.shape[1]``) or swaps two of them is wrong at each.
FD_SHAPES = (FDShape(batch=5, hidden=3, classes=4), FDShape(batch=3, hidden=7, classes=5))


def check_rules(key: jax.Array, shapes: Sequence[FDShape] = FD_SHAPES) -> None:
    """``check_grads`` on every hand-written rule at each of ``shapes``, in float64; ``AssertionError``
    on a mismatch (its message names the rule and the shape).

    The custom_vjp rules in reverse mode (all they support), the custom_jvp
    rules in forward and reverse mode (reverse by JAX's transposition). Each
    check compares the rule with central differences along one random
    direction (``jax.test_util.check_grads``): a handful of evaluations of the
    function, so cheap at any shape the rest of the check can afford; one
    compilation per shape and rule.

    Why several shapes: at a square shape (batch = hidden) a rule that takes
    ``n`` from the wrong axis computes the right thing, and a rule is checked
    only at the shapes it is run at. The script passes the user's own shape
    and :data:`FD_SHAPES`.

    Always float64, whatever the precision being checked elsewhere: central
    differences in float32 are good to ~3 digits (step 1e-2), too coarse to see
    an error such as batch norm's missing ``n/(n-1)`` (3 % of ``dx`` at ``n = 32``).
    In float64 (step 1e-6) they are good to ~1e-9 relative, and at the fixed
    shapes ``n/(n-1)`` is 1.25 or 1.5. The rules are dtype-generic, so this
    checks the very code that runs in float32.
    """
    tol = dict(eps=1e-6, atol=1e-7, rtol=1e-7)
    with jax.enable_x64(True):
        for shape, shape_key in zip(shapes, jax.random.split(key, len(shapes)), strict=True):
            k1, k2, k3, k4, k5 = jax.random.split(shape_key, 5)
            dtype = jnp.float64
            logits = jax.random.normal(k1, (shape.batch, shape.classes), dtype)
            labels = jax.random.randint(k2, (shape.batch,), 0, shape.classes)
            x = jax.random.normal(k3, (shape.batch, shape.hidden), dtype) * 2.0 + 0.5
            gain = 1.0 + 0.1 * jax.random.normal(k4, (1, shape.hidden), dtype)
            bias = 0.1 * jax.random.normal(k5, (1, shape.hidden), dtype)
            # jit: check_grads evaluates each function at several perturbed points of one shape
            for module, modes in ((vjp, ("rev",)), (jvp, ("fwd", "rev"))):
                where = f"{module.__name__}, batch {shape.batch}, hidden {shape.hidden}, classes {shape.classes}"
                ce = jax.jit(lambda lg, module=module, labels=labels: module.cross_entropy(lg, labels))
                try:
                    check_grads(ce, (logits,), order=1, modes=modes, **tol)
                except AssertionError as err:
                    raise AssertionError(f"cross_entropy ({where}): {err}") from None
                try:
                    check_grads(jax.jit(module.batch_norm), (x, gain, bias), order=1, modes=modes, **tol)
                except AssertionError as err:
                    raise AssertionError(f"batch_norm ({where}): {err}") from None
