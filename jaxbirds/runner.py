"""A training run on disk: what ``scripts/train.py`` does, as a library function.

Train in compiled chunks, saving a checkpoint after every chunk on a background
thread (so a crash or Ctrl-C loses at most one chunk, and the device never
waits for the disk), then calibrate batch norm, evaluate every split, sample
names, and write ``metrics.json`` and ``loss.png``.

Files in the output directory:

* ``checkpoint.npz`` - the state, see :mod:`jaxbirds.checkpoint`;
* ``losses.f32``     - the loss of every step, appended chunk by chunk;
* ``metrics.json``   - configs, split losses, timings and samples (strict JSON: a value that does
  not exist, such as the loss of an empty split, is ``null``; the per-step history is ``losses.f32``,
  read it with ``numpy.fromfile(path, "<f4")``);
* ``loss.png``       - log10 training loss, averaged over windows of 1,000 steps.
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
from typing import TextIO

import jax
import numpy as np

from jaxbirds import checkpoint, data, divergence, evaluate, model, outputs, plots, sample, train
from jaxbirds.checkpoint import Checkpoint, LossLog
from jaxbirds.data import Dataset
from jaxbirds.errors import ConfigError, OutputError

CHECKPOINT, METRICS, LOSS_PLOT = outputs.CHECKPOINT, outputs.METRICS, outputs.LOSS_PLOT
check_writable_dir, check_writable_file = outputs.check_writable_dir, outputs.check_writable_file

# Exit codes of a run (the CLI returns them).
OK, DIVERGED, INTERRUPTED = 0, 1, 130


@dataclasses.dataclass(frozen=True)
class RunOptions:
    out: Path
    samples: int = 10
    plot: bool = True
    log_every: int = 10_000


def format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def load_resumable(path: Path, data_path: Path | None) -> tuple[Checkpoint, Dataset]:
    """A saved run (or sweep) to continue, and its data: ``data_path``, by default the data it was trained on.

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
    run may write or remove there can be written (:func:`jaxbirds.outputs.prepare`). Creates nothing."""
    outputs.prepare(out, outputs.ALL_FILES, "a saved run", outputs.CHECKPOINT, resume=resume, overwrite=overwrite)


def _writer(options: RunOptions, start: Checkpoint, keep: int, replacing: bool | None = None) -> checkpoint.Writer:
    """The background writer of a run's checkpoint and loss log, continuing the log's first ``keep`` steps.

    A new run into an ``--out`` that holds results (``--overwrite``: the up-front check refused it
    otherwise) *replaces* them: their files go only once the new run's first checkpoint is on disk
    (see :class:`checkpoint.Writer`). A resumed run removes nothing: what else ``--out`` holds (a
    sweep's state and results, say) is not the run's to replace.
    """
    if replacing is None:
        replacing = start.state.step == 0 and any((options.out / name).exists() for name in outputs.ALL_FILES)
    after_first = (
        (lambda: outputs.remove_stale(options.out, keep=(CHECKPOINT, outputs.LOSS_LOG))) if replacing else None
    )
    return checkpoint.Writer(
        options.out / CHECKPOINT, LossLog(options.out / outputs.LOSS_LOG), keep, replacing, after_first
    )


def _diverged(result, start: Checkpoint, writer, options: RunOptions, say) -> int:
    """Save the last state whose loss is finite and say what to do.

    Saved as the writer saves any chunk (a writer of its own, the training one being closed): the log cut to
    the steps it keeps, then this call's steps appended, the checkpoint stamped with their CRC-32, and an
    ``--overwrite`` run's old files removed only once the new checkpoint is on disk.
    """
    ckpt_path, out = outputs.make_dir(options.out) / CHECKPOINT, shlex.quote(str(options.out))
    good = result.state
    keep = min(writer.steps_logged, good.step)  # the log holds at least the saved steps; cut to the good state
    replacing = writer.replacing and not writer.started
    final = _writer(options, start, keep, replacing=replacing)
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


def _diverged_in_evaluation(problem: str, result, start: Checkpoint, options: RunOptions, plot, helper, say) -> int:
    """Training kept finite losses, but the trained model's evaluation overflows: the run has diverged.

    The checkpoint the writer saved after the last chunk stays (without statistics), so nothing is lost,
    but no metrics are written and no names are sampled: there is no result to report. The loss curve,
    which shows how the loss grew, is still drawn.
    """
    if plot is not None:
        say(f"wrote {plot.result()}")
    helper.shutdown()
    last = result.losses[-1] if len(result.losses) else float("nan")
    lr, out = start.train_config.learning_rate, shlex.quote(str(options.out))
    say(
        f"error: the model diverged: training kept finite losses (the last one {last:.3g}), but {problem}, so "
        f"it has no loss to report. Its state at step {result.state.step:,} is kept in {options.out / CHECKPOINT}, "
        f"but cannot be continued usefully. Start again with a lower learning rate:\n"
        f"  python scripts/train.py --overwrite --out {out} --lr {lr / 10:g}"
    )
    return DIVERGED


#: Seconds between two progress lines of a long phase after training (a shorter phase prints none).
PROGRESS_EVERY = 2.0


def progress_line(say, label: str) -> evaluate.Progress:
    """``progress(done, total)`` that says how far a phase is, every :data:`PROGRESS_EVERY` seconds of a long
    phase and never in a short one (:func:`jaxbirds.evaluate.throttled`)."""
    t0 = time.perf_counter()

    def line(done: int, total: int) -> None:
        elapsed = format_seconds(time.perf_counter() - t0)
        say(f"{label}: {done / total:.0%} done after {elapsed}")

    return evaluate.throttled(line, PROGRESS_EVERY)


def evaluate_splits(params, dataset: Dataset, should_stop: Callable[[], bool], say):
    """Calibrate batch norm on the training split, then the loss of every split; ``(stats, losses, problem)``.

    ``problem`` is why the evaluation is no result (:func:`jaxbirds.divergence.evaluation_problem`), or None.
    Losses are not computed when the statistics already say the model diverged. Long phases print their
    progress; ``should_stop`` is polled between batches (:class:`jaxbirds.evaluate.Stopped` is raised).
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


def finite_or_none(value):
    """JSON has no NaN or infinity: a value that is not a finite number becomes null."""
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
    """Train ``start`` to its configured step count and evaluate; returns an exit code.

    A ``start`` at step 0 begins a new loss history; a later one continues the
    history saved beside its checkpoint. ``phases`` holds the seconds the caller
    already spent outside training (imports, data, ...); the run adds its own
    (compile, calibration and evaluation, sampling, plot, saving), reports them,
    and writes them into ``metrics.json``.
    """
    phases = dict(phases or {})
    say = (lambda line: print(line, file=log, flush=True)) if log else (lambda line: None)
    if options.plot:
        plots.require()
    if options.samples:
        sample.check_fits(start.state.params, options.samples, sample.MAX_LENGTH, start.model_config.context_size)
    t_start = time.perf_counter()
    # A second thread prepares what runs after training while the device trains (see _warm_up),
    # then draws the loss curve while the model is evaluated.
    helper = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    stand_in = jax.tree.map(lambda p: np.zeros(np.shape(p), p.dtype), start.state.params)
    warmed_up = helper.submit(_warm_up, stand_in, dataset, start.model_config.context_size, options)
    ckpt_path = options.out / CHECKPOINT
    tc = start.train_config
    # nothing is written before the first chunk
    history = LossLog(options.out / outputs.LOSS_LOG).read(start.state.step, start.loss_log_crc32)
    writer = _writer(options, start, keep=start.state.step)
    recent = collections.deque(maxlen=options.log_every)
    next_log = [start.state.step + options.log_every]

    def on_chunk(progress: train.Progress, state: train.TrainState, chunk_losses: np.ndarray) -> None:
        if not writer.started:
            outputs.make_dir(options.out)
        try:
            writer.submit(start._replace(state=state, stats=None), chunk_losses)
        except OSError as err:
            raise OutputError(f"cannot save the checkpoint {ckpt_path}: {err}") from None
        recent.extend(chunk_losses)
        if progress.step >= next_log[0] or progress.step == progress.total:
            next_log[0] = (progress.step // options.log_every + 1) * options.log_every
            say(
                f"step {progress.step:>9,}/{progress.total:,}  loss {float(np.mean(recent)):.4f}  "
                f"{progress.steps_per_second:>8,.0f} steps/s  ETA {format_seconds(progress.eta_seconds)}"
            )

    try:
        result = train.train(
            dataset.train.X, dataset.train.Y, tc, start.state, history, on_chunk=on_chunk, should_stop=should_stop
        )
    except BaseException:
        helper.shutdown(wait=False, cancel_futures=True)  # the warm-up is of no use now
        raise
    finally:
        t_wait = time.perf_counter()
        try:
            writer.close()
        except OSError as err:
            raise OutputError(f"cannot save the checkpoint {ckpt_path}: {err}") from None
        wait_seconds = time.perf_counter() - t_wait + writer.waited_seconds  # at the end, and before chunks
    trained = result.state.step - start.state.step
    rate = trained / result.train_seconds if result.train_seconds > 0 else float("nan")
    if trained:
        say(
            f"trained {trained:,} steps in {result.train_seconds:.1f} s ({rate:,.0f} steps/s; "
            f"compile {result.compile_seconds:.1f} s; saving {writer.seconds:.1f} s in the background, "
            f"{wait_seconds:.2f} s waited for)"
        )
    else:
        say(f"nothing left to train: the saved run is at step {result.state.step:,} of {tc.steps:,}")
    if result.diverged_at is not None or result.stopped:
        helper.shutdown(wait=False, cancel_futures=True)  # no evaluation follows: the warm-up is of no use
    if result.diverged_at is not None:
        return _diverged(result, start, writer, options, say)
    if result.stopped:
        say(
            f"interrupted at step {result.state.step:,}: saved {ckpt_path}; continue with "
            f"python scripts/train.py --resume --out {shlex.quote(str(options.out))}"
        )
        return INTERRUPTED

    phases["compile"] = result.compile_seconds
    phases["waiting for checkpoints"] = wait_seconds
    # The loss curve is drawn on a thread of its own while the model is evaluated: matplotlib's
    # Python work overlaps XLA's, which releases the interpreter lock.
    warmed_up.result()  # long done, unless the run was only a few chunks long
    plot = None
    if options.plot:
        title = f"training loss ({tc.grad_mode})"
        plot = helper.submit(plots.loss_curve, result.losses, options.out / LOSS_PLOT, title=title)
    params = result.state.params
    t0 = time.perf_counter()
    try:
        stats, split_losses, problem = evaluate_splits(params, dataset, should_stop, say)
    except evaluate.Stopped:
        helper.shutdown(wait=False, cancel_futures=True)
        say(
            f"interrupted during evaluation, after step {result.state.step:,}: the trained state is saved in "
            f"{ckpt_path}; evaluate it with python scripts/train.py --resume --out {shlex.quote(str(options.out))}"
        )
        return INTERRUPTED
    phases["calibration and evaluation"] = time.perf_counter() - t0
    if problem is not None:
        return _diverged_in_evaluation(problem, result, start, options, plot, helper, say)
    t0 = time.perf_counter()
    final = start._replace(state=jax.device_get(result.state), stats=stats, loss_log_crc32=writer.crc32)
    checkpoint.save(ckpt_path, final)
    phases["saving"] = time.perf_counter() - t0
    say(
        "loss (batch norm calibrated on the train split): "
        + "  ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in split_losses.items())
    )

    names, memorised = [], None
    t0 = time.perf_counter()
    if options.samples:
        samples = sample.sample_names(
            train.keys_for(tc.seed).sample, params, stats, dataset.vocab,
            start.model_config.context_size, count=options.samples,
        )  # fmt: skip
        names, memorised = samples.names, samples.memorised_share(dataset.train.names)
        say(f"samples ({memorised:.0%} are names from the training split):")
        for name, finished in zip(samples.names, samples.finished, strict=True):
            say(f"  {sample.shown(name, finished)}")
    phases["sampling"] = time.perf_counter() - t0

    metrics = {
        "model_config": dataclasses.asdict(start.model_config),
        "train_config": dataclasses.asdict(tc),
        "parameters": model.param_count(params),
        "dataset": {name: len(s) for name, s in dataset.splits.items()},
        "data": {"path": dataset.source, "sha256": dataset.sha256},
        "step": result.state.step,
        "loss": split_losses,
        "timing": {
            "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds,
            "steps_per_second": rate,
            "checkpoint_write_seconds": writer.seconds,
            "checkpoint_wait_seconds": wait_seconds,
            "device": str(jax.devices()[0].device_kind),
            "jax_version": jax.__version__,
        },
        "samples": names,
        "memorised_share": memorised,
    }
    if plot is not None:
        t0 = time.perf_counter()
        path = plot.result()  # raises here if drawing failed
        phases["plot"] = time.perf_counter() - t0  # only what is left of it once the rest is done
        say(f"wrote {path}")
    helper.shutdown()
    # the metrics record every phase but the writing of metrics.json itself (a few milliseconds)
    metrics["timing"]["outside_training"] = phases
    metrics["timing"]["total_seconds"] = time.perf_counter() - t_start
    text = json.dumps(finite_or_none(metrics), indent=1, allow_nan=False)
    tmp = options.out / f".{METRICS}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(tmp, options.out / METRICS)
    say(f"wrote {ckpt_path} and {options.out / METRICS} in {format_seconds(metrics['timing']['total_seconds'])}")
    say(
        f"outside training: {sum(phases.values()):.1f} s ("
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
        + f"); training {result.train_seconds:.1f} s"
    )
    return OK
