"""What every benchmark result carries: timing statistics, memory, versions; and the human table."""

from __future__ import annotations

import importlib.metadata
import math
import os
import resource
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from mtjax import malloc_env


def timing_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-step wall times (the median resists one-off stalls)."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def reset_host_peak_memory() -> bool:
    """Start the host peak afresh from the current resident size (Linux), so that each benchmark
    of ``bench all`` reports its own peak rather than that of the ones before it.

    Returns:
        False where the peak cannot be reset (it then covers the whole process lifetime).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the kernel's "reset the peak RSS to the current RSS"
    except OSError:
        return False
    return True


def host_peak_memory_bytes() -> int:
    """Peak resident memory of this process since :func:`reset_host_peak_memory` (Linux's
    VmHWM), else since it started (``getrusage`` maxrss, which no reset clears)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def kernel_counters() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far (``getrusage``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def kernel_cost_per_step(before: tuple[int, float], after: tuple[int, float],
                         steps: int) -> dict[str, float]:
    """Page faults and kernel CPU seconds per step between two :func:`kernel_counters` readings.

    On CPU this is mostly the allocator's cost: XLA allocates a step's temporary buffer afresh
    and the kernel faults in and zeroes every page of it again (README, Performance).
    """
    return {"page_faults": (after[0] - before[0]) / steps,
            "kernel_cpu_s": (after[1] - before[1]) / steps}


def device_peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device, or None where the backend does not say."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's own memory plan of a compiled step (known on every backend, CPU included)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not implemented on every backend/version
        return None
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def environment(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Library versions (``packages`` too) and the device the benchmark ran on."""
    import jax

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", *packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # mtjax adds CPU defaults (xla_env.py)
        # The command line asks glibc for huge pages (malloc_env.py); record what was in force.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "transparent_hugepage": malloc_env.transparent_hugepage_mode(),
        # Set (JAX_COMPILATION_CACHE_DIR, or a caller's jax.config): compile_s may then be a
        # load from JAX's persistent cache rather than a compilation.
        "compilation_cache_dir": (jax.config.jax_compilation_cache_dir
                                  if jax.config.jax_enable_compilation_cache else None),
    }


def _human(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if magnitude >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.4g}"
    return str(value)


def format_table(name: str, rows: dict[str, Any]) -> str:
    """A two-column text table of the scalar fields of one result (for stderr)."""
    scalars = {k: v for k, v in rows.items() if not isinstance(v, dict | list)}
    width = max(len(k) for k in scalars)
    lines = [f"== bench {name} ==", *(f"{k:<{width}}  {_human(v)}" for k, v in scalars.items())]
    return "\n".join(lines)
