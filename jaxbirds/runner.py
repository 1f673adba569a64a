"""A training run on disk: what ``scripts/train.py`` does, as a library function.

Train in compiled chunks, writing a checkpoint after every chunk (so a crash or
Ctrl-C loses at most one chunk), then calibrate batch norm, evaluate every
split, sample names, and write ``metrics.json`` and ``loss.png``.

Files in the output directory:

* ``checkpoint.npz`` - see :mod:`jaxbirds.checkpoint`;
* ``metrics.json``   - configs, split losses, timings, samples and the per-step loss history;
* ``loss.png``       - log10 training loss, averaged over windows of 1,000 steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, TextIO

import jax
import numpy as np

from jaxbirds import checkpoint, model, plots, sample, train
from jaxbirds.checkpoint import Checkpoint
from jaxbirds.data import Dataset

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.json"
LOSS_PLOT = "loss.png"

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


def run(
    dataset: Dataset,
    start: Checkpoint,
    options: RunOptions,
    should_stop: Callable[[], bool] = lambda: False,
    log: TextIO | None = None,
) -> int:
    """Train ``start`` to its configured step count and evaluate; returns an exit code."""
    say = (lambda line: print(line, file=log, flush=True)) if log else (lambda line: None)
    t_start = time.perf_counter()
    ckpt_path = options.out / CHECKPOINT
    tc = start.train_config

    def save(state: train.TrainState, losses: np.ndarray, stats=None) -> None:
        checkpoint.save(ckpt_path, start._replace(state=state, losses=losses, stats=stats))

    next_log = [start.state.step + options.log_every]

    def on_chunk(progress: train.Progress, state: train.TrainState, losses: np.ndarray) -> None:
        save(state, losses)
        if progress.step >= next_log[0] or progress.step == progress.total:
            next_log[0] = (progress.step // options.log_every + 1) * options.log_every
            say(
                f"step {progress.step:>9,}/{progress.total:,}  "
                f"loss {float(np.mean(losses[-options.log_every:])):.4f}  "
                f"{progress.steps_per_second:>8,.0f} steps/s  ETA {format_seconds(progress.eta_seconds)}"
            )

    result = train.train(
        dataset.train.X, dataset.train.Y, tc, start.state, start.losses, on_chunk=on_chunk, should_stop=should_stop
    )
    save(result.state, result.losses)
    trained = result.state.step - start.state.step
    rate = trained / result.train_seconds if result.train_seconds > 0 else float("nan")
    say(f"trained {trained:,} steps in {result.train_seconds:.1f} s ({rate:,.0f} steps/s; "
        f"compile {result.compile_seconds:.1f} s)")
    if result.diverged_at is not None:
        say(
            f"error: the loss became non-finite at step {result.diverged_at:,}. The last finite state "
            f"(step {result.state.step:,}) is saved in {ckpt_path}. Try a lower learning rate "
            f"(--lr {tc.learning_rate / 10:g}) or the adam optimiser."
        )
        return DIVERGED
    if result.stopped:
        say(f"interrupted at step {result.state.step:,}: saved {ckpt_path}; continue with --resume --out {options.out}")
        return INTERRUPTED

    params = result.state.params
    stats = train.calibrate(params, dataset.train.X)
    split_losses = {name: train.evaluate(params, stats, s.X, s.Y) for name, s in dataset.splits.items()}
    save(result.state, result.losses, stats)
    say("loss (batch norm calibrated on the train split): " + "  ".join(f"{k} {v:.4f}" for k, v in split_losses.items()))

    samples = sample.sample_names(
        jax.random.fold_in(train.keys_for(tc.seed).init, 1), params, stats, dataset.vocab,
        start.model_config.context_size, count=max(options.samples, 1),
    )  # fmt: skip
    memorised = samples.memorised_share(dataset.train.names)
    if options.samples:
        say(f"samples ({memorised:.0%} are names from the training split):")
        for name, finished in zip(samples.names[: options.samples], samples.finished):
            say(f"  {name}" + ("" if finished else " ..."))

    metrics = {
        "model_config": dataclasses.asdict(start.model_config),
        "train_config": dataclasses.asdict(tc),
        "parameters": model.param_count(params),
        "dataset": {name: len(s) for name, s in dataset.splits.items()},
        "step": result.state.step,
        "loss": split_losses,
        "timing": {
            "compile_seconds": result.compile_seconds,
            "train_seconds": result.train_seconds,
            "steps_per_second": rate,
            "device": str(jax.devices()[0].device_kind),
            "jax_version": jax.__version__,
        },
        "samples": samples.names[: options.samples],
        "memorised_share": memorised,
        "loss_history": [round(float(x), 5) for x in result.losses],
    }
    if options.plot:
        path = plots.loss_curve(result.losses, options.out / LOSS_PLOT, title=f"training loss ({tc.grad_mode})")
        say(f"wrote {path}")
    metrics["timing"]["total_seconds"] = time.perf_counter() - t_start
    (options.out / METRICS).write_text(json.dumps(metrics, indent=1))
    say(f"wrote {ckpt_path} and {options.out / METRICS} in {format_seconds(metrics['timing']['total_seconds'])}")
    return OK
