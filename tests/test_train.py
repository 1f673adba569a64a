"""The training loop: learning, agreement between gradient modes, determinism, resumption."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from jaxbirds import model, train

SMALL = train.TrainConfig(steps=600, chunk_size=200, decay_step=400, seed=3)


@pytest.fixture(scope="module")
def data(dataset):
    return dataset.train.X, dataset.train.Y


def small_model(dataset, hidden=32):
    return model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden)


def run(dataset, data, config, hidden=32, **kwargs):
    state = train.init_state(small_model(dataset, hidden), config)
    return train.train(*data, config, state, **kwargs)


@pytest.mark.parametrize("mode", train.GRAD_MODES)
def test_loss_decreases_in_every_mode(dataset, data, mode):
    result = run(dataset, data, dataclasses.replace(SMALL, grad_mode=mode))
    assert result.state.step == 600 and result.losses.shape == (600,)
    assert np.all(np.isfinite(result.losses))
    first, last = result.losses[:50].mean(), result.losses[-50:].mean()
    assert first > 3.0 and last < first - 0.6, (first, last)


def test_modes_agree_over_the_first_1000_steps_of_the_default_recipe(dataset, data):
    """Same seed: the three modes differ only by rounding, so their loss histories stay together."""
    config = dataclasses.replace(train.TrainConfig(), steps=1_000, chunk_size=1_000)
    histories = {mode: run(dataset, data, dataclasses.replace(config, grad_mode=mode), hidden=200).losses
                 for mode in train.GRAD_MODES}
    np.testing.assert_allclose(histories["custom_vjp"], histories["autodiff"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(histories["manual"], histories["autodiff"], atol=1e-4, rtol=0)


def test_same_seed_same_result_and_another_seed_another(dataset, data):
    a, b = run(dataset, data, SMALL), run(dataset, data, SMALL)
    np.testing.assert_array_equal(a.losses, b.losses)
    chex.assert_trees_all_equal(a.state.params, b.state.params)
    c = run(dataset, data, dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(a.losses, c.losses)


def test_resuming_equals_an_uninterrupted_run(dataset, data):
    whole = run(dataset, data, SMALL)
    first = run(dataset, data, dataclasses.replace(SMALL, steps=400))
    rest = train.train(*data, SMALL, first.state, first.losses)
    assert rest.state.step == 600
    np.testing.assert_array_equal(rest.losses, whole.losses)
    chex.assert_trees_all_equal(rest.state.params, whole.state.params)
    chex.assert_trees_all_equal(rest.state.opt_state, whole.state.opt_state)


def test_the_training_step_is_traced_once_for_many_chunks(dataset, data, monkeypatch):
    """Five chunks, one trace: nothing retraces (or recompiles) after the first chunk."""
    chex.clear_trace_counter()
    traces = []
    original = train.loss_and_grads_fn

    def counted(grad_mode):
        fn = original(grad_mode)

        @chex.assert_max_traces(n=1)
        def loss_and_grads(params, X, Y):
            traces.append(1)
            return fn(params, X, Y)

        return loss_and_grads

    monkeypatch.setattr(train, "loss_and_grads_fn", counted)
    monkeypatch.setattr(train, "_COMPILED", {})  # start without memoised executables
    result = run(dataset, data, dataclasses.replace(SMALL, steps=1_000))
    assert result.state.step == 1_000 and len(traces) == 1


def test_stop_request_ends_after_the_current_chunk(dataset, data):
    seen = []
    result = run(dataset, data, SMALL, on_chunk=lambda p, s, l: seen.append(p.step), should_stop=lambda: True)
    assert result.stopped and result.state.step == 200 and seen == [200]
    assert len(result.losses) == 200


def test_divergence_stops_and_returns_the_last_finite_state(dataset, data):
    config = dataclasses.replace(SMALL, learning_rate=1e30, chunk_size=100)  # params overflow to inf
    result = run(dataset, data, config)
    assert result.diverged_at is not None
    assert result.state.step <= result.diverged_at < result.state.step + 100
    assert len(result.losses) == result.state.step
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(result.state.params))


def test_batches_depend_only_on_seed_and_step():
    key = train.keys_for(0).data
    together = train.sample_batch_indices(key, np.arange(10), 32, 1000)
    apart = train.sample_batch_indices(key, np.arange(5, 10), 32, 1000)
    np.testing.assert_array_equal(together[5:], apart)
    assert together.shape == (10, 32) and int(together.max()) < 1000


def test_calibration_and_evaluation_match_the_direct_computation(dataset):
    config = small_model(dataset)
    params = model.init_params(jax.random.key(0), config)
    X, Y = dataset.dev.X, dataset.dev.Y
    stats = train.calibrate(params, X, batch=5_000)  # several padded batches
    direct = model.calibrate(params, X)
    np.testing.assert_allclose(stats.mean, direct.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.var, direct.var, rtol=1e-4)
    loss = train.evaluate(params, stats, X, Y, batch=5_000)
    assert loss == pytest.approx(float(model.loss(params, X, Y, stats)), rel=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(batch_size=1), "at least 2"),
        (dict(steps=0), "steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(grad_mode="magic"), "grad_mode"),
        (dict(optimizer="lion"), "optimizer"),
    ],
)
def test_train_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**bad)


def test_adam_trains_too(dataset, data):
    result = run(dataset, data, dataclasses.replace(SMALL, optimizer="adam", learning_rate=3e-3, steps=400))
    assert result.losses[-50:].mean() < result.losses[:50].mean() - 0.5
