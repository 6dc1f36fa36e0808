"""The T5 encoder-decoder in Flax NNX: T5 1.0, 1.1, mT5, ByT5 and UMT5-style per-layer bias.

Create the model inside ``mtjax.parallel.mesh.activate(mesh, rules)`` (even a one-device mesh):
parameters carry logical axis names that Flax resolves against the active mesh and rules.

Dropout randomness is not stored in the model: pass ``rngs=nnx.Rngs(dropout=key)`` with
``deterministic=False``. The model state is therefore parameters only.

Letter legend: B batch, L length (S encoder/source, T decoder/target), D embed, V vocab,
H heads, Q query length.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mtjax.model.attention import (
    MASK_BIAS,
    Attention,
    AttentionBias,
    mask_to_bias,
    resolve_attention,
)
from mtjax.model.layers import MLP, Dense, Embed, RMSNorm, constrain
from mtjax.model.position_bias import RelativePositionBias
from mtjax.model.sizes import T5Config

# The data contract: the SeqIO feature converter whose output this model's __call__ takes.
FEATURE_CONVERTER = "EncDecFeatureConverter"

_RESIDUAL = ("batch", "length", "embed")
_HEADS_MAJOR = ("batch", "heads", "length", "kv")  # the decoding cache's keys and values

_REMAT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "full": None,  # save nothing but the layer inputs
}


def encoder_self_mask(tokens_BS: jax.Array, segment_ids_BS: jax.Array | None) -> jax.Array:
    """[B, S, S]: key is not padding and, when packed, in the query's segment."""
    mask_BSS = jnp.broadcast_to((tokens_BS > 0)[:, None, :], tokens_BS.shape + tokens_BS.shape[1:])
    if segment_ids_BS is not None:
        mask_BSS = mask_BSS & (segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :])
    return mask_BSS


def decoder_self_mask(tokens_BT: jax.Array, segment_ids_BT: jax.Array | None) -> jax.Array:
    """[B, T, T]: causal and, when packed, same segment.

    Padding keys need no test of their own: T5's decoder inputs start with token 0 (the pad id
    doubles as BOS), so ``tokens > 0`` would wrongly hide the first position; with right padding
    causality already keeps real queries off trailing pads, and with packing pads have segment 0.
    """
    length = tokens_BT.shape[1]
    causal_TT = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    mask_BTT = jnp.broadcast_to(causal_TT, (tokens_BT.shape[0], length, length))
    if segment_ids_BT is not None:
        mask_BTT = mask_BTT & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask_BTT


def cross_mask(decoder_tokens_BT: jax.Array, encoder_tokens_BS: jax.Array,
               decoder_segment_ids_BT: jax.Array | None,
               encoder_segment_ids_BS: jax.Array | None) -> jax.Array:
    """[B, T, S]: encoder key is not padding and, when packed, in the decoder query's segment."""
    (b, t), s = decoder_tokens_BT.shape, encoder_tokens_BS.shape[1]
    mask_BTS = jnp.broadcast_to((encoder_tokens_BS > 0)[:, None, :], (b, t, s))
    if decoder_segment_ids_BT is not None and encoder_segment_ids_BS is not None:
        same_BTS = decoder_segment_ids_BT[:, :, None] == encoder_segment_ids_BS[:, None, :]
        mask_BTS = mask_BTS & same_BTS
    return mask_BTS


def _call_layer(cfg: T5Config, layer: nnx.Module, *args, deterministic: bool,
                rngs: nnx.Rngs | None):
    """Run one layer, rematerialised per ``cfg.remat`` (the backward pass recomputes it)."""
    if cfg.remat == "none":
        return layer(*args, deterministic=deterministic, rngs=rngs)

    def run(layer, rngs, *args):
        return layer(*args, deterministic=deterministic, rngs=rngs)

    return nnx.remat(run, policy=_REMAT_POLICIES[cfg.remat])(layer, rngs, *args)


def _run_layers(cfg: T5Config, layers: nnx.List, x: jax.Array, *args,
                deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Every layer of a stack in order: unrolled, or as one ``jax.lax.scan`` (``scan_layers``).

    The scan stacks the layers' parameters inside the forward pass (gradients unstack), so the
    parameter tree, checkpoints and conversions keep one entry per layer either way; the cost is
    one copy of the stack's parameters and gradients per step. The layer is traced and compiled
    once instead of once per layer. Dropout draws one key per layer from ``rngs``.
    """
    if not cfg.scan_layers:
        for layer in layers:
            x = _call_layer(cfg, layer, x, *args, deterministic=deterministic, rngs=rngs)
        return x
    graphdef, _ = nnx.split(layers[0])
    params_LX = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *(nnx.to_pure_dict(nnx.state(layer)) for layer in layers))
    keys_L = (jax.random.split(rngs.dropout(), len(layers))
              if not deterministic and rngs is not None and cfg.dropout_rate > 0 else None)

    def body(x, xs):
        params, key = xs
        layer = nnx.merge(graphdef, nnx.State(params))
        layer_rngs = None if key is None else nnx.Rngs(dropout=key)
        return layer(x, *args, deterministic=deterministic, rngs=layer_rngs), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
    x, _ = jax.lax.scan(body, x, (params_LX, keys_L))
    return x


def _relpos_bias(cfg: T5Config, *, bidirectional: bool, rngs: nnx.Rngs) -> RelativePositionBias:
    return RelativePositionBias(
        cfg.num_heads, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance, bidirectional=bidirectional,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
    )


def _fused_cpu_attention(cfg: T5Config) -> bool:
    return resolve_attention(cfg.attention, jnp.dtype(cfg.dtype)) == "cpu_fused"


def _position_bias(cfg: T5Config, module: RelativePositionBias, query_length: int,
                   key_length: int) -> AttentionBias:
    """The relative position bias as attention takes it, its mask still to be set: [1, H, Q, S],
    or its diagonals [H, Q + S - 1] for the fused CPU kernel."""
    if _fused_cpu_attention(cfg):
        return AttentionBias(None, None, position_diagonals=module.diagonals(query_length,
                                                                             key_length))
    return AttentionBias(module(query_length, key_length), None)


def _heads_major(x_BLHK: jax.Array) -> jax.Array:
    """[B, L, H, K] -> [B, H, L, K], the layout of the decoding cache."""
    return constrain(jnp.transpose(x_BLHK, (0, 2, 1, 3)), _HEADS_MAJOR)


def _common(cfg: T5Config) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention then pre-norm MLP, each with a residual connection."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = _common(cfg)
        eps = cfg.layer_norm_epsilon
        if cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        self.pre_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv,
                                   dropout_rate=cfg.dropout_rate, kind=cfg.attention, rngs=rngs,
                                   weight_grad=cfg.weight_grad, **common)
        self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp_activation,
                       dropout_rate=cfg.dropout_rate, rngs=rngs, weight_grad=cfg.weight_grad,
                       **common)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, x_BSD, mask_BSS, shared_bias, *, deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = x_BSD.shape[1]
        position_bias = (_position_bias(self.cfg, self.relpos_bias, length, length)
                         if shared_bias is None else shared_bias)
        h_BSD = self.pre_attention_layer_norm(x_BSD)
        h_BSD = self.attention(h_BSD, h_BSD, position_bias._replace(mask=mask_BSS), **drop)
        x_BSD = constrain(x_BSD + self.dropout(h_BSD, **drop), _RESIDUAL)
        h_BSD = self.mlp(self.pre_mlp_layer_norm(x_BSD), **drop)
        return constrain(x_BSD + self.dropout(h_BSD, **drop), _RESIDUAL)


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, then MLP."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = _common(cfg)
        eps = cfg.layer_norm_epsilon
        attention = dict(dropout_rate=cfg.dropout_rate, kind=cfg.attention, rngs=rngs,
                         weight_grad=cfg.weight_grad, **common)
        if cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        self.pre_self_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.self_attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, **attention)
        self.pre_cross_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.encoder_decoder_attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv,
                                                   **attention)
        self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp_activation,
                       dropout_rate=cfg.dropout_rate, rngs=rngs, weight_grad=cfg.weight_grad,
                       **common)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, y_BTD, encoded_BSD, self_mask_BTT, cross_mask_BTS, shared_bias, *,
                 deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = y_BTD.shape[1]
        position_bias = (_position_bias(self.cfg, self.relpos_bias, length, length)
                         if shared_bias is None else shared_bias)
        h_BTD = self.pre_self_attention_layer_norm(y_BTD)
        h_BTD = self.self_attention(h_BTD, h_BTD, position_bias._replace(mask=self_mask_BTT),
                                    **drop)
        y_BTD = constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)
        # Cross-attention has no position bias, only the mask.
        h_BTD = self.pre_cross_attention_layer_norm(y_BTD)
        h_BTD = self.encoder_decoder_attention(h_BTD, encoded_BSD,
                                               AttentionBias(None, cross_mask_BTS), **drop)
        y_BTD = constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)
        h_BTD = self.mlp(self.pre_mlp_layer_norm(y_BTD), **drop)
        return constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)

    def step(self, y_B1D, cache, index, self_mask_bias_B11T, cross_mask_bias_B11S,
             shared_bias_1H1T):
        """One decoding position against cached keys/values; returns (y, updated cache).

        Writes this position's self-attention key/value at ``index`` of the cache, attends over
        all cached positions (later ones masked by ``self_mask_bias``), and to the cached
        cross-attention keys/values. No dropout (inference only).
        """
        max_length = cache["self_k"].shape[2]
        position_bias = (self.relpos_bias(1, max_length, index) if shared_bias_1H1T is None
                         else shared_bias_1H1T)
        h_B1D = self.pre_self_attention_layer_norm(y_B1D)
        k_B1HK, v_B1HK = self.self_attention.keys_values(h_B1D)
        self_k = jax.lax.dynamic_update_slice_in_dim(
            cache["self_k"], _heads_major(k_B1HK).astype(cache["self_k"].dtype), index, axis=2)
        self_v = jax.lax.dynamic_update_slice_in_dim(
            cache["self_v"], _heads_major(v_B1HK).astype(cache["self_v"].dtype), index, axis=2)
        h_B1D = self.self_attention.attend_cached(h_B1D, self_k, self_v,
                                                  position_bias + self_mask_bias_B11T)
        y_B1D = constrain(y_B1D + h_B1D, _RESIDUAL)
        h_B1D = self.pre_cross_attention_layer_norm(y_B1D)
        # Several decodes per input (beams, adjacent rows) share its cross keys/values: attend
        # with them as that input's queries rather than keep a copy of the cache per decode.
        n, b = h_B1D.shape[0], cache["cross_k"].shape[0]
        h_BND = self.encoder_decoder_attention.attend_cached(
            h_B1D.reshape(b, n // b, -1), cache["cross_k"], cache["cross_v"],
            cross_mask_bias_B11S)
        y_B1D = constrain(y_B1D + h_BND.reshape(n, 1, -1), _RESIDUAL)
        h_B1D = self.mlp(self.pre_mlp_layer_norm(y_B1D), deterministic=True, rngs=None)
        return constrain(y_B1D + h_B1D, _RESIDUAL), dict(cache, self_k=self_k, self_v=self_v)


class _DrawCounter:
    """Stands in for ``nnx.Rngs`` while a layer is built abstractly: counts its parameter keys."""

    def __init__(self):
        self.draws = 0

    def params(self) -> jax.Array:
        self.draws += 1
        return jax.random.key(0)


def make_layers(make: Callable[[nnx.Rngs], nnx.Module], count: int,
                rngs: nnx.Rngs) -> nnx.List:
    """``nnx.List([make(rngs) for _ in range(count)])``, with the same parameter values, but
    initialised by one ``jax.lax.scan`` over the layers.

    Initialisers are costly to compile (a truncated normal is ~0.25 s of XLA:CPU time and about
    4x that on a GPU), and a loop emits them once per layer: initialising t5_1_1_base compiled
    for 231 s on an H200. The scan's body is compiled once per kind of layer. Layer ``i`` draws
    the keys the loop would have drawn (the stream's counter at ``start + i * draws``), and the
    stream's counter ends where the loop would leave it.

    Built eagerly (outside ``jax.jit``), the scan would compile afresh at every call (its
    body is a new closure each time, 1-2 s per stack on a CPU), while the loop's initialisers
    run as single ops whose compiled kernels JAX keeps per shape: eagerly, the loop.
    """
    stream = rngs.params  # the stream parameter initialisers draw from ("default" if none)
    key, start = stream.key[...], stream.count[...]
    if count <= 1 or not isinstance(start, jax.core.Tracer):
        return nnx.List([make(rngs) for _ in range(count)])
    counter = _DrawCounter()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(counter)))

    def init_layer(_, i):
        layer_rngs = nnx.Rngs(**{stream.tag: key})
        layer_rngs.params.count[...] = start + i * counter.draws
        return None, nnx.state(make(layer_rngs))

    _, states = jax.lax.scan(init_layer, None, jnp.arange(count, dtype=start.dtype))
    stream.count[...] = start + count * counter.draws
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], states))
                     for i in range(count)])


class Encoder(nnx.Module):
    """Embedded tokens -> layers -> final norm; holds the shared relative position bias."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if not cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        self.layers = make_layers(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_encoder_layers,
                                  rngs)
        self.encoder_norm = RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_epsilon, **_common(cfg))
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, x_BSD, mask_BSS, *, deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = x_BSD.shape[1]
        shared_bias = (None if self.cfg.per_layer_relative_bias
                       else _position_bias(self.cfg, self.relpos_bias, length, length))
        x_BSD = constrain(self.dropout(x_BSD, **drop), _RESIDUAL)
        x_BSD = _run_layers(self.cfg, self.layers, x_BSD, mask_BSS, shared_bias, **drop)
        return self.dropout(self.encoder_norm(x_BSD), **drop)


class Decoder(nnx.Module):
    """Embedded tokens -> causal layers with cross-attention -> final norm."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if not cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        self.layers = make_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_decoder_layers,
                                  rngs)
        self.decoder_norm = RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_epsilon, **_common(cfg))
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, y_BTD, encoded_BSD, self_mask_BTT, cross_mask_BTS, *, deterministic,
                 rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = y_BTD.shape[1]
        shared_bias = (None if self.cfg.per_layer_relative_bias
                       else _position_bias(self.cfg, self.relpos_bias, length, length))
        y_BTD = constrain(self.dropout(y_BTD, **drop), _RESIDUAL)
        y_BTD = _run_layers(self.cfg, self.layers, y_BTD, encoded_BSD, self_mask_BTT,
                            cross_mask_BTS, shared_bias, **drop)
        return self.dropout(self.decoder_norm(y_BTD), **drop)

    def step(self, y_B1D, layer_caches, index, self_mask_bias_B11T, cross_mask_bias_B11S):
        """One decoding position through every layer; returns (normed y, updated caches)."""
        max_length = layer_caches[0]["self_k"].shape[2]
        shared_bias = (None if self.cfg.per_layer_relative_bias
                       else self.relpos_bias(1, max_length, index))
        y_B1D = constrain(y_B1D, _RESIDUAL)
        new_caches = []
        for layer, cache in zip(self.layers, layer_caches, strict=True):
            y_B1D, cache = layer.step(y_B1D, cache, index, self_mask_bias_B11T,
                                      cross_mask_bias_B11S, shared_bias)
            new_caches.append(cache)
        return self.decoder_norm(y_B1D), new_caches


class T5(nnx.Module):
    """T5 encoder-decoder returning float32 logits.

    Parameter tree: ``token_embedder.embedding`` [V, D]; ``encoder.relpos_bias.rel_embedding``
    [H, N]; ``encoder.layers[i].{pre_attention_layer_norm, attention.{query,key,value,out},
    pre_mlp_layer_norm, mlp.{wi_0,wi_1 | wi, wo}}``; ``encoder.encoder_norm.scale``; the decoder
    likewise with ``self_attention``, ``encoder_decoder_attention`` and ``decoder_norm``;
    ``lm_head.kernel`` [D, V] unless embeddings are tied.
    """

    FEATURE_CONVERTER = FEATURE_CONVERTER

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        common = _common(config)
        self.token_embedder = Embed(config.vocab_size, config.d_model, rngs=rngs,
                                    weight_grad=config.weight_grad, **common)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = Dense(config.d_model, config.vocab_size, names=("embed", "vocab"),
                                 init=jax.nn.initializers.variance_scaling(
                                     1.0, "fan_in", "truncated_normal"),
                                 rngs=rngs, weight_grad=config.weight_grad, **common)

    def encode(self, encoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array | None = None,
               encoder_positions: jax.Array | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Encoder output [B, S, D] in ``config.dtype``.

        Args:
            encoder_input_tokens: int32 [B, S]; 0 is padding.
            encoder_segment_ids: int32 [B, S] for packed rows (0 on padding), or None.
            encoder_positions: accepted for the feature converter's contract; unused, since
                relative positions come from ``arange`` differences, invariant within a segment.
            deterministic: no dropout when True.
            rngs: ``nnx.Rngs(dropout=...)``, needed when not deterministic and dropout_rate > 0.
        """
        del encoder_positions
        x_BSD = self.token_embedder(encoder_input_tokens)
        mask_BSS = encoder_self_mask(encoder_input_tokens, encoder_segment_ids)
        return self.encoder(x_BSD, mask_BSS, deterministic=deterministic, rngs=rngs)

    def decode(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None,
               decoder_positions: jax.Array | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits float32 [B, T, V] given the encoder output.

        Args:
            encoded: ``encode(...)`` output [B, S, D].
            encoder_input_tokens: int32 [B, S], for the cross-attention padding mask.
            decoder_input_tokens: int32 [B, T], targets shifted right (starting with 0).
            encoder_segment_ids: int32 [B, S] or None.
            decoder_segment_ids: int32 [B, T] or None; used with ``encoder_segment_ids``.
            decoder_positions: unused (see ``encode``).
            deterministic: no dropout when True.
            rngs: dropout randomness.
        """
        del decoder_positions
        y_BTD = self.token_embedder(decoder_input_tokens)
        self_mask_BTT = decoder_self_mask(decoder_input_tokens, decoder_segment_ids)
        cross_mask_BTS = cross_mask(decoder_input_tokens, encoder_input_tokens,
                                    decoder_segment_ids, encoder_segment_ids)
        y_BTD = self.decoder(y_BTD, encoded, self_mask_BTT, cross_mask_BTS,
                             deterministic=deterministic, rngs=rngs)
        return self._logits(y_BTD)

    def _logits(self, y_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] of the decoder output."""
        if self.config.tie_embeddings:
            # T5 1.0 rescales before the tied projection (Mesh TF / HF T5).
            logits_BTV = self.token_embedder.attend(y_BTD * (self.config.d_model ** -0.5))
        else:
            logits_BTV = self.lm_head(y_BTD, out_dtype=jnp.float32)
        return constrain(logits_BTV, ("batch", "length", "vocab"))

    def init_cache(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
                   max_length: int, num_decodes: int = 1) -> dict:
        """The decoding cache for ``decode_step``: a pytree of arrays.

        ``layers[i]`` holds ``self_k``/``self_v`` [B * num_decodes, H, max_length, K] (zeros,
        filled one position per step) and ``cross_k``/``cross_v`` [B, H, S, K] (the encoder
        output's cross-attention keys/values, computed once); ``cross_bias`` [B, 1, 1, S] masks
        encoder padding. Only the ``self_*`` entries depend on the decoded prefix (beam search
        reorders them); the rest depend on the input alone. Keys and values are kept heads-major,
        the layout attention's batched dots read (``heads_major_attention``).

        Args:
            encoded: ``encode(...)`` output [B, S, D] of unpacked inputs.
            encoder_input_tokens: int32 [B, S]; 0 is padding.
            max_length: decoder positions to cache.
            num_decodes: sequences decoded per input (beams), rows ``b * num_decodes + i``.
        """
        cfg = self.config
        b = encoded.shape[0] * num_decodes
        zeros_BHTK = constrain(
            jnp.zeros((b, cfg.num_heads, max_length, cfg.d_kv), jnp.dtype(cfg.dtype)),
            _HEADS_MAJOR)
        layers = []
        for layer in self.decoder.layers:
            cross_k, cross_v = layer.encoder_decoder_attention.keys_values(encoded)
            layers.append({"self_k": zeros_BHTK, "self_v": zeros_BHTK,
                           "cross_k": _heads_major(cross_k), "cross_v": _heads_major(cross_v)})
        cross_bias_B11S = mask_to_bias((encoder_input_tokens > 0)[:, None, :])
        return {"layers": layers, "cross_bias": cross_bias_B11S}

    def decode_step(self, decoder_input_tokens: jax.Array, cache: dict,
                    index: jax.Array | int) -> tuple[jax.Array, dict]:
        """Logits for one decoder position with the KV cache: equals ``decode`` at ``index``.

        Args:
            decoder_input_tokens: int32 [B * num_decodes, 1], the token at position ``index``
                of the decoder input (0 at index 0, then the previous output token).
            cache: ``init_cache(...)``, or the cache this method returned for ``index - 1``.
            index: the position, int32 scalar (may be traced).

        Returns:
            (float32 logits [B, V], the cache with this position's keys/values written).
        """
        max_length = cache["layers"][0]["self_k"].shape[2]
        y_B1D = self.token_embedder(decoder_input_tokens)
        # Causal: keys at positions after ``index`` are still zeros in the cache; mask them.
        self_bias_T = jnp.where(jnp.arange(max_length) <= index, 0.0, MASK_BIAS)
        self_bias_B11T = self_bias_T.astype(jnp.float32)[None, None, None, :]
        y_B1D, layers = self.decoder.step(y_B1D, cache["layers"], index, self_bias_B11T,
                                          cache["cross_bias"])
        return self._logits(y_B1D)[:, 0], {**cache, "layers": layers}

    def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
                 encoder_segment_ids: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None,
                 encoder_positions: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits float32 [B, T, V] for a batch from ``EncDecFeatureConverter``.

        Args:
            encoder_input_tokens: int32 [B, S]; 0 is padding.
            decoder_input_tokens: int32 [B, T].
            encoder_segment_ids: int32 [B, S] for packed batches, else None.
            decoder_segment_ids: int32 [B, T] for packed batches, else None.
            encoder_positions: unused; relative attention uses arange differences.
            decoder_positions: unused; likewise.
            deterministic: no dropout when True.
            rngs: ``nnx.Rngs(dropout=key)`` when training with dropout.
        """
        encoded_BSD = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                                  deterministic=deterministic, rngs=rngs)
        return self.decode(encoded_BSD, encoder_input_tokens, decoder_input_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions,
                           deterministic=deterministic, rngs=rngs)
