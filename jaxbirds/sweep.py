"""Many models at once: a grid of learning rates × seeds trained by one compiled program, on every device.

The training chunk of :mod:`jaxbirds.train` is mapped over a leading *models*
axis with ``vmap``, and that axis is split over the devices with
``jax.shard_map`` on a one-axis :class:`~jax.sharding.Mesh`: each device trains
its block of ``K / devices`` models, with no communication at all (the models
share nothing but the read-only training data, replicated on every device).
The same code runs on the host devices of a CPU, on every GPU of a host, and
on many hosts after ``jax.distributed.initialize()`` (``jax.devices()`` then
lists them all).

Model ``k`` is the solo run with its seed and learning rate: the same
initialisation (bit for bit), the same minibatches (``fold_in(data_key, t)``),
the same step. Its learning rate lives in its optimiser's state
(``optax.inject_hyperparams``), so models with different rates share one
program; the step-decay schedule scales each model's own rate.

A model whose loss stops being finite is frozen from the next chunk on (its
``stop`` step is set behind it) and reported as diverged at its first bad step.
Nothing in the program mixes models, so it cannot disturb the others.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbirds import distributed, divergence, memory, model, train
from jaxbirds.errors import ConfigError
from jaxbirds.model import ModelConfig
from jaxbirds.train import TrainConfig

#: The name of the mesh axis the models are split over.
MODELS = "models"


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a sweep: what differs between models."""

    learning_rate: float
    seed: int


def grid(learning_rates: Sequence[float], seeds: Sequence[int]) -> tuple[Member, ...]:
    """Every learning rate with every seed, learning-rate major; checked like a solo run's values.

    Returns:
      The members, ``len(learning_rates) * len(seeds)`` of them.

    Raises:
      ConfigError: no rates or no seeds, a rate that is not a positive number, a seed out of range, or a
        rate (compared in float32) or a seed given twice.
    """
    if not learning_rates:
        raise ConfigError("no learning rates: give at least one (--lr or --lr-range)")
    if not seeds:
        raise ConfigError("no seeds: give at least one (--seeds N with N >= 1, or --seed-list)")
    for lr in learning_rates:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rates must be positive numbers, got {lr!r}")
    for seed in seeds:
        if not 0 <= seed < train.SEED_LIMIT:
            raise ConfigError(f"seeds must be integers from 0 to {train.SEED_LIMIT - 1:,}, got {seed!r}")
    # Learning rates are compared as the program holds them: 0.1 and 0.1000000001 are one float32, one model.
    as_used = [float(np.float32(lr)) for lr in learning_rates]
    if len(set(as_used)) < len(as_used) or len(set(seeds)) < len(seeds):
        raise ConfigError(
            "a learning rate or a seed is given twice (learning rates are compared in float32, as the models use "
            "them): every model of a sweep must differ"
        )
    return tuple(Member(float(lr), int(seed)) for lr in learning_rates for seed in seeds)


def log_spaced(low: float, high: float, count: int) -> list[float]:
    """``count`` learning rates from ``low`` to ``high``, evenly spaced on a log scale (``--lr-range``)."""
    if not (0 < low <= high and math.isfinite(high)) or count < 1:
        raise ConfigError(f"--lr-range needs 0 < LO <= HI and N >= 1, got {low:g} {high:g} {count}")
    if count == 1:
        return [low]
    return [float(f"{v:.6g}") for v in np.geomspace(low, high, count)]


def choose_devices(models: int, requested: int | None, available: int, processes: int = 1) -> int:
    """How many devices to split ``models`` over: ``requested``, checked, or by default the most
    that divide the models evenly.

    Args:
        models: the number of models of the sweep.
        requested: ``--devices``, or None for the default.
        available: the devices every process has, counted over all of them (``jax.devices()``).
        processes: ``jax.process_count()``. The mesh takes the same number of devices from every
            process (:func:`make_mesh`), so the count must be a multiple of it, and at most
            ``processes`` times the fewest devices of one process.

    Returns:
        The device count: it divides ``models`` and is a multiple of ``processes``.

    Raises:
        ConfigError: no such count, or ``requested`` is not one.
    """
    if models % processes:
        raise ConfigError(
            f"{models} models do not split evenly over {processes} processes (each trains the same number): "
            f"give a grid whose size is a multiple of {processes}"
        )
    fits = [d for d in range(processes, available + 1, processes) if models % d == 0]
    if requested is None:
        return max(fits)
    where = "this machine has" if processes == 1 else f"the {processes} processes have, between them,"
    if requested < 1 or requested > available:
        raise ConfigError(f"--devices {requested}: {where} {available} device(s)")
    if requested % processes:
        raise ConfigError(f"--devices {requested} do not split evenly over {processes} processes: pass a multiple "
                          f"of {processes} ({' or '.join(map(str, fits))})")  # fmt: skip
    if models % requested:
        raise ConfigError(
            f"{models} models do not split evenly over {requested} devices: pass --devices "
            f"{' or '.join(map(str, fits))}, or a grid whose size is a multiple of {requested}"
        )
    return requested


def make_mesh(devices: int) -> Mesh:
    """A one-axis mesh of ``devices`` devices: the first ``devices / P`` of each of the ``P`` processes
    (after ``jax.distributed.initialize()``), in process order, so that every process holds the same
    number of models. With one process, its first ``devices``."""
    processes = jax.process_count()
    local = [[d for d in jax.devices() if d.process_index == p] for p in range(processes)]
    each, rest = divmod(devices, processes)
    if rest or not 0 < each <= min(map(len, local)):
        raise ConfigError(
            f"{devices} devices do not split evenly over {processes} process(es) with "
            f"{', '.join(str(len(d)) for d in local)} device(s)"
        )
    return Mesh(np.array([d for process in local for d in process[:each]]), (MODELS,))


def injected_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """The config's optimiser with its learning rate as a hyperparameter in its state
    (``optax.inject_hyperparams``): one program, a learning rate per model. Its inner state has
    the structure of the solo optimiser's, so a sweep's model can be saved as a solo run."""
    return optax.inject_hyperparams(train_config.make_optimizer)(learning_rate=train_config.learning_rate)


def check_fits(model_config: ModelConfig, train_config: TrainConfig, models: int, budget: int | None = None) -> None:
    """Refuse, before anything is allocated, a sweep whose models or loss histories cannot fit the
    memory budget: every model's state (:func:`jaxbirds.train.check_fits`) and every model's loss
    at every step, kept on the host (float32). Every block counts (:func:`jaxbirds.model.param_count_for`)."""
    train.check_fits(model_config, train_config, budget=budget, models=models)
    memory.require(
        4 * models * train_config.steps, f"the loss history of {models:,} models × {train_config.steps:,} steps",
        "use fewer models or fewer --steps", budget,
    )  # fmt: skip


def init_models(
    model_config: ModelConfig,
    train_config: TrainConfig,
    members: Sequence[Member],
    sharding: NamedSharding | None = None,
):
    """Parameters and optimiser states of every member, stacked on a leading models axis, with each
    member's data key: what :func:`jaxbirds.train.init_state` and ``keys_for(seed).data`` give alone.
    With ``sharding``, each device makes its own block of models.

    Returns:
      ``(params, opt_states, data_keys)``, each leaf (K, ...): the optimiser states are
      :func:`injected_optimizer`'s, holding each member's learning rate.
    """
    optimizer = injected_optimizer(train_config)
    seeds = jnp.asarray([m.seed for m in members], jnp.uint32)
    rates = jnp.asarray([m.learning_rate for m in members], jnp.float32)

    @functools.partial(jax.jit, out_shardings=sharding)
    def init(seeds, rates):
        def one(seed, rate):
            keys = train.keys_for(seed)
            params = model.init_params(keys.init, model_config)
            state = optimizer.init(params)
            return params, state._replace(hyperparams={**state.hyperparams, "learning_rate": rate}), keys.data

        return jax.vmap(one)(seeds, rates)

    return init(seeds, rates)


#: The most models one batched program trains at once on a device; a device's larger block is
#: trained in groups of this size, one after another (docs/performance.md §6: beyond it, the batched
#: models' working set outgrows the CPU's caches and each model-step costs more).
GROUP = 4


def group_size(models: int, most: int = GROUP) -> int:
    """The largest divisor of ``models`` that is at most ``most``."""
    return max(g for g in range(1, min(models, most) + 1) if models % g == 0)


def models_chunk_fn(train_config: TrainConfig, length: int, group: int = GROUP) -> Callable:
    """:func:`jaxbirds.train.chunk_fn` over a leading models axis (``stop`` and the data key per model).

    The models are trained in groups of at most ``group``, one group after
    another (``lax.map``), each group batched with ``vmap``. A group of one
    model runs the solo chunk unbatched: ``vmap`` over an axis of size 1 turns
    every reduction over the batch of examples into one over a middle axis,
    which XLA's CPU backend (its YNNPACK fusions) runs about 25× slower (see
    docs/performance.md §6).
    """
    one = train.chunk_fn(train_config, length, optimizer=injected_optimizer(train_config))
    batched = jax.vmap(one, in_axes=(0, 0, None, 0, None, None, 0))

    def run_group(start, X, Y, params, opt_state, stops, data_keys):
        if stops.shape[0] > 1:
            return batched(params, opt_state, start, stops, X, Y, data_keys)
        first, (params, opt_state, data_keys) = stops[0], jax.tree.map(lambda x: x[0], (params, opt_state, data_keys))
        return jax.tree.map(lambda x: x[None], one(params, opt_state, start, first, X, Y, data_keys))

    def chunk(params, opt_state, start, stops, X, Y, data_keys):
        size = group_size(stops.shape[0], group)
        per_model = (params, opt_state, stops, data_keys)
        if size == stops.shape[0]:
            return run_group(start, X, Y, *per_model)
        grouped = jax.tree.map(lambda x: x.reshape(-1, size, *x.shape[1:]), per_model)
        outputs = jax.lax.map(lambda g: run_group(start, X, Y, *g), grouped)
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)

    return chunk


def compile_models_chunk(train_config: TrainConfig, length: int, mesh: Mesh, *args, group: int = GROUP) -> Callable:
    """:func:`models_chunk_fn`, each device running its block of models (``shard_map``), jitted with
    the parameter and optimiser buffers donated, and compiled for ``args``."""
    per_model, shared = P(MODELS), P()
    sharded = jax.shard_map(
        models_chunk_fn(train_config, length, group), mesh=mesh,
        in_specs=(per_model, per_model, shared, per_model, shared, shared, per_model),
        out_specs=(per_model, per_model, per_model),
    )  # fmt: skip
    return jax.jit(sharded, donate_argnums=(0, 1)).lower(*args).compile()


@dataclasses.dataclass(frozen=True)
class Progress:
    step: int
    total: int
    model_steps_per_second: float
    eta_seconds: float
    best_recent_loss: float  # the lowest mean loss over the chunk just run, among the models still training
    diverged: int


class SweepState(NamedTuple):
    """What a sweep's checkpoint saves after a chunk: every model's state, stacked, on the host."""

    params: model.Params  # each leaf (K, ...)
    opt_states: optax.OptState  # each leaf (K, ...): inject_hyperparams states
    step: int
    diverged_at: tuple[int | None, ...]  # per model: the first step whose loss was not finite, or None


class SweepResult(NamedTuple):
    params: model.Params  # stacked on the models axis, host copies
    opt_states: optax.OptState  # stacked, host copies (inject_hyperparams states)
    losses: np.ndarray  # (models, steps run): every step's loss; NaN after a model's divergence
    diverged_at: list[int | None]
    step: int  # steps run by every model that did not diverge (fewer than asked if all diverged or stopped)
    compile_seconds: float
    train_seconds: float
    stopped: bool  # stopped early on request (Ctrl-C)
    model_steps: int  # steps trained, summed over the models (a diverged model's up to its first bad loss)


def train_models(
    X: np.ndarray,
    Y: np.ndarray,
    model_config: ModelConfig,
    train_config: TrainConfig,
    members: Sequence[Member],
    mesh: Mesh,
    on_chunk: Callable[[Progress, SweepState, np.ndarray], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    memory_budget: int | None = None,
    group: int = GROUP,
    start: SweepState | None = None,
    losses_so_far: np.ndarray | None = None,
) -> SweepResult:
    """Train every member to ``train_config.steps`` (its ``learning_rate`` and ``seed`` are ignored:
    each member brings its own), in compiled chunks, split over ``mesh``'s devices.

    The phases: check that the sweep fits (:func:`check_fits`), place the models and the data on the
    mesh (:func:`_place`), compile the chunk and check its memory (:func:`_compile`), train chunk by
    chunk (:func:`_train_chunks`).

    Args:
      X: the training contexts, (N, context_size); Y: their next characters, (N,).
      members: the K models; K must be a multiple of ``mesh.size``.
      mesh: a one-axis mesh (:func:`make_mesh`): each device trains K / ``mesh.size`` models.
      on_chunk: called after every chunk with the progress, a host copy of the state (for a checkpoint)
        and the chunk's losses, (K, chunk steps), NaN for a diverged model.
      should_stop: polled after every chunk (by every process: a stop anywhere stops all).
      memory_budget: bytes the sweep may use (None: what the machine has; see :mod:`jaxbirds.memory`).
      group: the most models one batched program trains at once on a device (:data:`GROUP`).
      start: a saved state to continue (a sweep's checkpoint) instead of initialising the members;
        ``losses_so_far`` (K, ``start.step``) its loss history. Batches depend only on the seed and
        the step, so a resumed sweep ends where an uninterrupted one does.

    Returns:
      The trained models and their losses, on the host (see :class:`SweepResult`).

    Raises:
      ConfigError: no training examples, or K does not split evenly over the devices.
      MemoryBudgetError: the models, their histories or the compiled chunk do not fit in memory.
    """
    if len(Y) < 1:
        raise ConfigError("there are no training examples")
    if len(members) % mesh.size:
        raise ConfigError(f"{len(members)} models do not split evenly over {mesh.size} devices")
    check_fits(model_config, train_config, len(members), memory_budget)
    placed = _place(model_config, train_config, members, mesh, X, Y, start)
    compiled = _compile(train_config, mesh, placed, len(members), memory_budget, group)
    return _train_chunks(compiled, placed, train_config.steps, len(members), start, losses_so_far, on_chunk,
                         should_stop)  # fmt: skip


# The phases of train_models, in order.


class _Placed(NamedTuple):
    """The arrays of a sweep on its mesh: every model's own block on its device, the data on every device."""

    params: model.Params  # each leaf (K, ...), split over the devices
    opt_states: optax.OptState  # each leaf (K, ...), split over the devices
    data_keys: jax.Array  # (K, key): each model's data stream
    X: jax.Array  # (N, context_size), the same on every device
    Y: jax.Array  # (N,)
    per_model: NamedSharding  # how an array with a leading models axis is split


def _place(
    model_config: ModelConfig,
    train_config: TrainConfig,
    members: Sequence[Member],
    mesh: Mesh,
    X: np.ndarray,
    Y: np.ndarray,
    start: SweepState | None,
) -> _Placed:
    """Initialise every member on its device (:func:`init_models`), or put ``start``'s state there; put
    the data on every device."""
    per_model, shared = NamedSharding(mesh, P(MODELS)), NamedSharding(mesh, P())
    params, opt_states, data_keys = init_models(model_config, train_config, members, per_model)
    if start is not None:
        params, opt_states = jax.device_put((start.params, start.opt_states), per_model)
    X, Y = jax.device_put((np.asarray(X), np.asarray(Y)), shared)  # the same on every device
    return _Placed(params, opt_states, data_keys, X, Y, per_model)


class _Compiled(NamedTuple):
    """The compiled chunk of a sweep."""

    chunk: Callable  # (params, opt_states, start, stops, X, Y, data_keys) -> (params, opt_states, losses (K, length))
    length: int  # steps per chunk
    seconds: float  # compiling it and checking its memory


def _compile(
    tc: TrainConfig, mesh: Mesh, placed: _Placed, count: int, memory_budget: int | None, group: int
) -> _Compiled:
    """Compile the chunk for ``placed``'s arrays (:func:`compile_models_chunk`), and refuse it, on every
    process, if its buffers do not fit in memory (:func:`jaxbirds.memory.require_compiled`)."""
    length = min(tc.chunk_size, tc.steps)
    stops = np.full(count, 0, np.int32)

    t0 = time.perf_counter()
    args = (placed.params, placed.opt_states, jnp.int32(0), jax.device_put(stops, placed.per_model),
            placed.X, placed.Y, placed.data_keys)  # fmt: skip
    chunk = compile_models_chunk(tc, length, mesh, *args, group=group)
    devices = list(mesh.devices.flat)
    with distributed.agreed_errors():  # one host's memory may refuse it: then every process stops, with its line
        memory.require_compiled(
            chunk, f"a sweep chunk of {count:,} models × {length:,} steps at batch {tc.batch_size:,}",
            "use fewer models, a smaller --chunk or --batch-size"
            + (", or more --devices" if memory.more_devices_help(devices) else ""),
            memory_budget, copies=memory.devices_sharing_memory(devices),
        )  # fmt: skip
    return _Compiled(chunk, length, time.perf_counter() - t0)


def _train_chunks(
    compiled: _Compiled,
    placed: _Placed,
    steps: int,
    count: int,
    start: SweepState | None,
    losses_so_far: np.ndarray | None,
    on_chunk: Callable[[Progress, SweepState, np.ndarray], None] | None,
    should_stop: Callable[[], bool],
) -> SweepResult:
    """Run ``compiled`` chunk after chunk from ``start``'s step (or 0) to ``steps``, until every model has
    diverged or a stop is asked for; a diverged model is frozen from the next chunk on."""
    params, opt_states = placed.params, placed.opt_states
    losses = np.full((count, steps), np.nan, np.float32)
    diverged_at: list[int | None] = [None] * count if start is None else list(start.diverged_at)
    step, train_seconds, model_steps, stopped = 0 if start is None else start.step, 0.0, 0, False
    if start is not None:
        losses[:, :step] = losses_so_far
    while step < steps:
        first, end = step, min(step + compiled.length, steps)
        # A diverged model's stop lies behind it: it stays as it is, and its losses are ignored.
        stops = np.array([end if d is None else 0 for d in diverged_at], np.int32)
        t0 = time.perf_counter()
        params, opt_states, chunk_losses = compiled.chunk(
            params, opt_states, jnp.int32(step), jax.device_put(stops, placed.per_model), placed.X, placed.Y,
            placed.data_keys,
        )  # fmt: skip
        chunk_losses = to_host(chunk_losses)[:, : end - step]  # the one host sync per chunk
        train_seconds += time.perf_counter() - t0
        trained, recent = _record_chunk(chunk_losses, step, end, losses, diverged_at)
        model_steps += trained
        step = end
        if on_chunk is not None:
            progress = _progress(step, steps, model_steps, train_seconds, recent, diverged_at)
            state = SweepState(*jax.tree.map(to_host, (params, opt_states)), step, tuple(diverged_at))
            on_chunk(progress, state, losses[:, first:step])
        if all(d is not None for d in diverged_at):
            break  # nothing is left to train
        if distributed.any_process(should_stop()):  # a stop that reaches any process stops them all here
            stopped = True
            break
    host_params, host_states = jax.tree.map(to_host, (params, opt_states))
    return SweepResult(
        host_params, host_states, losses[:, :step], diverged_at, step, compiled.seconds, train_seconds,
        stopped, model_steps,
    )  # fmt: skip


def _record_chunk(
    chunk_losses: np.ndarray, step: int, end: int, losses: np.ndarray, diverged_at: list[int | None]
) -> tuple[int, list[float]]:
    """Record the chunk of steps ``step`` to ``end`` of every model still training.

    Writes ``losses[k, step:stop]`` (``losses``: (K, steps)) up to model ``k``'s first non-finite loss
    of ``chunk_losses`` (K, ``end - step``), or to ``end``; at a non-finite one, sets ``diverged_at[k]``.

    Returns:
      ``(model_steps, recent)``: the steps trained, summed over the models (a diverged model's up to its
      first bad loss); the mean chunk loss of each model still training.
    """
    recent, model_steps = [], 0
    for k in range(len(diverged_at)):
        if diverged_at[k] is not None:
            continue
        bad = divergence.first_bad_step(chunk_losses[k])
        stop_k = end if bad is None else step + bad
        losses[k, step:stop_k] = chunk_losses[k, : stop_k - step]
        model_steps += stop_k - step
        if bad is not None:
            diverged_at[k] = stop_k
        else:
            recent.append(float(chunk_losses[k].mean()))
    return model_steps, recent


def _progress(
    step: int, total: int, model_steps: int, train_seconds: float, recent: list[float], diverged_at: list[int | None]
) -> Progress:
    """The progress after a chunk: throughput, the time left for the models still training, the best recent loss."""
    alive = sum(d is None for d in diverged_at)
    rate = model_steps / train_seconds if train_seconds > 0 else float("inf")
    eta = alive * (total - step) / rate if rate > 0 else float("nan")
    return Progress(step, total, rate, eta, min(recent, default=float("nan")), len(diverged_at) - alive)


def to_host(x: jax.Array) -> np.ndarray:
    """A copy of every value of a (global) array on this host; after ``jax.distributed.initialize()``
    the blocks of the other processes are gathered too (a collective: every process calls it)."""
    if jax.process_count() > 1:
        return distributed.allgather(x, tiled=True)
    return np.array(x, copy=True)


def member(tree, k: int):
    """Model ``k``'s slice of a stacked tree."""
    return jax.tree.map(lambda x: x[k], tree)
