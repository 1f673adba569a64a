#!/usr/bin/env python
"""Train the bird-name MLP (the tutorial's recipe by default) and invent some names.

Defaults: embedding 10, hidden 200, batch 32, 200,000 SGD steps, learning rate
0.1 then 0.01 from step 100,000. Writes checkpoint.npz, metrics.json and
loss.png into --out. Ctrl-C stops after the current chunk and saves; --resume
continues from the saved state and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxbirds import checkpoint, cli, data, model, runner, train

DEFAULTS = train.TrainConfig()


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=cli.positive_int, help=f"total SGD steps (default {DEFAULTS.steps:,}); "
                   "with --resume, a new total to train up to")
    p.add_argument("--batch-size", type=cli.batch_size, default=DEFAULTS.batch_size,
                   help=f"examples per step, at least 2 for batch norm (default {DEFAULTS.batch_size})")
    p.add_argument("--hidden", type=cli.positive_int, default=200, help="hidden units (default 200)")
    p.add_argument("--embedding", type=cli.positive_int, default=10, help="embedding size per character (default 10)")
    p.add_argument("--lr", type=cli.positive_float, default=DEFAULTS.learning_rate,
                   help=f"learning rate; it drops 10x at step {DEFAULTS.decay_step:,} (default {DEFAULTS.learning_rate})")
    p.add_argument("--decay-step", type=int, default=DEFAULTS.decay_step,
                   help=f"step at which the learning rate drops 10x (default {DEFAULTS.decay_step:,})")
    p.add_argument("--optimizer", choices=train.OPTIMIZERS, default=DEFAULTS.optimizer, help="optax optimiser (default sgd)")
    p.add_argument("--grad", choices=train.GRAD_MODES, default=DEFAULTS.grad_mode,
                   help="how gradients are computed: jax.grad of the plain model (autodiff), jax.grad through "
                        "the hand-written custom_vjp rules, or the fused manual backward pass (default autodiff)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"fixes initialisation and batches (default {DEFAULTS.seed})")
    p.add_argument("--chunk", type=cli.positive_int, default=DEFAULTS.chunk_size,
                   help=f"steps per compiled call (default {DEFAULTS.chunk_size:,}); progress and checkpoints happen between chunks")
    p.add_argument("--data", type=Path, default=data.DEFAULT_DATA_PATH, help="bird names, one per line (default: the shipped file)")
    p.add_argument("--out", type=Path, default=Path("runs/birds"), help="output directory (default runs/birds)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (its configuration is reused)")
    p.add_argument("--samples", type=cli.non_negative_int, default=10, help="names to print at the end (default 10)")
    p.add_argument("--log-every", type=cli.positive_int, default=10_000, help="steps between progress lines (default 10,000)")
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = data.load_dataset(args.data)
    ckpt_path = args.out / runner.CHECKPOINT
    if args.resume:
        start = checkpoint.load(ckpt_path)
        checkpoint.check_compatible(start, dataset.vocab, dataset.context_size)
        if args.steps is not None:
            start = start._replace(train_config=dataclasses.replace(start.train_config, steps=args.steps))
        print(f"resuming {ckpt_path} at step {start.state.step:,} of {start.train_config.steps:,}")
    else:
        model_config = model.ModelConfig(vocab_size=dataset.vocab.size, context_size=dataset.context_size,
                                         embedding_dim=args.embedding, hidden=args.hidden)
        train_config = train.TrainConfig(
            steps=args.steps or DEFAULTS.steps, batch_size=args.batch_size, optimizer=args.optimizer,
            learning_rate=args.lr, decay_step=args.decay_step, seed=args.seed, grad_mode=args.grad,
            chunk_size=args.chunk,
        )
        state = train.init_state(model_config, train_config)
        start = checkpoint.Checkpoint(state, None, None, dataset.vocab, model_config, train_config)
    tc = start.train_config
    print(dataset.summary())
    print(f"model: {model.param_count(start.state.params):,} parameters (embedding {start.model_config.embedding_dim}, "
          f"hidden {start.model_config.hidden}); {tc.optimizer} lr {tc.learning_rate:g} -> "
          f"{tc.learning_rate * tc.decay_factor:g} at step {tc.decay_step:,}; batch {tc.batch_size}; "
          f"gradients: {tc.grad_mode}; {tc.steps:,} steps")
    options = runner.RunOptions(out=args.out, samples=args.samples, plot=not args.no_plot, log_every=args.log_every)
    with cli.stop_requested() as stop:
        return runner.run(dataset, start, options, should_stop=stop.is_set, log=sys.stdout)


if __name__ == "__main__":
    sys.exit(cli.run(main))
