"""Softmax and the row maximum it subtracts, written for XLA:CPU's loop emitter.

``jnp.max`` lowers to a reduce with XLA's NaN-propagating ``maximum``, which the CPU backend
runs as a scalar loop: 5.9 ms over a [8, 8, 512, 512] attention score array on the 2-core Zen 5
machine, where a sum over the same array takes 1.3 ms. A reduce whose combiner is
``where(a > b, a, b)`` vectorizes like the sum (1.4 ms). T5 takes that maximum in every
attention softmax. (Not over the vocabulary in the loss: for a [8, 128, 32128] reduce XLA picks
a layout that makes this combiner 30x slower than ``jnp.max``.)

The numbers are those of ``jax.nn.softmax`` for finite inputs; a NaN anywhere in a row still
makes the row's softmax NaN (through the exp-sum), it is only the maximum itself that may skip
it.

``first_argmax`` is the argmax over the vocabulary (token accuracy in training and evaluation),
for the same reason: XLA:CPU runs ``jnp.argmax``'s (value, index) reduce as a scalar loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def row_max(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """The maximum of ``x`` along ``axis`` (``-inf`` for an empty axis). Not differentiable:
    callers subtract it under ``stop_gradient``."""
    axis = axis % x.ndim
    max_ = jax.lax.reduce(x, jnp.array(-jnp.inf, x.dtype),
                          lambda a, b: jnp.where(a > b, a, b), (axis,))
    return jnp.expand_dims(max_, axis) if keepdims else max_


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax(x, axis)``, with the same memory-lean derivative rule."""
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(row_max(x, axis, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))


def first_argmax(logits_BLV: jax.Array) -> jax.Array:
    """``jnp.argmax(logits_BLV, axis=-1)`` (the first index of the maximum) for finite logits.

    A max, then a min over the indices that reach it. XLA:CPU runs argmax's (value, index)
    reduce as a scalar loop: 67 ms on [8, 128, 32128] where these two vectorized reductions take
    21 ms, and the max is shared with the loss's logsumexp. A row with a NaN gives ``V`` (never a
    token id), where argmax gives the NaN's index.
    """
    max_BL1 = jnp.max(logits_BLV, axis=-1, keepdims=True)
    vocab_size = logits_BLV.shape[-1]
    vocab_V = jnp.arange(vocab_size, dtype=jnp.int32)
    return jnp.min(jnp.where(logits_BLV == max_BL1, vocab_V, vocab_size), axis=-1)
