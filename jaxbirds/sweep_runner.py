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
from typing import TextIO

import jax
import numpy as np

from jaxbirds import checkpoint, cli, divergence, evaluate, outputs, plots, runner, sweep, train
from jaxbirds.checkpoint import Checkpoint, CheckpointError, DataSource, LossLog, SweepMembers
from jaxbirds.data import Dataset
from jaxbirds.errors import OutputError
from jaxbirds.model import ModelConfig
from jaxbirds.sweep import Member
from jaxbirds.train import TrainConfig

SWEEP_JSON, SWEEP_PLOT = outputs.SWEEP_JSON, outputs.SWEEP_PLOT
SWEEP_STATE, SWEEP_LOSSES = outputs.SWEEP_STATE, outputs.SWEEP_LOSSES


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    out: Path
    devices: int
    plot: bool = True
    log_every: int = 10_000


#: On --resume, these may change for a sweep; its grid (learning rates and seeds) and every other
#: setting belong to it, as for a run (scripts/train.py --resume), and so do its data.
CHANGEABLE = ("steps", "decay_step", "chunk_size")


def load_resumable(out: Path, data_path: Path | None, asked: dict) -> tuple[Checkpoint, np.ndarray, Dataset, list[str]]:
    """The sweep saved in ``out`` with the changes ``asked`` for (``cli.given`` of the training flags), its
    loss history (K, step), its data, and a line per change; its members are ``checkpoint.sweep``'s.

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
    """The models of a saved sweep, in its order."""
    return tuple(Member(lr, seed) for lr, seed in zip(saved.sweep.learning_rates, saved.sweep.seeds, strict=True))


def prepare_output(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to replace saved results (a sweep's or a run's) unless asked to; check that every file a sweep
    may write or remove can be written (:func:`jaxbirds.outputs.prepare`). Creates nothing."""
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
    """Train, evaluate and report a sweep; returns an exit code (0, 1 if every model diverged, 130 if
    interrupted). ``resume_from``: a sweep's checkpoint to continue, ``history`` its loss history (read
    from ``options.out`` if not given).

    Every model's state and losses are saved after every chunk, on a background thread (:data:`SWEEP_STATE`,
    :data:`SWEEP_LOSSES`): a crash loses at most one chunk, and ``resume_from`` (that checkpoint, loaded)
    continues the sweep to where an uninterrupted one ends. After ``jax.distributed.initialize()``, every
    process trains its devices' models and evaluates all of them; only the first process prints and writes
    files (every process reads ``resume_from``)."""
    if jax.process_index() != 0:
        log, options = None, dataclasses.replace(options, plot=False)
    say = (lambda line: print(line, file=log, flush=True)) if log else (lambda line: None)
    if options.plot:
        plots.require()
    t_start = time.perf_counter()
    mesh = sweep.make_mesh(options.devices)
    start = None
    if resume_from is not None:
        s = resume_from.state
        start = sweep.SweepState(s.params, s.opt_state, s.step, resume_from.sweep.diverged_at)
        if history is None:  # scripts/sweep.py reads it with its other checks (load_resumable)
            history = LossLog(options.out / SWEEP_LOSSES, len(members)).read(s.step, resume_from.loss_log_crc32)
    next_log = [(0 if start is None else start.step) // options.log_every * options.log_every + options.log_every]
    writer = _state_writer(options, len(members), start) if jax.process_index() == 0 else None
    source = DataSource(dataset.source, dataset.sha256)
    rates, seeds = tuple(m.learning_rate for m in members), tuple(m.seed for m in members)

    def on_chunk(progress: sweep.Progress, state: sweep.SweepState, chunk_losses) -> None:
        if writer is not None:
            outputs.make_dir(options.out)
            saved = Checkpoint(
                train.TrainState(state.params, state.opt_states, state.step), None, dataset.vocab, model_config,
                train_config, source, SweepMembers(rates, seeds, state.diverged_at),
            )  # fmt: skip
            try:
                writer.submit(saved, chunk_losses)
            except OSError as err:
                raise OutputError(f"cannot save the sweep's checkpoint {options.out / SWEEP_STATE}: {err}") from None
        if progress.step >= next_log[0] or progress.step == progress.total:
            next_log[0] = (progress.step // options.log_every + 1) * options.log_every
            diverged = f"  ({progress.diverged} diverged)" if progress.diverged else ""
            best = f"{progress.best_recent_loss:.4f}" if math.isfinite(progress.best_recent_loss) else "-"
            say(
                f"step {progress.step:>9,}/{progress.total:,}  best loss {best}  "
                f"{progress.model_steps_per_second:>8,.0f} model-steps/s  "
                f"ETA {runner.format_seconds(progress.eta_seconds)}{diverged}"
            )

    try:
        result = sweep.train_models(
            dataset.train.X, dataset.train.Y, model_config, train_config, members, mesh, on_chunk, should_stop,
            start=start, losses_so_far=history,
        )  # fmt: skip
    finally:
        t_wait = time.perf_counter()
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                raise OutputError(f"cannot save the sweep's checkpoint {options.out / SWEEP_STATE}: {err}") from None
    saving = (writer.seconds, writer.waited_seconds + time.perf_counter() - t_wait) if writer else (0.0, 0.0)
    rate = result.model_steps / result.train_seconds if result.train_seconds > 0 else float("nan")
    trained = result.step - (0 if start is None else start.step)
    if trained:
        say(
            f"trained {len(members)} models × {trained:,} steps in {result.train_seconds:.1f} s "
            f"({rate:,.0f} model-steps/s on {options.devices} device(s); compile {result.compile_seconds:.1f} s; "
            f"checkpoints {saving[0]:.1f} s in the background, {saving[1]:.2f} s waited for)"
        )
    else:
        say(f"nothing left to train: the saved sweep is at step {result.step:,} of {train_config.steps:,}")

    t0 = time.perf_counter()
    runs, evaluations = [], []
    # One model after another (faster here than all at once: see sweep.evaluate_members); a diverged model's
    # numbers are computed and ignored.
    try:
        evaluated = sweep.evaluate_members(
            result.params, dataset.splits, progress=lambda label: runner.progress_line(say, label),
            should_stop=None if result.stopped else should_stop,  # a stop in training asked for these results
        )  # fmt: skip
    except evaluate.Stopped:
        say(
            f"interrupted during evaluation, after step {result.step:,}: every model's state is saved in "
            f"{options.out / SWEEP_STATE}; evaluate it with python scripts/sweep.py --resume "
            f"--out {shlex.quote(str(options.out))}"
        )
        return runner.INTERRUPTED
    for k, m in enumerate(members):
        evaluation, diverged_at = None, result.diverged_at[k]
        if diverged_at is None:
            evaluation = evaluated[k]
            if divergence.evaluation_problem(evaluation.stats, evaluation.loss) is not None:
                evaluation, diverged_at = None, result.step  # trained to parameters that overflow in evaluation
        evaluations.append(evaluation)
        losses = evaluation.loss if evaluation else {name: None for name in dataset.splits}
        runs.append({"learning_rate": m.learning_rate, "seed": m.seed, "loss": losses, "diverged_at": diverged_at})
    evaluate_seconds = time.perf_counter() - t0
    summary = sweep.summary_by_rate(runs)
    best = sweep.best_run(runs)
    for line in run_table(runs, best) + summary_table(summary, runs, best):
        say(line)

    if jax.process_index() != 0:
        return runner.INTERRUPTED if result.stopped else runner.OK
    # Evaluated: sweep.json, sweep.png and the best model are (re)written below; what an earlier part of this
    # sweep wrote is replaced, and what another run left was removed with the first checkpoint (--overwrite).
    outputs.make_dir(options.out)
    if best is not None:
        _save_best(result, best, members[best], evaluations[best], dataset, model_config, train_config, options)
        say(f"saved the best model (lr {members[best].learning_rate:g}, seed {members[best].seed}) as "
            f"{options.out / runner.CHECKPOINT}")  # fmt: skip
    report = {
        "runs": runs,
        "summary": summary,
        "best": best,
        "models": len(members),
        "devices": options.devices,
        "device": str(jax.devices()[0].device_kind),
        "steps": result.step,
        "interrupted": result.stopped,
        "model_steps_per_second": rate,
        "timing": {
            "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds,
            "evaluate_seconds": evaluate_seconds,
            "checkpoint_write_seconds": saving[0],
            "checkpoint_wait_seconds": saving[1],
        },  # fmt: skip
        "configs": {
            "model_config": dataclasses.asdict(model_config),
            "train_config": {
                k: v for k, v in dataclasses.asdict(train_config).items() if k not in ("learning_rate", "seed")
            },  # fmt: skip
            "data": {"path": dataset.source, "sha256": dataset.sha256},
        },
    }
    if options.plot:
        say(f"wrote {plots.sweep_figure(summary, runs, result.losses, options.out / SWEEP_PLOT)}")
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    tmp = options.out / f".{SWEEP_JSON}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(runner.finite_or_none(report), indent=1, allow_nan=False))
    os.replace(tmp, options.out / SWEEP_JSON)
    say(f"wrote {options.out / SWEEP_JSON} in {runner.format_seconds(report['timing']['total_seconds'])}")
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


def _state_writer(options: SweepOptions, models: int, start: sweep.SweepState | None) -> checkpoint.Writer:
    """The background writer of the sweep's checkpoint. A new sweep into an ``--out`` that held results
    (``--overwrite``) removes them only once its first checkpoint is on disk (see :class:`checkpoint.Writer`);
    a resumed one removes nothing (a run continued from its best model, say, is not the sweep's to replace)."""
    replacing = start is None and any((options.out / name).exists() for name in outputs.ALL_FILES)

    def remove_the_old_results() -> None:
        outputs.remove_stale(options.out, keep=(SWEEP_STATE, SWEEP_LOSSES))

    log, keep = LossLog(options.out / SWEEP_LOSSES, models), 0 if start is None else start.step
    return checkpoint.Writer(
        options.out / SWEEP_STATE, log, keep, replacing, remove_the_old_results if replacing else None
    )


def _save_best(result, k, m: Member, evaluation, dataset, model_config, train_config, options) -> None:
    """Model ``k`` as an ordinary solo run: its own learning rate and seed, the solo optimiser state
    (the inner state of the injected one), the calibrated statistics and its loss history."""
    opt_state = sweep.member(result.opt_states, k).inner_state
    state = train.TrainState(sweep.member(result.params, k), opt_state, result.step)
    solo = dataclasses.replace(train_config, learning_rate=m.learning_rate, seed=m.seed)
    source = DataSource(dataset.source, dataset.sha256)
    log = LossLog(options.out / outputs.LOSS_LOG)
    log.truncate(0)
    log.append(result.losses[k])
    saved = Checkpoint(state, evaluation.stats, dataset.vocab, model_config, solo, source,
                       loss_log_crc32=log.crc32(result.step))  # fmt: skip
    checkpoint.save(options.out / runner.CHECKPOINT, saved)


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_table(runs: Sequence[dict], best: int | None) -> list[str]:
    """One line per run; the best is marked with ``*``."""
    lines = ["", "| lr | seed | train | dev | test | |", "|---|---|---|---|---|---|"]
    for i, run in enumerate(runs):
        loss = run["loss"]
        note = (
            "best *"
            if i == best
            else (f"diverged at step {run['diverged_at']:,}" if run["diverged_at"] is not None else "")
        )
        lines.append(f"| {run['learning_rate']:g} | {run['seed']} | {_loss(loss['train'])} | {_loss(loss['dev'])} | "
                     f"{_loss(loss['test'])} | {note} |")  # fmt: skip
    return lines


def summary_table(summary: Sequence[dict], runs: Sequence[dict], best: int | None) -> list[str]:
    """Dev loss per learning rate, mean ± standard deviation over the seeds that did not diverge."""
    best_lr = runs[best]["learning_rate"] if best is not None else None
    lines = ["", "| lr | dev loss, mean ± std over seeds | seeds | diverged | |", "|---|---|---|---|---|"]
    for row in summary:
        mean = "-" if row["dev_mean"] is None else f"{row['dev_mean']:.4f} ± {row['dev_std']:.4f}"
        mark = "holds the best run *" if row["learning_rate"] == best_lr else ""
        lines.append(f"| {row['learning_rate']:g} | {mean} | {row['seeds']} | {row['diverged']} | {mark} |")
    return lines
