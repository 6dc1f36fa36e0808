"""Pure mappings between Hugging Face / T5X T5 tensors and the mtjax parameter tree.

Numpy arrays in, numpy arrays out: no files, no checkpoints (``mtjax.interop`` reads and writes
them). One table per config, :func:`param_table`, lists every mtjax parameter with its Hugging
Face name and layout, so both directions, the shape checks and the error messages come from the
same place.

Layouts: mtjax dense kernels are ``[in, out]`` (T5X's), Hugging Face ``nn.Linear`` weights are
``[out, in]``; relative position tables are ``[H, N]`` in mtjax and T5X, ``[N, H]`` in Hugging
Face, which keeps the shared table in block 0 of each stack (in every block for UMT5). The token
embedding is ``[V, D]`` everywhere; T5 1.0 reuses it as the output layer (Hugging Face may also
store copies as ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``).

Letter legend: V vocab, D embed, F mlp, H heads, K head dim, N relative position buckets,
L layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtjax.errors import UserError
from mtjax.model.sizes import MODEL_SIZES, T5Config

Path = tuple[str | int, ...]


class ConversionError(UserError, ValueError):
    """Tensors that do not make the expected model; the message lists the names."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One mtjax parameter: its tree path, shape, and Hugging Face name and layout."""

    path: Path
    shape: tuple[int, ...]
    hf_name: str
    transpose: bool  # Hugging Face stores the transpose (nn.Linear [out, in], bias [N, H])

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def param_table(cfg: T5Config) -> list[Entry]:
    """Every parameter of ``T5(cfg)`` with its Hugging Face counterpart, in a stable order."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    inner, relpos = cfg.num_heads * cfg.d_kv, (cfg.num_heads, cfg.relative_attention_num_buckets)
    table = [Entry(("token_embedder", "embedding"), (v, d), "shared.weight", False)]

    def attention(path: Path, hf: str) -> None:
        for name, hf_short, shape in (("query", "q", (d, inner)), ("key", "k", (d, inner)),
                                      ("value", "v", (d, inner)), ("out", "o", (inner, d))):
            table.append(Entry((*path, name, "kernel"), shape, f"{hf}.{hf_short}.weight", True))

    def mlp(path: Path, hf: str) -> None:
        names = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
        for name in names:
            table.append(Entry((*path, name, "kernel"), (d, f), f"{hf}.{name}.weight", True))
        table.append(Entry((*path, "wo", "kernel"), (f, d), f"{hf}.wo.weight", True))

    def norm(path: Path, hf: str) -> None:
        table.append(Entry((*path, "scale"), (d,), f"{hf}.weight", False))

    def bias(path: Path, hf_attention: str) -> None:
        table.append(Entry((*path, "rel_embedding"), relpos,
                           f"{hf_attention}.relative_attention_bias.weight", True))

    for stack, n_layers in (("encoder", cfg.num_encoder_layers),
                            ("decoder", cfg.num_decoder_layers)):
        if not cfg.per_layer_relative_bias:
            bias((stack, "relpos_bias"), f"{stack}.block.0.layer.0.SelfAttention")
        for i in range(n_layers):
            layer, block = (stack, "layers", i), f"{stack}.block.{i}.layer"
            if cfg.per_layer_relative_bias:
                bias((*layer, "relpos_bias"), f"{block}.0.SelfAttention")
            if stack == "encoder":
                norm((*layer, "pre_attention_layer_norm"), f"{block}.0.layer_norm")
                attention((*layer, "attention"), f"{block}.0.SelfAttention")
                norm((*layer, "pre_mlp_layer_norm"), f"{block}.1.layer_norm")
                mlp((*layer, "mlp"), f"{block}.1.DenseReluDense")
            else:
                norm((*layer, "pre_self_attention_layer_norm"), f"{block}.0.layer_norm")
                attention((*layer, "self_attention"), f"{block}.0.SelfAttention")
                norm((*layer, "pre_cross_attention_layer_norm"), f"{block}.1.layer_norm")
                attention((*layer, "encoder_decoder_attention"), f"{block}.1.EncDecAttention")
                norm((*layer, "pre_mlp_layer_norm"), f"{block}.2.layer_norm")
                mlp((*layer, "mlp"), f"{block}.2.DenseReluDense")
        norm((stack, f"{stack}_norm"), f"{stack}.final_layer_norm")
    if not cfg.tie_embeddings:
        table.append(Entry(("lm_head", "kernel"), (d, v), "lm_head.weight", True))
    return table


# ---------------------------------------------------------------------------------------------
# Trees: nested dicts keyed like ``nnx.to_pure_dict`` (layer indices are ints).
# ---------------------------------------------------------------------------------------------

def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """{path: leaf} -> nested dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def flatten(tree: Mapping[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {path: leaf}; string digits become ints, as layer indices are."""
    flat = {}
    for key, value in tree.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def path_name(path: Path) -> str:
    return ".".join(str(k) for k in path)


def _fail(what: str, missing=(), misshaped=(), unknown=(), hint: str = "") -> None:
    parts = []
    for label, names in (("missing", missing), ("mis-shaped", misshaped), ("unknown", unknown)):
        names = list(names)
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            parts.append(f"{len(names)} {label}: {shown}")
    if parts:
        raise ConversionError(f"{what}: {'; '.join(parts)}{hint}")


def check_params(params: Mapping[str, Any], cfg: T5Config, what: str = "parameters") -> None:
    """Raise :class:`ConversionError` unless ``params`` has exactly the tree of ``T5(cfg)``."""
    flat = flatten(params)
    table = {e.path: e for e in param_table(cfg)}
    _fail(what,
          missing=[path_name(p) for p in table if p not in flat],
          misshaped=[f"{path_name(p)} {tuple(np.shape(flat[p]))} (want {table[p].shape})"
                     for p in table if p in flat and tuple(np.shape(flat[p])) != table[p].shape],
          unknown=[path_name(p) for p in flat if p not in table])


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and state dicts.
# ---------------------------------------------------------------------------------------------

HF_MODEL_TYPES = ("t5", "mt5", "umt5")
# Hugging Face feed_forward_proj -> mtjax mlp_activation. HF's "gated-gelu" is the tanh GELU
# ("gelu_new"), as mtjax's; its plain "gelu" is the exact one, which mtjax does not have.
_HF_ACTIVATIONS = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu"}

# Names Hugging Face checkpoints may hold that carry nothing of their own.
_HF_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old T5 1.0 files carry an unused cross-attention bias table; transformers ignores it too.
_HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def hf_config_to_t5(hf: Mapping[str, Any]) -> T5Config:
    """The :class:`T5Config` of a Hugging Face ``config.json`` (T5, mT5, ByT5, UMT5).

    Missing keys take transformers' defaults. Raises :class:`ConversionError` for other model
    types or activations mtjax does not implement.
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in HF_MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {model_type!r} is not one of "
                              f"{HF_MODEL_TYPES}; mtjax converts T5-family encoder-decoders")
    if hf.get("is_encoder_decoder") is False:
        raise ConversionError("config.json: an encoder-only model; mtjax needs the decoder too")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _HF_ACTIVATIONS:
        raise ConversionError(f"config.json: feed_forward_proj {proj!r} is not supported; "
                              f"mtjax implements {sorted(_HF_ACTIVATIONS)}")
    num_layers = int(hf.get("num_layers", 6))
    try:
        return T5Config(
            vocab_size=int(hf.get("vocab_size", 32128)), d_model=int(hf.get("d_model", 512)),
            d_ff=int(hf.get("d_ff", 2048)), num_heads=int(hf.get("num_heads", 8)),
            d_kv=int(hf.get("d_kv", 64)), num_encoder_layers=num_layers,
            num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            mlp_activation=_HF_ACTIVATIONS[proj],
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            per_layer_relative_bias=model_type == "umt5",
            dropout_rate=float(hf.get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def t5_to_hf_config(cfg: T5Config, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``cfg`` (transformers 4.x reads it exactly).

    Args:
        cfg: the model.
        model_type: "t5" or "mt5" (same network); forced to "umt5" for per-layer biases.
    """
    model_type = "umt5" if cfg.per_layer_relative_bias else (model_type or "t5")
    architecture = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[model_type]
    proj = {v: k for k, v in _HF_ACTIVATIONS.items()}[cfg.mlp_activation]
    act = proj.removeprefix("gated-")
    return {
        "architectures": [f"{architecture}ForConditionalGeneration"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
        "d_kv": cfg.d_kv, "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": proj,
        "dense_act_fn": "gelu_new" if act == "gelu" else act,
        "is_gated_act": cfg.is_gated,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5.x forces tie_word_embeddings=True and reads the output rescaling from
        # this key; 5.0 rescales untied models without it (4.x ignores it).
        "scale_decoder_outputs": cfg.tie_embeddings,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_factor": 1.0, "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }


def _architecture(cfg: T5Config, with_vocab: bool) -> tuple:
    skip = {"dropout_rate", "dtype", "param_dtype", "remat", "scan_layers", "attention"}
    if not with_vocab:
        skip.add("vocab_size")
    return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip)


def match_named_size(cfg: T5Config) -> str | None:
    """The name in ``MODEL_SIZES`` with ``cfg``'s architecture, or None.

    An exact match (vocabulary included) wins; else the first with the same network apart from
    the vocabulary size, which ``mtjax train`` takes from the data anyway.
    """
    for with_vocab in (True, False):
        arch = _architecture(cfg, with_vocab)
        for name, named in MODEL_SIZES.items():
            if _architecture(named, with_vocab) == arch:
                return name
    return None


def _as_float32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def hf_to_params(tensors: Mapping[str, Any], cfg: T5Config) -> dict[str, Any]:
    """A Hugging Face state dict -> the mtjax parameter tree (float32 numpy).

    Raises :class:`ConversionError` listing missing, mis-shaped and unknown tensor names.
    """
    tensors = dict(tensors)
    copies = [n for n in _HF_EMBEDDING_COPIES if n in tensors]
    if "shared.weight" not in tensors and copies:
        tensors["shared.weight"] = tensors[copies[0]]
    table = param_table(cfg)
    known = {e.hf_name for e in table} | set(_HF_EMBEDDING_COPIES) | set(_HF_IGNORED)
    if cfg.tie_embeddings:
        known.add("lm_head.weight")
    _fail("Hugging Face checkpoint does not match its config.json",
          missing=[e.hf_name for e in table if e.hf_name not in tensors],
          misshaped=[f"{e.hf_name} {tuple(np.shape(tensors[e.hf_name]))} (want {e.hf_shape})"
                     for e in table
                     if e.hf_name in tensors and tuple(np.shape(tensors[e.hf_name])) != e.hf_shape],
          unknown=sorted(n for n in tensors if n not in known))
    # Copies of the embedding must be copies: otherwise the file is not the model it claims.
    shared = _as_float32(tensors["shared.weight"])
    for name in copies + (["lm_head.weight"] if cfg.tie_embeddings and
                          "lm_head.weight" in tensors else []):
        if np.shape(tensors[name]) != shared.shape or not np.array_equal(
                _as_float32(tensors[name]), shared):
            raise ConversionError(
                f"{name} differs from shared.weight, but the model reads only shared.weight"
                + (" (tie_word_embeddings is true in config.json)" if name == "lm_head.weight"
                   else ""))
    flat = {}
    for e in table:
        x = shared if e.hf_name == "shared.weight" else _as_float32(tensors[e.hf_name])
        flat[e.path] = np.ascontiguousarray(x.T) if e.transpose else x
    return unflatten(flat)


def params_to_hf(params: Mapping[str, Any], cfg: T5Config) -> dict[str, np.ndarray]:
    """The mtjax parameter tree -> a Hugging Face state dict, with the names and only the names
    ``save_pretrained`` writes (no embedding copies; ``lm_head.weight`` only when untied)."""
    check_params(params, cfg)
    flat = flatten(params)
    out = {}
    for e in param_table(cfg):
        x = np.asarray(flat[e.path])
        out[e.hf_name] = np.ascontiguousarray(x.T) if e.transpose else x
    return out


# ---------------------------------------------------------------------------------------------
# T5X: flattened parameter trees named like ``encoder/layers_0/attention/query/kernel``.
# ---------------------------------------------------------------------------------------------

_T5X_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")
_T5X_SCANNED = re.compile(r"^(encoder|decoder)/(encoder|decoder)/(.+)$")
_T5X_PLAIN = {
    "token_embedder/embedding": ("token_embedder", "embedding"),
    "encoder/relpos_bias/rel_embedding": ("encoder", "relpos_bias", "rel_embedding"),
    "decoder/relpos_bias/rel_embedding": ("decoder", "relpos_bias", "rel_embedding"),
    "encoder/encoder_norm/scale": ("encoder", "encoder_norm", "scale"),
    "decoder/decoder_norm/scale": ("decoder", "decoder_norm", "scale"),
    "decoder/logits_dense/kernel": ("lm_head", "kernel"),
}
_ATTENTIONS = ("attention", "self_attention", "encoder_decoder_attention")


def _t5x_layer_leaf(rest: str, x: np.ndarray) -> tuple[Path, np.ndarray]:
    """A layer's sub-path (``attention/out/kernel``) -> mtjax sub-path, kernel made 2-D.

    T5X stores attention kernels [D, H*K] / [H*K, D]; flaxformer may keep [D, H, K] / [H, K, D].
    """
    parts = tuple(rest.split("/"))
    if parts[0] in _ATTENTIONS and parts[-1] == "kernel" and x.ndim == 3:
        x = x.reshape(-1, x.shape[-1]) if parts[1] == "out" else x.reshape(x.shape[0], -1)
    return parts, x


def t5x_to_params(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened T5X parameter tree -> the mtjax parameter tree (float32 numpy), by name.

    Accepts names with or without a leading ``target/`` and both layer layouts: unrolled
    (``encoder/layers_3/...``) and scanned (``encoder/encoder/...`` with the layer axis at
    position 1, as flaxformer writes it). Validate the result with :func:`infer_config` and
    :func:`check_params`.
    """
    flat: dict[Path, np.ndarray] = {}
    unknown = []
    for name, value in tensors.items():
        name = name.removeprefix("target/")
        x = _as_float32(value)
        if name in _T5X_PLAIN:
            flat[_T5X_PLAIN[name]] = x
        elif m := _T5X_LAYER.match(name):
            stack, i, rest = m.group(1), int(m.group(2)), m.group(3)
            sub, x = _t5x_layer_leaf(rest, x)
            flat[(stack, "layers", i, *sub)] = x
        elif (m := _T5X_SCANNED.match(name)) and m.group(1) == m.group(2) and x.ndim >= 2:
            stack, rest = m.group(1), m.group(3)
            for i in range(x.shape[1]):
                sub, layer_x = _t5x_layer_leaf(rest, np.take(x, i, axis=1))
                flat[(stack, "layers", i, *sub)] = layer_x
        else:
            unknown.append(name)
    _fail("T5X checkpoint", unknown=sorted(unknown),
          hint=". Expected a T5 encoder-decoder tree like t5x/examples/t5/network.py's")
    return unflatten(flat)


def infer_config(params: Mapping[str, Any], *, mlp_activation: str | None = None,
                 **overrides: Any) -> T5Config:
    """The :class:`T5Config` that ``params`` (an mtjax tree) has, read off the shapes.

    What shapes cannot tell takes T5's values unless overridden: a gated MLP is GELU, relative
    attention max distance 128, layer norm epsilon 1e-6.
    """
    flat = flatten(params)

    def shape(*path) -> tuple[int, ...] | None:
        return tuple(np.shape(flat[path])) if path in flat else None

    def layers(stack: str) -> int:
        return len({p[2] for p in flat if p[:2] == (stack, "layers")})

    embedding = shape("token_embedder", "embedding")
    relpos = (shape("encoder", "relpos_bias", "rel_embedding")
              or shape("encoder", "layers", 0, "relpos_bias", "rel_embedding"))
    query = shape("encoder", "layers", 0, "attention", "query", "kernel")
    gated = ("encoder", "layers", 0, "mlp", "wi_0", "kernel") in flat
    wi = shape("encoder", "layers", 0, "mlp", "wi_0" if gated else "wi", "kernel")
    if not (embedding and relpos and query and wi and layers("encoder") and layers("decoder")):
        missing = [n for n, s in (("token_embedder.embedding", embedding),
                                  ("encoder relative position bias", relpos),
                                  ("encoder.layers.0.attention.query.kernel", query),
                                  ("encoder.layers.0.mlp.wi(_0).kernel", wi)) if not s]
        _fail("cannot tell the model's shape", missing=missing or ["encoder/decoder layers"])
    values = dict(
        vocab_size=embedding[0], d_model=embedding[1], d_ff=wi[1], num_heads=relpos[0],
        d_kv=query[1] // relpos[0], num_encoder_layers=layers("encoder"),
        num_decoder_layers=layers("decoder"), relative_attention_num_buckets=relpos[1],
        mlp_activation=mlp_activation or ("gated-gelu" if gated else "relu"),
        tie_embeddings=("lm_head", "kernel") not in flat,
        per_layer_relative_bias=("encoder", "relpos_bias", "rel_embedding") not in flat,
    )
    values.update(overrides)
    try:
        return T5Config(**values)
    except ValueError as e:
        raise ConversionError(f"inferred model config: {e}") from None
