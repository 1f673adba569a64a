#!/usr/bin/env python
"""Mutation testing: break one key line at a time and check that the test suite notices.

Each mutant replaces one exact piece of text in one file of ``jaxbirds/`` (or ``scripts/``) with a
plausible bug (a dropped factor, a wrong statistic, a constant where a schedule
belongs). For each, the default test suite runs with ``-x`` (stop at the first
failure), then, if it passed, the slow tests: a mutant is *killed* if either
fails ("killed (slow)" when only the slow tests do), *survives* if both pass. The
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
        "jaxbirds/closed_forms.py",
        "- (n / (n - 1)) * x_hat * dgain)",
        "- x_hat * dgain)",
        "batch norm's closed form (the custom_vjp rule's and the fused pass's) without its n/(n-1) factor",
    ),
    Mutant(
        "fused-reads-another-blocks-x-hat",
        "jaxbirds/manual.py",
        'x_hat, inv_std = v[layer_name("bnraw", layer)], v[layer_name("bnvar_inv", layer)]',
        'x_hat, inv_std = v[layer_name("bnraw", depth)], v[layer_name("bnvar_inv", depth)]',
        "the fused pass reads every block's batch-norm residuals from the last block",
    ),
    Mutant(
        "fused-input-of-the-wrong-block",
        "jaxbirds/manual.py",
        'below = v["embcat"] if layer == 1 else v[layer_name("h", layer - 1)]',
        'below = v["embcat"] if layer == 1 else v[layer_name("h", 1)]',
        "the fused pass takes every block's input (for dW) from block 1's output",
    ),
    Mutant(
        "atomic-gain-shared-across-blocks",
        "jaxbirds/manual.py",
        'g["bnraw"] = params[gain] * g["hpreact"]',
        'g["bnraw"] = params["bngain1"] * g["hpreact"]',
        "the atomic pass uses block 1's batch-norm gain in every block",
    ),
    Mutant(
        "atomic-linear-input-of-the-wrong-block",
        "jaxbirds/manual.py",
        'below = "embcat" if layer == 1 else layer_name("h", layer - 1)',
        'below = "embcat" if layer == 1 else layer_name("h", layer)',
        "the atomic pass reads a block's input from its own output",
    ),
    Mutant(
        "forward-one-blocks-stats-for-all",
        "jaxbirds/model.py",
        "None if stats is None else stats[layer - 1]",
        "None if stats is None else stats[0]",
        "evaluation mode normalises every block with block 1's calibrated statistics",
    ),
    Mutant(
        "taps-not-numbered",
        "jaxbirds/model.py",
        "    return lambda name, value: tap(layer_name(name, layer), value)",
        "    return tap",
        "every block taps the same names: the checker and the manual passes mix the blocks up",
    ),
    Mutant(
        "init-fan-in-of-the-wrong-layer",
        "jaxbirds/model.py",
        "for layer, fan_in in enumerate(config.widths[:-2], start=1):",
        "for layer, fan_in in enumerate(config.widths[1:-1], start=1):",
        "each block's Kaiming scale uses its own width instead of its fan-in",
    ),
    Mutant(
        "ce-rule-no-mean",
        "jaxbirds/closed_forms.py",
        "return (probs - onehot) * (g / n)",
        "return (probs - onehot) * g",
        "cross-entropy's closed form (every rule's and the fused pass's) forgets the 1/n of the mean",
    ),
    Mutant(
        "jvp-bn-uncentred",
        "jaxbirds/jvp.py",
        "centered = dx - jnp.mean(dx, axis=0, keepdims=True)",
        "centered = dx",
        "batch norm's tangent rule forgets that the mean moves with x",
    ),
    Mutant(
        "jvp-ce-tangent-scaled",
        "jaxbirds/jvp.py",
        "jnp.sum(closed_forms.cross_entropy_backward(probs, labels) * dlogits)",
        "jnp.sum(closed_forms.cross_entropy_backward(probs, labels, 2.0) * dlogits)",
        "cross-entropy's tangent rule doubles the tangent",
    ),
    Mutant(
        "atomic-tanh",
        "jaxbirds/closed_forms.py",
        "return u + u * h",
        "return u",
        "tanh' taken as (1 - h) instead of (1 - h)(1 + h)",
    ),
    Mutant(
        "embedding-set",
        "jaxbirds/closed_forms.py",
        "jnp.zeros_like(C).at[X].add(demb)",
        "jnp.zeros_like(C).at[X].set(demb)",
        "repeated characters overwrite instead of accumulating their gradient",
    ),
    Mutant(
        "atomic-max-first",
        "jaxbirds/manual.py",
        '(g["logit_maxes"] / ties) * is_max',
        'g["logit_maxes"] * jax.nn.one_hot(jnp.argmax(v["logits"], axis=1), n_classes, dtype=v["logits"].dtype)',
        "a tie for the row maximum sends the whole gradient to the first maximum",
    ),
    Mutant(
        "divergence-nan-only",
        "jaxbirds/divergence.py",
        "bad = np.flatnonzero(~np.isfinite(np.asarray(losses)))",
        "bad = np.flatnonzero(np.isnan(np.asarray(losses)))",
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
        "diff = (lookup_hidden_preactivation(tables, b1, X) - center) * valid[:, None]",
        "diff = lookup_hidden_preactivation(tables, b1, X) - center",
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
        "stop_k = end if bad is None else step + bad",
        "stop_k = end if bad is None else step + bad + 1",
        "a diverged model is reported one step late, with its first bad loss kept",
    ),
    Mutant(
        "sweep-std-biased",
        "jaxbirds/sweep_results.py",
        '"dev_std": float(np.std(dev, ddof=1))',
        '"dev_std": float(np.std(dev))',
        "the spread over seeds is the biased standard deviation",
    ),
    Mutant(
        "sweep-best-is-worst",
        "jaxbirds/sweep_results.py",
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
    Mutant(
        "exploded-loss-unbounded",
        "jaxbirds/divergence.py",
        "EXPLODED_LOSS = -math.log(float(np.finfo(np.float32).tiny))",
        'EXPLODED_LOSS = float("inf")',
        "a finite but exploded loss (4e9) is reported as a result",
    ),
    Mutant(
        "stats-divergence-unchecked",
        "jaxbirds/divergence.py",
        "    return statistics_problem(stats) or loss_problem(split_losses)",
        "    return loss_problem(split_losses)",
        "the sweep calls a model whose batch-norm statistics overflow a result",
    ),
    Mutant(
        "run-evaluation-divergence-ignored",
        "jaxbirds/runner.py",
        "        return _diverged_in_evaluation(evaluation.problem, trained.result, start, options, plot, helper, say)",
        "        pass",
        "train.py reports nan losses of a diverged model and exits 0",
    ),
    Mutant(
        "sweep-own-divergence-rule",
        "jaxbirds/sweep_runner.py",
        "if divergence.evaluation_problem(evaluation.stats, evaluation.loss) is not None:",
        "if not all(loss is None or math.isfinite(loss) for loss in evaluation.loss.values()):",
        "the sweep keeps its own definition of divergence, so an exploded model wins",
    ),
    Mutant(
        "outputs-checked-partly",
        "jaxbirds/outputs.py",
        "    for name in ALL_FILES:\n        if (out / name).is_dir():",
        "    for name in RUN_FILES:\n        if (out / name).is_dir():",
        "the up-front check misses files the other script writes or removes",
    ),
    Mutant(
        "outputs-created-on-refusal",
        "jaxbirds/outputs.py",
        "        if untouched and not before:",
        "        if False:",
        "a refused run leaves the --out it made for its lock behind",
    ),
    Mutant(
        "lock-not-taken",
        "jaxbirds/outputs.py",
        "        lock.acquire()\n",
        "        pass\n",
        "two runs into one --out both go ahead",
    ),
    Mutant(
        "evaluation-progress-chatty",
        "jaxbirds/evaluate.py",
        "if (done >= total and reported[0]) or (done < total and now - last[0] >= seconds):",
        "if done >= total or now - last[0] >= seconds:",
        "a short evaluation phase prints progress lines",
    ),
    Mutant(
        "evaluation-stop-not-polled",
        "jaxbirds/evaluate.py",
        "        if should_stop():\n",
        "        if False:\n",
        "a stop request during evaluation is ignored until it ends",
    ),
    Mutant(
        "lookup-one-table",
        "jaxbirds/evaluate.py",
        "rows = [tables[j][X[:, j]] for j in range(X.shape[1])]",
        "rows = [tables[0][X[:, j]] for j in range(X.shape[1])]",
        "the first position's table is used for every position",
    ),
    Mutant(
        "lookup-no-bias",
        "jaxbirds/evaluate.py",
        "return sum(rows[1:], start=rows[0]) + b1",
        "return sum(rows[1:], start=rows[0])",
        "the lookup-table first layer forgets b1",
    ),
    Mutant(
        "tables-wrong-block",
        "jaxbirds/evaluate.py",
        "C @ W1[j * E : (j + 1) * E]",
        "C @ W1[j : j + E]",
        "a position's table is built from the wrong rows of W1",
    ),
    Mutant(
        "eval-batch-counts-embedded-input",
        "jaxbirds/evaluate.py",
        "per_row = count * LIVE_BUFFERS * (hidden + vocab) * itemsize",
        'per_row = count * LIVE_BUFFERS * (hidden + vocab + params["W1"].shape[-2]) * itemsize',
        "evaluation batches are sized for an embedded input that is never built",
    ),
    Mutant(
        "empty-name-blank",
        "jaxbirds/sample.py",
        '    return (name or EMPTY_NAME) + ("" if finished else " ...")',
        '    return name + ("" if finished else " ...")',
        "an empty sampled name prints as a blank line",
    ),
    Mutant(
        "checkpoint-narrow-net",
        "jaxbirds/checkpoint.py",
        "    except Exception as err:  # whichever it is, these bytes are not a readable archive",
        "    except zipfile.BadZipFile as err:",
        "damage that zipfile reports as another exception escapes with a traceback",
    ),
    Mutant(
        "checkpoint-future-version",
        "jaxbirds/checkpoint.py",
        "    if version > VERSION:",
        "    if version > VERSION + 1:",
        "a checkpoint of a newer format loads as if it were current",
    ),
    Mutant(
        "checkpoint-dtype-kind",
        "jaxbirds/checkpoint.py",
        "    if array.dtype != dtype:",
        "    if array.dtype.kind != dtype.kind:",
        "float16 parameters and int64 optimiser counters are accepted",
    ),
    Mutant(
        "checkpoint-finite-wrong-arrays",
        "jaxbirds/checkpoint.py",
        'if not name.startswith("opt/") and not np.isfinite(array[training] if stack else array).all():',
        'if name.startswith("opt/") and not np.isfinite(array[training] if stack else array).all():',
        "NaN parameters load, and a legitimate inf in adam's state is refused",
    ),
    Mutant(
        "loss-log-crc-unchecked",
        "jaxbirds/checkpoint_writer.py",
        "        if crc32 is not None and zlib.crc32(data.tobytes()) != crc32:",
        "        if False:",
        "a loss log that is not the checkpoint's own is read as its history",
    ),
    Mutant(
        "overwrite-cuts-old-log-first",
        "jaxbirds/checkpoint_writer.py",
        "        first, replace_first = not self._started, not self._started and self.replacing",
        "        first, replace_first = not self._started, False",
        "--overwrite cuts the old run's log before the new run's first checkpoint exists",
    ),
    Mutant(
        "sweep-resume-from-scratch",
        "jaxbirds/sweep.py",
        "        params, opt_states = jax.device_put((start.params, start.opt_states), per_model)",
        "        pass",
        "a resumed sweep trains its models again from their initialisation",
    ),
    Mutant(
        "sweep-lr-duplicates-in-float64",
        "jaxbirds/sweep.py",
        "    as_used = [float(np.float32(lr)) for lr in learning_rates]",
        "    as_used = list(learning_rates)",
        "learning rates equal in float32 train two identical models",
    ),
    Mutant(
        "memory-one-device",
        "jaxbirds/memory.py",
        "        require(needed * copies, what + where, hint, budget)",
        "        require(needed, what + where, hint, budget)",
        "host devices sharing one memory are counted as one",
    ),
    Mutant(
        "sweep-plot-fixed-window",
        "jaxbirds/plots.py",
        "    window = window_for(np.shape(losses)[-1], window)",
        "    window = window",
        "a sweep shorter than one window draws an empty panel",
    ),
    Mutant(
        "report-block-not-replaced",
        "jaxbirds/report.py",
        "            pieces += [text[done : block.start], contents[name]]",
        "            pieces += [text[done : block.end]]",
        "bench.py --report leaves a block's old table",
    ),
    Mutant(
        "report-missing-block-accepted",
        "jaxbirds/report.py",
        "    missing = [name for name in names if name not in blocks]",
        "    missing = []",
        "a study without a block in the report is found only after measuring",
    ),
    Mutant(
        "report-skipped-study-overwritten",
        "jaxbirds/report.py",
        "    filled = [name for name in names if results.get(name)]",
        "    filled = [name for name in names if name in results]",
        "a skipped study (torch absent) blanks its table",
    ),
    Mutant(
        "plots-switch-backend",
        "jaxbirds/plots.py",
        "    return Figure(figsize=figsize)",
        '    import matplotlib.pyplot as plt\n\n    plt.switch_backend("Agg")\n    return Figure(figsize=figsize)',
        "drawing switches a notebook's matplotlib backend",
    ),
    Mutant(
        "vjp-softmax-residual-stop-gradient",
        "jaxbirds/vjp.py",
        'return loss, (seen["counts"] / seen["counts_sum"], labels)',
        'return loss, (jax.lax.stop_gradient(seen["counts"] / seen["counts_sum"]), labels)',
        "the custom_vjp rule's first derivative is right, its second (jax.hessian) wrong",
    ),
    Mutant(
        "noise-one-sample",
        "jaxbirds/gradcheck.py",
        "NOISE_SAMPLES = 8",
        "NOISE_SAMPLES = 1",
        "the checker's noise estimate comes from one sample and can come out small by chance",
    ),
    Mutant(
        "noise-sample-zero",
        "jaxbirds/gradcheck.py",
        "diff = {k: float(jnp.max(v)) for k, v in per_sample.items()}",
        "diff = {k: float(v[0]) for k, v in per_sample.items()}",
        "the noise samples are drawn but only the first is used",
    ),
    Mutant(
        "own-noise-dropped",
        "jaxbirds/gradcheck.py",
        "return {k: max(noise[k] for noise in noises) for k in noises[0]}",
        "return dict(noises[0])",
        "a closed form's own rounding noise is left out of its allowance",
    ),
    Mutant(
        "bitwise-not-enforced",
        "scripts/gradcheck.py",
        "if bitwise_claimed and not_bitwise:",
        "if False and not_bitwise:",
        "an atomic pass that is not bit-exact prints OK",
    ),
    Mutant(
        "bitwise-never-claimed",
        "jaxbirds/gradcheck.py",
        'BITWISE_CLAIMS = frozenset({("cpu", np.dtype("float32"))})',
        "BITWISE_CLAIMS = frozenset()",
        "bit-exactness is never checked",
    ),
    Mutant(
        "fd-square",
        "jaxbirds/finite_differences.py",
        "FD_SHAPES = (FDShape(batch=5, hidden=3, classes=4), FDShape(batch=3, hidden=7, classes=5))",
        "FD_SHAPES = (FDShape(batch=4, hidden=4, classes=5),)",
        "finite differences at a square shape cannot see a batch/hidden mix-up",
    ),
    Mutant(
        "fd-ignores-user-shape",
        "scripts/gradcheck.py",
        "fd_ok = check_finite_differences(fd_key, (*users, *finite_differences.FD_SHAPES))",
        "fd_ok = check_finite_differences(fd_key, finite_differences.FD_SHAPES)",
        "the finite-difference check ignores --batch-size and --hidden",
    ),
    Mutant(
        "mesh-one-process-devices",
        "jaxbirds/sweep.py",
        "    return Mesh(np.array([d for process in local for d in process[:each]]), (MODELS,))",
        "    return Mesh(np.array(jax.devices()[:devices]), (MODELS,))",
        "the mesh takes every device from process 0",
    ),
    Mutant(
        "stop-not-agreed",
        "jaxbirds/sweep.py",
        "        if distributed.any_process(should_stop()):",
        "        if should_stop():",
        "a stop reaching one process stops only that one",
    ),
    Mutant(
        "errors-not-agreed",
        "scripts/sweep.py",
        "    with distributed.agreed_errors():  # a process that refuses its input stops every process",
        "    if True:  # a process that refuses its input stops every process",
        "one process refuses its input and the others go on",
    ),
    Mutant(
        "sweeps-not-compared",
        "jaxbirds/distributed.py",
        "    differ = [i for i, d in enumerate(descriptions) if d != descriptions[0]]",
        "    differ = []",
        "processes started with different sweeps are accepted",
    ),
    Mutant(
        "peer-loss-not-caught",
        "scripts/sweep.py",
        "    with distributed.exit_if_peers_are_lost():",
        "    if True:",
        "a lost peer gives a traceback and a later abort",
    ),
    Mutant(
        "bn-eps-1e-3",
        "jaxbirds/ops.py",
        "BN_EPS = 1e-5",
        "BN_EPS = 1e-3",
        "batch norm's epsilon is 1e-3, not the tutorial's 1e-5",
    ),
    Mutant(
        "init-b1-scale",
        "jaxbirds/model.py",
        "scales |= {W: (5 / 3) / fan_in**0.5, b: 0.1, gain: 0.1, bias: 0.1}",
        "scales |= {W: (5 / 3) / fan_in**0.5, b: 0.2, gain: 0.1, bias: 0.1}",
        "each block's b is initialised at twice the tutorial's scale",
    ),
    Mutant(
        "init-bngain-scale",
        "jaxbirds/model.py",
        "scales |= {W: (5 / 3) / fan_in**0.5, b: 0.1, gain: 0.1, bias: 0.1}",
        "scales |= {W: (5 / 3) / fan_in**0.5, b: 0.1, gain: 0.2, bias: 0.1}",
        "bngain's spread is twice the tutorial's",
    ),
    Mutant(
        "recipe-decay-factor",
        "jaxbirds/train.py",
        "    decay_factor: float = 0.1",
        "    decay_factor: float = 0.5",
        "the learning rate decays to 0.05, not 0.01",
    ),
    Mutant(
        "streams-swapped",
        "jaxbirds/train.py",
        "    return Keys(streams[0], streams[1], streams[2])",
        "    return Keys(streams[1], streams[0], streams[2])",
        "the initialisation and minibatch streams are swapped",
    ),
    Mutant(
        "lock-file-left-on-refusal",
        "jaxbirds/outputs.py",
        "        if untouched and not had_lock:",
        "        if False:",
        "a refused command into an existing --out leaves a lock file there",
    ),
    Mutant(
        "bench-report-checked-late",
        "scripts/bench.py",
        "        report.check_file(args.report, names)",
        "        pass",
        "a report file without a study's block is found only after minutes of measuring",
    ),
    Mutant(
        "eval-later-blocks-training-mode",
        "jaxbirds/evaluate.py",
        "h = model.block(params, layer, h, _EVALUATION_RULES, layer_stats)",
        "h = model.block(params, layer, h, _EVALUATION_RULES)",
        "the blocks after the first are calibrated and evaluated in training mode",
    ),
    Mutant(
        "eval-first-block-last-stats",
        "jaxbirds/evaluate.py",
        "stats[0].mean, stats[0].var)",
        "stats[-1].mean, stats[-1].var)",
        "block 1 is normalised with the last block's statistics",
    ),
    Mutant(
        "eval-later-block-previous-stats",
        "jaxbirds/evaluate.py",
        "for layer, layer_stats in enumerate(stats[1:], start=2):",
        "for layer, layer_stats in zip(range(2, len(stats) + 1), stats, strict=False):",
        "each later block gets the previous block's statistics",
    ),
    Mutant(
        "calibration-wrong-block-prefix",
        "jaxbirds/evaluate.py",
        "column_sums = functools.partial(later_sums, tables, rest, stats)",
        "column_sums = functools.partial(later_sums, tables, rest, stats[:1] * (layer - 1))",
        "block l is calibrated with block 1's statistics for every block before it",
    ),
    Mutant(
        "calibration-later-padding-counted",
        "jaxbirds/evaluate.py",
        "diff = (hprebn - center) * valid[:, None]",
        "diff = hprebn - center",
        "the later blocks' calibration counts the padding rows",
    ),
    Mutant(
        "calibration-progress-one-block",
        "jaxbirds/evaluate.py",
        "done, total = 2 * n * (layer - 1), 2 * n * depth",
        "done, total = 0, 2 * n",
        "calibration progress restarts per block and says 100 % after block 1",
    ),
    Mutant(
        "eval-batch-first-block-width",
        "jaxbirds/evaluate.py",
        'vocab, hidden, count = params["C"].shape[-2], widest_block(params), models_of(params, models)',
        'vocab, hidden, count = params["C"].shape[-2], params["W1"].shape[-1], models_of(params, models)',
        "evaluation batches are sized for block 1 only",
    ),
    Mutant(
        "eval-stats-depth-unchecked",
        "jaxbirds/evaluate.py",
        "    _check_stats(params, stats)\n",
        "",
        "statistics for another depth are not refused with a clear error",
    ),
    Mutant(
        "sample-first-block-width",
        "jaxbirds/sample.py",
        "per_name = 4 * (max_length + context_size) + 4 * itemsize * (widest_block(params) + vocab)",
        'per_name = 4 * (max_length + context_size) + 4 * itemsize * (params["W1"].shape[1] + vocab)',
        "the sampling memory check counts block 1's width only",
    ),
    Mutant(
        "divergence-first-block-only",
        "jaxbirds/divergence.py",
        "for layer, block in enumerate(stats, start=1):",
        "for layer, block in enumerate(stats[:1], start=1):",
        "only block 1's statistics are checked for divergence",
    ),
    Mutant(
        "run-training-stop-ignored",
        "jaxbirds/runner.py",
        "        return _interrupted(trained.result, options, say)\n",
        "        pass\n",
        "a stopped run goes on to evaluate and write metrics",
    ),
    Mutant(
        "run-diverged-replacing-lost",
        "jaxbirds/runner.py",
        "final = _writer(options, start, keep, replacing=trained.replacing)",
        "final = _writer(options, start, keep, replacing=False)",
        "an --overwrite run that diverges leaves the old run's metrics.json",
    ),
    Mutant(
        "run-final-checkpoint-uncrc",
        "jaxbirds/runner.py",
        "stats=evaluation.stats, loss_log_crc32=trained.log_crc32",
        "stats=evaluation.stats, loss_log_crc32=0",
        "the final checkpoint no longer matches its loss log, so --resume fails",
    ),
    Mutant(
        "progress-next-line-unrounded",
        "jaxbirds/runner.py",
        "next_log = (progress.step // options.log_every + 1) * options.log_every",
        "next_log = progress.step + options.log_every",
        "progress lines drift off the multiples of --log-every",
    ),
    Mutant(
        "progress-last-step-silent",
        "jaxbirds/runner.py",
        "if progress.step >= next_log or progress.step == progress.total:",
        "if progress.step >= next_log:",
        "no progress line at the last step",
    ),
    Mutant(
        "progress-mean-of-all-steps",
        "jaxbirds/runner.py",
        "recent = collections.deque(maxlen=options.log_every)",
        "recent = collections.deque()",
        "the progress line's loss averages every step so far",
    ),
    Mutant(
        "bench-plan-ignores-needs",
        "jaxbirds/bench/__init__.py",
        "            wanted.update(study.needs)",
        "            pass",
        "--only xla no longer runs the modes study it needs",
    ),
    Mutant(
        "bench-measure-drops-uses",
        "jaxbirds/bench/study.py",
        " | {name: earlier.get(name, []) for name in self.uses}",
        "",
        "the torch study no longer gets the dispatch rows",
    ),
    Mutant(
        "bench-records-needed-studies",
        "scripts/bench.py",
        "        if study.name in only:",
        "        if True:",
        "--only xla also prints and saves the modes study",
    ),
    Mutant(
        "bench-xla-needs-nothing",
        "jaxbirds/bench/xla.py",
        '    needs=("modes",),\n',
        "",
        "the xla study loses its GFLOP/s",
    ),
    Mutant(
        "bench-torch-best-any-variant",
        "jaxbirds/bench/pytorch.py",
        ' for r in dispatch if r["variant"] == "scan"),',
        " for r in dispatch),",
        "the torch speed-up compares against a non-scan variant",
    ),
    Mutant(
        "checkpoint-v3-map-swaps-gain-bias",
        "jaxbirds/checkpoint.py",
        '"params/bngain1": "params/bngain", "params/bnbias1": "params/bnbias",',
        '"params/bngain1": "params/bnbias", "params/bnbias1": "params/bngain",',
        "a version-3 file's gain and bias are read swapped",
    ),
    Mutant(
        "checkpoint-v3-map-swaps-mean-var",
        "jaxbirds/checkpoint.py",
        '"stats/mean1": "stats/mean", "stats/var1": "stats/var",',
        '"stats/mean1": "stats/var", "stats/var1": "stats/mean",',
        "a version-3 file's mean is read as the variance",
    ),
    Mutant(
        "checkpoint-stats-under-block-1",
        "jaxbirds/checkpoint.py",
        "        mean, var = stats_names(layer)",
        "        mean, var = stats_names(1)",
        "every block's statistics are written under block 1's key",
    ),
    Mutant(
        "checkpoint-load-block-1-stats",
        "jaxbirds/checkpoint.py",
        "BatchNormStats(*(arrays[name] for name in stats_names(layer)))",
        "BatchNormStats(*(arrays[name] for name in stats_names(1)))",
        "loading gives every block block 1's statistics",
    ),
    Mutant(
        "checkpoint-v4-read-as-v3",
        "jaxbirds/checkpoint.py",
        'numbered = header["version"] >= FIRST_NUMBERED',
        'numbered = header["version"] > FIRST_NUMBERED',
        "version-4 files are read with version 3's names",
    ),
    Mutant(
        "checkpoint-old-versions-unmapped",
        "jaxbirds/checkpoint.py",
        "name if numbered else ONE_BLOCK_NAMES.get(name, name)",
        "name",
        "version 2 and 3 files no longer load",
    ),
    Mutant(
        "checkpoint-v3-hidden-not-listed",
        "jaxbirds/checkpoint.py",
        '    return {**fields, "hidden": [fields["hidden"]]}',
        "    return fields",
        "a version-3 file's integer hidden is not converted",
    ),
    Mutant(
        "checkpoint-newer-field-missing-from-v4",
        "jaxbirds/checkpoint.py",
        "if version < since.get(name, OLDEST_READ)}",
        "if version <= since.get(name, OLDEST_READ)}",
        "a version-4 file may lack diagnostics_every",
    ),
    Mutant(
        "checkpoint-stats-depth-unchecked",
        "jaxbirds/checkpoint.py",
        "isinstance(stats, tuple) and len(stats) == config.depth and all(",
        "isinstance(stats, tuple) and all(",
        "statistics of the wrong depth are saved silently",
    ),
    Mutant(
        "cli-hidden-one-width",
        "jaxbirds/cli.py",
        '"--hidden": dict(type=positive_int, nargs="+", metavar="H",',
        '"--hidden": dict(type=positive_int, metavar="H",',
        "--hidden takes one width only",
    ),
    Mutant(
        "cli-hidden-list-not-tuple",
        "jaxbirds/cli.py",
        "    return {field: tuple(v) if isinstance(v, list) else v for field, v in values.items() if v is not None}",
        "    return {field: v for field, v in values.items() if v is not None}",
        "a list is not equal to a tuple: resuming with the same --hidden is refused",
    ),
    Mutant(
        "bench-modes-vocabulary",
        "jaxbirds/bench/modes.py",
        "    for name in modes.MODES:\n",
        "    for name in list(modes.MODES)[:4]:\n",
        "the modes study leaves the atomic mode out",
    ),
    Mutant(
        "bench-diagnostics-every",
        "jaxbirds/bench/diagnostics.py",
        "tc = dataclasses.replace(b.train_config, diagnostics_every=k)",
        "tc = dataclasses.replace(b.train_config, diagnostics_every=0)",
        "the diagnostics study's 'on' rows time the loop without diagnostics",
    ),
    Mutant(
        "bench-diagnostics-own-off",
        "jaxbirds/bench/diagnostics.py",
        'off = mine[0]["us_per_step"]',
        'off = (rows or mine)[0]["us_per_step"]',
        "each model's ratio is taken against the first model's 'off'",
    ),
    Mutant(
        "bench-diagnostics-off-always",
        "jaxbirds/bench/diagnostics.py",
        "set(b.config.diagnostics_every) | {0}",
        "set(b.config.diagnostics_every)",
        "no 'off' baseline when the config leaves out 0",
    ),
    Mutant(
        "bench-scaling-every-block",
        "jaxbirds/bench/scaling.py",
        "hidden=(width,) * depth)",
        "hidden=(width,))",
        "the hidden sweep collapses a deep model to one block",
    ),
    Mutant(
        "bench-flops-every-layer",
        "jaxbirds/bench/scaling.py",
        "itertools.pairwise(mc.widths))",
        "itertools.pairwise(mc.widths[:3]))",
        "the model's FLOPs leave out the deeper layers",
    ),
    Mutant(
        "bench-accuracy-tensors",
        "jaxbirds/bench/accuracy.py",
        "for name in (W, gain, bias)",
        "for name in (W, gain)",
        "bnbias is left out of the accuracy study",
    ),
    Mutant(
        "bench-accuracy-legacy-key",
        "jaxbirds/bench/accuracy.py",
        '    renamed=(("median_bngain", "median_bngain1"),),',
        "    renamed=(),",
        "results saved before the renaming leave the bngain1 column empty",
    ),
    Mutant(
        "bench-hidden-reaches-model",
        "jaxbirds/bench/timing.py",
        'widths = {} if hidden is None else {"hidden": tuple(hidden)}',
        "widths = {}",
        "bench.py --hidden is ignored",
    ),
    Mutant(
        "bench-torch-depth",
        "jaxbirds/bench/pytorch.py",
        "if b.model_config.depth != 1:",
        "if b.model_config.depth > 2:",
        "the tutorial's torch loop is run on a model of two blocks",
    ),
    Mutant(
        "bench-product-eval-stats",
        "jaxbirds/bench/evaluation.py",
        "h = model.block(params, layer, h, _RULES, layer_stats)",
        "h = model.block(params, layer, h, _RULES, None)",
        "the product evaluation calibrates with earlier blocks in training mode",
    ),
    Mutant(
        "bench-check-fits",
        "scripts/bench.py",
        "    train.check_fits(b.model_config, b.train_config)  # a --hidden too wide for memory: one error line, now\n",
        "",
        "a model too wide for memory is not refused before the studies run",
    ),
    Mutant(
        "report-provenance-model",
        "jaxbirds/report.py",
        'hidden = results.get("hidden") or model.ModelConfig().hidden',
        "hidden = model.ModelConfig().hidden",
        "the report's provenance line always says hidden 200",
    ),
    Mutant(
        "lesson-checker-lenient",
        "jaxbirds/lesson.py",
        "np.allclose(ours, ref, rtol=1e-5, atol=1e-8)",
        "np.allclose(ours, ref, rtol=1e-1, atol=1e-1)",
        "the notebook's checker passes wrong answers",
    ),
    Mutant(
        "lesson-blank-is-zero",
        "jaxbirds/lesson.py",
        'raise NotWrittenYet(f"a step reads {self._kind}.{name}, which is not written yet")',
        "return 0.0",
        "a blank in an exercise reads as zeros",
    ),
    Mutant(
        "lesson-exact-is-close",
        "jaxbirds/lesson.py",
        "bool(np.array_equal(ours, ref))",
        "bool(np.allclose(ours, ref))",
        "the checker's 'exact' column says approximate",
    ),
    Mutant(
        "diag-saturation-threshold",
        "jaxbirds/diagnostics.py",
        "SATURATION = 0.97",
        "SATURATION = 0.9",
        "the saturation share counts |h| > 0.9 as saturated",
    ),
    Mutant(
        "diag-saturation-ge",
        "jaxbirds/diagnostics.py",
        "jnp.mean(jnp.abs(h) > threshold, dtype=jnp.float32)",
        "jnp.mean(jnp.abs(h) >= threshold, dtype=jnp.float32)",
        "|h| = 0.97 counts as saturated",
    ),
    Mutant(
        "diag-update-is-the-gradient",
        "jaxbirds/train.py",
        "diagnostics.record(steps[i], params, grads, updates, Xs[i], Ys[i])",
        "diagnostics.record(steps[i], params, grads, grads, Xs[i], Ys[i])",
        "the update-to-data ratio reads the gradient (no learning rate)",
    ),
    Mutant(
        "diag-update-wrong-param",
        "jaxbirds/diagnostics.py",
        "jnp.log10(jnp.stack([std_ratio(updates[name], params[name]) for name in names]))",
        'jnp.log10(jnp.stack([std_ratio(updates[name], params["b" + name[1:]]) for name in names]))',
        "the update ratio divides by the std of the wrong parameter",
    ),
    Mutant(
        "diag-grad-std-wrong-block",
        "jaxbirds/diagnostics.py",
        "grad_std=per_block(jnp.std, dh),",
        "grad_std=per_block(jnp.std, dh[::-1]),",
        "a block's gradient statistics are read from another block",
    ),
    Mutant(
        "diag-saturation-wrong-block",
        "jaxbirds/diagnostics.py",
        "saturation=per_block(saturation_share, h),",
        "saturation=per_block(saturation_share, h[::-1]),",
        "a block's saturation is read from another block",
    ),
    Mutant(
        "diag-first-misaligned",
        "jaxbirds/train.py",
        "first = (-start) % every",
        "first = start % every",
        "a chunk starting between two records records the wrong steps",
    ),
    Mutant(
        "diag-step-twice",
        "jaxbirds/train.py",
        "return train_steps(i + 1, i + every, carry), log",
        "return train_steps(i, i + every, carry), log",
        "the recording step trains twice",
    ),
    Mutant(
        "diag-past-stop",
        "jaxbirds/train.py",
        "live = jnp.clip(stop - start, 0, length)",
        "live = jnp.int32(length)",
        "steps past the chunk's stop are recorded and trained",
    ),
    Mutant(
        "diag-records-per-chunk",
        "jaxbirds/diagnostics.py",
        "return (length - 1) // every + 1",
        "return length // every + 0",
        "a chunk has too few rows for its records",
    ),
    Mutant(
        "modes-tutorial-as-a-mode",
        "jaxbirds/modes.py",
        "for rules in model.RULE_SETS.values() if rules.jax_grad_mode]",
        "for rules in model.RULE_SETS.values()]",
        "jax.grad through the tutorial's steps becomes a gradient mode and a checker table of its own",
    ),
    Mutant(
        "trainconfig-modes-frozen-at-import",
        "jaxbirds/train.py",
        "if self.grad_mode not in modes.MODES:",
        "if self.grad_mode not in GRAD_MODES:",
        "a rule set registered after import cannot be trained",
    ),
]


def run_suite(timeout: float, tests: list[str]) -> tuple[str, float]:
    """Run the default suite, stopping at the first failure, then, if it passed, the slow tests:
    ``("SURVIVED" | "killed" | "killed (slow)" | "timed out", seconds)``.

    The slow tests are part of the suite (CI runs them too); a mutant only they kill
    is reported as such, so that a test's move to ``slow`` shows in this list. A
    time-out is reported as such, not as a kill: it may be a mutant that hangs
    (caught) or a survivor on a slow machine (not caught). Raise ``--timeout`` to
    tell which.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's package, even beside an editable install
    t0 = time.perf_counter()
    for selection, verdict in ((), "killed"), (("-m", "slow"), "killed (slow)"):
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider", *selection, *tests],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timed out", time.perf_counter() - t0
        if proc.returncode not in (0, 5):  # 5: the selection holds no test (e.g. --tests without slow ones)
            return verdict, time.perf_counter() - t0
    return "SURVIVED", time.perf_counter() - t0


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
