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

