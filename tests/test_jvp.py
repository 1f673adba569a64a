"""The hand-written custom_jvp rules: reverse mode by transposition, forward mode, higher order."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from test_vjp import assert_close, bn_inputs, bn_term_scale, ce_inputs

from jaxbirds import gradcheck, jvp, model, ops, vjp

DTYPES = [jnp.float32, jnp.float64]


@jax.jit
def transposed_and_plain(logits, labels, x, gain, bias, dy):
    """jax.grad / jax.vjp through the custom_jvp rules (JAX transposes them) and through plain jnp."""
    ce = jax.grad(jvp.cross_entropy)(logits, labels), jax.grad(ops.cross_entropy)(logits, labels)
    bn = jax.vjp(jvp.batch_norm, x, gain, bias)[1](dy), jax.vjp(ops.batch_norm, x, gain, bias)[1](dy)
    return ce, bn


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_equal_the_plain_operations_inside_jvp(dtype):
    """The primal output of each JVP rule (computed inside the rule, with the tangent) is the plain value."""
    with jax.enable_x64(dtype == jnp.float64):
        logits, labels = ce_inputs(0, 32, 29, 2.0, dtype)
        x, gain, bias, _ = bn_inputs(1, 32, 64, 1.0, dtype)
        loss, _ = jax.jvp(lambda lg: jvp.cross_entropy(lg, labels), (logits,), (jnp.ones_like(logits),))
        y, _ = jax.jvp(jvp.batch_norm, (x, gain, bias), (x, gain, bias))
        np.testing.assert_array_equal(loss, ops.cross_entropy(logits, labels))
        np.testing.assert_allclose(y, ops.batch_norm(x, gain, bias), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_mode_by_transposition_matches_jax_grad(dtype):
    tol = gradcheck.tolerance_for(dtype)
    with jax.enable_x64(dtype == jnp.float64):
        logits, labels = ce_inputs(2, 32, 29, 2.0, dtype)
        x, gain, bias, dy = bn_inputs(3, 32, 64, 1.0, dtype)
        (ce_ours, ce_ref), (bn_ours, bn_ref) = jax.device_get(transposed_and_plain(logits, labels, x, gain, bias, dy))
    assert ce_ours.dtype == np.dtype(dtype)
    assert_close(ce_ours, ce_ref, tol)
    assert_close(bn_ours, bn_ref, tol)


@settings(max_examples=6, deadline=None)  # every new shape is a new compile
@given(n=st.integers(2, 64), classes=st.integers(2, 64), hidden=st.integers(1, 64), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_both_rules_over_random_shapes_float64(n, classes, hidden, seed):
    with jax.enable_x64(True):
        logits, labels = ce_inputs(seed, n, classes, 3.0, jnp.float64)
        x, gain, bias, dy = bn_inputs(seed + 1, n, hidden, 2.0, jnp.float64)
        (ce_ours, ce_ref), (bn_ours, bn_ref) = jax.device_get(transposed_and_plain(logits, labels, x, gain, bias, dy))
    f64 = gradcheck.tolerance_for(np.float64)
    assert_close(ce_ours, ce_ref, f64)
    assert_close(bn_ours[0], bn_ref[0], f64, floor=100 * np.finfo(np.float64).eps * bn_term_scale(x, gain, dy))
    assert_close(bn_ours[1:], bn_ref[1:], f64)


@jax.jit
def forward_mode(logits, labels, dlogits, x, gain, bias, dx, dgain, dbias):
    """jax.jvp through the custom_jvp rules (the rule as written) and through plain jnp."""
    ce = [jax.jvp(lambda lg, f=f: f(lg, labels), (logits,), (dlogits,))[1] for f in (jvp.cross_entropy,
                                                                                     ops.cross_entropy)]  # fmt: skip
    bn = [jax.jvp(f, (x, gain, bias), (dx, dgain, dbias))[1] for f in (jvp.batch_norm, ops.batch_norm)]
    return ce, bn


def tangents_like(seed, *arrays):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in arrays]


@settings(max_examples=5, deadline=None)  # every new shape is a new compile
@given(n=st.integers(2, 64), classes=st.integers(2, 64), hidden=st.integers(1, 64), log_scale=st.floats(-2, 3),
       seed=st.integers(0, 2**16), x64=st.booleans())  # fmt: skip
@pytest.mark.slow
def test_forward_mode_matches_jax_over_random_shapes_scales_and_precisions(n, classes, hidden, log_scale, seed, x64):
    """jax.jvp through the rules against jax.jvp of the plain operations, float32 and float64."""
    dtype = jnp.float64 if x64 else jnp.float32
    with jax.enable_x64(x64):
        logits, labels = ce_inputs(seed, n, classes, 10.0**log_scale, dtype)
        x, gain, bias, _ = bn_inputs(seed + 1, n, hidden, 10.0**log_scale, dtype)
        tangents = tangents_like(seed + 2, logits, x, gain, bias)
        (ce_ours, ce_ref), (bn_ours, bn_ref) = jax.device_get(forward_mode(logits, labels, tangents[0], x, gain, bias,
                                                                           *tangents[1:]))  # fmt: skip
    tol = gradcheck.tolerance_for(dtype)
    eps = np.finfo(np.dtype(dtype)).eps
    ce_terms = float(np.abs(np.asarray(tangents[0])).sum()) / n  # dL sums n V terms of size |dl|/n
    np.testing.assert_allclose(ce_ours, ce_ref, rtol=tol.rtol, atol=100 * eps * ce_terms)
    # dy = dgain x_hat + gain s (dx - ...): at n = 2 it cancels to ~eps/var of its terms, as dx does in reverse mode
    terms = float(np.abs(np.asarray(gain)).max() * np.abs(np.asarray(tangents[1])).max()) * float(
        1.0 / np.sqrt(np.var(np.asarray(x, np.float64), axis=0, ddof=1) + 1e-5).max()
    ) + float(np.abs(np.asarray(tangents[2])).max()) * np.sqrt(n)
    assert_close(bn_ours, bn_ref, tol, floor=100 * eps * terms)


def test_a_batch_of_one_is_refused_by_the_jvp_rule_too():
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        jax.jvp(jvp.batch_norm, (x, jnp.ones((1, 3)), jnp.zeros((1, 3))), (x, x, x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
def test_the_checker_passes_the_custom_jvp_model(dataset, dtype):
    """jax.grad through the transposed rules, in the gradient checker's table, at its tolerances."""
    with jax.enable_x64(dtype == jnp.float64):
        config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=64)
        params = model.init_params(jax.random.key(1), config, jnp.dtype(dtype))
        X, Y = jnp.asarray(dataset.train.X[:32]), jnp.asarray(dataset.train.Y[:32])
        rows = gradcheck.mode_rows(params, X, Y, "custom_jvp", gradcheck.tolerance_for(dtype))
    assert all(r.close for r in rows), gradcheck.format_table(rows, "custom_jvp")


# --- forward mode and higher order, through the whole model (float64) -------------------------------


@pytest.fixture(scope="module")
def tiny(dataset):
    """A model of two blocks small enough for a full Hessian: 231 parameters. Two blocks, so that
    forward mode and second order run through one block's rules into another's."""
    with jax.enable_x64(True):
        config = model.ModelConfig(vocab_size=dataset.vocab.size, embedding_dim=2, hidden=(4, 3))
        params = model.init_params(jax.random.key(2), config, jnp.float64)
    return params, jnp.asarray(dataset.train.X[:16]), jnp.asarray(dataset.train.Y[:16])


def flat_loss(rules, params, X, Y):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return flat, lambda v: model.loss(unravel(v), X, Y, rules=rules)


@pytest.mark.slow
def test_jvp_and_jacfwd_through_the_custom_jvp_model(tiny):
    params, X, Y = tiny
    with jax.enable_x64(True):
        flat, ours = flat_loss("custom_jvp", params, X, Y)
        _, plain = flat_loss("autodiff", params, X, Y)
        direction = jnp.asarray(np.random.default_rng(0).standard_normal(flat.shape))
        (v1, t1), (v2, t2) = jax.jvp(ours, (flat,), (direction,)), jax.jvp(plain, (flat,), (direction,))
        np.testing.assert_allclose(v1, v2, rtol=1e-14)
        np.testing.assert_allclose(t1, t2, rtol=1e-11)
        jacobians = jax.jit(lambda v: (jax.jacfwd(ours)(v), jax.jacfwd(plain)(v)))(flat)
        np.testing.assert_allclose(*jacobians, rtol=1e-10, atol=1e-15)


def test_hessian_through_the_custom_jvp_model(tiny):
    params, X, Y = tiny
    with jax.enable_x64(True):
        flat, ours = flat_loss("custom_jvp", params, X, Y)
        _, plain = flat_loss("autodiff", params, X, Y)
        h_ours, h_plain = jax.jit(jax.hessian(ours))(flat), jax.jit(jax.hessian(plain))(flat)
    assert h_ours.shape == (flat.size, flat.size)
    np.testing.assert_allclose(h_ours, h_plain, rtol=1e-9, atol=1e-12 * float(np.abs(h_plain).max()))
    np.testing.assert_allclose(h_ours, h_ours.T, rtol=1e-9, atol=1e-12 * float(np.abs(h_plain).max()))


@pytest.mark.parametrize("rules", ["custom_vjp", "custom_jvp"])
@pytest.mark.slow
def test_reverse_over_reverse_agrees_for_every_rule_set(tiny, rules):
    """grad of the squared gradient norm: JAX differentiates the hand-written backward rule
    (custom_vjp) or the transposed forward rule (custom_jvp) a second time."""
    params, X, Y = tiny
    with jax.enable_x64(True):

        def grad_norm(p, rules):
            g = jax.grad(model.loss)(p, X, Y, rules=rules)
            return sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(g))

        ours = jax.jit(jax.grad(grad_norm), static_argnums=1)(params, rules)
        ref = jax.jit(jax.grad(grad_norm), static_argnums=1)(params, "autodiff")
    for name in params:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-9, atol=1e-13, err_msg=name)


def test_forward_mode_through_custom_vjp_fails_with_jaxs_error():
    """The documented limit of custom_vjp: reverse mode only."""
    x, gain, bias, _ = bn_inputs(4, 8, 3, 1.0, jnp.float32)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(vjp.batch_norm, (x, gain, bias), (x, gain, bias))
    logits, labels = ce_inputs(5, 8, 4, 1.0, jnp.float32)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda lg: vjp.cross_entropy(lg, labels), (logits,), (logits,))


@pytest.mark.parametrize(
    "module, modes", [(jvp, ("fwd", "rev")), (vjp, ("rev",))], ids=["custom_jvp: fwd+rev", "custom_vjp: rev"]
)
@pytest.mark.slow
def test_second_order_finite_differences(module, modes):
    """check_grads(order=2) in every mode each rule set supports (float64)."""
    with jax.enable_x64(True):
        logits, labels = ce_inputs(6, 5, 4, 1.0, jnp.float64)
        x, gain, bias, _ = bn_inputs(7, 5, 3, 1.0, jnp.float64)
        tol = dict(eps=1e-4, atol=1e-5, rtol=1e-5)
        # jit: check_grads evaluates each function at many perturbed points of one shape
        check_grads(jax.jit(lambda lg: module.cross_entropy(lg, labels)), (logits,), order=2, modes=modes, **tol)
        check_grads(jax.jit(module.batch_norm), (x, gain, bias), order=2, modes=modes, **tol)


def w1_loss(params, X, Y, rules):
    """The loss as a function of W1 alone: upstream of both blocks' batch norms and cross-entropy, so its
    second derivative runs through every rule (24 entries in the tiny model)."""
    return lambda W1: model.loss({**params, "W1": W1}, X, Y, rules=rules)


@pytest.mark.parametrize("rules", [r for r in model.RULES if r not in ("autodiff", "custom_jvp")])  # custom_jvp: above
def test_hessian_forward_over_reverse_through_the_rules_agrees_with_the_plain_model(tiny, rules):
    """jax.hessian is jacfwd(jacrev): forward mode over the reverse pass. Through custom_vjp it works
    although custom_vjp has no forward mode: JAX differentiates the hand-written backward rule, whose
    operations all have JVPs; only a JVP of the custom_vjp function itself is refused (below)."""
    params, X, Y = tiny
    with jax.enable_x64(True):
        hessians = jax.jit(lambda W1: [jax.hessian(w1_loss(params, X, Y, r))(W1) for r in (rules, "autodiff")])
        ours, plain = jax.device_get(hessians(params["W1"]))
    assert ours.shape == plain.shape == params["W1"].shape * 2 and ours.dtype == np.float64
    np.testing.assert_allclose(ours, plain, rtol=1e-12, atol=1e-12 * float(np.abs(plain).max()))


def test_jacfwd_through_the_custom_vjp_model_fails_with_jaxs_error(tiny):
    params, X, Y = tiny
    with jax.enable_x64(True), pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jacfwd(w1_loss(params, X, Y, "custom_vjp"))(params["W1"])
