"""The comparison machinery and the gradcheck script: no false alarms on correct code, real errors caught."""

import dataclasses
import functools
import importlib.util
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from jaxbirds import closed_forms, finite_differences, gradcheck, jvp, manual, model, ops, vjp

TOL = gradcheck.Tolerance(rtol=1e-5, noise_multiple=16.0)


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


def test_noise_inputs_are_the_problem_then_rounding_variants_of_it(dataset):
    """Sample 0 is the problem itself; every other sample permutes the batch rows and moves every
    parameter by at most NOISE_NUDGE_ULPS units of float32 roundoff, and not all by zero."""
    params, X, Y = problem(dataset, 6, 3, 0, jnp.float32)
    variants = gradcheck.noise_inputs(params, X, Y, 0, gradcheck.NOISE_SAMPLES)
    assert len(variants) == gradcheck.NOISE_SAMPLES
    u32 = float(jnp.finfo(jnp.float32).eps)

    def examples(X, Y):
        return sorted(map(tuple, np.column_stack([np.asarray(X), np.asarray(Y)])))

    for s, (nudged_params, nudged_X, nudged_Y) in enumerate(variants):
        assert examples(nudged_X, nudged_Y) == examples(X, Y)
        assert (s == 0) == np.array_equal(nudged_X, X)
        for name, value in params.items():
            value, nudged = np.asarray(value, np.float64), np.asarray(nudged_params[name], np.float64)
            assert nudged_params[name].dtype == np.float32
            assert np.all(np.abs(nudged - value) <= (gradcheck.NOISE_NUDGE_ULPS + 1) * u32 * np.abs(value)), (s, name)
            if s == 0:
                np.testing.assert_array_equal(nudged, value)
            elif value.size >= 4:  # all of a few entries may draw a step of 0
                assert not np.array_equal(nudged, value), (s, name)


@pytest.mark.parametrize("batch, hidden, seed, dtype", [(2, 1, 1, "float32"), (5, 64, 1, "float64")])
@pytest.mark.slow
def test_correct_code_passes_at_small_batches_and_odd_sizes(dataset, dtype, batch, hidden, seed):
    """Batch 2, hidden 1, seed 1 is where a noise estimate from one sample cried wolf (hprebn, C, W1:
    at batch 2 everything below batch norm is rounding noise, and one tensor of two entries measured
    its noise small by chance). The full grid is in the slow test below."""
    with jax.enable_x64(dtype == "float64"):
        rows = all_rows(*problem(dataset, batch, hidden, seed, jnp.dtype(dtype)), gradcheck.tolerance_for(dtype))
    assert all(r.close for r in rows), gradcheck.format_table([r for r in rows if not r.close], "false alarms")


def test_one_noise_sample_can_come_out_small_by_chance(dataset):
    """At batch 2, hidden 1, seed 1 (where the one-sample estimate cried wolf) the reference's noise on
    hprebn, two entries equal and opposite, is 4.6e-10 in the problem itself and up to 1.6e-8 in variants
    of it that round differently: one sample underestimates it 30-fold, the default samples do not."""
    params, X, Y = problem(dataset, 2, 1, 1, jnp.float32)
    one = gradcheck.reference_noise(params, X, Y, "autodiff", gradcheck.boundary(1), samples=1)
    default = gradcheck.reference_noise(params, X, Y, "autodiff", gradcheck.boundary(1))
    assert all(default[k] >= v for k, v in one.items())
    assert default["hprebn[1]"] > 10 * one["hprebn[1]"], (one["hprebn[1]"], default["hprebn[1]"])


@pytest.mark.slow
def test_the_closed_forms_own_noise_is_in_the_allowance(dataset):
    """At batch 2, hidden 4, seed 29 the custom_vjp rules' own rounding noise on W1 is 11 times the
    reference's (the closed form cancels differently): with the reference's noise alone correct code
    used 0.69 of its allowance, with the larger of the two it uses 0.06."""
    params, X, Y = problem(dataset, 2, 4, 29, jnp.float32)
    reference = gradcheck.boundary_noise(params, X, Y)
    own = gradcheck.reference_noise(params, X, Y, "custom_vjp", gradcheck.boundary(1))
    assert own["W1"] > 4 * reference["W1"]
    rows = gradcheck.mode_rows(params, X, Y, "custom_vjp", gradcheck.tolerance_for("float32"), reference, own)
    assert max(r.max_abs / r.allowed for r in rows) < 0.25, gradcheck.format_table(rows, "batch 2")


def grid_failures(dataset, dtypes, batches, hiddens, seeds):
    """Every tensor of every table, over a grid: those outside tolerance, and (where claimed) the
    atomic tensors that are not bitwise equal to jax.grad.

    The programs of each shape are dropped before the next (``jax.clear_caches``): holding the
    hundreds of programs of both grids in one process, XLA's CPU compiler crashed (a segmentation
    fault while compiling, jax 0.10.2) where each grid alone passed."""
    failures = []
    for dtype in dtypes:
        bitwise = gradcheck.atomic_bitwise_claimed(dtype)
        with jax.enable_x64(dtype == "float64"):
            tol = gradcheck.tolerance_for(dtype)
            for batch, hidden, seed in itertools.product(batches, hiddens, seeds):
                if seed == seeds[0]:  # a new shape: free the last one's programs (see below)
                    jax.clear_caches()
                tables = gradcheck.all_tables(*problem(dataset, batch, hidden, seed, jnp.dtype(dtype)), tol)
                where = (dtype, batch, hidden, seed)
                failures += [(*where, m, r.name) for m, rows in tables.items() for r in rows if not r.close]
                if bitwise:
                    failures += [(*where, "not bitwise", n) for n in gradcheck.not_bitwise(tables["atomic"])]
    return failures


@pytest.fixture
def no_compilation_cache_writes():
    """Compile without writing to the persistent compilation cache. The grids below compile hundreds of
    programs that nothing reuses, and writing them crashed this process twice (a segmentation fault
    inside XLA's executable serialisation, jax 0.10.2, in compilation_cache.put_executable_and_time, on
    a fresh cache; not reproduced on demand). JAX writes only programs that took at least this long."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache_writes")
def test_no_false_alarm_at_the_smallest_sizes(dataset):
    """Hidden 1-4 x batch 2-4 x seeds 0-29 and batch 5-8 x seeds 0-9, float32 and float64: every tensor
    of every table passes, and the atomic pass is bitwise equal to jax.grad (where claimed)."""
    failures = grid_failures(dataset, ("float32", "float64"), (2, 3, 4), (1, 2, 3, 4), range(30))
    failures += grid_failures(dataset, ("float32", "float64"), (5, 6, 7, 8), (1, 2, 3, 4), range(10))
    assert not failures


@pytest.mark.slow
@pytest.mark.usefixtures("no_compilation_cache_writes")
def test_no_false_alarm_over_the_larger_sizes(dataset):
    """Batch 2-64 x hidden 8-256 x seeds 0-4, float32 and float64."""
    assert not grid_failures(dataset, ("float32", "float64"), (2, 3, 5, 16, 32, 64), (8, 64, 256), range(5))


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
    del eps
    closed_form = mutated(closed_forms, closed_forms.batch_norm_backward, "(n / (n - 1)) * x_hat", "x_hat")
    return closed_form(*residuals, dy)


def broken_batch_norm(bwd):
    rule = jax.custom_vjp(lambda x, g, b, eps=ops.BN_EPS: ops.batch_norm(x, g, b, eps), nondiff_argnums=(3,))
    rule.defvjp(vjp._batch_norm_fwd, bwd)
    return rule


@pytest.mark.slow
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
            rows = gradcheck.mode_rows(*problems[dtype], "custom_vjp", gradcheck.tolerance_for(dtype), noise[dtype])
        failed = {r.name for r in rows if not r.close}
        assert {"hprebn[1]", "W1", "C"} <= failed, gradcheck.format_table(rows, f"planted, {dtype}")
    monkeypatch.undo()

    original = manual.fused_backward

    def off_by_a_little(params, X, Y):
        result = original(params, X, Y)
        return result._replace(grads={**result.grads, "W2": result.grads["W2"] * (1 + 1e-4)})

    monkeypatch.setattr(manual, "fused_backward", off_by_a_little)
    jax.clear_caches()
    with jax.enable_x64(True):
        tol = gradcheck.tolerance_for("float64")
        rows = gradcheck.mode_rows(*problems["float64"], "manual", tol, noise["float64"])
    assert {r.name for r in rows if not r.close} == {"W2"}, gradcheck.format_table(rows, "planted fused")


def mutated(module, function, old, new):
    """``function`` compiled from its source with ``old`` (which must occur once) replaced by ``new``, in
    a copy of ``module``'s namespace: a planted bug, without editing the library. Decorators are dropped
    (``@batch_norm.defjvp`` would register the planted rule on the library's own function)."""
    lines = inspect.getsource(function).splitlines(keepends=True)
    source = "".join(itertools.dropwhile(lambda line: line.startswith("@"), lines))
    assert source.count(old) == 1, old
    namespace = dict(vars(module))
    exec(compile(source.replace(old, new), module.__file__, "exec"), namespace)
    return namespace[function.__name__]


def _axis_mixed_up_vjp():
    closed_form = mutated(closed_forms, closed_forms.batch_norm_backward, "n = x_hat.shape[0]", "n = x_hat.shape[1]")
    return broken_batch_norm(lambda eps, residuals, dy: closed_form(*residuals, dy))


def _axis_mixed_up_jvp():
    rule = jax.custom_jvp(lambda x, g, b, eps=ops.BN_EPS: ops.batch_norm(x, g, b, eps), nondiff_argnums=(3,))
    rule.defjvp(mutated(jvp, jvp._batch_norm_jvp, "n = x.shape[0]", "n = x.shape[1]"))
    return rule


@pytest.mark.parametrize("module, broken", [(vjp, _axis_mixed_up_vjp), (jvp, _axis_mixed_up_jvp)], ids=["vjp", "jvp"])
@pytest.mark.slow
def test_finite_differences_see_a_batch_hidden_axis_mix_up(monkeypatch, module, broken):
    """Batch norm's rule reading ``n`` from the hidden axis: right at a square shape (batch = hidden,
    where the check once ran alone), wrong at each of the fixed shapes, which catch it on their own."""
    monkeypatch.setattr(module, "batch_norm", broken())
    finite_differences.check_rules(jax.random.key(0), [finite_differences.FDShape(batch=4, hidden=4, classes=5)])
    for shape in finite_differences.FD_SHAPES:
        with pytest.raises(AssertionError, match=f"batch_norm .*batch {shape.batch}, hidden {shape.hidden}"):
            finite_differences.check_rules(jax.random.key(0), [shape])


def test_fixed_finite_difference_shapes_tell_every_axis_apart():
    for shape in finite_differences.FD_SHAPES:
        assert len(set(shape)) == 3, shape
    shapes = finite_differences.FD_SHAPES
    assert any(s.batch < s.hidden for s in shapes) and any(s.batch > s.hidden for s in shapes)


@pytest.mark.slow
def test_a_dropped_eps_in_the_atomic_dbnvar_is_within_tolerance_but_not_bitwise(dataset, monkeypatch, fresh_traces):
    """``dbnvar = -1/2 bnvar^(-3/2) dbnvar_inv`` (no ``eps``; ~5e-6 relative): only the bitwise check
    sees it."""
    monkeypatch.setattr(manual, "block_backward", eps_dropped_in(layers={1}))
    rows = gradcheck.atomic_rows(*problem(dataset, 32, 64, 0, jnp.float32), TOL)
    assert all(r.close for r in rows), gradcheck.format_table(rows, "dropped eps")
    assert "bnvar[1]" in gradcheck.not_bitwise(rows) and "bnvar_inv[1]" not in gradcheck.not_bitwise(rows)


def eps_dropped_in(layers):
    """``manual.block_backward`` with ``eps = 0`` in its ``dbnvar`` for the blocks in ``layers`` only."""
    original = manual.block_backward

    def block_backward(params, layer, v, dh, eps=ops.BN_EPS):
        return original(params, layer, v, dh, 0.0 if layer in layers else eps)

    return block_backward


def test_bitwise_equality_is_claimed_in_float32_on_cpu_only():
    assert gradcheck.atomic_bitwise_claimed("float32", "cpu")
    assert not gradcheck.atomic_bitwise_claimed("float64", "cpu") and not gradcheck.atomic_bitwise_claimed(
        "float32", "gpu"
    )


# --- the script ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_script_passes_prints_every_table_the_jaxprs_and_plots(capsys, tmp_path):
    """float32 here; float64 through the same functions is covered above and in test_manual."""
    script = load_script("gradcheck")
    code = script.main(["--hidden", "24", "--batch-size", "16", "--plot", str(tmp_path), "--show-jaxpr"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("### ") == 4 * 4 + 1 + 3 and "| bnvar_inv[1] |" in out and "OK: all 53 tensors" in out
    assert "| tensor | atomic | custom_vjp | custom_jvp | manual |" in out
    assert "### atomic manual backward vs jax.grad: block 1" in out
    assert "16x24 (classes 29)" in out and "cross_entropy ok, batch_norm ok" in out
    counts = {rules: int(out.split(f"backward pass, {rules}: ")[1].split()[0]) for rules in ("autodiff", "custom_vjp")}
    assert counts["custom_vjp"] < counts["autodiff"]  # what the closed form removes
    assert (tmp_path / "dlogits.png").stat().st_size > 0 and (tmp_path / "tolerances.png").stat().st_size > 0


@pytest.fixture
def finite_differences_recorded(monkeypatch):
    """The script's finite-difference check replaced by a recorder of the shapes it is asked for (the
    check itself is tested above): the script tests below then cost the tables alone."""
    asked = []
    monkeypatch.setattr(finite_differences, "check_rules", lambda key, shapes: asked.append(tuple(shapes)))
    return asked


SMALL = ["--hidden", "3", "--batch-size", "5"]


@pytest.mark.slow
def test_script_passes_and_checks_finite_differences_at_the_users_shape(capsys, finite_differences_recorded):
    script = load_script("gradcheck")
    assert script.main(SMALL) == 0
    out = capsys.readouterr().out
    assert finite_differences_recorded == [(finite_differences.FDShape(5, 3, 29), *finite_differences.FD_SHAPES)]
    assert "OK: all 53 tensors" in out and "the atomic pass's 26 all bitwise equal" in out


@pytest.mark.slow
def test_script_fails_when_a_tensor_is_outside_tolerance(monkeypatch, capsys, finite_differences_recorded):
    """With a zero tolerance, the non-bitwise rows (fused, custom) must fail the run."""
    script = load_script("gradcheck")
    monkeypatch.setitem(gradcheck.TOLERANCES, np.dtype("float32"), gradcheck.Tolerance(0.0, 0.0))
    assert script.main(SMALL) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.slow
def test_script_fails_when_the_atomic_pass_is_not_bitwise(
    monkeypatch, capsys, fresh_traces, finite_differences_recorded
):
    """A dropped eps in the atomic dbnvar: within tolerance, so only the bitwise claim can fail it."""
    if not gradcheck.atomic_bitwise_claimed("float32"):
        pytest.skip(f"bitwise equality is not claimed on {jax.default_backend()}")
    monkeypatch.setattr(manual, "block_backward", eps_dropped_in(layers={1}))
    script = load_script("gradcheck")
    assert script.main([]) == 1  # the default sizes (at batch 5, hidden 3 the tolerance sees it too)
    captured = capsys.readouterr()
    assert "**NO**" not in captured.out
    failed = captured.err.split("not bitwise equal to jax.grad")[1]
    assert "bnvar[1]" in failed and "hprebn[1]" in failed and "bnvar_inv[1]" not in failed


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


# --- depth: every table per layer, an error in one layer is seen in that layer -----------------------

DEEP = (8, 6, 5)  # three blocks of different widths, so that a tensor read from the wrong block has the wrong shape


@pytest.mark.slow
def test_deep_tables_cover_every_block_and_group_by_layer(dataset):
    params, X, Y = problem(dataset, 16, DEEP, 3, jnp.float32)
    tables = gradcheck.all_tables(params, X, Y, TOL)
    assert list(tables) == ["atomic", "custom_vjp", "custom_jvp", "manual"]
    atomic = [row.name for row in tables["atomic"]]
    assert set(atomic) == {*manual.intermediates(3), *model.param_names(model.ModelConfig(hidden=DEEP))}
    assert [row.name for row in tables["manual"]][:4] == ["logits", "hprebn[3]", "hprebn[2]", "hprebn[1]"]
    assert all(row.close for rows in tables.values() for row in rows)
    assert not gradcheck.not_bitwise(tables["atomic"])
    groups = gradcheck.by_layer(tables["atomic"], 3)
    assert list(groups) == ["loss", "output layer", "block 3", "block 2", "block 1", "embedding"]
    assert {row.name for row in groups["block 2"]} == {
        *(model.layer_name(name, 2) for name in manual.BLOCK_INTERMEDIATES),
        *model.block_param_names(2),
    }
    assert {row.name for row in groups["output layer"]} == {"W4", "b4"}


def in_block(layer, broken, original):
    """A batch-norm rule that is ``broken`` in block ``layer`` only: every trace calls the rule once per
    block, in order (forward: 1 to L; the fused backward: L to 1), so the call count says which block is
    being traced. The tests plant in block 2 of 3, which is the second call either way."""
    calls = []

    def rule(*args):
        calls.append(None)
        block = (len(calls) - 1) % len(DEEP) + 1
        return (broken if block == layer else original)(*args)

    return rule


def failed_rows(rows):
    return {row.name for row in rows if not row.close}


def above(layer):
    """Every tensor the backward pass reaches before block ``layer``: they must still pass."""
    later = range(layer + 1, len(DEEP) + 1)
    names = {"logits", f"W{len(DEEP) + 1}", f"b{len(DEEP) + 1}"}
    for block in later:
        names |= {model.layer_name("hprebn", block), *model.block_param_names(block)}
    return names


@pytest.mark.slow
def test_an_error_planted_in_one_blocks_rule_is_seen_from_that_block_down(dataset, monkeypatch, fresh_traces):
    """Batch norm's backward off by 1e-3 in block 2 of 3 only, in each hand-written mode: block 2's
    ``hprebn`` and everything below it fail; the output layer and block 3 pass (a rule shared wrongly
    across layers, or a block's gradient read from another block, fails this)."""
    params, X, Y = problem(dataset, 16, DEEP, 3, jnp.float32)
    noise = gradcheck.boundary_noise(params, X, Y)
    original_closed_form = closed_forms.batch_norm_backward

    def off(x_hat, inv_std, gain, dy):
        dx, dgain, dbias = original_closed_form(x_hat, inv_std, gain, dy)
        return dx * (1 + 1e-3), dgain, dbias

    monkeypatch.setattr(closed_forms, "batch_norm_backward", in_block(2, off, original_closed_form))
    rows = gradcheck.mode_rows(params, X, Y, "manual", TOL, noise)  # the fused pass calls it per block
    assert {"hprebn[2]", "hprebn[1]", "W2", "W1", "C"} <= failed_rows(rows), gradcheck.format_table(rows, "fused")
    assert not failed_rows(rows) & above(2), gradcheck.format_table(rows, "fused")
    monkeypatch.undo()

    broken_rule = broken_batch_norm(functools.partial(_bn_bwd_scaled, 1 + 1e-3))
    rule_set = model.RULE_SETS["custom_vjp"]
    planted = in_block(2, lambda x, g, b, tap: broken_rule(x, g, b), rule_set.batch_norm)
    monkeypatch.setitem(model.RULE_SETS, "custom_vjp", dataclasses.replace(rule_set, batch_norm=planted))
    jax.clear_caches()
    rows = gradcheck.mode_rows(params, X, Y, "custom_vjp", TOL, noise)
    assert {"hprebn[2]", "hprebn[1]", "W2", "W1", "C"} <= failed_rows(rows), gradcheck.format_table(rows, "vjp")
    assert not failed_rows(rows) & above(2), gradcheck.format_table(rows, "vjp")


@pytest.mark.slow
def test_an_error_planted_in_one_blocks_atomic_step_fails_there_and_below(dataset, monkeypatch, fresh_traces):
    """The atomic pass with ``dbnvar`` off (eps dropped, within tolerance) in block 2 of 3 only: bitwise
    equality fails at block 2's ``bnvar`` and below, and holds in block 3 and the loss side."""
    params, X, Y = problem(dataset, 32, DEEP, 4, jnp.float32)
    monkeypatch.setattr(manual, "block_backward", eps_dropped_in(layers={2}))
    rows = gradcheck.atomic_rows(params, X, Y, TOL)
    differ = set(gradcheck.not_bitwise(rows))
    assert {"bnvar[2]", "hprebn[2]", "h[1]", "hprebn[1]", "W1", "C"} <= differ
    assert not differ & {"h[2]", "bnvar_inv[2]", "hprebn[3]", "bnvar[3]", "W3", "logits", "W4"}


@pytest.mark.slow
def test_script_checks_three_blocks_in_both_precisions_bitwise(capsys, finite_differences_recorded):
    """The acceptance check: ``--hidden 64 32 16`` passes in float32 and float64 with the atomic pass
    bitwise equal to jax.grad on every tensor (52 of them), and finite differences at each width."""
    script = load_script("gradcheck")
    for dtype in ("float32", "float64"):
        assert script.main(["--hidden", "64", "32", "16", "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        atomic = "".join(t for t in out.split("### ") if t.startswith("atomic manual backward vs jax.grad: "))
        assert atomic.count("| yes | yes |") == 52 and "| no |" not in atomic, dtype
        assert "### custom_vjp rules vs jax.grad: block 3" in out
    shapes = finite_differences_recorded[-1]
    assert [s.hidden for s in shapes[:3]] == [16, 32, 64]


@pytest.mark.slow
def test_script_fails_when_one_blocks_rule_is_wrong(monkeypatch, capsys, fresh_traces, finite_differences_recorded):
    original = closed_forms.batch_norm_backward

    def off(x_hat, inv_std, gain, dy):
        dx, dgain, dbias = original(x_hat, inv_std, gain, dy)
        return dx * (1 + 1e-3), dgain, dbias

    monkeypatch.setattr(closed_forms, "batch_norm_backward", in_block(2, off, original))
    script = load_script("gradcheck")
    assert script.main(["--hidden", *map(str, DEEP), "--batch-size", "16"]) == 1
    err = capsys.readouterr().err
    assert "fused manual backward vs jax.grad: hprebn[2]" in err and "hprebn[3]" not in err
