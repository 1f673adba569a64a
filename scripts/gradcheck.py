#!/usr/bin/env python
"""Check every hand-written gradient against jax.grad on a real batch of bird names.

Prints one table per gradient mode and layer, each against jax.grad of the
model that trains (the atomic manual pass, the fused manual pass, jax.grad
through the custom_vjp rules, and through the custom_jvp rules, which JAX
transposes), then all of them side by side, and runs finite-difference checks
of the custom rules in float64, at the run's own --batch-size and each --hidden
width and at two fixed shapes whose batch and hidden differ. --hidden 64 32 16
checks a model of three blocks. Exits 1 if any tensor is outside tolerance, if a finite-
difference check fails, or, in float32 on CPU (where it is claimed), if the
atomic pass is not bitwise equal to jax.grad on every tensor. --show-jaxpr prints the backward
pass of batch norm under each rule set, to see what the hand-written rules remove.

A tensor passes when max|ours - ref| <= rtol * max|ref| + 16 * N, where N is the
rounding noise on that tensor, the larger of jax.grad's and the mode's own,
each the largest float32-vs-float64 difference over 8 variants of the problem
(rows permuted, parameters nudged by a few ulps); rtol is 1e-5 in float32 and
1e-10 in float64. See jaxbirds/gradcheck.py for why. At batch 2 the gradients
below batch norm are rounding noise and no check can see an error in them.
Matrix products run at full precision (no TF32 on GPUs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxbirds import cli, data, finite_differences, gradcheck, memory, model, plots, runner
from jaxbirds.manual import fused_backward

#: What each gradient mode's table is headed.
TITLES = {
    "atomic": "atomic manual backward vs jax.grad",
    "manual": "fused manual backward vs jax.grad",
    "custom_vjp": "custom_vjp rules vs jax.grad",
    "custom_jvp": "custom_jvp rules, transposed by JAX, vs jax.grad",
}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="precision of parameters and arithmetic (default: float32)",
    )
    parser.add_argument(
        "--batch-size", type=cli.batch_size, default=32, help="examples in the batch (>= 2; default 32)"
    )
    parser.add_argument(
        "--hidden",
        type=cli.positive_int,
        nargs="+",
        default=[64],
        metavar="WIDTH",
        help="each block's hidden units: one width per block (default 64, as in the tutorial's check)",
    )
    parser.add_argument("--embedding", type=cli.positive_int, default=10, help="embedding size (default 10)")
    parser.add_argument("--seed", type=cli.seed, default=0, help="seed for the parameters and the batch (default 0)")
    parser.add_argument(
        "--data", type=Path, default=data.DEFAULT_DATA_PATH, help="bird names file (default: the shipped one)"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write dlogits.png and tolerances.png into DIR")
    parser.add_argument(
        "--show-jaxpr",
        action="store_true",
        help="print batch norm's backward jaxpr under each rule set, with its equation count",
    )
    cli.add_compile_cache_option(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.use_compile_cache(args)
    if args.plot:
        plots.require()
        runner.check_writable_dir(args.plot)
    dataset = data.load_dataset(args.data)
    with jax.enable_x64(args.dtype == "float64"):
        config, params, X, Y, fd_key = make_problem(args, dataset)
        tol = gradcheck.tolerance_for(params["W1"].dtype)
        print(f"{dataset.summary()}")
        print(
            f"model: {model.param_count(params):,} parameters ({cli.describe_hidden(config.hidden)}), "
            f"batch {args.batch_size}, {args.dtype}, tolerance rtol {tol.rtol:g} of max|ref| + "
            f"{tol.noise_multiple:g} x the measured noise; loss {float(jax.jit(model.loss)(params, X, Y)):.4f}\n"
        )
        by_mode = gradcheck.all_tables(params, X, Y, tol)
        tables = {TITLES.get(mode, f"{mode} vs jax.grad"): rows for mode, rows in by_mode.items()}
        print_tables(by_mode, tables, config.depth)
        if args.show_jaxpr:
            for rules, jaxpr in gradcheck.backward_jaxprs(dtype=params["W1"].dtype).items():
                print(f"### batch norm's backward pass, {rules}: {len(jaxpr.jaxpr.eqns)} equations\n")
                print(f"```\n{jaxpr}\n```\n")
        widths = sorted(set(config.hidden))
        users = [finite_differences.FDShape(args.batch_size, width, dataset.vocab.size) for width in widths]
        fd_ok = check_finite_differences(fd_key, (*users, *finite_differences.FD_SHAPES))
        if args.plot:
            dlogits = np.asarray(jax.jit(fused_backward)(params, X, Y).inner["logits"])
            written = [
                plots.dlogits_heatmap(dlogits, np.asarray(Y), dataset.vocab.chars, args.plot / "dlogits.png"),
                plots.tolerance_bars(tables, args.plot / "tolerances.png"),
            ]
            print("wrote " + ", ".join(map(str, written)))
    return verdict(args.dtype, by_mode, tables, fd_ok)


def make_problem(args, dataset):
    """The model of ``--hidden`` and ``--embedding`` at its initialisation, a batch of the training split
    and a key for the finite differences, all from ``--seed``; refused up front if it cannot fit in memory."""
    dtype = jnp.dtype(args.dtype)
    config = model.ModelConfig(
        vocab_size=dataset.vocab.size,
        context_size=dataset.context_size,
        embedding_dim=args.embedding,
        hidden=tuple(args.hidden),
    )
    # ~60 activations or gradients of (batch, hidden + vocabulary) values are alive in the checks, per block
    memory.require(
        60 * args.batch_size * (sum(config.hidden) + dataset.vocab.size) * dtype.itemsize
        + 8 * model.param_count_for(config) * dtype.itemsize,
        f"checking a batch of {args.batch_size:,} at {cli.describe_hidden(config.hidden)}",
        "use a smaller --batch-size or --hidden",
    )
    param_key, batch_key, fd_key = jax.random.split(jax.random.key(args.seed), 3)
    params = model.init_params(param_key, config, dtype)
    ix = np.asarray(jax.random.randint(batch_key, (args.batch_size,), 0, len(dataset.train)))
    return config, params, jnp.asarray(dataset.train.X[ix]), jnp.asarray(dataset.train.Y[ix]), fd_key


def print_tables(by_mode: dict, tables: dict, depth: int) -> None:
    """Each mode's table, one per layer, then all of them side by side."""
    for title, rows in tables.items():
        for part, group in gradcheck.by_layer(rows, depth).items():
            print(gradcheck.format_table(group, f"{title}: {part}"), end="\n\n")
    title = f"all {len(by_mode)} against jax.grad (max diff / allowed; below 1 passes)"
    print(gradcheck.summary_table(by_mode, title), end="\n\n")


def check_finite_differences(key, shapes) -> bool:
    """The finite-difference check of every hand-written rule at ``shapes``, printed; whether it passed."""
    try:
        finite_differences.check_rules(key, shapes)
    except AssertionError as err:
        print(f"finite differences: FAILED\n{err}")
        return False
    shapes_text = ", ".join(f"{s.batch}x{s.hidden} (classes {s.classes})" for s in shapes)
    print(
        "finite differences (jax.test_util.check_grads, float64; custom_vjp in reverse mode, custom_jvp in "
        f"forward and reverse mode) at batch x hidden {shapes_text}: cross_entropy ok, batch_norm ok"
    )
    return True


def verdict(dtype: str, by_mode: dict, tables: dict, fd_ok: bool) -> int:
    """The run's exit code, with its notes: 1 if a tensor is outside tolerance, the finite differences
    failed, or the atomic pass is not bitwise equal where that is claimed; else 0."""
    bad = [f"{title}: {row.name}" for title, rows in tables.items() for row in rows if not row.close]
    backend = jax.default_backend()
    bitwise_claimed = gradcheck.atomic_bitwise_claimed(dtype, backend)
    not_bitwise = gradcheck.not_bitwise(by_mode["atomic"])
    if bitwise_claimed and not_bitwise:
        bad.append(
            f"atomic manual backward not bitwise equal to jax.grad (claimed in {dtype} on {backend}): "
            + ", ".join(not_bitwise)
        )
    print(
        "\nnote: the gradients of each block's b and of logit_maxes are exactly zero in exact arithmetic (batch "
        "norm removes the mean; softmax ignores a shift), so both sides hold rounding noise there; the 'ref noise' "
        "column is how far jax.grad itself (or the mode, if noisier) lands from the float64 answer (the largest "
        f"of {gradcheck.NOISE_SAMPLES} samples), and sets the tolerance there."
    )
    if not bitwise_claimed:
        print(
            f"note: in {dtype} on {backend} the atomic pass is checked to tolerance only; it is claimed bitwise "
            f"equal to jax.grad in float32 on cpu ({len(not_bitwise)} of its tensors differ here)."
        )
    if bad or not fd_ok:
        print("FAILED: " + "; ".join(bad + ([] if fd_ok else ["finite differences"])), file=sys.stderr)
        return 1
    exact = sum(row.exact for rows in tables.values() for row in rows)
    total = sum(len(rows) for rows in tables.values())
    claim = f", the atomic pass's {len(by_mode['atomic'])} all bitwise equal to jax.grad" if bitwise_claimed else ""
    print(f"OK: all {total} tensors within tolerance, {exact} of them bitwise equal to jax.grad{claim}.")
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
