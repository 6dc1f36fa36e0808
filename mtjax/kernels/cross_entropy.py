"""Token cross-entropy with z-loss through the fused CPU kernel (``cross_entropy_cpu.cc``).

``cross_entropy_with_z_loss(logits, targets, z_loss)`` returns what
``mtjax.train.step.cross_entropy_with_z_loss`` and ``first_argmax(logits) == targets`` give,
differentiable in the logits. The forward pass overwrites the logits' buffer with
``exp(logits - max)`` and the backward pass overwrites that with the gradient (XLA aliases the
buffers; it copies first only where the logits are still needed elsewhere), so the step holds
one [tokens, V] float32 buffer for the loss instead of several. float32, CPU, one device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import kernels


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits_NV, targets_N, z_loss):
    return _forward(logits_NV, targets_N, z_loss)[0]


def _forward(logits_NV, targets_N, z_loss):
    n, v = logits_NV.shape
    exps_NV, loss_N, z_N, correct_N, stats_N2 = jax.ffi.ffi_call(
        "mtjax_cross_entropy_cpu_forward",
        (_f32(n, v), _f32(n), _f32(n), _f32(n), _f32(n, 2)),
        input_output_aliases={0: 0},
    )(logits_NV, targets_N, z_loss=np.float32(z_loss))
    return (loss_N, z_N, correct_N), (exps_NV, targets_N, stats_N2)


def _backward(z_loss, residuals, cotangents):
    exps_NV, targets_N, stats_N2 = residuals
    d_loss_N, d_z_N, _ = cotangents  # `correct` is piecewise constant: no gradient
    d_logits_NV = jax.ffi.ffi_call(
        "mtjax_cross_entropy_cpu_backward", _f32(*exps_NV.shape), input_output_aliases={0: 0},
    )(exps_NV, targets_N, stats_N2, d_loss_N.astype(jnp.float32), d_z_N.astype(jnp.float32),
      z_loss=np.float32(z_loss))
    return d_logits_NV, np.zeros(targets_N.shape, jax.dtypes.float0)


_cross_entropy.defvjp(_forward, _backward)


def cross_entropy_with_z_loss(logits_BLV: jax.Array, targets_BL: jax.Array,
                              z_loss: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (loss with z-loss [B, L], its z-loss part [B, L], 1.0 where the first argmax is
    the target [B, L]), all float32.

    Raises:
        KernelUnavailable: the CPU kernels cannot run here (the message says why).
    """
    kernels.require()
    b, length, v = logits_BLV.shape
    outputs = _cross_entropy(logits_BLV.astype(jnp.float32).reshape(b * length, v),
                             targets_BL.astype(jnp.int32).reshape(b * length), float(z_loss))
    return tuple(x.reshape(b, length) for x in outputs)
