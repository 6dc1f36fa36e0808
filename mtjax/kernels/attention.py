"""T5 attention through the fused CPU kernel (``attention_cpu.cc``), differentiable.

``cpu_attention(q, k, v, diagonals, mask)`` computes what
``mtjax.model.attention.softmax_attention`` does with ``bias = toeplitz_bias(diagonals) +
where(mask, 0, MASK_BIAS)``, without writing any [B, H, Q, S] array: the forward pass saves the
output and, per query row, the score maximum and 1 / sum of the exponentials, and the backward
pass recomputes the probabilities from them.
float32 only; ``mtjax.kernels.cpu_kernel_status()`` says whether the kernel can run here
(``mtjax.model.attention.resolve_attention`` asks it before the model uses the kernel).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mtjax import kernels
from mtjax.model import attention as attention_lib
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
    """What a masked-out score gets added: the XLA path's ``mtjax.model.attention.MASK_BIAS``,
    so both agree (read when traced)."""
    return np.float32(attention_lib.MASK_BIAS)


def _forward_call(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS):
    b, q_len, h, _ = q_BQHK.shape
    return jax.ffi.ffi_call(
        "mtjax_attention_cpu_forward",
        (jax.ShapeDtypeStruct(q_BQHK.shape, jnp.float32),
         jax.ShapeDtypeStruct((b, h, q_len, 2), jnp.float32)),
    )(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, mask_bias=_mask_bias())


def _backward_call(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, stats_BHQ2, dy_BQHK):
    return jax.ffi.ffi_call(
        "mtjax_attention_cpu_backward",
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
              for x in (q_BQHK, k_BSHK, v_BSHK, diagonals_HR)),
    )(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, stats_BHQ2, dy_BQHK,
      mask_bias=_mask_bias())


class _Split(NamedTuple):
    """How the kernel's operands are split over the current mesh. Attention is independent
    across batch rows and heads, so each device runs the kernel on its own; XLA itself cannot
    split a custom call."""

    qkv: PartitionSpec        # q, k, v, out [B, L, H, K]
    stats: PartitionSpec      # [B, H, Q, 2]
    diagonals: PartitionSpec  # [H or 0, Q + S - 1]
    mask: PartitionSpec       # [B, 1 or 0, Q, S]
    batch_axes: tuple[str, ...]  # the position-bias gradient is summed over these


def _split(q_BQHK, diagonals_HR, mask_BQS) -> _Split | None:
    """The split the mesh and logical rules in force give (``layers.logical_spec``), or None
    where there is no mesh of several devices."""
    if layers.multi_device_mesh() is None:
        return None
    # Whole rows of queries and keys per device: the kernel needs every key of a row.
    batch, _, heads, _ = layers.logical_spec(("batch", None, "heads", None))
    batch_axes = layers.mesh_axes(batch)
    mask_batch = batch if mask_BQS.shape[0] == q_BQHK.shape[0] > 1 else None
    return _Split(qkv=PartitionSpec(batch, None, heads, None),
                  stats=PartitionSpec(batch, heads, None, None),
                  diagonals=PartitionSpec(heads if diagonals_HR.shape[0] else None, None),
                  mask=PartitionSpec(mask_batch, None, None), batch_axes=batch_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, split):
    return _forward(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, split)[0]


def _forward(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS, split):
    args = (q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS)
    if split is None:
        y_BQHK, stats_BHQ2 = _forward_call(*args)
    else:  # check_vma off: the custom calls carry no replication types
        y_BQHK, stats_BHQ2 = jax.shard_map(
            _forward_call, in_specs=(split.qkv,) * 3 + (split.diagonals, split.mask),
            out_specs=(split.qkv, split.stats), check_vma=False)(*args)
    return y_BQHK, (*args, stats_BHQ2)


def _backward(split, residuals, dy_BQHK):
    args = (*residuals, dy_BQHK.astype(jnp.float32))
    if split is None:
        dq, dk, dv, dposition = _backward_call(*args)
    else:
        def local(*args):
            dq, dk, dv, dposition = _backward_call(*args)
            if split.batch_axes:  # each device summed over its own batch rows only
                dposition = jax.lax.psum(dposition, split.batch_axes)
            return dq, dk, dv, dposition

        dq, dk, dv, dposition = jax.shard_map(
            local, in_specs=(split.qkv,) * 3 + (split.diagonals, split.mask, split.stats,
                                                split.qkv),
            out_specs=(split.qkv,) * 3 + (split.diagonals,), check_vma=False)(*args)
    # A boolean input's cotangent is float0 (the mask is not differentiable).
    return dq, dk, dv, dposition, np.zeros(residuals[4].shape, jax.dtypes.float0)


_attention.defvjp(_forward, _backward)


def cpu_attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                  diagonals: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    """``softmax(q k^T + position + where(mask, 0, MASK_BIAS)) v`` per head, fused, float32,
    where ``position[h, q, s] = diagonals[h, s - q + Q - 1]``
    (``mtjax.model.position_bias.toeplitz_bias``).

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
    return _attention(q_BQHK, k_BSHK, v_BSHK, diagonals_HR, mask_BQS,
                      _split(q_BQHK, diagonals_HR, mask_BQS))
