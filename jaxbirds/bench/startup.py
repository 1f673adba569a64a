"""Start-up: ``scripts/train.py`` run twice in fresh processes sharing one new compilation cache, cold then warm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxbirds import cli, plots
from jaxbirds.bench.study import Figure, Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "train.py"

#: The columns of a row that are not a phase outside training (the figure stacks the phases).
TOTALS = ("run", "wall_s", "train_s", "outside_s", "wall_minus_train_s")


def train_script_missing(b: Bench | None = None) -> str | None:
    """Why the study cannot run here (an installed package has no ``scripts/``), or ``None``; any model will do."""
    if not TRAIN_SCRIPT.is_file():
        return f"{TRAIN_SCRIPT} is not there (an installed package has no scripts/)"
    return None


def startup_study(b: Bench) -> list[Row]:
    """``scripts/train.py`` (the tutorial's recipe, ``startup_steps`` steps, the bench's model) run twice, each
    in a fresh process, sharing one new persistent compilation cache: the first compiles and fills it, the second
    loads from it. Each row is one run's wall time, training time and its phases outside training,
    as the script itself measured them (``metrics.json``); "unaccounted" is the rest of the wall
    time (the interpreter's start and exit, argument parsing, writing metrics.json, the host work
    between chunks). Needs the script (see :func:`train_script_missing`).

    Returns:
        Two rows: ``run``, ``wall_s``, ``train_s``, ``wall_minus_train_s``, ``outside_s``, one column per
        phase (seconds), ``unaccounted``.
    """
    rows = []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        for i, run in enumerate(("first (empty cache)", "second (warm cache)")):
            args = [sys.executable, str(TRAIN_SCRIPT), "--steps", str(b.config.startup_steps), "--out", f"{out}/{i}",
                    "--hidden", *map(str, b.model_config.hidden)]  # fmt: skip
            # as a user starts it: without the host devices bench.py itself asked for (cli.split_host_into_devices)
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(cli.HOST_DEVICES_FLAG)]
            env = {**os.environ, "JAXBIRDS_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": " ".join(flags)}
            t0 = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True, env=env)
            wall = time.perf_counter() - t0
            timing = json.loads(Path(f"{out}/{i}/metrics.json").read_text())["timing"]
            phases = timing["outside_training"]
            measured = sum(phases.values())
            rows.append({"run": run, "wall_s": wall, "train_s": timing["train_seconds"],
                         "wall_minus_train_s": wall - timing["train_seconds"], "outside_s": measured, **phases,
                         "unaccounted": wall - timing["train_seconds"] - measured})  # fmt: skip
    return rows


def draw(rows: Sequence[Row], path: Path) -> Path:
    """Each run's seconds outside training, one stacked bar per run, one colour per phase."""
    phases = [k for k in rows[0] if k not in TOTALS]
    fig, ax = plots.subplots(figsize=(8, 3.6))
    left = np.zeros(len(rows))
    for phase in phases:
        values = np.array([r.get(phase, 0.0) for r in rows])
        ax.barh([r["run"] for r in rows], values, left=left, label=phase)
        left += values
    ax.set_xlabel("seconds of wall time outside training")
    ax.set_title("scripts/train.py: time outside training, empty then warm compilation cache")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return plots.save_png(fig, path)


STUDY = Study(
    name="startup",
    title="scripts/train.py twice, fresh processes, one new compilation cache (seconds)",
    columns=(
        ("run", "run", ""),
        ("wall_s", "wall", ".1f"),
        ("train_s", "training", ".1f"),
        ("wall_minus_train_s", "wall − training", ".2f"),
        ("outside_s", "phases measured", ".2f"),
        ("imports", "imports", ".2f"),
        ("data and initialisation", "data + init", ".2f"),
        ("compile", "compile", ".2f"),
        ("calibration and evaluation", "calibrate + evaluate", ".2f"),
        ("sampling", "sampling", ".2f"),
        ("plot", "plot", ".2f"),
        ("saving", "saving", ".2f"),
        ("waiting for checkpoints", "checkpoint wait", ".2f"),
        ("unaccounted", "unaccounted", ".2f"),
    ),
    run=startup_study,
    figure=Figure("startup.png", draw),
    skip_reason=train_script_missing,
)
