#!/usr/bin/env python
"""Train the bird-name MLP (the tutorial's recipe by default) and invent some names.

Defaults: embedding 10, one hidden block (Linear -> BatchNorm -> tanh) of 200
units (--hidden 100 100 100 100 stacks four), batch 32, 200,000 SGD steps,
learning rate 0.1 then 0.01 from step 100,000. Writes checkpoint.npz,
losses.f32, metrics.json and loss.png into --out. Ctrl-C stops after the
current chunk and saves; --resume continues from the saved state and ends
exactly where an uninterrupted run would.

A new run refuses an --out that already holds a checkpoint unless --overwrite
is given. On --resume, the learning-rate schedule (--lr, --decay-step), --steps,
--chunk and the output options may change (each change is printed); the
model's shape, the batch size, the optimiser, the gradient mode, the seed and
the data are the run's own and may not.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports below: they are part of the start-up cost

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from jaxbirds import cli, data, diagnostics, model, outputs, runner, train  # noqa: E402
from jaxbirds.checkpoint import Checkpoint, DataSource  # noqa: E402
from jaxbirds.errors import ConfigError  # noqa: E402

#: On --resume, these may change; every other flag above belongs to the saved run.
CHANGEABLE = ("steps", "learning_rate", "decay_step", "chunk_size", "diagnostics_every")


def parse_args(argv):
    # Training flags default to None, so that --resume can tell a flag given from one left out.
    p = cli.ArgumentParser(description=__doc__)
    cli.add_training_flags(p)
    p.add_argument(
        "--data", type=Path, help="bird names, one per line (default: the shipped file; with --resume, the run's own)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/birds"), help="output directory (default runs/birds)")
    run_mode = p.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    run_mode.add_argument("--overwrite", action="store_true", help="replace a run already saved in --out")
    p.add_argument("--samples", type=cli.non_negative_int, default=10, help="names to print at the end (default 10)")
    p.add_argument(
        "--log-every", type=cli.positive_int, default=10_000, help="steps between progress lines (default 10,000)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png (nor diagnostics.png)")
    p.add_argument(
        "--diagnostics", action="store_true",
        help=f"record activation, gradient and update statistics of every block while training (about "
        f"{diagnostics.DEFAULT_RECORDS} times a run, inside the compiled loop); writes diagnostics.png and "
        "metrics.json's 'diagnostics'. On --resume, recording starts where the run resumes",
    )  # fmt: skip
    p.add_argument(
        "--diagnostics-every", type=cli.non_negative_int, metavar="N",
        help="record the diagnostics at every step that is a multiple of this (implies --diagnostics; 0: none)",
    )  # fmt: skip
    cli.add_compile_cache_option(p)
    return p.parse_args(argv)


def new_configs(args, dataset: data.Dataset) -> tuple[model.ModelConfig, train.TrainConfig]:
    """The configurations of a new run: the flags given, the defaults for the rest."""
    model_config = model.ModelConfig(
        vocab_size=dataset.vocab.size, context_size=dataset.context_size, **cli.given(args, cli.MODEL_FLAGS)
    )
    return model_config, train.TrainConfig(**asked_training(args, train.TrainConfig()))


def asked_training(args, current: train.TrainConfig, from_step: int = 0) -> dict:
    """The training fields whose flags were given. ``--diagnostics`` without ``--diagnostics-every``, for a run
    that does not record yet (``current``: the defaults, or the saved run's config, at ``from_step``), asks
    for :data:`jaxbirds.diagnostics.DEFAULT_RECORDS` records or so of the steps it will train."""
    asked = cli.given(args, cli.TRAIN_FLAGS)
    if args.diagnostics and "diagnostics_every" not in asked and not current.diagnostics_every:
        asked["diagnostics_every"] = diagnostics.default_every(asked.get("steps", current.steps) - from_step)
    return asked


def resumed_run(args, saved: Checkpoint) -> tuple[Checkpoint, list[str]]:
    """``saved`` with the changes the flags ask for; a :class:`ConfigError` for a flag that may not change."""
    asked = {**asked_training(args, saved.train_config, saved.state.step), **cli.given(args, cli.MODEL_FLAGS)}
    train_config, described = cli.resumed_config(asked, saved, CHANGEABLE)
    return saved._replace(train_config=train_config), described


def main(argv=None) -> int:
    phases = {"imports": time.perf_counter() - STARTED}
    args = parse_args(argv)
    cli.use_compile_cache(args)
    with outputs.claimed(args.out):  # one run at a time in --out, from the checks below to the last write
        return train_in(args, phases)


def train_in(args, phases: dict[str, float]) -> int:
    """Check everything, then train and evaluate into ``args.out`` (whose lock the caller holds)."""
    t0 = time.perf_counter()
    # Everything is checked before anything is written: a refused command leaves --out as it was.
    ckpt_path = args.out / runner.CHECKPOINT
    if args.resume:
        saved, dataset = runner.load_resumable(ckpt_path, args.data)
        if saved.sweep is not None:
            raise ConfigError(f"{ckpt_path} holds a sweep's models; continue it with scripts/sweep.py --resume")
        start, changes = resumed_run(args, saved)
        runner.prepare_output(args.out, resume=True, overwrite=False)
        print(
            f"resuming {ckpt_path} at step {start.state.step:,} of {start.train_config.steps:,}"
            + (f"; changed: {', '.join(changes)}" if changes else "")
        )
    else:
        dataset = data.load_dataset(args.data or data.DEFAULT_DATA_PATH)
        model_config, train_config = new_configs(args, dataset)
        train.check_fits(model_config, train_config)
        runner.prepare_output(args.out, resume=False, overwrite=args.overwrite)
        state = train.init_state(model_config, train_config)
        source = DataSource(dataset.source, dataset.sha256)
        start = Checkpoint(state, None, dataset.vocab, model_config, train_config, source)
    phases["data and initialisation"] = time.perf_counter() - t0
    tc = start.train_config
    print(dataset.summary())
    print(
        f"model: {model.param_count(start.state.params):,} parameters (embedding {start.model_config.embedding_dim}, "
        f"{cli.describe_hidden(start.model_config.hidden)}); {tc.optimizer} lr {tc.learning_rate:g} -> "
        f"{tc.learning_rate * tc.decay_factor:g} at step {tc.decay_step:,}; batch {tc.batch_size}; "
        f"gradients: {tc.grad_mode}; {tc.steps:,} steps"
        + (f"; diagnostics every {tc.diagnostics_every:,} steps" if tc.diagnostics_every else "")
    )
    options = runner.RunOptions(out=args.out, samples=args.samples, plot=not args.no_plot, log_every=args.log_every)
    with cli.stop_requested() as stop:
        return runner.run(dataset, start, options, should_stop=stop.is_set, log=sys.stdout, phases=phases)


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
