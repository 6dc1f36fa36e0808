"""What every peer script shares: mtjax's named sizes (loaded by path, no JAX), the command line,
the synthetic batch and the JSON result with the fields of ``mtjax bench train``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import types
from typing import Any

_PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mtjax"


def missing_packages(script: str, error: ImportError, needs: str) -> None:
    """One line and exit 2 where a peer runs under an interpreter without its packages (mtjax's
    own, say), instead of a traceback."""
    print(f"{pathlib.Path(script).name}: error: {error}; run it with an interpreter that has "
          f"{needs} (benchmarks/README.md, Peers)", file=sys.stderr)
    sys.exit(2)


def load_sizes():
    """mtjax's sizes module without running the mtjax package inits (which import JAX)."""
    # A bare package object: `from mtjax.errors import ...` in sizes.py resolves from the
    # source tree, and mtjax/__init__.py / mtjax/model/__init__.py never run.
    package = types.ModuleType("mtjax")
    package.__path__ = [str(_PACKAGE)]
    sys.modules.setdefault("mtjax", package)
    spec = importlib.util.spec_from_file_location("mtjax_sizes", _PACKAGE / "model" / "sizes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def hf_config_kwargs(cfg) -> dict[str, Any]:
    """``transformers.T5Config`` arguments with mtjax's shape (T5 1.1: gated GELU, untied)."""
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv,
        num_heads=cfg.num_heads, num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu" if cfg.is_gated else "relu",
        tie_word_embeddings=cfg.tie_embeddings, dropout_rate=0.0,
        layer_norm_epsilon=cfg.layer_norm_epsilon, decoder_start_token_id=0, pad_token_id=0,
        use_cache=False)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every peer takes (the shape defaults are `mtjax bench train`'s)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="t5_1_1_peer", help="an mtjax named size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--inputs-length", type=int, default=512)
    p.add_argument("--targets-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--microbatches", type=int, default=1,
                   help="accumulate the gradient over this many equal slices of the batch "
                        "(like mtjax's train.microbatches)")
    p.add_argument("--output", default=None)
    return p


def check_microbatches(args: argparse.Namespace) -> None:
    """Exit with a message unless ``--microbatches`` divides ``--batch-size``."""
    if args.microbatches < 1 or args.batch_size % args.microbatches:
        raise SystemExit(f"--microbatches {args.microbatches} must divide --batch-size "
                         f"{args.batch_size}")


def result(args: argparse.Namespace, *, peer: str, sizes, cfg, num_params: int,
           seconds: list[float], compile_s: float | None, first_step_s: float | None,
           peak: tuple[float, str], loss: float, device_peak_memory_bytes: int | None,
           environment: dict[str, Any]) -> dict[str, Any]:
    """The JSON object, with the field names of ``mtjax bench train``."""
    b, s, t = args.batch_size, args.inputs_length, args.targets_length
    median = statistics.median(seconds)
    flops = sizes.train_flops_per_step(cfg, b, s, t)
    peak_flops, source = peak
    return {
        "benchmark": "train", "peer": peer,
        "model": args.model, "num_params": num_params,
        "batch_size": b, "inputs_length": s, "targets_length": t, "dtype": args.dtype,
        "optimizer": "adamw", "microbatches": args.microbatches,
        "compile_s": compile_s, "first_step_s": first_step_s,
        "steps": args.steps, "warmup": args.warmup,
        "step_s": {"median": median, "min": min(seconds), "max": max(seconds)},
        "step_s_median": median, "tokens_per_step": b * (s + t),
        "tokens_per_s": b * (s + t) / median, "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / median, "peak_flops_per_s": peak_flops,
        "peak_source": source, "mfu": flops / median / peak_flops, "loss": loss,
        "host_peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_memory_bytes": device_peak_memory_bytes,
        "environment": {"python": platform.python_version(),
                        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **environment},
    }


def emit(result_dict: dict[str, Any], output: str | None) -> None:
    """Print the JSON on stdout and optionally write it to ``output``."""
    text = json.dumps(result_dict, indent=2)
    print(text)
    if output:
        pathlib.Path(output).write_text(text + "\n")
