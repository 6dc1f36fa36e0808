"""Peak FLOP/s to divide by for MFU: a published table for accelerators, a measurement on CPU.

MFU (model FLOPs utilisation) = model FLOPs per step / step time / peak FLOP/s. On GPUs and TPUs
the peak is the chip's published dense matmul rate; a CPU has no such agreed number, so the bench
measures the best rate of a large matmul of the same dtype in the same process.
"""

from __future__ import annotations

import functools
import time

# (lowercase substring of jax's device_kind, dense bf16 FLOP/s, dense f32 FLOP/s), first match
# wins, so specific names come before their prefixes ("tpu v5 lite" before "tpu v5").
# f32 on NVIDIA: jax's default matmul precision lets XLA use TF32 tensor cores, so the TF32 rate.
# f32 on TPU: default precision runs f32 matmuls as one bf16 pass, so the bf16 rate.
PEAK_TABLE: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 417.5e12),
    ("h100", 989e12, 494.7e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200 nvl", 835e12, 417.5e12),  # the PCIe card: "NVIDIA H200 NVL", not the SXM's rate
    ("h200", 989e12, 494.7e12),
    ("a100", 312e12, 156e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v5 lite", 197e12, 197e12),  # v5e's device_kind
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v6 lite", 918e12, 918e12),  # v6e (Trillium)'s device_kind
    ("tpu v6e", 918e12, 918e12),
)


def lookup_peak(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The published dense peak FLOP/s of a chip.

    Args:
        device_kind: ``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``.
        dtype: the matmul dtype, ``"bfloat16"`` or ``"float32"``.

    Returns:
        FLOP/s of one chip, or None when the chip is not in :data:`PEAK_TABLE`.
    """
    kind = device_kind.lower()
    for pattern, bf16, f32 in PEAK_TABLE:
        if pattern in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


@functools.cache
def measure_matmul_peak(dtype: str = "float32", size: int = 2048, trials: int = 5,
                        repeats: int = 3) -> float:
    """The best FLOP/s of ``repeats`` chained [size, size] matmuls on the default device.

    Timed two ways, keeping the faster: one compiled call per matmul, and the chain compiled as
    one program. XLA may fuse the chain into one library call, which is faster with JAX's default
    CPU settings but runs at a tenth of a single dot's rate with matmul-only YNNPACK fusion
    (``mtjax.xla_env``); separate calls cannot be fused.
    Cached per argument set, so several benchmarks in one process measure once.

    Args:
        dtype: ``"float32"`` or ``"bfloat16"``, as the model computes.
        size: matrix side; 2048 (17 GFLOP per matmul) saturates a CPU's cores.
        trials: timed runs; the best is kept, since noise (other processes) only slows down.
        repeats: matmuls per timed run, chained so none can be skipped.

    Returns:
        FLOP/s of the fastest trial.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype)) / size**0.5

    matmul = jax.jit(lambda x, w: x @ w)

    fused = jax.jit(lambda x, w: functools.reduce(lambda y, _: y @ w, range(repeats), x))

    def separate():
        x = a
        for _ in range(repeats):
            x = matmul(x, b)
        return x.block_until_ready()

    def one_program():
        return fused(a, b).block_until_ready()

    best_separate = _best_seconds(separate, trials)
    # The fused chain, when slow, is ten times slower: one trial says so (15 s saved per bench).
    best = min(best_separate, _best_seconds(one_program, trials, give_up_after=2 * best_separate))
    return 2.0 * size**3 * repeats / best


def _best_seconds(run, trials: int, give_up_after: float = float("inf")) -> float:
    """The fastest of ``trials`` timed calls of ``run`` after one untimed call; stops early
    once a call takes longer than ``give_up_after`` seconds."""
    run()  # compile and warm caches
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if best > give_up_after:
            break
    return best


def peak_units(platform: str) -> int:
    """How many peaks a step runs on: every chip of the job on a GPU/TPU, where a peak (table,
    ``--peak-flops`` or a one-chip matmul) is one chip's; every host on CPU, where the measured
    matmul already uses all of a host's cores and its "devices" share them."""
    import jax

    return jax.process_count() if platform == "cpu" else jax.device_count()


def resolve_peak(device_kind: str, platform: str, dtype: str, override: float | None = None,
                 matmul_size: int = 2048) -> tuple[float, str]:
    """The peak to use for MFU and where it came from.

    Order: 1. ``override`` (``--peak-flops``), 2. the table for a GPU/TPU, 3. a measured matmul
    (CPU, or an accelerator missing from the table).

    Returns:
        (FLOP/s, source) with source ``"override"``, ``"table"`` or ``"measured_matmul"``.
    """
    if override:
        return float(override), "override"
    if platform != "cpu":
        peak = lookup_peak(device_kind, dtype)
        if peak is not None:
            return peak, "table"
    return measure_matmul_peak(dtype, matmul_size), "measured_matmul"


def above_peak_note(achieved: float, peak_total: float, source: str) -> str | None:
    """A note where the step ran faster than the peak it is divided by (MFU above 100%, which
    no utilisation can be): a --peak-flops set too low, or a measured peak read in a slow
    moment; None otherwise."""
    if achieved <= peak_total:
        return None
    fix = ("check --peak-flops (one chip's dense FLOP/s at the model's dtype, e.g. 989e12)"
           if source == "override" else "the peak was read while the machine was busy: run "
           "the benchmark again, or give --peak-flops")
    return (f"mtjax: note: the step ran at {achieved / 1e12:.3g} TFLOP/s, above the peak it is "
            f"divided by ({peak_total / 1e12:.3g} TFLOP/s, {source}): MFU "
            f"{100 * achieved / peak_total:.0f}% is no utilisation; {fix}")
