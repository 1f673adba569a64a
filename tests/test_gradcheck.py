"""The comparison machinery and the gradcheck script: no false alarms on correct code, real errors caught."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from jaxbirds import gradcheck, manual, model, ops, vjp

TOL = gradcheck.Tolerance(rtol=1e-5, noise=16.0)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_tells_exact_close_and_far_apart():
    ref = np.array([1.0, -2.0, 0.0], np.float32)
    assert gradcheck.compare("a", ref.copy(), ref, TOL)[2:4] == (True, True)
    nudged = ref + np.array([1e-5, 0, 0], np.float32)  # 0.5e-5 of max|ref| = 2: inside rtol 1e-5
    row = gradcheck.compare("b", nudged, ref, TOL)
    assert (row.exact, row.close) == (False, True)
    far = ref + np.array([0, 1e-3, 0], np.float32)
    row = gradcheck.compare("c", far, ref, TOL)
    assert (row.exact, row.close) == (False, False)
    assert row.max_abs == pytest.approx(1e-3, rel=1e-3) and row.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert row.allowed == pytest.approx(2e-5)


def test_small_entries_are_judged_against_the_largest_entry_of_their_tensor():
    """Normwise: an entry of 1e-6 beside one of 1 may be off by 1e-6 (its own 100 %)."""
    ref = np.array([1.0, 1e-6])
    assert gradcheck.compare("t", ref + [0.0, 9e-6], ref, TOL).close
    assert not gradcheck.compare("t", ref + [0.0, 2e-5], ref, TOL).close


def test_compare_on_a_zero_reference_uses_the_measured_noise():
    """The b1 situation: the reference is rounding noise around 0, and so is ours."""
    row = gradcheck.compare("b1", np.array([3e-9]), np.array([1e-9]), TOL, noise=1e-9)
    assert row.close and row.allowed == pytest.approx(1e-5 * 1e-9 + 16e-9)
    assert not gradcheck.compare("b1", np.array([3e-8]), np.array([1e-9]), TOL, noise=1e-9).close


def test_compare_rejects_a_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        gradcheck.compare("x", np.zeros(3), np.zeros(4), TOL)


def test_table_lists_every_row():
    rows = [gradcheck.compare(n, np.ones(2), np.ones(2), TOL) for n in ("W1", "b1")]
    table = gradcheck.format_table(rows, "t")
    assert "| W1 | 2 | yes | yes |" in table and "| b1 |" in table


def test_unknown_dtype_has_no_tolerance():
    with pytest.raises(ValueError, match="float16"):
        gradcheck.tolerance_for(np.float16)


# --- no false alarms ------------------------------------------------------------------------------


def problem(dataset, batch, hidden, seed, dtype):
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden)
    param_key, batch_key = jax.random.split(jax.random.key(seed))
    params = model.init_params(param_key, config, dtype)
    ix = np.asarray(jax.random.randint(batch_key, (batch,), 0, len(dataset.train)))
    return params, jnp.asarray(dataset.train.X[ix]), jnp.asarray(dataset.train.Y[ix])


def all_rows(params, X, Y, tol):
    return [row for rows in gradcheck.all_tables(params, X, Y, tol).values() for row in rows]


@pytest.mark.parametrize("batch, hidden, seed, dtype", [(2, 8, 0, "float32"), (5, 64, 1, "float64")])
def test_correct_code_passes_at_small_batches_and_odd_sizes(dataset, dtype, batch, hidden, seed):
    """The sizes where a fixed absolute floor cried wolf (b1 at batch 2-8; batch 2, where everything
    below batch norm is near-cancelling noise). The full grid (batch 2-64, hidden 8-256, seeds 0-9,
    both precisions: 640 checks) is in the slow test below."""
    with jax.enable_x64(dtype == "float64"):
        rows = all_rows(*problem(dataset, batch, hidden, seed, jnp.dtype(dtype)), gradcheck.tolerance_for(dtype))
    assert all(r.close for r in rows), gradcheck.format_table([r for r in rows if not r.close], "false alarms")


@pytest.mark.slow
def test_no_false_alarm_over_the_whole_acceptance_grid(dataset):
    """Batch 2-64, hidden 8-256, seeds 0-9, float32 and float64: every tensor of every table passes."""
    failures = []
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            for batch in (2, 3, 4, 5, 8, 16, 32, 64):
                for hidden in (8, 16, 64, 256):
                    for seed in range(10):
                        rows = all_rows(*problem(dataset, batch, hidden, seed, jnp.dtype(dtype)),
                                        gradcheck.tolerance_for(dtype))  # fmt: skip
                        failures += [(dtype, batch, hidden, seed, r.name) for r in rows if not r.close]
    assert not failures


# --- real errors are caught -------------------------------------------------------------------------


@pytest.fixture
def fresh_traces():
    """The checks are jitted: clear JAX's caches around a test that patches a rule, so that the
    patched rule is traced, and so that no later test reuses a program traced with it."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _bn_bwd_scaled(factor, eps, residuals, dy):
    dx, dgain, dbias = vjp._batch_norm_bwd(eps, residuals, dy)
    return dx * factor, dgain, dbias


def _bn_bwd_without_bessel(eps, residuals, dy):
    x_hat, inv_std, gain = residuals
    n = x_hat.shape[0]
    dbias = jnp.sum(dy, axis=0, keepdims=True)
    dgain = jnp.sum(dy * x_hat, axis=0, keepdims=True)
    return (gain * inv_std / n) * (n * dy - dbias - x_hat * dgain), dgain, dbias


def broken_batch_norm(bwd):
    rule = jax.custom_vjp(lambda x, g, b, eps=ops.BN_EPS: ops.batch_norm(x, g, b, eps), nondiff_argnums=(3,))
    rule.defvjp(vjp._batch_norm_fwd, bwd)
    return rule


def test_planted_errors_fail_the_check_in_both_precisions(dataset, monkeypatch, fresh_traces):
    """Batch norm's rule off by 1e-4 relative (float32 and float64) or without its n/(n-1): the tensors
    below batch norm fail. The fused pass with one tensor (dW2) off by 1e-4: that tensor, and only
    it, fails. (One test, so that JAX's caches are cleared once for all the patched rules.)"""
    cases = [
        ("float32", functools.partial(_bn_bwd_scaled, 1 + 1e-4)),
        ("float64", functools.partial(_bn_bwd_scaled, 1 + 1e-4)),
        ("float32", _bn_bwd_without_bessel),
    ]
    problems, noise = {}, {}
    for dtype in ("float32", "float64"):  # the reference (plain model) is not patched: measure its noise once
        with jax.enable_x64(dtype == "float64"):
            problems[dtype] = problem(dataset, 32, 64, 0, jnp.dtype(dtype))
            noise[dtype] = gradcheck.boundary_noise(*problems[dtype])
    for dtype, bwd in cases:
        monkeypatch.setattr(vjp, "batch_norm", broken_batch_norm(bwd))
        jax.clear_caches()
        with jax.enable_x64(dtype == "float64"):
            rows = gradcheck.custom_vjp_rows(*problems[dtype], gradcheck.tolerance_for(dtype), noise[dtype])
        failed = {r.name for r in rows if not r.close}
        assert {"hprebn", "W1", "C"} <= failed, gradcheck.format_table(rows, f"planted, {dtype}")
    monkeypatch.undo()

    original = manual.fused_backward

    def off_by_a_little(params, X, Y):
        result = original(params, X, Y)
        return result._replace(grads={**result.grads, "W2": result.grads["W2"] * (1 + 1e-4)})

    monkeypatch.setattr(manual, "fused_backward", off_by_a_little)
    jax.clear_caches()
    with jax.enable_x64(True):
        rows = gradcheck.fused_rows(*problems["float64"], gradcheck.tolerance_for("float64"), noise["float64"])
    assert {r.name for r in rows if not r.close} == {"W2"}, gradcheck.format_table(rows, "planted fused")


# --- the script ----------------------------------------------------------------------------------------


def test_script_passes_prints_every_table_the_jaxprs_and_plots(capsys, tmp_path):
    """float32 here; float64 through the same functions is covered above and in test_manual."""
    script = load_script("gradcheck")
    code = script.main(["--hidden", "24", "--batch-size", "16", "--plot", str(tmp_path), "--show-jaxpr"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("### ") == 5 + 3 and "| bnvar_inv |" in out and "OK: all 53 tensors" in out
    assert "| tensor | manual atomic | manual fused | custom_vjp | custom_jvp |" in out
    counts = {rules: int(out.split(f"backward pass, {rules}: ")[1].split()[0]) for rules in ("autodiff", "custom_vjp")}
    assert counts["custom_vjp"] < counts["autodiff"]  # what the closed form removes
    assert (tmp_path / "dlogits.png").stat().st_size > 0 and (tmp_path / "tolerances.png").stat().st_size > 0


def test_script_fails_when_a_tensor_is_outside_tolerance(monkeypatch, capsys):
    """With a zero tolerance, the non-bitwise rows (fused, custom) must fail the run."""
    script = load_script("gradcheck")
    monkeypatch.setitem(gradcheck.TOLERANCES, np.dtype("float32"), gradcheck.Tolerance(0.0, 0.0))
    assert script.main(["--hidden", "24", "--batch-size", "16"]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "1"], "at least 2"),
        (["--seed", "99999999999999999999"], "from 0 to"),
        (["--batch-size", "1000000000000"], "memory"),
    ],
)
def test_script_rejects_bad_numbers_with_one_line(capsys, args, message):
    from jaxbirds import cli

    script = load_script("gradcheck")
    try:
        code = cli.run(script.main, args)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_script_checks_its_inputs_and_outputs_before_any_work(tmp_path, capsys):
    from jaxbirds import cli

    script = load_script("gradcheck")
    one_name = tmp_path / "one.csv"
    one_name.write_text("emu\n")
    assert cli.run(script.main, ["--data", str(one_name)]) == 2
    assert "at least 2 names" in capsys.readouterr().err
    a_file = tmp_path / "plots"
    a_file.write_text("")
    assert cli.run(script.main, ["--plot", str(a_file)]) == 2
    captured = capsys.readouterr()
    assert "not a directory" in captured.err and "###" not in captured.out
