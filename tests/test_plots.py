"""The figures are drawn without pyplot: the library leaves the caller's matplotlib backend alone."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from test_gradcheck import load_script

from jaxbirds import bench

pytest.importorskip("matplotlib")

# Run in a fresh interpreter: pyplot must not be imported, and the backend stays the one the caller chose
# ("svg", not Agg, so that a library switching to Agg shows). Tiny inputs for every figure of the package.
DRAW_EVERY_FIGURE = """
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
import numpy as np
from jaxbirds import bench, gradcheck, plots

out = Path(sys.argv[1])
plots.preload()
rows = [gradcheck.Row("W1", (2, 2), False, True, 1e-7, 1e-5, 1.0, 1e-8),
        gradcheck.Row("b2", (2,), True, True, 0.0, 1e-5, 1.0, 1e-8)]
written = [
    plots.dlogits_heatmap(np.array([[0.1, -0.1], [-0.2, 0.2]]), np.array([1, 0]), ["a", "b"], out / "dlogits.png"),
    plots.tolerance_bars({"fused": rows}, out / "tolerances.png"),
    plots.loss_curve(np.linspace(3.0, 2.0, 20), out / "loss.png", window=5),
    plots.sweep_figure([{"learning_rate": 0.1, "dev_mean": 2.0, "dev_std": 0.1}],
                       [{"learning_rate": 0.1, "diverged_at": None, "loss": {"dev": 2.0}}],
                       np.linspace(3.0, 2.0, 20)[None], out / "sweep.png", window=5),
]
scan = {"variant": "scan", "chunk": 10, "unroll": 1, "steps_per_s": 2.0}
results = {
    "dispatch": [{"variant": "jit", "chunk": 1, "unroll": 1, "steps_per_s": 1.0}, scan],
    "scaling": [{"sweep": s, "value": v, "gflops_per_s": 1.0} for s in ("batch", "hidden") for v in (32, 64)],
    "vmap": [{"variant": "single-model loop", "devices": 1, "models": 1, "model_steps_per_s": 1.0},
             {"variant": "sweep", "devices": 1, "models": 2, "model_steps_per_s": 1.5}],
    "accuracy": [{"point": "init", "batch": 32, "mode": m, "median_rel_error": 1e-7} for m in ("a", "b")],
    "memory": [{"mode": "autodiff", "hidden": 16, "batch": b, "peak_bytes": 1000 * b} for b in (32, 64)],
    "startup": [{"run": r, "wall_s": 2.0, "train_s": 1.0, "outside_s": 0.9, "wall_minus_train_s": 1.0,
                 "imports": 0.5, "compile": 0.4} for r in ("first", "second")],
}
written += bench.plot_results(results, out / "bench")
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules,
                  "written": [str(p) for p in written]}))
"""


@pytest.mark.slow
def test_every_figure_is_a_png_drawn_without_touching_the_backend_or_pyplot(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", DRAW_EVERY_FIGURE, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    drawn = json.loads(done.stdout.splitlines()[-1])
    assert drawn["backend"] == "svg" and not drawn["pyplot"]
    names = [p.split("/")[-1] for p in drawn["written"]]
    assert names == ["dlogits.png", "tolerances.png", "loss.png", "sweep.png", *bench.FIGURES.values()]
    for path in drawn["written"]:
        with open(path, "rb") as f:
            png = f.read()
        assert png.startswith(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR") and png.endswith(b"IEND\xaeB`\x82"), path
        assert len(png) > 1000, path  # a drawn figure, not an empty image


def test_the_bench_help_names_every_figure_plot_results_writes(capsys):
    """scripts/bench.py --plot's help lists bench.FIGURES, the names plot_results writes (the test above
    holds it to them)."""
    with pytest.raises(SystemExit):
        load_script("bench").parse_args(["--help"])
    plot_help = " ".join(capsys.readouterr().out.split("--plot DIR")[-1].split("--report")[0].split())
    assert len(bench.FIGURES) == 6 and all(name in plot_help for name in bench.FIGURES.values()), plot_help
