#!/usr/bin/env python
"""Invent bird names with a trained model (a checkpoint written by scripts/train.py)."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxbirds import checkpoint, cli, data, divergence, evaluate, runner, sample
from jaxbirds.errors import ConfigError


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("runs/birds") / runner.CHECKPOINT,
        help="checkpoint to load (default runs/birds/checkpoint.npz)",
    )
    p.add_argument("--count", type=cli.positive_int, default=20, help="how many names (default 20)")
    p.add_argument(
        "--temperature",
        type=cli.positive_float,
        default=1.0,
        help="below 1: safer, more typical names; above 1: wilder ones (default 1.0)",
    )
    p.add_argument("--max-length", type=cli.positive_int, default=50, help="longest name generated (default 50)")
    p.add_argument("--seed", type=cli.seed, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--data",
        type=Path,
        default=data.DEFAULT_DATA_PATH,
        help="the training names, to mark which samples are memorised (default: the shipped file)",
    )
    cli.add_compile_cache_option(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.use_compile_cache(args)
    ckpt = checkpoint.load(args.checkpoint)
    if ckpt.sweep is not None:
        raise ConfigError(
            f"{args.checkpoint} holds a sweep's {len(ckpt.sweep.seeds)} models; sample from its best one, "
            f"{args.checkpoint.parent / runner.CHECKPOINT}"
        )
    stats = ckpt.stats
    dataset = data.load_dataset(args.data, ckpt.model_config.context_size)
    checkpoint.check_compatible(ckpt, dataset.vocab, dataset.context_size)
    sample.check_fits(ckpt.state.params, args.count, args.max_length, ckpt.model_config.context_size)
    if stats is None:  # a run stopped before its evaluation, or one that diverged in it: evaluate now
        stats = evaluate.calibrate(ckpt.state.params, dataset.train.X)
        problem = divergence.statistics_problem(stats) or divergence.loss_problem(
            {"train": evaluate.split_loss(ckpt.state.params, stats, dataset.train.X, dataset.train.Y)}
        )
    else:  # saved after an evaluation that was a result (runner.run)
        problem = divergence.statistics_problem(stats)
    if problem is not None:
        raise ConfigError(f"the model in {args.checkpoint} has diverged ({problem}): it has no names to give")
    samples = sample.sample_names(
        jax.random.key(args.seed), ckpt.state.params, stats, ckpt.vocab, ckpt.model_config.context_size,
        count=args.count, temperature=args.temperature, max_length=args.max_length,
    )  # fmt: skip
    known = set(dataset.train.names)
    for name, finished in zip(samples.names, samples.finished, strict=True):
        print(sample.shown(name, finished) + ("  (from the training split)" if name in known else ""))
    print(
        f"\n{samples.memorised_share(known):.0%} of finished names are in the training split "
        f"(checkpoint at step {ckpt.state.step:,}, temperature {args.temperature:g})"
    )
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
