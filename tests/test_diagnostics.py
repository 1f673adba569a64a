"""Training diagnostics (jaxbirds.diagnostics): recorded inside the compiled loop, checked against a recomputation."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gradcheck import load_script
from test_train_cli import run_cli, strict_json

from jaxbirds import diagnostics, model, train
from jaxbirds.errors import ConfigError

#: Two blocks of different widths, so that a block's numbers read from the other block cannot pass.
HIDDEN = (24, 16)
#: Records at steps 0, 30, ..., 180 of a 200-step run in chunks of 100: the second chunk starts between two
#: recording steps (its first is 120, 20 steps in).
RECORDING = train.TrainConfig(steps=200, chunk_size=100, decay_step=120, seed=5, diagnostics_every=30)
RECORDED_STEPS = [0, 30, 60, 90, 120, 150, 180]


@pytest.fixture(scope="module")
def data(dataset):
    return dataset.train.X, dataset.train.Y


@pytest.fixture(scope="module")
def recorded(dataset, data):
    """The :data:`RECORDING` run, shared by the tests that only read it (at the matmul precision of every test:
    a module's fixture is set up before the function-scoped one that pins it, see conftest)."""
    with jax.default_matmul_precision("highest"):
        return run(dataset, data, RECORDING)


def run(dataset, data, config, hidden=HIDDEN, **kwargs):
    state = train.init_state(model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden), config)
    return train.train(*data, config, state, **kwargs)


def batch_of_step(data, config, step):
    X, Y = (np.asarray(a) for a in data)
    rows = np.asarray(train.sample_batch_indices(train.keys_for(config.seed).data, np.array([step]), 32, len(Y)))[0]
    return X[rows], Y[rows]


@jax.jit
def _recomputed(params, X, Y):
    depth = model.depth_of(params)
    names = [f"h[{layer}]" for layer in range(1, depth + 1)]
    values = {}
    model.forward(params, X, Y, tap=lambda name, value: values.setdefault(name, value))
    zeros = {name: jnp.zeros_like(values[name]) for name in names}

    def loss(params, perturb):
        return model.forward(params, X, Y, tap=lambda name, value: value + perturb[name] if name in perturb else value)

    dparams, dh = jax.grad(loss, argnums=(0, 1))(params, zeros)
    return [values[n] for n in names], [dh[n] for n in names], dparams


def recomputed(params, X, Y):
    """h[l] and dloss/dh[l] of every block, and dloss/dparams, with jax.grad outside any loop: h[l] + p_l, p_l = 0."""
    h, dh, dparams = jax.device_get(_recomputed(params, X, Y))
    return [np.asarray(x, np.float64) for x in h], [np.asarray(x, np.float64) for x in dh], dparams


def std(x):
    return float(np.std(np.asarray(x, np.float64)))


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_the_records_equal_a_recomputation_outside_the_loop_at_the_recorded_state(dataset, data, recorded, optimizer):
    """Step 180 (mid-chunk, after the learning-rate decay): the state after 180 steps re-created by training
    to step 180, its batch drawn again, and every recorded number computed anew in float64 from jax.grad
    (the update: what the optimiser makes of that gradient, adam's own step for adam)."""
    config = dataclasses.replace(RECORDING, optimizer=optimizer, learning_rate=0.1 if optimizer == "sgd" else 1e-2)
    if optimizer != "sgd":
        recorded = run(dataset, data, config)
    records, snapshot = recorded.diagnostics
    np.testing.assert_array_equal(records.step, RECORDED_STEPS)
    assert snapshot.step == 180

    t = 180
    at_t = run(dataset, data, dataclasses.replace(config, steps=t, diagnostics_every=0)).state
    params = jax.device_get(at_t.params)
    X, Y = batch_of_step(data, config, t)
    h, dh, dparams = recomputed(params, X, Y)
    updates, _ = config.make_optimizer().update(dparams, at_t.opt_state, params)
    row = list(records.step).index(t)
    close = dict(rtol=2e-5, atol=0)
    for i in range(len(HIDDEN)):
        np.testing.assert_allclose(records.act_mean[row, i], np.mean(h[i]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(records.act_std[row, i], std(h[i]), **close)
        np.testing.assert_allclose(records.saturation[row, i], np.mean(np.abs(h[i]) > 0.97), **close)
        np.testing.assert_allclose(records.grad_mean[row, i], np.mean(dh[i]), rtol=1e-3, atol=1e-3 * std(dh[i]))
        np.testing.assert_allclose(records.grad_std[row, i], std(dh[i]), **close)
        np.testing.assert_allclose(snapshot.h[i], h[i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(snapshot.dh[i], dh[i], rtol=0, atol=1e-4 * np.abs(dh[i]).max())
    for i, name in enumerate(["W1", "W2", "W3"]):
        np.testing.assert_allclose(records.grad_to_data[row, i], std(dparams[name]) / std(params[name]), rtol=1e-4)
        expected = math.log10(std(updates[name]) / std(params[name]))
        np.testing.assert_allclose(records.update_to_data[row, i], expected, rtol=0, atol=1e-4)


def test_the_update_ratio_of_sgd_is_log10_of_lr_times_the_gradient_over_the_weights(dataset, data, recorded):
    """At step 180 the learning rate has decayed to 0.1 * 0.1 = 0.01: log10(std(0.01 g) / std(W)), with the
    gradient and the weights of that state (each weight its own)."""
    recorded = recorded.diagnostics
    t = 180
    params = jax.device_get(
        run(dataset, data, dataclasses.replace(RECORDING, steps=t, diagnostics_every=0)).state.params
    )
    _, _, grads = recomputed(params, *batch_of_step(data, RECORDING, t))
    row = list(recorded.records.step).index(t)
    for i, name in enumerate(["W1", "W2", "W3"]):
        expected = math.log10(std(0.01 * grads[name]) / std(params[name]))
        np.testing.assert_allclose(recorded.records.update_to_data[row, i], expected, rtol=0, atol=1e-4)


def test_the_saturation_share_counts_entries_beyond_0_97_in_magnitude():
    h = jnp.array([[0.5, 0.97, 0.9701, -0.98], [1.0, -0.96, -1.0, 0.0]])
    assert diagnostics.SATURATION == 0.97
    assert float(diagnostics.saturation_share(h)) == 4 / 8  # 0.9701, -0.98, 1.0, -1.0; 0.97 itself is not beyond
    assert float(diagnostics.saturation_share(h, threshold=0.99)) == 2 / 8


def test_diagnostics_leave_training_bit_identical(dataset, data, recorded):
    """Recording changes nothing the run computes: the same losses and parameters, bit for bit, and a chunk
    without diagnostics returns what it always did."""
    off, on = run(dataset, data, dataclasses.replace(RECORDING, diagnostics_every=0)), recorded
    np.testing.assert_array_equal(on.losses, off.losses)
    chex.assert_trees_all_equal(on.state.params, off.state.params)
    assert off.diagnostics is None and on.diagnostics is not None
    state = train.init_state(model.ModelConfig(vocab_size=dataset.vocab.size, hidden=HIDDEN), RECORDING)
    chunk = train.chunk_fn(dataclasses.replace(RECORDING, diagnostics_every=0), 3)
    key = train.keys_for(RECORDING.seed).data
    assert len(jax.eval_shape(chunk, *state[:2], 0, 3, *(np.asarray(a) for a in data), key)) == 3


def test_a_resumed_run_records_from_where_it_resumes(dataset, data, recorded):
    whole = recorded.diagnostics
    first = run(dataset, data, dataclasses.replace(RECORDING, steps=100))
    rest = train.train(*data, RECORDING, first.state, first.losses).diagnostics
    np.testing.assert_array_equal(rest.records.step, [120, 150, 180])
    chex.assert_trees_all_equal(rest.records, jax.tree.map(lambda field: field[4:], whole.records))
    chex.assert_trees_all_equal(rest.snapshot, whole.snapshot)


def test_recording_traces_once_for_many_chunks(dataset, data, monkeypatch):
    """Five chunks and a shorter last one: the recording step is traced once, and nothing recompiles
    (the program is :data:`RECORDING`'s, whose compiled code the persistent cache may already hold)."""
    chex.clear_trace_counter()
    original = diagnostics.record
    traces = []

    @chex.assert_max_traces(n=1)
    def counted(*args):
        traces.append(1)
        return original(*args)

    monkeypatch.setattr(diagnostics, "record", counted)
    monkeypatch.setattr(train, "_COMPILED", {})
    result = run(dataset, data, dataclasses.replace(RECORDING, steps=530))
    assert len(traces) == 1 and len(train._COMPILED) == 1
    np.testing.assert_array_equal(result.diagnostics.records.step, np.arange(0, 530, 30))


@pytest.mark.slow
def test_a_diverged_run_keeps_the_records_of_finite_states_only(dataset, data):
    config = dataclasses.replace(RECORDING, learning_rate=1e30, diagnostics_every=1, chunk_size=7)
    result = run(dataset, data, config)
    steps = result.diagnostics.records.step
    assert result.diverged_at is not None and steps.max() == result.state.step
    np.testing.assert_array_equal(steps, np.arange(result.state.step + 1))


def test_records_per_chunk_is_the_most_multiples_a_chunk_can_hold():
    for length in range(1, 30):
        for every in range(1, 12):
            most = max(sum(1 for t in range(start, start + length) if t % every == 0) for start in range(every))
            assert diagnostics.records_per_chunk(length, every) == most


def test_a_default_run_records_about_a_hundred_steps():
    assert diagnostics.default_every(train.TrainConfig().steps) == 2_000
    assert diagnostics.default_every(50) == 1


@pytest.mark.parametrize("bad", [-1, 1.5, 2**31])
def test_diagnostics_every_must_be_a_non_negative_int32(bad):
    with pytest.raises(ConfigError, match="diagnostics_every"):
        train.TrainConfig(diagnostics_every=bad)


def test_the_histograms_are_densities_over_their_range():
    values = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    centres, density = diagnostics.histogram(values, -1.0, 1.0, bins=4)
    np.testing.assert_allclose(centres, [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(density * 0.5, [1 / 6, 1 / 6, 1 / 6, 2 / 6])  # 3.0 is outside: 5/6 inside
    assert diagnostics.gradient_range([np.zeros(3)]) == 1.0


def test_the_summary_is_strict_json_per_block_and_weight(recorded):
    recorded = recorded.diagnostics
    summary = json.loads(json.dumps(diagnostics.summary(*recorded), allow_nan=False))
    assert summary["steps"] == RECORDED_STEPS and len(summary["blocks"]) == 2
    assert set(summary["weights"]) == {"W1", "W2", "W3"}
    assert summary["blocks"][1]["saturation"] == recorded.records.saturation[:, 1].astype(float).tolist()
    assert summary["histograms"]["step"] == 180 and len(summary["histograms"]["blocks"][0]["h_density"]) == 50


def test_the_update_ratio_of_an_sgd_update_is_log10_of_lr_times_the_gradients_spread():
    """For SGD the optax update is -lr * grad exactly: the ratio's numerator is the step's own."""
    params = {"W": jnp.arange(6.0).reshape(2, 3)}
    grads = {"W": jnp.ones((2, 3)) * jnp.array([1.0, 2.0, 4.0])}
    updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    expected = math.log10(std(0.1 * grads["W"]) / std(params["W"]))
    np.testing.assert_allclose(diagnostics.update_to_data(updates, params, ["W"]), [expected], rtol=1e-6)


@pytest.mark.slow
def test_train_py_with_diagnostics_writes_the_figure_and_the_metrics_and_a_resume_records_on(tmp_path, capsys):
    """Depth 2 end to end: ``--diagnostics`` records every 400 // 100 = 4 steps; ``--resume`` (the run's own
    setting) records the steps it trains, from where it resumes."""
    script = load_script("train")
    small = ["--hidden", "16", "16", "--chunk", "200", "--log-every", "200", "--samples", "0", "--out", str(tmp_path)]
    code, out, _ = run_cli(script, ["--steps", "400", "--diagnostics", *small], capsys)
    assert code == 0 and "diagnostics every 4 steps" in out and "diagnostics.png" in out
    assert (tmp_path / "diagnostics.png").stat().st_size > 0
    entry = strict_json(tmp_path / "metrics.json")["diagnostics"]
    assert entry["steps"] == list(range(0, 400, 4)) and entry["saturation_threshold"] == 0.97
    assert len(entry["blocks"]) == 2 and set(entry["weights"]) == {"W1", "W2", "W3"}
    assert all(len(block["saturation"]) == 100 for block in entry["blocks"])
    assert entry["histograms"]["step"] == 396 and len(entry["histograms"]["blocks"]) == 2

    code, out, _ = run_cli(script, ["--resume", "--steps", "600", *small], capsys)
    assert code == 0
    assert strict_json(tmp_path / "metrics.json")["diagnostics"]["steps"] == list(range(400, 600, 4))
