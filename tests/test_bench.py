"""Smoke test of the benchmark suite (speed itself is never asserted: it is measured, in scripts/bench.py)."""

import dataclasses
import json
import math
import sys
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_gradcheck import load_script

from jaxbirds import bench, model, modes, report, train
from jaxbirds.bench import (
    accuracy,
    diagnostics,
    evaluation,
    memory,
    pytorch,
    scaling,
    startup,
    tables,
    timing,
    variants,
    xla,
)
from jaxbirds.bench.study import Study
from jaxbirds.errors import OutputError
from jaxbirds.model import ModelConfig


@pytest.mark.slow
def test_quick_cli_runs_the_gradient_mode_studies_and_saves_json(tmp_path, capsys):
    """The --quick path through the CLI, limited to the gradient modes and the torch reference (or its
    skip note): the full --quick run is a minute of compiling on 2 cores. What XLA compiled is
    checked below, one compiled step per mode."""
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--only", "modes", "torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("modes", "torch"):
        assert f"## {bench.STUDIES[name].title}" in printed
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["environment"]["jax"]
    assert [r["mode"] for r in saved["modes"]] == ["autodiff", "custom_vjp", "custom_jvp", "manual", "atomic"]
    assert all(r["us_per_step"] > 0 and math.isfinite(r["us_per_step"]) for r in saved["modes"])
    assert saved["hidden"] == [200]


@pytest.mark.slow  # 40 s on 2 cores: five compiles of a 2,000-step chunk
def test_quick_cli_runs_the_gradient_modes_at_depth_two(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--only", "modes", "--hidden", "32", "32", "--json", str(out)]) == 0
    assert "hidden 32 32 (2 blocks)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["hidden"] == [32, 32] and [r["mode"] for r in saved["modes"]] == list(modes.MODES)
    assert all(r["us_per_step"] > 0 and math.isfinite(r["us_per_step"]) for r in saved["modes"])


def tiny_config(**changes) -> bench.BenchConfig:
    """A config that measures in seconds: one timed run of a 20-step chunk."""
    return dataclasses.replace(bench.BenchConfig.quick(), repeats=1, steps=20, **changes)


def test_the_hidden_flag_sets_the_model_every_study_measures(tmp_path, capsys, monkeypatch):
    """--hidden reaches the bench's model: the diagnostics study's rows name the model it timed (its timing
    replaced by :class:`FakeTimes`; the slow test above runs the gradient modes at depth 2 for real)."""
    tiny = tiny_config(diagnostics_models=())
    monkeypatch.setattr(bench.BenchConfig, "quick", classmethod(lambda cls: tiny))
    fake = FakeTimes()
    monkeypatch.setattr(bench.Bench, "time_chunks", lambda self, *args, **kwargs: fake(*args, **kwargs))
    out = tmp_path / "bench.json"
    argv = ["--quick", "--only", "diagnostics", "--hidden", "16", "8", "--json", str(out)]
    assert load_script("bench").main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["hidden"] == [16, 8] and "hidden 16 8 (2 blocks)" in capsys.readouterr().out
    assert fake.asked == [((16, 8), 0, 32), ((16, 8), 10, 32)]
    assert [(r["model"], r["depth"], r["every"]) for r in saved["diagnostics"]] == [("16-8", 2, "off"), ("16-8", 2, 10)]


def test_the_hidden_flag_takes_positive_widths_and_defaults_to_the_tutorials_model(capsys):
    script = load_script("bench")
    assert script.parse_args([]).hidden == model.ModelConfig().hidden == (200,)
    assert script.parse_args(["--hidden", "100", "100", "100", "100"]).hidden == (100, 100, 100, 100)
    for argv in (["--hidden", "0"], ["--hidden"], ["--from-json", "b.json", "--plot", "d", "--hidden", "8"]):
        with pytest.raises(SystemExit) as exit_:
            script.parse_args(argv)
        assert exit_.value.code == 2
    assert "--hidden have no effect" in capsys.readouterr().err


def test_a_model_too_wide_for_memory_is_refused_before_the_suite_runs(tmp_path, capsys):
    from jaxbirds import cli

    argv = ["--quick", "--only", "modes", "--hidden", "2000000000", "--json", str(tmp_path / "b.json")]
    code = cli.run(load_script("bench").main, argv)
    captured = capsys.readouterr()
    assert code == 2 and "memory budget" in captured.err and "##" not in captured.out
    assert not (tmp_path / "b.json").exists()


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


@pytest.mark.parametrize("hidden, batch", [((200,), 32), ((64,), 7), ((16, 8, 12), 5)])
def test_model_flops_equals_the_matmuls_jax_grad_really_traces(hidden, batch):
    """Counted from the program, not from the formula: every dot_general of value_and_grad."""
    config = ModelConfig(vocab_size=29, hidden=hidden)
    params = model.init_params(jax.random.key(0), config)
    X, Y = jnp.zeros((batch, 3), jnp.int32), jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(model.loss))(params, X, Y).jaxpr
    assert scaling.model_flops(config, batch) == matmul_flops_in_jaxpr(jaxpr)


@pytest.mark.parametrize(
    "mode, hidden", [(mode, (64,)) for mode in modes.MODES] + [("manual", (64, 48)), ("atomic", (64, 48, 40))]
)  # the passes by hand at depth: every other mode is jax.grad's
def test_the_compiled_step_holds_three_matrix_products_per_layer(mode, hidden):
    """The XLA study's "dots" column counts matrix products (per layer 1 forward, 2 backward: 6 for the
    tutorial's model), not the reduction fusions that share a kernel kind with them."""
    tc = train.TrainConfig(grad_mode=mode)
    config = ModelConfig(vocab_size=29, hidden=hidden)
    params, opt_state, _ = train.init_state(config, tc)
    X, Y = jnp.zeros((32, 3), jnp.int32), jnp.zeros((32,), jnp.int32)
    step = jax.jit(variants.single_step(modes.MODES[mode].loss_and_grads, tc))
    compiled = step.lower(params, opt_state, X, Y).compile()
    summary = xla.hlo_summary(compiled)
    assert summary["dots"] == 3 * (config.depth + 1) and summary["kernels"] >= summary["fusions"] > 0
    assert xla.cost(compiled)["flops"] >= scaling.model_flops(config, 32)


def test_an_unwritable_json_path_is_refused_before_the_suite_runs(tmp_path, capsys):
    from jaxbirds import cli

    code = cli.run(load_script("bench").main, ["--quick", "--only", "modes", "--json", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "is a directory" in captured.err and "##" not in captured.out


def test_markdown_table_formats_numbers_and_spreads():
    rows = [{"a": "x", "b": 1234.5, "c": (1.0, 2.0)}]
    table = tables.markdown_table(rows, [("a", "A", ""), ("b", "B", ",.0f"), ("c", "C", ".1f")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 1,234 | 1.0–2.0 |"]


# --- the registry: one Study per module, run in order, each after the studies whose rows it takes --------


def test_the_studies_run_in_the_documented_order_each_after_the_studies_it_takes_rows_from():
    names = list(bench.STUDIES)
    assert names == ["dispatch", "modes", "xla", "scaling", "vmap", "torch",
                     "accuracy", "memory", "compile", "startup", "evaluation", "diagnostics"]  # fmt: skip
    for i, (name, study) in enumerate(bench.STUDIES.items()):
        assert study.name == name and set(study.needs) | set(study.uses) <= set(names[:i]), name
    assert bench.STUDIES["xla"].needs == ("modes",) and bench.STUDIES["torch"].uses == ("dispatch",)
    assert bench.FIGURES == {name: s.figure.file for name, s in bench.STUDIES.items() if s.figure}


def test_plan_adds_what_a_chosen_study_needs_but_not_what_it_only_uses():
    def planned(names):
        return [study.name for study in bench.plan(names)]

    assert planned(["xla"]) == ["modes", "xla"]
    assert planned(["torch"]) == ["torch"]
    assert planned(["evaluation", "xla", "dispatch"]) == ["dispatch", "modes", "xla", "evaluation"]
    assert planned(bench.STUDIES) == list(bench.STUDIES)


def test_measure_passes_the_rows_a_study_takes_by_name_or_says_why_it_cannot_run():
    seen = []

    def run(b, **inputs):
        seen.append((b, inputs))
        return [{"x": 1}]

    study = Study("late", "Late", (("x", "x", ""),), run, needs=("one",), uses=("two", "three"))
    earlier = {"one": [{"a": 1}], "three": [{"c": 2}], "four": [{"d": 3}]}
    assert study.measure("bench", earlier) == ([{"x": 1}], None)
    assert seen == [("bench", {"one": [{"a": 1}], "two": [], "three": [{"c": 2}]})]
    assert dataclasses.replace(study, skip_reason=lambda b: f"not on {b}").measure("here", {}) == ([], "not on here")
    assert len(seen) == 1  # a study that cannot run is not run


def test_the_cli_runs_a_needed_study_unseen_and_passes_a_used_one_only_when_chosen(tmp_path, capsys, monkeypatch):
    """With the studies' measurements replaced by instant ones: which run, in which order, with which rows,
    and what is printed and saved."""
    calls = []

    def fake(name, rows):
        def run(b, **inputs):
            calls.append((name, inputs))
            return rows

        monkeypatch.setitem(
            bench.STUDIES, name, dataclasses.replace(bench.STUDIES[name], run=run, skip_reason=lambda b: None)
        )

    modes_rows, xla_rows = [{"mode": "autodiff", "us_per_step": 2.0}], [{"mode": "autodiff", "flops": 4.0}]
    dispatch_rows, torch_rows = [{"variant": "scan", "steps_per_s": 5.0}], [{"variant": "loop", "steps_per_s": 1.0}]
    fake("modes", modes_rows), fake("xla", xla_rows), fake("dispatch", dispatch_rows), fake("torch", torch_rows)
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--only", "torch", "xla", "--json", str(out)]) == 0
    assert calls == [("modes", {}), ("xla", {"modes": modes_rows}), ("torch", {"dispatch": []})]
    printed, saved = capsys.readouterr().out, json.loads(out.read_text())
    assert [line for line in printed.splitlines() if line.startswith("## ")] == [
        f"## {bench.STUDIES[name].title}" for name in ("xla", "torch")
    ]
    assert "| autodiff | 4 |" in printed and "modes" not in saved and list(saved["study_seconds"]) == ["xla", "torch"]
    assert saved["xla"] == xla_rows and saved["torch"] == torch_rows
    calls.clear()
    assert load_script("bench").main(["--quick", "--only", "torch", "dispatch", "--json", str(out)]) == 0
    assert calls == [("dispatch", {}), ("torch", {"dispatch": dispatch_rows})]


def test_the_torch_study_compares_with_the_fastest_scan_of_the_dispatch_rows_it_is_given():
    rows = [{"variant": "jit, one call per step", "steps_per_s": 9.0}, {"variant": "scan", "steps_per_s": 5.0},
            {"variant": "scan", "steps_per_s": 7.0}]  # fmt: skip
    assert pytorch.best_scan_steps_per_s(rows) == 7.0 and pytorch.best_scan_steps_per_s([]) is None


def test_model_label_names_the_blocks_in_a_table_cell():
    assert [timing.model_label(h) for h in [(200,), (4_096,), (100,) * 4, (64, 32)]] == [
        "200", "4,096", "4×100", "64-32"
    ]  # fmt: skip


class FakeTimes:
    """In place of :meth:`Bench.time_chunks`: records what it was asked to time, answers at once (time per
    step: the model's parameter count, plus 10% per record every 10 steps), compiling nothing."""

    def __init__(self):
        self.asked, self.grad_modes = [], []

    def __call__(self, mc, tc, length, calls, dtype=None, loss_and_grads=None):
        self.asked.append((mc.hidden, tc.diagnostics_every, tc.batch_size))
        self.grad_modes.append(tc.grad_mode)
        us = model.param_count_for(mc) * (1 + (0.1 * 10 / tc.diagnostics_every if tc.diagnostics_every else 0))
        return {"compile_s": 0.0, "us_per_step": us, "steps_per_s": 1e6 / us, "spread_steps_per_s": (1.0, 2.0)}


def test_the_diagnostics_study_times_each_model_off_then_sparse_to_dense_against_its_own_off(dataset):
    config = tiny_config(diagnostics_every=(10, 100), diagnostics_models=((8, 8, 8), (16,)))  # off: always timed
    b = bench.Bench(dataset, config, hidden=(16,))
    b.time_chunks = FakeTimes()
    rows = diagnostics.diagnostics_study(b)
    assert b.time_chunks.asked == [((16,), 0, 32), ((16,), 100, 32), ((16,), 10, 32),
                                   ((8, 8, 8), 0, 32), ((8, 8, 8), 100, 32), ((8, 8, 8), 10, 32)]  # fmt: skip
    assert [(r["model"], r["depth"], r["every"]) for r in rows] == [
        ("16", 1, "off"), ("16", 1, 100), ("16", 1, 10), ("3×8", 3, "off"), ("3×8", 3, 100), ("3×8", 3, 10)
    ]  # fmt: skip
    assert [round(r["ratio_to_off"], 6) for r in rows] == [1.0, 1.01, 1.1] * 2  # each over its own model's off
    table = diagnostics.STUDY.table(rows)
    assert "| 3×8 | off |" in table and "| 16 | 100 |" in table


def test_the_modes_study_trains_each_mode_of_the_one_vocabulary_under_its_name(dataset):
    b = bench.Bench(dataset, tiny_config(), hidden=(16, 8))
    b.time_chunks = FakeTimes()
    rows = bench.STUDIES["modes"].run(b)
    assert b.time_chunks.grad_modes == [r["mode"] for r in rows] == list(modes.MODES)
    assert {hidden for hidden, _, _ in b.time_chunks.asked} == {(16, 8)}
    assert [r["ratio_to_autodiff"] for r in rows] == [1.0] * len(rows)  # FakeTimes: the same time for every mode


def test_the_scaling_studys_hidden_sweep_gives_each_width_to_every_block(dataset):
    b = bench.Bench(dataset, tiny_config(batches=(64,), hiddens=(24, 40)), hidden=(16, 8))
    b.time_chunks = FakeTimes()
    rows = scaling.scaling_study(b)
    assert [hidden for hidden, _, _ in b.time_chunks.asked] == [(16, 8), (24, 24), (40, 40), (16, 8)]
    assert [(r["sweep"], r["value"], r["hidden"]) for r in rows] == [
        ("batch", 64, "16-8"), ("hidden", 24, "2×24"), ("hidden", 40, "2×40"), ("dtype", "float64", "16-8")
    ]  # fmt: skip


def test_the_torch_study_runs_only_on_the_tutorials_one_block_model(dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # importable, whether installed or not
    assert pytorch.torch_missing(bench.Bench(dataset, tiny_config())) is None
    assert "one hidden block" in pytorch.torch_missing(bench.Bench(dataset, tiny_config(), hidden=(8, 8)))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert pytorch.torch_missing(bench.Bench(dataset, tiny_config())) == pytorch.MISSING


def test_the_accuracy_tensors_are_every_parameter_but_the_blocks_biases_at_any_depth():
    def params(hidden):  # only the names matter
        return {name: np.zeros(shape) for name, shape in model.param_shapes(ModelConfig(hidden=hidden)).items()}

    one = params(8)
    assert accuracy.accuracy_tensors(one) == ("C", "W1", "bngain1", "bnbias1", "W2", "b2")
    three = params((8, 4, 6))
    assert set(accuracy.accuracy_tensors(three)) == set(three) - {"b1", "b2", "b3"}
    assert accuracy.gradient_functions().keys() == modes.MODES.keys()


def test_accuracy_rows_saved_before_issue_17_still_fill_the_bngain1_column():
    old = {"point": "init", "batch": 32, "mode": "manual (fused)", "median_rel_error": 1e-7, "max_rel_error": 2e-7,
           "median_C": 1e-7, "median_W1": 2e-7, "median_bngain": 3e-7, "median_W2": 4e-7}  # fmt: skip
    new = {**old, "mode": "manual", "median_bngain1": 5e-7}
    del new["median_bngain"]
    table = report.render(saved_results(accuracy=[old, new]), "accuracy")
    assert "| init | 32 | manual (fused) | 1.00e-07 | 2.00e-07 | 1.0e-07 | 2.0e-07 | 3.0e-07 | 4.0e-07 |" in table
    assert "| init | 32 | manual | 1.00e-07 | 2.00e-07 | 1.0e-07 | 2.0e-07 | 5.0e-07 | 4.0e-07 |" in table
    assert "| bngain1 |" in table


def test_the_product_evaluation_calibrates_every_block_as_the_lookup_tables_do(dataset):
    """The evaluation study's "before" way, at depth 2: each block's statistics from the blocks before it."""
    params = model.init_params(jax.random.key(1), ModelConfig(hidden=(16, 8)))
    train_split, dev = dataset.train, dataset.splits["dev"]
    splits = {"train": (train_split.X[:300], train_split.Y[:300]), "dev": (dev.X[:100], dev.Y[:100])}
    product, lookup = evaluation.by_product(params, splits), evaluation.by_lookup(params, splits)
    assert product.keys() == lookup.keys() == {"train", "dev"}
    assert all(abs(product[k] - lookup[k]) < 1e-5 for k in product), (product, lookup)


@pytest.mark.slow
def test_the_accuracy_harness_finds_a_less_accurate_variance(dataset, monkeypatch):
    """Batch norm's variance as E[x^2] - E[x]^2 cancels catastrophically in float32 when the mean is
    large beside the spread (here hprebn shifted by 300): the harness must rank it far worse."""
    params = model.init_params(jax.random.key(0), ModelConfig(vocab_size=29, hidden=32))
    params = {**params, "b1": params["b1"] + 300.0}
    rows = np.random.default_rng(0).integers(0, len(dataset.train), (3, 32))
    batches = [(jnp.asarray(dataset.train.X[r]), jnp.asarray(dataset.train.Y[r])) for r in rows]

    def plain(p, X, Y):
        return jax.grad(model.loss)(p, X, Y)

    good = accuracy.gradient_errors({"plain": plain}, params, batches)["plain"]

    def naive_batch_norm(x, gain, bias, eps=1e-5, tap=None):
        n = x.shape[0]
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = (jnp.mean(x * x, axis=0, keepdims=True) - mean**2) * n / (n - 1)
        return gain * (x - mean) * jax.lax.rsqrt(var + eps) + bias

    monkeypatch.setattr(model.ops, "batch_norm", naive_batch_norm)

    def naive(p, X, Y):
        return jax.grad(model.loss)(p, X, Y)

    bad = accuracy.gradient_errors({"naive": naive}, params, batches)["naive"]
    assert np.median(bad["W1"]) > 100 * np.median(good["W1"])
    assert np.median(good["W1"]) < 1e-4  # the shift itself costs float32 digits: hprebn is ~300 +- 2


@pytest.mark.slow
def test_the_memory_study_reports_what_the_compiled_program_says(dataset):
    config = bench.BenchConfig(repeats=1, steps=50, memory_batches=(32, 256), memory_hiddens=(16,))
    b = bench.Bench(dataset, config)
    rows = memory.memory_study(b)
    assert {r["mode"] for r in rows} == {*train.GRAD_MODES, "autodiff + jax.checkpoint"}
    tc = train.TrainConfig(grad_mode="custom_vjp")
    params, opt_state, _ = train.init_state(ModelConfig(vocab_size=29, hidden=16), tc)
    step = jax.jit(variants.single_step(train.loss_and_grads_fn("custom_vjp"), tc))
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
    assert startup.train_script_missing() is None
    rows = startup.startup_study(b)
    assert [r["run"] for r in rows] == ["first (empty cache)", "second (warm cache)"]
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
    new = report.rewrite(DOC, {"dispatch": "\nNEW\n"}, bench.STUDIES)
    assert new == DOC.replace("| old | dispatch |", "NEW")
    both = report.rewrite(DOC, {"dispatch": "A", "modes": "B"}, bench.STUDIES)
    assert both == DOC.replace("\n| old | dispatch |\n", "A").replace("\n| old | modes |\n", "B")
    assert report.rewrite(DOC, {}, bench.STUDIES) == DOC


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
        report.rewrite(text, {"dispatch": "new", "modes": "new"}, bench.STUDIES, source="doc.md")


def test_a_block_holds_the_table_and_where_it_came_from_also_after_a_json_round_trip():
    results = saved_results(dispatch=DISPATCH_ROWS)
    block = report.render(results, "dispatch")
    assert block.startswith("\n" + bench.STUDIES["dispatch"].table(DISPATCH_ROWS) + "\n\n")
    assert "| 7,421 | 7,071–8,062 |" in block  # the spread is a spread, not "(7071.0, 8062.0)"
    for fact in ("`python scripts/bench.py --quick --only dispatch`", "2001-02-03 04:05 UTC", "12 s", "Test CPU 9000",
                 "XLA_FLAGS none", "model: hidden 200;"):  # fmt: skip
        assert fact in block  # (results saved before --hidden measured the default model)
    assert report.render(json.loads(json.dumps(results)), "dispatch") == block
    deep = report.render({**results, "hidden": [32, 32]}, "dispatch")
    assert "model: hidden 32 32 (2 blocks);" in deep and "hidden 200" not in deep


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
