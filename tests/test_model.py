"""The forward pass: shapes, parameter counts, determinism, initial loss, evaluation mode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import evaluate, model


@pytest.mark.parametrize("hidden, count", [(64, 4_287), (200, 12_719)])
def test_parameter_count_matches_the_tutorial(dataset, key, hidden, count):
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden)
    assert model.param_count(model.init_params(key, config)) == count


def test_parameter_shapes(small_config, key):
    params = model.init_params(key, small_config)
    model.check_params(params, small_config)
    assert params["C"].shape == (29, 10) and params["W1"].shape == (30, 64)
    assert params["bngain"].shape == (1, 64) and params["b2"].shape == (29,)


def test_check_params_rejects_a_mismatch(small_config, key):
    params = model.init_params(key, small_config)
    with pytest.raises(ValueError, match="W1"):
        model.check_params(params, model.ModelConfig(vocab_size=29, hidden=65))


def test_initialisation_statistics(key):
    config = model.ModelConfig(vocab_size=29, hidden=2_000)
    params = model.init_params(key, config)
    assert float(jnp.std(params["W1"])) == pytest.approx((5 / 3) / math.sqrt(30), rel=0.05)
    assert float(jnp.std(params["W2"])) == pytest.approx(0.1, rel=0.05)
    assert float(jnp.mean(params["bngain"])) == pytest.approx(1.0, abs=0.01)
    assert float(jnp.std(params["C"])) == pytest.approx(1.0, rel=0.1)


def test_same_key_same_params_and_different_key_different_params(small_config):
    a = model.init_params(jax.random.key(7), small_config)
    b = model.init_params(jax.random.key(7), small_config)
    c = model.init_params(jax.random.key(8), small_config)
    for name in model.PARAM_NAMES:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])


def test_a_model_initialised_alone_equals_one_initialised_under_vmap():
    """Bit for bit: a sweep's model k, initialised in a compiled program, starts where a solo run with
    its seed starts. (Op by op, the bngain = 1 + 0.1 N line rounds twice, compiled once: about 3 % of
    the gains would differ in the last bit, hence a wide layer.)"""
    config = model.ModelConfig(vocab_size=29, hidden=512)
    keys = jax.random.split(jax.random.key(5), 4)
    together = jax.jit(jax.vmap(lambda k: model.init_params(k, config)))(keys)  # as a sweep does
    for i in range(4):
        alone = model.init_params(keys[i], config)
        for name in model.PARAM_NAMES:
            np.testing.assert_array_equal(together[name][i], alone[name], err_msg=name)


def test_initial_loss_is_near_uniform(small_config, key, batch):
    params = model.init_params(key, small_config)
    loss = float(model.loss(params, *batch))
    assert abs(loss - math.log(29)) < 0.5


@pytest.mark.parametrize("rules", model.RULES)
def test_forward_shapes_and_finite_values(small_config, key, batch, rules):
    params = model.init_params(key, small_config)
    logits = model.logits(params, batch[0], rules=rules)
    assert logits.shape == (32, 29)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("rules", ["custom_vjp", "tutorial"])
def test_every_rule_set_gives_the_same_loss(small_config, key, batch, rules):
    params = model.init_params(key, small_config)
    assert float(model.loss(params, *batch, rules=rules)) == pytest.approx(
        float(model.loss(params, *batch, rules="autodiff")), rel=1e-6
    )


def test_unknown_rules_are_refused(small_config, key, batch):
    with pytest.raises(ValueError, match="unknown rules"):
        model.loss(model.init_params(key, small_config), *batch, rules="jax")


def test_evaluation_mode_with_the_batchs_own_statistics_equals_training_mode(small_config, key, batch):
    params = model.init_params(key, small_config)
    stats = evaluate.calibrate(params, batch[0])
    np.testing.assert_allclose(
        model.logits(params, batch[0], stats=stats), model.logits(params, batch[0]), rtol=1e-5, atol=1e-6
    )


def test_evaluation_mode_is_per_example(small_config, key, batch):
    """With fixed statistics, one example's logits do not depend on the rest of the batch."""
    params = model.init_params(key, small_config)
    stats = evaluate.calibrate(params, batch[0])
    full = model.logits(params, batch[0], stats=stats)
    single = model.logits(params, batch[0][:1], stats=stats)
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)


def test_batch_of_one_is_a_clear_error(small_config, key, batch):
    params = model.init_params(key, small_config)
    with pytest.raises(ValueError, match="at least 2"):
        model.loss(params, batch[0][:1], batch[1][:1])


def test_wrong_label_shape_is_caught(small_config, key, batch):
    params = model.init_params(key, small_config)
    with pytest.raises(AssertionError):
        model.loss(params, batch[0], batch[1][:5])


def test_model_config_rejects_nonsense():
    with pytest.raises(ValueError, match="hidden"):
        model.ModelConfig(hidden=0)


def test_the_tutorial_steps_differ_where_a_probability_underflows():
    """The one exception to "the same value every way" (model.py's docstring): exp(-123) underflows in
    float32, so log(probs) is -inf and the tutorial's steps give inf, where the shifted log-sum-exp of the
    other rule sets gives the finite loss ((123 + log(1 + e^-3 + e^-123)) + (log(1 + e^-1 + e^-2))) / 2."""
    from jaxbirds import jvp, ops, vjp

    logits = jnp.array([[0.0, -120.0, 3.0], [1.0, 2.0, 3.0]], jnp.float32)
    labels = jnp.array([1, 2])
    exact = (123 + math.log(1 + math.exp(-3)) + math.log(1 + math.exp(-1) + math.exp(-2))) / 2
    for rule in (ops.cross_entropy, vjp.cross_entropy, jvp.cross_entropy):
        assert float(rule(logits, labels)) == pytest.approx(exact, rel=1e-6)
    assert float(ops.cross_entropy_steps(logits, labels)) == math.inf
