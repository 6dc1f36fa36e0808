"""``mtjax bench train``: the compiled train step alone, on synthetic full-length batches.

No input pipeline, no checkpointing, no metric fetching between steps: what is timed is the step
the trainer compiles (same model, optimizer, shardings and donation), so changes to the model or
step show up here undiluted. Nothing imports seqio or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from mtjax import config as config_lib
from mtjax import kernels
from mtjax.bench import peak as peak_lib
from mtjax.bench import report
from mtjax.model import layers, sizes
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import profiling
from mtjax.train import setup as setup_lib


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Command-line options shared by every benchmark."""

    steps: int = 10  # timed steps; the median is reported
    warmup: int = 2  # untimed steps after compilation (allocator and cache warm-up)
    peak_flops: float | None = None  # overrides the table / measured peak for MFU
    matmul_size: int = 2048  # side of the CPU peak matmul
    smoke: bool = False  # --smoke: tiny shapes everywhere (CI)
    profile_dir: str | None = None  # --profile: trace steps after the timed ones into it
    profile_steps: int = 0


def synthetic_batch(batch_size: int, inputs_length: int, targets_length: int,
                    vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch with every position filled (one segment per row, no padding).

    Full length is the worst case a packed batch approaches, and keeps tokens/s comparable with
    peers that run unpacked full-length sequences.
    """
    rng = np.random.default_rng(seed % 2**64)  # (numpy takes no negative seed)

    def tokens(length: int) -> np.ndarray:
        return rng.integers(1, vocab_size, (batch_size, length), dtype=np.int32)

    def positions(length: int) -> np.ndarray:
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()

    ones_S = np.ones((batch_size, inputs_length), np.int32)
    ones_T = np.ones((batch_size, targets_length), np.int32)
    targets_BT = tokens(targets_length)
    # Teacher forcing: the decoder sees the targets shifted right, starting from token 0.
    decoder_inputs_BT = np.concatenate(
        [np.zeros((batch_size, 1), np.int32), targets_BT[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": tokens(inputs_length),
        "encoder_segment_ids": ones_S,
        "encoder_positions": positions(inputs_length),
        "decoder_target_tokens": targets_BT,
        "decoder_input_tokens": decoder_inputs_BT,
        "decoder_loss_weights": ones_T.copy(),
        "decoder_segment_ids": ones_T.copy(),
        "decoder_positions": positions(targets_length),
        "decoder_task_ids": ones_T.copy(),  # task id 1: the single synthetic task
    }


def _timed_steps(compiled, state, batch, count: int):
    """Run ``count + 2`` steps as the trainer does; returns (state, seconds of ``count`` steps,
    last metrics).

    Each step is dispatched before the previous one is waited for (the trainer fetches a step's
    metrics one step late), so the host's dispatch of step n+1 overlaps the device's work on
    step n; a step's time is the interval between the completions of consecutive steps.
    Blocking after every step instead adds the dispatch latency to each step: on an H200, the
    t5_1_1_base step timed that way (97 ms) kept the device busy for only 84 ms of it.
    """
    state, first = compiled(state, batch)
    jax.block_until_ready(first)
    last = time.perf_counter()
    state, pending = compiled(state, batch)
    seconds = []
    for _ in range(count):
        state, queued = compiled(state, batch)
        jax.block_until_ready(pending)
        now = time.perf_counter()
        seconds.append(now - last)
        last, pending = now, queued
    jax.block_until_ready((state, pending))
    return state, seconds, pending


def _traced_steps(compiled, state, batch, base: pathlib.Path, count: int):
    """``count`` more steps, dispatched as in training, traced into ``base`` (untimed: the
    profiler's own cost stays out of the figures)."""
    profiler = profiling.StepProfiler(base, skip=0, steps=count,
                                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for step in range(1, count + 1):
        with profiler.step(step):
            state, metrics = compiled(state, batch)
        profiler.stepped((state, metrics))
    return state


def run(config: config_lib.Config, options: BenchOptions) -> dict[str, Any]:
    """Compile and time the train step of ``config``.

    Args:
        config: the resolved config (model, batch, lengths, optimizer, mesh, remat, dtype).
        options: steps, warm-up and peak settings.

    Returns:
        A JSON-ready dict: compile seconds, step time statistics, tokens/s, model FLOPs,
        achieved FLOP/s, MFU and its peak, memory, environment and the resolved config.
    """
    vocab_size = sizes.get_config(config.model.name).vocab_size
    cfg = setup_lib.model_config(config, vocab_size)
    b, s, t = config.train.batch_size, config.data.inputs_length, config.data.targets_length

    # The schedule's length only shapes the learning rate, not the cost of a step.
    setup = setup_lib.build(config, vocab_size=vocab_size, num_tasks=1,
                            total_steps=max(options.warmup + options.steps, 1))
    mesh, rules, batch_sharding = setup.mesh, setup.rules, setup.batch_sharding
    abstract_state, jitted = setup.abstract_state, setup.step

    host_batch = synthetic_batch(b // jax.process_count(), s, t, vocab_size, config.train.seed)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
             for k, v in host_batch.items()}

    with mesh_lib.activate(mesh, rules):
        # Ahead-of-time: lower and compile on shapes alone, so the time is compilation only.
        start = time.perf_counter()
        lowered = jitted.lower(abstract_state, batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        state = setup.init_state(config.train.seed)
        for _ in range(options.warmup):
            state, _ = compiled(state, batch)
        counters = report.kernel_counters()
        state, seconds, metrics = _timed_steps(compiled, state, batch, options.steps)
        # _timed_steps executes steps + 2 steps between the two readings.
        host_kernel = report.kernel_cost_per_step(counters, report.kernel_counters(),
                                                  options.steps + 2)
        if options.profile_dir is not None:
            state = _traced_steps(compiled, state, batch, pathlib.Path(options.profile_dir),
                                  options.profile_steps)
    loss = float(jax.device_get(metrics["loss_sum"]) / jax.device_get(metrics["weight_sum"]))
    del state

    env = report.environment()
    step_s = report.timing_stats(seconds)
    tokens_per_step = b * (s + t)
    flops = sizes.train_flops_per_step(cfg, b, s, t)
    achieved = flops / step_s["median"]
    peak, peak_source = peak_lib.resolve_peak(
        env["device_kind"], env["platform"], config.model.dtype, options.peak_flops,
        options.matmul_size)
    peak_total = peak * peak_lib.peak_units(env["platform"])
    note = peak_lib.above_peak_note(achieved, peak_total, peak_source)
    if note:
        print(note, file=sys.stderr, flush=True)
    attention_kernel, cross_entropy_kernel = setup.attention_kernel, setup.cross_entropy_kernel
    uses_cpu_kernels = "cpu_fused" in (attention_kernel, cross_entropy_kernel)
    return {
        "benchmark": "train",
        "model": config.model.name,
        # The mesh the step ran on, resolved (data=-1 -> the device count left), with its rules.
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "mesh_rules": config.mesh.rules,
        "num_params": sizes.count_params(cfg),
        "batch_size": b, "inputs_length": s, "targets_length": t,
        "dtype": config.model.dtype, "optimizer": config.optim.name,
        "microbatches": config.train.microbatches, "remat": config.model.remat,
        "scan_layers": config.model.scan_layers, "attention": config.model.attention,
        "attention_kernel": attention_kernel,
        "cross_entropy": config.train.cross_entropy,
        "cross_entropy_kernel": cross_entropy_kernel,
        # The instruction set mtjax's CPU kernels were built for, where the step runs them.
        "cpu_kernel_isa": kernels.cpu_kernel_isa()[0] if uses_cpu_kernels else None,
        "weight_grad": config.model.weight_grad,
        "weight_grad_layout": layers.resolve_weight_grad(config.model.weight_grad),
        "optimizer_state_dtype": config.optim.state_dtype,
        "lower_s": lower_s, "compile_s": compile_s,
        "steps": options.steps, "warmup": options.warmup,
        "step_s": step_s, "step_s_median": step_s["median"],
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_s["median"],
        "model_flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_total, "peak_source": peak_source,
        "mfu": achieved / peak_total,
        "loss": loss if math.isfinite(loss) else None,
        "host_peak_memory_bytes": report.host_peak_memory_bytes(),
        "host_kernel_per_step": host_kernel,
        "device_peak_memory_bytes": report.device_peak_memory_bytes(),
        "compiled_memory": report.compiled_memory(compiled),
        # --profile: where the trace of the steps after the timed ones is (None: no trace).
        "profile_dir": (None if options.profile_dir is None
                        else str(profiling.trace_dir(pathlib.Path(options.profile_dir)))),
        "environment": env,
        "config": config_lib.to_dict(config),
    }
