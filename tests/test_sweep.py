"""Many models at once: each model of a sweep trains like its solo run, on one device or two."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from conftest import ROOT
from test_gradcheck import load_script
from test_train_cli import run_cli, strict_json

from jaxbirds import checkpoint, model, sweep, sweep_results, train
from jaxbirds.checkpoint_writer import LossLog
from jaxbirds.errors import ConfigError

STEPS, CHUNK = 1000, 400  # the last chunk is cut short by its stop step
RATES, SEED = (0.1, 0.2, 0.3, 0.05), 3
#: Model k of a sweep against its solo run, step by step. The two programs differ only in how XLA
#: batches the arithmetic (another summation order is a rounding of ~1e-7 per operation), and SGD
#: carries such differences along: 1e-4 over 1,000 steps is the issue's bound. Measured on the CPU
#: here: 0.0, bit-identical, with sgd in every case below; 4.8e-7 to 7.2e-7 with adam.
TOLERANCE = 1e-4


def small_configs(dataset, hidden=(16,), **changes):
    mc = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden)
    return mc, train.TrainConfig(**{"steps": STEPS, "chunk_size": CHUNK, **changes})


@pytest.fixture(scope="module")
def solo_losses(dataset):
    """The solo run of every (learning rate, SEED): what each model of a sweep must reproduce."""
    mc, _ = small_configs(dataset)
    losses = {}
    for lr in RATES:
        _, tc = small_configs(dataset, learning_rate=lr, seed=SEED)
        losses[lr] = train.train(dataset.train.X, dataset.train.Y, tc, train.init_state(mc, tc)).losses
    return losses


@pytest.mark.parametrize("group", [4, 2, 1], ids=["one vmapped group", "two groups of 2", "4 groups of 1"])
@pytest.mark.slow
def test_model_k_of_a_sweep_trains_like_its_solo_run(dataset, solo_losses, group):
    """Four models: one group of 4; two vmapped groups of 2, one after the other (lax.map); four
    groups of 1, each run unbatched."""
    mc, tc = small_configs(dataset)
    members = sweep.grid(RATES, [SEED])
    result = sweep.train_models(dataset.train.X, dataset.train.Y, mc, tc, members, sweep.make_mesh(1), group=group)
    assert result.losses.shape == (4, STEPS) and result.step == STEPS and result.diverged_at == [None] * 4
    for k, m in enumerate(members):
        np.testing.assert_allclose(result.losses[k], solo_losses[m.learning_rate], rtol=0, atol=TOLERANCE)
    # the saved optimiser state is the solo optimiser's: a sweep's model can continue as a solo run
    solo_state = small_configs(dataset)[1].make_optimizer().init(model.init_params(train.keys_for(0).init, mc))
    inner = sweep.member(result.opt_states, 0).inner_state
    assert jax.tree_util.tree_structure(inner) == jax.tree_util.tree_structure(solo_state)


@pytest.mark.slow
def test_with_adam_model_k_trains_like_its_solo_run_to_within_rounding(dataset):
    """Adam divides by sqrt(v), which XLA rounds differently in a batched kernel than alone: the
    sweep is not bit-identical here (it is with sgd), but stays within the issue's bound."""
    mc, tc = small_configs(dataset, optimizer="adam")
    members = sweep.grid([0.01, 0.003], [SEED])
    result = sweep.train_models(dataset.train.X, dataset.train.Y, mc, tc, members, sweep.make_mesh(1))
    for k, m in enumerate(members):
        solo_tc = dataclasses.replace(tc, learning_rate=m.learning_rate, seed=m.seed)
        solo = train.train(dataset.train.X, dataset.train.Y, solo_tc, train.init_state(mc, solo_tc))
        np.testing.assert_allclose(result.losses[k], solo.losses, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_a_diverging_model_leaves_the_others_unchanged(dataset):
    mc, tc = small_configs(dataset, steps=600, chunk_size=200)
    calm = sweep.train_models(dataset.train.X, dataset.train.Y, mc, tc, sweep.grid([0.1, 0.2], [SEED]),
                              sweep.make_mesh(1))  # fmt: skip
    wild = sweep.train_models(dataset.train.X, dataset.train.Y, mc, tc, sweep.grid([0.1, 1e30], [SEED]),
                              sweep.make_mesh(1))  # fmt: skip
    assert wild.diverged_at == [None, 1] and wild.step == 600 and not wild.stopped
    np.testing.assert_array_equal(wild.losses[0], calm.losses[0])
    assert np.isfinite(wild.losses[1, :1]).all() and np.isnan(wild.losses[1, 1:]).all()
    runs = [
        {"learning_rate": 0.1, "seed": SEED, "loss": {"dev": 2.5}, "diverged_at": None},
        {"learning_rate": 1e30, "seed": SEED, "loss": {"dev": None}, "diverged_at": 1},
    ]
    assert sweep_results.best_run(runs) == 0
    no_dev = [{**run, "loss": {"dev": None, "train": train}} for run, train in zip(runs, [2.0, 1.0], strict=True)]
    assert sweep_results.best_run(no_dev) == 0  # by the train loss; run 1 diverged
    nan_first = [{**runs[0], "learning_rate": 1e8, "loss": {"dev": float("nan")}}, runs[0]]
    assert sweep_results.best_run(nan_first) == 1 and sweep_results.summary_by_rate(nan_first)[0]["dev_mean"] is None
    assert sweep_results.summary_by_rate(runs)[1] == {
        "learning_rate": 1e30, "seeds": 1, "diverged": 1, "dev_mean": None, "dev_std": None,
    }  # fmt: skip


def test_the_summary_is_the_mean_and_sample_std_over_seeds_and_the_best_is_the_lowest_dev_loss():
    runs = [
        {"learning_rate": lr, "seed": s, "loss": {"dev": dev}, "diverged_at": None}
        for lr, s, dev in [(0.1, 0, 2.0), (0.1, 1, 2.2), (0.2, 0, 1.9), (0.2, 1, 2.5)]
    ]
    rows = sweep_results.summary_by_rate(runs)
    assert [r["learning_rate"] for r in rows] == [0.1, 0.2]
    assert rows[0]["dev_mean"] == pytest.approx(2.1) and rows[0]["dev_std"] == pytest.approx(np.sqrt(0.02))
    assert sweep_results.best_run(runs) == 2


def test_grid_and_devices_are_checked():
    assert sweep.grid([0.1, 0.2], [5, 6]) == (
        sweep.Member(0.1, 5), sweep.Member(0.1, 6), sweep.Member(0.2, 5), sweep.Member(0.2, 6),
    )  # fmt: skip
    assert sweep.log_spaced(0.05, 0.4, 4) == [0.05, 0.1, 0.2, 0.4]
    for bad in [([], [1]), ([0.1], []), ([0.0], [1]), ([float("nan")], [1]), ([0.1, 0.1], [1]), ([0.1], [-1])]:
        with pytest.raises(ConfigError):
            sweep.grid(*bad)
    assert sweep.choose_devices(12, None, 8) == 6 and sweep.choose_devices(7, None, 2) == 1
    assert sweep.choose_devices(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="split evenly over 2 devices: pass --devices 1"):
        sweep.choose_devices(3, 2, 2)
    with pytest.raises(ConfigError, match="has 2 device"):
        sweep.choose_devices(4, 4, 2)


@pytest.fixture(scope="module")
def sweep_script():
    return load_script("sweep")


SMALL = ["--steps", "600", "--chunk", "300", "--hidden", "16", "--log-every", "300"]


@pytest.mark.slow
def test_the_cli_writes_results_a_plot_and_the_best_model_as_a_run(sweep_script, tmp_path, capsys):
    args = [*SMALL, "--lr", "0.05", "0.2", "--seeds", "2", "--out", str(tmp_path)]
    code, out, _ = run_cli(sweep_script, args, capsys)
    assert code == 0, out
    assert "model-steps/s" in out and "ETA" in out and "best *" in out and "mean ± std" in out
    report = strict_json(tmp_path / "sweep.json")
    assert report["models"] == 4 and report["devices"] == 1 and report["model_steps_per_second"] > 0
    assert {(r["learning_rate"], r["seed"]) for r in report["runs"]} == {
        (lr, s) for lr in (0.05, 0.2) for s in (train.TrainConfig().seed, train.TrainConfig().seed + 1)
    }
    assert all(set(r["loss"]) == {"train", "dev", "test"} and r["diverged_at"] is None for r in report["runs"])
    devs = [r["loss"]["dev"] for r in report["runs"]]
    best = report["runs"][report["best"]]
    assert best["loss"]["dev"] == min(devs)
    assert report["configs"]["train_config"]["grad_mode"] == "custom_vjp"
    assert (tmp_path / "sweep.png").stat().st_size > 0
    saved = checkpoint.load(tmp_path / "checkpoint.npz")
    assert saved.train_config.learning_rate == best["learning_rate"] and saved.train_config.seed == best["seed"]
    assert saved.state.step == 600 and saved.stats is not None
    assert len(LossLog(tmp_path / "losses.f32").read(600)) == 600
    code, out, _ = run_cli(load_script("sample"), ["--checkpoint", str(tmp_path / "checkpoint.npz"), "--count", "3"],
                           capsys)  # fmt: skip
    assert code == 0
    code, _, err = run_cli(sweep_script, [*SMALL, "--lr", "0.1", "--seeds", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--overwrite" in err


def test_a_model_whose_evaluation_overflows_counts_as_diverged(sweep_script, tmp_path, capsys):
    """One step at lr 1e30: every training loss is finite (the first is computed before the update),
    but the parameters it leaves overflow in evaluation. That model is diverged, not the best."""
    args = ["--steps", "1", "--hidden", "16", "--lr", "1e30", "0.1", "--seeds", "1", "--no-plot"]
    args += ["--out", str(tmp_path)]
    code, out, _ = run_cli(sweep_script, args, capsys)
    report = strict_json(tmp_path / "sweep.json")
    assert code == 0 and [r["diverged_at"] for r in report["runs"]] == [1, None] and report["best"] == 1
    assert report["summary"][0]["dev_mean"] is None and report["summary"][0]["diverged"] == 1


@pytest.mark.slow
def test_a_sweep_in_which_every_model_diverges_fails_and_leaves_no_stale_model(sweep_script, tmp_path, capsys):
    ok = [*SMALL, "--lr", "0.1", "--seeds", "1", "--no-plot", "--out", str(tmp_path)]
    assert run_cli(sweep_script, ok, capsys)[0] == 0 and (tmp_path / "checkpoint.npz").exists()
    wild = [*SMALL, "--lr", "1e30", "--seeds", "2", "--overwrite", "--no-plot", "--out", str(tmp_path)]
    code, out, _ = run_cli(sweep_script, wild, capsys)
    assert code == 1 and "error: every model diverged" in out
    assert not (tmp_path / "checkpoint.npz").exists() and not (tmp_path / "losses.f32").exists()
    report = strict_json(tmp_path / "sweep.json")
    assert report["best"] is None and [r["diverged_at"] for r in report["runs"]] == [1, 1]
    assert report["model_steps_per_second"] == pytest.approx(2 / report["timing"]["train_seconds"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr"], "expected at least one argument"),
        (["--lr", "0"], "must be a positive finite number"),
        (["--lr-range", "0.2", "0.1", "3"], "--lr-range needs 0 < LO <= HI"),
        (["--lr-range", "a", "b", "c"], "--lr-range takes two numbers and a count"),
        (["--seeds", "0"], "no seeds"),
        (["--devices", "64"], "this machine has"),
        (["--batch-size", "1"], "at least 2"),
        (["--seed-list", "1", "2", "--seed", "5"], "with --seed-list, list every seed"),
        (["--seeds", "3000000000"], "memory"),
        (["--lr-range", "0.01", "1", "3000000000"], "memory"),
        (["--lr-range", "0.01", "1", "+3_000_000_000"], "memory"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(sweep_script, tmp_path, capsys, args, message):
    code, out, err = run_cli(sweep_script, [*SMALL, *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


TWO_DEVICES = """
import json, sys
import numpy as np
from jaxbirds import data, model, sweep, train
import jax
assert len(jax.devices()) == 2, jax.devices()
ds = data.load_dataset(data.DEFAULT_DATA_PATH)
mc = model.ModelConfig(vocab_size=ds.vocab.size, hidden=16)
tc = train.TrainConfig(steps=300, chunk_size=150)
members = sweep.grid([0.1, 0.2], [1, 2])
one, two = (sweep.train_models(ds.train.X, ds.train.Y, mc, tc, members, sweep.make_mesh(n)) for n in (1, 2))
print(json.dumps({"max_difference": float(np.abs(one.losses - two.losses).max()), "steps": two.step}))
"""


@pytest.mark.slow
def test_the_same_sweep_on_one_and_on_two_host_devices_gives_the_same_losses(tmp_path):
    """In a fresh process with the CPU split into two devices (this one already started with one)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 300 and result["max_difference"] <= TOLERANCE
    # and on the command line: 3 models do not split over 2 devices
    script = [sys.executable, str(ROOT / "scripts" / "sweep.py"), *SMALL, "--lr", "0.1", "0.2", "0.3", "--seeds", "1"]
    refused = subprocess.run([*script, "--devices", "2", "--out", str(tmp_path)], env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert refused.returncode == 2 and "do not split evenly over 2 devices: pass --devices 1" in refused.stderr


def test_learning_rates_equal_in_float32_are_one_model():
    with pytest.raises(ConfigError, match="compared in float32"):
        sweep.grid([0.1, 0.1000000001], [1])
    assert len(sweep.grid([0.1, 0.1001], [1])) == 2


def test_host_devices_share_one_memory_and_more_of_them_do_not_help():
    from types import SimpleNamespace

    from jaxbirds import memory
    from jaxbirds.errors import MemoryBudgetError

    cpus = [SimpleNamespace(platform="cpu", process_index=jax.process_index()) for _ in range(2)]
    gpus = [SimpleNamespace(platform="gpu", process_index=jax.process_index()) for _ in range(2)]
    assert memory.devices_sharing_memory(cpus) == 2 and not memory.more_devices_help(cpus)
    assert memory.devices_sharing_memory(gpus) == 1 and memory.more_devices_help(gpus)

    class Compiled:  # what XLA's analysis of a sharded program reports: one device's need
        def memory_analysis(self):
            return SimpleNamespace(argument_size_in_bytes=600, output_size_in_bytes=0, temp_size_in_bytes=0,
                                   alias_size_in_bytes=0)  # fmt: skip

    memory.require_compiled(Compiled(), "a program", "", budget=1000, copies=1)
    with pytest.raises(MemoryBudgetError, match="on each of 2 devices that share this machine's memory"):
        memory.require_compiled(Compiled(), "a program", "", budget=1000, copies=2)


def test_a_short_sweep_draws_every_model_s_curve(tmp_path, monkeypatch):
    from jaxbirds import plots

    drawn = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: drawn.append(fig) or path)
    runs = [{"learning_rate": lr, "seed": 1, "loss": {"dev": 2.0}, "diverged_at": None} for lr in (0.1, 0.2)]
    summary = [{"learning_rate": lr, "dev_mean": 2.0, "dev_std": 0.0} for lr in (0.1, 0.2)]
    plots.sweep_figure(summary, runs, np.full((2, 300), 2.5, np.float32), tmp_path / "sweep.png")
    curves = [line for line in drawn[0].axes[1].lines if len(line.get_xdata())]
    assert len(curves) == 2 and all(len(line.get_xdata()) == 10 for line in curves)  # windows of 30 steps
    assert plots.window_for(200_000, 1000) == 1000 and plots.window_for(5, 1000) == 1


@pytest.mark.slow
def test_a_stopped_sweep_resumed_from_its_checkpoint_ends_bit_for_bit_as_an_uninterrupted_one(dataset, tmp_path):
    """The sweep's state is saved after every chunk; a sweep stopped after its first chunk and resumed from
    that checkpoint reaches the same losses, bit for bit (sgd), as one that ran straight through."""
    from jaxbirds import checkpoint, outputs, sweep_runner

    mc, tc = small_configs(dataset, steps=900, chunk_size=300, grad_mode="custom_vjp")
    members = sweep.grid([0.1, 1e30], [SEED])  # one model diverges: its state is saved and frozen too
    options = sweep_runner.SweepOptions(out=tmp_path / "straight", devices=1, plot=False)
    assert sweep_runner.run(dataset, mc, tc, members, options) == 0
    straight = strict_json(tmp_path / "straight" / "sweep.json")

    options = dataclasses.replace(options, out=tmp_path / "resumed")
    assert sweep_runner.run(dataset, mc, tc, members, options, should_stop=lambda: True) == 130
    saved = checkpoint.load(tmp_path / "resumed" / outputs.SWEEP_STATE)
    assert saved.state.step == 300 and saved.sweep.diverged_at[1] is not None
    assert sweep_runner.members_of(saved) == members
    assert sweep_runner.run(dataset, mc, tc, members, options, resume_from=saved) == 0
    resumed = strict_json(tmp_path / "resumed" / "sweep.json")
    assert [r["loss"] for r in resumed["runs"]] == [r["loss"] for r in straight["runs"]]
    assert [r["diverged_at"] for r in resumed["runs"]] == [r["diverged_at"] for r in straight["runs"]]
    histories = [LossLog(tmp_path / d / outputs.SWEEP_LOSSES, 2).read(900) for d in ("straight", "resumed")]
    np.testing.assert_array_equal(*histories)
    best = [checkpoint.load(tmp_path / d / "checkpoint.npz") for d in ("straight", "resumed")]
    for name in best[0].state.params:
        np.testing.assert_array_equal(best[0].state.params[name], best[1].state.params[name])


@pytest.mark.slow
def test_a_sweep_killed_at_a_chunk_and_resumed_ends_as_an_uninterrupted_one(dataset, tmp_path, capsys):
    """kill -9 (no chance to save) after a random chunk's progress line, then --resume: sweep.json's losses
    are the uninterrupted sweep's, bit for bit (sgd), and at most one chunk was lost."""
    import random

    grid = ["--hidden", "8", "--steps", "3000", "--chunk", "300", "--log-every", "300", "--lr", "0.1", "0.2"]
    grid += ["--seeds", "1", "--no-plot", "--devices", "1"]
    assert run_cli(load_script("sweep"), [*grid, "--out", str(tmp_path / "straight")], capsys)[0] == 0
    # from the second chunk on: the writer runs at most one checkpoint behind, so after the first chunk's
    # line the first checkpoint may still be in flight and there may be nothing yet to resume
    kill_after = random.Random().randrange(2, 8) * 300
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "sweep.py"), *grid, "--out", str(tmp_path / "killed")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith(f"step {kill_after:>9,}/"):
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
    saved = checkpoint.load(tmp_path / "killed" / "sweep-state.npz")
    assert saved.state.step >= kill_after - 300  # at most one chunk lost
    code, out, err = run_cli(load_script("sweep"), ["--resume", "--out", str(tmp_path / "killed"), "--no-plot"], capsys)
    assert code == 0 and f"resuming the sweep in {tmp_path / 'killed'} at step {saved.state.step:,}" in out, err
    straight, resumed = (strict_json(tmp_path / d / "sweep.json") for d in ("straight", "killed"))
    assert [r["loss"] for r in resumed["runs"]] == [r["loss"] for r in straight["runs"]]


@pytest.mark.slow
def test_resume_keeps_the_grid_and_the_shapes_and_refuses_a_run_s_checkpoint(tmp_path, capsys):
    args = ["--hidden", "8", "--steps", "300", "--chunk", "300", "--lr", "0.1", "--seeds", "1", "--no-plot"]
    assert run_cli(load_script("sweep"), [*args, "--out", str(tmp_path)], capsys)[0] == 0
    for flags, message in [(["--lr", "0.3"], "--lr: the models of a saved sweep are its own"),
                           (["--hidden", "16"], "--hidden 16 (the run's is 8)"),
                           (["--hidden", "8", "8"], "--hidden 8 8 (the run's is 8)"),
                           (["--steps", "100"], "below the saved run's step")]:  # fmt: skip
        code, _, err = run_cli(load_script("sweep"), ["--resume", *flags, "--out", str(tmp_path)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    code, out, _ = run_cli(load_script("sweep"), ["--resume", "--steps", "600", "--out", str(tmp_path)], capsys)
    assert code == 0 and "--steps 300 -> 600" in out and strict_json(tmp_path / "sweep.json")["steps"] == 600
    # its best model, continued by train.py: the sweep's own files are not the run's to remove
    code, _, err = run_cli(load_script("train"), ["--resume", "--steps", "900", "--out", str(tmp_path)], capsys)
    assert code == 0 and (tmp_path / "sweep-state.npz").exists() and (tmp_path / "sweep.json").exists()
    code, _, err = run_cli(load_script("sample"), ["--checkpoint", str(tmp_path / "sweep-state.npz")], capsys)
    assert code == 2 and "holds a sweep's 1 models; sample from its best one" in err
    (tmp_path / "sweep-state.npz").write_bytes((tmp_path / "checkpoint.npz").read_bytes())
    code, _, err = run_cli(load_script("sweep"), ["--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "holds a single run, not a sweep" in err


@pytest.mark.slow
def test_the_models_evaluated_together_give_each_model_s_own_evaluation(dataset):
    mc, tc = small_configs(dataset, steps=300, chunk_size=300)
    members = sweep.grid([0.1, 0.3], [SEED, SEED + 1])
    result = sweep.train_models(dataset.train.X, dataset.train.Y, mc, tc, members, sweep.make_mesh(1))
    together = sweep_results.evaluate_members(result.params, dataset.splits, together=True)
    assert sweep_results.evaluate_members(result.params, dataset.splits)[3].loss["dev"] == pytest.approx(
        together[3].loss["dev"], rel=1e-6
    )
    for k, evaluation in enumerate(together):
        alone = sweep_results.evaluate_member(sweep.member(result.params, k), dataset.splits)
        ((together_block,), (alone_block,)) = evaluation.stats, alone.stats  # one block each
        np.testing.assert_allclose(together_block.mean, alone_block.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(together_block.var, alone_block.var, rtol=1e-5)
        for split in dataset.splits:
            assert evaluation.loss[split] == pytest.approx(alone.loss[split], rel=1e-6), (k, split)
    assert len({round(e.loss["dev"], 6) for e in together}) == 4  # four different models


@pytest.mark.slow
def test_a_stop_during_a_sweep_s_evaluation_ends_it_at_once_with_the_state_saved(dataset, tmp_path, capsys):
    """Training done, a stop request arrives: the (vmapped) evaluation, polled between batches, ends at
    once with exit 130; the models' state is saved and --resume evaluates it."""
    from jaxbirds import checkpoint, outputs, sweep_runner

    mc, tc = small_configs(dataset, steps=300, chunk_size=300)
    requests = iter([False])  # the poll after the last chunk says no; the first poll in evaluation says yes
    options = sweep_runner.SweepOptions(out=tmp_path, devices=1, plot=False)
    code = sweep_runner.run(dataset, mc, tc, sweep.grid([0.1], [SEED]), options, lambda: next(requests, True),
                            log=sys.stdout)  # fmt: skip
    out = capsys.readouterr().out
    assert code == 130 and "interrupted during evaluation" in out and "--resume" in out
    assert checkpoint.load(tmp_path / outputs.SWEEP_STATE).state.step == 300
    assert not (tmp_path / "sweep.json").exists()


def test_a_sweep_state_of_two_block_models_round_trips(dataset, tmp_path):
    """The checkpoint of a sweep of two-block models (what is saved after every chunk): every parameter of
    both blocks and the injected optimiser's state, stacked on the models axis, and the members."""
    mc, tc = small_configs(dataset, hidden=(8, 6), optimizer="adam")
    members = sweep.grid([0.1, 0.2], [SEED, SEED + 1])
    params, opt_states, _ = sweep.init_models(mc, tc, members)
    state = train.TrainState(params, opt_states, 7)
    rates, seeds = tuple(m.learning_rate for m in members), tuple(m.seed for m in members)
    saved = checkpoint.Checkpoint(state, None, dataset.vocab, mc, tc, sweep=checkpoint.SweepMembers(rates, seeds,
                                  (None, 3, None, None)))  # fmt: skip
    back = checkpoint.load(checkpoint.save(tmp_path / "sweep-state.npz", saved))
    chex.assert_trees_all_equal((back.state.params, back.state.opt_state), (params, opt_states), strict=True)
    assert back.model_config.hidden == (8, 6) and back.sweep == saved.sweep and back.stats is None
    assert {name: p.shape for name, p in back.state.params.items()} == {
        name: (4, *shape) for name, shape in model.param_shapes(mc).items()
    }  # W3 and bngain2 among them


@pytest.mark.slow
def test_a_sweep_of_two_block_models_saves_resumes_and_evaluates_every_block(dataset, tmp_path):
    """Depth 2 through a whole sweep: the state saved after a stop holds every model's two blocks, stacked;
    resumed from it, the sweep trains on to its end and saves its best model as a run with both blocks'
    statistics, each the model's own calibration. (Bit for bit as a sweep run straight through: slow, below.)"""
    from jaxbirds import evaluate, outputs, sweep_runner

    mc, tc = small_configs(dataset, hidden=(8, 6), steps=400, chunk_size=200, grad_mode="custom_vjp")
    members = sweep.grid([0.1, 0.2], [SEED])
    options = sweep_runner.SweepOptions(out=tmp_path, devices=1, plot=False)
    assert sweep_runner.run(dataset, mc, tc, members, options, should_stop=lambda: True) == 130
    saved = checkpoint.load(tmp_path / outputs.SWEEP_STATE)
    assert saved.state.step == 200 and saved.model_config == mc and sweep_runner.members_of(saved) == members
    assert {name: p.shape for name, p in saved.state.params.items()} == {
        name: (2, *shape) for name, shape in model.param_shapes(mc).items()
    }  # W3 and bngain2 among them
    assert sweep_runner.run(dataset, mc, tc, members, options, resume_from=saved) == 0
    report = strict_json(tmp_path / "sweep.json")
    assert report["steps"] == 400 and report["configs"]["model_config"]["hidden"] == [8, 6]
    best = checkpoint.load(tmp_path / "checkpoint.npz")
    assert best.model_config == mc and [s.mean.shape for s in best.stats] == [(1, 8), (1, 6)]
    assert report["runs"][report["best"]]["loss"]["dev"] == pytest.approx(
        evaluate.split_loss(best.state.params, best.stats, dataset.dev.X, dataset.dev.Y), rel=1e-6
    )
    calibrated = evaluate.calibrate(best.state.params, dataset.train.X)
    jax.tree.map(np.testing.assert_array_equal, best.stats, calibrated)  # block 2's are block 2's


@pytest.mark.slow
def test_a_resumed_sweep_of_two_block_models_ends_bit_for_bit_as_an_uninterrupted_one(dataset, tmp_path):
    from jaxbirds import outputs, sweep_runner

    mc, tc = small_configs(dataset, hidden=(8, 8), steps=400, chunk_size=200, grad_mode="custom_vjp")
    members = sweep.grid([0.1, 0.2], [SEED])
    options = sweep_runner.SweepOptions(out=tmp_path / "straight", devices=1, plot=False)
    assert sweep_runner.run(dataset, mc, tc, members, options) == 0
    options = dataclasses.replace(options, out=tmp_path / "resumed")
    assert sweep_runner.run(dataset, mc, tc, members, options, should_stop=lambda: True) == 130
    saved = checkpoint.load(tmp_path / "resumed" / outputs.SWEEP_STATE)
    assert sweep_runner.run(dataset, mc, tc, members, options, resume_from=saved) == 0
    straight, resumed = (strict_json(tmp_path / d / "sweep.json") for d in ("straight", "resumed"))
    assert [r["loss"] for r in resumed["runs"]] == [r["loss"] for r in straight["runs"]]
    histories = [LossLog(tmp_path / d / outputs.SWEEP_LOSSES, 2).read(400) for d in ("straight", "resumed")]
    np.testing.assert_array_equal(*histories)
    best = [checkpoint.load(tmp_path / d / "checkpoint.npz") for d in ("straight", "resumed")]
    jax.tree.map(np.testing.assert_array_equal, (best[0].state.params, best[0].stats),
                 (best[1].state.params, best[1].stats))  # fmt: skip


def test_the_memory_check_of_a_sweep_counts_every_block():
    """The models' state at depth 2 is larger than at depth 1 by the second block: a budget between the two
    refuses the deeper sweep and admits the shallower one."""
    from jaxbirds.errors import MemoryBudgetError

    tc = train.TrainConfig(steps=10)
    shallow, deep = (model.ModelConfig(hidden=hidden) for hidden in ((100,), (100, 100)))
    models, state_bytes = 8, 4 * 4  # float32 parameters, gradients, updates and the initialisation's copy (sgd)
    need = {c: models * state_bytes * model.param_count_for(c) + 4 * models * tc.steps for c in (shallow, deep)}
    assert need[deep] - need[shallow] == models * state_bytes * (100 * 100 + 100 + 2 * 100)  # W2, b2, bngain2, bnbias2
    budget = (need[shallow] + need[deep]) // 2
    sweep.check_fits(shallow, tc, models, budget=budget)
    with pytest.raises(MemoryBudgetError, match="8 model"):
        sweep.check_fits(deep, tc, models, budget=budget)
