"""The backward pass's closed forms, each written once.

The custom-VJP rules (:mod:`jaxbirds.vjp`), the custom-JVP rules
(:mod:`jaxbirds.jvp`) and both manual passes (:mod:`jaxbirds.manual`) call
these; the derivations are next to the rules that use them (batch norm and
cross-entropy in :mod:`jaxbirds.vjp`, the rest in the docstrings below).

Notation: ``n`` is the batch size; ``dX`` is ``dloss/dX`` and has ``X``'s shape.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def cross_entropy_backward(probs: jax.Array, labels: jax.Array, g: jax.Array | float = 1.0) -> jax.Array:
    """``dlogits = g (softmax(logits) - onehot(labels)) / n`` (N, V), for the mean cross-entropy.

    Args:
      probs: ``softmax(logits)``, (N, V).
      labels: the target classes, (N,) integers.
      g: the cotangent of the (scalar) loss.

    Returns:
      ``dloss/dlogits``, (N, V), derived in :func:`jaxbirds.vjp.cross_entropy`.
    """
    n, classes = probs.shape
    onehot = jax.nn.one_hot(labels, classes, dtype=probs.dtype)
    return (probs - onehot) * (g / n)


def batch_norm_backward(
    x_hat: jax.Array, inv_std: jax.Array, gain: jax.Array, dy: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm's backward pass, ``y = gain x_hat + bias`` with ``x_hat = (x - mean) s``.

    ``dbias = sum_i dy_i``, ``dgain = sum_i dy_i x_hat_i`` and
    ``dx = gain s / n (n dy - dbias - n/(n-1) x_hat dgain)`` (derived in
    :func:`jaxbirds.vjp.batch_norm`).

    Args:
      x_hat: the normalised input, (N, H).
      inv_std: ``s = (var + eps)^(-1/2)``, (1, H), with the unbiased variance.
      gain: (1, H).
      dy: the cotangent of the output, (N, H).

    Returns:
      ``(dx, dgain, dbias)``: (N, H), (1, H), (1, H).
    """
    chex.assert_equal_shape([x_hat, dy])
    n = x_hat.shape[0]
    dbias = jnp.sum(dy, axis=0, keepdims=True)
    dgain = jnp.sum(dy * x_hat, axis=0, keepdims=True)
    dx = (gain * inv_std / n) * (n * dy - dbias - (n / (n - 1)) * x_hat * dgain)
    return dx, dgain, dbias


def tanh_backward(h: jax.Array, dh: jax.Array) -> jax.Array:
    """``dpreact = (1 - h^2) dh`` for ``h = tanh(preact)``, written as ``u + u h`` with ``u = dh (1 - h)``.

    That is the order in which JAX's own tanh rule rounds, so the manual passes
    agree with ``jax.grad`` bit for bit. (Near ``h = +1`` it also avoids the
    cancellation in ``1 - h^2``; near ``h = -1`` the cancellation moves into
    ``1 + h``, so the order is chosen for agreement, not for accuracy.)
    """
    u = dh * (1.0 - h)
    return u + u * h


def linear_backward(x: jax.Array, W: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``y = x W + b``: ``dx = dy W^T``, ``dW = x^T dy``, ``db = sum_i dy_i`` (b was broadcast over rows).

    Args:
      x: (N, I); W: (I, O); dy: (N, O).

    Returns:
      ``(dx, dW, db)``: (N, I), (I, O), (O,).
    """
    return dy @ W.T, x.T @ dy, jnp.sum(dy, axis=0)


def embedding_backward(C: jax.Array, X: jax.Array, demb: jax.Array) -> jax.Array:
    """``dC[c] = sum over (i, j) with X[i, j] == c of demb[i, j]``: the transpose of a gather.

    Args:
      C: the embedding table, (V, E) (only its shape and dtype are read).
      X: the ids, (N, k).
      demb: the cotangent of ``C[X]``, (N, k, E).

    Returns:
      ``dC``, (V, E): a scatter-add, where repeated ids accumulate.
    """
    chex.assert_shape(demb, (*X.shape, C.shape[1]))
    return jnp.zeros_like(C).at[X].add(demb)
