"""The manual backward passes against jax.grad, tensor by tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbirds import closed_forms, gradcheck, manual, model


def make_problem(dataset, hidden, seed, dtype, batch=32):
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=hidden)
    params = model.init_params(jax.random.key(seed), config, dtype)
    rows = np.random.default_rng(seed).integers(0, len(dataset.train), batch)
    return params, jnp.asarray(dataset.train.X[rows]), jnp.asarray(dataset.train.Y[rows])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("hidden, seed", [(64, 0), (200, 1)])
def test_atomic_pass_equals_jax_grad_bit_for_bit_on_every_intermediate(dataset, dtype, hidden, seed):
    """With the forward shared, every one of the 19 intermediates and 7 parameters is bitwise equal."""
    with jax.enable_x64(dtype == jnp.float64):
        params, X, Y = make_problem(dataset, hidden, seed, dtype)
        ours, ref = jax.device_get(gradcheck.atomic_vs_reference(params, X, Y))
    assert set(ours) == set(ref) == {*manual.intermediates(1), *params}
    for name in ref:
        assert ours[name].dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.slow
def test_fused_pass_is_close_to_jax_grad(dataset, dtype):
    tol = gradcheck.tolerance_for(dtype)
    with jax.enable_x64(dtype == jnp.float64):
        params, X, Y = make_problem(dataset, 200, 2, dtype)
        rows = gradcheck.mode_rows(params, X, Y, "manual", tol)
        loss = manual.fused_backward(params, X, Y).loss
        assert float(loss) == pytest.approx(float(model.loss(params, X, Y)), rel=1e-6)
    assert [r.name for r in rows] == ["logits", "hprebn[1]", *params]
    assert all(r.close for r in rows), gradcheck.format_table(rows, "fused")


@settings(max_examples=2, deadline=None)  # each example is a new shape, so several new compiles
@given(batch=st.integers(2, 64), hidden=st.integers(1, 64), seed=st.integers(0, 1000))
@pytest.mark.slow
def test_fused_pass_over_random_shapes_float64(dataset, batch, hidden, seed):
    tol = gradcheck.tolerance_for(np.float64)
    with jax.enable_x64(True):
        params, X, Y = make_problem(dataset, hidden, seed, jnp.float64, batch)
        rows = gradcheck.mode_rows(params, X, Y, "manual", tol)
    assert all(r.close for r in rows), gradcheck.format_table(rows, "fused")


@pytest.mark.slow
def test_a_tie_for_the_row_maximum_splits_its_gradient_like_jax(dataset):
    """Two logit columns made identical (same weights, same bias, above the rest): every row's maximum
    is a tie. JAX's max rule splits the gradient equally between the tied entries; the atomic pass
    must do the same, bit for bit, or it sends everything to the first maximum."""
    params, X, Y = make_problem(dataset, 16, 6, jnp.float32)
    W2 = params["W2"].at[:, 5].set(params["W2"][:, 4])  # the output layer of one block
    params = {**params, "W2": W2, "b2": params["b2"].at[4].set(10.0).at[5].set(10.0)}
    ours, ref = jax.device_get(gradcheck.atomic_vs_reference(params, X, Y))
    values = manual.forward_intermediates(params, X, Y)
    tied = np.asarray(values["logits"] == values["logit_maxes"]).sum(axis=1)
    assert np.all(tied == 2)  # the situation under test really arises
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    # the gradient reaching the maxima is rounding noise, but not all zero, so where it goes shows
    assert np.any(np.asarray(ref["logit_maxes"]) != 0)


def test_embedding_gradient_accumulates_repeated_indices():
    """Every use of a row adds to it: an id used 5 times collects 5 contributions."""
    C = jnp.zeros((6, 2))
    X = jnp.array([[3, 3, 3], [3, 0, 3]])  # id 3 five times, id 0 once, the rest never
    demb = jnp.arange(12.0).reshape(2, 3, 2)
    dC = closed_forms.embedding_backward(C, X, demb)
    expected = np.zeros((6, 2))
    for i in range(2):  # the tutorial's double loop, as the reference
        for j in range(3):
            expected[int(X[i, j])] += np.asarray(demb[i, j])
    np.testing.assert_array_equal(dC, expected)
    ref = jax.grad(lambda C: jnp.sum(C[X] * demb))(C)
    np.testing.assert_array_equal(dC, ref)


def test_forward_intermediates_agree_with_the_model(dataset):
    params, X, Y = make_problem(dataset, 64, 3, jnp.float32)
    values = manual.forward_intermediates(params, X, Y)
    assert set(values) == {*manual.intermediates(1), "loss"}
    np.testing.assert_allclose(values["logits"], model.logits(params, X), rtol=1e-5, atol=1e-6)
    assert float(values["loss"]) == pytest.approx(float(model.loss(params, X, Y)), rel=1e-6)
    assert values["emb"].shape == (32, 3, 10) and values["bnvar[1]"].shape == (1, 64)


def test_perturbations_change_only_what_they_touch(dataset):
    """The taps the checker relies on: a zero tap changes nothing anywhere; a nonzero tap on ``h``
    shifts ``h`` by exactly that much, leaves everything computed before ``h`` bit for bit alone, and
    changes what comes after it (so ``dloss/dtap`` really is ``dloss/dh``)."""
    params, X, Y = make_problem(dataset, 64, 4, jnp.float32)
    plain = manual.forward_intermediates(params, X, Y)
    zero = manual.forward_intermediates(params, X, Y, {"h[1]": jnp.zeros((32, 64))})
    for name in plain:
        np.testing.assert_array_equal(zero[name], plain[name], err_msg=name)
    moved = manual.forward_intermediates(params, X, Y, {"h[1]": jnp.full((32, 64), 0.1)})
    order = list(manual.intermediates(1))
    for name in order[: order.index("h[1]")]:
        np.testing.assert_array_equal(moved[name], plain[name], err_msg=name)
    np.testing.assert_allclose(moved["h[1]"], plain["h[1]"] + 0.1, rtol=0, atol=1e-7)
    for name in [*order[order.index("h[1]") + 1 :], "loss"]:
        assert not np.array_equal(moved[name], plain[name]), name


def test_manual_passes_reject_a_batch_of_one(dataset):
    params, X, Y = make_problem(dataset, 8, 5, jnp.float32, batch=2)
    with pytest.raises(ValueError, match="at least 2"):
        manual.fused_backward(params, X[:1], Y[:1])
    with pytest.raises(ValueError, match="at least 2"):
        manual.forward_intermediates(params, X[:1], Y[:1])


# --- depth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_atomic_pass_is_bitwise_at_depth_three(dataset, dtype):
    """Three blocks of different widths: every intermediate of every block, and every parameter."""
    with jax.enable_x64(dtype == jnp.float64):
        params, X, Y = make_problem(dataset, (24, 16, 12), 7, dtype)
        ours, ref = jax.device_get(gradcheck.atomic_vs_reference(params, X, Y))
    assert set(ours) == set(ref) == {*manual.intermediates(3), *params}
    assert ours["hprebn[2]"].shape == (32, 16) and ours["W4"].shape == (12, 29)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


@pytest.mark.slow
def test_fused_pass_is_close_at_depth_two(dataset):
    tol = gradcheck.tolerance_for(np.float64)
    with jax.enable_x64(True):
        params, X, Y = make_problem(dataset, (16, 8), 8, jnp.float64)
        rows = gradcheck.mode_rows(params, X, Y, "manual", tol)
    assert [r.name for r in rows][:3] == ["logits", "hprebn[2]", "hprebn[1]"]
    assert all(r.close for r in rows), gradcheck.format_table(rows, "fused, depth 2")


def test_a_name_tapped_twice_is_an_error(dataset, monkeypatch):
    """Two blocks tapping ``hprebn`` unnumbered (a forgotten ``in_layer``) must not silently share a name."""
    params, X, Y = make_problem(dataset, (8, 8), 9, jnp.float32)
    monkeypatch.setattr(model, "in_layer", lambda tap, layer: tap)
    with pytest.raises(ValueError, match="tapped twice"):
        manual.forward_intermediates(params, X, Y)
