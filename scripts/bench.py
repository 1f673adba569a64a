#!/usr/bin/env python
"""JIT performance studies of the training step; prints markdown tables, saves JSON (and PNGs).

Studies: dispatch (eager / jit per step / scan chunks), gradient modes, what XLA
compiled (FLOPs, bytes, kernels), scaling (batch, hidden, float64), many models
with vmap, the tutorial's PyTorch loop when torch is installed, compile time per
gradient mode and chunk length, start-up (scripts/train.py twice, with an
empty and then a warm compilation cache), calibration and evaluation after
training (the embedded-input product against lookup tables), and the per-step
diagnostics recorded inside the training loop against none. Times are medians of
several runs after a warm-up, measured side by side in this process.

Every study measures one model: the tutorial's (one hidden block of 200) or, with
--hidden 100 100 100 100, four blocks (any depth); a sweep over the hidden width
gives each width to every block.

--report FILE writes the tables of the studies that ran into FILE's marked blocks
(<!-- bench:NAME --> ... <!-- /bench:NAME -->; see jaxbirds/report.py), each with the
command, machine and date that produced it: docs/performance.md is kept that way.
--from-json re-renders saved results (tables, figures) without measuring.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxbirds import bench, cli, data, model, outputs, plots, report, train
from jaxbirds.bench.timing import environment
from jaxbirds.errors import ConfigError


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes: the whole suite in under a minute")
    p.add_argument("--only", nargs="+", choices=list(bench.STUDIES), help="run only these studies (default: all)")
    p.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="where to save all rows (default bench-results/bench.json)",
    )
    figures = ", ".join(bench.FIGURES.values())
    p.add_argument(
        "--plot", type=Path, metavar="DIR", help=f"also write the figures of the studies run into DIR: {figures}"
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="FILE.md",
        help="write the tables of the studies run into FILE's <!-- bench:NAME --> blocks (checked before measuring)",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="JSON",
        help="measure nothing: render the results saved in JSON (by an earlier run) with --report and/or --plot",
    )
    p.add_argument("--data", type=Path, default=data.DEFAULT_DATA_PATH, help="bird names (default: the shipped file)")
    default = model.ModelConfig().hidden
    p.add_argument(
        "--hidden",
        type=cli.positive_int,
        nargs="+",
        metavar="W",
        help="the width of each hidden block of the model every study measures, first to last (default "
        f"{cli.widths(default)}: the tutorial's; 100 100 100 100 is four blocks); sweeps over the width give "
        "it to every block",
    )
    args = p.parse_args(argv)
    if args.from_json and not (args.report or args.plot):
        p.error("--from-json needs --report FILE.md or --plot DIR: what to render the saved results into")
    if args.from_json and (args.quick or args.hidden):
        p.error("--from-json measures nothing: --quick and --hidden have no effect with it")
    args.hidden = tuple(args.hidden or default)
    return args


def render_saved(args, argv) -> int:
    """--from-json: the tables and figures of results saved by an earlier run, without measuring."""
    try:
        results = json.loads(args.from_json.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read saved results {args.from_json}: {getattr(err, 'strerror', None) or err}"
        ) from None
    saved = [name for name in bench.STUDIES if name in results]
    missing = [name for name in args.only or () if name not in results]
    if missing:
        raise ConfigError(f"{args.from_json} has no results for {', '.join(missing)} (it has {', '.join(saved)})")
    names = args.only or saved
    check_outputs(args, names)
    if args.plot:
        print(wrote_figures(bench.plot_results({k: results[k] for k in names}, args.plot)))
    if args.report:
        filled = report.update_file(args.report, results, names, rendered_by=report.command_line(argv))
        print(f"wrote the tables of {', '.join(filled) or 'no study'} into {args.report}")
    return 0


def wrote_figures(paths) -> str:
    """What --plot wrote: the figures' paths, or that none of the studies has one."""
    return "wrote " + ", ".join(map(str, paths)) if paths else "wrote no figure: none of these studies draws one"


def check_outputs(args, names) -> None:
    """Before any work: the report holds a block for each study in ``names`` and can be written; plots can
    be drawn and their directory written."""
    if args.report:
        report.check_file(args.report, names)
        outputs.check_writable_file(args.report)
    if args.plot:
        plots.require()
        outputs.check_writable_dir(args.plot)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json:
        return render_saved(args, argv)
    only = args.only or list(bench.STUDIES)
    outputs.check_writable_file(args.json)  # before the suite, not after it
    check_outputs(args, only)
    t0 = time.perf_counter()
    config = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    b = bench.Bench(data.load_dataset(args.data), config, args.hidden)
    train.check_fits(b.model_config, b.train_config)  # a --hidden too wide for memory: one error line, now
    env = environment()
    print(f"# jaxbirds benchmarks{' (quick)' if args.quick else ''}: {cli.describe_hidden(args.hidden)}\n")
    print("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n", flush=True)
    results: dict = {
        "environment": env,
        "quick": args.quick,
        "hidden": list(args.hidden),
        "command": report.command_line(argv),
        "date": report.timestamp(),
        "study_seconds": {},
        "notes": {},
    }

    clock = [time.perf_counter()]

    def record(study, rows, note):
        results[study.name] = rows
        if note:
            results["notes"][study.name] = note
        print(f"## {study.title}\n")
        print(study.table(rows) if rows else f"(skipped: {note})")
        now = time.perf_counter()
        results["study_seconds"][study.name] = now - clock[0]
        print(f"\n({study.name}: {now - clock[0]:.0f} s, compiles included)\n", flush=True)
        clock[0] = now

    measured: dict[str, list] = {}  # every study's rows, those run only because another needs them included
    for study in bench.plan(only):
        rows, note = study.measure(b, measured)
        measured[study.name] = rows
        if study.name in only:
            record(study, rows, note)

    results["seconds"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"saved {args.json}; the suite took {results['seconds']:.0f} s")
    if args.plot:
        print(wrote_figures(bench.plot_results(results, args.plot)))
    if args.report:
        filled = report.update_file(args.report, results, only)
        print(f"wrote the tables of {', '.join(filled) or 'no study'} into {args.report}")
        for name in (name for name in only if name not in filled):
            print(f"left the {name} block as it was: {results['notes'].get(name, 'no rows')}")
    return 0


if __name__ == "__main__":
    cli.split_host_into_devices()  # one device per core, for the many-models study
    cli.exit_process(cli.run(main))
