"""Inventing bird names: sampling from a trained model, many names at once.

Each name starts from a context of end tokens (id 0). At every position the
model gives logits over the next character; dividing them by a temperature
``T`` sharpens (``T < 1``) or flattens (``T > 1``) the distribution before one
character is drawn. Drawing the end token finishes the name.

All ``count`` names are generated together: ``lax.scan`` over positions, with
the whole batch of contexts advanced in one step (batch norm in evaluation
mode, so each name is independent of the others in the batch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import memory, model
from jaxbirds.data import Vocabulary
from jaxbirds.errors import ConfigError
from jaxbirds.evaluate import widest_block
from jaxbirds.model import ModelStats, Params

#: The longest name drawn unless asked otherwise.
MAX_LENGTH = 50


@functools.partial(jax.jit, static_argnames=("count", "max_length", "context_size"))
def sample_ids(
    key: jax.Array,
    params: Params,
    stats: ModelStats,
    temperature: float | jax.Array,
    *,
    count: int,
    max_length: int,
    context_size: int,
) -> jax.Array:
    """``(count, max_length)`` int32 character ids; position ``t`` drawn with ``fold_in(key, t)``.

    ``stats``: one calibrated ``BatchNormStats`` per block (:func:`jaxbirds.evaluate.calibrate`).
    Positions after a name's end token are 0 too (a finished name stays finished).
    """

    def step(carry, t):
        context, done = carry
        logits = model.logits(params, context, stats) / temperature
        drawn = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1).astype(jnp.int32)
        drawn = jnp.where(done, 0, drawn)
        context = jnp.concatenate([context[:, 1:], drawn[:, None]], axis=1)
        return (context, done | (drawn == 0)), drawn

    start = (jnp.zeros((count, context_size), jnp.int32), jnp.zeros((count,), bool))
    _, ids = jax.lax.scan(step, start, jnp.arange(max_length))
    return ids.T


class Samples(NamedTuple):
    names: list[str]
    finished: list[bool]  # False: the name reached max_length without drawing the end token

    def memorised_share(self, training_names: Iterable[str]) -> float:
        """Share of the finished samples that are real names from the training split."""
        known = set(training_names)
        finished = [name for name, ok in zip(self.names, self.finished, strict=True) if ok]
        return sum(name in known for name in finished) / len(finished) if finished else 0.0


#: How an empty name (the end token drawn first) is shown: a blank line would look like nothing printed.
EMPTY_NAME = "(empty: the end token came first)"


def shown(name: str, finished: bool) -> str:
    """A sampled name as printed: an empty one visibly, one cut at ``max_length`` with a trailing ``...``."""
    return (name or EMPTY_NAME) + ("" if finished else " ...")


def decode(ids: np.ndarray, vocab: Vocabulary) -> Samples:
    """Cut each row at its first end token and turn ids into characters."""
    names, finished = [], []
    for row in np.asarray(ids):
        ends = np.flatnonzero(row == 0)
        names.append(vocab.decode(row[: ends[0]] if ends.size else row))
        finished.append(bool(ends.size))
    return Samples(names, finished)


def check_fits(params: Params, count: int, max_length: int, context_size: int, budget: int | None = None) -> None:
    """Refuse a request whose names cannot all be drawn at once within the memory budget.

    Per name: its ids and context (int32), and a few rows of hidden and output
    activations (``hidden + vocabulary`` values) for the position in flight, ``hidden``
    the widest block's width: the blocks run one after another, so a name holds one
    block's activations at a time (:func:`jaxbirds.evaluate.batch_size_for` counts the same way).
    """
    if count < 1 or max_length < 1:
        raise ConfigError(f"count and max_length must be >= 1, got {count} and {max_length}")
    itemsize = params["W1"].dtype.itemsize
    vocab = params[model.output_param_names(params)[0]].shape[1]
    per_name = 4 * (max_length + context_size) + 4 * itemsize * (widest_block(params) + vocab)
    memory.require(
        count * per_name,
        f"sampling {count:,} names of up to {max_length:,} characters",
        "ask for fewer names (--count, --samples) or shorter ones (--max-length)",
        budget,
    )


def sample_names(
    key: jax.Array,
    params: Params,
    stats: ModelStats,
    vocab: Vocabulary,
    context_size: int,
    count: int = 10,
    temperature: float = 1.0,
    max_length: int = MAX_LENGTH,
) -> Samples:
    """Generate ``count`` names. ``temperature`` must be positive; ``max_length`` bounds each name.

    All names are drawn at once, so the request is checked against the memory
    budget first (:func:`check_fits`).
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature}")
    check_fits(params, count, max_length, context_size)
    ids = sample_ids(
        key, params, stats, jnp.asarray(temperature, params["W1"].dtype),
        count=count, max_length=max_length, context_size=context_size,
    )  # fmt: skip
    return decode(np.asarray(ids), vocab)
