"""T5 model configurations: the config dataclass, published sizes, parameter and FLOP counts.

Nothing here allocates arrays; counts are computed from the config alone so that the CLI can print
them for an 11B model on a laptop.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib

from mtjax.errors import UserError

MLP_ACTIVATIONS = ("gated-gelu", "relu", "gated-silu")
REMAT_POLICIES = ("none", "dots_saveable", "full")
ATTENTION_KINDS = ("auto", "xla", "dot_product", "cpu_fused")
WEIGHT_GRADS = ("auto", "xla", "transposed")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder-decoder.

    Attributes:
        vocab_size: rows of the token embedding (and columns of the output layer).
        d_model: width of the residual stream (D).
        d_ff: width of the MLP hidden layer (F).
        num_heads: attention heads (H).
        d_kv: width of one head (K); H * K need not equal D.
        num_encoder_layers: encoder blocks.
        num_decoder_layers: decoder blocks.
        relative_attention_num_buckets: buckets of the relative position bias.
        relative_attention_max_distance: distance beyond which all positions share a bucket.
        mlp_activation: "gated-gelu" (T5 1.1, mT5, ByT5), "relu" (T5 1.0) or "gated-silu".
        tie_embeddings: T5 1.0 style output layer: the token embedding, transposed, applied to the
            decoder output scaled by d_model**-0.5.
        per_layer_relative_bias: UMT5 style: every self-attention layer owns its bias table.
        dropout_rate: dropout at the places Hugging Face T5 puts it.
        layer_norm_epsilon: epsilon of the RMS norm.
        dtype: activation and matmul dtype ("float32" or "bfloat16"); softmax and logits are
            always float32.
        param_dtype: storage dtype of the parameters.
        remat: per-layer rematerialisation: "none", "dots_saveable" (keep matmul outputs) or
            "full" (keep only the layer inputs).
        scan_layers: run each stack's layers as one ``jax.lax.scan`` over their parameters,
            stacked inside the forward pass (the parameter tree keeps one entry per layer), so
            compile time does not grow with depth.
        attention: "xla" (mtjax's einsum and float32 softmax), "dot_product"
            (``jax.nn.dot_product_attention``: cuDNN flash attention on GPU where supported,
            else JAX's XLA implementation; same numbers), "cpu_fused" (mtjax's fused attention
            kernel for x86-64 CPUs with AVX-512 or AVX2, float32; ``mtjax.kernels``) or
            "auto" ("dot_product" on GPU with bfloat16 activations, "cpu_fused" where it can
            run, else "xla").
        weight_grad: how the backward pass forms each dense layer's kernel gradient: "xla"
            (plain autodiff), "transposed" (the activations' transpose copied out first, so the
            CPU's matmul library takes it; ``layers.matmul``) or "auto" ("transposed" on CPU,
            else "xla"). Same numbers either way.
    """

    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    mlp_activation: str = "gated-gelu"
    tie_embeddings: bool = False
    per_layer_relative_bias: bool = False
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "xla"
    weight_grad: str = "xla"

    def __post_init__(self):
        # Fail at config time, with the field's name, rather than deep inside tracing.
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"mlp_activation: {self.mlp_activation!r} is not one of {MLP_ACTIVATIONS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: {self.attention!r} is not one of {ATTENTION_KINDS}")
        if self.weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"weight_grad: {self.weight_grad!r} is not one of {WEIGHT_GRADS}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}: {getattr(self, field)!r} is not one of {DTYPES}")
        for field in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv",
                      "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate: must be in [0, 1), got {self.dropout_rate}")

    @property
    def is_gated(self) -> bool:
        return self.mlp_activation.startswith("gated-")


# Published shapes (D, F, H, K, encoder layers, decoder layers), from the T5, mT5 and ByT5 papers
# and the t5x gin files / Hugging Face configs of the released checkpoints.
_T5_1_0 = {
    "small": (512, 2048, 8, 64, 6, 6),
    "base": (768, 3072, 12, 64, 12, 12),
    "large": (1024, 4096, 16, 64, 24, 24),
    "3b": (1024, 16384, 32, 128, 24, 24),
    "11b": (1024, 65536, 128, 128, 24, 24),
}
# T5 1.1 and mT5 share shapes; only the vocabulary differs.
_T5_1_1 = {
    "small": (512, 1024, 6, 64, 8, 8),
    "base": (768, 2048, 12, 64, 12, 12),
    "large": (1024, 2816, 16, 64, 24, 24),
    "xl": (2048, 5120, 32, 64, 24, 24),
    "xxl": (4096, 10240, 64, 64, 24, 24),
}
# ByT5: wider, and the encoder three times deeper than the decoder.
_BYT5 = {
    "small": (1472, 3584, 6, 64, 12, 4),
    "base": (1536, 3968, 12, 64, 18, 6),
    "large": (1536, 3840, 16, 64, 36, 12),
    "xl": (2560, 6720, 32, 64, 36, 12),
    "xxl": (4672, 12352, 64, 64, 36, 12),
}


def _sizes(prefix: str, table: dict, vocab_size: int, **kwargs) -> dict[str, T5Config]:
    return {
        f"{prefix}_{size}": T5Config(
            vocab_size=vocab_size, d_model=d, d_ff=f, num_heads=h, d_kv=k,
            num_encoder_layers=enc, num_decoder_layers=dec, **kwargs,
        )
        for size, (d, f, h, k, enc, dec) in table.items()
    }


MODEL_SIZES: dict[str, T5Config] = {
    **_sizes("t5_1_0", _T5_1_0, 32128, mlp_activation="relu", tie_embeddings=True),
    **_sizes("t5_1_1", _T5_1_1, 32128),
    **_sizes("mt5", _T5_1_1, 250112),
    **_sizes("byt5", _BYT5, 384),
    # UMT5 (released small, base, xl, xxl): mT5 shapes, a bias table per layer, 256,384 rows.
    **_sizes("umt5", {k: v for k, v in _T5_1_1.items() if k != "large"}, 256384,
             per_layer_relative_bias=True),
    # The `mtjax train` default: a few million parameters, trains on a CPU.
    "t5_1_1_tiny": T5Config(
        vocab_size=32128, d_model=256, d_ff=512, num_heads=4, d_kv=64,
        num_encoder_layers=3, num_decoder_layers=3,
    ),
    # The peer-comparison shape of `mtjax bench train` (benchmarks/README.md): T5 1.1 style,
    # 512 wide, gated GELU 1024, 8 heads x 64, 6+6 layers; what the peers' figures were taken at.
    "t5_1_1_peer": T5Config(
        vocab_size=32128, d_model=512, d_ff=1024, num_heads=8, d_kv=64,
        num_encoder_layers=6, num_decoder_layers=6,
    ),
    # Unit tests: compiles in seconds.
    "t5_1_1_test": T5Config(
        vocab_size=32128, d_model=32, d_ff=64, num_heads=2, d_kv=16,
        num_encoder_layers=2, num_decoder_layers=2,
    ),
}


class UnknownModelError(UserError, KeyError):
    """A model name that is not in MODEL_SIZES."""

    def __str__(self) -> str:
        # KeyError's str() shows the repr of its argument; show the sentence instead.
        return str(self.args[0]) if self.args else ""


# model.name of a converted checkpoint whose architecture has no name here: the architecture is
# its run directory's model_config.json, which `mtjax train` passes to use_custom.
CUSTOM = "custom"
MODEL_CONFIG_FILE = "model_config.json"
_custom: T5Config | None = None


def read_architecture(path: pathlib.Path) -> T5Config:
    """The architecture a converter wrote to ``model_config.json``: {"t5_config": {...}}."""
    return T5Config(**json.loads(path.read_text())["t5_config"])


def use_custom(cfg: T5Config) -> None:
    """What ``get_config(CUSTOM)`` returns from now on in this process."""
    global _custom
    _custom = cfg


def get_config(name: str) -> T5Config:
    """The published config called ``name`` (or the architecture :func:`use_custom` gave).

    Args:
        name: a key of ``MODEL_SIZES``, e.g. ``"t5_1_1_base"``, or ``"custom"``.

    Returns:
        The config.

    Raises:
        UnknownModelError: ``name`` is unknown; the message names the closest valid names.
    """
    if name in MODEL_SIZES:
        return MODEL_SIZES[name]
    if name == CUSTOM:
        if _custom is not None:
            return _custom
        raise UnknownModelError(
            "model.name=custom is the architecture of a converted checkpoint (its "
            "model_config.json): train it with --init-from that checkpoint, or resume the run "
            "that did")
    if name.lower() in MODEL_SIZES:  # T5_1_1_BASE: the names are lower case
        close = [name.lower()]
    else:
        close = difflib.get_close_matches(name, MODEL_SIZES, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {sorted(MODEL_SIZES)}"
    raise UnknownModelError(f"model: unknown model size {name!r}; {hint}")


def _attention_params(cfg: T5Config) -> int:
    return 4 * cfg.d_model * cfg.num_heads * cfg.d_kv  # query, key, value, out


def _mlp_params(cfg: T5Config) -> int:
    return (3 if cfg.is_gated else 2) * cfg.d_model * cfg.d_ff


def count_params(cfg: T5Config) -> int:
    """Number of parameters of ``T5(cfg)``, computed without building it."""
    d = cfg.d_model
    relpos = cfg.relative_attention_num_buckets * cfg.num_heads
    encoder_layer = _attention_params(cfg) + _mlp_params(cfg) + 2 * d
    decoder_layer = 2 * _attention_params(cfg) + _mlp_params(cfg) + 3 * d
    if cfg.per_layer_relative_bias:
        encoder_layer += relpos
        decoder_layer += relpos
        stack_relpos = 0
    else:
        stack_relpos = relpos
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    encoder = cfg.num_encoder_layers * encoder_layer + d + stack_relpos
    decoder = cfg.num_decoder_layers * decoder_layer + d + stack_relpos
    return embedding + encoder + decoder + lm_head


def train_flops_per_step(
    cfg: T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> float:
    """Matmul FLOPs of one training step (forward + backward) at the given batch shape.

    Each matmul [m, k] x [k, n] counts 2*m*n*k; the backward pass counts twice the forward.
    With S = inputs_length, T = targets_length, D = d_model, F = d_ff, A = num_heads * d_kv,
    V = vocab_size, g = 3 for gated MLPs and 2 otherwise::

        encoder, per layer and input token:   2*4*D*A (q, k, v, o) + 2*2*S*A (scores, values)
                                              + 2*g*D*F
        decoder, per layer and target token:  2*4*D*A + 2*2*T*A (self attention)
                                              + 2*2*D*A + 2*2*S*A (cross attention q, o, scores,
                                              values) + 2*g*D*F
        decoder, per layer and input token:   2*2*D*A (cross attention k, v of encoder output)
        output layer, per target token:       2*D*V
        flops = 3 * batch_size * (S * encoder + T * decoder + ...)

    The token embedding is a gather and counts 0. Causal self-attention counts the full T x T
    square, as it is computed. Norms, softmax and activations are not matmuls and are left out.
    """
    s, t = inputs_length, targets_length
    d, a, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    mlp = 2 * (3 if cfg.is_gated else 2) * d * cfg.d_ff
    encoder_per_token = 2 * 4 * d * a + 2 * 2 * s * a + mlp
    decoder_per_token = 2 * 4 * d * a + 2 * 2 * t * a + 2 * 2 * d * a + 2 * 2 * s * a + mlp
    cross_kv_per_input_token = 2 * 2 * d * a
    forward_per_example = (
        cfg.num_encoder_layers * s * encoder_per_token
        + cfg.num_decoder_layers * (t * decoder_per_token + s * cross_kv_per_input_token)
        + t * 2 * d * v
    )
    return 3.0 * batch_size * forward_per_example
