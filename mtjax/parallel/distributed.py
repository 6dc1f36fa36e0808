"""Multi-host start-up through ``jax.distributed`` (JAX's own multi-controller runtime).

Which runtime starts us decides how: explicit ``MTJAX_COORDINATOR_ADDRESS`` /
``MTJAX_NUM_PROCESSES`` / ``MTJAX_PROCESS_ID`` (the local launcher, or any scheduler), SLURM with
more than one task, or a multi-host TPU VM; otherwise a single process needs nothing.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize_from_env() -> bool:
    """Start ``jax.distributed`` when the environment describes a multi-process run.

    Returns:
      True when a multi-process runtime was initialised.
    """
    address = os.environ.get("MTJAX_COORDINATOR_ADDRESS")
    if address:
        # CPU collectives across processes go through gloo (loopback multi-host runs); the
        # setting only concerns the CPU backend. Asking for the backend here would start it
        # too early for jax.distributed.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=_env_int("MTJAX_NUM_PROCESSES"),
            process_id=_env_int("MTJAX_PROCESS_ID"),
        )
        return True
    if (_env_int("SLURM_NTASKS") or 1) > 1:
        jax.distributed.initialize()  # reads SLURM's environment
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        jax.distributed.initialize()  # reads the TPU VM's metadata
        return True
    return False
