"""The training loop: learning, agreement between gradient modes, determinism, resumption."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, model, train
from jaxbirds.errors import MemoryBudgetError

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


@pytest.mark.slow
def test_modes_agree_over_the_first_1000_steps_of_the_default_recipe(dataset, data):
    """Same seed: the three modes differ only by rounding, so their loss histories stay together."""
    config = dataclasses.replace(train.TrainConfig(), steps=1_000, chunk_size=1_000)
    histories = {
        mode: run(dataset, data, dataclasses.replace(config, grad_mode=mode), hidden=200).losses
        for mode in train.GRAD_MODES
    }
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
    """Five chunks and a shorter last one, one trace: nothing retraces (or recompiles) after the first."""
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
    result = run(dataset, data, dataclasses.replace(SMALL, steps=1_050))  # 5 chunks of 200, then one of 50
    assert result.state.step == 1_050 and len(result.losses) == 1_050 and len(traces) == 1


def test_no_recompilation_when_only_the_seed_or_the_step_count_changes(dataset, data, monkeypatch):
    monkeypatch.setattr(train, "_COMPILED", {})
    run(dataset, data, SMALL)
    run(dataset, data, dataclasses.replace(SMALL, seed=11, steps=900))
    assert len(train._COMPILED) == 1
    run(dataset, data, dataclasses.replace(SMALL, learning_rate=0.05))  # the schedule is in the program
    assert len(train._COMPILED) == 2


@pytest.mark.slow
def test_a_chunk_cut_short_by_stop_equals_a_shorter_chunk(dataset, data):
    """The masked steps past ``stop`` change nothing, optimiser state included (adam counts steps)."""
    config = dataclasses.replace(SMALL, optimizer="adam", learning_rate=1e-2, steps=130, chunk_size=100)
    state = train.init_state(small_model(dataset), config)
    X, Y = (np.asarray(a) for a in data)
    key = train.keys_for(config.seed).data
    long_chunk = train.make_chunk_fn(config, 100)
    short_chunk = train.make_chunk_fn(config, 30)
    a = long_chunk(*train.host_copy(state[:2]), 0, 30, X, Y, key)
    b = short_chunk(*train.host_copy(state[:2]), 0, 30, X, Y, key)
    chex.assert_trees_all_equal(a[:2], b[:2])
    np.testing.assert_array_equal(a[2][:30], b[2])


def test_the_state_passed_in_is_donated_to_the_first_chunk(dataset, data):
    """Donation really happens: the input buffers are deleted once the first chunk has run (no view
    of them kept on the host), so XLA updates the parameters in place."""
    state = train.init_state(small_model(dataset), SMALL)
    run_result = train.train(*data, dataclasses.replace(SMALL, steps=400), state)
    assert run_result.state.step == 400
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)))


@pytest.mark.slow
def test_the_learning_rate_drops_at_the_decay_step(dataset, data):
    """One SGD step before and one after ``decay_step``: the update is lr * grad, then lr/10 * grad."""
    config = dataclasses.replace(SMALL, learning_rate=0.1, decay_step=5, decay_factor=0.1)
    state = train.init_state(small_model(dataset), config)
    X, Y = (np.asarray(a) for a in data)
    key = train.keys_for(config.seed).data
    chunk = train.make_chunk_fn(config, 1)
    for step, lr in [(4, 0.1), (5, 0.01)]:
        params = train.host_copy(state.params)
        # the optimiser's step counter, set to `step` (its only integer leaf)
        counter = functools.partial(np.full_like, fill_value=step)
        opt_state = jax.tree.map(
            lambda leaf, counter=counter: counter(leaf) if leaf.dtype == np.int32 else leaf,
            train.host_copy(state.opt_state),
        )
        rows = np.asarray(train.sample_batch_indices(key, np.array([step]), config.batch_size, len(Y)))[0]
        grads = jax.grad(model.loss)(params, X[rows], Y[rows])
        new_params, _, _ = chunk(train.host_copy(params), opt_state, step, step + 1, X, Y, key)
        for name in model.param_names(small_model(dataset)):
            # rtol: the difference of two float32 parameters near 1 keeps ~3 digits of an update of 1e-4
            np.testing.assert_allclose(params[name] - new_params[name], lr * grads[name], rtol=2e-2, atol=2e-7)


def test_every_step_trains_on_its_own_minibatch(dataset, data):
    """What the chunk really feeds each step: a probe gradient function returns a fingerprint of its
    batch as the 'loss'. Each step sees the batch sample_batch_indices draws for it, and they differ."""
    X, Y = (np.asarray(a) for a in data)

    def fingerprint(params, Xb, Yb):
        weights = jnp.arange(1, Yb.shape[0] + 1, dtype=jnp.float32)
        return jnp.sum(weights * Yb) + jnp.sum(Xb[:, 0]), jax.tree.map(jnp.zeros_like, params)

    config = dataclasses.replace(SMALL, batch_size=8)
    state = train.init_state(small_model(dataset), config)
    key = train.keys_for(config.seed).data
    chunk = train.make_chunk_fn(config, 6, loss_and_grads=fingerprint)
    _, _, seen = chunk(*state[:2], 10, 16, X, Y, key)
    rows = np.asarray(train.sample_batch_indices(key, np.arange(10, 16), 8, len(Y)))
    expected = [np.sum(np.arange(1, 9) * Y[r]) + np.sum(X[r, 0]) for r in rows]
    np.testing.assert_allclose(np.asarray(seen), expected)
    assert len(set(np.asarray(seen).tolist())) == 6


def test_stop_request_ends_after_the_current_chunk(dataset, data):
    seen = []
    result = run(
        dataset,
        data,
        SMALL,
        on_chunk=lambda progress, state, losses: seen.append(progress.step),
        should_stop=lambda: True,
    )
    assert result.stopped and result.state.step == 200 and seen == [200]
    assert len(result.losses) == 200


@pytest.mark.parametrize("chunk", [1, 7, 100])
@pytest.mark.slow
def test_divergence_returns_the_last_state_whose_own_loss_is_finite(dataset, data, chunk):
    """The loss at step t is the loss of the state after t steps. After divergence at step t, the
    state returned is the one after t - 1 steps, whose loss is finite (not the one that produced
    the bad loss), wherever the chunk boundaries fall."""
    config = dataclasses.replace(SMALL, learning_rate=1e30, chunk_size=chunk)  # params overflow to inf
    result = run(dataset, data, config)
    t = result.diverged_at
    assert t is not None and t >= 1
    assert result.state.step == t - 1 and len(result.losses) == t - 1
    assert np.all(np.isfinite(result.losses))
    X, Y = (np.asarray(a) for a in data)
    rows = np.asarray(train.sample_batch_indices(train.keys_for(config.seed).data, np.array([t - 1]), 32, len(Y)))[0]
    assert np.isfinite(float(model.loss(result.state.params, X[rows], Y[rows])))


def test_train_stops_at_an_infinite_loss_not_only_at_nan(dataset, data, monkeypatch):
    """A probe gradient pushes b2[0] down by lr every step and reports +inf (never NaN) once it has
    fallen by 0.55: that is step 6 at lr 0.1."""

    def falling(grad_mode):
        def loss_and_grads(params, X, Y):
            loss = jnp.where(params["b2"][0] < -0.55, jnp.inf, 1.0)
            grads = jax.tree.map(jnp.zeros_like, params)
            return loss, {**grads, "b2": grads["b2"].at[0].set(1.0)}

        return loss_and_grads

    monkeypatch.setattr(train, "loss_and_grads_fn", falling)
    monkeypatch.setattr(train, "_COMPILED", {})
    config = dataclasses.replace(SMALL, learning_rate=0.1, chunk_size=4, decay_step=1000)
    state = train.init_state(small_model(dataset), config)
    state = state._replace(params={**state.params, "b2": state.params["b2"].at[0].set(0.0)})
    result = train.train(*data, config, state)
    assert result.diverged_at == 6 and result.state.step == 5
    np.testing.assert_array_equal(result.losses, np.ones(5))


@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**31, 2**32 - 1])
def test_every_32_bit_seed_gives_the_streams_of_its_own_key(seed):
    """The seed reaches the compiled program as a uint32, the upper half of the range included."""
    expected = jax.random.split(jax.random.key(seed), 3)
    for got, want in zip(train.keys_for(seed), expected, strict=True):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_batches_depend_only_on_seed_and_step():
    key = train.keys_for(0).data
    together = train.sample_batch_indices(key, np.arange(10), 32, 1000)
    apart = train.sample_batch_indices(key, np.arange(5, 10), 32, 1000)
    np.testing.assert_array_equal(together[5:], apart)
    assert together.shape == (10, 32) and int(together.max()) < 1000


def test_calibration_and_evaluation_match_a_direct_float64_computation(dataset):
    """Seven rows in batches of three (padded): mean and *unbiased* variance (n - 1 = 6, so the biased
    estimator would be 14 % off), then the mean loss with those statistics."""
    params = model.init_params(jax.random.key(0), small_model(dataset))
    X, Y = dataset.dev.X[:7], dataset.dev.Y[:7]
    stats = evaluate.calibrate(params, X, batch=3)
    (block,) = stats  # one block
    hprebn = np.asarray(model.hidden_preactivation(params, X), np.float64)
    np.testing.assert_allclose(block.mean[0], hprebn.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block.var[0], hprebn.var(axis=0, ddof=1), rtol=1e-4)
    loss = evaluate.split_loss(params, stats, X, Y, batch=3)
    assert loss == pytest.approx(float(model.loss(params, X, Y, stats)), rel=1e-5)
    assert evaluate.split_loss(params, stats, X[:0], Y[:0]) is None


def test_evaluation_batches_shrink_to_fit_the_memory_budget(dataset):
    params = model.init_params(jax.random.key(0), small_model(dataset, hidden=4096))
    assert evaluate.batch_size_for(params, budget=2**40) == evaluate.MAX_BATCH
    small = evaluate.batch_size_for(params, budget=64 * 2**20)
    assert 1 <= small < evaluate.MAX_BATCH
    with pytest.raises(MemoryBudgetError):
        evaluate.batch_size_for(params, budget=2**10)


def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(dataset):
    huge = model.ModelConfig(vocab_size=29, hidden=10**9)
    with pytest.raises(MemoryBudgetError, match="--hidden"):
        train.check_fits(huge, SMALL)
    train.check_fits(small_model(dataset), SMALL)


def test_a_training_program_too_big_for_the_budget_is_refused_before_it_runs(dataset, data):
    state = train.init_state(small_model(dataset), SMALL)
    with pytest.raises(MemoryBudgetError, match="--chunk"):
        train.train(*data, SMALL, state, memory_budget=2**16)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(batch_size=1), "at least 2"),
        (dict(steps=0), "steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(grad_mode="magic"), "grad_mode"),
        (dict(optimizer="lion"), "optimizer"),
        (dict(seed=2**32), "seed"),
        (dict(decay_step=2**31), "2\\*\\*31"),
        (dict(steps=2**31, chunk_size=2**31), "2\\*\\*31"),
        (dict(seed=-1), "seed"),
    ],
)
def test_train_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**bad)


@pytest.mark.slow
def test_adam_trains_too(dataset, data):
    result = run(dataset, data, dataclasses.replace(SMALL, optimizer="adam", learning_rate=3e-3, steps=400))
    assert result.losses[-50:].mean() < result.losses[:50].mean() - 0.5


@pytest.mark.parametrize("value", [0, -0.1, float("nan"), float("inf"), 10**400, "0.1", True])
def test_a_learning_rate_or_decay_that_is_no_positive_number_is_a_config_error(value):
    from jaxbirds.errors import ConfigError

    for field in ("learning_rate", "decay_factor"):
        with pytest.raises(ConfigError, match=f"{field} must be a positive number"):
            train.TrainConfig(**{field: value})
