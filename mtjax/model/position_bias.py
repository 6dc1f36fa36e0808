"""T5's relative position bias: the buckets of key - query distances, the learnt bias per
bucket and head, and the ways to spread it over [H, Q, S] (a gather, a one-hot matmul, or its
diagonals, which the fused CPU attention kernel reads as they are).

Letter legend: H heads, Q query length, S key length, N relative position buckets, R diagonals
(Q + S - 1).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mtjax.model.layers import logical_param


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
        self.rel_embedding = logical_param(init, rngs, (num_heads, num_buckets), param_dtype,
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
