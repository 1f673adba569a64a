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
    assert params["bngain1"].shape == (1, 64) and params["b2"].shape == (29,)


def test_check_params_rejects_a_mismatch(small_config, key):
    params = model.init_params(key, small_config)
    with pytest.raises(ValueError, match="W1"):
        model.check_params(params, model.ModelConfig(vocab_size=29, hidden=65))


def test_initialisation_statistics(key):
    config = model.ModelConfig(vocab_size=29, hidden=2_000)
    params = model.init_params(key, config)
    assert float(jnp.std(params["W1"])) == pytest.approx((5 / 3) / math.sqrt(30), rel=0.05)
    assert float(jnp.std(params["W2"])) == pytest.approx(0.1, rel=0.05)
    assert float(jnp.mean(params["bngain1"])) == pytest.approx(1.0, abs=0.01)
    assert float(jnp.std(params["C"])) == pytest.approx(1.0, rel=0.1)


def test_same_key_same_params_and_different_key_different_params(small_config):
    a = model.init_params(jax.random.key(7), small_config)
    b = model.init_params(jax.random.key(7), small_config)
    c = model.init_params(jax.random.key(8), small_config)
    for name in model.param_names(small_config):
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
        for name in model.param_names(config):
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


# --- depth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, blocks", [(200, (200,)), ([100, 100], (100, 100)), ((64, 32, 16), (64, 32, 16))])
def test_hidden_is_a_tuple_of_block_widths(given, blocks):
    config = model.ModelConfig(hidden=given)
    assert config.hidden == blocks and config.depth == len(blocks)
    assert config.widths == (30, *blocks, 29)


@pytest.mark.parametrize("hidden", [(), (0,), (64, -1), "200", True, (2.5,), None])
def test_hidden_rejects_what_is_not_block_widths(hidden):
    with pytest.raises(ValueError, match="hidden"):
        model.ModelConfig(hidden=hidden)


def test_one_block_keeps_the_tutorials_names_in_the_tutorials_draw_order():
    """The draw order of init_params is the one a one-block model always had (C W1 b1 W2 b2 then batch
    norm's gain and bias): a change would silently change every default run (see test_pinned_values)."""
    assert model.param_names(model.ModelConfig()) == ("C", "W1", "b1", "W2", "b2", "bngain1", "bnbias1")


def test_param_shapes_chain_the_blocks():
    config = model.ModelConfig(vocab_size=29, embedding_dim=10, hidden=(64, 32, 16))
    shapes = model.param_shapes(config)
    assert shapes["W1"] == (30, 64) and shapes["W2"] == (64, 32) and shapes["W3"] == (32, 16)
    assert shapes["W4"] == (16, 29) and shapes["b4"] == (29,) and shapes["bngain3"] == (1, 16)
    assert "bngain4" not in shapes and model.param_count_for(config) == sum(math.prod(s) for s in shapes.values())


def test_every_block_gets_the_kaiming_gain_for_its_own_fan_in(key):
    config = model.ModelConfig(vocab_size=29, hidden=(2_000, 1_000))
    params = model.init_params(key, config)
    assert float(jnp.std(params["W1"])) == pytest.approx((5 / 3) / math.sqrt(30), rel=0.05)
    assert float(jnp.std(params["W2"])) == pytest.approx((5 / 3) / math.sqrt(2_000), rel=0.05)
    assert float(jnp.std(params["W3"])) == pytest.approx(0.1, rel=0.05)  # the output layer, as in the tutorial
    assert float(jnp.mean(params["bngain2"])) == pytest.approx(1.0, abs=0.01)


def test_every_block_taps_its_own_names_once(key, batch):
    """A tap name seen twice would make the checker's perturbation and the manual passes' records
    disagree (one keeps the first value, the other the last)."""
    config = model.ModelConfig(vocab_size=29, hidden=(16, 8))
    params = model.init_params(key, config)
    for rules in model.RULES:
        seen = []
        tap = lambda name, value, seen=seen: seen.append(name) or value  # noqa: E731
        jax.eval_shape(lambda p, rules=rules, tap=tap: model.forward(p, *batch, rules=rules, tap=tap), params)
        assert len(seen) == len(set(seen)), rules
        assert {"hprebn[1]", "hprebn[2]", "h[1]", "h[2]", "hpreact[2]"} <= set(seen), rules


def test_a_deep_models_logits_are_a_plain_stack_of_blocks(key, batch):
    """Independently of model.forward: embed, then Linear -> BatchNorm (unbiased variance) -> tanh twice."""
    config = model.ModelConfig(vocab_size=29, hidden=(16, 8))
    p = {k: np.asarray(v, np.float64) for k, v in model.init_params(key, config).items()}
    h = p["C"][np.asarray(batch[0])].reshape(32, -1)
    for layer in (1, 2):
        x = h @ p[f"W{layer}"] + p[f"b{layer}"]
        x_hat = (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + 1e-5)
        h = np.tanh(p[f"bngain{layer}"] * x_hat + p[f"bnbias{layer}"])
    expected = h @ p["W3"] + p["b3"]
    np.testing.assert_allclose(model.logits(model.init_params(key, config), batch[0]), expected, rtol=1e-4, atol=1e-5)


def test_statistics_must_be_one_set_per_block(key, batch):
    config = model.ModelConfig(vocab_size=29, hidden=(16, 8))
    params = model.init_params(key, config)
    one = model.BatchNormStats(jnp.zeros((1, 16)), jnp.ones((1, 16)))
    with pytest.raises(ValueError, match="1 sets of batch-norm statistics for a model of 2 blocks"):
        model.logits(params, batch[0], stats=(one,))


@pytest.mark.slow
def test_a_new_rule_set_is_one_registry_entry(key, batch, monkeypatch):
    """What the README's "Adding a rule set" promises: a RuleSet in RULE_SETS is a rule set of the
    forward pass, a gradient mode of the trainer and a method of the checker, with no other change."""
    from jaxbirds import gradcheck, modes, ops, train
    from jaxbirds.rules import RuleSet

    def batch_norm_by_hand(x, gain, bias, tap):  # the same value, written another way
        x_hat = (x - jnp.mean(x, axis=0)) / jnp.sqrt(jnp.var(x, axis=0, ddof=1) + ops.BN_EPS)
        return gain * x_hat + bias

    toy = RuleSet("toy", "a test's own", batch_norm_by_hand, ops.cross_entropy)
    monkeypatch.setitem(model.RULE_SETS, "toy", toy)
    monkeypatch.setattr(modes, "MODES", modes.build_modes())
    params = model.init_params(key, model.ModelConfig(vocab_size=29, hidden=(16, 8)))
    assert float(model.loss(params, *batch, rules="toy")) == pytest.approx(float(model.loss(params, *batch)), rel=1e-5)
    loss, grads = train.loss_and_grads_fn("toy")(params, *batch)
    assert set(grads) == set(params)
    recipe = train.TrainConfig(steps=3, chunk_size=3, grad_mode="toy")  # the trainer accepts it as a mode
    trained = train.train(*batch, recipe, train.init_state(model.ModelConfig(vocab_size=29, hidden=(16, 8)), recipe))
    assert trained.state.step == 3 and np.all(np.isfinite(trained.losses))
    assert "toy" in gradcheck.checked_modes()  # the checker's tables take it from the same registry
    ours, ref = gradcheck.mode_vs_reference(params, *map(jnp.asarray, batch), "toy")
    assert set(ours) == set(ref) and "hprebn[2]" in ours
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_evaluation_mode_uses_each_blocks_own_statistics(key, batch):
    """Each block's statistics, taken from the training forward's own hprebn[l], make evaluation mode
    equal training mode at every depth (block 2's statistics applied to block 1, or block 1's to all,
    would not)."""
    config = model.ModelConfig(vocab_size=29, hidden=(16, 16, 16))
    params = model.init_params(key, config)
    seen = {}
    model.forward(params, batch[0], tap=lambda name, value: seen.setdefault(name, value))
    stats = tuple(
        model.BatchNormStats(jnp.mean(h, axis=0, keepdims=True), jnp.var(h, axis=0, keepdims=True, ddof=1))
        for h in (seen[f"hprebn[{layer}]"] for layer in (1, 2, 3))
    )
    training = model.logits(params, batch[0])
    np.testing.assert_allclose(model.logits(params, batch[0], stats=stats), training, rtol=1e-4, atol=1e-5)
    swapped = (stats[1], stats[0], stats[2])
    assert not np.allclose(model.logits(params, batch[0], stats=swapped), training, rtol=1e-3, atol=1e-3)
