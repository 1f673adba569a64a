"""Smoke test of the benchmark suite (speed itself is never asserted: it is measured, in scripts/bench.py)."""

import json
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_gradcheck import load_script

from jaxbirds import bench, model, report, train
from jaxbirds.errors import OutputError


@pytest.mark.slow
def test_quick_cli_runs_the_gradient_mode_studies_and_saves_json(tmp_path, capsys):
    """The --quick path through the CLI, limited to the gradient modes and the torch reference (or its
    skip note): the full --quick run is a minute of compiling on 2 cores. What XLA compiled is
    checked below, one compiled step per mode."""
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--only", "modes", "torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("modes", "torch"):
        assert f"## {bench.TABLES[name][0]}" in printed
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["environment"]["jax"]
    assert [r["mode"] for r in saved["modes"]] == [
        "autodiff",
        "custom_vjp",
        "custom_jvp",
        "manual (fused)",
        "manual (atomic)",
    ]
    assert all(r["us_per_step"] > 0 and math.isfinite(r["us_per_step"]) for r in saved["modes"])


def matmul_flops_in_jaxpr(jaxpr) -> float:
    """2 x (output size) x (contracted size) for every dot_general of a jaxpr, sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            contracted = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += matmul_flops_in_jaxpr(sub)
    return total


@pytest.mark.parametrize("hidden, batch", [(200, 32), (64, 7)])
def test_model_flops_equals_the_matmuls_jax_grad_really_traces(hidden, batch):
    """Counted from the program, not from the formula: every dot_general of value_and_grad."""
    config = bench.ModelConfig(vocab_size=29, hidden=hidden)
    params = model.init_params(jax.random.key(0), config)
    X, Y = jnp.zeros((batch, 3), jnp.int32), jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(model.loss))(params, X, Y).jaxpr
    assert bench.model_flops(config, batch) == matmul_flops_in_jaxpr(jaxpr)


@pytest.mark.parametrize("mode", train.GRAD_MODES)
def test_the_compiled_step_holds_six_matrix_products(mode):
    """The XLA study's "dots" column counts matrix products (2 forward, 4 backward), not the
    reduction fusions that share a kernel kind with them."""
    tc = train.TrainConfig(grad_mode=mode)
    params, opt_state, _ = train.init_state(bench.ModelConfig(vocab_size=29, hidden=64), tc)
    X, Y = jnp.zeros((32, 3), jnp.int32), jnp.zeros((32,), jnp.int32)
    step = jax.jit(bench._single_step(train.loss_and_grads_fn(mode), tc))
    compiled = step.lower(params, opt_state, X, Y).compile()
    summary = bench.hlo_summary(compiled)
    assert summary["dots"] == 6 and summary["kernels"] >= summary["fusions"] > 0
    assert bench.cost(compiled)["flops"] >= bench.model_flops(bench.ModelConfig(vocab_size=29, hidden=64), 32)


def test_an_unwritable_json_path_is_refused_before_the_suite_runs(tmp_path, capsys):
    from jaxbirds import cli

    code = cli.run(load_script("bench").main, ["--quick", "--only", "modes", "--json", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "is a directory" in captured.err and "##" not in captured.out


def test_markdown_table_formats_numbers_and_spreads():
    rows = [{"a": "x", "b": 1234.5, "c": (1.0, 2.0)}]
    table = bench.markdown_table(rows, [("a", "A", ""), ("b", "B", ",.0f"), ("c", "C", ".1f")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 1,234 | 1.0–2.0 |"]


@pytest.mark.slow
def test_the_accuracy_harness_finds_a_less_accurate_variance(dataset, monkeypatch):
    """Batch norm's variance as E[x^2] - E[x]^2 cancels catastrophically in float32 when the mean is
    large beside the spread (here hprebn shifted by 300): the harness must rank it far worse."""
    params = model.init_params(jax.random.key(0), bench.ModelConfig(vocab_size=29, hidden=32))
    params = {**params, "b1": params["b1"] + 300.0}
    rows = np.random.default_rng(0).integers(0, len(dataset.train), (3, 32))
    batches = [(jnp.asarray(dataset.train.X[r]), jnp.asarray(dataset.train.Y[r])) for r in rows]

    def plain(p, X, Y):
        return jax.grad(model.loss)(p, X, Y)

    good = bench.gradient_errors({"plain": plain}, params, batches)["plain"]

    def naive_batch_norm(x, gain, bias, eps=1e-5, tap=None):
        n = x.shape[0]
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = (jnp.mean(x * x, axis=0, keepdims=True) - mean**2) * n / (n - 1)
        return gain * (x - mean) * jax.lax.rsqrt(var + eps) + bias

    monkeypatch.setattr(model.ops, "batch_norm", naive_batch_norm)

    def naive(p, X, Y):
        return jax.grad(model.loss)(p, X, Y)

    bad = bench.gradient_errors({"naive": naive}, params, batches)["naive"]
    assert np.median(bad["W1"]) > 100 * np.median(good["W1"])
    assert np.median(good["W1"]) < 1e-4  # the shift itself costs float32 digits: hprebn is ~300 +- 2


@pytest.mark.slow
def test_the_memory_study_reports_what_the_compiled_program_says(dataset):
    config = bench.BenchConfig(repeats=1, steps=50, memory_batches=(32, 256), memory_hiddens=(16,))
    b = bench.Bench(dataset, config)
    rows = bench.memory_study(b)
    assert {r["mode"] for r in rows} == {*train.GRAD_MODES, "autodiff + jax.checkpoint"}
    tc = train.TrainConfig(grad_mode="custom_vjp")
    params, opt_state, _ = train.init_state(bench.ModelConfig(vocab_size=29, hidden=16), tc)
    step = jax.jit(bench._single_step(train.loss_and_grads_fn("custom_vjp"), tc))
    analysis = step.lower(params, opt_state, b.X[:256], b.Y[:256]).compile().memory_analysis()
    row = next(r for r in rows if r["mode"] == "custom_vjp" and r["batch"] == 256)
    assert (row["temp_bytes"], row["argument_bytes"]) == (analysis.temp_size_in_bytes, analysis.argument_size_in_bytes)
    small = next(r for r in rows if r["mode"] == "custom_vjp" and r["batch"] == 32)
    assert row["temp_bytes"] > small["temp_bytes"] and row["residual_bytes"] > small["residual_bytes"]
    # what custom_vjp keeps is its rule's residuals (x_hat, s) and the softmax, fewer than autodiff's
    autodiff = next(r for r in rows if r["mode"] == "autodiff" and r["batch"] == 256)
    assert row["residuals"] < autodiff["residuals"]


@pytest.mark.slow  # two training processes; tests/test_train_cli.py checks the cache itself
def test_startup_runs_the_script_twice_and_the_second_run_finds_the_cache(dataset, tmp_path, monkeypatch):
    b = bench.Bench(dataset, bench.BenchConfig(startup_steps=100))
    rows, note = bench.startup_study(b)
    assert note is None and [r["run"] for r in rows] == ["first (empty cache)", "second (warm cache)"]
    for row in rows:
        assert {"imports", "compile", "calibration and evaluation", "sampling"} <= set(row)
        assert 0 < row["train_s"] < row["wall_s"] and row["outside_s"] > 0  # read from a real run's metrics.json


# --- the report: tables written into the marked blocks of a markdown file (no benchmarking) --------------

DOC = """# Title

Prose before, quoting 1,234 steps/s and a marker in a sentence: `<!-- bench:dispatch -->`.

<!-- bench:dispatch -->
| old | dispatch |
<!-- /bench:dispatch -->

Prose between.

<!-- bench:modes -->
| old | modes |
<!-- /bench:modes -->
Prose after.
"""


def saved_results(**studies) -> dict:
    """What scripts/bench.py saves, for the studies given, with a made-up machine."""
    return {
        "environment": {"device": "cpu: cpu", "cpu": "Test CPU 9000", "cores": 2, "jax": "0.0.1", "XLA_FLAGS": ""},
        "quick": True,
        "command": "python scripts/bench.py --quick --only dispatch",
        "date": "2001-02-03 04:05 UTC",
        "study_seconds": {name: 12.3 for name in studies},
        "notes": {},
        **studies,
    }


DISPATCH_ROWS = [
    {"variant": "scan", "chunk": 1000, "unroll": 1, "steps_per_s": 7421.4, "spread_steps_per_s": (7071.0, 8062.0),
     "us_per_step": 134.75, "compile_s": 2.21},
]  # fmt: skip


def test_rewrite_replaces_the_named_blocks_inside_and_nothing_else():
    new = report.rewrite(DOC, {"dispatch": "\nNEW\n"}, bench.TABLES)
    assert new == DOC.replace("| old | dispatch |", "NEW")
    both = report.rewrite(DOC, {"dispatch": "A", "modes": "B"}, bench.TABLES)
    assert both == DOC.replace("\n| old | dispatch |\n", "A").replace("\n| old | modes |\n", "B")
    assert report.rewrite(DOC, {}, bench.TABLES) == DOC


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- bench:dispatch -->\n| t |\n", "line 1: <!-- bench:dispatch --> is never closed"),
        ("a\n| t |\n<!-- /bench:dispatch -->\n", "line 3: <!-- /bench:dispatch --> closes a block that is not open"),
        ("<!-- bench:dispatch -->\n<!-- /bench:modes -->\n", "line 2: .* closes a block that is not open"),
        ("<!-- bench:dispatch -->\n<!-- bench:modes -->\n<!-- /bench:modes -->\n<!-- /bench:dispatch -->",
         "line 2: <!-- bench:modes --> opens inside the dispatch block of line 1"),
        ("<!-- bench:dispach -->\n<!-- /bench:dispach -->\n", "line 1: <!-- bench:dispach --> names no study"),
        (DOC + "<!-- bench:dispatch -->\n<!-- /bench:dispatch -->\n", "a second dispatch block"),
        (DOC.replace("modes", "xla"), "doc.md has no block for modes: mark where"),
    ],
)  # fmt: skip
def test_a_missing_or_unbalanced_marker_is_an_output_error(text, message):
    with pytest.raises(OutputError, match=message):
        report.rewrite(text, {"dispatch": "new", "modes": "new"}, bench.TABLES, source="doc.md")


def test_a_block_holds_the_table_and_where_it_came_from_also_after_a_json_round_trip():
    results = saved_results(dispatch=DISPATCH_ROWS)
    block = report.render(results, "dispatch")
    _, columns = bench.TABLES["dispatch"]
    assert block.startswith("\n" + bench.markdown_table(DISPATCH_ROWS, columns) + "\n\n")
    assert "| 7,421 | 7,071–8,062 |" in block  # the spread is a spread, not "(7071.0, 8062.0)"
    for fact in ("`python scripts/bench.py --quick --only dispatch`", "2001-02-03 04:05 UTC", "12 s", "Test CPU 9000",
                 "XLA_FLAGS none"):  # fmt: skip
        assert fact in block
    assert report.render(json.loads(json.dumps(results)), "dispatch") == block


def test_update_file_fills_the_studies_with_rows_and_leaves_a_bad_file_as_it_was(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(DOC)
    filled = report.update_file(doc, saved_results(dispatch=DISPATCH_ROWS, modes=[]), ["dispatch", "modes"])
    assert filled == ["dispatch"]  # modes ran but has no rows (a skipped study): its block stays
    text = doc.read_text()
    assert "| old | dispatch |" not in text and "7,071–8,062" in text and "| old | modes |" in text
    assert (
        text.replace(report.render(saved_results(dispatch=DISPATCH_ROWS), "dispatch"), "\n| old | dispatch |\n") == DOC
    )
    doc.write_text(DOC.replace("<!-- /bench:modes -->", ""))
    with pytest.raises(OutputError, match="never closed"):
        report.update_file(doc, saved_results(dispatch=DISPATCH_ROWS), ["dispatch"])
    assert doc.read_text() == DOC.replace("<!-- /bench:modes -->", "")
    assert [p.name for p in tmp_path.iterdir()] == ["performance.md"]  # no temporary file left behind


def test_a_bad_report_file_is_refused_before_the_suite_runs(tmp_path, capsys):
    from jaxbirds import cli

    doc = tmp_path / "performance.md"
    doc.write_text(DOC)
    argv = ["--quick", "--only", "dispatch", "vmap", "--report", str(doc), "--json", str(tmp_path / "b.json")]
    code = cli.run(load_script("bench").main, argv)
    captured = capsys.readouterr()
    assert code == 2 and "has no block for vmap" in captured.err and "#" not in captured.out
    assert doc.read_text() == DOC and not (tmp_path / "b.json").exists()


def test_from_json_renders_saved_results_into_the_report_without_measuring(tmp_path, capsys):
    saved, doc = tmp_path / "bench.json", tmp_path / "performance.md"
    saved.write_text(json.dumps(saved_results(dispatch=DISPATCH_ROWS)))
    doc.write_text(DOC)
    assert load_script("bench").main(["--from-json", str(saved), "--report", str(doc)]) == 0
    text = doc.read_text()
    assert "7,071–8,062" in text and "| old | modes |" in text
    assert f"by `python scripts/bench.py --from-json {saved} --report {doc}`" in text
    assert "wrote the tables of dispatch" in capsys.readouterr().out
