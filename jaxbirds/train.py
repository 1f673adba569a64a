"""Training: one compiled, scan-fused loop for three ways of computing the gradient.

A *chunk* of ``chunk_size`` SGD steps is one call of one compiled program:
``lax.scan`` runs the steps on the device, drawing each minibatch inside with
``jax.random`` and collecting every step's loss, so the host is involved once
per chunk, not once per step. Parameter and optimiser buffers are donated, so
XLA updates them in place.

The batch of step ``t`` is drawn with the key ``fold_in(data_key, t)``: it
depends only on the seed and the step number, never on how the run was cut
into chunks or resumed. That is what makes a resumed run bit-identical to an
uninterrupted one.

Gradient modes (``TrainConfig.grad_mode``):

* ``autodiff``   - ``jax.value_and_grad`` of the plain model (:mod:`jaxbirds.ops`);
* ``custom_vjp`` - ``jax.value_and_grad`` of the model built on :mod:`jaxbirds.vjp`;
* ``manual``     - :func:`jaxbirds.manual.fused_backward`; no ``jax.grad`` at all.

All three hand their gradients to the same optax optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbirds import manual, model
from jaxbirds.model import BatchNormStats, ModelConfig, Params
from jaxbirds.ops import check_batch_size

GradMode = Literal["autodiff", "custom_vjp", "manual"]
GRAD_MODES: tuple[str, ...] = ("autodiff", "custom_vjp", "manual")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. The defaults are the tutorial's recipe.

    The learning rate is ``learning_rate`` until ``decay_step``, then
    ``learning_rate * decay_factor`` (the tutorial: 0.1, then 0.01 from step 100,000).
    ``chunk_size`` steps run per compiled call; progress is reported at chunk ends.
    """

    steps: int = 200_000
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    decay_step: int = 100_000
    decay_factor: float = 0.1
    seed: int = 2147483647
    grad_mode: str = "autodiff"
    chunk_size: int = 10_000
    unroll: int = 1

    def __post_init__(self):
        problems = []
        if not (isinstance(self.steps, int) and self.steps >= 1):
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        try:
            check_batch_size(self.batch_size)
        except ValueError as err:
            problems.append(f"batch_size: {err}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (np.isfinite(self.decay_factor) and self.decay_factor > 0):
            problems.append(f"decay_factor must be a positive number, got {self.decay_factor!r}")
        if self.decay_step < 0:
            problems.append(f"decay_step must be >= 0, got {self.decay_step!r}")
        if self.grad_mode not in GRAD_MODES:
            problems.append(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.chunk_size < 1 or self.unroll < 1:
            problems.append(f"chunk_size and unroll must be >= 1, got {self.chunk_size}, {self.unroll}")
        if problems:
            raise ValueError("; ".join(problems))

    def schedule(self) -> optax.Schedule:
        return optax.piecewise_constant_schedule(self.learning_rate, {self.decay_step: self.decay_factor})

    def make_optimizer(self) -> optax.GradientTransformation:
        make = {"sgd": optax.sgd, "adam": optax.adam}[self.optimizer]
        return make(self.schedule())


class TrainState(NamedTuple):
    """Everything that evolves during training. ``step`` counts completed steps."""

    params: Params
    opt_state: optax.OptState
    step: int


def init_state(model_config: ModelConfig, train_config: TrainConfig, dtype=jnp.float32) -> TrainState:
    params = model.init_params(keys_for(train_config.seed).init, model_config, dtype)
    return TrainState(params, train_config.make_optimizer().init(params), 0)


class Keys(NamedTuple):
    init: jax.Array
    data: jax.Array


def keys_for(seed: int) -> Keys:
    """The seed's two independent streams: parameter initialisation and minibatch sampling."""
    return Keys(*jax.random.split(jax.random.key(seed)))


def loss_and_grads_fn(grad_mode: str) -> Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, Params]]:
    """``(params, X, Y) -> (loss, grads)`` for one of the three gradient modes."""
    if grad_mode == "autodiff":
        return jax.value_and_grad(functools.partial(model.loss, rules="jax"))
    if grad_mode == "custom_vjp":
        return jax.value_and_grad(functools.partial(model.loss, rules="custom_vjp"))
    if grad_mode == "manual":

        def manual_loss_and_grads(params, X, Y):
            result = manual.fused_backward(params, X, Y)
            return result.loss, result.grads

        return manual_loss_and_grads
    raise ValueError(f"unknown gradient mode {grad_mode!r}; choose from {GRAD_MODES}")


def sample_batch_indices(data_key: jax.Array, steps: jax.Array, batch_size: int, n_examples: int) -> jax.Array:
    """Minibatch rows for each step in ``steps``: ``(len(steps), batch_size)`` int32.

    Step ``t`` uses ``fold_in(data_key, t)``, so its batch is fixed by the seed
    and ``t`` alone. Drawing all steps' indices at once (vectorised over steps)
    keeps the random-number work off the sequential scan.
    """
    draw = lambda t: jax.random.randint(jax.random.fold_in(data_key, t), (batch_size,), 0, n_examples)
    return jax.vmap(draw)(steps)


def chunk_fn(train_config: TrainConfig, length: int, loss_and_grads: Callable | None = None) -> Callable:
    """The unit of training, not yet jitted: ``length`` SGD steps fused with ``lax.scan``.

    ``chunk(params, opt_state, start, X, Y, data_key) -> (params, opt_state, losses)``
    with ``losses`` of shape ``(length,)``. ``loss_and_grads`` replaces the gradient
    mode's function (the benchmarks time other passes with it). Pure, so it can be
    transformed further (the benchmarks ``vmap`` it over many models).
    """
    optimizer = train_config.make_optimizer()
    loss_and_grads = loss_and_grads or loss_and_grads_fn(train_config.grad_mode)

    def sgd_step(carry, batch):
        params, opt_state = carry
        loss, grads = loss_and_grads(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def chunk(params, opt_state, start, X, Y, data_key):
        rows = sample_batch_indices(data_key, start + jnp.arange(length), train_config.batch_size, X.shape[0])
        batches = (X[rows], Y[rows])  # every step's examples, gathered at once before the loop
        (params, opt_state), losses = jax.lax.scan(sgd_step, (params, opt_state), batches, unroll=train_config.unroll)
        return params, opt_state, losses

    return chunk


def make_chunk_fn(train_config: TrainConfig, length: int, loss_and_grads: Callable | None = None) -> Callable:
    """:func:`chunk_fn` jitted with the parameter and optimiser buffers donated.

    :func:`train` compiles it once per chunk length, ahead of time, and calls the
    compiled executable, which cannot retrace: a call with other shapes or dtypes
    is an error, not a silent recompile.
    """
    return jax.jit(chunk_fn(train_config, length, loss_and_grads), donate_argnums=(0, 1))


_COMPILED: dict[tuple, Callable] = {}


def compiled_chunk(train_config: TrainConfig, length: int, *args) -> Callable:
    """:func:`make_chunk_fn` compiled ahead of time for ``args``' shapes and dtypes, memoised.

    The key is the config, the length and the abstract arguments (shapes, dtypes,
    tree structure), so a second run, or a resumed one, in the same process
    reuses the executable instead of compiling it again.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (train_config, length, treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in _COMPILED:
        _COMPILED[key] = make_chunk_fn(train_config, length).lower(*args).compile()
    return _COMPILED[key]


@dataclasses.dataclass(frozen=True)
class Progress:
    """Reported after every chunk."""

    step: int
    total: int
    recent_loss: float  # mean loss over the chunk just run
    steps_per_second: float  # training throughput so far, compile excluded
    eta_seconds: float


class TrainResult(NamedTuple):
    state: TrainState  # the last state whose losses were all finite
    losses: np.ndarray  # the loss of every completed step, from step 0
    compile_seconds: float
    train_seconds: float  # time in compiled chunks, compile excluded
    stopped: bool  # stopped early on request (e.g. Ctrl-C)
    diverged_at: int | None  # first step with a non-finite loss, if any


def train(
    X: np.ndarray,
    Y: np.ndarray,
    train_config: TrainConfig,
    state: TrainState,
    losses_so_far: np.ndarray | None = None,
    on_chunk: Callable[[Progress, TrainState, np.ndarray], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Run ``state`` forward to ``train_config.steps`` in compiled chunks.

    ``on_chunk(progress, state, losses)`` is called after every chunk (for
    logging and checkpoints); ``should_stop()`` is polled after every chunk.
    If a chunk produces a non-finite loss, training stops and the state from
    before that chunk is returned with ``diverged_at`` set.

    The parameter and optimiser buffers of ``state`` are donated to the first
    chunk: use the returned state afterwards, not the one passed in.
    """
    if len(Y) < 1:
        raise ValueError("there are no training examples")
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    data_key = keys_for(train_config.seed).data
    previous = np.zeros(0, np.float32) if losses_so_far is None else np.asarray(losses_so_far, np.float32)
    losses = [previous[: state.step]]
    compile_seconds = train_seconds = 0.0
    # A host copy of the last finite state: the device copy is donated to the next chunk.
    last_good = jax.device_get(state)
    params, opt_state, step = state

    while step < train_config.steps:
        length = min(train_config.chunk_size, train_config.steps - step)
        t0 = time.perf_counter()
        args = (params, opt_state, jnp.int32(step), X, Y, data_key)
        chunk = compiled_chunk(train_config, length, *args)
        compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        params, opt_state, chunk_losses = chunk(*args)
        chunk_losses = np.asarray(chunk_losses)  # waits for the chunk: the one host sync per chunk
        train_seconds += time.perf_counter() - t0

        bad = np.flatnonzero(~np.isfinite(chunk_losses))
        if bad.size:
            diverged_at = step + int(bad[0])
            return TrainResult(last_good, np.concatenate(losses), compile_seconds, train_seconds, False, diverged_at)
        step += length
        losses.append(chunk_losses)
        last_good = TrainState(*jax.device_get((params, opt_state)), step)
        if on_chunk is not None:
            done = step - state.step
            rate = done / train_seconds if train_seconds > 0 else float("inf")
            progress = Progress(
                step, train_config.steps, float(chunk_losses.mean()), rate, (train_config.steps - step) / rate
            )
            on_chunk(progress, last_good, np.concatenate(losses))
        if should_stop():
            break

    final = TrainState(params, opt_state, step)
    return TrainResult(final, np.concatenate(losses), compile_seconds, train_seconds, step < train_config.steps, None)


# --------------------------------------------------------------------------- #
# After training: batch-norm calibration and evaluation                       #
# --------------------------------------------------------------------------- #

EVAL_BATCH = 16_384


def _padded_batches(n: int, batch: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch, n)) for start in range(0, n, batch)]


@jax.jit
def _column_sums(params: Params, X: jax.Array, valid: jax.Array, center: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of ``hprebn - center`` and of its square over the valid rows of one padded batch."""
    diff = (model.hidden_preactivation(params, X) - center) * valid[:, None]
    return jnp.sum(diff, axis=0, keepdims=True), jnp.sum(diff * diff, axis=0, keepdims=True)


def _pad(X: np.ndarray, start: int, stop: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((batch, *X.shape[1:]), X.dtype)
    rows[: stop - start] = X[start:stop]
    valid = np.zeros(batch, np.float32)
    valid[: stop - start] = 1.0
    return rows, valid


def calibrate(params: Params, X: np.ndarray, batch: int = EVAL_BATCH) -> BatchNormStats:
    """Batch-norm statistics over a whole split, in fixed-size jitted batches (one compile).

    Two passes for an accurate unbiased variance: the mean first, then the
    sum of squared deviations from it, each accumulated batch by batch.
    """
    n = len(X)
    check_batch_size(n)
    hidden = params["W1"].shape[1]
    zero = jnp.zeros((1, hidden), params["W1"].dtype)
    total = zero
    for start, stop in _padded_batches(n, batch):
        rows, valid = _pad(X, start, stop, batch)
        total = total + _column_sums(params, rows, valid.astype(zero.dtype), zero)[0]
    mean = total / n
    squares = zero
    for start, stop in _padded_batches(n, batch):
        rows, valid = _pad(X, start, stop, batch)
        squares = squares + _column_sums(params, rows, valid.astype(zero.dtype), mean)[1]
    return BatchNormStats(mean, squares / (n - 1))


@jax.jit
def _summed_nll(params: Params, stats: BatchNormStats, X: jax.Array, Y: jax.Array, valid: jax.Array) -> jax.Array:
    logits = model.logits(params, X, stats)
    log_probs = jax.nn.log_softmax(logits, axis=1)
    nll = -jnp.take_along_axis(log_probs, Y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * valid)


def evaluate(params: Params, stats: BatchNormStats, X: np.ndarray, Y: np.ndarray, batch: int = EVAL_BATCH) -> float:
    """Mean cross-entropy over a split in evaluation mode (calibrated batch norm)."""
    if len(Y) == 0:
        return float("nan")
    total = 0.0
    for start, stop in _padded_batches(len(Y), batch):
        rows, valid = _pad(X, start, stop, batch)
        labels, _ = _pad(Y, start, stop, batch)
        total += float(_summed_nll(params, stats, rows, labels, valid.astype(params["W1"].dtype)))
    return total / len(Y)
