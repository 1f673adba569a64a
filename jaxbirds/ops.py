"""The model's two interesting operations, batch norm and cross-entropy, in plain ``jax.numpy``.

Each is written twice, with the same value:

* :func:`batch_norm`, :func:`cross_entropy` - compact, as one would write them
  for training; the ``autodiff`` rules (JAX derives their gradients);
* :func:`batch_norm_steps`, :func:`cross_entropy_steps` - the tutorial's
  atomic steps, one named intermediate per line (``bnmeani``, ``bndiff``, ...,
  ``probs``, ``logprobs``); the ``tutorial`` rules, which the atomic manual
  backward pass in :mod:`jaxbirds.manual` walks back through.

Every function takes a ``tap(name, value) -> value`` hook that sees the named
intermediates as they are computed (see :func:`jaxbirds.model.forward`): the
identity by default, a recorder for the manual passes, a zero perturbation for
the gradient checker.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbirds.errors import ConfigError
from jaxbirds.rules import RuleSet, Tap, no_tap

BN_EPS = 1e-5


def check_batch_size(n: int) -> None:
    """Batch norm's unbiased variance divides by ``n - 1``: a batch needs two rows."""
    if n < 2:
        raise ConfigError(
            f"batch norm needs a batch of at least 2 rows (its unbiased variance divides by n - 1); got {n}"
        )


def batch_norm(x: jax.Array, gain: jax.Array, bias: jax.Array, eps: float = BN_EPS, tap: Tap = no_tap) -> jax.Array:
    """Training-mode batch norm over axis 0, as in the tutorial.

    ``mu = mean(x, 0)``, ``var = sum((x - mu)^2, 0) / (n - 1)`` (unbiased),
    ``s = (var + eps)^(-1/2)``, ``x_hat = (x - mu) s``, ``y = gain x_hat + bias``.
    ``x`` is (N, H); ``gain`` and ``bias`` are (1, H). Taps ``bnvar_inv`` (``s``)
    and ``bnraw`` (``x_hat``), which the fused manual pass reuses.
    """
    n = x.shape[0]
    check_batch_size(n)
    diff = x - jnp.mean(x, axis=0, keepdims=True)
    inv_std = tap("bnvar_inv", jax.lax.rsqrt(jnp.sum(diff * diff, axis=0, keepdims=True) / (n - 1) + eps))
    x_hat = tap("bnraw", diff * inv_std)
    return gain * x_hat + bias


def batch_norm_steps(
    x: jax.Array, gain: jax.Array, bias: jax.Array, eps: float = BN_EPS, tap: Tap = no_tap
) -> jax.Array:
    """:func:`batch_norm` in the tutorial's atomic steps, each one tapped."""
    n = x.shape[0]
    check_batch_size(n)
    bnmeani = tap("bnmeani", jnp.sum(x, axis=0, keepdims=True) / n)  # (1, H)
    bndiff = tap("bndiff", x - bnmeani)  # (n, H)
    bndiff2 = tap("bndiff2", bndiff**2)  # (n, H)
    bnvar = tap("bnvar", jnp.sum(bndiff2, axis=0, keepdims=True) / (n - 1))  # (1, H)
    bnvar_inv = tap("bnvar_inv", (bnvar + eps) ** -0.5)  # (1, H)
    bnraw = tap("bnraw", bndiff * bnvar_inv)  # (n, H)
    return gain * bnraw + bias


def batch_norm_eval(
    x: jax.Array, gain: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, eps: float = BN_EPS
) -> jax.Array:
    """Evaluation-mode batch norm: the same affine map, with given (calibrated) statistics."""
    return gain * (x - mean) * jax.lax.rsqrt(var + eps) + bias


def cross_entropy(logits: jax.Array, labels: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits)``.

    ``loss = mean_i( logsumexp(logits_i) - logits_i[labels_i] )``, with the row
    maximum subtracted first so that ``exp`` cannot overflow (its gradient is
    stopped: the shift cancels, so it has none). Taps ``counts`` (``exp`` of the
    shifted logits) and ``counts_sum`` (their row sums), from which the custom
    VJP takes ``softmax(logits)``.
    """
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    counts = tap("counts", jnp.exp(shifted))
    log_norm = jnp.log(tap("counts_sum", jnp.sum(counts, axis=1, keepdims=True)))[:, 0]
    picked = jnp.take_along_axis(shifted, labels[:, None], axis=1)[:, 0]
    return jnp.mean(log_norm - picked)


def cross_entropy_steps(logits: jax.Array, labels: jax.Array, tap: Tap = no_tap) -> jax.Array:
    """:func:`cross_entropy` in the tutorial's atomic steps, each one tapped."""
    n = logits.shape[0]
    logit_maxes = tap("logit_maxes", jnp.max(logits, axis=1, keepdims=True))  # (n, 1)
    norm_logits = tap("norm_logits", logits - logit_maxes)  # (n, V)
    counts = tap("counts", jnp.exp(norm_logits))  # (n, V)
    counts_sum = tap("counts_sum", jnp.sum(counts, axis=1, keepdims=True))  # (n, 1)
    counts_sum_inv = tap("counts_sum_inv", counts_sum**-1)  # (n, 1)
    probs = tap("probs", counts * counts_sum_inv)  # (n, V)
    logprobs = tap("logprobs", jnp.log(probs))  # (n, V)
    return -jnp.mean(logprobs[jnp.arange(n), labels])


AUTODIFF = RuleSet(
    name="autodiff",
    summary="jax.numpy as one would write it; JAX derives the backward pass",
    batch_norm=lambda x, gain, bias, tap: batch_norm(x, gain, bias, tap=tap),
    cross_entropy=cross_entropy,
)

TUTORIAL = RuleSet(
    name="tutorial",
    summary="the tutorial's atomic steps, one tapped intermediate per line, for the atomic manual pass",
    batch_norm=lambda x, gain, bias, tap: batch_norm_steps(x, gain, bias, tap=tap),
    cross_entropy=cross_entropy_steps,
    jax_grad_mode=False,
)
