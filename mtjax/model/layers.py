"""T5 building blocks in Flax NNX: dense, embedding, RMS norm, MLP, and the sharding helpers the
model's modules share (relative position bias: ``position_bias``; attention: ``attention``).

Numerically follows the reference T5 (Mesh TensorFlow, Hugging Face ``T5Attention`` et al.): no
biases, no 1/sqrt(d) scaling of attention scores (folded into the query initialiser), RMS norm
without mean subtraction, tanh-approximated GELU. Initialisers follow T5X.

Every parameter carries logical axis names (``out_sharding`` metadata), and key activations are
constrained by logical name with ``constrain``; the mapping to mesh axes lives in
``mtjax.parallel.mesh`` and reaches this module only through ``nnx.logical_axis_rules``.

Letter legend: B batch, L length (Q query, S key/source length), D embed, H heads, K head dim,
F mlp, V vocab, N relative position buckets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

Initializer = jax.nn.initializers.Initializer


def constrain(x: jax.Array, names: Sequence[str | None], *,
              first: Sequence[str] = ()) -> jax.Array:
    """Constrain the sharding of activation ``x`` by logical axis names (``logical_spec``); a
    no-op when no mesh is active, so the model also runs outside any mesh."""
    spec = logical_spec(names, first=first)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def mesh_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes a rules target or a PartitionSpec entry names (none, one or several)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def multi_device_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh in force when it has several devices (work to split over them), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def logical_spec(names: Sequence[str | None], *,
                 first: Sequence[str] = ()) -> PartitionSpec | None:
    """The PartitionSpec of logical axis ``names`` on the active mesh, or None without one.

    Names map to mesh axes with the current ``nnx.logical_axis_rules``. A mesh axis already used
    by an earlier dimension is dropped (e.g. ``embed`` -> ``fsdp`` when ``batch`` already uses
    ``fsdp``), as Flax's own rule resolution does; the names in ``first`` claim their axes
    before the others (``first=("embed",)``: ``embed`` keeps ``fsdp`` and ``batch`` gets what
    is left).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = dict(flax_spmd.get_logical_axis_rules())
    used: set[str] = set()
    spec: list[Any] = [None] * len(names)
    order = sorted(range(len(names)), key=lambda i: names[i] not in first)  # stable
    for i in order:
        name = names[i]
        axes = mesh_axes(rules.get(name) if name is not None else None)
        axes = tuple(a for a in axes if a in mesh.axis_names and a not in used)
        used.update(axes)
        spec[i] = None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*spec)


def logical_param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype,
           names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def fan_in_init(scale: float = 1.0) -> Initializer:
    """T5X's dense initialiser: truncated normal with variance ``scale / fan_in``."""
    return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def resolve_weight_grad(kind: str) -> str:
    """The weight-gradient layout ``kind`` stands for here: ``"auto"`` is ``"transposed"`` on
    CPU, where it is the fast one (peer train step 1.20x at 1 microbatch, 1.035x at 2; README
    "Performance"), and ``"xla"`` elsewhere (GPU/TPU matmul libraries read transposed operands
    for free)."""
    if kind == "auto":
        return "transposed" if jax.default_backend() == "cpu" else "xla"
    return kind


def matmul(x_NI: jax.Array, kernel_IO: jax.Array, *, out_dtype=None,
           weight_grad: str = "xla") -> jax.Array:
    """``x @ kernel`` over x's last axis (leading axes any), with a choice of how the backward
    pass computes the kernel's gradient ``x^T @ dy``.

    Args:
        x_NI: activations ``[..., I]``.
        kernel_IO: weights ``[I, O]``, same dtype as ``x``.
        out_dtype: ``preferred_element_type`` of the product (None: the inputs' dtype).
        weight_grad: ``"xla"`` (plain autodiff), ``"transposed"`` (x^T materialised first, see
            :func:`_matmul_transposed_weight_grad`) or ``"auto"`` (:func:`resolve_weight_grad`).
            The values are the same either way (tested).
    """
    if resolve_weight_grad(weight_grad) == "transposed":
        return _matmul_transposed_weight_grad(x_NI, kernel_IO, out_dtype)
    return jnp.dot(x_NI, kernel_IO, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_transposed_weight_grad(x_NI, kernel_IO, out_dtype):
    """``x @ kernel`` whose kernel gradient is a plain ``[I, N] @ [N, O]`` matmul.

    Autodiff gives ``dot(x, dy)`` contracting x's leading axes, and XLA folds that transpose
    into the dot. XLA:CPU (jaxlib 0.10) hands only row-major ``[M, K] @ [K, N]`` dots to its
    YNNPACK matmuls; the folded ones go to Eigen, which runs them asynchronously next to the
    library matmuls on the same cores. Copying ``x^T`` out first (the optimisation barrier
    keeps XLA from folding it back) costs one pass over x and made the peer-shape train step
    1.20x faster on a 2-core CPU (1.035x with 2 microbatches).
    """
    return jnp.dot(x_NI, kernel_IO, preferred_element_type=out_dtype)


def _matmul_twg_fwd(x_NI, kernel_IO, out_dtype):
    return jnp.dot(x_NI, kernel_IO, preferred_element_type=out_dtype), (x_NI, kernel_IO)


def _matmul_twg_bwd(out_dtype, residuals, dy_NO):
    x_NI, kernel_IO = residuals
    # The input gradient exactly as autodiff writes it.
    _, x_vjp = jax.vjp(lambda x: jnp.dot(x, kernel_IO, preferred_element_type=out_dtype), x_NI)
    (dx_NI,) = x_vjp(dy_NO)
    xt_IM = jax.lax.optimization_barrier(transpose_2d(x_NI.reshape(-1, x_NI.shape[-1])))
    dkernel_IO = jax.lax.dot_general(xt_IM, dy_NO.reshape(-1, dy_NO.shape[-1]),
                                     (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return dx_NI, dkernel_IO.astype(kernel_IO.dtype)


_matmul_transposed_weight_grad.defvjp(_matmul_twg_fwd, _matmul_twg_bwd)

# Rows per tile of ``transpose_2d``'s identity products.
_TRANSPOSE_TILE = 16


def transpose_2d(x_MN: jax.Array) -> jax.Array:
    """``x.T``, computed in float32 as tiny identity matmuls plus a copy of 64-byte rows.

    XLA:CPU emits a transpose as a strided element-by-element copy: 3.35 ms for a [4096, 512]
    float32 array on the Zen 5 machine, against 0.17 ms for a plain copy. Transposing each
    16-row tile with a [16, 16] identity matmul (one product by 1, the rest by 0) leaves a copy
    whose contiguous runs are 16 floats long: 1.32 ms. Exact for normal numbers; the matmul
    flushes denormals to zero and turns -0 into +0 (as the weight-gradient matmul that reads
    the result does anyway), and a non-finite entry turns the other 15 entries of its tile
    column into NaN, where a plain transpose would keep them.
    """
    m, n = x_MN.shape
    b = _TRANSPOSE_TILE
    if x_MN.dtype != jnp.float32 or m % b or jax.default_backend() != "cpu":
        return x_MN.T
    tiles_TKN = x_MN.reshape(m // b, b, n)
    eye_KB = jnp.eye(b, dtype=x_MN.dtype)
    tiles_TNB = jnp.einsum("TKN,KB->TNB", tiles_TKN, eye_KB,
                           precision=jax.lax.Precision.HIGHEST)
    return jnp.transpose(tiles_TNB, (1, 0, 2)).reshape(n, m)


class Dense(nnx.Module):
    """``y = x @ kernel`` without bias; matmul in ``dtype``, optional wider output."""

    def __init__(self, in_features: int, out_features: int, *, names: tuple[str, str],
                 init: Initializer, dtype, param_dtype, rngs: nnx.Rngs,
                 weight_grad: str = "xla"):
        self.kernel = logical_param(init, rngs, (in_features, out_features), param_dtype, names)
        self.dtype = dtype
        self.weight_grad = weight_grad  # see matmul

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = matmul(x.astype(self.dtype), kernel, out_dtype=out_dtype,
                   weight_grad=self.weight_grad)
        return y if out_dtype is None else y.astype(out_dtype)


class Embed(nnx.Module):
    """Token embedding [V, D]: lookup by gather, and ``attend`` for a tied output layer."""

    def __init__(self, vocab_size: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 weight_grad: str = "xla"):
        self.embedding = logical_param(jax.nn.initializers.normal(stddev=1.0), rngs,
                                (vocab_size, features), param_dtype, ("vocab", "embed"))
        self.dtype = dtype
        self.weight_grad = weight_grad  # of ``attend``; see matmul

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        # A gather, not a one-hot matmul: 0 FLOPs instead of 2*V*D per token.
        x_BLD = jnp.take(self.embedding[...], tokens_BL, axis=0)
        # Gathered where the table lives: ``embed`` keeps its axis (``fsdp``) and the batch
        # takes the rest, so the lookup is local and the caller's residual constraint is an
        # all-to-all. In the backward pass that all-to-all brings the [B, L, D] cotangent to
        # the table's layout for a local scatter-add. Without it XLA's partitioner had to move
        # the cotangent from the batch axes (data+fsdp) to ``embed`` on its own, and could only
        # do that by replicating it whole on every device ("Involuntary full
        # rematerialization"), once per stack: traffic that grew with the global batch.
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"), first=("embed",))
        return x_BLD.astype(self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Logits [B, L, V] in float32 with the embedding as output layer."""
        embedding_VD = self.embedding[...].astype(self.dtype)
        return matmul(x_BLD.astype(self.dtype), embedding_VD.T, out_dtype=jnp.float32,
                      weight_grad=self.weight_grad)


class RMSNorm(nnx.Module):
    """T5LayerNorm: scale * x / sqrt(mean(x^2) + eps), no mean subtraction, no bias."""

    def __init__(self, features: int, *, epsilon: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("embed",))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Variance in float32 even for bfloat16 activations, as the reference does.
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return scale_features(y.astype(self.dtype), self.scale[...].astype(self.dtype))


def column_sum(x_ND: jax.Array) -> jax.Array:
    """``x.sum(axis=0)`` of a 2-D array, accumulated in float32 (result in ``x``'s dtype).

    On CPU as a product with a vector of ones: XLA:CPU reduces over the leading axis with a
    tree of strided reduce-windows, 2.65 ms for a [4096, 512] float32 array on the Zen 5
    machine, where the matrix-vector product takes 0.43 ms. Elsewhere a plain sum.
    """
    if jax.default_backend() != "cpu":
        return jnp.sum(x_ND, axis=0, dtype=jnp.float32).astype(x_ND.dtype)
    ones_N = jnp.ones((x_ND.shape[0],), x_ND.dtype)
    return jnp.dot(ones_N, x_ND, preferred_element_type=jnp.float32).astype(x_ND.dtype)


@jax.custom_vjp
def scale_features(x: jax.Array, scale_D: jax.Array) -> jax.Array:
    """``x * scale`` along the last axis; the gradient of ``scale`` sums over every other axis
    by :func:`column_sum` (autodiff's reduce is the slow kind on CPU: each layer norm's scale
    gradient took 2.7 ms at the peer shape)."""
    return x * _along_last_axis(scale_D, x.ndim)


def _along_last_axis(scale_D: jax.Array, ndim: int) -> jax.Array:
    return scale_D.reshape((1,) * (ndim - 1) + (-1,))


def _scale_features_fwd(x, scale_D):
    return scale_features(x, scale_D), (x, scale_D)


def _scale_features_bwd(residuals, dy):
    x, scale_D = residuals
    rows = math.prod(x.shape[:-1])
    dscale_D = column_sum((dy * x).reshape(rows, x.shape[-1]))
    return dy * _along_last_axis(scale_D, x.ndim), dscale_D.astype(scale_D.dtype)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


_ACTIVATIONS = {
    # HF `gelu_new` is the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Feed-forward block: ``wo(act(wi_0 x) * wi_1 x)`` when gated, ``wo(act(wi x))`` otherwise."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, dropout_rate: float,
                 dtype, param_dtype, rngs: nnx.Rngs, weight_grad: str = "xla"):
        self.gated = activation.startswith("gated-")
        self.activation = activation.removeprefix("gated-")
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, weight_grad=weight_grad)
        if self.gated:
            self.wi_0 = Dense(d_model, d_ff, names=("embed", "mlp"), init=fan_in_init(), **dense)
            self.wi_1 = Dense(d_model, d_ff, names=("embed", "mlp"), init=fan_in_init(), **dense)
        else:
            self.wi = Dense(d_model, d_ff, names=("embed", "mlp"), init=fan_in_init(), **dense)
        self.wo = Dense(d_ff, d_model, names=("mlp", "embed"), init=fan_in_init(), **dense)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x_BLD: jax.Array, *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        if self.gated:
            h_BLF = act(self.wi_0(x_BLD)) * self.wi_1(x_BLD)
        else:
            h_BLF = act(self.wi(x_BLD))
        h_BLF = constrain(h_BLF, ("batch", "length", "mlp"))
        h_BLF = self.dropout(h_BLF, deterministic=deterministic, rngs=rngs)
        return self.wo(h_BLF)
