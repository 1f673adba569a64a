"""Smoke test of the benchmark suite (speed itself is never asserted: it is measured, in scripts/bench.py)."""

import json
import math

from test_gradcheck import load_script

from jaxbirds import bench


def test_quick_cli_runs_the_gradient_mode_studies_and_saves_json(tmp_path, capsys):
    """The --quick path through the CLI, limited to the studies the report leans on most (modes, XLA,
    the torch reference or its skip note): the full --quick run is a minute of compiling on 2 cores."""
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--only", "modes", "xla", "torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("modes", "xla", "torch"):
        assert f"## {bench.TABLES[name][0]}" in printed
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["environment"]["jax"]
    assert [r["mode"] for r in saved["modes"]] == ["autodiff", "custom_vjp", "manual (fused)", "manual (atomic)"]
    assert all(r["us_per_step"] > 0 and math.isfinite(r["us_per_step"]) for r in saved["modes"])
    assert all(r["flops"] > 0 and r["kernels"] >= r["fusions"] > 0 for r in saved["xla"])


def test_model_flops_counts_six_matmuls():
    config = bench.ModelConfig(vocab_size=29, hidden=200)
    assert bench.model_flops(config, 32) == 2 * 3 * (32 * 30 * 200 + 32 * 200 * 29)


def test_markdown_table_formats_numbers_and_spreads():
    rows = [{"a": "x", "b": 1234.5, "c": (1.0, 2.0)}]
    table = bench.markdown_table(rows, [("a", "A", ""), ("b", "B", ",.0f"), ("c", "C", ".1f")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 1,234 | 1.0–2.0 |"]
