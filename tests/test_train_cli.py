"""scripts/train.py and scripts/sample.py end to end, on small configurations."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from test_gradcheck import load_script

from jaxbirds import checkpoint, cli, evaluate, model, runner, sample, train
from jaxbirds.checkpoint_writer import LossLog

SMALL = ["--hidden", "16", "--chunk", "500", "--log-every", "500", "--samples", "3"]


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


def strict_json(path):
    """Parse as strict JSON: NaN and Infinity, which Python writes by default, are refused."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


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
    assert "outside training:" in out and "imports" in out
    assert "172,427 / 21,478 / 21,599" in out and "ETA" in out and "steps/s" in out
    assert "train " in out and "dev " in out and "test " in out
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["step"] == 1000 and len(LossLog(tmp_path / "losses.f32").read(1000)) == 1000
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
        (["--seed", "99999999999999999999"], "from 0 to"),
        (["--lr", "inf"], "finite"),
        (["--embedding", "100000000"], "memory"),
        (["--samples", "100000000000"], "--samples"),
        (["--resume", "--overwrite"], "not allowed with"),
        (["--decay-step", "3000000000"], "2**31"),
        (["--batch-size", "3000000000"], "2**31"),
        (["--steps", "3000000000", "--chunk", "3000000000"], "2**31"),
        (["--hidden"], "argument --hidden: expected at least one argument"),
        (["--hidden", "0"], "argument --hidden: must be a positive integer, got 0"),
        (["--hidden", "16", "-3"], "argument --hidden: must be a positive integer, got -3"),
        (["--hidden", "16", "0"], "argument --hidden: must be a positive integer, got 0"),
        (["--hidden", "16", "x"], "argument --hidden: invalid positive_int value: 'x'"),
        (["--hidden", "16", "100000000"], "memory"),  # the second block's 16 x 1e8 weights
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(train_script, tmp_path, capsys, args, message):
    code, out, err = run_cli(train_script, [*SMALL, *args, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_hidden_takes_a_width_per_block(train_script, dataset):
    for flags, hidden in [([], (200,)), (["--hidden", "16"], (16,)), (["--hidden", "16", "8"], (16, 8))]:
        model_config, _ = train_script.new_configs(train_script.parse_args(flags), dataset)
        assert model_config.hidden == hidden and model_config.depth == len(hidden)
    assert cli.given(train_script.parse_args(["--hidden", "16", "8"]), cli.MODEL_FLAGS) == {"hidden": (16, 8)}
    assert cli.describe_hidden((200,)) == "hidden 200"
    assert cli.describe_hidden((100,) * 4) == "hidden 100 100 100 100 (4 blocks)"


@pytest.mark.slow
def test_a_run_of_two_blocks_trains_samples_and_resumes(train_script, tmp_path, capsys):
    args = ["--hidden", "16", "12", "--steps", "500", "--chunk", "250", "--samples", "2", "--no-plot"]
    code, out, err = run_cli(train_script, [*args, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "hidden 16 12 (2 blocks)" in out
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved.model_config.hidden == (16, 12) and [s.var.shape for s in saved.stats] == [(1, 16), (1, 12)]
    assert strict_json(tmp_path / "metrics.json")["parameters"] == model.param_count_for(saved.model_config)
    code, out, _ = run_cli(load_script("sample"), ["--checkpoint", str(tmp_path / "checkpoint.npz"), "--count", "3"],
                           capsys)  # fmt: skip
    assert code == 0 and len(out.strip().splitlines()) == 3 + 2
    code, _, err = run_cli(train_script, ["--resume", "--hidden", "16", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--hidden 16 (the run's is 16 12)" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(train_script, ["--resume", "--hidden", "16", "12", "--steps", "750", "--out",
                                            str(tmp_path)], capsys)  # fmt: skip
    assert code == 0 and "resuming" in out and "--steps 500 -> 750" in out, err
    assert checkpoint.load(tmp_path / "checkpoint.npz").state.step == 750


def test_empty_data_file_and_bad_checkpoints(train_script, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    code, _, err = run_cli(train_script, ["--data", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 2 and "no names" in err

    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    code, _, err = run_cli(train_script, ["--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "not a readable checkpoint" in err


@pytest.mark.slow
def test_a_checkpoint_from_other_data_is_refused(train_script, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("\n".join(f"bird {c}{c}" for c in "abcdefghij") + "\n")
    code, _, _ = run_cli(
        train_script, ["--data", str(other), "--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    shipped = str(ROOT / "datasets" / "birds" / "birds.csv")
    code, _, err = run_cli(train_script, ["--resume", "--data", shipped, "--out", str(tmp_path)], capsys)
    assert code == 2 and "vocabulary" in err
    code, out, _ = run_cli(train_script, ["--resume", "--no-plot", "--out", str(tmp_path)], capsys)
    assert code == 0 and "resuming" in out  # without --data, the run's own data file


@pytest.mark.slow
def test_divergence_says_where_keeps_the_last_finite_state_and_advises_a_command_that_works(
    train_script, tmp_path, capsys
):
    code, out, _ = run_cli(train_script, ["--lr", "1e30", "--steps", "2000", *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 1
    assert "non-finite at step" in out and "lower learning rate" in out
    ckpt = checkpoint.load(tmp_path / "checkpoint.npz")
    assert all(np.all(np.isfinite(np.asarray(p))) for p in ckpt.state.params.values())
    diverged_at = int(out.split("non-finite at step ")[1].split(".")[0].replace(",", ""))
    assert ckpt.state.step == diverged_at - 1
    assert len(LossLog(tmp_path / "losses.f32").read(ckpt.state.step)) == ckpt.state.step
    advice = next(line.strip() for line in out.splitlines() if "scripts/train.py --resume" in line)
    args = advice.split("scripts/train.py ")[1].split()
    code, out, err = run_cli(train_script, args, capsys)
    # accepted, and it resumes from the saved state with the new learning rate (1e29 still overflows,
    # so it may diverge again: exit 1 with new advice, never a refusal)
    assert code in (0, 1) and not err, err
    assert f"at step {ckpt.state.step:,}" in out and "--lr 1e+30 -> 1e+29" in out


def test_a_saved_state_that_is_itself_non_finite_gets_honest_advice(train_script, tmp_path, capsys):
    """If the very first loss of a resumed run is not finite, no state with a finite loss exists to
    save and no learning rate can help: the run says so, advises a fresh start, and keeps the file."""
    assert run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    # finite weights (a checkpoint refuses non-finite ones) whose products overflow: the loss is not finite
    broken = {**saved.state.params, "W2": np.full_like(saved.state.params["W2"], np.finfo(np.float32).max)}
    checkpoint.save(tmp_path / "checkpoint.npz", saved._replace(state=saved.state._replace(params=broken)))
    code, out, _ = run_cli(train_script, ["--resume", "--steps", "1000", "--out", str(tmp_path)], capsys)
    assert code == 1 and "already non-finite at step 500" in out and "--overwrite" in out
    assert checkpoint.load(tmp_path / "checkpoint.npz").state.step == 500


def test_a_new_run_never_replaces_a_saved_one_unasked(train_script, tmp_path, capsys):
    assert run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0
    before = (tmp_path / "checkpoint.npz").read_bytes()
    code, out, err = run_cli(train_script, ["--steps", "500", *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err and "step" not in out
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    code, _, _ = run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--seed", "5", "--overwrite",
                                        "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 0 and checkpoint.load(tmp_path / "checkpoint.npz").train_config.seed == 5


def test_resume_applies_what_may_change_and_refuses_the_rest(train_script, tmp_path, capsys):
    assert run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0
    for flags, message in [(["--hidden", "64"], "--hidden 64"), (["--grad", "manual"], "--grad manual"),
                           (["--hidden", "16", "16"], "--hidden 16 16 (the run's is 16)"),
                           (["--optimizer", "adam"], "--optimizer adam"), (["--seed", "1"], "--seed 1"),
                           (["--batch-size", "8"], "--batch-size 8"), (["--steps", "100"], "below")]:  # fmt: skip
        code, _, err = run_cli(train_script, ["--resume", *flags, "--out", str(tmp_path)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    other = tmp_path / "other.csv"
    other.write_text((ROOT / "datasets" / "birds" / "birds.csv").read_text() + "extra bird\n")
    code, _, err = run_cli(train_script, ["--resume", "--data", str(other), "--out", str(tmp_path)], capsys)
    assert code == 2 and "not the data this run was trained on" in err

    args = ["--resume", "--steps", "1000", "--lr", "0.05", "--chunk", "250", "--hidden", "16", "--no-plot"]
    code, out, _ = run_cli(train_script, [*args, "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "--steps 500 -> 1,000" in out and "--lr 0.1 -> 0.05" in out and "--chunk 500 -> 250" in out
    ckpt = checkpoint.load(tmp_path / "checkpoint.npz")
    assert (ckpt.state.step, ckpt.train_config.learning_rate, ckpt.train_config.chunk_size) == (1000, 0.05, 250)


@pytest.mark.slow
def test_a_refused_overwrite_leaves_the_saved_run_resumable(train_script, tmp_path, capsys):
    """--overwrite with a configuration refused after the checks of the arguments (here: a training
    program too big for memory) must not have touched the saved checkpoint or its loss log."""
    assert run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0
    files = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.npz", "losses.f32", "metrics.json")}
    args = ["--overwrite", "--steps", "100000000", "--chunk", "100000000", "--hidden", "8", "--out", str(tmp_path)]
    code, _, err = run_cli(train_script, args, capsys)
    assert code == 2 and "memory" in err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert run_cli(train_script, ["--resume", "--steps", "1000", "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0


def test_outputs_are_checked_before_any_training(train_script, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, out, err = run_cli(train_script, ["--steps", "500", *SMALL, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "afile" in err and "step" not in out and "Traceback" not in err
    (tmp_path / "run" / "metrics.json").mkdir(parents=True)
    code, out, err = run_cli(train_script, ["--steps", "500", *SMALL, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "metrics.json is a directory" in err and "step" not in out


@pytest.mark.slow
def test_metrics_are_strict_json_when_a_split_is_empty_and_nothing_is_left_to_train(train_script, tmp_path, capsys):
    two = tmp_path / "two.csv"
    two.write_text("emu\nkiwi\n")  # 80/10/10 of two names: train 1, dev 0, test 1
    out_dir = tmp_path / "run"
    args = ["--data", str(two), "--steps", "200", *SMALL, "--no-plot", "--out", str(out_dir)]
    assert run_cli(train_script, args, capsys)[0] == 0
    metrics = strict_json(out_dir / "metrics.json")
    assert metrics["loss"]["dev"] is None and metrics["loss"]["train"] > 0
    assert run_cli(train_script, ["--resume", "--out", str(out_dir), "--no-plot"], capsys)[0] == 0
    metrics = strict_json(out_dir / "metrics.json")
    assert metrics["timing"]["steps_per_second"] is None and metrics["step"] == 200


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_reaches_the_uninterrupted_result(train_script, tmp_path, capsys):
    """A real SIGINT to a real process; then --resume must end exactly where a straight run ends."""
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    common = ["--hidden", "16", "--chunk", "500", "--log-every", "500", "--samples", "2", "--no-plot"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--steps", "200000", *common, "--out", str(interrupted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
    np.testing.assert_array_equal(
        LossLog(interrupted / "losses.f32").read(int(total)), LossLog(straight / "losses.f32").read(int(total))
    )
    assert resumed["loss"] == direct["loss"]


@pytest.mark.slow
def test_a_second_run_compiles_nothing_new_and_the_cache_can_be_turned_off(tmp_path):
    """Two real processes sharing a new cache: the first fills it, the second finds every program there
    (no new entry appears); with --no-compile-cache nothing is written. The cache starts with an entry
    a killed process left without its -atime file, which stops JAX 0.10 from caching anything more:
    the first run gives it the oldest time and says so, and its training program is cached."""
    from jax._src.compilation_cache import compress_executable

    cache = tmp_path / "cache"
    env = {**os.environ, "JAXBIRDS_CACHE_DIR": str(cache)}
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--steps", "200", *SMALL, "--no-plot"]

    def entries():
        return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []

    subprocess.run([*args, "--no-compile-cache", "--out", str(tmp_path / "off")], check=True, env=env,
                   capture_output=True)  # fmt: skip
    assert entries() == []
    cache.mkdir()
    (cache / "jit_killed-0123abcd-cache").write_bytes(compress_executable(b"a compiled program"))
    first_run = subprocess.run([*args, "--out", str(tmp_path / "first")], check=True, env=env, capture_output=True)
    assert "1 now have the oldest" in first_run.stderr.decode()
    first = entries()
    assert any(name.startswith("jit_chunk") and name.endswith("-cache") for name in first)
    assert "jit_killed-0123abcd-cache" in first
    assert all(name.removesuffix("-cache") + "-atime" in first for name in first if name.endswith("-cache"))
    subprocess.run([*args, "--out", str(tmp_path / "second")], check=True, env=env, capture_output=True)
    assert entries() == first


def test_cache_repair_times_complete_entries_and_removes_only_unreadable_ones(tmp_path):
    """A complete program without its -atime gets the oldest time; a truncated one (a process killed
    while writing it) is removed; an entry with its time is left alone."""
    from jax._src.compilation_cache import compress_executable

    program = compress_executable(b"a compiled program" * 100)
    (tmp_path / "jit_whole-1-cache").write_bytes(program)
    (tmp_path / "jit_whole-1-atime").write_bytes((123).to_bytes(8, "little"))
    (tmp_path / "jit_orphan-2-cache").write_bytes(program)
    (tmp_path / "jit_truncated-3-cache").write_bytes(program[: len(program) // 2])
    assert cli.repair_compile_cache(tmp_path) == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "jit_orphan-2-atime", "jit_orphan-2-cache", "jit_whole-1-atime", "jit_whole-1-cache",
    ]  # fmt: skip
    assert int.from_bytes((tmp_path / "jit_orphan-2-atime").read_bytes(), "little") == 0
    assert int.from_bytes((tmp_path / "jit_whole-1-atime").read_bytes(), "little") == 123
    assert cli.repair_compile_cache(tmp_path) == (0, 0)


def test_the_warm_up_leaves_every_program_of_the_end_of_a_run_compiled(dataset, tmp_path, caplog):
    """After the warm-up on stand-in parameters, calibration, evaluation and sampling with trained
    (device) parameters compile nothing: not their jitted programs, not one op-by-op dispatch."""
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=24)
    params = model.init_params(jax.random.key(1), config)
    stand_in = jax.tree.map(lambda p: np.zeros(np.shape(p), p.dtype), params)
    runner._warm_up(stand_in, dataset, config.context_size, runner.RunOptions(out=tmp_path, samples=5, plot=False))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        stats = evaluate.calibrate(params, dataset.train.X)
        evaluate.split_loss(params, stats, dataset.dev.X, dataset.dev.Y)
        sample.sample_names(train.keys_for(3).sample, params, stats, dataset.vocab, config.context_size, count=5)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")] == []


def small_start(dataset, steps=300):
    mc = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    tc = train.TrainConfig(steps=steps, chunk_size=steps)
    return checkpoint.Checkpoint(train.init_state(mc, tc), None, dataset.vocab, mc, tc)


def test_long_evaluation_phases_print_progress(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.0)  # every batch counts as long
    options = runner.RunOptions(out=tmp_path, samples=0, plot=False)
    assert runner.run(dataset, small_start(dataset), options, log=sys.stdout) == runner.OK
    out = capsys.readouterr().out
    assert "calibrating batch norm: " in out and "evaluating the dev split: " in out and "% done after" in out


def test_a_stop_during_evaluation_ends_the_run_at_once_with_the_state_saved(dataset, tmp_path, capsys):
    """The stop request (Ctrl-C, SIGTERM) comes after the last chunk: training is complete, and the
    evaluation, polled between batches, ends at once with exit 130 instead of running to its end."""
    options = runner.RunOptions(out=tmp_path, samples=3, plot=True)
    code = runner.run(dataset, small_start(dataset), options, should_stop=lambda: True, log=sys.stdout)
    out = capsys.readouterr().out
    assert code == runner.INTERRUPTED and "interrupted during evaluation" in out and "--resume" in out
    assert checkpoint.load(tmp_path / "checkpoint.npz").state.step == 300
    assert not (tmp_path / "metrics.json").exists() and "loss (batch norm" not in out


def test_a_stop_during_training_keeps_the_last_chunk_and_skips_the_end_of_the_run(dataset, tmp_path, capsys):
    """The stop request comes after the first of three chunks: exit 130 with the command that continues,
    that chunk's state and losses saved, and none of the phases that follow training (evaluation,
    samples, loss.png, metrics.json)."""
    start = small_start(dataset, steps=900)
    start = start._replace(train_config=dataclasses.replace(start.train_config, chunk_size=300))
    options = runner.RunOptions(out=tmp_path, samples=3, plot=True)
    code = runner.run(dataset, start, options, should_stop=lambda: True, log=sys.stdout)
    out = capsys.readouterr().out
    assert code == runner.INTERRUPTED and "interrupted at step 300:" in out and "--resume" in out
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved.state.step == 300 and saved.stats is None
    assert len(LossLog(tmp_path / "losses.f32").read(300, saved.loss_log_crc32)) == 300
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.npz", "losses.f32"]
    assert "loss (batch norm" not in out and "samples" not in out


def test_a_progress_line_comes_once_log_every_more_steps_are_done_and_at_the_last_step(dataset, tmp_path, capsys):
    """Chunks of 200 steps, a line every 300: after the chunks that pass 300, 600, 900 and 1,200, and after
    the last one (1,400, short of 1,500); each line's loss is the mean of the last 300 steps' losses."""
    start = small_start(dataset, steps=1400)
    start = start._replace(train_config=dataclasses.replace(start.train_config, chunk_size=200))
    options = runner.RunOptions(out=tmp_path, samples=0, plot=False, log_every=300)
    assert runner.run(dataset, start, options, log=sys.stdout) == runner.OK
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line[1] for line in lines] == ["400/1,400", "600/1,400", "1,000/1,400", "1,200/1,400", "1,400/1,400"]
    losses = LossLog(tmp_path / "losses.f32").read(1400)
    assert lines[0][3] == f"{np.mean(losses[100:400]):.4f}" and lines[-1][3] == f"{np.mean(losses[1100:]):.4f}"


def test_an_overwrite_that_diverges_in_its_first_chunk_replaces_the_old_run_cleanly(train_script, tmp_path, capsys):
    assert run_cli(train_script, ["--steps", "500", *SMALL, "--no-plot", "--out", str(tmp_path)], capsys)[0] == 0
    args = ["--overwrite", "--lr", "1e30", "--steps", "2000", *SMALL, "--no-plot", "--out", str(tmp_path)]
    code, out, _ = run_cli(train_script, args, capsys)
    assert code == 1 and "non-finite" in out
    assert not (tmp_path / "metrics.json").exists()  # the old run's results went with its checkpoint
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved.train_config.learning_rate == 1e30
    LossLog(tmp_path / "losses.f32").read(saved.state.step, saved.loss_log_crc32)  # the new run's own history
