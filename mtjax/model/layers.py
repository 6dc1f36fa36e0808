"""T5 building blocks in Flax NNX: dense, embedding, RMS norm, relative position bias, attention,
MLP.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

from mtjax.model import softmax as softmax_lib

# Attention bias of masked pairs, as in T5X; finite so that fully masked rows stay finite.
MASK_BIAS = -1e10

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


def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype,
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
        self.kernel = _param(init, rngs, (in_features, out_features), param_dtype, names)
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
        self.embedding = _param(jax.nn.initializers.normal(stddev=1.0), rngs,
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


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """Bucket of each relative position ``key - query``, as HF ``T5Attention`` computes it.

    Half the buckets hold exact small distances, the rest grow logarithmically up to
    ``max_distance``; bidirectional splits the buckets between keys before and after the query,
    causal maps every key after the query to bucket 0.

    Args:
        relative_position: int array of ``key_position - query_position``.
        bidirectional: True for the encoder, False for the decoder.
        num_buckets: number of buckets.
        max_distance: distances at or beyond this share the last bucket.

    Returns:
        int32 array of the same shape, values in ``[0, num_buckets)``.
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(distance, 1) keeps log finite where the small branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    if_large = max_exact + (
        log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)  # truncation toward zero, like torch .to(long); values are >= 0 here
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, if_large)


class RelativePositionBias(nnx.Module):
    """Learned bias per (head, relative position bucket), added to the attention scores."""

    def __init__(self, num_heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        # T5X: fan_avg uniform initialiser, table stored [H, N].
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.rel_embedding = _param(init, rngs, (num_heads, num_buckets), param_dtype,
                                    ("heads", "relpos_buckets"))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    # How the [H, Q, S] bias is formed (class-level, for A/B benchmarks): "toeplitz"
    # (``toeplitz_bias``) or a per-(query, key) lookup, "gather" or "onehot"
    # (``lookup_relative_bias``); "auto" is "gather" on CPU (fastest there: on the 2-core
    # peer-shape step toeplitz measured 0.97x, within noise) and "toeplitz" elsewhere. All give
    # the same values.
    method = "auto"

    def diagonals(self, query_length: int, key_length: int,
                  query_offset: jax.Array | int = 0) -> jax.Array:
        """Bias [H, Q + S - 1] per key - query difference, from -(Q - 1) - offset up to
        S - 1 - offset: what ``__call__`` spreads over the (query, key) grid
        (``toeplitz_bias``), and what the fused CPU attention reads as it is."""
        table_HN = self.rel_embedding[...].astype(jnp.float32)
        relative_R = (jnp.arange(query_length + key_length - 1) - (query_length - 1)
                      - query_offset)
        buckets_R = relative_position_bucket(
            relative_R, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance)
        return jnp.take(table_HN, buckets_R, axis=1)

    def __call__(self, query_length: int, key_length: int,
                 query_offset: jax.Array | int = 0) -> jax.Array:
        """Bias [1, H, Q, S] in float32 for positions ``query_offset + arange(Q)`` against
        ``arange(S)``; a decoding step passes its position as ``query_offset`` (may be traced)."""
        # Differences of aranges are invariant within a contiguous packed segment, so a packed
        # example gets the same bias as alone; cross-segment pairs are masked anyway.
        table_HN = self.rel_embedding[...].astype(jnp.float32)
        bucket = functools.partial(relative_position_bucket, bidirectional=self.bidirectional,
                                   num_buckets=self.num_buckets, max_distance=self.max_distance)
        method = self.method
        if method == "auto":
            method = "gather" if jax.default_backend() == "cpu" else "toeplitz"
        if method == "toeplitz":
            bias_HR = self.diagonals(query_length, key_length, query_offset)
            return toeplitz_bias(bias_HR, query_length, key_length)[None]
        query_positions_Q = jnp.arange(query_length) + query_offset
        relative_QS = jnp.arange(key_length)[None, :] - query_positions_Q[:, None]
        return lookup_relative_bias(table_HN, bucket(relative_QS), method)[None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def toeplitz_bias(bias_HR: jax.Array, query_length: int, key_length: int) -> jax.Array:
    """[H, Q, S] with ``out[h, q, s] = bias[h, s - q + Q - 1]``: one value per key - query
    difference, spread over the (query, key) grid.

    The relative-position bias depends on the difference alone, so its gradient is the sum of
    the scores' gradient along each diagonal: a pad, two reshapes and a sum (``diagonal_sums``),
    which every backend streams through memory. The gather's own gradient would scatter-add
    H * Q * S values into H * N table slots, which accelerators serialise (atomics on GPU; a
    one-hot matmul instead ran as 2.3 ms of split-K float32 GEMMs per t5_1_1_base step on an
    H200) and XLA:CPU ran in a transposed, strided layout.
    """
    index_QS = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    index_QS = index_QS + (query_length - 1)
    num_heads, num_relative = bias_HR.shape
    heads_H = jnp.arange(num_heads, dtype=index_QS.dtype)
    # Flat indices gather in the output's own [H, Q, S] layout (no transposed [Q, S, H] gather).
    flat_HQS = heads_H[:, None, None] * num_relative + index_QS[None]
    return jnp.take(bias_HR.reshape(-1), flat_HQS, axis=0)


def _toeplitz_fwd(bias_HR, query_length, key_length):
    return toeplitz_bias(bias_HR, query_length, key_length), None


def _toeplitz_bwd(query_length, key_length, _, grad_HQS):
    return (diagonal_sums(grad_HQS),)


toeplitz_bias.defvjp(_toeplitz_fwd, _toeplitz_bwd)


def diagonal_sums(x_HQS: jax.Array) -> jax.Array:
    """[H, Q + S - 1]: ``out[h, s - q + Q - 1] = sum of x[h, q, s]`` over each diagonal.

    Rows are flipped so that row ``r`` holds query ``Q - 1 - r``; padding each row with Q zeros
    and re-reading the flat buffer with rows one element shorter shifts row ``r`` right by
    ``r``, which puts element ``s`` of query ``q`` in column ``s - q + Q - 1``; a sum over rows
    then adds up each diagonal.
    """
    heads, q, s = x_HQS.shape
    flipped = x_HQS[:, ::-1, :]
    padded = jnp.pad(flipped, ((0, 0), (0, 0), (0, q)))
    flat = padded.reshape(heads, q * (s + q))[:, : q * (s + q - 1)]
    return flat.reshape(heads, q, s + q - 1).sum(axis=1)


def lookup_relative_bias(table_HN: jax.Array, bucket_QS: jax.Array,
                         method: str = "gather") -> jax.Array:
    """``table[:, bucket]`` as [H, Q, S], looked up for every (query, key) pair.

    - ``"gather"``: one scalar at a time from the flat table, ``h * N + bucket``.
      ``jnp.take(table, bucket, axis=1)`` gathers H-wide columns: its output is [Q, S, H]
      transposed, so the gradient (a scatter-add) wants the summed score gradients in [Q*S, H]
      layout, and XLA fuses that transpose into the sum over batch and layers, a strided loop
      9x slower than this form (0.4 s of a 13 s peer-shape step on 2 CPU cores). A one-hot
      matmul is slower still on CPU (the library dot runs [H, Q*S] x [Q*S, N] at 0.1 GFLOP/s).
    - ``"onehot"``: ``einsum(table, one_hot(bucket))``, as T5X does on TPU: the gradient is a
      matmul instead of a scatter-add. Full float32 precision, so the values equal the
      gather's. On an H200 its two split-K float32 GEMMs took 2.3 ms of a 97 ms t5_1_1_base
      step, hence ``toeplitz_bias`` off the CPU.
    """
    num_heads, num_buckets = table_HN.shape
    if method == "onehot":
        onehot_QSN = jax.nn.one_hot(bucket_QS, num_buckets, dtype=table_HN.dtype)
        return jnp.einsum("HN,QSN->HQS", table_HN, onehot_QSN,
                          precision=jax.lax.Precision.HIGHEST)
    if method != "gather":
        raise ValueError(f"method: {method!r} is not one of ('gather', 'onehot')")
    heads_H = jnp.arange(num_heads, dtype=bucket_QS.dtype)
    index_HQS = heads_H[:, None, None] * num_buckets + bucket_QS[None]
    return jnp.take(table_HN.reshape(-1), index_HQS, axis=0)


class AttentionBias(NamedTuple):
    """An attention bias kept in its parts: the fused CPU kernel reads them as they are, where
    the XLA paths add them into one float32 [B, H, Q, S] array (``dense``).

    position: float32 relative position bias broadcastable to [1, H, Q, S], or None.
    mask: bool [B, Q, S], True where a query may attend to a key, or None.
    position_diagonals: instead of ``position``, its diagonals [H, Q + S - 1] (a relative
        position bias depends on key - query only; ``toeplitz_bias`` spreads them out).
    """

    position: jax.Array | None
    mask: jax.Array | None
    position_diagonals: jax.Array | None = None

    def dense(self, query_length: int, key_length: int) -> jax.Array:
        """``position + where(mask, 0, MASK_BIAS)``, broadcastable to [B, H, Q, S]."""
        position = self.position
        if self.position_diagonals is not None:
            position = toeplitz_bias(self.position_diagonals, query_length, key_length)[None]
        if self.mask is None:
            return position
        mask_bias = mask_to_bias(self.mask)
        return mask_bias if position is None else position + mask_bias


def mask_to_bias(mask_BQS: jax.Array) -> jax.Array:
    """[B, Q, S] bool -> [B, 1, Q, S] float32 additive bias (0 or MASK_BIAS)."""
    return jnp.where(mask_BQS, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]


class Attention(nnx.Module):
    """Multi-head attention, T5 style: no biases, no score scaling, float32 softmax."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, dropout_rate: float,
                 dtype, param_dtype, rngs: nnx.Rngs, kind: str = "xla",
                 weight_grad: str = "xla"):
        inner = num_heads * d_kv
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, weight_grad=weight_grad)
        # The 1/sqrt(d_kv) of scaled dot-product attention lives in the query initialiser.
        self.query = Dense(d_model, inner, names=("embed", "joined_kv"),
                           init=fan_in_init(1.0 / d_kv), **dense)
        self.key = Dense(d_model, inner, names=("embed", "joined_kv"), init=fan_in_init(), **dense)
        self.value = Dense(d_model, inner, names=("embed", "joined_kv"), init=fan_in_init(),
                           **dense)
        self.out = Dense(inner, d_model, names=("joined_kv", "embed"), init=fan_in_init(),
                         **dense)
        self.dropout = nnx.Dropout(dropout_rate)
        self.num_heads = num_heads
        self.d_kv = d_kv
        self.dtype = dtype
        self.kind = kind  # "auto", "xla", "dot_product" or "cpu_fused" (see T5Config.attention)

    def _heads(self, x_BLF: jax.Array) -> jax.Array:
        b, length, _ = x_BLF.shape
        x_BLHK = x_BLF.reshape(b, length, self.num_heads, self.d_kv)
        return constrain(x_BLHK, ("batch", "length", "heads", "kv"))

    def __call__(self, x_BQD: jax.Array, memory_BSD: jax.Array,
                 bias_BHQS: jax.Array | AttentionBias, *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        """Attend from ``x`` to ``memory`` (the same array for self-attention).

        Args:
            x_BQD: queries' input.
            memory_BSD: keys' and values' input.
            bias_BHQS: float32 additive bias: relative positions plus ``MASK_BIAS`` where masked;
                any dimension may be 1 to broadcast. Or the same as an ``AttentionBias``, which
                the fused CPU kernel takes without forming the sum.
            deterministic: skip dropout.
            rngs: dropout randomness when not deterministic.
        """
        k_BSHK, v_BSHK = self.keys_values(memory_BSD)
        return self.attend(x_BQD, k_BSHK, v_BSHK, bias_BHQS, deterministic=deterministic,
                           rngs=rngs)

    def keys_values(self, memory_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, H, K] of ``memory``; decoding caches them."""
        return self._heads(self.key(memory_BSD)), self._heads(self.value(memory_BSD))

    def attend(self, x_BQD: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
               bias_BHQS: jax.Array | AttentionBias, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Attend from ``x`` to given keys and values (see ``__call__``)."""
        q_BQHK = self._heads(self.query(x_BQD))
        kind = resolve_attention(self.kind, q_BQHK.dtype)
        no_dropout = deterministic or self.dropout.rate == 0
        if (kind == "cpu_fused" and no_dropout and isinstance(bias_BHQS, AttentionBias)
                and bias_BHQS.position is None):
            from mtjax.kernels.attention import cpu_attention  # builds nothing at import

            y_BQHK = cpu_attention(q_BQHK, k_BSHK, v_BSHK, bias_BHQS.position_diagonals,
                                   bias_BHQS.mask)
            return self._output(y_BQHK)
        if isinstance(bias_BHQS, AttentionBias):
            bias_BHQS = bias_BHQS.dense(q_BQHK.shape[1], k_BSHK.shape[1])
        if no_dropout:
            attend = dot_product_attention if kind == "dot_product" else xla_attention
            y_BQHK = attend(q_BQHK, k_BSHK, v_BSHK, bias_BHQS)
        else:  # dropout on the probabilities: only the einsum path exposes them
            def dropout(probs_BHQS):
                return self.dropout(probs_BHQS, deterministic=deterministic, rngs=rngs)

            y_BQHK = xla_attention(q_BQHK, k_BSHK, v_BSHK, bias_BHQS, dropout=dropout)
        return self._output(y_BQHK)

    def _output(self, y_BQHK: jax.Array) -> jax.Array:
        y_BQHK = constrain(y_BQHK, ("batch", "length", "heads", "kv"))
        b, q_len = y_BQHK.shape[:2]
        return self.out(y_BQHK.reshape(b, q_len, self.num_heads * self.d_kv))


def cpu_fused_attention_problem(dtype) -> str:
    """Why mtjax's fused CPU attention kernel cannot run here ('' when it can).

    It needs float32 activations, the CPU backend and a build
    (``mtjax.kernels.cpu_kernel_problem``); on a mesh of several devices each runs it on its
    own batch rows and heads (``mtjax.kernels.attention``).
    """
    from mtjax import kernels

    # The dtype first on CPU: bfloat16 runs need no kernel build to be told.
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) != jnp.float32:
        return f"it takes float32 activations (model.dtype is {jnp.dtype(dtype).name})"
    return kernels.cpu_kernel_problem()


def resolve_attention(kind: str, dtype) -> str:
    """The attention implementation ``kind`` stands for. ``"auto"`` is cuDNN's fused attention
    (``"dot_product"``) on GPU with bfloat16 activations, mtjax's fused CPU kernel
    (``"cpu_fused"``) on CPU in float32 where it builds, and ``"xla"`` elsewhere.

    On an H200 cuDNN's kernel made the t5_1_1_base train step (batch 64, 512/114) 1.35x faster
    and halved its temporary memory; on CPU ``jax.nn.dot_product_attention`` only runs its own
    XLA version of what ``xla_attention`` does.

    Raises:
        ValueError: ``"cpu_fused"`` asked for where it cannot run (the message says why).
    """
    if kind == "cpu_fused":
        problem = cpu_fused_attention_problem(dtype)
        if problem:
            raise ValueError(f"model.attention=cpu_fused cannot run: {problem}; "
                             "use model.attention=auto or xla")
        return kind
    if kind != "auto":
        return kind
    if jax.default_backend() == "gpu" and dtype == jnp.bfloat16:
        return "dot_product"
    if jax.default_backend() == "cpu" and not cpu_fused_attention_problem(dtype):
        return "cpu_fused"
    return "xla"


def xla_attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                  bias_BHQS: jax.Array | None, dropout=None) -> jax.Array:
    """T5 attention by einsum: float32 scores plus bias, float32 softmax, no score scaling.

    Args:
        q_BQHK, k_BSHK, v_BSHK: queries, keys, values in the activation dtype.
        bias_BHQS: float32 additive bias; any dimension may be 1 to broadcast; None for none.
        dropout: optional function applied to the probabilities (training dropout).
    """
    if bias_BHQS is None:
        bias_BHQS = jnp.zeros((1, 1, 1, 1), jnp.float32)
    if dropout is None:
        return softmax_attention(q_BQHK, k_BSHK, v_BSHK, bias_BHQS)
    scores_BHQS = jnp.einsum("BQHK,BSHK->BHQS", q_BQHK, k_BSHK,
                             preferred_element_type=jnp.float32)
    probs_BHQS = dropout(softmax_lib.softmax(scores_BHQS + bias_BHQS, axis=-1))
    return jnp.einsum("BHQS,BSHK->BQHK", probs_BHQS.astype(v_BSHK.dtype), v_BSHK)


def _scores_times_heads(a_BHQS: jax.Array, x_BSHK: jax.Array) -> jax.Array:
    """``einsum("BHQS,BSHK->BQHK", a, x)`` in float32: probabilities times values, or the score
    gradient times keys.

    On CPU the product is taken in the heads-major [B, H, Q, K] layout and only then transposed.
    Left to itself XLA:CPU folds the output transpose into the dot by computing ``x^T a^T``,
    which YNNPACK runs at 170-220 GFLOP/s at the peer shape; the row-major product behind an
    optimisation barrier (which keeps XLA from folding the transpose back in) runs at about
    280, transposing copy included (12.4 -> 7.6 ms for B 8, H 8, Q = S 512, K 64 on the Zen 5
    machine).
    """
    if jax.default_backend() != "cpu":
        return jnp.einsum("BHQS,BSHK->BQHK", a_BHQS, x_BSHK, preferred_element_type=jnp.float32)
    x_BHSK = jnp.transpose(x_BSHK, (0, 2, 1, 3))
    y_BHQK = jax.lax.dot_general(a_BHQS, x_BHSK, (((3,), (2,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)
    return jnp.transpose(jax.lax.optimization_barrier(y_BHQK), (0, 2, 1, 3))


def _softmax_attention_fwd(q_BQHK, k_BSHK, v_BSHK, bias_BHQS):
    scores_BHQS = jnp.einsum("BQHK,BSHK->BHQS", q_BQHK, k_BSHK,
                             preferred_element_type=jnp.float32) + bias_BHQS
    max_BHQ1 = softmax_lib.row_max(scores_BHQS, axis=-1, keepdims=True)
    # Unnormalised probabilities; the 1/sum is applied to the [B, Q, H, K] output instead.
    exp_BHQS = jnp.exp(scores_BHQS - max_BHQ1)
    inv_sum_BQH1 = jnp.transpose(1.0 / jnp.sum(exp_BHQS, axis=-1), (0, 2, 1))[..., None]
    y_BQHK = _scores_times_heads(exp_BHQS.astype(v_BSHK.dtype), v_BSHK)
    y_BQHK = (y_BQHK * inv_sum_BQH1).astype(v_BSHK.dtype)
    # The backward pass needs only the bias's shape and dtype: an empty array carries them
    # without keeping the (often [B, H, Q, S]) bias alive until then.
    bias_spec = jnp.zeros((0, *bias_BHQS.shape), bias_BHQS.dtype)
    return y_BQHK, (q_BQHK, k_BSHK, v_BSHK, bias_spec, y_BQHK, exp_BHQS, inv_sum_BQH1)


@jax.custom_vjp
def softmax_attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                      bias_BHQS: jax.Array) -> jax.Array:
    """``softmax(q k^T + bias) v`` per head (no dropout) with a hand-written backward pass.

    Same numbers as autodiff of the einsum-softmax-einsum chain, in fewer passes over the
    [B, H, Q, S] arrays, which dominate attention's cost on CPU: the softmax is never
    normalised in place (its 1/sum scales the [B, Q, H, K] output and the incoming gradient),
    and in float32 the backward pass takes ``rowsum(P * dP)`` as ``rowsum(dY * Y)`` over the
    head dim (FlashAttention's identity) instead of reducing over S. Encoder self-attention at
    the peer shape (B 8, S 512, H 8, K 64), forward plus backward: 97 -> 85 ms on the Zen 5
    machine.
    """
    return _softmax_attention_fwd(q_BQHK, k_BSHK, v_BSHK, bias_BHQS)[0]


def _softmax_attention_bwd(residuals, dy_BQHK):
    q_BQHK, k_BSHK, v_BSHK, bias_spec, y_BQHK, exp_BHQS, inv_sum_BQH1 = residuals
    bias_shape = bias_spec.shape[1:]
    # With P = exp / sum: dScores = P * (dY v^T - rowsum(P * dY v^T)) = exp * (dY' v^T - D'),
    # where dY' = dY / sum.
    dy_scaled_BQHK = (dy_BQHK.astype(jnp.float32) * inv_sum_BQH1).astype(v_BSHK.dtype)
    dprobs_BHQS = jnp.einsum("BQHK,BSHK->BHQS", dy_scaled_BQHK, v_BSHK,
                             preferred_element_type=jnp.float32)
    if v_BSHK.dtype == jnp.float32:
        # D' = rowsum(dY' * Y) over the head dim: a [B, Q, H, K] reduction in place of one over
        # [B, H, Q, S] (FlashAttention's identity, exact when Y = P v is held in float32).
        d_BHQ1 = jnp.transpose(jnp.sum(dy_scaled_BQHK * y_BQHK, axis=-1), (0, 2, 1))[..., None]
    else:  # a rounded Y would break the identity: reduce over S as autodiff does
        inv_sum_BHQ1 = jnp.transpose(inv_sum_BQH1[..., 0], (0, 2, 1))[..., None]
        d_BHQ1 = jnp.sum(exp_BHQS * dprobs_BHQS, axis=-1, keepdims=True) * inv_sum_BHQ1
    dscores_BHQS = exp_BHQS * (dprobs_BHQS - d_BHQ1)
    dq_BQHK = _scores_times_heads(dscores_BHQS.astype(k_BSHK.dtype), k_BSHK)
    dk_BSHK = jnp.einsum("BHQS,BQHK->BSHK", dscores_BHQS.astype(q_BQHK.dtype), q_BQHK,
                         preferred_element_type=jnp.float32)
    dv_BSHK = jnp.einsum("BHQS,BQHK->BSHK", exp_BHQS.astype(v_BSHK.dtype), dy_scaled_BQHK,
                         preferred_element_type=jnp.float32)
    # Sum over the dimensions the bias was broadcast along (same rank: no rank promotion).
    broadcast_axes = tuple(i for i, n in enumerate(bias_shape)
                           if n == 1 and dscores_BHQS.shape[i] != 1)
    dbias = jnp.sum(dscores_BHQS, axis=broadcast_axes, keepdims=True)
    return (dq_BQHK.astype(q_BQHK.dtype), dk_BSHK.astype(k_BSHK.dtype),
            dv_BSHK.astype(v_BSHK.dtype), dbias.astype(bias_spec.dtype))


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def dot_product_attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                          bias_BHQS: jax.Array | None) -> jax.Array:
    """T5 attention through ``jax.nn.dot_product_attention`` (scale 1: T5 folds it into the
    query initialiser).

    On GPU with bfloat16 activations it asks for cuDNN's fused (flash) attention, and falls back
    to JAX's XLA implementation where cuDNN refuses the shapes or the bias; elsewhere it is the
    XLA implementation, which computes what :func:`xla_attention` does.
    """
    if jax.default_backend() == "gpu" and q_BQHK.dtype == jnp.bfloat16:
        try:
            bias = None if bias_BHQS is None else bias_BHQS.astype(q_BQHK.dtype)
            return jax.nn.dot_product_attention(q_BQHK, k_BSHK, v_BSHK, bias=bias, scale=1.0,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # unsupported by cuDNN here: the XLA path below
    return jax.nn.dot_product_attention(q_BQHK, k_BSHK, v_BSHK, bias=bias_BHQS, scale=1.0,
                                        implementation="xla")


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
