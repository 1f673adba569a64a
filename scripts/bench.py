#!/usr/bin/env python
"""JIT performance studies of the training step; prints markdown tables, saves JSON (and PNGs).

Studies: dispatch (eager / jit per step / scan chunks), gradient modes, what XLA
compiled (FLOPs, bytes, kernels), scaling (batch, hidden, float64), many models
with vmap, the tutorial's PyTorch loop when torch is installed, compile time per
gradient mode and chunk length, and start-up (scripts/train.py twice, with an
empty and then a warm compilation cache). Times are medians of several runs after
a warm-up, measured side by side in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jaxbirds import bench, cli, data, plots, runner

STUDIES = ("dispatch", "modes", "xla", "scaling", "vmap", "torch", "accuracy", "memory", "compile", "startup")


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes: the whole suite in under a minute")
    p.add_argument("--only", nargs="+", choices=STUDIES, default=list(STUDIES), help="run only these studies")
    p.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="where to save all rows (default bench-results/bench.json)",
    )
    p.add_argument("--plot", type=Path, metavar="DIR", help="also write dispatch.png, scaling.png, vmap.png into DIR")
    p.add_argument("--data", type=Path, default=data.DEFAULT_DATA_PATH, help="bird names (default: the shipped file)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runner.check_writable_file(args.json)  # before the suite, not after it
    if args.plot:
        plots.require()
        runner.check_writable_dir(args.plot)
    t0 = time.perf_counter()
    config = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    b = bench.Bench(data.load_dataset(args.data), config)
    env = bench.environment()
    print(f"# jaxbirds benchmarks{' (quick)' if args.quick else ''}\n")
    print("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n", flush=True)
    results: dict = {"environment": env, "quick": args.quick}

    clock = [time.perf_counter()]

    def report(name, rows, note=None):
        results[name] = rows
        title, columns = bench.TABLES[name]
        print(f"## {title}\n")
        print(bench.markdown_table(rows, columns) if rows else f"(skipped: {note})")
        now = time.perf_counter()
        print(f"\n({name}: {now - clock[0]:.0f} s, compiles included)\n", flush=True)
        clock[0] = now

    if "dispatch" in args.only:
        report("dispatch", bench.dispatch_study(b))
    if "modes" in args.only or "xla" in args.only:
        modes = bench.modes_study(b)
        if "modes" in args.only:
            report("modes", modes)
        if "xla" in args.only:
            report("xla", bench.xla_study(b, modes))
    if "scaling" in args.only:
        report("scaling", bench.scaling_study(b))
    if "vmap" in args.only:
        report("vmap", bench.vmap_study(b))
    if "torch" in args.only:
        best = max((r["steps_per_s"] for r in results.get("dispatch", []) if r["variant"] == "scan"), default=None)
        rows, note = bench.torch_study(b, best)
        report("torch", rows, note)
    if "accuracy" in args.only:
        report("accuracy", bench.accuracy_study(b))
    if "memory" in args.only:
        report("memory", bench.memory_study(b))
    if "compile" in args.only:
        report("compile", bench.compile_study(b))
    if "startup" in args.only:
        rows, note = bench.startup_study(b)
        report("startup", rows, note)

    results["seconds"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"saved {args.json}; the suite took {results['seconds']:.0f} s")
    if args.plot:
        print("wrote " + ", ".join(map(str, bench.plot_results(results, args.plot))))
    return 0


if __name__ == "__main__":
    cli.split_host_into_devices()  # one device per core, for the many-models study
    cli.exit_process(cli.run(main))
