"""Token cross-entropy with z-loss through the fused CPU kernel (``cross_entropy_cpu.cc``).

``cross_entropy_with_z_loss(logits, targets, z_loss)`` returns what
``mtjax.train.step.cross_entropy_with_z_loss`` and ``mtjax.model.softmax.first_argmax(logits) ==
targets`` give, differentiable in the logits. The forward pass overwrites the logits' buffer with
``exp(logits - max)`` and the backward pass overwrites that with the gradient (XLA aliases the
buffers; it copies first only where the logits are still needed elsewhere), so the step holds one
[tokens, V] float32 buffer for the loss instead of several. float32, CPU.

On a mesh of several devices each device runs the kernel on its own batch rows and positions
(``jax.shard_map``; XLA cannot split a custom call itself), which needs whole rows of logits:
:func:`mesh_problem` says when the logical rules split the vocabulary instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mtjax import kernels
from mtjax.model import layers


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward_call(logits_BLV, targets_BL, z_loss):
    b, length, v = logits_BLV.shape
    n = b * length  # a row per token: the reshapes are free (row-major)
    exps_NV, loss_N, z_N, correct_N, stats_N2 = jax.ffi.ffi_call(
        "mtjax_cross_entropy_cpu_forward",
        (_f32(n, v), _f32(n), _f32(n), _f32(n), _f32(n, 2)),
        input_output_aliases={0: 0},
    )(logits_BLV.reshape(n, v), targets_BL.reshape(n), z_loss=np.float32(z_loss))
    return (tuple(x.reshape(b, length) for x in (loss_N, z_N, correct_N)),
            exps_NV.reshape(b, length, v), stats_N2.reshape(b, length, 2))


def _backward_call(exps_BLV, targets_BL, stats_BL2, d_loss_BL, d_z_BL, z_loss):
    b, length, v = exps_BLV.shape
    n = b * length
    d_logits_NV = jax.ffi.ffi_call(
        "mtjax_cross_entropy_cpu_backward", _f32(n, v), input_output_aliases={0: 0},
    )(exps_BLV.reshape(n, v), targets_BL.reshape(n), stats_BL2.reshape(n, 2),
      d_loss_BL.reshape(n), d_z_BL.reshape(n), z_loss=np.float32(z_loss))
    return d_logits_NV.reshape(b, length, v)


def _token_spec() -> PartitionSpec | None:
    """How the mesh and logical rules in force split [batch, length] (``layers.logical_spec``),
    or None where there is no mesh of several devices."""
    if layers.multi_device_mesh() is None:
        return None
    return layers.logical_spec(("batch", "length"))


def mesh_problem() -> str:
    """Why the kernel cannot take the logits on the mesh in force ('' when it can): it needs
    each token's whole row of logits, so the vocabulary must not be split over devices."""
    mesh = layers.multi_device_mesh()
    if mesh is None:
        return ""
    axes = layers.mesh_axes(layers.logical_spec(("vocab",))[0])
    devices = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if devices == 1:
        return ""
    return (f"it needs whole rows of logits, and the mesh rules split the vocabulary over "
            f"{'×'.join(axes)} ({devices} devices)")


def devices_share_a_process() -> bool:
    """Whether the mesh in force puts several devices in this process (fake CPU devices, as
    tests make them), where ``train.cross_entropy=auto`` does not pick the kernel."""
    return layers.multi_device_mesh() is not None and jax.local_device_count() > 1


def _under_mesh(function, token_spec, in_extra, out_extra):
    """``function`` run per device on its own tokens: [B, L, ...] operands split by
    ``token_spec`` (None: as it is). ``in_extra``/``out_extra``: each operand's and result's
    trailing unsplit dimensions."""
    if token_spec is None:
        return function

    def spec(extra):
        return PartitionSpec(*token_spec, *(None,) * extra)

    # check_vma off: the custom calls carry no replication types
    return jax.shard_map(function, in_specs=tuple(map(spec, in_extra)),
                         out_specs=jax.tree.map(spec, out_extra), check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits_BLV, targets_BL, z_loss, token_spec):
    return _forward(logits_BLV, targets_BL, z_loss, token_spec)[0]


def _forward(logits_BLV, targets_BL, z_loss, token_spec):
    outputs, exps_BLV, stats_BL2 = _under_mesh(
        functools.partial(_forward_call, z_loss=z_loss), token_spec, in_extra=(1, 0),
        out_extra=((0, 0, 0), 1, 1))(logits_BLV, targets_BL)
    return outputs, (exps_BLV, targets_BL, stats_BL2)


def _backward(z_loss, token_spec, residuals, cotangents):
    exps_BLV, targets_BL, stats_BL2 = residuals
    d_loss_BL, d_z_BL, _ = cotangents  # `correct` is piecewise constant: no gradient
    d_logits_BLV = _under_mesh(
        functools.partial(_backward_call, z_loss=z_loss), token_spec,
        in_extra=(1, 0, 1, 0, 0), out_extra=1,
    )(exps_BLV, targets_BL, stats_BL2, d_loss_BL.astype(jnp.float32),
      d_z_BL.astype(jnp.float32))
    return d_logits_BLV, np.zeros(targets_BL.shape, jax.dtypes.float0)


_cross_entropy.defvjp(_forward, _backward)


def cross_entropy_with_z_loss(logits_BLV: jax.Array, targets_BL: jax.Array,
                              z_loss: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (loss with z-loss [B, L], its z-loss part [B, L], 1.0 where the first argmax is
    the target [B, L]), all float32.

    Raises:
        KernelUnavailable: the CPU kernels cannot run here, or not on this mesh (the message
            says why).
    """
    kernels.require()
    if problem := mesh_problem():
        raise kernels.KernelUnavailable(f"the cross-entropy kernel cannot run here: {problem}")
    return _cross_entropy(logits_BLV.astype(jnp.float32), targets_BL.astype(jnp.int32),
                          float(z_loss), _token_spec())
