"""Multi-host start-up through ``jax.distributed`` (JAX's own multi-controller runtime).

Which runtime starts us decides how: explicit ``MTJAX_COORDINATOR_ADDRESS`` /
``MTJAX_NUM_PROCESSES`` / ``MTJAX_PROCESS_ID`` (the local launcher, or any scheduler), SLURM with
more than one task, a GKE TPU pod (``TPU_WORKER_HOSTNAMES``), or ``MTJAX_DISTRIBUTED=auto``:
JAX's own cluster detection, the one way to a GCE TPU VM pod (``launch/tpu_pod.sh`` sets it),
whose workers JAX finds through the metadata server and mtjax cannot see from the environment.
Otherwise a single process needs nothing.

JAX is imported only when a multi-process run is described: a single process that stops on a
config mistake says so without the seconds of importing it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import numpy as np

from mtjax.errors import UserError


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


_started = False
_noted_outside_srun = False

# What JAX's SLURM detection reads: a task that srun started has them all; the shell of salloc
# (or of sbatch) has only the job's, and JAX would stop there with "coordinator_address should
# be defined".
_SLURM_TASK = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The local GPUs one SLURM task drives: all of its node's when SLURM runs one task per node.

    JAX's SLURM detection gives each process the one GPU numbered by its ``SLURM_LOCALID``: right
    for one task per GPU, but with one task per node (``launch/slurm.sbatch``) each process would
    drive GPU 0 alone and leave the rest idle.

    Args:
      env: the process environment.

    Returns:
      ``[0, ..., n - 1]`` for the node's n visible GPUs, or None to leave JAX's choice (one task
      per GPU, ``JAX_LOCAL_DEVICE_IDS`` set, or a GPU count SLURM does not give).
    """
    if env.get("JAX_LOCAL_DEVICE_IDS") or not _one_task_per_node(env):
        return None
    count = _visible_gpus(env)
    return list(range(count)) if count else None


def _one_task_per_node(env: Mapping[str, str]) -> bool:
    """Whether SLURM's layout (the step's first, then the job's) has one task on every node."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if layout := env.get(name):
            # Counts per node, runs of equal ones compressed: "1(x4)", "8(x2)", "2,1(x3)".
            return all(part.split("(")[0].strip() == "1" for part in layout.split(","))
    if per_node := env.get("SLURM_NTASKS_PER_NODE"):
        return per_node == "1"
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    return nodes is not None and env.get("SLURM_NTASKS") == nodes


def _visible_gpus(env: Mapping[str, str]) -> int | None:
    """The GPUs this process can see: SLURM's CUDA_VISIBLE_DEVICES, else its count per node."""
    if (visible := env.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip()])
    count = env.get("SLURM_GPUS_ON_NODE", "")
    return int(count) if count.isdigit() else None


def initialize_from_env() -> bool:
    """Start ``jax.distributed`` when the environment describes a multi-process run.

    Returns:
      True when a multi-process runtime was initialised.
    """
    global _started
    auto = _auto_detect()
    address = os.environ.get("MTJAX_COORDINATOR_ADDRESS")
    slurm = not (auto or address) and _slurm_tasks()
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # GKE names the workers
    if not (address or slurm or tpu_pod or auto):
        return False
    num_processes, process_id = _explicit_processes() if address else (None, None)
    import jax

    if address:
        # CPU collectives across processes go through gloo (loopback multi-host runs); the
        # setting only concerns the CPU backend. Asking for the backend here would start it
        # too early for jax.distributed.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id)
    else:
        # Reads SLURM's environment or the TPU VM's metadata; only the GPUs are ours to choose.
        try:
            jax.distributed.initialize(local_device_ids=slurm_local_device_ids(os.environ))
        except ValueError as error:
            if not (auto and "coordinator_address" in str(error)):
                raise
            raise UserError("MTJAX_DISTRIBUTED=auto, but JAX found no cluster it knows here (a "
                            "task of srun, a TPU VM pod, Kubernetes, Open MPI): unset it to run "
                            "one process, or set MTJAX_COORDINATOR_ADDRESS, MTJAX_NUM_PROCESSES "
                            "and MTJAX_PROCESS_ID") from None
    _started = True
    return True


def _explicit_processes() -> tuple[int, int]:
    """(MTJAX_NUM_PROCESSES, MTJAX_PROCESS_ID), which MTJAX_COORDINATOR_ADDRESS needs beside it:
    one missing, not a number or out of range stopped in a traceback (int()'s, or JAX's
    "Number of processes must be defined")."""
    given = {name: os.environ.get(name, "").strip()
             for name in ("MTJAX_NUM_PROCESSES", "MTJAX_PROCESS_ID")}
    count, index = (int(text) if text.isdecimal() else -1 for text in given.values())
    if not 0 <= index < count:
        got = ", ".join(f"{name}={text}" if text else f"no {name}" for name, text in given.items())
        raise UserError(f"MTJAX_COORDINATOR_ADDRESS is set, so every process also needs "
                        f"MTJAX_NUM_PROCESSES (how many processes the job has) and "
                        f"MTJAX_PROCESS_ID (this one's number, 0 to MTJAX_NUM_PROCESSES - 1); "
                        f"got {got}")
    return count, index


def _auto_detect() -> bool:
    """Whether ``MTJAX_DISTRIBUTED=auto`` asks for JAX's own cluster detection."""
    value = os.environ.get("MTJAX_DISTRIBUTED", "")
    if value not in ("", "auto"):
        raise UserError(f"MTJAX_DISTRIBUTED={value}: the one value is 'auto' (start "
                        f"jax.distributed from JAX's own cluster detection); unset, mtjax starts "
                        f"it for SLURM, a GKE TPU pod or MTJAX_COORDINATOR_ADDRESS")
    return value == "auto"


def _slurm_tasks() -> bool:
    """Whether this is one of several tasks srun started; outside srun, a note and False."""
    global _noted_outside_srun
    tasks = _env_int("SLURM_NTASKS") or 1
    if tasks == 1 or all(name in os.environ for name in _SLURM_TASK):
        return tasks > 1
    if not _noted_outside_srun:
        print(f"mtjax: note: SLURM_NTASKS={tasks} but this process was not started by srun "
              f"(an salloc shell?): running as one process; for one process per task, start "
              f"it with `srun mtjax ...` or submit launch/slurm.sbatch", file=sys.stderr,
              flush=True)
        _noted_outside_srun = True
    return False


def log(message: str) -> None:
    """Print ``message`` to stderr on the first host only (every host runs the same code)."""
    import jax

    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def is_first_host() -> bool:
    """Whether this process is host 0 of its job; True in a process outside a multi-host job
    (one that has not started ``jax.distributed``), where asking JAX would start its backends
    before ``jax.distributed`` may (``mtjax tasks``, a pipeline built before training)."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


def preemption_service_running() -> bool:
    """Whether JAX's preemption service (started by ``jax.distributed``) runs: it holds
    SIGTERM with a C++ handler that ``signal.getsignal`` does not see (it still says SIG_DFL),
    and replacing it would lose a multi-host run's preemption checkpoint. Imports no JAX: a
    process that has not imported it runs no service."""
    distributed = sys.modules.get("jax._src.distributed")
    state = getattr(distributed, "global_state", None)
    return getattr(state, "preemption_sync_manager", None) is not None


def stop_with_the_others(failure: UserError) -> None:
    """Call before raising a set-up error found before ``jax.distributed`` started.

    The other hosts wait for this one in the start (300 s, then a C++ abort): start it anyway,
    and tell them at their first :func:`agree_on_set_up` why this host stops. Nothing to do
    on one process, or once the start is behind us (the hosts agree at their own points).
    """
    if _started:
        return
    try:
        if initialize_from_env():
            agree_on_set_up(failure)  # raises it
    except UserError:
        raise
    except Exception:  # noqa: BLE001, S110 - no runtime to tell: this host's error still shows
        pass


def agree_on_set_up(failure: UserError | None, preempted: bool = False) -> list[int]:
    """Raise ``failure``, and on several hosts stop every host when any one failed its checks.

    A check can fail on one host alone (a config file, tasks module or --init-from path its
    filesystem lacks, a per-host wrapper's misspelt key): the others would go on into the next
    collective and die there with a gloo traceback, or wait for that host in
    ``jax.distributed``'s start for 300 s and abort. Here every host exchanges the outcome of
    its checks first, and they all stop with one line.

    Args:
      failure: this host's set-up error, if any.
      preempted: whether this host had a SIGTERM while it started (before JAX's preemption
        service existed to spread it).

    Returns:
      The processes that had such a SIGTERM (every host gets the same list, so every host
      can stop before anything is written).
    """
    import jax

    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return [0] if preempted else []
    from jax.experimental import multihost_utils

    code = 2 if failure is not None else int(preempted)
    codes = np.ravel(multihost_utils.process_allgather(np.int32(code)))
    others = [i for i, c in enumerate(codes) if c == 2 and i != jax.process_index()]
    if failure is not None:
        raise failure
    if others:
        raise UserError(
            f"process(es) {', '.join(map(str, others))} stopped in set-up with an error that "
            f"this host did not see (its log has the line); every host needs the same command "
            f"line and the same files (the --config file, the --tasks-module and --init-from "
            f"paths)")
    return [i for i, c in enumerate(codes) if c == 1]
