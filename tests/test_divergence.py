"""No silent garbage: a model whose numbers stopped being numbers is diverged, in train.py, sweep.py and sampling."""

import math

import numpy as np
import pytest
from test_gradcheck import load_script
from test_train_cli import SMALL, run_cli, strict_json

from jaxbirds import checkpoint, divergence, sample
from jaxbirds.model import BatchNormStats


def test_the_first_bad_step_is_the_first_loss_that_is_not_finite():
    assert divergence.first_bad_step(np.array([3.0, 2.0, 1.0], np.float32)) is None
    assert divergence.first_bad_step(np.array([3.0, np.inf, np.nan])) == 1
    assert divergence.first_bad_step(np.array([3.0, 2.0, -np.inf])) == 2
    assert divergence.first_bad_step(np.array([np.nan])) == 0


def test_statistics_and_losses_that_are_no_result_are_named():
    finite = (BatchNormStats(np.zeros((1, 4)), np.ones((1, 4))),)
    assert divergence.statistics_problem(finite) is None
    overflowed = (BatchNormStats(np.zeros((1, 4)), np.array([[1.0, np.inf, np.nan, 2.0]])),)
    assert divergence.statistics_problem(overflowed) == (
        "batch norm's variance over the training split is not finite in 2 of 4 units of block 1"
    )
    infinite_mean = (BatchNormStats(np.full((1, 2), -np.inf), np.ones((1, 2))),)
    assert "mean over the training split is not finite in 2 of 2 units" in divergence.statistics_problem(infinite_mean)

    assert divergence.loss_problem({"train": 1.3, "dev": None, "test": 1.4}) is None  # an empty split is no problem
    assert "dev split is not finite" in divergence.loss_problem({"train": 1.3, "dev": math.nan, "test": 1.4})
    exploded = divergence.loss_problem({"train": 4.5e9, "dev": 2.0, "test": 4.4e9})
    assert "train and test splits has exploded" in exploded and "4.5e+09" in exploded
    # the bound: -log of float32's smallest normal number, so that exp(-loss) still exists in float32
    assert divergence.EXPLODED_LOSS == pytest.approx(87.3365, abs=1e-4)
    assert np.exp(np.float32(-divergence.EXPLODED_LOSS + 0.01)) >= np.finfo(np.float32).tiny
    assert divergence.loss_problem({"train": 87.3}) is None and divergence.loss_problem({"train": 87.4}) is not None
    assert divergence.evaluation_problem(overflowed, {"train": 1.0}).startswith("batch norm's variance")
    assert divergence.evaluation_problem(finite, {"train": math.inf}).startswith("the loss")


def test_the_block_whose_statistics_are_not_finite_is_named():
    """Three blocks of widths 4, 3, 5: the message names the first block whose statistics are not finite."""
    blocks = [BatchNormStats(np.zeros((1, width)), np.ones((1, width))) for width in (4, 3, 5)]
    assert divergence.statistics_problem(tuple(blocks)) is None
    bad_third = BatchNormStats(np.zeros((1, 5)), np.array([[1.0, np.nan, 2.0, 3.0, np.inf]]))
    third = (*blocks[:2], bad_third)
    assert divergence.statistics_problem(third).endswith(
        "variance over the training split is not finite in 2 of 5 units of block 3"
    )
    second = (blocks[0], BatchNormStats(np.array([[np.inf, 0.0, 0.0]]), np.ones((1, 3))), bad_third)
    assert divergence.statistics_problem(second).endswith(
        "mean over the training split is not finite in 1 of 3 units of block 2"
    )
    assert "block 3" in divergence.evaluation_problem(third, {"train": 1.0})


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--lr", "1e9", "--hidden", "200"], "variance over the training split is not finite"),
        (["--lr", "1e9", "--hidden", "16"], "has exploded"),
        (["--lr", "1e18", "--hidden", "16", "--grad", "custom_vjp"], "not finite"),
    ],
    ids=["statistics overflow", "losses explode", "custom_vjp"],
)
@pytest.mark.slow
def test_a_run_whose_evaluation_overflows_has_diverged(train_script, tmp_path, capsys, args, problem):
    """Training losses stay finite (~1e9 to 1e19), the evaluation does not: exit 1, the divergence
    message with a command that starts again, no nan anywhere, no metrics, the trained state kept."""
    out_dir = tmp_path / "run"
    code, out, err = run_cli(train_script, [*SMALL, "--steps", "1000", *args, "--out", str(out_dir)], capsys)
    assert code == 1, out + err
    assert "error: the model diverged" in out and problem in out and "--overwrite" in out and "--lr" in out
    assert "nan" not in out.lower() and "samples" not in out and "Traceback" not in err
    assert not (out_dir / "metrics.json").exists()
    saved = checkpoint.load(out_dir / "checkpoint.npz")
    assert saved.state.step == 1000 and saved.stats is None

    # sampling from it is refused with one line, by the same definition, rather than printing garbage names
    code, out, err = run_cli(load_script("sample"), ["--checkpoint", str(out_dir / "checkpoint.npz")], capsys)
    assert code == 2 and "has diverged" in err and len(err.strip().splitlines()) == 1 and not out


@pytest.mark.slow
def test_a_sweep_model_whose_losses_explode_counts_as_diverged(tmp_path, capsys):
    """The sweep uses the same definition: a model with finite but exploded losses is diverged too."""
    args = ["--hidden", "16", "--chunk", "500", "--steps", "1000", "--lr", "1e9", "0.1", "--seeds", "1", "--no-plot"]
    args += ["--out", str(tmp_path)]
    code, out, _ = run_cli(load_script("sweep"), args, capsys)
    report = strict_json(tmp_path / "sweep.json")
    assert code == 0 and [r["diverged_at"] for r in report["runs"]] == [1000, None] and report["best"] == 1
    assert "nan" not in out.lower()


def test_an_empty_name_is_shown_visibly():
    assert sample.shown("", True) == sample.EMPTY_NAME and sample.EMPTY_NAME.strip()
    assert sample.shown("emu", True) == "emu" and sample.shown("emuuu", False) == "emuuu ..."
    assert sample.shown("", False) == sample.EMPTY_NAME + " ..."
