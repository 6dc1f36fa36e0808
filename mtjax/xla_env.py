"""XLA settings mtjax applies before JAX starts its backends (no JAX import here).

CPU, both measured on the 2-core test machine (benchmarks/README.md), peer-shape train step:

- XLA 0.10's CPU backend hands reductions to YNNPACK ("ynn_fusion") as well as matmuls; for
  T5's attention (softmax max/sum and the relative-position-bias gradient over [B, H, S, S])
  those library reductions are several times slower than XLA's own loops. Keeping YNNPACK for
  matmuls only cut the step by about 13%.
- XLA's CPU "concurrency optimized" scheduler orders the program so that independent ops can
  run at once; with two cores, two library matmuls then share the cores and each runs at half
  speed or worse. The plain schedule was 1.035-1.063x faster in four A/B sittings.

The flags are experimental, so they are only added for jaxlib versions they were measured on,
each never over a value the user set for it, and none at all with ``MTJAX_XLA_DEFAULTS=0`` in
the environment.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

from mtjax.switches import switched_off

# Flag name -> value; the order is the order they are appended in.
CPU_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}
# A flag is also left out when the user set one of these, which decide the same thing.
_SAME_DECISION = {
    "xla_cpu_enable_concurrency_optimized_scheduler": ("xla_cpu_scheduler_type",),
}
# jaxlib versions whose XLA knows the flags (an unknown flag in XLA_FLAGS aborts the process).
_MEASURED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def set_cpu_defaults(env: MutableMapping[str, str] | None = None,
                     jaxlib_version: str | None = None) -> list[str]:
    """Append :data:`CPU_FLAGS` to ``XLA_FLAGS``, except those the user already set.

    Takes effect only if called before JAX initialises its CPU backend (the first device query
    or computation); importing jax earlier is fine. ``mtjax``'s command line calls it first.

    Args:
        env: the environment to edit (default ``os.environ``).
        jaxlib_version: the installed jaxlib's version (default: looked up).

    Returns:
        The flags added, as ``--name=value`` strings (empty when none was).
    """
    env = os.environ if env is None else env
    if switched_off(env, "MTJAX_XLA_DEFAULTS"):
        return []
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(_MEASURED_JAXLIB):
        return []
    flags = env.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_FLAGS.items()
             if not any(n in flags for n in (name, *_SAME_DECISION.get(name, ())))]
    if added:
        env["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added
