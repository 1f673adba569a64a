#!/usr/bin/env python
"""Train a grid of models (learning rates × seeds) as one compiled program, on every device.

Every model shares the shapes (one --hidden, at any depth: a grid of depths is
one sweep per depth), batch size, step count, optimiser, gradient mode and
schedule (the flags below, as in scripts/train.py) and has its own learning
rate and seed. With sgd, model k trains bit for bit as `scripts/train.py --lr LR
--seed SEED --grad custom_vjp` would (with adam, to within rounding). Defaults:
learning rates 0.05, 0.1, 0.2, 0.4 (--lr-range 0.05 0.4 4), 4 seeds, the
tutorial's 200,000 steps, gradients by the custom_vjp rules (the fastest
batched mode).

Devices: on a CPU, this script splits the host into one XLA device per core
before JAX starts (XLA_FLAGS=--xla_force_host_platform_device_count=N, unless
XLA_FLAGS already sets it), and the models are split evenly over --devices of
them (default: as many as divide the number of models). On GPUs, --devices
counts GPUs.

Many processes (on one machine or many): start the same command once per
process, adding --coordinator HOST:PORT (process 0's address and a free port)
--num-processes N --process-id I, or --distributed on a cluster whose
environment says all three (SLURM, Open MPI). The models are then split over
the devices of every process, the same number from each; process 0 prints and
writes the results. On a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=K
to give each process K devices (K cores' worth), else each takes one per core.

After every chunk, every model's state and losses are saved (sweep-state.npz,
sweep-losses.f32, on a background thread): Ctrl-C stops after the current chunk
and saves, a crash loses at most one chunk, and --resume continues the sweep to
where an uninterrupted one ends (bit for bit with sgd). At the end it writes
sweep.json, sweep.png, and the best model as checkpoint.npz + losses.f32 (an
ordinary run: scripts/sample.py loads it, scripts/train.py --resume continues it).
A new sweep into an --out that holds results needs --overwrite, and removes them
only once its first checkpoint is on disk; one sweep or run at a time per --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxbirds import cli, data, distributed, model, outputs, plots, sweep, sweep_runner, train
from jaxbirds.checkpoint import Checkpoint
from jaxbirds.errors import ConfigError

DEFAULTS = train.TrainConfig(grad_mode="custom_vjp")
DEFAULT_RATES = (0.05, 0.4, 4)
DEFAULT_SEEDS = 4
#: What differs between the models of a sweep; every other TrainConfig field is shared.
PER_MODEL = ("learning_rate", "seed")


def parse_args(argv):
    """The command line (``argv``; None: ``sys.argv``) as an ``argparse.Namespace``; a bad flag exits with code 2."""
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--lr", type=cli.positive_float, nargs="+", metavar="LR", help="learning rates to try")
    p.add_argument(
        "--lr-range", nargs=3, metavar=("LO", "HI", "N"),
        help="N learning rates from LO to HI, log-spaced (default 0.05 0.4 4); may be combined with --lr",
    )  # fmt: skip
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", type=cli.non_negative_int, metavar="N",
        help=f"N seeds per learning rate: --seed, --seed + 1, ... (default {DEFAULT_SEEDS})",
    )  # fmt: skip
    seeds.add_argument("--seed-list", type=cli.seed, nargs="+", metavar="SEED", help="the seeds, listed")
    p.add_argument("--seed", type=cli.seed, help=f"the first of --seeds N (default {DEFAULTS.seed})")
    cli.add_training_flags(p, DEFAULTS, skip=("--lr", "--seed"))
    p.add_argument("--devices", type=cli.positive_int, help="devices to split the models over (default: see above)")
    p.add_argument("--data", type=Path, help="bird names, one per line (default: the shipped file)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output directory (default runs/sweep)")
    run_mode = p.add_mutually_exclusive_group()
    run_mode.add_argument(
        "--resume", action="store_true",
        help="continue the sweep saved in --out (its grid, shapes and data are its own; --steps, --decay-step "
        "and --chunk may change)",
    )  # fmt: skip
    run_mode.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument(
        "--log-every", type=cli.positive_int, default=10_000, help="steps between progress lines (default 10,000)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    many = p.add_argument_group("many processes (run the same command in each, with its own --process-id)")
    many.add_argument(
        "--coordinator", type=address, metavar="HOST:PORT",
        help="where process 0 serves the coordinator (its address, and a port free there)",
    )  # fmt: skip
    many.add_argument("--num-processes", type=cli.positive_int, metavar="N", help="how many processes")
    many.add_argument("--process-id", type=cli.non_negative_int, metavar="I", help="this process: 0, 1, ..., N - 1")
    many.add_argument(
        "--distributed", action="store_true",
        help="join the processes of a cluster whose environment describes them (SLURM, Open MPI): "
        "jax.distributed.initialize() finds whichever of the three flags above is not given",
    )  # fmt: skip
    many.add_argument(
        "--connect-timeout", type=cli.positive_int, default=distributed.CONNECT_TIMEOUT, metavar="SECONDS",
        help=f"how long to wait at start for every process to connect (default {distributed.CONNECT_TIMEOUT})",
    )  # fmt: skip
    cli.add_compile_cache_option(p)
    return p.parse_args(argv)


def address(text: str) -> str:
    """``--coordinator``'s type: ``HOST:PORT``, checked (:func:`jaxbirds.distributed.check_address`)."""
    try:
        return distributed.check_address(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--coordinator ")) from None


def cluster(args) -> distributed.Cluster | None:
    """The processes to join, or None for a run in this process alone."""
    given = distributed.Cluster(args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and given == distributed.Cluster():
        return None
    return distributed.check(given)


def learning_rates(args) -> list[float]:
    """The learning rates of ``--lr`` then ``--lr-range`` (default: :data:`DEFAULT_RATES`), not yet checked."""
    rates = list(args.lr or [])
    if args.lr_range:
        try:
            low, high, count = float(args.lr_range[0]), float(args.lr_range[1]), int(args.lr_range[2])
        except ValueError:
            raise ConfigError(f"--lr-range takes two numbers and a count, got {' '.join(args.lr_range)}") from None
        rates += sweep.log_spaced(low, high, count)
    if args.lr is None and args.lr_range is None:
        rates = sweep.log_spaced(*DEFAULT_RATES)
    return rates


def seed_count(args) -> int:
    """How many seeds the flags ask for (``--seed-list``, ``--seeds``, default :data:`DEFAULT_SEEDS`)."""
    if args.seed_list:
        if args.seed is not None:
            raise ConfigError("--seed sets the first of --seeds N; with --seed-list, list every seed instead")
        return len(args.seed_list)
    return DEFAULT_SEEDS if args.seeds is None else args.seeds


def seeds(args) -> list[int]:
    """The seeds: ``--seed-list``, or ``--seeds N`` from ``--seed`` on."""
    if args.seed_list:
        return list(args.seed_list)
    first = DEFAULTS.seed if args.seed is None else args.seed
    return [first + i for i in range(seed_count(args))]


def rate_count(args) -> int:
    """How many learning rates the flags ask for, before any list of them is built."""
    if not (args.lr or args.lr_range):
        return DEFAULT_RATES[2]
    try:
        in_range = max(int(args.lr_range[2]), 0) if args.lr_range else 0
    except ValueError:  # learning_rates() says what is wrong with it
        in_range = 0
    return len(args.lr or []) + in_range


def main(argv=None) -> int:
    """Run the sweep the command line ``argv`` describes (joining the processes it names); returns the exit code."""
    args = parse_args(argv)
    processes = cluster(args)
    if processes is not None:
        distributed.initialize(processes, connect_timeout=args.connect_timeout)
    with distributed.exit_if_peers_are_lost():
        code = sweep_on_every_process(args)
        distributed.barrier()  # process 0 has written: no process waits at exit for another still working
    return code


def sweep_on_every_process(args) -> int:
    """The sweep, as every process runs it: the same checks (their verdict agreed on), one program."""
    with contextlib.ExitStack() as held:
        return _sweep(args, held)


#: The flags that say which models a sweep trains: fixed for a saved sweep.
GRID_FLAGS = ("--lr", "--lr-range", "--seeds", "--seed-list", "--seed")


class _Plan(NamedTuple):
    """A sweep to run, checked: what it trains, on how many devices, and what a resumed one continues."""

    dataset: data.Dataset
    model_config: model.ModelConfig
    train_config: train.TrainConfig  # what every model shares; its learning rate and seed are the first model's
    members: tuple[sweep.Member, ...]
    devices: int
    processes: int
    resumed: Checkpoint | None = None  # the saved sweep that --resume continues
    history: np.ndarray | None = None  # its loss history, (K, step)
    changes: Sequence[str] = ()  # a line per setting --resume changes


def _sweep(args, held: contextlib.ExitStack) -> int:
    """Check the flags (:func:`_checked_plan`), agree on the plan with every process, say it, and run it."""
    first = jax.process_index() == 0
    say = functools.partial(print, flush=True) if first else lambda *_: None
    plan = _checked_plan(args, held, first)
    step = 0 if plan.resumed is None else plan.resumed.state.step
    distributed.require_same(
        repr((plan.members, plan.model_config, plan.train_config, plan.devices, plan.dataset.sha256, step)), "sweep"
    )
    _say_plan(plan, args.out, say)
    options = sweep_runner.SweepOptions(
        out=args.out, devices=plan.devices, plot=not args.no_plot, log_every=args.log_every
    )
    with cli.stop_requested() as stop:
        return sweep_runner.run(
            plan.dataset,
            plan.model_config,
            plan.train_config,
            plan.members,
            options,
            stop.is_set,
            log=sys.stdout,
            resume_from=plan.resumed,
            history=plan.history,
        )


def _checked_plan(args, held: contextlib.ExitStack, first: bool) -> _Plan:
    """Every check of the flags, the data and the output directory, before anything is trained; on process 0
    (``first``), claims ``--out`` for the sweep (held in ``held``) and checks that it can be written."""
    with distributed.agreed_errors():  # a process that refuses its input stops every process
        cli.use_compile_cache(args)
        if first:  # one sweep or run at a time in --out, from these checks to the last write
            held.enter_context(outputs.claimed(args.out))
        plan = _resumed_plan(args) if args.resume else _new_plan(args)
        per_process = distributed.local_device_counts()
        devices = sweep.choose_devices(len(plan.members), args.devices, min(per_process) * len(per_process),
                                       len(per_process))  # fmt: skip
        first_model = plan.members[0]
        train_config = dataclasses.replace(plan.train_config, learning_rate=first_model.learning_rate,
                                           seed=first_model.seed)  # fmt: skip
        if first:  # only process 0 writes
            sweep_runner.prepare_output(args.out, args.overwrite, resume=args.resume)
            if not args.no_plot:
                plots.require()
    return plan._replace(train_config=train_config, devices=devices, processes=len(per_process))


def _resumed_plan(args) -> _Plan:
    """The sweep saved in ``--out``, with the changes the flags ask for (devices not chosen yet)."""
    grid = [flag for flag in GRID_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    if grid:
        raise ConfigError(f"{' '.join(grid)}: the models of a saved sweep are its own; --resume continues them")
    asked = {**cli.given(args, cli.TRAIN_FLAGS), **cli.given(args, cli.MODEL_FLAGS)}
    resumed, history, dataset, changes = sweep_runner.load_resumable(args.out, args.data, asked)
    members = sweep_runner.members_of(resumed)
    sweep.check_fits(resumed.model_config, resumed.train_config, len(members))
    return _Plan(dataset, resumed.model_config, resumed.train_config, members, 0, 0, resumed, history, changes)


def _new_plan(args) -> _Plan:
    """The sweep the flags describe (devices not chosen yet)."""
    dataset = data.load_dataset(args.data or data.DEFAULT_DATA_PATH)
    model_config = model.ModelConfig(
        vocab_size=dataset.vocab.size, context_size=dataset.context_size, **cli.given(args, cli.MODEL_FLAGS)
    )
    given = cli.given(args, cli.TRAIN_FLAGS)
    shared = {field: value for field, value in given.items() if field not in PER_MODEL}
    # A sweep's config holds the settings every model shares; its rate and seed are the first model's.
    train_config = dataclasses.replace(DEFAULTS, **shared)
    sweep.check_fits(model_config, train_config, max(rate_count(args) * seed_count(args), 1))  # before lists
    members = sweep.grid(learning_rates(args), seeds(args))
    return _Plan(dataset, model_config, train_config, members, 0, 0)


def _say_plan(plan: _Plan, out: Path, say) -> None:
    """Print what the sweep continues (with --resume), its data, and its models."""
    mc, tc, members = plan.model_config, plan.train_config, plan.members
    if plan.resumed is not None:
        say(f"resuming the sweep in {out} at step {plan.resumed.state.step:,} of {tc.steps:,}"
            + (f"; changed: {', '.join(plan.changes)}" if plan.changes else ""))  # fmt: skip
    say(plan.dataset.summary())
    rates = sorted({m.learning_rate for m in members})
    say(
        f"sweep: {len(members)} models (learning rates {', '.join(f'{r:g}' for r in rates)} × "
        f"{len(members) // len(rates)} seeds) on {plan.devices} device(s) ({jax.devices()[0].device_kind}"
        f"{f', {plan.processes} processes' if plan.processes > 1 else ''}); "
        f"{cli.describe_hidden(mc.hidden)}, {model.param_count_for(mc):,} parameters each; "
        f"{tc.optimizer}, lr drops {1 / tc.decay_factor:g}x at step {tc.decay_step:,}; "
        f"batch {tc.batch_size}; gradients: {tc.grad_mode}; {tc.steps:,} steps"
    )


if __name__ == "__main__":
    cli.split_host_into_devices()
    cli.exit_process(cli.run(main))
