"""The hand-written custom_vjp rules against jax.grad of the plain implementations."""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jaxbirds import finite_differences, gradcheck, model, ops, vjp

DTYPES = [jnp.float32, jnp.float64]


# Inputs come from NumPy: an eager jax.random call on a new shape compiles, NumPy does not.


def ce_inputs(seed, n, classes, scale, dtype):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(scale * rng.standard_normal((n, classes)), dtype)
    return logits, jnp.asarray(rng.integers(0, classes, n), jnp.int32)


def bn_inputs(seed, n, hidden, scale, dtype):
    """Inputs and a random cotangent ``dy`` at the model's scale (a mean loss gives ~1/n per row)."""
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((n, hidden)) + 3.0 * scale
    gain = 1.0 + 0.1 * rng.standard_normal((1, hidden))
    bias = 0.1 * rng.standard_normal((1, hidden))
    dy = rng.standard_normal((n, hidden)) / n
    return tuple(jnp.asarray(a, dtype) for a in (x, gain, bias, dy))


@jax.jit
def ce_grads(logits, labels):
    """(ours, reference): gradients through the custom rule and through plain jax.numpy."""
    return jax.grad(vjp.cross_entropy)(logits, labels), jax.grad(ops.cross_entropy)(logits, labels)


@jax.jit
def bn_pullbacks(x, gain, bias, dy):
    """(ours, reference): the pullback of ``dy`` through the custom rule and through plain batch norm."""
    return jax.vjp(vjp.batch_norm, x, gain, bias)[1](dy), jax.vjp(ops.batch_norm, x, gain, bias)[1](dy)


def assert_close(ours, ref, tol, floor=0.0):
    """The checker's normwise criterion, leaf by leaf: ``max|a - b| <= rtol max|b| + floor``."""
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= tol.rtol * np.max(np.abs(b)) + floor, (np.max(np.abs(a - b)), np.max(np.abs(b)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_rule_matches_jax_grad(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        logits, labels = ce_inputs(0, 32, 29, 2.0, dtype)
        assert vjp.cross_entropy(logits, labels).dtype == dtype
        np.testing.assert_allclose(vjp.cross_entropy(logits, labels), ops.cross_entropy(logits, labels), rtol=1e-6)
        ours, ref = ce_grads(logits, labels)
        assert ours.dtype == dtype
        assert_close(ours, ref, gradcheck.tolerance_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_rule_matches_jax_grad(dtype):
    """Pull back a random cotangent (not just ones), so every term of the rule matters."""
    with jax.enable_x64(dtype == jnp.float64):
        x, gain, bias, dy = bn_inputs(1, 32, 64, 1.0, dtype)
        tight = dtype == jnp.float64
        np.testing.assert_allclose(
            vjp.batch_norm(x, gain, bias),
            ops.batch_norm(x, gain, bias),
            rtol=1e-12 if tight else 1e-5,
            atol=1e-12 if tight else 1e-6,
        )
        ours, ref = bn_pullbacks(x, gain, bias, dy)
        assert_close(ours, ref, gradcheck.tolerance_for(dtype))


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.slow
def test_finite_differences_agree_with_both_rules(seed):
    finite_differences.check_rules(jax.random.key(seed))


def _dropped_term(eps, residuals, dy):
    x_hat, inv_std, gain = residuals
    return gain * inv_std * dy, jnp.sum(dy * x_hat, 0, keepdims=True), jnp.sum(dy, 0, keepdims=True)


def _no_bessel(eps, residuals, dy):
    x_hat, inv_std, gain = residuals
    n = x_hat.shape[0]
    dbias, dgain = jnp.sum(dy, 0, keepdims=True), jnp.sum(dy * x_hat, 0, keepdims=True)
    return (gain * inv_std / n) * (n * dy - dbias - x_hat * dgain), dgain, dbias


def _ce_without_mean(residuals, g):
    probs, labels = residuals
    return (probs - jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)) * g, None


@pytest.mark.parametrize("wrong", [_dropped_term, _no_bessel], ids=["dropped term", "no n/(n-1)"])
@pytest.mark.slow
def test_finite_difference_check_catches_a_wrong_batch_norm_rule(monkeypatch, wrong):
    """The check is not vacuous, and fine enough to see batch norm's missing n/(n-1), whatever the
    precision the rest of the check runs in (it always differences in float64)."""
    broken = jax.custom_vjp(lambda x, g, b, eps=1e-5: ops.batch_norm(x, g, b, eps), nondiff_argnums=(3,))
    broken.defvjp(vjp._batch_norm_fwd, wrong)
    monkeypatch.setattr(vjp, "batch_norm", broken)
    with pytest.raises(AssertionError):
        finite_differences.check_rules(jax.random.key(3))


def test_finite_difference_check_catches_a_wrong_cross_entropy_rule(monkeypatch):
    broken = jax.custom_vjp(lambda logits, labels: ops.cross_entropy(logits, labels))
    broken.defvjp(vjp._cross_entropy_fwd, _ce_without_mean)
    monkeypatch.setattr(vjp, "cross_entropy", broken)
    with pytest.raises(AssertionError):
        finite_differences.check_rules(jax.random.key(3))


# --- properties over shapes and scales (float64: the tolerance is the acceptance one) ------------

F64 = gradcheck.tolerance_for(np.float64)


@jax.jit
def both_rules(logits, labels, x, gain, bias, dy):
    return ce_grads(logits, labels), bn_pullbacks(x, gain, bias, dy)


@settings(max_examples=10, deadline=None)  # every new shape is a new compile (~1 s on 2 cores)
@given(
    n=st.integers(2, 64),
    classes=st.integers(2, 64),
    hidden=st.integers(1, 64),
    log_scale=st.floats(-3, 4),
    seed=st.integers(0, 2**16),
)
@example(n=2, classes=2, hidden=30, log_scale=2.0, seed=0)  # once a false alarm on dgain (see its floor)
@pytest.mark.slow
def test_both_rules_over_random_shapes_and_scales(n, classes, hidden, log_scale, seed):
    """Batch 2-64, classes 2-64, hidden 1-64, inputs from 1e-3 to 1e4 in size, float64."""
    with jax.enable_x64(True):
        logits, labels = ce_inputs(seed, n, classes, 10.0**log_scale, jnp.float64)
        x, gain, bias, dy = bn_inputs(seed + 1, n, hidden, 10.0 ** min(log_scale, 3.0), jnp.float64)
        (ce_ours, ce_ref), (bn_ours, bn_ref) = jax.device_get(both_rules(logits, labels, x, gain, bias, dy))
    assert np.all(np.isfinite(ce_ours))
    assert_close(ce_ours, ce_ref, F64)
    np.testing.assert_allclose(ce_ours.sum(axis=1), 0.0, atol=1e-15)  # rows of (p - onehot)/n sum to 0
    # dx is a difference of terms of size ~gain s |dy|; at n = 2 and a large scale it cancels to ~eps/var
    # of them, so its rounding is measured against the terms (as in the float32 test below)
    # (and x_hat itself is only as accurate as x - mu: ~eps |x| s, which the conditioning factor counts)
    floor = 100 * np.finfo(np.float64).eps * bn_term_scale(x, gain, dy) * x_hat_conditioning(x)
    assert_close(bn_ours[0], bn_ref[0], F64, floor=floor)
    # dgain = sum_i dy_i x_hat_i, and x_hat = (x - mu) s rounds like x itself: ~eps |x| s per entry, which is
    # large next to x_hat where the column's spread is small next to its values (found at n = 2, scale 100)
    assert_close(bn_ours[1], bn_ref[1], F64, floor=100 * np.finfo(np.float64).eps * x_hat_rounding(x, dy))
    assert_close(bn_ours[2], bn_ref[2], F64)


def x_hat_rounding(x, dy) -> float:
    """The size of dgain's rounding: max over columns of sum_i |dy_i| * max_i |x_i| * s, s = (var + eps)^-1/2."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    inv_std = 1.0 / np.sqrt(np.var(x, axis=0, ddof=1) + 1e-5)
    return float((np.abs(dy).sum(axis=0) * np.abs(x).max(axis=0) * inv_std).max())


def x_hat_conditioning(x) -> float:
    """How much the rounding of ``x`` is magnified in ``x_hat = (x - mu) s``: max(1, max |x| s) over columns."""
    x = np.asarray(x, np.float64)
    return float(max(1.0, (np.abs(x).max(axis=0) / np.sqrt(np.var(x, axis=0, ddof=1) + 1e-5)).max()))


def bn_term_scale(x, gain, dy) -> float:
    """The size of the terms batch norm's dx is a difference of: max |gain s| max |dy|."""
    inv_std = 1.0 / np.sqrt(np.var(np.asarray(x, np.float64), axis=0, ddof=1) + 1e-5)
    return float(np.abs(np.asarray(gain) * inv_std).max() * np.abs(np.asarray(dy)).max())


@pytest.mark.parametrize("n, hidden", [(2, 1), (3, 7), (17, 64), (64, 33)])
def test_float32_batch_norm_at_rounding_level(n, hidden):
    """float32 over odd shapes. The closed form subtracts terms of size ~ gain s |dy|, so that is
    the scale its rounding error is measured against (at n = 2 the true dx nearly cancels to 0)."""
    x, gain, bias, dy = bn_inputs(n, n, hidden, 1.0, jnp.float32)
    ours, ref = jax.device_get(bn_pullbacks(x, gain, bias, dy))
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-6 * bn_term_scale(x, gain, dy))
    for a, b in zip(ours[1:], ref[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


# --- edge cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits_give_finite_gradients(magnitude):
    logits = jnp.array([[magnitude, 0.0, -magnitude], [0.0, magnitude, 1.0]], jnp.float32)
    labels = jnp.array([2, 0])
    loss = vjp.cross_entropy(logits, labels)
    grads, ref = ce_grads(logits, labels)
    assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grads)))
    np.testing.assert_allclose(grads, ref, atol=1e-7)
    # the picked logit of row 0 is hugely below the max: its softmax is 0, so its gradient is -1/n
    assert float(grads[0, 2]) == pytest.approx(-0.5 if magnitude > 0 else 0.0, abs=1e-6)


def test_constant_batch_norm_column_is_finite_thanks_to_eps():
    x, gain, bias, dy = bn_inputs(4, 16, 5, 1.0, jnp.float32)
    x = x.at[:, 2].set(7.0)  # zero variance: 1/sqrt(var + eps) is finite only because of eps
    assert bool(jnp.all(jnp.isfinite(vjp.batch_norm(x, gain, bias))))
    grads, ref = bn_pullbacks(x, gain, bias, dy)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_allclose(grads[0][:, 2], ref[0][:, 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [vjp.batch_norm, ops.batch_norm])
def test_batch_of_one_is_rejected(fn):
    x = jnp.ones((1, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fn(x, jnp.ones((1, 4)), jnp.zeros((1, 4)))


def test_rules_work_under_jit_and_vmap_over_a_batch_of_models(dataset):
    """vmap over a leading model axis: K models in one program equal K separate models."""
    config = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    keys = jax.random.split(jax.random.key(5), 4)
    stacked = jax.jit(jax.vmap(lambda k: model.init_params(k, config)))(keys)
    X, Y = jnp.asarray(dataset.train.X[:32]), jnp.asarray(dataset.train.Y[:32])
    grad_fn = jax.jit(jax.grad(lambda p: model.loss(p, X, Y, rules="custom_vjp")))
    batched = jax.vmap(grad_fn)(stacked)
    for k in range(len(keys)):
        one = grad_fn(jax.tree.map(operator.itemgetter(k), stacked))
        for name in model.param_names(config):
            np.testing.assert_allclose(batched[name][k], one[name], rtol=1e-5, atol=1e-8)
