"""XLA settings mtjax applies before JAX starts its backends (no JAX import here).

CPU: XLA 0.10's CPU backend hands reductions to YNNPACK ("ynn_fusion") as well as matmuls; for
T5's attention (softmax max/sum and the relative-position-bias gradient over [B, H, S, S]) those
library reductions are several times slower than XLA's own loops. Keeping YNNPACK for matmuls
only cut the peer-shape train step by about 13% on the 2-core test machine (benchmarks/README.md).
The flag is experimental, so it is only added for jaxlib versions it was measured on, never over
a value the user set, and not at all with ``MTJAX_XLA_DEFAULTS=0`` in the environment.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib versions whose XLA knows the flag (an unknown flag in XLA_FLAGS aborts the process).
_MEASURED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def set_cpu_defaults(env: MutableMapping[str, str] | None = None,
                     jaxlib_version: str | None = None) -> bool:
    """Add :data:`CPU_FLAG` to ``XLA_FLAGS`` unless the user chose a value or opted out.

    Takes effect only if called before JAX initialises its CPU backend (the first device query
    or computation); importing jax earlier is fine. ``mtjax``'s command line calls it first.

    Args:
        env: the environment to edit (default ``os.environ``).
        jaxlib_version: the installed jaxlib's version (default: looked up).

    Returns:
        True when the flag was added.
    """
    env = os.environ if env is None else env
    if env.get("MTJAX_XLA_DEFAULTS", "1") == "0":
        return False
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(_MEASURED_JAXLIB):
        return False
    flags = env.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {CPU_FLAG}".strip()
    return True
