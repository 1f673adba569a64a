"""A sweep on disk: what ``scripts/sweep.py`` does, as a library function.

Train every model of the grid in one program (:mod:`jaxbirds.sweep`), then
calibrate and evaluate each model as a solo run would, print a table per run
and a summary per learning rate, and write into the output directory:

* ``sweep.json``     - every run's learning rate, seed, split losses and divergence step; the
  summary per learning rate; the number of models and devices, the throughput, the configs
  (strict JSON: a loss that does not exist is ``null``);
* ``sweep.png``      - dev loss against learning rate over seeds, and every model's loss curve;
* ``checkpoint.npz`` and ``losses.f32`` - the best model (lowest dev loss), saved as an ordinary
  solo run with its own learning rate and seed: ``scripts/sample.py`` loads it, and
  ``scripts/train.py --resume --out DIR`` continues it.

Ctrl-C stops after the current chunk; what was trained so far is evaluated and saved. A sweep in
which every model diverged saves no model and ends with exit code 1.

:func:`run` is a sequence of phases, each a function below that says what it reads and writes:

1. train every model in compiled chunks, saving every model's state and losses after every chunk on a
   background thread (``sweep-state.npz``, ``sweep-losses.f32``: a crash or Ctrl-C loses at most one
   chunk), with a progress line every ``log_every`` steps: :func:`_train_with_checkpoints`;
2. calibrate and evaluate every model as a solo run would: :func:`_evaluate_models` (a stop asked for
   here ends the sweep: :func:`_interrupted_in_evaluation`); print the tables;
3. save the best model as a solo run: :func:`_save_best`;
4. draw ``sweep.png`` and write ``sweep.json`` (:func:`_report`, :func:`_write_results`), and say how the
   sweep ended: :func:`_ending`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import jax
import numpy as np

from jaxbirds import checkpoint, cli, divergence, evaluate, outputs, plots, runner, sweep, sweep_results, train
from jaxbirds.checkpoint import Checkpoint, CheckpointError, DataSource, SweepMembers
from jaxbirds.checkpoint_writer import LossLog, Writer
from jaxbirds.data import Dataset
from jaxbirds.errors import OutputError
from jaxbirds.model import ModelConfig
from jaxbirds.sweep import Member
from jaxbirds.train import TrainConfig

SWEEP_JSON, SWEEP_PLOT = outputs.SWEEP_JSON, outputs.SWEEP_PLOT
SWEEP_STATE, SWEEP_LOSSES = outputs.SWEEP_STATE, outputs.SWEEP_LOSSES


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What a sweep writes and prints besides its checkpoint, and where it runs (``scripts/sweep.py``'s flags)."""

    out: Path  # the output directory (--out): every file of the sweep goes there
    devices: int  # devices the models are split over (--devices, checked by sweep.choose_devices)
    plot: bool = True  # draw sweep.png (False: --no-plot)
    log_every: int = 10_000  # steps between progress lines (--log-every)


#: On --resume, these may change for a sweep; its grid (learning rates and seeds) and every other
#: setting belong to it, as for a run (scripts/train.py --resume), and so do its data.
CHANGEABLE = ("steps", "decay_step", "chunk_size")


def load_resumable(out: Path, data_path: Path | None, asked: dict) -> tuple[Checkpoint, np.ndarray, Dataset, list[str]]:
    """The sweep saved in ``out``, to continue with the changes asked for.

    Args:
      out: the sweep's output directory (``--out``).
      data_path: the names file given with ``--data``, or None for the one the sweep was trained on.
      asked: ``cli.given`` of the training flags: the changes asked for.

    Returns:
      ``(saved, history, dataset, changes)``: the checkpoint with the changes made (its members are
      ``saved.sweep``'s), its loss history (K, step), its data, and a line per change.

    Raises:
      CheckpointError: no readable sweep checkpoint in ``out`` (a run's checkpoint is not one).
      ConfigError: a flag asks to change what belongs to the sweep (see :data:`CHANGEABLE`), or other data.
    """
    saved, dataset = runner.load_resumable(Path(out) / SWEEP_STATE, data_path)
    if saved.sweep is None:
        raise CheckpointError(f"{Path(out) / SWEEP_STATE} holds a single run, not a sweep")
    train_config, described = cli.resumed_config(asked, saved, CHANGEABLE)
    history = LossLog(Path(out) / SWEEP_LOSSES, len(saved.sweep.seeds)).read(saved.state.step, saved.loss_log_crc32)
    return saved._replace(train_config=train_config), history, dataset, described


def members_of(saved: Checkpoint) -> tuple[Member, ...]:
    """The models of a saved sweep.

    Args:
      saved: a sweep's checkpoint (``saved.sweep`` given).

    Returns:
      Its members, in its order.
    """
    return tuple(Member(lr, seed) for lr, seed in zip(saved.sweep.learning_rates, saved.sweep.seeds, strict=True))


def prepare_output(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to replace saved results (a sweep's or a run's) unless asked to; check that every file a sweep
    may write or remove can be written (:func:`jaxbirds.outputs.prepare`). Creates nothing.

    Args:
      out: the output directory.
      overwrite: a new sweep may replace the results saved in ``out`` (``--overwrite``).
      resume: the sweep continues the one saved in ``out`` (``--resume``).

    Raises:
      OutputError: ``out`` holds results that neither flag allows to touch, or a file cannot be written.
    """
    outputs.prepare(out, outputs.ALL_FILES, "results", SWEEP_STATE, resume=resume, overwrite=overwrite)


def run(
    dataset: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    members: Sequence[Member],
    options: SweepOptions,
    should_stop: Callable[[], bool] = lambda: False,
    log: TextIO | None = None,
    resume_from: Checkpoint | None = None,
    history: np.ndarray | None = None,
) -> int:
    """Train, evaluate and report a sweep, phase after phase (see the module's docstring).

    ``resume_from`` continues the sweep to where an uninterrupted one ends. After ``jax.distributed.initialize()``,
    every process trains its devices' models and evaluates all of them; only the first process prints and writes
    files (every process reads ``resume_from``).

    Args:
      members: the K models; ``train_config`` holds what they share.
      options: the output directory, the devices, what to draw and how often to print.
      should_stop: polled after every chunk and between evaluation batches (Ctrl-C).
      log: where progress and results are printed (None: nowhere).
      resume_from: a sweep's checkpoint to continue; ``history`` its loss history, (K, step) (read from
        ``options.out`` if not given).

    Returns:
      The exit code: ``runner.OK``, ``runner.DIVERGED`` (every model diverged) or ``runner.INTERRUPTED``.

    Raises:
      ConfigError: the plot cannot be drawn, or the devices are not a mesh. OutputError: a file cannot be written.
    """
    if jax.process_index() != 0:
        log, options = None, dataclasses.replace(options, plot=False)
    say = (lambda line: print(line, file=log, flush=True)) if log else (lambda line: None)
    if options.plot:
        plots.require()
    t_start = time.perf_counter()
    mesh = sweep.make_mesh(options.devices)
    start, history = _start_of(resume_from, history, options, len(members))
    parts = _SweepParts(dataset, model_config, train_config, members)
    trained = _train_with_checkpoints(parts, options, mesh, start, history, should_stop, say)
    try:
        evaluated = _evaluate_models(trained.result, members, dataset, should_stop, say)
    except evaluate.Stopped:
        return _interrupted_in_evaluation(trained.result, options, say)
    summary, best = sweep_results.summary_by_rate(evaluated.runs), sweep_results.best_run(evaluated.runs)
    tables = sweep_results.run_table(evaluated.runs, best) + sweep_results.summary_table(summary, evaluated.runs, best)
    for line in tables:
        say(line)

    if jax.process_index() != 0:
        return runner.INTERRUPTED if trained.result.stopped else runner.OK
    # Evaluated: sweep.json, sweep.png and the best model are (re)written below; what an earlier part of this
    # sweep wrote is replaced, and what another run left was removed with the first checkpoint (--overwrite).
    outputs.make_dir(options.out)
    if best is not None:
        _save_best(trained.result, best, evaluated.evaluations[best], parts, options)
        say(f"saved the best model (lr {members[best].learning_rate:g}, seed {members[best].seed}) as "
            f"{options.out / runner.CHECKPOINT}")  # fmt: skip
    report = _report(parts, trained, evaluated, summary, best, options)
    _write_results(report, summary, evaluated.runs, trained.result.losses, options, t_start, say)
    return _ending(trained.result, best, options, say)


# The phases of a sweep, in order.


class _SweepParts(NamedTuple):
    """What :func:`run` is given to train: the data, the configs the models share, and the models."""

    dataset: Dataset
    model_config: ModelConfig
    train_config: TrainConfig  # what every model shares; its learning rate and seed are the first model's
    members: Sequence[Member]


def _start_of(
    resume_from: Checkpoint | None, history: np.ndarray | None, options: SweepOptions, models: int
) -> tuple[sweep.SweepState | None, np.ndarray | None]:
    """The state a resumed sweep continues, and its loss history (K, step): ``history``, or else read
    from ``options.out``'s :data:`SWEEP_LOSSES` (checked against the checkpoint's CRC-32). ``(None, history)``
    for a new sweep. Writes nothing."""
    if resume_from is None:
        return None, history
    s = resume_from.state
    start = sweep.SweepState(s.params, s.opt_state, s.step, resume_from.sweep.diverged_at)
    if history is None:  # scripts/sweep.py reads it with its other checks (load_resumable)
        history = LossLog(options.out / SWEEP_LOSSES, models).read(s.step, resume_from.loss_log_crc32)
    return start, history


class _Trained(NamedTuple):
    """What training leaves: its result, and what the (closed) checkpoint writer did."""

    result: sweep.SweepResult
    steps: int  # steps trained in this call (0 when a resumed sweep had nothing left to train)
    write_seconds: float  # spent writing checkpoints, on the writer's thread (0 on processes that write none)
    wait_seconds: float  # the training loop waited for the writer: before chunks, and at the end

    @property
    def model_steps_per_second(self) -> float:
        """Training throughput over every model, compile excluded; NaN when nothing was trained."""
        result = self.result
        return result.model_steps / result.train_seconds if result.train_seconds > 0 else float("nan")


def _train_with_checkpoints(
    parts: _SweepParts,
    options: SweepOptions,
    mesh: jax.sharding.Mesh,
    start: sweep.SweepState | None,
    history: np.ndarray | None,
    should_stop: Callable[[], bool],
    say: runner.Say,
) -> _Trained:
    """Train every model from ``start`` (or from scratch) to the configured steps (:func:`jaxbirds.sweep.train_models`).

    Writes (process 0), after every chunk, on the writer's thread: :data:`SWEEP_STATE` and the chunk's
    losses appended to :data:`SWEEP_LOSSES` (see :func:`_state_writer`). Prints a progress line every
    ``options.log_every`` steps, and a summary.

    Raises:
      OutputError: a checkpoint cannot be written.
    """
    writer = _state_writer(options, len(parts.members), start) if jax.process_index() == 0 else None
    on_chunk = _saving_and_reporting(writer, parts, options, 0 if start is None else start.step, say)
    try:
        result = sweep.train_models(
            parts.dataset.train.X, parts.dataset.train.Y, parts.model_config, parts.train_config, parts.members,
            mesh, on_chunk, should_stop, start=start, losses_so_far=history,
        )  # fmt: skip
    finally:
        t_wait = time.perf_counter()
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                raise OutputError(f"cannot save the sweep's checkpoint {options.out / SWEEP_STATE}: {err}") from None
    saving = (writer.seconds, writer.waited_seconds + time.perf_counter() - t_wait) if writer else (0.0, 0.0)
    trained = _Trained(result, result.step - (0 if start is None else start.step), *saving)
    if trained.steps:
        say(
            f"trained {len(parts.members)} models × {trained.steps:,} steps in {result.train_seconds:.1f} s "
            f"({trained.model_steps_per_second:,.0f} model-steps/s on {options.devices} device(s); compile "
            f"{result.compile_seconds:.1f} s; checkpoints {saving[0]:.1f} s in the background, {saving[1]:.2f} s "
            "waited for)"
        )
    else:
        say(f"nothing left to train: the saved sweep is at step {result.step:,} of {parts.train_config.steps:,}")
    return trained


def _saving_and_reporting(
    writer: Writer | None, parts: _SweepParts, options: SweepOptions, first_step: int, say: runner.Say
) -> Callable[[sweep.Progress, sweep.SweepState, np.ndarray], None]:
    """The training loop's ``on_chunk(progress, state, chunk_losses)``: hand the sweep's checkpoint and the
    chunk's losses to ``writer`` (if any; creating ``options.out`` first), then print a progress line once
    ``options.log_every`` more steps are done (counted from ``first_step``), and at the last step."""
    next_log = first_step // options.log_every * options.log_every + options.log_every
    source = DataSource(parts.dataset.source, parts.dataset.sha256)
    rates, seeds = tuple(m.learning_rate for m in parts.members), tuple(m.seed for m in parts.members)

    def on_chunk(progress: sweep.Progress, state: sweep.SweepState, chunk_losses: np.ndarray) -> None:
        nonlocal next_log
        if writer is not None:
            outputs.make_dir(options.out)
            saved = Checkpoint(
                train.TrainState(state.params, state.opt_states, state.step), None, parts.dataset.vocab,
                parts.model_config, parts.train_config, source, SweepMembers(rates, seeds, state.diverged_at),
            )  # fmt: skip
            try:
                writer.submit(saved, chunk_losses)
            except OSError as err:
                raise OutputError(f"cannot save the sweep's checkpoint {options.out / SWEEP_STATE}: {err}") from None
        if progress.step >= next_log or progress.step == progress.total:
            next_log = (progress.step // options.log_every + 1) * options.log_every
            diverged = f"  ({progress.diverged} diverged)" if progress.diverged else ""
            best = f"{progress.best_recent_loss:.4f}" if math.isfinite(progress.best_recent_loss) else "-"
            say(
                f"step {progress.step:>9,}/{progress.total:,}  best loss {best}  "
                f"{progress.model_steps_per_second:>8,.0f} model-steps/s  "
                f"ETA {runner.format_seconds(progress.eta_seconds)}{diverged}"
            )

    return on_chunk


class _Evaluated(NamedTuple):
    """What :func:`_evaluate_models` found."""

    runs: list[dict]  # per model: learning_rate, seed, loss (by split; None each for a diverged model), diverged_at
    evaluations: list[sweep_results.Evaluation | None]  # per model; None for a diverged one
    seconds: float


def _evaluate_models(
    result: sweep.SweepResult, members: Sequence[Member], dataset: Dataset, should_stop: Callable[[], bool], say
) -> _Evaluated:
    """Calibrate and evaluate every model as a solo run would (:func:`jaxbirds.sweep_results.evaluate_members`).

    A model whose trained parameters overflow in evaluation has diverged at the last step. Reads and writes
    nothing on disk; prints the progress of long phases.

    Raises:
      jaxbirds.evaluate.Stopped: ``should_stop`` returned True between two batches (never after training
        was stopped: a stop in training asked for these results).
    """
    t0 = time.perf_counter()
    runs, evaluations = [], []
    # One model after another (faster here than all at once: see sweep_results.evaluate_members); a diverged
    # model's numbers are computed and ignored.
    evaluated = sweep_results.evaluate_members(
        result.params, dataset.splits, progress=lambda label: runner.progress_line(say, label),
        should_stop=None if result.stopped else should_stop,  # a stop in training asked for these results
    )  # fmt: skip
    for k, m in enumerate(members):
        evaluation, diverged_at = None, result.diverged_at[k]
        if diverged_at is None:
            evaluation = evaluated[k]
            if divergence.evaluation_problem(evaluation.stats, evaluation.loss) is not None:
                evaluation, diverged_at = None, result.step  # trained to parameters that overflow in evaluation
        evaluations.append(evaluation)
        losses = evaluation.loss if evaluation else {name: None for name in dataset.splits}
        runs.append({"learning_rate": m.learning_rate, "seed": m.seed, "loss": losses, "diverged_at": diverged_at})
    return _Evaluated(runs, evaluations, time.perf_counter() - t0)


def _interrupted_in_evaluation(result: sweep.SweepResult, options: SweepOptions, say: runner.Say) -> int:
    """Stopped on request during evaluation: every model's state is in :data:`SWEEP_STATE` already; say how
    to evaluate it. Writes nothing. Returns ``runner.INTERRUPTED``."""
    say(
        f"interrupted during evaluation, after step {result.step:,}: every model's state is saved in "
        f"{options.out / SWEEP_STATE}; evaluate it with python scripts/sweep.py --resume "
        f"--out {shlex.quote(str(options.out))}"
    )
    return runner.INTERRUPTED


def _report(
    parts: _SweepParts, trained: _Trained, evaluated: _Evaluated, summary: list[dict], best: int | None,
    options: SweepOptions,
) -> dict:  # fmt: skip
    """The contents of ``sweep.json`` but its total seconds (values that are not finite numbers are still there)."""
    result = trained.result
    return {
        "runs": evaluated.runs,
        "summary": summary,
        "best": best,
        "models": len(parts.members),
        "devices": options.devices,
        "device": str(jax.devices()[0].device_kind),
        "steps": result.step,
        "interrupted": result.stopped,
        "model_steps_per_second": trained.model_steps_per_second,
        "timing": {
            "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds,
            "evaluate_seconds": evaluated.seconds,
            "checkpoint_write_seconds": trained.write_seconds,
            "checkpoint_wait_seconds": trained.wait_seconds,
        },  # fmt: skip
        "configs": {
            "model_config": dataclasses.asdict(parts.model_config),
            "train_config": {
                k: v for k, v in dataclasses.asdict(parts.train_config).items() if k not in ("learning_rate", "seed")
            },  # fmt: skip
            "data": {"path": parts.dataset.source, "sha256": parts.dataset.sha256},
        },
    }


def _write_results(
    report: dict, summary: list[dict], runs: list[dict], losses: np.ndarray, options: SweepOptions, t_start: float,
    say: runner.Say,
) -> None:  # fmt: skip
    """Draw :data:`SWEEP_PLOT` (with ``options.plot``; ``losses``: (K, steps)), then write ``report`` with its
    total seconds since ``t_start`` into :data:`SWEEP_JSON`, as strict JSON, atomically (a temporary file
    renamed over it), and say so."""
    if options.plot:
        say(f"wrote {plots.sweep_figure(summary, runs, losses, options.out / SWEEP_PLOT)}")
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    tmp = options.out / f".{SWEEP_JSON}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(runner.finite_or_none(report), indent=1, allow_nan=False))
    os.replace(tmp, options.out / SWEEP_JSON)
    say(f"wrote {options.out / SWEEP_JSON} in {runner.format_seconds(report['timing']['total_seconds'])}")


def _ending(result: sweep.SweepResult, best: int | None, options: SweepOptions, say: runner.Say) -> int:
    """The exit code of a sweep whose results are written, and what to do next: continue an interrupted one
    (``runner.INTERRUPTED``), lower the learning rates when every model diverged (``runner.DIVERGED``)."""
    if result.stopped:
        say(
            f"interrupted at step {result.step:,}: the results above are for the steps trained so far; continue "
            f"with python scripts/sweep.py --resume --out {shlex.quote(str(options.out))}"
        )
        return runner.INTERRUPTED
    if best is None:
        say("error: every model diverged, so no model was saved (sweep.json says where each one did); "
            "try lower learning rates (--lr, --lr-range)")  # fmt: skip
        return runner.DIVERGED
    return runner.OK


def _state_writer(options: SweepOptions, models: int, start: sweep.SweepState | None) -> Writer:
    """The background writer of the sweep's checkpoint. A new sweep into an ``--out`` that held results
    (``--overwrite``) removes them only once its first checkpoint is on disk (see :class:`Writer`); a
    resumed one removes nothing (a run continued from its best model, say, is not the sweep's to replace)."""
    replacing = start is None and any((options.out / name).exists() for name in outputs.ALL_FILES)

    def remove_the_old_results() -> None:
        outputs.remove_stale(options.out, keep=(SWEEP_STATE, SWEEP_LOSSES))

    log, keep = LossLog(options.out / SWEEP_LOSSES, models), 0 if start is None else start.step
    return Writer(options.out / SWEEP_STATE, log, keep, replacing, remove_the_old_results if replacing else None)


def _save_best(
    result: sweep.SweepResult, k: int, evaluation: sweep_results.Evaluation, parts: _SweepParts, options: SweepOptions
) -> None:
    """Save model ``k`` as an ordinary solo run: its own learning rate and seed, the solo optimiser state
    (the inner state of the injected one), the calibrated statistics and its loss history.

    Writes ``losses.f32`` (its history, replaced) and then ``checkpoint.npz`` (stamped with the log's CRC-32).
    """
    m = parts.members[k]
    opt_state = sweep.member(result.opt_states, k).inner_state
    state = train.TrainState(sweep.member(result.params, k), opt_state, result.step)
    solo = dataclasses.replace(parts.train_config, learning_rate=m.learning_rate, seed=m.seed)
    source = DataSource(parts.dataset.source, parts.dataset.sha256)
    log = LossLog(options.out / outputs.LOSS_LOG)
    log.truncate(0)
    log.append(result.losses[k])
    saved = Checkpoint(state, evaluation.stats, parts.dataset.vocab, parts.model_config, solo, source,
                       loss_log_crc32=log.crc32(result.step))  # fmt: skip
    checkpoint.save(options.out / runner.CHECKPOINT, saved)
