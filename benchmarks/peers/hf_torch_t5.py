"""Peer benchmark: Hugging Face ``transformers`` PyTorch T5 at the shape ``mtjax bench train`` uses.

Not part of the package or CI. Random init, AdamW, synthetic full-length batches; times the whole
training step (forward, backward, optimizer) and prints the same JSON fields as mtjax's bench.

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.13.0 'transformers>=4.57,<5' numpy
    /tmp/peers/bin/python benchmarks/peers/hf_torch_t5.py [--compile] [--model t5_1_1_small]

The model shape is read from mtjax/model/sizes.py (loaded by path: that file imports no JAX), so
both sides run the same named size; FLOPs use the same formula, so MFU is comparable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import resource
import statistics
import sys
import time
import types

import torch
import transformers

_PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mtjax"


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


def hf_config(cfg) -> transformers.T5Config:
    """The transformers T5Config with mtjax's shape (T5 1.1: gated GELU, untied output layer)."""
    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv,
        num_heads=cfg.num_heads, num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu" if cfg.is_gated else "relu",
        tie_word_embeddings=cfg.tie_embeddings, dropout_rate=0.0,
        layer_norm_epsilon=cfg.layer_norm_epsilon, decoder_start_token_id=0, pad_token_id=0,
        use_cache=False)


def measure_matmul_peak(dtype: torch.dtype, size: int = 2048, trials: int = 5,
                        repeats: int = 3) -> float:
    """Best FLOP/s of chained [size, size] matmuls: the same CPU peak mtjax measures."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype) / size**0.5
    best = float("inf")
    for trial in range(trials + 1):
        start = time.perf_counter()
        x = a
        for _ in range(repeats):
            x = x @ b
        elapsed = time.perf_counter() - start
        if trial:  # the first run warms up
            best = min(best, elapsed)
    return 2.0 * size**3 * repeats / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5_1_1_small", help="an mtjax named size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--inputs-length", type=int, default=512)
    parser.add_argument("--targets-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peak-flops", type=float, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    sizes = load_sizes()
    cfg = sizes.get_config(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config(cfg)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    b, s, t = args.batch_size, args.inputs_length, args.targets_length
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, cfg.vocab_size, (b, s), generator=gen).to(device)
    labels = torch.randint(1, cfg.vocab_size, (b, t), generator=gen).to(device)

    def step():
        # Autocast for bf16 mirrors mtjax: float32 parameters, bf16 activations and matmuls.
        with torch.autocast(device, dtype=dtype, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # mtjax clips at 1.0 too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if args.compile:
        step = torch.compile(step)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # torch.compile compiles lazily: the first call's time is the compile time (plus one step).
    start = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        seconds.append(time.perf_counter() - start)

    median = statistics.median(seconds)
    flops = sizes.train_flops_per_step(cfg, b, s, t)
    if args.peak_flops:
        peak, source = args.peak_flops, "override"
    else:
        peak, source = measure_matmul_peak(dtype), "measured_matmul"
    result = {
        "benchmark": "train", "peer": "hf_torch_t5" + ("_compiled" if args.compile else "_eager"),
        "model": args.model, "num_params": sum(p.numel() for p in model.parameters()),
        "batch_size": b, "inputs_length": s, "targets_length": t, "dtype": args.dtype,
        "optimizer": "adamw",
        "compile_s": first_step_s if args.compile else None, "first_step_s": first_step_s,
        "steps": args.steps, "warmup": args.warmup,
        "step_s": {"median": median, "min": min(seconds), "max": max(seconds)},
        "step_s_median": median, "tokens_per_step": b * (s + t),
        "tokens_per_s": b * (s + t) / median, "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / median, "peak_flops_per_s": peak, "peak_source": source,
        "mfu": flops / median / peak, "loss": float(loss),
        "host_peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_memory_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                     else None),
        "environment": {
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "python": platform.python_version(), "platform": device,
            "device_kind": (torch.cuda.get_device_name() if device == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
