"""The comparison machinery and the gradcheck script."""

import importlib.util

import numpy as np
import pytest
from conftest import ROOT

from jaxbirds import gradcheck

TOL = gradcheck.Tolerance(rtol=1e-5, atol=1e-8)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_tells_exact_close_and_far_apart():
    ref = np.array([1.0, -2.0, 0.0], np.float32)
    assert gradcheck.compare("a", ref.copy(), ref, TOL)[2:4] == (True, True)
    nudged = ref + np.array([1e-6, 0, 0], np.float32)
    row = gradcheck.compare("b", nudged, ref, TOL)
    assert (row.exact, row.close) == (False, True)
    far = ref + np.array([0, 1e-3, 0], np.float32)
    row = gradcheck.compare("c", far, ref, TOL)
    assert (row.exact, row.close) == (False, False)
    assert row.max_abs == pytest.approx(1e-3, rel=1e-3) and row.max_rel == pytest.approx(5e-4, rel=1e-3)


def test_compare_on_a_zero_reference_uses_the_absolute_floor():
    """The b1 situation: a reference of pure rounding noise around 0."""
    row = gradcheck.compare("b1", np.array([3e-9]), np.array([0.0]), TOL)
    assert row.close and row.max_rel == np.inf
    assert not gradcheck.compare("b1", np.array([3e-8]), np.array([0.0]), TOL).close


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


def test_script_passes_prints_three_tables_and_plots(capsys, tmp_path):
    """float32 here; float64 through the same functions is covered in test_manual and test_vjp."""
    script = load_script("gradcheck")
    code = script.main(["--hidden", "24", "--batch-size", "16", "--plot", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("### ") == 3 and "| bnvar_inv |" in out and "OK: all 42 tensors" in out
    assert (tmp_path / "dlogits.png").stat().st_size > 0 and (tmp_path / "relative_errors.png").stat().st_size > 0


def test_script_fails_when_a_tensor_is_outside_tolerance(monkeypatch, capsys):
    """With a zero tolerance, the non-bitwise rows (fused, custom) must fail the run."""
    script = load_script("gradcheck")
    monkeypatch.setitem(gradcheck.TOLERANCES, np.dtype("float32"), gradcheck.Tolerance(0.0, 0.0))
    assert script.main(["--hidden", "24", "--batch-size", "16"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_script_rejects_a_batch_of_one(capsys):
    script = load_script("gradcheck")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--batch-size", "1"])
    assert exit_info.value.code == 2
    assert "at least 2" in capsys.readouterr().err
