"""Training diagnostics of a deep Linear -> BatchNorm -> tanh stack: the four pictures of the series' part 3.

At a recorded step ``t`` (every ``TrainConfig.diagnostics_every`` steps, from step 0) the
training loop (:func:`jaxbirds.train.chunk_fn`) records, from the parameters ``θ_t`` it is about
to update and step ``t``'s minibatch:

* per block ``l`` (its output ``h[l] = tanh(bn(h[l-1] @ Wl + bl))``, (N, H_l)):
  ``mean(h[l])``, ``std(h[l])`` and the **saturation share** ``mean(|h[l]| > SATURATION)``: the
  share of units where tanh is flat, whose gradient ``1 - h²`` (below ``1 - 0.97² ≈ 0.06``) all
  but stops the backward pass (panel a);
* per block, ``mean`` and ``std`` of ``dloss/dh[l]`` (panel b). Both come from the model's taps
  (:func:`jaxbirds.model.forward`'s ``tap``): ``h[l]`` becomes ``h[l] + p_l`` with ``p_l = 0``
  and ``jax.grad`` with respect to the ``p_l`` is ``dloss/dh[l]``, as in
  :mod:`jaxbirds.gradcheck`; always under the plain (``autodiff``) rules, whatever gradient mode
  trains;
* per weight matrix ``W1 .. W{L+1}``, the **gradient-to-data ratio** ``std(dloss/dW) / std(W)``
  of the step's training gradient (panel c), and the **update-to-data ratio**
  ``log10(std(ΔW) / std(W))`` of the step's actual update ``ΔW`` (what optax adds: ``-lr * g``
  for SGD, adam's own step for adam), both against ``W`` before the update (panel d). About -3
  is the series' rule of thumb for a well-chosen learning rate: each step moves a weight by a
  thousandth of its spread.

Standard deviations are over every entry of the tensor, with ``1/n`` (``jnp.std``'s default).

For the histograms of panels (a) and (b), the loop also keeps the tensors ``h[l]`` and
``dloss/dh[l]`` of the latest recorded step (a :class:`Snapshot`; its size is the batch's
activations, ``N * sum(H_l)`` values each); :func:`histogram` bins them on the host. Binning
on the device would need a fixed range, and the gradients' range moves by orders of magnitude
during training; the tensors are small and cross to the host once per chunk.

Everything here is a pure function of arrays; :mod:`jaxbirds.train` calls :func:`record`
inside its compiled loop and :mod:`jaxbirds.diagnostics_plot` draws the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import model
from jaxbirds.model import Params

#: ``|h| > SATURATION`` counts a tanh unit as saturated (the series' threshold).
SATURATION = 0.97
#: A run with ``--diagnostics`` and no ``--diagnostics-every`` records about this many steps.
DEFAULT_RECORDS = 100
#: The update-to-data ratio (log10) the series calls about right.
UPDATE_RATIO_GUIDE = -3.0
#: Bins of the histograms of panels (a) and (b).
HISTOGRAM_BINS = 50
#: The rules the taps are read under: the plain model, whatever gradient mode trains.
TAP_RULES = "autodiff"


class Record(NamedTuple):
    """The numbers of one recorded step (or, stacked, of many: every field gets a leading (R,) axis).

    L is the number of blocks; the weights are ``W1 .. W{L+1}``, the output layer's last.
    """

    step: jax.Array  # () int32: the step t; the state recorded is the one after t steps (-1: an unused row)
    act_mean: jax.Array  # (L,) mean(h[l])
    act_std: jax.Array  # (L,) std(h[l])
    saturation: jax.Array  # (L,) mean(|h[l]| > SATURATION)
    grad_mean: jax.Array  # (L,) mean(dloss/dh[l])
    grad_std: jax.Array  # (L,) std(dloss/dh[l])
    grad_to_data: jax.Array  # (L+1,) std(dloss/dWl) / std(Wl)
    update_to_data: jax.Array  # (L+1,) log10(std(ΔWl) / std(Wl))


class Snapshot(NamedTuple):
    """The tensors of one recorded step, for the histograms: block by block, first to last."""

    step: jax.Array  # () int32 (-1: nothing recorded yet)
    h: tuple[jax.Array, ...]  # h[l], (N, H_l) each
    dh: tuple[jax.Array, ...]  # dloss/dh[l], (N, H_l) each


class Recorded(NamedTuple):
    """What a training call recorded (on the host): its records in step order, and its last snapshot."""

    records: Record  # stacked: each field has a leading (R,) axis, R the number of recorded steps
    snapshot: Snapshot | None  # the tensors of the last recorded step; None if no step was recorded


def weight_names(depth: int) -> tuple[str, ...]:
    """The weight matrices whose ratios are recorded: ``("W1", ..., "W{L+1}")`` for ``depth`` = L blocks."""
    return tuple(f"W{layer}" for layer in range(1, depth + 2))


def default_every(steps: int) -> int:
    """Steps between records so that a run of ``steps`` records about :data:`DEFAULT_RECORDS` of them."""
    return max(1, steps // DEFAULT_RECORDS)


def records_per_chunk(length: int, every: int) -> int:
    """The most recorded steps (multiples of ``every``) that ``length`` consecutive steps can hold:
    ``ceil(length / every)``."""
    return (length - 1) // every + 1


def is_recorded(step: jax.Array, every: int) -> jax.Array:
    """Whether step ``step`` is recorded: ``step % every == 0`` (so step 0 always is)."""
    return step % every == 0


def saturation_share(h: jax.Array, threshold: float = SATURATION) -> jax.Array:
    """The share of entries of ``h`` (any shape) with ``|h| > threshold``: a float32 scalar in [0, 1]."""
    return jnp.mean(jnp.abs(h) > threshold, dtype=jnp.float32)


def std_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``std(numerator) / std(denominator)``, each over all its entries: a scalar."""
    return jnp.std(numerator) / jnp.std(denominator)


def grad_to_data(grads: Params, params: Params, names: Sequence[str]) -> jax.Array:
    """``std(grads[W]) / std(params[W])`` for each ``W`` in ``names``: (len(names),)."""
    return jnp.stack([std_ratio(grads[name], params[name]) for name in names])


def update_to_data(updates: Params, params: Params, names: Sequence[str]) -> jax.Array:
    """``log10(std(updates[W]) / std(params[W]))`` for each ``W`` in ``names``: (len(names),).

    ``updates`` is what the optimiser adds to ``params`` (``-lr * grads`` for SGD), ``params`` the
    values it is added to.
    """
    return jnp.log10(jnp.stack([std_ratio(updates[name], params[name]) for name in names]))


def tapped_activations(params: Params, X: jax.Array, Y: jax.Array) -> tuple[tuple, tuple]:
    """Every block's output and the loss's gradient with respect to it, from one forward and backward pass.

    ``h[l]`` is tapped as ``h[l] + p_l`` with ``p_l = 0``; ``dloss/dp_l = dloss/dh[l]``. The
    forward runs the plain rules (:data:`TAP_RULES`) in training mode (the batch's statistics).

    Args:
      params: the model's parameters (L blocks).
      X: contexts, (N, k) ids.
      Y: targets, (N,).

    Returns:
      ``(h, dh)``: two tuples of L arrays, ``h[l]`` and ``dloss/dh[l]``, (N, H_l) each, first block first.
    """
    depth = model.depth_of(params)
    names = [model.layer_name("h", layer) for layer in range(1, depth + 1)]
    zeros = {
        name: jnp.zeros((X.shape[0], params[f"W{layer}"].shape[1]), params[f"W{layer}"].dtype)
        for layer, name in enumerate(names, start=1)
    }

    def loss(perturb):
        seen = {}

        def tap(name, value):
            if name in perturb:
                seen[name] = value
                return value + perturb[name]
            return value

        return model.forward(params, X, Y, rules=TAP_RULES, tap=tap), seen

    dh, h = jax.grad(loss, has_aux=True)(zeros)
    return tuple(h[name] for name in names), tuple(dh[name] for name in names)


def record(
    step: jax.Array, params: Params, grads: Params, updates: Params, X: jax.Array, Y: jax.Array
) -> tuple[Record, Snapshot]:
    """The diagnostics of one training step: its :class:`Record` and :class:`Snapshot`.

    Args:
      step: the step ``t``, () int32.
      params: ``θ_t``, the parameters the step starts from (L blocks).
      grads: the step's training gradient at ``θ_t``, shaped like ``params``.
      updates: the step's update (``θ_{t+1} - θ_t``), shaped like ``params``.
      X: the step's contexts, (N, k) ids.
      Y: the step's targets, (N,).
    """
    h, dh = tapped_activations(params, X, Y)
    names = weight_names(len(h))

    def per_block(fn, tensors):
        return jnp.stack([fn(t) for t in tensors])

    step = jnp.asarray(step, jnp.int32)
    numbers = Record(
        step=step,
        act_mean=per_block(jnp.mean, h),
        act_std=per_block(jnp.std, h),
        saturation=per_block(saturation_share, h),
        grad_mean=per_block(jnp.mean, dh),
        grad_std=per_block(jnp.std, dh),
        grad_to_data=grad_to_data(grads, params, names),
        update_to_data=update_to_data(updates, params, names),
    )
    return numbers, Snapshot(step, h, dh)


def empty(params: Params, batch_size: int, rows: int) -> tuple[Record, Snapshot]:
    """What the loop fills: ``rows`` unused records (step -1, zeros) and an empty snapshot, for ``params``'
    depth and dtype at ``batch_size``."""
    depth, dtype = model.depth_of(params), params["W1"].dtype
    per_block, per_weight = jnp.zeros((rows, depth), dtype), jnp.zeros((rows, depth + 1), dtype)
    records = Record(jnp.full((rows,), -1, jnp.int32), *[per_block] * 5, per_weight, per_weight)
    tensors = tuple(jnp.zeros((batch_size, params[f"W{layer}"].shape[1]), dtype) for layer in range(1, depth + 1))
    return records, Snapshot(jnp.int32(-1), tensors, tensors)


def write_row(records: Record, row: jax.Array, new: Record) -> Record:
    """``records`` with row ``row`` replaced by the single record ``new``."""
    return jax.tree.map(lambda rows, value: rows.at[row].set(value), records, new)


def concatenate(parts: Sequence[Record]) -> Record:
    """Stacked records, one after the other, without their unused rows (step -1), as NumPy arrays."""
    kept = [jax.tree.map(lambda field, p=part: np.asarray(field)[np.asarray(p.step) >= 0], part) for part in parts]
    return jax.tree.map(lambda *fields: np.concatenate(fields), *kept)


def histogram(values: np.ndarray, lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The density of ``values`` over ``bins`` equal bins from ``lo`` to ``hi`` (``torch.histogram(density=True)``):
    ``(centres (bins,), density (bins,))``; the density integrates to the share of values inside the range."""
    values = np.asarray(values, np.float64).ravel()
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width = (hi - lo) / bins
    return (edges[:-1] + edges[1:]) / 2, counts / (max(values.size, 1) * width)


def gradient_range(dh: Sequence[np.ndarray], spread: float = 4.0) -> float:
    """A symmetric range for the gradients' histograms, shared by every block: ``spread`` times the largest
    standard deviation among them (a positive float; 1 when every gradient is zero)."""
    largest = max(float(np.std(np.asarray(g, np.float64))) for g in dh)
    return spread * largest if largest > 0 else 1.0


def summary(records: Record, snapshot: Snapshot | None) -> dict:
    """The diagnostics as plain JSON values (lists of floats; non-finite ones are the caller's to null):

    ``steps``; per block (``blocks[l-1]``, ``l`` from 1) the series of ``act_mean``, ``act_std``,
    ``saturation``, ``grad_mean``, ``grad_std``; per weight (``weights["W1"]`` ...) ``grad_to_data``
    and ``update_to_data`` (log10); and, from the snapshot, each block's histograms at its step.
    """
    steps = np.asarray(records.step)
    depth = np.shape(records.act_mean)[1]
    block_fields = ("act_mean", "act_std", "saturation", "grad_mean", "grad_std")
    result = {
        "saturation_threshold": SATURATION,
        "steps": steps.tolist(),
        "blocks": [
            {field: np.asarray(getattr(records, field))[:, i].astype(float).tolist() for field in block_fields}
            for i in range(depth)
        ],
        "weights": {
            name: {
                field: np.asarray(getattr(records, field))[:, i].astype(float).tolist()
                for field in ("grad_to_data", "update_to_data")
            }
            for i, name in enumerate(weight_names(depth))
        },
    }
    if snapshot is not None and int(snapshot.step) >= 0:
        reach = gradient_range(snapshot.dh)
        result["histograms"] = {
            "step": int(snapshot.step),
            "h_centres": histogram(snapshot.h[0], -1.0, 1.0)[0].tolist(),
            "dh_centres": histogram(snapshot.dh[0], -reach, reach)[0].tolist(),
            "blocks": [
                {
                    "h_density": histogram(h, -1.0, 1.0)[1].tolist(),
                    "dh_density": histogram(g, -reach, reach)[1].tolist(),
                }
                for h, g in zip(snapshot.h, snapshot.dh, strict=True)
            ],
        }
    return result
