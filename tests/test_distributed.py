"""How ``mtjax.parallel.distributed`` reads the environment it is started in: which runtime starts
``jax.distributed`` and with which local GPUs. ``jax.distributed.initialize`` is replaced by a
recorder: only the decision is under test, no cluster is needed."""

import os

import jax
import pytest

from mtjax.parallel import distributed

# A SLURM task as srun starts it: JAX's SLURM detection needs these.
STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("layout, expected", [
    # launch/slurm.sbatch: one task per node, 8 GPUs each, as SLURM's gres sets them.
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
     list(range(8))),
    ({"SLURM_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, [0, 1, 2, 3]),
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_NTASKS": "4", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "4"}, [0, 1, 2, 3]),
    # One task per GPU: JAX's own choice (the GPU numbered SLURM_LOCALID) stays.
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x4)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),
    ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_GPUS_ON_NODE": "2"}, None),
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}, None),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "8"}, None),
    # The step's layout decides over the job's (srun -n 8 inside a one-task-per-node job).
    ({"SLURM_STEP_TASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"},
     None),
    # One task per node but no GPU count known, no GPUs, or the user's own choice: JAX's.
    ({"SLURM_TASKS_PER_NODE": "1(x2)"}, None),
    ({"SLURM_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": ""}, None),
    ({"SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8", "JAX_LOCAL_DEVICE_IDS": "0,1"},
     None),
    ({}, None),
])
def test_one_slurm_task_per_node_drives_all_of_its_gpus(layout, expected):
    assert distributed.slurm_local_device_ids({**STEP, **layout}) == expected


def _recorded_start(monkeypatch, env: dict[str, str]) -> list[dict]:
    """The calls of ``jax.distributed.initialize`` that ``initialize_from_env`` makes in ``env``
    (the variables it reads are cleared first)."""
    for name in ("MTJAX_COORDINATOR_ADDRESS", "MTJAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES",
                 "CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_started", False)
    distributed.initialize_from_env()
    return calls


def test_a_slurm_job_of_one_task_per_node_starts_with_every_local_gpu(monkeypatch):
    """Before, ``jax.distributed.initialize()`` without arguments let JAX give each node's one
    process GPU 0 alone (``local_device_ids=[SLURM_LOCALID]``): 1 GPU of 8 trained."""
    calls = _recorded_start(monkeypatch, {**STEP, "SLURM_NTASKS": "4", "SLURM_NNODES": "4",
                                          "SLURM_TASKS_PER_NODE": "1(x4)",
                                          "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert calls == [{"local_device_ids": list(range(8))}]


def test_an_salloc_shell_runs_one_process_with_a_note(monkeypatch, capsys):
    """salloc's shell has SLURM_NTASKS but no task of an srun step: JAX's SLURM detection finds
    nothing there and ``mtjax train`` stopped with its 'coordinator_address should be defined'
    traceback. Now it trains as one process and says once how to start one per task."""
    salloc = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_NNODES": "4",
              "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_NODELIST": "gpu[01-04]"}
    monkeypatch.setattr(distributed, "_noted_outside_srun", False)
    assert _recorded_start(monkeypatch, salloc) == []
    assert _recorded_start(monkeypatch, salloc) == []  # a second start (on an error) is quiet
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "SLURM_NTASKS=4" in err[0] and "srun" in err[0], err
    # In each task of `srun` within that allocation it starts as before.
    assert len(_recorded_start(monkeypatch, {**salloc, **STEP})) == 1
    assert capsys.readouterr().err == ""


def test_an_explicit_coordinator_in_an_salloc_shell_starts_without_the_srun_note(
        monkeypatch, capsys):
    """launch/local_multiprocess.sh inside an allocation: the processes start from their
    MTJAX_COORDINATOR_ADDRESS, and the 'running as one process' note was wrong."""
    monkeypatch.setattr(distributed, "_noted_outside_srun", False)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # gloo: not in this process
    calls = _recorded_start(monkeypatch, {
        "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "MTJAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
        "MTJAX_NUM_PROCESSES": "2", "MTJAX_PROCESS_ID": "0"})
    assert calls == [{"coordinator_address": "127.0.0.1:1", "num_processes": 2,
                      "process_id": 0}]
    assert capsys.readouterr().err == ""


def test_mtjax_distributed_auto_starts_from_jaxs_own_detection(monkeypatch):
    """A GCE TPU VM pod has no variable mtjax reads (JAX asks the metadata server), so
    jax.distributed never started there; MTJAX_DISTRIBUTED=auto (launch/tpu_pod.sh sets it)
    leaves the detection to JAX. Without it, such a host stays one process."""
    assert _recorded_start(monkeypatch, {}) == []
    assert _recorded_start(monkeypatch, {"MTJAX_DISTRIBUTED": "auto"}) == [
        {"local_device_ids": None}]
    # A GKE TPU pod, as before: JAX reads its TPU_WORKER_HOSTNAMES.
    assert len(_recorded_start(monkeypatch, {"TPU_WORKER_HOSTNAMES": "w-0,w-1"})) == 1


def test_mtjax_distributed_mistakes_are_one_line(monkeypatch):
    from mtjax.errors import UserError

    with pytest.raises(UserError, match="MTJAX_DISTRIBUTED=yes: the one value is 'auto'"):
        _recorded_start(monkeypatch, {"MTJAX_DISTRIBUTED": "yes"})

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setenv("MTJAX_DISTRIBUTED", "auto")
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(UserError, match="JAX found no cluster it knows here"):
        distributed.initialize_from_env()


@pytest.mark.parametrize("count, index", [(None, "0"), ("2", None), ("two", "0"), ("2", "2"),
                                          ("0", "0"), ("2", "-1")])
def test_an_explicit_coordinator_without_a_usable_count_or_id_is_one_line(
        monkeypatch, count, index):
    """MTJAX_COORDINATOR_ADDRESS with MTJAX_NUM_PROCESSES or MTJAX_PROCESS_ID missing, not a
    number or out of range stopped in a traceback: int()'s, or JAX's "Number of processes
    must be defined" / "process_id and num_processes must be nonnegative"."""
    from mtjax.errors import UserError

    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # gloo: not in this process
    for name, value in (("MTJAX_NUM_PROCESSES", count), ("MTJAX_PROCESS_ID", index)):
        monkeypatch.delenv(name, raising=False)
        if value is not None:
            monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"MTJAX_COORDINATOR_ADDRESS is set, so every process "
                       r"also needs MTJAX_NUM_PROCESSES .* and MTJAX_PROCESS_ID \(this one's "
                       r"number, 0 to MTJAX_NUM_PROCESSES - 1\); got ") as info:
        _recorded_start(monkeypatch, {"MTJAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    got = str(info.value).split("; got ")[1]
    assert ("no MTJAX_NUM_PROCESSES" if count is None else f"MTJAX_NUM_PROCESSES={count}") in got
    assert ("no MTJAX_PROCESS_ID" if index is None else f"MTJAX_PROCESS_ID={index}") in got
