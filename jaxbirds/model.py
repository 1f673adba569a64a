"""The tutorial's MLP, at any depth, as pure functions over a parameter pytree.

    X (N, k) ids --C--> emb (N, k, E) --concat--> embcat (N, kE) = h[0]
      for each hidden layer l = 1 .. L (one block each):
        h[l-1] --@Wl + bl--> hprebn[l] (N, H_l) --batch norm--> hpreact[l] --tanh--> h[l]
      h[L] --@W{L+1} + b{L+1}--> logits (N, V) --cross-entropy--> loss

``ModelConfig(hidden=(200,))`` is the tutorial's model (one block);
``hidden=(100, 100, 100, 100)`` stacks four, as in part 3 of the series.
Parameters are a plain ``dict`` of arrays (a pytree), keyed by the tutorial's
names with the layer's number: ``C``; ``W1``, ``b1``, ``bngain1``, ``bnbias1``
for the first block, ``W2`` ... for the second; the output layer's ``W{L+1}``,
``b{L+1}``. Batch norm runs in training mode (statistics of the batch) unless
calibrated statistics are passed (one :class:`BatchNormStats` per block), as
after training.

:func:`forward` is the one definition of the forward pass: training, evaluation,
sampling, both manual backward passes and the gradient checker all run it.
``rules`` names the rule set (:data:`RULE_SETS`, see :mod:`jaxbirds.rules`)
that writes its two non-trivial operations. The value is the same every way up
to rounding, and the way to the gradient differs, with one exception: the
tutorial's steps take ``log(probs)``, which is ``-inf`` where a probability
underflows to 0 (a target logit ~100 below its row's maximum in float32), so
their loss is ``inf`` where the other rule sets' shifted log-sum-exp gives the
finite value (``tests/test_model.py`` shows both).

A ``tap(name, value) -> value`` hook sees every named intermediate as it is
computed: ``emb``, ``embcat``; per block ``hprebn[l]``, the rule set's own
(``bnraw[l]`` ...), ``hpreact[l]``, ``h[l]``; then ``logits`` and the rule set's
cross-entropy steps. :mod:`jaxbirds.manual` records them, :mod:`jaxbirds.gradcheck`
adds a zero to each and differentiates with respect to it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxbirds import jvp, ops, vjp
from jaxbirds.errors import ConfigError
from jaxbirds.rules import RuleSet, Tap, no_tap

Params = dict[str, jax.Array]

#: The rule sets, by name: adding one is a module that defines a :class:`~jaxbirds.rules.RuleSet` (it must not
#: import this module) and an entry here, with its import above.
RULE_SETS: dict[str, RuleSet] = {r.name: r for r in (ops.AUTODIFF, vjp.RULE_SET, jvp.RULE_SET, ops.TUTORIAL)}
#: Their names.
RULES: tuple[str, ...] = tuple(RULE_SETS)


def rule_set(name: str) -> RuleSet:
    """The rule set called ``name``; ``ConfigError`` naming the choices if there is none."""
    try:
        return RULE_SETS[name]
    except KeyError:
        raise ConfigError(f"unknown rules {name!r}: use one of {RULES}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes of the model. ``vocab_size`` counts the end token; ``hidden`` holds one width per block
    (an int is read as one block: ``hidden=200`` is ``hidden=(200,)``)."""

    vocab_size: int = 29
    context_size: int = 3
    embedding_dim: int = 10
    hidden: tuple[int, ...] = (200,)

    def __post_init__(self):
        hidden = self.hidden
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if isinstance(hidden, Sequence) and not isinstance(hidden, str):
            object.__setattr__(self, "hidden", tuple(hidden))
        if not isinstance(self.hidden, tuple) or not self.hidden or not all(_positive_int(h) for h in self.hidden):
            raise ConfigError(f"ModelConfig.hidden must be one or more positive integers, got {hidden!r}")
        for name in ("vocab_size", "context_size", "embedding_dim"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")

    @property
    def fan_in(self) -> int:
        """Inputs of the first block: ``context_size * embedding_dim``."""
        return self.context_size * self.embedding_dim

    @property
    def depth(self) -> int:
        """The number of hidden blocks, ``L``."""
        return len(self.hidden)

    @property
    def widths(self) -> tuple[int, ...]:
        """Every layer's width from the embeddings' to the logits': ``(kE, H_1, ..., H_L, V)``."""
        return (self.fan_in, *self.hidden, self.vocab_size)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class BatchNormStats(NamedTuple):
    """One block's calibrated batch-norm statistics, each (1, H): used in evaluation mode."""

    mean: jax.Array
    var: jax.Array


#: Calibrated statistics of a whole model: one :class:`BatchNormStats` per block, first to last.
ModelStats = tuple[BatchNormStats, ...]


def layer_name(name: str, layer: int) -> str:
    """A block's intermediate: ``layer_name("hprebn", 2) == "hprebn[2]"``."""
    return f"{name}[{layer}]"


def in_layer(tap: Tap, layer: int) -> Tap:
    """``tap`` with every name it sees numbered for ``layer`` (``bnraw`` -> ``bnraw[2]``)."""
    return lambda name, value: tap(layer_name(name, layer), value)


def block_param_names(layer: int) -> tuple[str, str, str, str]:
    """Block ``layer``'s parameters: its linear layer's weights and bias, batch norm's gain and bias."""
    return f"W{layer}", f"b{layer}", f"bngain{layer}", f"bnbias{layer}"


def param_names(config: ModelConfig) -> tuple[str, ...]:
    """Every parameter's name, in the order of :func:`init_params`'s one draw: ``C``, each linear layer's
    ``W`` and ``b`` (the output layer's last), then each block's ``bngain`` and ``bnbias``. For one block
    that is the tutorial's order (``C W1 b1 W2 b2 bngain bnbias``), so the default model draws as it did."""
    linears = (f"{p}{layer}" for layer in range(1, config.depth + 2) for p in ("W", "b"))
    norms = (f"bn{p}{layer}" for layer in range(1, config.depth + 1) for p in ("gain", "bias"))
    return ("C", *linears, *norms)


def depth_of(params: Params) -> int:
    """The number of blocks in a parameter set (stacked or not)."""
    return sum(1 for name in params if name.startswith("bngain"))


def output_param_names(params: Params) -> tuple[str, str]:
    """The output layer's ``W`` and ``b``: ``W{L+1}``, ``b{L+1}``."""
    last = depth_of(params) + 1
    return f"W{last}", f"b{last}"


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape, keyed in :func:`param_names` order."""
    widths = config.widths
    shapes: dict[str, tuple[int, ...]] = {"C": (config.vocab_size, config.embedding_dim)}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        shapes[f"W{layer}"], shapes[f"b{layer}"] = (fan_in, fan_out), (fan_out,)
    for layer, width in enumerate(config.hidden, start=1):
        shapes[f"bngain{layer}"], shapes[f"bnbias{layer}"] = (1, width), (1, width)
    return {name: shapes[name] for name in param_names(config)}


def init_scales(config: ModelConfig) -> dict[str, float]:
    """The standard deviation each parameter is drawn with (see :func:`init_params`)."""
    scales = {"C": 1.0}
    for layer, fan_in in enumerate(config.widths[:-2], start=1):
        W, b, gain, bias = block_param_names(layer)
        scales |= {W: (5 / 3) / fan_in**0.5, b: 0.1, gain: 0.1, bias: 0.1}
    last = config.depth + 1
    return scales | {f"W{last}": 0.1, f"b{last}": 0.1}


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: jax.Array, config: ModelConfig, dtype=jnp.float32) -> Params:
    """The tutorial's initialisation, as one compiled program.

    ``C ~ N(0, 1)``; each block's ``Wl ~ N(0, 1) * (5/3) / sqrt(fan_in)``
    (Kaiming gain for tanh), ``bl ~ 0.1 N(0, 1)``, ``bngainl ~ 1 + 0.1 N(0, 1)``,
    ``bnbiasl ~ 0.1 N(0, 1)``; the output layer's ``W, b ~ 0.1 N(0, 1)``. All the
    standard normals come from one draw, cut into pieces in :func:`param_names`
    order: one random-number kernel instead of one per parameter, which compiles
    several times faster on a CPU. Jitted, so a run starts with one program
    rather than a dozen op-by-op dispatches, and a model initialised alone is
    bit-identical to one initialised under ``vmap`` (XLA fuses ``0.1 * N + 1``
    into one rounding, op-by-op execution rounds twice).
    """
    shapes, scales = param_shapes(config), init_scales(config)
    names = param_names(config)
    sizes = [math.prod(shapes[name]) for name in names]
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    params = {name: piece.reshape(shapes[name]) * scales[name] for name, piece in zip(names, pieces, strict=True)}
    for layer in range(1, config.depth + 1):
        params[f"bngain{layer}"] = params[f"bngain{layer}"] + 1.0
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


def embed(params: Params, X: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """``embcat = concat(C[X])``: each example's context embeddings side by side, (N, kE)."""
    C = params["C"]
    chex.assert_rank(X, 2)
    emb = tap("emb", C[X])
    chex.assert_shape(emb, (X.shape[0], X.shape[1], C.shape[1]))
    return tap("embcat", emb.reshape(X.shape[0], -1))


def hidden_preactivation(params: Params, X: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """``hprebn[1] = concat(C[X]) @ W1 + b1``: the input of the first batch norm, (N, H_1)."""
    return linear(params, 1, embed(params, X, tap), in_layer(tap, 1))


def linear(params: Params, layer: int, x: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """Block ``layer``'s ``hprebn = x @ Wl + bl``, (N, H_l), tapped as ``hprebn``."""
    W, b = params[f"W{layer}"], params[f"b{layer}"]
    chex.assert_shape(x, (None, W.shape[0]))
    return tap("hprebn", x @ W + b)


def block(
    params: Params,
    layer: int,
    x: jax.Array,
    rule_set: RuleSet,
    stats: BatchNormStats | None = None,
    tap: Tap = no_tap,
) -> jax.Array:
    """One Linear -> BatchNorm -> tanh block: ``h = tanh(bn(x @ Wl + bl))``, (N, H_l).

    Args:
      params: the model's parameters (this block reads ``Wl``, ``bl``, ``bngainl``, ``bnbiasl``).
      layer: the block's number, from 1.
      x: its input, (N, fan_in): ``embcat`` for the first block, the previous block's ``h`` after.
      rule_set: writes batch norm in training mode.
      stats: the block's calibrated statistics (evaluation mode), or None (the batch's own).
      tap: sees ``hprebn``, the rule set's batch-norm intermediates, ``hpreact`` and ``h``
        (numbered for the layer by the caller, see :func:`in_layer`).
    """
    _, _, gain_name, bias_name = block_param_names(layer)
    gain, bias = params[gain_name], params[bias_name]
    hprebn = linear(params, layer, x, tap)
    if stats is None:
        hpreact = rule_set.batch_norm(hprebn, gain, bias, tap)
    else:
        hpreact = ops.batch_norm_eval(hprebn, gain, bias, stats.mean, stats.var)
    hpreact = tap("hpreact", hpreact)
    chex.assert_equal_shape([hpreact, hprebn])
    return tap("h", jnp.tanh(hpreact))


def forward(
    params: Params,
    X: jax.Array,
    Y: jax.Array | None = None,
    *,
    stats: ModelStats | None = None,
    rules: str = "autodiff",
    tap: Tap = no_tap,
) -> jax.Array:
    """The forward pass: the mean cross-entropy of the targets ``Y`` (N,), or the logits (N, V) if ``Y`` is None.

    Args:
      params: the parameters (any depth: the blocks are counted from them).
      X: the contexts, (N, k) ids.
      Y: the next characters, (N,), or None for the logits.
      stats: one calibrated :class:`BatchNormStats` per block (evaluation mode), or None: batch norm
        uses the batch's own mean and unbiased variance (training mode).
      rules: the name of the rule set (:data:`RULE_SETS`).
      tap: sees every named intermediate (see the module docstring).
    """
    chosen = rule_set(rules)
    depth = depth_of(params)
    if stats is not None and len(stats) != depth:
        raise ConfigError(f"{len(stats)} sets of batch-norm statistics for a model of {depth} blocks")
    h = embed(params, X, tap)
    for layer in range(1, depth + 1):
        h = block(params, layer, h, chosen, None if stats is None else stats[layer - 1], in_layer(tap, layer))
    W, b = (params[name] for name in output_param_names(params))
    logits = tap("logits", h @ W + b)
    chex.assert_shape(logits, (X.shape[0], W.shape[1]))
    if Y is None:
        return logits
    chex.assert_shape(Y, (X.shape[0],))
    return chosen.cross_entropy(logits, Y, tap)


def logits(params: Params, X: jax.Array, stats: ModelStats | None = None, rules: str = "autodiff") -> jax.Array:
    """Logits (N, V): :func:`forward` without targets."""
    return forward(params, X, stats=stats, rules=rules)


def loss(
    params: Params, X: jax.Array, Y: jax.Array, stats: ModelStats | None = None, rules: str = "autodiff"
) -> jax.Array:
    """Mean cross-entropy of the next-character targets ``Y`` (N,): :func:`forward` with targets."""
    return forward(params, X, Y, stats=stats, rules=rules)
