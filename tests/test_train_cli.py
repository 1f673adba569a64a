"""scripts/train.py and scripts/sample.py end to end, on small configurations."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from test_gradcheck import load_script

from jaxbirds import checkpoint, cli

SMALL = ["--hidden", "16", "--chunk", "500", "--log-every", "500", "--samples", "3"]


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


def run_cli(script, args, capsys):
    """Run a script's main the way `python scripts/x.py` does: exit code, stdout, stderr."""
    try:
        code = cli.run(script.main, args)
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_short_run_writes_checkpoint_metrics_and_plot(train_script, tmp_path, capsys):
    code, out, _ = run_cli(train_script, ["--steps", "1000", *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "172,427 / 21,478 / 21,599" in out and "ETA" in out and "steps/s" in out
    assert "train " in out and "dev " in out and "test " in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 1000 and len(metrics["loss_history"]) == 1000
    assert set(metrics["loss"]) == {"train", "dev", "test"} and metrics["loss"]["dev"] < 3.3
    assert len(metrics["samples"]) == 3 and metrics["parameters"] == 29 * 10 + 30 * 16 + 16 + 16 * 29 + 29 + 32
    assert (tmp_path / "loss.png").stat().st_size > 0
    ckpt = checkpoint.load(tmp_path / "checkpoint.npz")
    assert ckpt.state.step == 1000 and ckpt.stats is not None

    sample_script = load_script("sample")
    code, out, _ = run_cli(sample_script, ["--checkpoint", str(tmp_path / "checkpoint.npz"), "--count", "4"], capsys)
    assert code == 0 and "of finished names are in the training split" in out
    assert len(out.strip().splitlines()) == 4 + 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "1"], "at least 2"),
        (["--steps", "0"], "positive"),
        (["--lr", "0"], "positive"),
        (["--lr", "-0.1"], "positive"),
        (["--data", "/no/such/birds.csv"], "data file not found"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(train_script, tmp_path, capsys, args, message):
    code, out, err = run_cli(train_script, [*args, *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_data_file_and_bad_checkpoints(train_script, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    code, _, err = run_cli(train_script, ["--data", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 2 and "no names" in err

    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    code, _, err = run_cli(train_script, ["--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "not a readable checkpoint" in err


def test_a_checkpoint_from_other_data_is_refused(train_script, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("\n".join(f"bird {c}{c}" for c in "abcdefghij") + "\n")
    code, _, _ = run_cli(train_script, ["--data", str(other), "--steps", "500", *SMALL, "--no-plot",
                                        "--out", str(tmp_path)], capsys)
    assert code == 0
    code, _, err = run_cli(train_script, ["--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "vocabulary" in err


def test_divergence_says_where_and_keeps_the_last_finite_checkpoint(train_script, tmp_path, capsys):
    code, out, _ = run_cli(train_script, ["--lr", "1e30", "--steps", "2000", *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 1
    assert "non-finite at step" in out and "lower learning rate" in out
    ckpt = checkpoint.load(tmp_path / "checkpoint.npz")
    assert all(np.all(np.isfinite(np.asarray(p))) for p in ckpt.state.params.values())


def test_ctrl_c_saves_and_resume_reaches_the_uninterrupted_result(train_script, tmp_path, capsys):
    """A real SIGINT to a real process; then --resume must end exactly where a straight run ends."""
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    common = ["--hidden", "16", "--chunk", "500", "--log-every", "500", "--samples", "2", "--no-plot"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--steps", "200000", *common, "--out", str(interrupted)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "Traceback" not in err
    saved = checkpoint.load(interrupted / "checkpoint.npz")
    assert 500 <= saved.state.step < 200_000 and saved.state.step % 500 == 0

    total = str(max(saved.state.step + 1000, 6000))
    assert run_cli(train_script, ["--resume", "--steps", total, "--out", str(interrupted)], capsys)[0] == 0
    assert run_cli(train_script, ["--steps", total, *common, "--out", str(straight)], capsys)[0] == 0
    resumed = json.loads((interrupted / "metrics.json").read_text())
    direct = json.loads((straight / "metrics.json").read_text())
    assert resumed["loss_history"] == direct["loss_history"]
    assert resumed["loss"] == direct["loss"]
