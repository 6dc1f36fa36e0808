"""Shared test settings: CPU only, strict numerics, and small helpers."""

import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def run_python(code: str, *args: str, devices: int = 1, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``devices`` fake CPU devices (XLA_FLAGS applies
    only before JAX starts, hence the subprocess)."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def subprocess_python():
    return run_python
