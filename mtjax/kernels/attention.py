"""T5 attention through the fused CPU kernel (``attention_cpu.cc``), differentiable.

``cpu_attention(q, k, v, diagonals, mask)`` computes what ``layers.softmax_attention`` does with
``bias = toeplitz_bias(diagonals) + where(mask, 0, MASK_BIAS)``, without writing any
[B, H, Q, S] array: the forward pass saves the output and, per query row, the score maximum and
1 / sum of the exponentials, and the backward pass recomputes the probabilities from them.
float32 only; ``mtjax.kernels.cpu_kernel_status()`` says whether the kernel can run here
(``layers.resolve_attention`` asks it before the model uses the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import kernels
from mtjax.model import layers


def _operands(q_BQHK, k_BSHK, diagonals, mask):
    """The kernel's bias operands: position diagonals [H, Q + S - 1] float32 and mask
    [1 or B, Q, S] bool, each empty ([0, ...]) when absent."""
    b, q_len, h, _ = q_BQHK.shape
    s_len = k_BSHK.shape[1]
    if diagonals is None:
        diagonals_HR = jnp.zeros((0, q_len + s_len - 1), jnp.float32)
    else:
        diagonals_HR = jnp.broadcast_to(diagonals, (h, q_len + s_len - 1)).astype(jnp.float32)
    if mask is None:
        mask_BQS = jnp.zeros((0, q_len, s_len), jnp.bool_)
    else:
        if mask.shape[0] not in (1, b):
            raise ValueError(f"mask batch {mask.shape[0]} is neither 1 nor the batch {b}")
        mask_BQS = jnp.broadcast_to(mask.astype(jnp.bool_), (mask.shape[0], q_len, s_len))
    return diagonals_HR, mask_BQS


def _mask_bias() -> np.float32:
    """What a masked-out score gets added: the XLA path's ``layers.MASK_BIAS``, so both agree
    (read when traced)."""
    return np.float32(layers.MASK_BIAS)


@jax.custom_vjp
def _attention(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS):
    return _forward(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS)[0]


def _forward(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS):
    b, q_len, h, _ = q_BQHK.shape
    y_BQHK, stats_BHQ2 = jax.ffi.ffi_call(
        "mtjax_attention_cpu_forward",
        (jax.ShapeDtypeStruct(q_BQHK.shape, jnp.float32),
         jax.ShapeDtypeStruct((b, h, q_len, 2), jnp.float32)),
    )(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, mask_bias=_mask_bias())
    return y_BQHK, (q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, stats_BHQ2)


def _backward(residuals, dy_BQHK):
    q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, stats_BHQ2 = residuals
    dq, dk, dv, dposition = jax.ffi.ffi_call(
        "mtjax_attention_cpu_backward",
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
              for x in (q_BQHK, k_BSHK, v_BSHK, diagonals_HR)),
    )(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, stats_BHQ2,
      dy_BQHK.astype(jnp.float32), mask_bias=_mask_bias())
    # A boolean input's cotangent is float0 (the mask is not differentiable).
    return dq, dk, dv, dposition, np.zeros(mask_BQS.shape, jax.dtypes.float0)


_attention.defvjp(_forward, _backward)


def cpu_attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                  diagonals: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    """``softmax(q k^T + position + where(mask, 0, MASK_BIAS)) v`` per head, fused, float32,
    where ``position[h, q, s] = diagonals[h, s - q + Q - 1]`` (``layers.toeplitz_bias``).

    Args:
        q_BQHK, k_BSHK, v_BSHK: float32 queries [B, Q, H, K], keys and values [B, S, H, K].
        diagonals: float32 relative position bias per key - query difference, broadcastable to
            [H, Q + S - 1], or None.
        mask: bool [B or 1, Q, S] (or [B or 1, 1, Q, S]), True where a query may attend to a
            key, or None.

    Returns:
        float32 [B, Q, H, K].
    """
    kernels.require()
    for name, x in (("q", q_BQHK), ("k", k_BSHK), ("v", v_BSHK)):
        if x.dtype != jnp.float32:
            raise ValueError(f"cpu_attention takes float32; {name} is {x.dtype}")
    if mask is not None and mask.ndim == 4:
        mask = mask[:, 0]
    diagonals_HR, mask_BQS = _operands(q_BQHK, k_BSHK, diagonals, mask)
    return _attention(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS)
