"""Output directories: one list of files, checked once and completely; nothing created on refusal; one run at a time."""

import subprocess
import sys

import pytest
from conftest import ROOT
from test_gradcheck import load_script
from test_train_cli import SMALL, run_cli

from jaxbirds import outputs
from jaxbirds.errors import OutputError


def test_the_checks_prove_a_directory_writable_without_creating_it(tmp_path):
    nested = tmp_path / "a" / "b" / "c"
    assert outputs.check_writable_dir(nested) == nested
    assert list(tmp_path.iterdir()) == []  # no directory, no probe file left behind
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(OutputError, match="afile exists and is not a directory"):
        outputs.check_writable_dir(blocker / "sub")
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        outputs.check_writable_file(tmp_path)
    assert outputs.make_dir(nested).is_dir()


@pytest.mark.parametrize("name", outputs.ALL_FILES)
def test_every_file_either_script_writes_or_removes_is_checked(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(OutputError, match=f"{name} is a directory"):
        outputs.prepare(tmp_path, (), "results", outputs.CHECKPOINT, overwrite=True)


def test_saved_results_are_refused_unasked_and_the_advice_fits_the_script(tmp_path):
    (tmp_path / outputs.SWEEP_JSON).write_text("{}")
    with pytest.raises(OutputError, match="pass --overwrite, or another --out"):
        outputs.prepare(tmp_path, outputs.ALL_FILES, "a saved run", outputs.CHECKPOINT)
    (tmp_path / outputs.CHECKPOINT).write_bytes(b"")
    with pytest.raises(OutputError, match="--resume to continue it"):
        outputs.prepare(tmp_path, outputs.ALL_FILES, "a saved run", outputs.CHECKPOINT)
    with pytest.raises(OutputError, match="pass --overwrite, or another --out"):  # no sweep to resume there
        outputs.prepare(tmp_path, outputs.ALL_FILES, "results", outputs.SWEEP_STATE)
    outputs.prepare(tmp_path, outputs.ALL_FILES, "results", outputs.SWEEP_STATE, overwrite=True)
    outputs.prepare(tmp_path, outputs.ALL_FILES, "a saved run", outputs.CHECKPOINT, resume=True)


def test_remove_stale_removes_every_listed_file_but_those_kept_and_nothing_else(tmp_path):
    for name in (*outputs.ALL_FILES, "notes.txt"):
        (tmp_path / name).write_text("x")
    outputs.remove_stale(tmp_path, keep=(outputs.CHECKPOINT,))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([outputs.CHECKPOINT, "notes.txt"])


@pytest.mark.parametrize(
    "args",
    [["--batch-size", "100000000"], ["--steps", "100000000", "--chunk", "100000000"]],
    ids=["batch", "chunk"],
)
def test_a_run_refused_for_memory_creates_nothing(tmp_path, capsys, args):
    """These sizes are refused by XLA's memory analysis of the compiled program, after the output checks:
    the refusal must not leave an empty --out behind."""
    out_dir = tmp_path / "new" / "run"
    code, out, err = run_cli(load_script("train"), [*SMALL, *args, "--out", str(out_dir)], capsys)
    assert code == 2 and "memory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_sweep_checks_every_file_it_may_replace_before_training(tmp_path, capsys):
    (tmp_path / "metrics.json").mkdir()
    args = ["--hidden", "16", "--steps", "300", "--chunk", "300", "--lr", "0.1", "--seeds", "1", "--overwrite"]
    code, out, err = run_cli(load_script("sweep"), [*args, "--out", str(tmp_path)], capsys)
    assert code == 2 and "metrics.json is a directory" in err and "step" not in out and "Traceback" not in err


def test_a_run_replacing_a_sweep_removes_the_sweep_s_files(tmp_path, capsys):
    for name in (outputs.SWEEP_JSON, outputs.SWEEP_PLOT):
        (tmp_path / name).write_text("from a sweep")
    code, _, err = run_cli(load_script("train"), [*SMALL, "--steps", "500", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--overwrite" in err  # a sweep's results are not replaced unasked
    args = [*SMALL, "--steps", "500", "--no-plot", "--overwrite", "--out", str(tmp_path)]
    assert run_cli(load_script("train"), args, capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([outputs.LOCK, *outputs.RUN_FILES[:3]])


def test_a_second_run_into_a_directory_in_use_is_refused_and_a_killed_one_blocks_nothing(tmp_path, capsys):
    out_dir = tmp_path / "new" / "run"
    with outputs.claimed(out_dir):
        assert out_dir.is_dir()
        with pytest.raises(OutputError, match="in use by another run"):
            with outputs.claimed(out_dir):
                pass  # pragma: no cover
        assert (out_dir / outputs.LOCK).exists()  # the refused run took nothing away from the one holding it
        code, out, err = run_cli(load_script("train"), [*SMALL, "--steps", "300", "--out", str(out_dir)], capsys)
        assert code == 2 and "in use by another run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()  # nothing was written: what the lock needed is gone again

    # a process killed while it holds the lock: the kernel releases it, and the next run goes ahead
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(out_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="in use"):
            with outputs.claimed(out_dir):
                pass  # pragma: no cover
        holder.kill()
        holder.wait(timeout=30)
    finally:
        holder.kill()
    code, _, err = run_cli(load_script("train"), [*SMALL, "--steps", "300", "--no-plot", "--out", str(out_dir)], capsys)
    assert code == 0, err


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from jaxbirds import outputs
with outputs.claimed(Path(sys.argv[1])):
    (Path(sys.argv[1]) / "marker").write_text("a run's file")
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_refused_command_into_an_existing_directory_leaves_it_as_it_was(tmp_path, capsys):
    (tmp_path / outputs.SWEEP_JSON).write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(load_script("train"), [*SMALL, "--steps", "300", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock file left behind either
