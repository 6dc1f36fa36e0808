"""The GPU throughput sweep: `mtjax bench train` for T5 1.1 base and large, bf16, 512/114, over
the options that matter on an accelerator, in one process, against a deadline.

    python benchmarks/gpu/sweep.py --out-dir $OUT --deadline-s 330

Written for a short lease on a lent GPU (one call, a few minutes): every variant's result is
appended to ``sweep.jsonl`` the moment it exists, a variant that fails is recorded with its error
and the sweep goes on, and a variant whose expected time (its model's last compile plus its
steps) would pass the deadline is skipped and recorded as skipped. In order of priority: base
b128 with the default options, with the all-true masks left out of the attention bias (what
the dense [B, H, Q, S] bias costs cuDNN) and with the one-hot relative-bias lookup (the
before/after of the toeplitz bias), large b64, a profile of the base step (kernel time by
class and the top kernels, `profile_summary.py`), base b256, `bench checkpoint` and
`bench decode` for base, large b32 and base b64 with XLA attention (the first run's figures,
for comparison). A one-line summary per result goes to stdout; the persistent compilation
cache under /tmp lets a later variant reuse an earlier one's compilation (the state
initialiser, the profiled step).

Imports no seqio or TensorFlow (GPU images lack them).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback
from typing import Any

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks" / "gpu"))

import jax  # noqa: E402

from mtjax import config as config_lib  # noqa: E402
from mtjax.bench import DEFAULT_OVERRIDES  # noqa: E402
from mtjax.bench import train as train_bench  # noqa: E402
from mtjax.model import attention as attention_lib  # noqa: E402
from mtjax.model import position_bias  # noqa: E402

COMMON = ["model.dtype=bfloat16", "optim.name=adamw", "data.inputs_length=512",
          "data.targets_length=114", "data.pack=true"]
LENGTHS = [512, 114]
MODELS = {"base": "t5_1_1_base", "large": "t5_1_1_large"}
# Seconds to assume for a model's first compilations (state init and step), before one has been
# measured; the init is then in the persistent cache.
FIRST_COMPILE_GUESS_S = {"t5_1_1_base": 60.0, "t5_1_1_large": 100.0}
STEP_GUESS_S = {"t5_1_1_base": 0.3, "t5_1_1_large": 0.6}


class Sweep:
    def __init__(self, out_dir: pathlib.Path, deadline_s: float, steps: int, warmup: int):
        self.out = out_dir / "sweep.jsonl"
        self.out_dir = out_dir
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.steps, self.warmup = steps, warmup
        self.compile_s: dict[str, float] = {}
        self.step_s: dict[str, float] = {}
        self.results: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def record(self, entry: dict[str, Any]) -> None:
        entry = {"elapsed_s": round(self.elapsed(), 1), **entry}
        with self.out.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.results.append(entry)

    def fits(self, model: str, extra_s: float = 0.0) -> bool:
        expected = (self.compile_s.get(model, FIRST_COMPILE_GUESS_S.get(model, 90.0))
                    + (self.steps + self.warmup + 1) * self.step_s.get(model, STEP_GUESS_S.get(
                        model, 0.5)) + extra_s)
        return self.elapsed() + expected < self.deadline_s

    def train(self, name: str, model: str, batch: int, *overrides: str,
              relpos: str = "auto", drop_full_masks: bool = False) -> dict[str, Any] | None:
        """One `bench train` variant; its summary, or None when skipped or failed.

        ``drop_full_masks``: attention gets no mask where the bench's mask is all true (the
        encoder's and cross-attention's: its rows have no padding and one segment), so cuDNN
        reads the position bias as [1, H, Q, S] and cross-attention has no bias at all. The
        numbers are unchanged; the time saved is what the dense [B, H, Q, S] bias costs, i.e.
        what segment-aware cuDNN attention could gain.
        """
        if not self.fits(model):
            self.record({"variant": name, "skipped": "deadline"})
            print(f"{name:<34} skipped (deadline)", flush=True)
            return None
        config = config_lib.load(None, [*DEFAULT_OVERRIDES, *COMMON, f"model.name={model}",
                                        f"train.batch_size={batch}", *overrides])
        original = position_bias.RelativePositionBias.method
        original_dense = attention_lib.AttentionBias.dense
        try:
            position_bias.RelativePositionBias.method = relpos
            if drop_full_masks:
                attention_lib.AttentionBias.dense = _without_full_masks(original_dense)
            result = train_bench.run(config, train_bench.BenchOptions(
                steps=self.steps, warmup=self.warmup))
        except Exception as e:  # noqa: BLE001 - record and go on: the lease is short
            self.record({"variant": name, "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]})
            print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None
        finally:
            position_bias.RelativePositionBias.method = original
            attention_lib.AttentionBias.dense = original_dense
            jax.clear_caches()
        self.compile_s[model] = result["compile_s"]
        self.step_s[model] = result["step_s_median"]
        summary = {
            "variant": name, "model": model, "batch_size": batch, "overrides": list(overrides),
            "relpos": relpos, "drop_full_masks": drop_full_masks,
            **{k: result[k] for k in (
                "num_params", "compile_s", "lower_s", "step_s", "tokens_per_s",
                "model_flops_per_step", "achieved_flops_per_s", "peak_flops_per_s",
                "peak_source", "mfu", "loss", "device_peak_memory_bytes", "compiled_memory",
                "attention", "remat", "scan_layers")},
        }
        self.record(summary)
        print(f"{name:<34} {result['tokens_per_s']:>10.0f} tok/s  MFU {result['mfu']:.3f}  "
              f"step {result['step_s_median'] * 1e3:7.1f} ms  compile {result['compile_s']:5.1f}"
              f" s  temp {result['compiled_memory'].get('temp_size_in_bytes', 0) / 2**30:5.1f}"
              f" GiB", flush=True)
        return summary


def _without_full_masks(dense):
    """``AttentionBias.dense`` that leaves out the mask except in the decoder's self-attention
    (Q == S == the target length: causal, so not all true)."""
    def position_only(bias: attention_lib.AttentionBias, query_length: int, key_length: int):
        if query_length == key_length == LENGTHS[1]:
            return dense(bias, query_length, key_length)
        return dense(bias._replace(mask=None), query_length, key_length)

    return position_only


def matmul_peak(sweep: Sweep, n: int = 8192) -> None:
    """The bf16 matmul rate this GPU reaches (n^3 products), beside the table's peak."""
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    best = 2 * n**3 / min(times)
    sweep.record({"variant": f"matmul_peak_bf16_{n}", "flops_per_s": best})
    print(f"{f'bf16 matmul {n}^3':<34} {best / 1e12:.3g} TFLOP/s", flush=True)


def profile(sweep: Sweep, model: str, batch: int, *overrides: str, steps: int = 3) -> None:
    """A few steps of one variant under the profiler; the kernel summary into the results."""
    import profile_summary

    from mtjax.train import setup as setup_lib

    if not sweep.fits(model, extra_s=15.0):
        sweep.record({"variant": f"profile {model} b{batch}", "skipped": "deadline"})
        return
    try:
        config = config_lib.load(None, [*DEFAULT_OVERRIDES, *COMMON, f"model.name={model}",
                                        f"train.batch_size={batch}", *overrides])
        vocab = train_bench.sizes.get_config(model).vocab_size
        setup = setup_lib.build(config, vocab_size=vocab, num_tasks=1,
                                total_steps=sweep.warmup + sweep.steps)  # as bench train: cache hit
        host = train_bench.synthetic_batch(batch, *LENGTHS, vocab)
        data = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
                for k, v in host.items()}
        from mtjax.parallel import mesh as mesh_lib

        trace_dir = pathlib.Path("/tmp/mtjax_profile")
        with mesh_lib.activate(setup.mesh, setup.rules):
            compiled = setup.step.lower(setup.abstract_state, data).compile()
            state = setup.init_state(0)
            for _ in range(2):
                state, metrics = compiled(state, data)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for _ in range(steps):
                    state, metrics = compiled(state, data)
                jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - t0
        del state
        trace = profile_summary.newest_trace(trace_dir)
        summary = profile_summary.summarize(trace, top=30)
        if not summary["threads"]:  # no device process in this trace: keep every thread
            summary = profile_summary.summarize(trace, top=30, process_prefix="")
        summary.update(variant=f"profile {model} b{batch} {' '.join(overrides)}", steps=steps,
                       wall_s=wall)
        (sweep.out_dir / f"profile_{model}_b{batch}.json").write_text(json.dumps(summary))
        sweep.record({"variant": summary["variant"], "wall_s": wall, "threads": [
            {k: t[k] for k in ("thread", "busy_ms", "span_ms", "classes_ms")} | {
                "top": t["top"][:12]} for t in summary["threads"][:4]]})
        for t in summary["threads"][:3]:
            print(f"profile {t['thread'][:40]}: busy {t['busy_ms']:.1f} ms of "
                  f"{wall * 1e3:.1f} ms wall / {steps} steps; {json.dumps(t['classes_ms'])[:300]}",
                  flush=True)
    except Exception as e:  # noqa: BLE001
        sweep.record({"variant": f"profile {model} b{batch}", "error": f"{type(e).__name__}: {e}"[
            :2000], "traceback": traceback.format_exc()[-4000:]})
        print(f"profile FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    finally:
        jax.clear_caches()


def other_benchmarks(sweep: Sweep, model: str, batch: int) -> None:
    """`bench decode` and `bench checkpoint` for ``model`` (results into the sweep file)."""
    from mtjax import bench as bench_lib

    for name, guess_s in (("checkpoint", 30.0), ("decode", 60.0)):
        if sweep.elapsed() + guess_s > sweep.deadline_s:
            sweep.record({"variant": f"bench {name} {model}", "skipped": "deadline"})
            continue
        config = config_lib.load(None, [*DEFAULT_OVERRIDES, *COMMON, f"model.name={model}",
                                        f"train.batch_size={batch}"])
        options = train_bench.BenchOptions(steps=5, warmup=1)
        try:
            result = bench_lib.BENCHMARKS[name](config, options)
        except Exception as e:  # noqa: BLE001
            sweep.record({"variant": f"bench {name} {model}",
                          "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"bench {name} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        finally:
            jax.clear_caches()
        result.pop("config", None)
        sweep.record({"variant": f"bench {name} {model}", **result})
        flat = {k: round(v, 2) for k, v in result.items()
                if isinstance(v, float) and (k.endswith("_per_s") or k.endswith("_s"))}
        print(f"bench {name} {model}: {json.dumps(flat)[:600]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("."))
    parser.add_argument("--deadline-s", type=float, default=330.0,
                        help="start nothing that would end after this many seconds")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and lengths, to check the script on a CPU")
    args = parser.parse_args()
    if args.smoke:
        MODELS.update(base="t5_1_1_test", large="t5_1_1_tiny")
        COMMON[2:4] = ["data.inputs_length=32", "data.targets_length=16"]
        LENGTHS[:] = [32, 16]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", "/tmp/mtjax_jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    sweep = Sweep(args.out_dir, args.deadline_s, args.steps, args.warmup)
    from mtjax.bench import report

    sweep.record({"variant": "environment", **report.environment(),
                  "xla_flags": os.environ.get("XLA_FLAGS", "")})
    print(json.dumps(report.environment()), flush=True)
    matmul_peak(sweep, 512 if args.smoke else 8192)

    base, large = MODELS["base"], MODELS["large"]
    # model.attention=auto is cuDNN's fused attention here (1.35x over xla at base b64 on
    # 2026-12-04, benchmarks/gpu/results/); relpos "auto" is the toeplitz bias.
    sweep.train("base b128", base, 128)
    sweep.train("base b128 full masks dropped", base, 128, drop_full_masks=True)
    sweep.train("base b128 relpos=onehot", base, 128, relpos="onehot")
    sweep.train("large b64", large, 64)
    profile(sweep, base, 128)
    sweep.train("base b256", base, 256)
    other_benchmarks(sweep, base, 64)
    sweep.train("large b32", large, 32)
    sweep.train("base b64 xla", base, 64, "model.attention=xla")

    trained = [r for r in sweep.results if "mfu" in r]
    print("\n== summary (bf16, 512/114, AdamW; MFU against the table peak) ==")
    for r in trained:
        print(f"{r['variant']:<34} {r['tokens_per_s']:>10.0f} tok/s  MFU {r['mfu']:.3f}  "
              f"compile {r['compile_s']:.0f} s")
    print(f"total {sweep.elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
