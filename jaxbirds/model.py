"""The tutorial's MLP as pure functions over a parameter pytree.

    X (N, k) ids --C--> emb (N, k, E) --concat--> embcat (N, kE)
      --@W1 + b1--> hprebn (N, H) --batch norm--> hpreact (N, H)
      --tanh--> h (N, H) --@W2 + b2--> logits (N, V) --cross-entropy--> loss

Parameters are a plain ``dict`` of arrays (a pytree), keyed by the tutorial's
names. Batch norm runs in training mode (statistics of the batch) unless
calibrated statistics are passed, as after training.

:func:`forward` is the one definition of the forward pass: training, evaluation,
sampling, both manual backward passes and the gradient checker all run it.
``rules`` picks how its two non-trivial operations are written. The value is
the same every way up to rounding, and the way to the gradient differs, with one
exception: the tutorial's steps take ``log(probs)``, which is ``-inf`` where a
probability underflows to 0 (a target logit ~100 below its row's maximum in
float32), so their loss is ``inf`` where the other rule sets' shifted
log-sum-exp gives the finite value (``tests/test_model.py`` shows both):

* ``"autodiff"``   - :mod:`jaxbirds.ops` (``batch_norm``, ``cross_entropy``); JAX derives the backward pass;
* ``"custom_vjp"`` - :mod:`jaxbirds.vjp`, whose backward passes are written by hand;
* ``"custom_jvp"`` - :mod:`jaxbirds.jvp`, whose forward-mode rules are written by hand (JAX transposes them);
* ``"tutorial"``   - the tutorial's atomic steps (``bnmeani`` ... ``logprobs``), for the atomic manual pass.

A ``tap(name, value) -> value`` hook sees every named intermediate as it is
computed (``emb``, ``embcat``, ``hprebn``, the rule set's own, ``hpreact``, ``h``,
``logits``): :mod:`jaxbirds.manual` records them, :mod:`jaxbirds.gradcheck` adds
a zero to each and differentiates with respect to it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxbirds import jvp, ops, vjp
from jaxbirds.errors import ConfigError
from jaxbirds.ops import Tap, no_tap

Params = dict[str, jax.Array]
Rules = Literal["autodiff", "custom_vjp", "custom_jvp", "tutorial"]
RULES: tuple[str, ...] = ("autodiff", "custom_vjp", "custom_jvp", "tutorial")
PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes of the model. ``vocab_size`` counts the end token."""

    vocab_size: int = 29
    context_size: int = 3
    embedding_dim: int = 10
    hidden: int = 200

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{field.name} must be a positive integer, got {value!r}")

    @property
    def fan_in(self) -> int:
        return self.context_size * self.embedding_dim


class BatchNormStats(NamedTuple):
    """Calibrated batch-norm statistics, each (1, H): used in evaluation mode."""

    mean: jax.Array
    var: jax.Array


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    V, H = config.vocab_size, config.hidden
    return {
        "C": (V, config.embedding_dim),
        "W1": (config.fan_in, H),
        "b1": (H,),
        "W2": (H, V),
        "b2": (V,),
        "bngain": (1, H),
        "bnbias": (1, H),
    }


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: jax.Array, config: ModelConfig, dtype=jnp.float32) -> Params:
    """The tutorial's initialisation, as one compiled program.

    ``C ~ N(0, 1)``; ``W1 ~ N(0, 1) * (5/3) / sqrt(fan_in)`` (Kaiming gain for
    tanh); ``b1, W2, b2 ~ 0.1 * N(0, 1)``; ``bngain ~ 1 + 0.1 N(0, 1)``;
    ``bnbias ~ 0.1 N(0, 1)``. All the standard normals come from one draw, cut
    into pieces in ``PARAM_NAMES`` order: one random-number kernel instead of
    seven, which compiles several times faster on a CPU. Jitted, so a run
    starts with one program rather than a dozen op-by-op dispatches, and a
    model initialised alone is bit-identical to one initialised under ``vmap``
    (XLA fuses ``0.1 * N + 1`` into one rounding, op-by-op execution rounds twice).
    """
    shapes = param_shapes(config)
    sizes = [math.prod(shapes[name]) for name in PARAM_NAMES]
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    scale = {
        "C": 1.0,
        "W1": (5 / 3) / config.fan_in**0.5,
        "b1": 0.1,
        "W2": 0.1,
        "b2": 0.1,
        "bngain": 0.1,
        "bnbias": 0.1,
    }
    params = {name: piece.reshape(shapes[name]) * scale[name] for name, piece in zip(PARAM_NAMES, pieces, strict=True)}
    params["bngain"] = params["bngain"] + 1.0
    return params


def param_count_for(config: ModelConfig) -> int:
    """Parameters of a model of this shape, without making it."""
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def param_count(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def check_params(params: Params, config: ModelConfig) -> None:
    """Raise if ``params`` is not exactly the parameter set ``config`` implies."""
    expected = param_shapes(config)
    if set(params) != set(expected):
        raise ConfigError(f"parameters {sorted(params)} do not match the model's {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ConfigError(f"parameter {name} has shape {tuple(params[name].shape)}, the model needs {shape}")


def hidden_preactivation(params: Params, X: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """``hprebn = concat(C[X]) @ W1 + b1``: the input of batch norm, (N, H)."""
    C, W1 = params["C"], params["W1"]
    chex.assert_rank(X, 2)
    emb = tap("emb", C[X])
    chex.assert_shape(emb, (X.shape[0], X.shape[1], C.shape[1]))
    embcat = tap("embcat", emb.reshape(X.shape[0], -1))
    chex.assert_shape(embcat, (X.shape[0], W1.shape[0]))
    hprebn = tap("hprebn", embcat @ W1 + params["b1"])
    chex.assert_shape(hprebn, (X.shape[0], W1.shape[1]))
    return hprebn


def forward(
    params: Params,
    X: jax.Array,
    Y: jax.Array | None = None,
    *,
    stats: BatchNormStats | None = None,
    rules: Rules = "autodiff",
    tap: Tap = no_tap,
) -> jax.Array:
    """The forward pass: the mean cross-entropy of the targets ``Y`` (N,), or the logits (N, V) if ``Y`` is None.

    With ``stats=None`` batch norm uses the batch's own mean and unbiased
    variance (training mode); otherwise the given calibrated statistics.
    """
    if rules not in RULES:
        raise ConfigError(f"unknown rules {rules!r}: use one of {RULES}")
    hprebn = hidden_preactivation(params, X, tap)
    gain, bias = params["bngain"], params["bnbias"]
    if stats is not None:
        hpreact = ops.batch_norm_eval(hprebn, gain, bias, stats.mean, stats.var)
    elif rules == "custom_vjp":
        hpreact = vjp.batch_norm(hprebn, gain, bias)
    elif rules == "custom_jvp":
        hpreact = jvp.batch_norm(hprebn, gain, bias)
    elif rules == "tutorial":
        hpreact = ops.batch_norm_steps(hprebn, gain, bias, tap=tap)
    else:
        hpreact = ops.batch_norm(hprebn, gain, bias, tap=tap)
    hpreact = tap("hpreact", hpreact)
    chex.assert_equal_shape([hpreact, hprebn])
    h = tap("h", jnp.tanh(hpreact))
    logits = tap("logits", h @ params["W2"] + params["b2"])
    chex.assert_shape(logits, (X.shape[0], params["W2"].shape[1]))
    if Y is None:
        return logits
    chex.assert_shape(Y, (X.shape[0],))
    if rules == "custom_vjp":
        return vjp.cross_entropy(logits, Y)
    if rules == "custom_jvp":
        return jvp.cross_entropy(logits, Y)
    if rules == "tutorial":
        return ops.cross_entropy_steps(logits, Y, tap)
    return ops.cross_entropy(logits, Y)


def logits(params: Params, X: jax.Array, stats: BatchNormStats | None = None, rules: Rules = "autodiff") -> jax.Array:
    """Logits (N, V): :func:`forward` without targets."""
    return forward(params, X, stats=stats, rules=rules)


def loss(
    params: Params, X: jax.Array, Y: jax.Array, stats: BatchNormStats | None = None, rules: Rules = "autodiff"
) -> jax.Array:
    """Mean cross-entropy of the next-character targets ``Y`` (N,): :func:`forward` with targets."""
    return forward(params, X, Y, stats=stats, rules=rules)
