"""Training: one compiled, scan-fused loop for four ways of computing the gradient.

A *chunk* of ``chunk_size`` SGD steps is one call of one compiled program:
``lax.scan`` runs the steps on the device, drawing each minibatch inside with
``jax.random`` and collecting every step's loss, so the host is involved once
per chunk, not once per step. Parameter and optimiser buffers are donated, so
XLA updates them in place.

The batch of step ``t`` is drawn with the key ``fold_in(data_key, t)``: it
depends only on the seed and the step number, never on how the run was cut
into chunks or resumed. That is what makes a resumed run bit-identical to an
uninterrupted one.

One program serves a whole run: a chunk takes its first step and a ``stop``
step as arguments and leaves the state unchanged past ``stop``, so the last,
shorter chunk of a run, a replay after divergence, another seed, or another
step count of at least one chunk all reuse the executable (see
:func:`compiled_chunk`; a run shorter than one chunk compiles a chunk of its
own length rather than compute steps it would throw away).

Gradient modes (``TrainConfig.grad_mode``):

* ``autodiff``   - ``jax.value_and_grad`` of the model with the plain rules (:mod:`jaxbirds.ops`);
* ``custom_vjp`` - ``jax.value_and_grad`` of the model with the hand-written VJP rules (:mod:`jaxbirds.vjp`);
* ``custom_jvp`` - ``jax.value_and_grad`` of the model with the hand-written JVP rules (:mod:`jaxbirds.jvp`),
  which JAX transposes into the backward pass;
* ``manual``     - :func:`jaxbirds.manual.fused_backward`; no ``jax.grad`` at all.

All four hand their gradients to the same optax optimiser.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbirds import diagnostics, divergence, memory, model, modes
from jaxbirds.errors import ConfigError
from jaxbirds.model import ModelConfig, Params
from jaxbirds.ops import check_batch_size

GRAD_MODES: tuple[str, ...] = modes.GRAD_MODES
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
#: Seeds are 32-bit: ``jax.random.key`` folds larger ones onto smaller ones without 64-bit mode.
SEED_LIMIT = 2**32
#: Step numbers and sizes reach the compiled program as int32.
INT32_LIMIT = 2**31


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
    # Record the diagnostics of :mod:`jaxbirds.diagnostics` at every step that is a multiple of this
    # (inside the compiled loop); 0: none, and the training program is the one without them.
    diagnostics_every: int = 0

    def __post_init__(self):
        problems = []
        if not (isinstance(self.steps, int) and self.steps >= 1):
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        try:
            check_batch_size(self.batch_size)
        except ConfigError as err:
            problems.append(f"batch_size: {err}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            problems.append(f"seed must be an integer from 0 to {SEED_LIMIT - 1:,}, got {self.seed!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("learning_rate", "decay_factor"):
            if not _positive_finite(getattr(self, name)):
                problems.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.decay_step < 0:
            problems.append(f"decay_step must be >= 0, got {self.decay_step!r}")
        if self.grad_mode not in modes.MODES:  # looked up now: a rule set registered later is a mode too
            problems.append(f"grad_mode must be one of {tuple(modes.MODES)}, got {self.grad_mode!r}")
        if not (isinstance(self.diagnostics_every, int) and self.diagnostics_every >= 0):
            problems.append(f"diagnostics_every must be 0 (none) or a positive integer, got {self.diagnostics_every!r}")
        if self.chunk_size < 1 or self.unroll < 1:
            problems.append(f"chunk_size and unroll must be >= 1, got {self.chunk_size}, {self.unroll}")
        for name in ("steps", "batch_size", "decay_step", "chunk_size", "diagnostics_every"):
            value = getattr(self, name)
            if isinstance(value, int) and value >= INT32_LIMIT:
                problems.append(f"{name} must be below 2**31 (it is an int32 in the program), got {value:,}")
        if problems:
            raise ConfigError("; ".join(problems))

    def schedule(self, learning_rate: float | jax.Array | None = None) -> optax.Schedule:
        """The step-decay schedule, starting from ``learning_rate`` (default: the config's own;
        :mod:`jaxbirds.sweep` passes each model's, a traced value)."""
        start = self.learning_rate if learning_rate is None else learning_rate
        return optax.piecewise_constant_schedule(start, {self.decay_step: self.decay_factor})

    def make_optimizer(self, learning_rate: float | jax.Array | None = None) -> optax.GradientTransformation:
        make = {"sgd": optax.sgd, "adam": optax.adam}[self.optimizer]
        return make(self.schedule(learning_rate))


def _positive_finite(value) -> bool:
    """A real number, finite as a float (``10**400`` is not: it overflows), and positive."""
    try:
        return not isinstance(value, bool) and math.isfinite(float(value)) and value > 0
    except (TypeError, ValueError, OverflowError):
        return False


#: The fields the compiled training program depends on. The others (``steps``,
#: ``seed``, ``chunk_size``) enter as arguments or loop bounds: changing them
#: reuses the executable.
PROGRAM_FIELDS = (
    "batch_size", "optimizer", "learning_rate", "decay_step", "decay_factor", "grad_mode", "unroll",
    "diagnostics_every",
)  # fmt: skip


class TrainState(NamedTuple):
    """Everything that evolves during training. ``step`` counts completed steps."""

    params: Params
    opt_state: optax.OptState
    step: int


def check_fits(
    model_config: ModelConfig, train_config: TrainConfig, dtype=jnp.float32, budget: int | None = None, models: int = 1
):
    """Refuse, before anything is allocated, ``models`` models whose state cannot fit the memory budget.

    Counted: parameters, gradients and updates, the optimiser's slots (adam keeps
    two per parameter), and a copy of the parameters while they are initialised.
    The training program itself is checked by XLA's memory analysis in :func:`train`.
    """
    slots = {"sgd": 0, "adam": 2}[train_config.optimizer]
    n = model.param_count_for(model_config)
    memory.require(
        models * n * jnp.dtype(dtype).itemsize * (4 + slots),
        f"{models:,} model(s) of {n:,} parameters, with their gradients and {train_config.optimizer} state",
        "use fewer models, or a smaller --hidden or --embedding",
        budget,
    )


def init_state(model_config: ModelConfig, train_config: TrainConfig, dtype=jnp.float32) -> TrainState:
    params = model.init_params(keys_for(train_config.seed).init, model_config, dtype)
    return TrainState(params, train_config.make_optimizer().init(params), 0)


class Keys(NamedTuple):
    """One independent random stream per purpose, all from the run's seed."""

    init: jax.Array  # parameter initialisation
    data: jax.Array  # minibatch sampling: step t uses fold_in(data, t)
    sample: jax.Array  # the names sampled at the end of a run


def keys_for(seed: int | jax.Array) -> Keys:
    """The seed's three independent streams (one ``split``, never a key used twice).

    ``0 <= seed < 2**32``: the seed enters the program as a uint32, since the
    larger half of that range does not fit an int32.
    """
    return _split_seed(jnp.asarray(seed, jnp.uint32))


@jax.jit
def _split_seed(seed: jax.Array) -> Keys:
    streams = jax.random.split(jax.random.key(seed), 3)
    return Keys(streams[0], streams[1], streams[2])


def loss_and_grads_fn(grad_mode: str) -> Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, Params]]:
    """``(params, X, Y) -> (loss, grads)`` for one of the gradient modes (:mod:`jaxbirds.modes`)."""
    return modes.grad_mode(grad_mode).loss_and_grads


def sample_batch_indices(data_key: jax.Array, steps: jax.Array, batch_size: int, n_examples: int) -> jax.Array:
    """Minibatch rows for each step in ``steps``: ``(len(steps), batch_size)`` int32.

    Step ``t`` uses ``fold_in(data_key, t)``, so its batch is fixed by the seed
    and ``t`` alone. Drawing all steps' indices at once (vectorised over steps)
    keeps the random-number work off the sequential scan.
    """

    def draw(t):
        return jax.random.randint(jax.random.fold_in(data_key, t), (batch_size,), 0, n_examples)

    return jax.vmap(draw)(steps)


def chunk_fn(
    train_config: TrainConfig,
    length: int,
    loss_and_grads: Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> Callable:
    """The unit of training, not yet jitted: ``length`` SGD steps fused with ``lax.scan``.

    ``chunk(params, opt_state, start, stop, X, Y, data_key) -> (params, opt_state, losses)``
    runs steps ``start .. start + length - 1``; a step ``t >= stop`` computes but
    changes nothing (its loss is returned, and meaningless), so one program
    serves chunks of any length up to ``length``. ``losses`` has shape
    ``(length,)``. ``loss_and_grads`` replaces the gradient mode's function (the
    benchmarks time other passes with it); ``optimizer`` replaces the config's
    (a sweep's keeps each model's learning rate in its state). Pure, so it can
    be transformed further: :mod:`jaxbirds.sweep` maps it over many models with ``vmap``.

    With ``train_config.diagnostics_every = k > 0`` the chunk returns a fourth value,
    ``(records, snapshot)`` (:mod:`jaxbirds.diagnostics`), see :func:`_recording_loop`: each step
    ``t < stop`` that is a multiple of ``k`` writes its :func:`~jaxbirds.diagnostics.record` into
    the next of :func:`~jaxbirds.diagnostics.records_per_chunk` rows (unused rows keep step -1),
    and its tensors replace the snapshot. Every step's arithmetic is the same either way (the same
    losses and parameters, bit for bit); with ``k = 0`` the program is the one without diagnostics.
    """
    optimizer = optimizer or train_config.make_optimizer()
    loss_and_grads = loss_and_grads or loss_and_grads_fn(train_config.grad_mode)
    every = train_config.diagnostics_every

    def step_update(params, opt_state, t, stop, Xb, Yb):
        """One SGD step (nothing changes at ``t >= stop``): the new state, the loss, the gradient and the update."""
        loss, grads = loss_and_grads(params, Xb, Yb)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt_state)
        new_params, opt_state = jax.tree.map(lambda n, o: jnp.where(t < stop, n, o), new, (params, opt_state))
        return new_params, opt_state, loss, grads, updates

    def sgd_step(carry, batch):
        params, opt_state, stop = carry
        t, Xb, Yb = batch
        params, opt_state, loss, _, _ = step_update(params, opt_state, t, stop, Xb, Yb)
        return (params, opt_state, stop), loss

    def chunk(params, opt_state, start, stop, X, Y, data_key):
        steps = start + jnp.arange(length)
        rows = sample_batch_indices(data_key, steps, train_config.batch_size, X.shape[0])
        batches = (steps, X[rows], Y[rows])  # every step's examples, gathered at once before the loop
        if not every:
            carry = (params, opt_state, stop)
            (params, opt_state, _), losses = jax.lax.scan(sgd_step, carry, batches, unroll=train_config.unroll)
            return params, opt_state, losses
        return _recording_loop(step_update, params, opt_state, start, stop, batches, every, train_config.batch_size)

    return chunk


def _recording_loop(step_update: Callable, params, opt_state, start, stop, batches, every: int, batch_size: int):
    """The chunk's steps with diagnostics: ``(params, opt_state, losses, (records, snapshot))``.

    Not a ``lax.scan`` of steps with the recording under ``lax.cond``: a conditional that holds
    matrix products, in the loop body, slows every step on XLA's CPU backend even when it is never
    taken (by ~40% at the default model, measured: the cost is the conditional's, not the
    recording's). Instead a loop over the chunk's recording steps, run
    :func:`~jaxbirds.diagnostics.records_per_chunk` times, takes each recording step explicitly
    (its gradient and update then feed the record as well as the training, under a conditional that
    runs once per record, not per step), then a plain loop of steps up to the next one. The first
    recording step of the chunk is ``first = start + (-start) % every``; the steps before it run
    first. Steps at or past ``stop`` are not run at all (their losses stay 0: past ``stop`` they
    are meaningless anyway). ``TrainConfig.unroll`` does not apply (the loops' bounds are dynamic).

    Args:
      step_update: ``(params, opt_state, t, stop, Xb, Yb) -> (params, opt_state, loss, grads, updates)``.
      params, opt_state: the state at step ``start``.
      start, stop: the chunk's first step and the first step it does not run, () int32.
      batches: ``(steps (length,), X (length, N, k), Y (length, N))``: every step's number and minibatch.
      every: record the steps that are multiples of this.
      batch_size: N.
    """
    steps, Xs, Ys = batches
    length = steps.shape[0]
    live = jnp.clip(stop - start, 0, length)  # steps run: chunk indices 0 .. live - 1
    rows = diagnostics.records_per_chunk(length, every)
    first = (-start) % every  # chunk index of the first recording step

    def train_step(i, carry):
        params, opt_state, losses = carry
        params, opt_state, loss, _, _ = step_update(params, opt_state, steps[i], stop, Xs[i], Ys[i])
        return params, opt_state, losses.at[i].set(loss)

    def train_steps(lo, hi, carry):
        return jax.lax.fori_loop(jnp.minimum(lo, live), jnp.minimum(hi, live), train_step, carry)

    def record_and_train(i, carry, log):
        """Step ``i``, recording its state, gradient and update."""
        (params, opt_state, losses), (count, records, snapshot) = carry, log
        new_params, new_opt_state, loss, grads, updates = step_update(params, opt_state, steps[i], stop, Xs[i], Ys[i])
        numbers, snapshot = diagnostics.record(steps[i], params, grads, updates, Xs[i], Ys[i])
        log = (count + 1, diagnostics.write_row(records, count, numbers), snapshot)
        return (new_params, new_opt_state, losses.at[i].set(loss)), log

    def segment(r, state):
        """Recording step ``first + r * every`` (if the chunk runs it), then the steps before the next one."""
        carry, log = state
        i = first + r * every
        carry, log = jax.lax.cond(i < live, record_and_train, lambda i, *state: state, i, carry, log)
        return train_steps(i + 1, i + every, carry), log

    losses = jnp.zeros(length, params["W1"].dtype)  # the loss has the parameters' dtype
    carry = train_steps(0, first, (params, opt_state, losses))
    log = (jnp.int32(0), *diagnostics.empty(params, batch_size, rows))
    (params, opt_state, losses), (_, records, snapshot) = jax.lax.fori_loop(0, rows, segment, (carry, log))
    return params, opt_state, losses, (records, snapshot)


def make_chunk_fn(train_config: TrainConfig, length: int, loss_and_grads: Callable | None = None) -> Callable:
    """:func:`chunk_fn` jitted with the parameter and optimiser buffers donated.

    :func:`train` compiles it once per run, ahead of time, and calls the
    compiled executable, which cannot retrace: a call with other shapes or dtypes
    is an error, not a silent recompile.
    """
    return jax.jit(chunk_fn(train_config, length, loss_and_grads), donate_argnums=(0, 1))


_COMPILED: dict[tuple, Callable] = {}


def compiled_chunk(train_config: TrainConfig, length: int, *args) -> Callable:
    """:func:`make_chunk_fn` compiled ahead of time for ``args``' shapes and dtypes, memoised.

    The key holds only what the program depends on: :data:`PROGRAM_FIELDS`, the
    chunk length and the abstract arguments (shapes, dtypes, tree structure). A
    second run in the same process with another seed or step count, or a
    resumed one, reuses the executable instead of compiling it again.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    program = tuple(getattr(train_config, name) for name in PROGRAM_FIELDS)
    key = (program, length, treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in _COMPILED:
        _COMPILED[key] = make_chunk_fn(train_config, length).lower(*args).compile()
    return _COMPILED[key]


def host_copy(tree):
    """A NumPy copy of every leaf. A copy, not a view: a view would keep the device buffer
    alive and stop it from being donated to the next chunk."""
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Reported after every chunk."""

    step: int
    total: int
    recent_loss: float  # mean loss over the chunk just run
    steps_per_second: float  # training throughput so far, compile excluded
    eta_seconds: float


class TrainResult(NamedTuple):
    state: TrainState  # the final state; after divergence, the last state whose own loss is finite
    losses: np.ndarray  # the loss of every completed step, from step 0
    compile_seconds: float
    train_seconds: float  # time in compiled chunks, compile excluded
    stopped: bool  # stopped early on request (e.g. Ctrl-C)
    diverged_at: int | None  # first step with a non-finite loss, if any
    # with diagnostics_every > 0: what this call recorded, from the step it started at (a resumed run's
    # records begin where it resumed) to the state returned; None without, or when no step was recorded
    diagnostics: diagnostics.Recorded | None = None


def train(
    X: np.ndarray,
    Y: np.ndarray,
    train_config: TrainConfig,
    state: TrainState,
    losses_so_far: np.ndarray | None = None,
    on_chunk: Callable[[Progress, TrainState, np.ndarray], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    memory_budget: int | None = None,
) -> TrainResult:
    """Run ``state`` forward to ``train_config.steps`` in compiled chunks.

    ``on_chunk(progress, state, chunk_losses)`` is called after every chunk with
    a host (NumPy) copy of the state and the losses of that chunk's steps (for
    logging and checkpoints); ``should_stop()`` is polled after every chunk.

    If a step's loss is not finite, training stops. The state returned is then
    the last one whose own loss is finite: the state one step before the bad
    one, rebuilt by replaying from the start of its chunk (batches depend only
    on the seed and the step, so the replay retraces the same path). If the
    very first loss of the call is not finite, there is no such state: the
    state passed in is returned, with ``diverged_at == state.step``.

    The compiled program is checked against ``memory_budget`` (default: see
    :mod:`jaxbirds.memory`) before it first runs. The parameter and optimiser
    buffers of ``state`` are donated to the first chunk: use the returned state
    afterwards, not the one passed in.
    """
    if len(Y) < 1:
        raise ConfigError("there are no training examples")
    tc = train_config
    previous = np.zeros(0, np.float32) if losses_so_far is None else np.asarray(losses_so_far, np.float32)
    losses = [previous[: state.step]]
    recorder = _Recorder() if tc.diagnostics_every else None
    if state.step >= tc.steps:  # nothing left to train: no program to compile
        return TrainResult(state, losses[0], 0.0, 0.0, False, None)
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    data_key = keys_for(tc.seed).data
    length = min(tc.chunk_size, tc.steps)
    params, opt_state, step = state

    t0 = time.perf_counter()
    chunk = compiled_chunk(tc, length, params, opt_state, jnp.int32(0), jnp.int32(0), X, Y, data_key)
    memory.require_compiled(
        chunk, f"a training chunk of {length:,} steps at batch {tc.batch_size:,}",
        "use a smaller --chunk or --batch-size", memory_budget,
    )  # fmt: skip
    compile_seconds = time.perf_counter() - t0
    train_seconds = 0.0
    starts = [TrainState(*host_copy((params, opt_state)), step)]  # host copies of the last two chunk starts

    def run_chunk(params, opt_state, start, stop):
        """``(params, opt_state, losses, log)``; ``log`` is the chunk's diagnostics, None without."""
        params, opt_state, losses, *log = chunk(params, opt_state, jnp.int32(start), jnp.int32(stop), X, Y, data_key)
        return params, opt_state, losses, (log[0] if log else None)

    def state_at(target: int) -> TrainState:
        """Replay from the latest saved chunk start at or before ``target`` up to ``target``."""
        origin = next(s for s in reversed(starts) if s.step <= target)
        if origin.step == target:
            return origin
        new_params, new_opt_state, *_ = run_chunk(*host_copy((origin.params, origin.opt_state)), origin.step, target)
        return TrainState(*host_copy((new_params, new_opt_state)), target)

    while step < tc.steps:
        stop = min(step + length, tc.steps)
        t0 = time.perf_counter()
        params, opt_state, chunk_losses, log = run_chunk(params, opt_state, step, stop)
        chunk_losses = np.asarray(chunk_losses)[: stop - step]  # waits for the chunk: the one host sync per chunk
        train_seconds += time.perf_counter() - t0

        bad = divergence.first_bad_step(chunk_losses)
        if bad is not None:
            diverged_at = step + bad
            losses.append(chunk_losses[:bad])
            # loss[t] is the loss of the state after t steps: the state after diverged_at - 1 steps
            # is the last with a finite loss of its own (none if the call's very first loss is bad).
            last_finite = diverged_at - 1
            good = state_at(last_finite) if last_finite >= starts[0].step else starts[0]
            history = np.concatenate(losses)[: good.step]
            if recorder is not None:
                recorder.add(log, last=good.step)
            recorded = recorder.result() if recorder else None
            return TrainResult(good, history, compile_seconds, train_seconds, False, diverged_at, recorded)
        if recorder is not None:
            recorder.add(log)
        step = stop
        losses.append(chunk_losses)
        host = TrainState(*host_copy((params, opt_state)), step)
        starts = [starts[-1], host]
        if on_chunk is not None:
            done = step - state.step
            rate = done / train_seconds if train_seconds > 0 else float("inf")
            eta = (tc.steps - step) / rate
            on_chunk(Progress(step, tc.steps, float(chunk_losses.mean()), rate, eta), host, chunk_losses)
        if should_stop():
            break

    final = TrainState(params, opt_state, step)
    recorded = recorder.result() if recorder else None
    return TrainResult(final, np.concatenate(losses), compile_seconds, train_seconds, step < tc.steps, None, recorded)


class _Recorder:
    """Collects the chunks' diagnostics on the host: every record in step order, and the latest snapshot."""

    def __init__(self):
        self.parts: list[diagnostics.Record] = []
        self.snapshot: diagnostics.Snapshot | None = None

    def add(self, log: tuple[diagnostics.Record, diagnostics.Snapshot] | None, last: int | None = None) -> None:
        """Keep a chunk's records and snapshot (one copy to the host); with ``last``, only those of steps up to
        ``last`` (after a divergence: the states past the last finite one are not kept)."""
        if log is None:
            return
        records, snapshot = host_copy(log)
        if last is not None:
            records = records._replace(step=np.where(records.step <= last, records.step, -1))
        self.parts.append(records)
        if snapshot.step >= 0 and (last is None or snapshot.step <= last):
            self.snapshot = snapshot

    def result(self) -> diagnostics.Recorded | None:
        if not self.parts:
            return None
        return diagnostics.Recorded(diagnostics.concatenate(self.parts), self.snapshot)
