"""T5 multi-head attention in Flax NNX, and its implementations: XLA einsums, a memory-saving
softmax with its own gradient, cuDNN's fused attention through ``jax.nn.dot_product_attention``,
and mtjax's fused CPU kernel (``mtjax.kernels.attention``); ``resolve_attention`` picks one.

Numerically the reference T5's: no biases, no 1/sqrt(d) scaling of scores (folded into the query
initialiser), float32 softmax.

Letter legend: B batch, Q query length, S key length, D embed, H heads, K head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtjax.model import softmax as softmax_lib
from mtjax.model.layers import Dense, constrain, fan_in_init
from mtjax.model.position_bias import toeplitz_bias

# Attention bias of masked pairs, as in T5X; finite so that fully masked rows stay finite.
MASK_BIAS = -1e10


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

    def attend_cached(self, x_BQD: jax.Array, k_BHSK: jax.Array, v_BHSK: jax.Array,
                      bias_BHQS: jax.Array) -> jax.Array:
        """``attend`` (no dropout) to keys and values in the heads-major [B, H, S, K] layout of
        a decoding cache (``heads_major_attention``); ``bias_BHQS`` is a float32 array.

        Whatever ``model.attention`` says: a decoding step has one query per row, where a
        flash kernel (cuDNN's) has nothing to tile, and handing it [B, S, H, K] keys would copy
        every cache at every step again (the numbers of softmax_attention, tested)."""
        q_BQHK = self._heads(self.query(x_BQD))
        return self._output(heads_major_attention(q_BQHK, k_BHSK, v_BHSK, bias_BHQS))

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


def heads_major_attention(q_BQHK: jax.Array, k_BHSK: jax.Array, v_BHSK: jax.Array,
                          bias_BHQS: jax.Array) -> jax.Array:
    """:func:`softmax_attention`'s forward pass, the same operations in the same order, with
    keys and values in the heads-major [B, H, S, K] layout (queries and output stay
    [B, Q, H, K]); for decoding, whose caches are kept in that layout.

    Batched dots want their batch dimensions (B, H) leading: given [B, S, H, K] caches, XLA:CPU
    copied every cache into [B, H, ...] at every decoding step, self-attention's after writing
    the new position and cross-attention's, constant across steps, alike. For t5_1_1_tiny
    (3 layers) at batch 32, length 64 these twelve 2 MB transposes were most of a greedy step.
    """
    q_BHQK = jnp.transpose(q_BQHK, (0, 2, 1, 3))
    scores_BHQS = jnp.einsum("BHQK,BHSK->BHQS", q_BHQK, k_BHSK,
                             preferred_element_type=jnp.float32) + bias_BHQS
    max_BHQ1 = softmax_lib.row_max(scores_BHQS, axis=-1, keepdims=True)
    exp_BHQS = jnp.exp(scores_BHQS - max_BHQ1)
    inv_sum_BHQ1 = 1.0 / jnp.sum(exp_BHQS, axis=-1, keepdims=True)
    y_BHQK = jnp.einsum("BHQS,BHSK->BHQK", exp_BHQS.astype(v_BHSK.dtype), v_BHSK,
                        preferred_element_type=jnp.float32)
    y_BHQK = (y_BHQK * inv_sum_BHQ1).astype(v_BHSK.dtype)
    return jnp.transpose(y_BHQK, (0, 2, 1, 3))


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
