"""Where the time of a profiled JAX program went, from its Perfetto trace, as JSON.

    python benchmarks/gpu/profile_summary.py TRACE_DIR [--top 25]

TRACE_DIR is what ``jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)`` wrote (the newest
``perfetto_trace.json.gz`` under it is read). For every device process (``/device:GPU:0`` ...)
and every thread (one per CUDA stream, plus XLA's per-op and per-module lines where the profiler
adds them), the summary gives the busy time and the events with the most total time; each
thread is summed alone, so lines that repeat one another are never added together. Events are
also put in coarse classes by name (matmul, attention, scatter/gather, copy, other fusion), so
a kernel list from an unknown XLA version still says what kind of work dominates.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
from typing import Any

# Substrings of kernel or op names, lowercased, first match wins.
KERNEL_CLASSES = (
    ("attention", ("cudnn", "fmha", "flash", "attention", "custom-call.fused_attention")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet", "dot", "matmul", "triton_gemm")),
    ("scatter_gather", ("scatter", "gather")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("reduce", ("reduce", "reduction")),
    ("fusion", ("fusion", "loop_", "input_", "triton")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, needles in KERNEL_CLASSES:
        if any(n in lowered for n in needles):
            return label
    return "other"


def newest_trace(trace_dir: pathlib.Path) -> pathlib.Path:
    traces = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    return traces[-1]


def summarize(trace_path: pathlib.Path, top: int = 25,
              process_prefix: str = "/device:") -> dict[str, Any]:
    """Busy time, classes and top events per thread of the trace's device processes (those
    whose name starts with ``process_prefix``; ``"/host:"`` selects the CPU's)."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process_names: dict[Any, str] = {}
    thread_names: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            process_names[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            thread_names[(e["pid"], e.get("tid"))] = e["args"]["name"]
    device_pids = {pid for pid, name in process_names.items() if name.startswith(process_prefix)}
    # (pid, tid) -> name -> [total us, count]
    totals: dict[tuple[Any, Any], dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(lambda: [0.0, 0]))
    spans: dict[tuple[Any, Any], list[float]] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        key = (e["pid"], e.get("tid"))
        dur = float(e.get("dur", 0.0))
        entry = totals[key][e.get("name", "?")]
        entry[0] += dur
        entry[1] += 1
        start, end = float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + dur
        lo, hi = spans.get(key, (start, end))
        spans[key] = [min(lo, start), max(hi, end)]
    threads = []
    for key, by_name in totals.items():
        busy = sum(v[0] for v in by_name.values())
        classes: dict[str, float] = collections.defaultdict(float)
        for name, (us, _) in by_name.items():
            classes[kernel_class(name)] += us
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        threads.append({
            "process": process_names.get(key[0]), "thread": thread_names.get(key, str(key[1])),
            "busy_ms": busy / 1e3, "span_ms": (spans[key][1] - spans[key][0]) / 1e3,
            "events": sum(v[1] for v in by_name.values()),
            "classes_ms": {k: v / 1e3 for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top": [{"name": name[:160], "ms": us / 1e3, "count": count,
                     "share": us / busy if busy else 0.0}
                    for name, (us, count) in ranked],
        })
    threads.sort(key=lambda t: -t["busy_ms"])
    return {"trace": str(trace_path), "device_processes": sorted(
        process_names[p] for p in device_pids), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--process-prefix", default="/device:",
                        help="which processes of the trace to sum ('/host:' on CPU)")
    args = parser.parse_args()
    print(json.dumps(summarize(newest_trace(args.trace_dir), args.top, args.process_prefix),
                     indent=1))


if __name__ == "__main__":
    main()
