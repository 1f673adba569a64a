#!/usr/bin/env python
"""Mutation testing: break one key line at a time and check that the test suite notices.

Each mutant replaces one exact piece of text in one file of ``jaxbirds/`` with a
plausible bug (a dropped factor, a wrong statistic, a constant where a schedule
belongs). For each, the default test suite runs with ``-x`` (stop at the first
failure): a mutant is *killed* if the suite fails, *survives* if it passes. The
file is restored after every mutant, whatever happens.

A mutant whose text no longer occurs in the code is reported as *stale*: update
its text when you refactor. Run from a clean working tree; it takes a few
minutes (a killed mutant costs seconds, a survivor the whole suite).

    python scripts/mutants.py            # every mutant
    python scripts/mutants.py --only schedule-constant calibration-biased
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    bug: str  # what the change means


MUTANTS = [
    Mutant(
        "schedule-constant",
        "jaxbirds/train.py",
        "return optax.piecewise_constant_schedule(start, {self.decay_step: self.decay_factor})",
        "return optax.constant_schedule(start)",
        "the learning rate never decays",
    ),
    Mutant(
        "sample-training-bn",
        "jaxbirds/sample.py",
        "logits = model.logits(params, context, stats) / temperature",
        "logits = model.logits(params, context) / temperature",
        "sampling normalises with the batch's statistics instead of the calibrated ones",
    ),
    Mutant(
        "calibration-biased",
        "jaxbirds/evaluate.py",
        "return BatchNormStats(mean, squares / (n - 1))",
        "return BatchNormStats(mean, squares / n)",
        "calibration uses the biased variance",
    ),
    Mutant(
        "same-minibatch",
        "jaxbirds/train.py",
        "start + jnp.arange(length)",
        "start + jnp.zeros(length, jnp.int32)",
        "every step draws the same minibatch",
    ),
    Mutant(
        "bn-rule-no-bessel",
        "jaxbirds/vjp.py",
        "- (n / (n - 1)) * x_hat * dgain)",
        "- x_hat * dgain)",
        "batch norm's custom_vjp rule without its n/(n-1) factor",
    ),
    Mutant(
        "fused-no-bessel",
        "jaxbirds/manual.py",
        "- (n / (n - 1)) * x_hat * dbngain)",
        "- x_hat * dbngain)",
        "the fused manual pass without batch norm's n/(n-1) factor",
    ),
    Mutant(
        "ce-rule-no-mean",
        "jaxbirds/vjp.py",
        "dlogits = (probs - onehot) * (g / n)",
        "dlogits = (probs - onehot) * g",
        "cross-entropy's rule forgets the 1/n of the mean",
    ),
    Mutant(
        "jvp-bn-uncentred",
        "jaxbirds/jvp.py",
        "centered = dx - jnp.mean(dx, axis=0, keepdims=True)",
        "centered = dx",
        "batch norm's tangent rule forgets that the mean moves with x",
    ),
    Mutant(
        "jvp-ce-no-mean",
        "jaxbirds/jvp.py",
        "jnp.sum((probs - onehot) * dlogits) / n",
        "jnp.sum((probs - onehot) * dlogits)",
        "cross-entropy's tangent rule forgets the 1/n of the mean",
    ),
    Mutant(
        "atomic-tanh",
        "jaxbirds/manual.py",
        'g["hpreact"] = u + u * v["h"]',
        'g["hpreact"] = u',
        "tanh' taken as (1 - h) instead of (1 - h)(1 + h)",
    ),
    Mutant(
        "embedding-set",
        "jaxbirds/manual.py",
        "jnp.zeros_like(C).at[X].add(demb)",
        "jnp.zeros_like(C).at[X].set(demb)",
        "repeated characters overwrite instead of accumulating their gradient",
    ),
    Mutant(
        "atomic-max-first",
        "jaxbirds/manual.py",
        '(g["logit_maxes"] / counts) * is_max',
        'g["logit_maxes"] * jax.nn.one_hot(jnp.argmax(v["logits"], axis=1), V, dtype=v["logits"].dtype)',
        "a tie for the row maximum sends the whole gradient to the first maximum",
    ),
    Mutant(
        "divergence-nan-only",
        "jaxbirds/train.py",
        "np.flatnonzero(~np.isfinite(chunk_losses))",
        "np.flatnonzero(np.isnan(chunk_losses))",
        "an infinite loss is not treated as divergence",
    ),
    Mutant(
        "eval-padding-counted",
        "jaxbirds/evaluate.py",
        "return jnp.sum(nll * valid)",
        "return jnp.sum(nll)",
        "evaluation counts the padding rows of its last batch",
    ),
    Mutant(
        "calibration-padding-counted",
        "jaxbirds/evaluate.py",
        "diff = (model.hidden_preactivation(params, X) - center) * valid[:, None]",
        "diff = model.hidden_preactivation(params, X) - center",
        "calibration counts the padding rows of its last batch",
    ),
    Mutant(
        "sample-keeps-going",
        "jaxbirds/sample.py",
        "drawn = jnp.where(done, 0, drawn)",
        "drawn = drawn",
        "a finished name keeps growing",
    ),
    Mutant(
        "adam-is-sgd",
        "jaxbirds/train.py",
        '"adam": optax.adam}',
        '"adam": optax.sgd}',
        "--optimizer adam silently trains with SGD",
    ),
    Mutant(
        "checker-loose",
        "jaxbirds/gradcheck.py",
        "close=bool(max_abs <= allowed)",
        "close=bool(max_abs <= 100 * allowed)",
        "the checker's tolerance is 100x looser than documented",
    ),
    Mutant(
        "resume-drops-history",
        "jaxbirds/train.py",
        "losses = [previous[: state.step]]",
        "losses = [previous[:0]]",
        "a resumed run forgets the loss history before the resume",
    ),
    Mutant(
        "donation-off",
        "jaxbirds/train.py",
        "donate_argnums=(0, 1)",
        "donate_argnums=()",
        "the parameter and optimiser buffers are not donated",
    ),
    Mutant(
        "divergence-keeps-bad-state",
        "jaxbirds/train.py",
        "last_finite = diverged_at - 1",
        "last_finite = diverged_at",
        "on divergence the saved state is the one that produced the bad loss",
    ),
    Mutant(
        "sweep-rate-not-injected",
        "jaxbirds/sweep.py",
        'return params, state._replace(hyperparams={**state.hyperparams, "learning_rate": rate}), keys.data',
        "return params, state, keys.data",
        "every model of a sweep trains with the first model's learning rate",
    ),
    Mutant(
        "sweep-wrong-data-stream",
        "jaxbirds/sweep.py",
        'return params, state._replace(hyperparams={**state.hyperparams, "learning_rate": rate}), keys.data',
        'return params, state._replace(hyperparams={**state.hyperparams, "learning_rate": rate}), keys.sample',
        "a sweep's models draw their minibatches from another stream than their solo runs",
    ),
    Mutant(
        "sweep-divergence-one-late",
        "jaxbirds/sweep.py",
        "stop_k = end if not bad.size else step + int(bad[0])",
        "stop_k = end if not bad.size else step + int(bad[0]) + 1",
        "a diverged model is reported one step late, with its first bad loss kept",
    ),
    Mutant(
        "sweep-std-biased",
        "jaxbirds/sweep.py",
        '"dev_std": float(np.std(dev, ddof=1))',
        '"dev_std": float(np.std(dev))',
        "the spread over seeds is the biased standard deviation",
    ),
    Mutant(
        "sweep-best-is-worst",
        "jaxbirds/sweep.py",
        'return min(scored, key=lambda i: runs[i]["loss"][split])',
        'return max(scored, key=lambda i: runs[i]["loss"][split])',
        "the model saved as the best has the highest dev loss",
    ),
    Mutant(
        "sweep-group-of-one-batched-wrongly",
        "jaxbirds/sweep.py",
        "= stops[0], jax.tree.map(",
        "= stops[0] - 1, jax.tree.map(",
        "a model trained alone in its group stops one step early",
    ),
    Mutant(
        "sweep-groups-interleaved",
        "jaxbirds/sweep.py",
        "grouped = jax.tree.map(lambda x: x.reshape(-1, size, *x.shape[1:]), per_model)",
        "grouped = jax.tree.map(lambda x: x.reshape(size, -1, *x.shape[1:]).swapaxes(0, 1), per_model)",
        "models are split into groups in one order and put back in another",
    ),
    Mutant(
        "cache-repair-off",
        "jaxbirds/cli.py",
        "timed, removed = repair_compile_cache(directory)",
        "timed, removed = 0, 0",
        "a cache entry without its last-use time stops JAX from caching any new program",
    ),
    Mutant(
        "cache-keeps-truncated",
        "jaxbirds/cli.py",
        "        decompress_executable(entry.read_bytes())\n",
        "        entry.read_bytes()\n",
        "a truncated cache entry is kept, to fail and be recompiled on every run",
    ),
    Mutant(
        "warm-up-other-sample-count",
        "jaxbirds/runner.py",
        "sample.sample_names(train.keys_for(0).sample, stand_in, stats, dataset.vocab, context_size, options.samples)",
        "sample.sample_names(train.keys_for(0).sample, stand_in, stats, dataset.vocab, context_size, 1)",
        "the warm-up compiles a sampling program the run does not use",
    ),
    Mutant(
        "init-op-by-op",
        "jaxbirds/model.py",
        '@functools.partial(jax.jit, static_argnames=("config", "dtype"))\ndef init_params(',
        "def init_params(",
        "parameters are initialised op by op, rounding bngain differently from a sweep's compiled init",
    ),
]


def run_suite(timeout: float, tests: list[str]) -> tuple[str, float]:
    """Run the default suite, stopping at the first failure: ``("SURVIVED" | "killed" | "timed out", seconds)``.

    A time-out is reported as such, not as a kill: it may be a mutant that hangs
    (caught) or a survivor on a slow machine (not caught). Raise ``--timeout``
    to tell which.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's package, even beside an editable install
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider", *tests],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timed out", time.perf_counter() - t0
    return ("SURVIVED" if proc.returncode == 0 else "killed"), time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per suite run (default 600)")
    parser.add_argument(
        "--tests", nargs="+", default=[], metavar="PATH",
        help="run only these test files (a quick check while writing a mutant; the default is the whole suite)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(m.name for m in MUTANTS)
        print(f"error: unknown mutant among {args.only}; known: {known}", file=sys.stderr)
        return 2

    results = {}
    for m in chosen:
        path = ROOT / m.path
        original = path.read_text() if path.is_file() else ""
        if original.count(m.old) != 1:
            results[m.name] = "stale"
            print(f"{m.name:<28} stale (its text occurs {original.count(m.old)} times in {m.path})", flush=True)
            continue
        path.write_text(original.replace(m.old, m.new))
        try:
            results[m.name], seconds = run_suite(args.timeout, args.tests)
        finally:
            path.write_text(original)
        print(f"{m.name:<28} {results[m.name]:<9} {seconds:5.0f} s  ({m.bug})", flush=True)

    live = [name for name, r in results.items() if r != "stale"]
    survived = [name for name in live if results[name] == "SURVIVED"]
    timed_out = [name for name in live if results[name] == "timed out"]
    print(
        f"\n{len(survived)} of {len(live)} mutants survived ({len(survived) / max(len(live), 1):.0%})"
        + (f"; timed out: {', '.join(timed_out)}" if timed_out else "")
        + (f"; stale: {len(results) - len(live)}" if len(live) < len(results) else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
