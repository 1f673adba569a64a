"""A training run on disk: what ``scripts/train.py`` does, as a library function.

:func:`run` is a sequence of phases, each a function below that says what it reads and writes:

1. check what the end of the run needs (matplotlib, memory for the samples): :func:`_check_options`;
2. start a helper thread that compiles the end of the run while the device trains: :class:`_HelperThread`;
3. train in compiled chunks, saving a checkpoint after every chunk on a background thread (so a
   crash or Ctrl-C loses at most one chunk, and the device never waits for the disk), with a
   progress line every ``log_every`` steps: :func:`_train_with_checkpoints`;
4. stop there if training diverged or was interrupted: :func:`_diverged`, :func:`_interrupted`;
5. draw the loss curve on the helper thread while batch norm is calibrated and every split is
   evaluated: :func:`_draw_loss_curve`, :func:`_calibrate_and_evaluate` (an evaluation that overflows
   ends the run as diverged: :func:`_diverged_in_evaluation`);
6. save the calibrated checkpoint and print the losses: :func:`_save_result`;
7. sample names: :func:`_sample_names`; with ``--diagnostics``, wait for ``diagnostics.png`` (drawn on the
   helper thread during phase 5: :func:`_draw_diagnostics`) and make its entry of ``metrics.json``:
   :func:`_diagnostics_entry`;
8. write ``metrics.json`` and say what the run wrote and how long it took: :func:`_metrics`,
   :func:`_write_metrics`, :func:`_say_done`.

The state passed from phase to phase is explicit: each returns what the next ones read (``_Trained``,
``_Evaluation``, ``_Samples``, the seconds it took) and :func:`run` collects the seconds by phase. An
optional phase of a finished run (diagnostics, say) goes between 7 and 8, where :func:`run` marks it.

Files in the output directory:

* ``checkpoint.npz`` - the state, see :mod:`jaxbirds.checkpoint`;
* ``losses.f32``     - the loss of every step, appended chunk by chunk;
* ``metrics.json``   - configs, split losses, timings and samples (strict JSON: a value that does
  not exist, such as the loss of an empty split, is ``null``; the per-step history is ``losses.f32``,
  read it with ``numpy.fromfile(path, "<f4")``);
* ``loss.png``       - log10 training loss, averaged over windows of 1,000 steps;
* ``diagnostics.png`` - with ``--diagnostics``: every block's activations and gradients, every weight's
  gradient and update ratios (:mod:`jaxbirds.diagnostics_plot`); the numbers are in ``metrics.json``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TextIO

import jax
import numpy as np

from jaxbirds import (
    checkpoint,
    data,
    diagnostics,
    diagnostics_plot,
    divergence,
    evaluate,
    model,
    outputs,
    plots,
    sample,
    train,
)
from jaxbirds.checkpoint import Checkpoint
from jaxbirds.checkpoint_writer import LossLog, Writer
from jaxbirds.data import Dataset
from jaxbirds.errors import ConfigError, OutputError

CHECKPOINT, METRICS, LOSS_PLOT = outputs.CHECKPOINT, outputs.METRICS, outputs.LOSS_PLOT
check_writable_dir, check_writable_file = outputs.check_writable_dir, outputs.check_writable_file

# Exit codes of a run (the CLI returns them).
OK, DIVERGED, INTERRUPTED = 0, 1, 130

#: ``say(line)``: where a run's messages go (a line of text, no newline).
Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a run writes and prints besides its checkpoint (``scripts/train.py``'s output flags)."""

    out: Path  # the output directory (--out): every file of the run goes there
    samples: int = 10  # names sampled at the end (--samples; 0: none)
    plot: bool = True  # draw loss.png (False: --no-plot)
    log_every: int = 10_000  # steps between progress lines (--log-every)


def format_seconds(seconds: float) -> str:
    """A duration as people read it.

    Args:
      seconds: a duration; NaN or infinity when unknown (an ETA before the first chunk).

    Returns:
      ``"42s"`` under a minute, ``"3m05s"`` from a minute on, ``"?"`` if ``seconds`` is not finite.
    """
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def load_resumable(path: Path, data_path: Path | None) -> tuple[Checkpoint, Dataset]:
    """A saved run (or sweep) to continue, and its data: ``data_path``, by default the data it was trained on.

    Args:
      path: the checkpoint (``checkpoint.npz``, or a sweep's state).
      data_path: the names file given with ``--data``, or None for the one the checkpoint names (the
        shipped file for a checkpoint that names none).

    Returns:
      ``(saved, dataset)``: the checkpoint, and the data split with its context size.

    Raises:
      CheckpointError: the checkpoint cannot be read, or does not fit the data's vocabulary and context.
      ConfigError: the data are not the ones it was trained on (their SHA-256 differs): they are fixed for a
        saved run.
    """
    saved = checkpoint.load(path)
    data_path = data_path or (Path(saved.data.path) if saved.data else data.DEFAULT_DATA_PATH)
    dataset = data.load_dataset(data_path, saved.model_config.context_size)
    checkpoint.check_compatible(saved, dataset.vocab, dataset.context_size)
    if saved.data and saved.data.sha256 != dataset.sha256:
        raise ConfigError(
            f"{data_path} is not the data this run was trained on ({saved.data.path}, sha256 "
            f"{saved.data.sha256[:12]}...): the data are fixed for a saved run"
        )
    return saved, dataset


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over saved results unless asked to; check that ``out`` and every file a
    run may write or remove there can be written (:func:`jaxbirds.outputs.prepare`). Creates nothing.

    Args:
      out: the output directory.
      resume: the run continues the one saved in ``out`` (``--resume``).
      overwrite: a new run may replace the one saved in ``out`` (``--overwrite``).

    Raises:
      OutputError: ``out`` holds a saved run that neither flag allows to touch, or a file cannot be written.
    """
    outputs.prepare(out, outputs.ALL_FILES, "a saved run", outputs.CHECKPOINT, resume=resume, overwrite=overwrite)


#: Seconds between two progress lines of a long phase after training (a shorter phase prints none).
PROGRESS_EVERY = 2.0


def progress_line(say: Say, label: str) -> evaluate.Progress:
    """``progress(done, total)`` that says how far a phase is, every :data:`PROGRESS_EVERY` seconds of a long
    phase and never in a short one (:func:`jaxbirds.evaluate.throttled`).

    Args:
      say: where the line goes.
      label: the phase, as the line names it (``"calibrating batch norm"``).

    Returns:
      The callback; its lines read ``"<label>: 40% done after 3s"``.
    """
    t0 = time.perf_counter()

    def line(done: int, total: int) -> None:
        elapsed = format_seconds(time.perf_counter() - t0)
        say(f"{label}: {done / total:.0%} done after {elapsed}")

    return evaluate.throttled(line, PROGRESS_EVERY)


def evaluate_splits(params, dataset: Dataset, should_stop: Callable[[], bool], say: Say):
    """Calibrate batch norm on the training split, then the loss of every split; ``(stats, losses, problem)``.

    Losses are not computed when the statistics already say the model diverged. Long phases print their
    progress; ``should_stop`` is polled between batches.

    Args:
      params: the trained parameters.
      dataset: the splits; the training split calibrates batch norm.
      should_stop: polled between batches.
      say: where the progress lines of long phases go.

    Returns:
      ``(stats, losses, problem)``: the batch-norm statistics over the training split; the mean
      cross-entropy of each split by name (None for an empty split, and for every split when the
      statistics are no result); ``problem``, why the evaluation is no result
      (:func:`jaxbirds.divergence.evaluation_problem`), or None.

    Raises:
      jaxbirds.evaluate.Stopped: ``should_stop`` returned True.
    """
    stats = evaluate.calibrate(
        params, dataset.train.X, progress=progress_line(say, "calibrating batch norm"), should_stop=should_stop
    )
    problem = divergence.statistics_problem(stats)
    if problem is not None:
        return stats, {name: None for name in dataset.splits}, problem
    split_losses = {
        name: evaluate.split_loss(
            params, stats, s.X, s.Y, progress=progress_line(say, f"evaluating the {name} split"),
            should_stop=should_stop,
        )
        for name, s in dataset.splits.items()
    }  # fmt: skip
    return stats, split_losses, divergence.loss_problem(split_losses)


def finite_or_none(value):
    """JSON has no NaN or infinity: a value that is not a finite number becomes null.

    Args:
      value: a number, or dicts, lists and tuples of them (any other value is kept as it is).

    Returns:
      ``value`` with every float that is not finite replaced by None (tuples become lists).
    """
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def run(
    dataset: Dataset,
    start: Checkpoint,
    options: RunOptions,
    should_stop: Callable[[], bool] = lambda: False,
    log: TextIO | None = None,
    phases: dict[str, float] | None = None,
) -> int:
    """Train ``start`` to its configured step count, evaluate, sample and write the results into ``options.out``.

    A ``start`` at step 0 begins a new loss history; a later one continues the history saved beside
    its checkpoint. Each step below is a phase of its own, whose docstring says what it reads and
    writes; the seconds of each phase outside training are reported and written into ``metrics.json``.

    Args:
      dataset: the data; the training split trains and calibrates, every split is evaluated.
      start: the state to train from, with its configs (a new run's initial state, or a saved one).
      options: the output directory and what to write and print there.
      should_stop: polled after every chunk and between evaluation batches (Ctrl-C): True saves and ends the
        run with :data:`INTERRUPTED`.
      log: where progress and results are printed (None: nowhere).
      phases: the seconds the caller already spent outside training (imports, data, ...), by phase name.

    Returns:
      The exit code: :data:`OK`, :data:`DIVERGED` (the last finite state is saved, with advice) or
      :data:`INTERRUPTED` (the last chunk's state is saved).

    Raises:
      ConfigError: the plot or the samples cannot be made (checked before anything else).
      OutputError: a checkpoint cannot be written.
    """
    phases = dict(phases or {})
    say = (lambda line: print(line, file=log, flush=True)) if log else (lambda line: None)
    _check_options(start, options)
    t_start = time.perf_counter()
    helper = _HelperThread.warming_up(dataset, start, options)
    trained = _train_with_checkpoints(dataset, start, options, helper, should_stop, say)
    if trained.result.diverged_at is not None or trained.result.stopped:
        helper.abandon()  # no evaluation follows: the warm-up is of no use
    if trained.result.diverged_at is not None:
        return _diverged(trained, start, options, say)
    if trained.result.stopped:
        return _interrupted(trained.result, options, say)
    phases["compile"] = trained.result.compile_seconds
    phases["waiting for checkpoints"] = trained.wait_seconds

    plot = _draw_loss_curve(helper, trained.result, start, options)  # drawn while the model is evaluated
    figure = _draw_diagnostics(helper, trained.result, start, options)  # likewise, after it
    try:
        evaluation = _calibrate_and_evaluate(trained.result.state.params, dataset, should_stop, say)
    except evaluate.Stopped:
        helper.abandon()
        return _interrupted_in_evaluation(trained.result, options, say)
    phases["calibration and evaluation"] = evaluation.seconds
    if evaluation.problem is not None:
        return _diverged_in_evaluation(evaluation.problem, trained.result, start, options, plot, helper, say)
    phases["saving"] = _save_result(trained, evaluation, start, options, say)
    samples = _sample_names(trained.result.state.params, evaluation.stats, dataset, start, options, say)
    phases["sampling"] = samples.seconds
    # An optional phase of a finished run goes here: a function that reads `trained` (and `evaluation`),
    # writes its own files, and returns its seconds for `phases` and its entry of `metrics` (made below).
    if start.train_config.diagnostics_every:
        diagnostics_entry, phases["diagnostics"] = _diagnostics_entry(trained.result, figure, say)

    if plot is not None:
        phases["plot"] = _wait_for_plot(plot, say)
    helper.finish()
    # the metrics record every phase but the writing of metrics.json itself (a few milliseconds)
    metrics = _metrics(dataset, start, trained, evaluation, samples, phases, time.perf_counter() - t_start)
    if start.train_config.diagnostics_every:
        metrics["diagnostics"] = diagnostics_entry
    _write_metrics(metrics, options.out)
    _say_done(metrics, trained.result, phases, options.out, say)
    return OK


# The phases of a run, in order.


def _check_options(start: Checkpoint, options: RunOptions) -> None:
    """Phase 1: refuse now, before any work, an end of the run that cannot be done. Reads and writes nothing.

    Raises:
      ConfigError: ``options.plot`` without matplotlib, or more ``options.samples`` than fit in memory at once.
    """
    if options.plot:
        plots.require()
    if options.samples:
        sample.check_fits(start.state.params, options.samples, sample.MAX_LENGTH, start.model_config.context_size)


class _HelperThread(NamedTuple):
    """Phase 2: a second thread that prepares what runs after training while the device trains (see
    :func:`_warm_up`), then draws the loss curve while the model is evaluated. Writes nothing but ``loss.png``.

    Every way out of a run ends it: :meth:`abandon` when the rest of the run will not come, :meth:`finish`
    once the loss curve is drawn.
    """

    executor: concurrent.futures.ThreadPoolExecutor
    warmed_up: concurrent.futures.Future  # the warm-up's: done once the end of the run is compiled

    @classmethod
    def warming_up(cls, dataset: Dataset, start: Checkpoint, options: RunOptions) -> _HelperThread:
        """Start the thread, and the warm-up on it with stand-ins (zeros) of ``start``'s parameters."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        stand_in = jax.tree.map(lambda p: np.zeros(np.shape(p), p.dtype), start.state.params)
        return cls(executor, executor.submit(_warm_up, stand_in, dataset, start.model_config.context_size, options))

    def abandon(self) -> None:
        """Drop what the thread has not started (what it is doing finishes unwaited for)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def finish(self) -> None:
        """Wait for the thread to finish its work, and end it."""
        self.executor.shutdown()


def _warm_up(stand_in: model.Params, dataset: Dataset, context_size: int, options: RunOptions) -> None:
    """Make the first calls of what runs after training cheap, on a thread of its own while the device trains.

    Calibration, evaluation and sampling each run one jitted program; their
    first call traces it and compiles it (or loads it from the compilation
    cache), a few tenths of a second of Python work that the interpreter lock
    would otherwise serialise after training. Here they are called once on
    stand-in parameters of the trained ones' shapes and dtypes and two
    examples (every program pads to its fixed batch), which leaves them traced
    and compiled for the real calls; matplotlib is imported and warmed up too.
    XLA releases the lock while it trains, so this costs the training loop
    next to nothing.
    """
    if options.plot:
        plots.preload()
    X, Y = dataset.train.X[:2], dataset.train.Y[:2]
    stats = evaluate.calibrate(stand_in, X)
    evaluate.split_loss(stand_in, stats, X, Y)
    if options.samples:
        sample.sample_names(train.keys_for(0).sample, stand_in, stats, dataset.vocab, context_size, options.samples)


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What training leaves: its result, and what the (closed) checkpoint writer did."""

    result: train.TrainResult
    steps: int  # steps trained in this call (0 when a resumed run had nothing left to train)
    write_seconds: float  # spent writing checkpoints, on the writer's thread
    wait_seconds: float  # the training loop waited for the writer: before chunks, and at the end
    log_steps: int  # steps in losses.f32 once the writer is closed
    log_crc32: int  # the CRC-32 of those steps' bytes, which the final checkpoint carries
    replacing: bool  # an --overwrite run that has written nothing yet: the old run's files are still there

    @property
    def steps_per_second(self) -> float:
        """Training throughput, compile excluded; NaN when nothing was trained."""
        return self.steps / self.result.train_seconds if self.result.train_seconds > 0 else float("nan")


def _train_with_checkpoints(
    dataset: Dataset,
    start: Checkpoint,
    options: RunOptions,
    helper: _HelperThread,
    should_stop: Callable[[], bool],
    say: Say,
) -> _Trained:
    """Phase 3: train ``start`` to ``start.train_config.steps`` in compiled chunks, saving after every chunk.

    Reads ``losses.f32``: the history ``start`` continues (its first ``start.state.step`` steps, checked
    against the checkpoint's CRC-32). Writes, from the first chunk on and never before, on the writer's
    thread: ``checkpoint.npz`` (the chunk's state, without batch-norm statistics) and the chunk's
    losses appended to ``losses.f32``; an ``--overwrite`` run then removes the old run's other files
    (see :func:`_writer`). Prints a progress line every ``options.log_every`` steps and a summary.

    Returns:
      The training result (stopped early on request, or at the first non-finite loss) and what the
      writer did; everything submitted is on disk.

    Raises:
      OutputError: a checkpoint cannot be written. Any error of training itself propagates, after
        the helper thread is abandoned.
    """
    # nothing is written before the first chunk
    history = LossLog(options.out / outputs.LOSS_LOG).read(start.state.step, start.loss_log_crc32)
    writer = _writer(options, start, keep=start.state.step)
    on_chunk = _saving_and_reporting(writer, start, options, say)
    try:
        result = train.train(
            dataset.train.X, dataset.train.Y, start.train_config, start.state, history,
            on_chunk=on_chunk, should_stop=should_stop,
        )  # fmt: skip
    except BaseException:
        helper.abandon()  # the warm-up is of no use now
        raise
    finally:
        t_wait = time.perf_counter()
        try:
            writer.close()
        except OSError as err:
            raise OutputError(f"cannot save the checkpoint {options.out / CHECKPOINT}: {err}") from None
        wait_seconds = time.perf_counter() - t_wait + writer.waited_seconds  # at the end, and before chunks
    trained = _Trained(
        result, result.state.step - start.state.step, writer.seconds, wait_seconds,
        writer.steps_logged, writer.crc32, writer.replacing and not writer.started,
    )  # fmt: skip
    if trained.steps:
        say(
            f"trained {trained.steps:,} steps in {result.train_seconds:.1f} s ({trained.steps_per_second:,.0f} "
            f"steps/s; compile {result.compile_seconds:.1f} s; saving {writer.seconds:.1f} s in the background, "
            f"{wait_seconds:.2f} s waited for)"
        )
    else:
        say(f"nothing left to train: the saved run is at step {result.state.step:,} of {start.train_config.steps:,}")
    return trained


def _writer(options: RunOptions, start: Checkpoint, keep: int, replacing: bool | None = None) -> Writer:
    """The background writer of a run's checkpoint and loss log, continuing the log's first ``keep`` steps.

    A new run into an ``--out`` that holds results (``--overwrite``: the up-front check refused it
    otherwise) *replaces* them: their files go only once the new run's first checkpoint is on disk
    (see :class:`jaxbirds.checkpoint_writer.Writer`). A resumed run removes nothing: what else ``--out`` holds (a
    sweep's state and results, say) is not the run's to replace.
    """
    if replacing is None:
        replacing = start.state.step == 0 and any((options.out / name).exists() for name in outputs.ALL_FILES)
    after_first = (
        (lambda: outputs.remove_stale(options.out, keep=(CHECKPOINT, outputs.LOSS_LOG))) if replacing else None
    )
    return Writer(options.out / CHECKPOINT, LossLog(options.out / outputs.LOSS_LOG), keep, replacing, after_first)


def _saving_and_reporting(
    writer: Writer, start: Checkpoint, options: RunOptions, say: Say
) -> Callable[[train.Progress, train.TrainState, np.ndarray], None]:
    """The training loop's ``on_chunk(progress, state, chunk_losses)``: hand the chunk's state and losses to
    ``writer`` (creating ``options.out`` before the first), then print a progress line once
    ``options.log_every`` more steps are done, and at the last step, with the mean loss of the last
    ``log_every`` steps."""
    recent = collections.deque(maxlen=options.log_every)  # the losses the next progress line averages
    next_log = start.state.step + options.log_every

    def on_chunk(progress: train.Progress, state: train.TrainState, chunk_losses: np.ndarray) -> None:
        nonlocal next_log
        if not writer.started:
            outputs.make_dir(options.out)
        try:
            writer.submit(start._replace(state=state, stats=None), chunk_losses)
        except OSError as err:
            raise OutputError(f"cannot save the checkpoint {options.out / CHECKPOINT}: {err}") from None
        recent.extend(chunk_losses)
        if progress.step >= next_log or progress.step == progress.total:
            next_log = (progress.step // options.log_every + 1) * options.log_every
            say(
                f"step {progress.step:>9,}/{progress.total:,}  loss {float(np.mean(recent)):.4f}  "
                f"{progress.steps_per_second:>8,.0f} steps/s  ETA {format_seconds(progress.eta_seconds)}"
            )

    return on_chunk


def _diverged(trained: _Trained, start: Checkpoint, options: RunOptions, say: Say) -> int:
    """Phase 4, training diverged: save the last state whose loss is finite and say what to do.

    Writes ``checkpoint.npz`` (that state, without statistics) and ``losses.f32`` (cut to its steps), as
    the writer saves any chunk (a writer of its own, the training one being closed): the log cut to
    the steps it keeps, then this call's steps appended, the checkpoint stamped with their CRC-32, and an
    ``--overwrite`` run's old files removed only once the new checkpoint is on disk.

    Returns:
      :data:`DIVERGED`.
    """
    ckpt_path, out = outputs.make_dir(options.out) / CHECKPOINT, shlex.quote(str(options.out))
    result = trained.result
    good = result.state
    keep = min(trained.log_steps, good.step)  # the log holds at least the saved steps; cut to the good state
    final = _writer(options, start, keep, replacing=trained.replacing)
    final.submit(start._replace(state=jax.device_get(good), stats=None), result.losses[keep : good.step])
    final.close()
    lr = start.train_config.learning_rate
    if good.step == result.diverged_at:
        say(
            f"error: the loss is already non-finite at step {result.diverged_at:,}, the first step of this call: "
            f"the saved state itself gives it, so no learning rate can continue from it. Start again with a "
            f"lower learning rate:\n  python scripts/train.py --overwrite --out {out} --lr {lr / 10:g}"
        )
    else:
        say(
            f"error: the loss became non-finite at step {result.diverged_at:,}. The last state with a finite loss "
            f"(step {good.step:,}) is saved in {ckpt_path}. Continue from it with a lower learning rate:\n"
            f"  python scripts/train.py --resume --out {out} --lr {lr / 10:g}"
        )
    return DIVERGED


def _interrupted(result: train.TrainResult, options: RunOptions, say: Say) -> int:
    """Phase 4, training stopped on request: the last chunk's state is in ``checkpoint.npz`` already; say
    how to continue. Writes nothing. Returns :data:`INTERRUPTED`."""
    say(
        f"interrupted at step {result.state.step:,}: saved {options.out / CHECKPOINT}; continue with "
        f"python scripts/train.py --resume --out {shlex.quote(str(options.out))}"
    )
    return INTERRUPTED


def _draw_loss_curve(
    helper: _HelperThread, result: train.TrainResult, start: Checkpoint, options: RunOptions
) -> concurrent.futures.Future | None:
    """Phase 5: once the warm-up is done, draw the loss curve into ``loss.png`` on the helper thread.

    matplotlib's Python work overlaps XLA's evaluation, which releases the interpreter lock.

    Returns:
      The drawing's future (its result is the path written), or None without ``options.plot``.

    Raises:
      Whatever the warm-up raised.
    """
    helper.warmed_up.result()  # long done, unless the run was only a few chunks long
    if not options.plot:
        return None
    title = f"training loss ({start.train_config.grad_mode})"
    return helper.executor.submit(plots.loss_curve, result.losses, options.out / LOSS_PLOT, title=title)


def _draw_diagnostics(
    helper: _HelperThread, result: train.TrainResult, start: Checkpoint, options: RunOptions
) -> concurrent.futures.Future | None:
    """Phase 5, with ``--diagnostics``: draw what training recorded into ``diagnostics.png`` on the helper thread
    (after the loss curve, while the model is evaluated; :func:`jaxbirds.diagnostics_plot.figure`).

    Returns:
      The drawing's future (its result is the path written), or None without ``options.plot`` or records.
    """
    recorded = result.diagnostics
    if not options.plot or recorded is None:
        return None
    tc, steps, blocks = start.train_config, recorded.records.step, " ".join(map(str, start.model_config.hidden))
    title = (
        f"training diagnostics ({tc.grad_mode}, {tc.optimizer}; blocks {blocks}; "
        f"steps {steps[0]:,} to {steps[-1]:,}, every {tc.diagnostics_every:,})"
    )
    return helper.executor.submit(diagnostics_plot.figure, recorded, options.out / outputs.DIAGNOSTICS_PLOT, title)


class _Evaluation(NamedTuple):
    """What :func:`_calibrate_and_evaluate` found (see :func:`evaluate_splits`)."""

    stats: model.ModelStats  # batch norm's statistics over the training split
    losses: dict[str, float | None]  # the mean loss of each split, by name
    problem: str | None  # why the evaluation is no result: the model diverged; None for a result
    seconds: float  # calibration and evaluation together


def _calibrate_and_evaluate(
    params: model.Params, dataset: Dataset, should_stop: Callable[[], bool], say: Say
) -> _Evaluation:
    """Phase 5: calibrate batch norm on the training split and evaluate every split (:func:`evaluate_splits`).

    Reads and writes nothing on disk; prints the progress of long phases.

    Raises:
      jaxbirds.evaluate.Stopped: ``should_stop`` returned True between two batches.
    """
    t0 = time.perf_counter()
    stats, split_losses, problem = evaluate_splits(params, dataset, should_stop, say)
    return _Evaluation(stats, split_losses, problem, time.perf_counter() - t0)


def _interrupted_in_evaluation(result: train.TrainResult, options: RunOptions, say: Say) -> int:
    """Phase 5, stopped on request: the trained state is in ``checkpoint.npz`` already (without statistics);
    say how to evaluate it. Writes nothing. Returns :data:`INTERRUPTED`."""
    say(
        f"interrupted during evaluation, after step {result.state.step:,}: the trained state is saved in "
        f"{options.out / CHECKPOINT}; evaluate it with python scripts/train.py --resume --out "
        f"{shlex.quote(str(options.out))}"
    )
    return INTERRUPTED


def _diverged_in_evaluation(
    problem: str,
    result: train.TrainResult,
    start: Checkpoint,
    options: RunOptions,
    plot: concurrent.futures.Future | None,
    helper: _HelperThread,
    say: Say,
) -> int:
    """Phase 5, training kept finite losses, but the trained model's evaluation overflows: the run has diverged.

    The checkpoint the writer saved after the last chunk stays (without statistics), so nothing is lost,
    but no metrics are written and no names are sampled: there is no result to report. The loss curve,
    which shows how the loss grew, is still drawn (``loss.png``).

    Returns:
      :data:`DIVERGED`.
    """
    if plot is not None:
        say(f"wrote {plot.result()}")
    helper.finish()
    last = result.losses[-1] if len(result.losses) else float("nan")
    lr, out = start.train_config.learning_rate, shlex.quote(str(options.out))
    say(
        f"error: the model diverged: training kept finite losses (the last one {last:.3g}), but {problem}, so "
        f"it has no loss to report. Its state at step {result.state.step:,} is kept in {options.out / CHECKPOINT}, "
        f"but cannot be continued usefully. Start again with a lower learning rate:\n"
        f"  python scripts/train.py --overwrite --out {out} --lr {lr / 10:g}"
    )
    return DIVERGED


def _save_result(trained: _Trained, evaluation: _Evaluation, start: Checkpoint, options: RunOptions, say: Say) -> float:
    """Phase 6: the evaluation is a result: save the trained state with its batch-norm statistics, which
    make it a model to sample from, and print the loss of every split.

    Writes ``checkpoint.npz``, stamped with the CRC-32 of ``losses.f32``'s steps.

    Returns:
      The seconds the saving took.
    """
    t0 = time.perf_counter()
    final = start._replace(
        state=jax.device_get(trained.result.state), stats=evaluation.stats, loss_log_crc32=trained.log_crc32
    )
    checkpoint.save(options.out / CHECKPOINT, final)
    seconds = time.perf_counter() - t0
    say(
        "loss (batch norm calibrated on the train split): "
        + "  ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in evaluation.losses.items())
    )
    return seconds


class _Samples(NamedTuple):
    """What :func:`_sample_names` drew."""

    names: list[str]  # without their end token; [] when no names were asked for
    memorised_share: float | None  # the share of them that are names of the training split; None without names
    seconds: float


def _sample_names(
    params: model.Params, stats: model.ModelStats, dataset: Dataset, start: Checkpoint, options: RunOptions, say: Say
) -> _Samples:
    """Phase 7: sample ``options.samples`` names from the calibrated model (the run's own sampling key) and
    print them. Reads and writes nothing on disk.

    Returns:
      The names, how many of them the training split holds, and the seconds it took.
    """
    names, memorised = [], None
    t0 = time.perf_counter()
    if options.samples:
        samples = sample.sample_names(
            train.keys_for(start.train_config.seed).sample, params, stats, dataset.vocab,
            start.model_config.context_size, count=options.samples,
        )  # fmt: skip
        names, memorised = samples.names, samples.memorised_share(dataset.train.names)
        say(f"samples ({memorised:.0%} are names from the training split):")
        for name, finished in zip(samples.names, samples.finished, strict=True):
            say(f"  {sample.shown(name, finished)}")
    return _Samples(names, memorised, time.perf_counter() - t0)


def _diagnostics_entry(
    result: train.TrainResult, figure: concurrent.futures.Future | None, say: Say
) -> tuple[dict | None, float]:
    """Phase 7, with ``--diagnostics``: wait for ``diagnostics.png`` (if drawn) and make ``metrics.json``'s
    ``"diagnostics"`` (:func:`jaxbirds.diagnostics.summary`).

    Only this call's records exist: a resumed run's begin at the step it resumed from (the checkpoint
    keeps no records), and one with nothing left to train has none.

    Returns:
      ``(entry, seconds)``: the entry (None when no step was recorded) and the seconds the phase took.

    Raises:
      Whatever drawing raised.
    """
    t0 = time.perf_counter()
    if result.diagnostics is None:
        say("diagnostics: no step was recorded (nothing was trained)")
        return None, time.perf_counter() - t0
    if figure is not None:
        say(f"wrote {figure.result()}")
    return diagnostics.summary(*result.diagnostics), time.perf_counter() - t0


def _wait_for_plot(plot: concurrent.futures.Future, say: Say) -> float:
    """Phase 8: wait until the helper thread has written ``loss.png``, and say so.

    Returns:
      The seconds waited: only what was left of the drawing once the rest was done.

    Raises:
      Whatever drawing raised.
    """
    t0 = time.perf_counter()
    path = plot.result()  # raises here if drawing failed
    seconds = time.perf_counter() - t0
    say(f"wrote {path}")
    return seconds


def _metrics(
    dataset: Dataset,
    start: Checkpoint,
    trained: _Trained,
    evaluation: _Evaluation,
    samples: _Samples,
    phases: dict[str, float],
    total_seconds: float,
) -> dict:
    """Phase 8: the contents of ``metrics.json`` (values that are not finite numbers are still there).

    Args:
      phases: the seconds of every phase outside training, by name.
      total_seconds: the seconds of the whole run, from the end of the checks of :func:`run`.

    Returns:
      Configs, parameter count, split sizes, data, step, split losses, timings and samples.
    """
    result = trained.result
    return {
        "model_config": dataclasses.asdict(start.model_config),
        "train_config": dataclasses.asdict(start.train_config),
        "parameters": model.param_count(result.state.params),
        "dataset": {name: len(s) for name, s in dataset.splits.items()},
        "data": {"path": dataset.source, "sha256": dataset.sha256},
        "step": result.state.step,
        "loss": evaluation.losses,
        "timing": {
            "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds,
            "steps_per_second": trained.steps_per_second,
            "checkpoint_write_seconds": trained.write_seconds,
            "checkpoint_wait_seconds": trained.wait_seconds,
            "device": str(jax.devices()[0].device_kind),
            "jax_version": jax.__version__,
            "outside_training": phases,
            "total_seconds": total_seconds,
        },
        "samples": samples.names,
        "memorised_share": samples.memorised_share,
    }


def _write_metrics(metrics: dict, out: Path) -> None:
    """Phase 8: write ``metrics`` into ``out / metrics.json`` as strict JSON (not finite: null), atomically
    (a temporary file renamed over it)."""
    text = json.dumps(finite_or_none(metrics), indent=1, allow_nan=False)
    tmp = out / f".{METRICS}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / METRICS)


def _say_done(metrics: dict, result: train.TrainResult, phases: dict[str, float], out: Path, say: Say) -> None:
    """Phase 8: say what the run wrote, and where its time outside training went."""
    say(f"wrote {out / CHECKPOINT} and {out / METRICS} in {format_seconds(metrics['timing']['total_seconds'])}")
    say(
        f"outside training: {sum(phases.values()):.1f} s ("
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
        + f"); training {result.train_seconds:.1f} s"
    )
