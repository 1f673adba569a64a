"""One training step outside scan, to compile on its own: what the XLA and memory studies read."""

from __future__ import annotations

from collections.abc import Callable

import optax

from jaxbirds.train import TrainConfig


def single_step(loss_and_grads: Callable, tc: TrainConfig) -> Callable:
    """One optimiser step outside scan, to compile on its own and read what XLA made of it.

    Args:
        loss_and_grads: ``(params, X, Y) -> (loss, grads)`` (a gradient mode's, :data:`jaxbirds.modes.MODES`).
        tc: the recipe whose optimiser takes the step.

    Returns:
        ``step(params, opt_state, X, Y) -> (params, opt_state, loss)``, not jitted.
    """
    optimizer = tc.make_optimizer()

    def step(params, opt_state, X, Y):
        loss, grads = loss_and_grads(params, X, Y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
