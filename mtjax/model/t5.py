"""The T5 encoder-decoder in Flax NNX: T5 1.0, 1.1, mT5, ByT5 and UMT5-style per-layer bias.

Create the model inside ``mtjax.parallel.mesh.activate(mesh, rules)`` (even a one-device mesh):
parameters carry logical axis names that Flax resolves against the active mesh and rules.

Dropout randomness is not stored in the model: pass ``rngs=nnx.Rngs(dropout=key)`` with
``deterministic=False``. The model state is therefore parameters only.

Letter legend: B batch, L length (S encoder/source, T decoder/target), D embed, V vocab,
H heads, Q query length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtjax.model.layers import (
    MASK_BIAS,
    MLP,
    Attention,
    Dense,
    Embed,
    RelativePositionBias,
    RMSNorm,
    constrain,
)
from mtjax.model.sizes import T5Config

# The data contract: the SeqIO feature converter whose output this model's __call__ takes.
FEATURE_CONVERTER = "EncDecFeatureConverter"

_RESIDUAL = ("batch", "length", "embed")

_REMAT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "full": None,  # save nothing but the layer inputs
}


def _mask_to_bias(mask_BQS: jax.Array) -> jax.Array:
    """[B, Q, S] bool -> [B, 1, Q, S] float32 additive bias (0 or MASK_BIAS)."""
    return jnp.where(mask_BQS, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]


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


def _relpos_bias(cfg: T5Config, *, bidirectional: bool, rngs: nnx.Rngs) -> RelativePositionBias:
    return RelativePositionBias(
        cfg.num_heads, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance, bidirectional=bidirectional,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
    )


def _common(cfg: T5Config) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention then pre-norm MLP, each with a residual connection."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        common = _common(cfg)
        eps = cfg.layer_norm_epsilon
        if cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        self.pre_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv,
                                   dropout_rate=cfg.dropout_rate, rngs=rngs, **common)
        self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp_activation,
                       dropout_rate=cfg.dropout_rate, rngs=rngs, **common)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, x_BSD, mask_bias_BHSS, shared_bias_BHSS, *, deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = x_BSD.shape[1]
        position_bias = (self.relpos_bias(length, length) if shared_bias_BHSS is None
                         else shared_bias_BHSS)
        h_BSD = self.pre_attention_layer_norm(x_BSD)
        h_BSD = self.attention(h_BSD, h_BSD, position_bias + mask_bias_BHSS, **drop)
        x_BSD = constrain(x_BSD + self.dropout(h_BSD, **drop), _RESIDUAL)
        h_BSD = self.mlp(self.pre_mlp_layer_norm(x_BSD), **drop)
        return constrain(x_BSD + self.dropout(h_BSD, **drop), _RESIDUAL)


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, then MLP."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        common = _common(cfg)
        eps = cfg.layer_norm_epsilon
        attention = dict(dropout_rate=cfg.dropout_rate, rngs=rngs, **common)
        if cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        self.pre_self_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.self_attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, **attention)
        self.pre_cross_attention_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.encoder_decoder_attention = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv,
                                                   **attention)
        self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, epsilon=eps, **common)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp_activation,
                       dropout_rate=cfg.dropout_rate, rngs=rngs, **common)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, y_BTD, encoded_BSD, self_mask_bias_BHTT, cross_mask_bias_BHTS,
                 shared_bias_BHTT, *, deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = y_BTD.shape[1]
        position_bias = (self.relpos_bias(length, length) if shared_bias_BHTT is None
                         else shared_bias_BHTT)
        h_BTD = self.pre_self_attention_layer_norm(y_BTD)
        h_BTD = self.self_attention(h_BTD, h_BTD, position_bias + self_mask_bias_BHTT, **drop)
        y_BTD = constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)
        # Cross-attention has no position bias, only the mask.
        h_BTD = self.pre_cross_attention_layer_norm(y_BTD)
        h_BTD = self.encoder_decoder_attention(h_BTD, encoded_BSD, cross_mask_bias_BHTS, **drop)
        y_BTD = constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)
        h_BTD = self.mlp(self.pre_mlp_layer_norm(y_BTD), **drop)
        return constrain(y_BTD + self.dropout(h_BTD, **drop), _RESIDUAL)


class Encoder(nnx.Module):
    """Embedded tokens -> layers -> final norm; holds the shared relative position bias."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if not cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs)
                                for _ in range(cfg.num_encoder_layers)])
        self.encoder_norm = RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_epsilon, **_common(cfg))
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, x_BSD, mask_bias_BHSS, *, deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = x_BSD.shape[1]
        shared_bias = (None if self.cfg.per_layer_relative_bias
                       else self.relpos_bias(length, length))
        x_BSD = constrain(self.dropout(x_BSD, **drop), _RESIDUAL)
        for layer in self.layers:
            x_BSD = _call_layer(self.cfg, layer, x_BSD, mask_bias_BHSS, shared_bias, **drop)
        return self.dropout(self.encoder_norm(x_BSD), **drop)


class Decoder(nnx.Module):
    """Embedded tokens -> causal layers with cross-attention -> final norm."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if not cfg.per_layer_relative_bias:
            self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs)
                                for _ in range(cfg.num_decoder_layers)])
        self.decoder_norm = RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_epsilon, **_common(cfg))
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, y_BTD, encoded_BSD, self_mask_bias_BHTT, cross_mask_bias_BHTS, *,
                 deterministic, rngs):
        drop = dict(deterministic=deterministic, rngs=rngs)
        length = y_BTD.shape[1]
        shared_bias = (None if self.cfg.per_layer_relative_bias
                       else self.relpos_bias(length, length))
        y_BTD = constrain(self.dropout(y_BTD, **drop), _RESIDUAL)
        for layer in self.layers:
            y_BTD = _call_layer(self.cfg, layer, y_BTD, encoded_BSD, self_mask_bias_BHTT,
                                cross_mask_bias_BHTS, shared_bias, **drop)
        return self.dropout(self.decoder_norm(y_BTD), **drop)


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
        if config.scan_layers:
            raise NotImplementedError(
                "model.scan_layers=True is not implemented yet; layers are unrolled. "
                "Set scan_layers=False (use remat to save memory)."
            )
        self.config = config
        common = _common(config)
        self.token_embedder = Embed(config.vocab_size, config.d_model, rngs=rngs, **common)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = Dense(config.d_model, config.vocab_size, names=("embed", "vocab"),
                                 init=jax.nn.initializers.variance_scaling(
                                     1.0, "fan_in", "truncated_normal"),
                                 rngs=rngs, **common)

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
        mask_bias = _mask_to_bias(encoder_self_mask(encoder_input_tokens, encoder_segment_ids))
        return self.encoder(x_BSD, mask_bias, deterministic=deterministic, rngs=rngs)

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
        self_bias = _mask_to_bias(decoder_self_mask(decoder_input_tokens, decoder_segment_ids))
        cross_bias = _mask_to_bias(cross_mask(decoder_input_tokens, encoder_input_tokens,
                                              decoder_segment_ids, encoder_segment_ids))
        y_BTD = self.decoder(y_BTD, encoded, self_bias, cross_bias, deterministic=deterministic,
                             rngs=rngs)
        if self.config.tie_embeddings:
            # T5 1.0 rescales before the tied projection (Mesh TF / HF T5).
            logits_BTV = self.token_embedder.attend(y_BTD * (self.config.d_model ** -0.5))
        else:
            logits_BTV = self.lm_head(y_BTD, out_dtype=jnp.float32)
        return constrain(logits_BTV, ("batch", "length", "vocab"))

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
