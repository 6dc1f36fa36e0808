"""Peer benchmark: Hugging Face ``transformers`` PyTorch T5 at the shape ``mtjax bench train`` uses.

Not part of the package or CI. Random init, AdamW, synthetic full-length batches; times the whole
training step (forward, backward, optimizer) and prints the same JSON fields as mtjax's bench.

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.13.0 'transformers>=4.57,<5' numpy
    /tmp/peers/bin/python benchmarks/peers/hf_torch_t5.py [--compile] [--model t5_1_1_peer]

The model shape is read from mtjax/model/sizes.py (loaded by path: that file imports no JAX), so
both sides run the same named size; FLOPs use the same formula, so MFU is comparable.
"""

from __future__ import annotations

import platform
import sys
import time

import _common  # benchmarks/peers/_common.py (the script's folder is on sys.path)

try:
    import torch
    import transformers
except ImportError as e:  # run with mtjax's interpreter instead of the peer's venv
    _common.missing_packages(__file__, e, "torch and transformers")


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
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    args = parser.parse_args(argv)
    _common.check_microbatches(args)

    sizes = _common.load_sizes()
    cfg = sizes.get_config(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    config = transformers.T5Config(**_common.hf_config_kwargs(cfg))
    model = transformers.T5ForConditionalGeneration(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    b, s, t = args.batch_size, args.inputs_length, args.targets_length
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, cfg.vocab_size, (b, s), generator=gen).to(device)
    labels = torch.randint(1, cfg.vocab_size, (b, t), generator=gen).to(device)

    micro = b // args.microbatches

    def step():
        # Autocast for bf16 mirrors mtjax: float32 parameters, bf16 activations and matmuls.
        # Gradient accumulation: every slice has the same token count, so the mean of the
        # slices' mean losses is the full batch's mean loss.
        total = 0.0
        for start in range(0, b, micro):
            with torch.autocast(device, dtype=dtype, enabled=dtype == torch.bfloat16):
                loss = model(input_ids=input_ids[start:start + micro],
                             labels=labels[start:start + micro]).loss / args.microbatches
            loss.backward()
            total = total + loss.detach()
        loss = total
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

    peak = ((args.peak_flops, "override") if args.peak_flops
            else (measure_matmul_peak(dtype), "measured_matmul"))
    _common.emit(_common.result(
        args, peer="hf_torch_t5" + ("_compiled" if args.compile else "_eager"), sizes=sizes,
        cfg=cfg, num_params=sum(p.numel() for p in model.parameters()), seconds=seconds,
        compile_s=first_step_s if args.compile else None, first_step_s=first_step_s, peak=peak,
        loss=float(loss.detach()),
        device_peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
        environment={
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "platform": device,
            "device_kind": (torch.cuda.get_device_name() if device == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads()}), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
