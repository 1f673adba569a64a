"""Smoke test of the benchmark suite (speed itself is never asserted: it is measured, in scripts/bench.py)."""

import json
import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from test_gradcheck import load_script

from jaxbirds import bench, model, train


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
    assert [r["mode"] for r in saved["modes"]] == [
        "autodiff",
        "custom_vjp",
        "custom_jvp",
        "manual (fused)",
        "manual (atomic)",
    ]
    assert all(r["us_per_step"] > 0 and math.isfinite(r["us_per_step"]) for r in saved["modes"])
    assert all(r["flops"] > 0 and r["kernels"] >= r["fusions"] > 0 for r in saved["xla"])


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
    summary = bench.hlo_summary(step.lower(params, opt_state, X, Y).compile())
    assert summary["dots"] == 6 and summary["kernels"] >= summary["fusions"] > 0


def test_an_unwritable_json_path_is_refused_before_the_suite_runs(tmp_path, capsys):
    from jaxbirds import cli

    code = cli.run(load_script("bench").main, ["--quick", "--only", "modes", "--json", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "is a directory" in captured.err and "##" not in captured.out


def test_markdown_table_formats_numbers_and_spreads():
    rows = [{"a": "x", "b": 1234.5, "c": (1.0, 2.0)}]
    table = bench.markdown_table(rows, [("a", "A", ""), ("b", "B", ",.0f"), ("c", "C", ".1f")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 1,234 | 1.0–2.0 |"]
