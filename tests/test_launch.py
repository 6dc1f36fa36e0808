"""The GPU launch scripts, run with a stand-in for mtjax (and for SLURM's srun/scontrol): they
run where they are called from, set the XLA environment, pass the arguments on, and handle the
preemption exit code 42 as documented. No GPU is needed: only the shell logic is under test."""

import os
import pathlib
import stat
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Records its working directory, arguments and XLA_FLAGS; exits with the codes listed in
# $EXIT_CODES, one per call (a counter file keeps the place), 0 after the list.
STAND_IN = """#!/usr/bin/env bash
echo "cwd=$PWD args=$* xla=$XLA_FLAGS pythonpath=${PYTHONPATH:-}" >> "$CALLS"
n=$(cat "$CALLS.n" 2>/dev/null || echo 0); echo $((n + 1)) > "$CALLS.n"
codes=(${EXIT_CODES:-}); exit "${codes[$n]:-0}"
"""


def _stand_in(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _run(script: str, args: list[str], cwd: pathlib.Path, tmp_path: pathlib.Path, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    full_env.update(CALLS=str(tmp_path / "calls"), **env)
    full_env["PATH"] = f"{tmp_path / 'bin'}:{full_env['PATH']}"
    proc = subprocess.run(["bash", str(REPO / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return proc, calls


def test_gpu_host_runs_in_the_callers_directory_and_restarts_on_preemption(tmp_path):
    here = tmp_path / "elsewhere"
    here.mkdir()
    mtjax = _stand_in(tmp_path, "mtjax")
    proc, calls = _run("launch/gpu_host.sh", ["--workdir", "runs/x", "train.steps=5"], here,
                       tmp_path, MTJAX_BIN=str(mtjax), EXIT_CODES="42 42 0",
                       MTJAX_RESTART_ON_PREEMPT="1")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 3 and proc.stderr.count("preempted") == 2
    for call in calls:
        assert call.startswith(f"cwd={here} args=train --workdir runs/x train.steps=5 "), call
        assert "xla=--xla_gpu_enable_latency_hiding_scheduler=true" in call
    # Without the restart switch, 42 is handed back to the caller (a scheduler that requeues).
    (tmp_path / "calls").unlink()
    (tmp_path / "calls.n").unlink()
    proc, calls = _run("launch/gpu_host.sh", [], here, tmp_path, MTJAX_BIN=str(mtjax),
                       EXIT_CODES="42")
    assert proc.returncode == 42 and len(calls) == 1


def test_gpu_bench_runs_in_the_callers_directory_with_this_checkout_importable(tmp_path):
    python = _stand_in(tmp_path, "python")
    proc, calls = _run("launch/gpu_bench.sh", ["--steps", "3"], tmp_path, tmp_path,
                       PYTHON=str(python), OUT="results", BENCHMARKS="train")
    assert proc.returncode == 0, proc.stderr
    assert [c.split(" model.name=")[1].split()[0] for c in calls] == ["t5_1_1_base",
                                                                      "t5_1_1_large"]
    for call in calls:
        assert call.startswith(f"cwd={tmp_path} args=-m mtjax bench train "), call
        assert "--output results/bench_train_t5_1_1_" in call and call.endswith(
            f"--steps 3 xla=--xla_gpu_enable_latency_hiding_scheduler=true pythonpath={REPO}")
    assert (tmp_path / "results").is_dir()


def test_gpu_bench_runs_the_rest_after_a_failure_and_then_fails(tmp_path):
    """`|| echo "$benchmark failed"` made the script exit 0 when a benchmark failed."""
    python = _stand_in(tmp_path, "python")
    proc, calls = _run("launch/gpu_bench.sh", [], tmp_path, tmp_path, PYTHON=str(python),
                       BENCHMARKS="train decode", EXIT_CODES="0 3 0 0")
    assert proc.returncode == 1 and len(calls) == 4, proc.stderr
    assert "mtjax bench decode t5_1_1_base failed (exit code 3)" in proc.stderr
    assert "1 run(s) failed: decode t5_1_1_base" in proc.stderr


def test_gpu_bench_keeps_to_its_budget(tmp_path):
    """Six runs of up to 300 s each could take 30 minutes; a lent GPU has 8."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\nsleep 5\n')
    python.chmod(0o755)
    proc, calls = _run("launch/gpu_bench.sh", [], tmp_path, tmp_path, PYTHON=str(python),
                       BENCHMARKS="train decode", BUDGET_S="37", RUN_S="3")
    assert proc.returncode == 1, proc.stderr
    # 3 s each (stopped), then under 30 s left after the third: the fourth is not started.
    assert len(calls) == 3, calls
    assert "mtjax bench train t5_1_1_base failed (stopped after 3 s)" in proc.stderr
    assert "mtjax bench decode t5_1_1_large not started (37 s budget spent)" in proc.stderr
    assert "4 run(s) failed" in proc.stderr


def test_gpu_bench_stops_at_ctrl_c(tmp_path):
    """`timeout` ran each benchmark in a process group of its own: a Ctrl-C at the terminal
    did not reach it, and the script went on to the next one."""
    import signal
    import time

    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/usr/bin/env bash\ntrap 'echo INT >> \"$CALLS\"; exit 130' INT\n"
                      'echo started >> "$CALLS"\nfor i in $(seq 300); do sleep 0.1; done\n')
    python.chmod(0o755)
    calls = tmp_path / "calls"
    env = dict(os.environ, CALLS=str(calls), PYTHON=str(python), BENCHMARKS="train")

    def as_at_a_terminal():
        # A terminal's Ctrl-C reaches a shell whose SIGINT is neither ignored nor blocked. A
        # test run started in the background without job control (`(pytest &)`) ignores
        # SIGINT, the script inherited that (bash cannot trap a signal ignored at its start),
        # the stand-in ran its 30 s and the test timed out: the test run's state, not the
        # script's.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(["bash", str(REPO / "launch/gpu_bench.sh")], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_at_a_terminal)
    # Generous: on a loaded machine (CI beside other test runs) the start took over 30 s, and
    # a Ctrl-C sent before the benchmark began found nothing to stop.
    deadline = time.time() + 180
    while not (calls.exists() and "started" in calls.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert calls.exists() and "started" in calls.read_text(), "the stand-in never started"
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: its foreground process group
    try:
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = pathlib.Path("/proc/self/status")  # this process's signal state, if Linux
            code = [line for line in status.read_text().splitlines()
                    if line.startswith(("SigIgn", "SigBlk"))] if status.exists() else None
        assert code == 130, code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert calls.read_text().splitlines()[0:2] == ["started", "INT"]
    assert "started" not in calls.read_text().splitlines()[2:]  # the next model never began


def test_slurm_requeues_on_preemption_and_finds_its_settings(tmp_path):
    _stand_in(tmp_path, "srun")
    _stand_in(tmp_path, "scontrol")
    proc, calls = _run("launch/slurm.sbatch", ["--workdir", "/shared/run"], REPO, tmp_path,
                       SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="77", EXIT_CODES="42 0")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith(f"cwd={REPO} args=--kill-on-bad-exit=0 mtjax train --workdir "
                               f"/shared/run xla=--xla_gpu_enable_latency_hiding_scheduler")
    assert calls[1].startswith(f"cwd={REPO} args=show job 77 "), calls  # not cancelled?
    assert calls[2].startswith(f"cwd={REPO} args=requeue 77 "), calls
    # Submitted from a directory without the checkout and no MTJAX_LAUNCH_DIR: one clear line.
    (tmp_path / "calls").unlink()
    (tmp_path / "calls.n").unlink()
    proc, calls = _run("launch/slurm.sbatch", [], tmp_path, tmp_path,
                       SLURM_SUBMIT_DIR=str(tmp_path))
    assert proc.returncode == 2 and "MTJAX_LAUNCH_DIR" in proc.stderr and not calls
    proc, calls = _run("launch/slurm.sbatch", [], tmp_path, tmp_path,
                       SLURM_SUBMIT_DIR=str(tmp_path), MTJAX_LAUNCH_DIR=str(REPO / "launch"))
    assert proc.returncode == 0 and calls[0].startswith(f"cwd={tmp_path} "), proc.stderr


def test_slurm_fails_when_the_requeue_fails_and_leaves_a_cancelled_job_alone(tmp_path):
    """A failed `scontrol requeue` exited 0: the job showed COMPLETED and never resumed."""
    _stand_in(tmp_path, "srun")
    _stand_in(tmp_path, "scontrol")
    proc, calls = _run("launch/slurm.sbatch", [], REPO, tmp_path, SLURM_SUBMIT_DIR=str(REPO),
                       SLURM_JOB_ID="77", EXIT_CODES="42 0 1")
    assert proc.returncode == 42 and "requeue 77 failed" in proc.stderr, proc.stderr
    assert [c.split(" xla=")[0].split("args=")[1] for c in calls] == [
        "--kill-on-bad-exit=0 mtjax train", "show job 77", "requeue 77"]
    # scancel: the job is CANCELLED already; the run saved and exited 42, and stays cancelled.
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$CALLS"\n'
                        'echo "   JobState=CANCELLED Reason=None"\n')
    (tmp_path / "calls").unlink()
    (tmp_path / "calls.n").unlink()
    proc, calls = _run("launch/slurm.sbatch", [], REPO, tmp_path, SLURM_SUBMIT_DIR=str(REPO),
                       SLURM_JOB_ID="77", EXIT_CODES="42")
    assert proc.returncode == 42 and "cancelled, not requeueing" in proc.stderr, proc.stderr
    assert calls[1:] == ["scontrol show job 77"]


# Saves on SIGTERM as mtjax does: records it and exits 42; otherwise trains (sleeps) for long.
TRAINER_STAND_IN = """#!/usr/bin/env bash
trap 'echo "TERM" >> "$CALLS"; exit 42' TERM
echo "started" >> "$CALLS"
for i in $(seq 600); do sleep 0.1; done
"""


def test_gpu_host_passes_sigterm_on_and_does_not_restart_when_stopped(tmp_path):
    """In a container the script is the process that gets SIGTERM: mtjax must get it too (it
    kept training as an orphan, and was killed without saving when the container went)."""
    import signal
    import time

    mtjax = tmp_path / "bin" / "mtjax"
    mtjax.parent.mkdir()
    mtjax.write_text(TRAINER_STAND_IN)
    mtjax.chmod(mtjax.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(CALLS=str(calls), MTJAX_BIN=str(mtjax), MTJAX_RESTART_ON_PREEMPT="1")
    proc = subprocess.Popen(["bash", str(REPO / "launch/gpu_host.sh"), "--workdir", "w"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (calls.exists() and "started" in calls.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 42, proc.stderr.read()
    assert calls.read_text().splitlines() == ["started", "TERM"]  # passed on, not restarted


def test_gpu_host_exits_with_mtjax_code_when_mtjax_ends_at_once(tmp_path):
    """A trainer that exits the moment SIGTERM reaches it: the script asked `kill -0` whether
    it still ran after the interrupted `wait`, and when it had just ended, exited 143 (the
    signal) instead of the trainer's 42, 6 times in 30 here."""
    import signal
    import time

    mtjax = tmp_path / "bin" / "mtjax"
    mtjax.parent.mkdir()
    # `sleep & wait`: the trap runs as soon as the signal arrives, not after a foreground sleep.
    mtjax.write_text("#!/usr/bin/env bash\ntrap 'exit 42' TERM\n"
                     "echo started >> \"$CALLS\"\nsleep 600 & wait\n")
    mtjax.chmod(mtjax.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    codes = []
    for attempt in range(20):
        calls = tmp_path / f"calls{attempt}"
        env.update(CALLS=str(calls), MTJAX_BIN=str(mtjax))
        proc = subprocess.Popen(["bash", str(REPO / "launch/gpu_host.sh")], cwd=tmp_path,
                                env=env, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while not calls.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the stand-in in its `wait`
        proc.send_signal(signal.SIGTERM)
        codes.append(proc.wait(timeout=30))
        os.killpg(proc.pid, signal.SIGKILL)  # the stand-in's own sleep
    assert codes == [42] * 20


def test_gpu_host_exits_with_mtjax_code_over_128(tmp_path):
    """mtjax killed by the OOM killer (137) or stopped by Ctrl-C (130), no signal to the
    script: wait_for waited again for a 127 that bash 5.2 never answers (it answers the kept
    137 at every wait), and the script spun at full CPU forever; SIGTERM is trapped."""
    import signal

    for code, body in ((137, "kill -KILL $$"), (130, "exit 130")):
        mtjax = tmp_path / f"mtjax{code}"
        mtjax.write_text(f"#!/usr/bin/env bash\n{body}\n")
        mtjax.chmod(mtjax.stat().st_mode | stat.S_IEXEC)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(MTJAX_BIN=str(mtjax))
        proc = subprocess.Popen(["bash", str(REPO / "launch/gpu_host.sh")], cwd=tmp_path,
                                env=env, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert proc.wait(timeout=30) == code
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the trap ignores SIGTERM


def test_launch_scripts_help_and_tpu_restart_limit(tmp_path):
    for script in ("gpu_host.sh", "local_multiprocess.sh", "tpu_pod.sh", "slurm.sbatch"):
        proc = subprocess.run(["bash", str(REPO / "launch" / script), "--help"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) > 5, (script, proc)
        assert "#" not in proc.stdout.splitlines()[0] and "SBATCH" not in proc.stdout, script
    # gpu_bench.sh --help prints its documentation; it used to pass --help on to six
    # `mtjax bench` runs (against the 8-minute budget) instead.
    python = _stand_in(tmp_path, "python")
    proc, calls = _run("launch/gpu_bench.sh", ["--help"], tmp_path, tmp_path, PYTHON=str(python))
    assert proc.returncode == 0 and calls == [], (proc.stderr, calls)
    assert len(proc.stdout.splitlines()) > 5 and "#" not in proc.stdout.splitlines()[0]
    assert "BUDGET_S" in proc.stdout and "BENCHMARKS" in proc.stdout
    # slurm.sbatch's documentation names the environment variables it reads.
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert "MTJAX_LAUNCH_DIR" in proc.stdout and "MTJAX_BIN" in proc.stdout, proc.stdout
    # gcloud exits 42 every time: 1 run + MTJAX_MAX_RESTARTS restarts, each one announced.
    _stand_in(tmp_path, "gcloud")
    proc, calls = _run("launch/tpu_pod.sh", ["my-tpu", "zone-a", "--workdir", "/mnt/r"],
                       tmp_path, tmp_path, EXIT_CODES="42 42 42 42", MTJAX_MAX_RESTARTS="2")
    assert proc.returncode == 42 and len(calls) == 3
    assert proc.stderr.count("; restarting (") == 2 and "not restarting" in proc.stderr
    # MTJAX_DISTRIBUTED=auto: on a GCE TPU VM only JAX's own detection (the metadata server)
    # finds the other workers; mtjax's did not, and jax.distributed never started.
    assert calls[0].endswith("--command MTJAX_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2 mtjax "
                             "train --workdir /mnt/r xla= pythonpath="), calls[0]
    proc, calls = _run("launch/tpu_pod.sh", ["my-tpu", "--help"], tmp_path, tmp_path)
    assert proc.returncode == 0 and len(calls) == 3  # gcloud not called again
    # ssh runs a non-login shell on the workers, whose PATH may lack mtjax: MTJAX_BIN.
    proc, calls = _run("launch/tpu_pod.sh", ["my-tpu", "zone-a"], tmp_path, tmp_path,
                       MTJAX_BIN="python3 -m mtjax")
    assert proc.returncode == 0 and " TF_CPP_MIN_LOG_LEVEL=2 python3 -m mtjax train " in calls[3]


def test_slurm_requeues_when_preemption_signals_the_batch_shell_too(tmp_path):
    """SLURM sends SIGTERM to every process of a preempted job, this script's shell included:
    with srun in the foreground and no trap, the shell died with 143 while the run was saving,
    and the job was never requeued."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun takes the signal and returns its tasks' code: exec stands for that.
    srun = '#!/usr/bin/env bash\nshift\nexec "$@"\n'
    for name, text in [("mtjax", TRAINER_STAND_IN), ("srun", srun), ("scontrol", STAND_IN)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(CALLS=str(calls), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="77",
               PATH=f"{bin_dir}:{env['PATH']}")
    proc = subprocess.Popen(["bash", str(REPO / "launch/slurm.sbatch"), "--workdir", "w"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 30
    while not (calls.exists() and "started" in calls.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as slurmd signals the job: every process
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    lines = calls.read_text().splitlines()
    assert lines[:2] == ["started", "TERM"], lines
    assert lines[-1].startswith(f"cwd={tmp_path} args=requeue 77 "), lines


def test_gpu_lease_stops_where_its_checkout_is_not_found(tmp_path):
    """benchmarks/gpu/lease.sh went on after a failed `cd` to the checkout, running the smoke
    benchmark and the sweep from wherever it was."""
    for name in ("nvidia-smi", "python3", "timeout"):
        _stand_in(tmp_path, name)
    script = (REPO / "benchmarks/gpu/lease.sh").read_text()
    proc, calls = _run_text(script, "/no/such/dir/benchmarks/gpu/lease.sh", tmp_path,
                            OUT=str(tmp_path / "out"))
    assert proc.returncode == 2 and not calls, (proc.stderr, calls)


def _run_text(script: str, name: str, tmp_path: pathlib.Path, **env):
    """``script`` run by bash as if from the file ``name`` (its $0), stand-ins first on PATH."""
    full_env = dict(os.environ, CALLS=str(tmp_path / "calls"), **env)
    full_env["PATH"] = f"{tmp_path / 'bin'}:{full_env['PATH']}"
    proc = subprocess.run(["bash", "-c", script, name], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return proc, calls


# Stands in for mtjax in launch/local_multiprocess.sh: process i does what $BEHAVIOUR_<i> says.
FAKE_PROCESS = """#!/usr/bin/env bash
echo "started $MTJAX_PROCESS_ID" >> "$CALLS"
case $(eval echo \\$BEHAVIOUR_$MTJAX_PROCESS_ID) in
  fail) sleep 0.3; exit 3 ;;
  killed) sleep 0.3; kill -KILL $$ ;;
  stuck) trap '' TERM; while true; do sleep 0.1; done ;;  # deaf, as in jax.distributed start-up
  slow_abort) trap 'sleep 1; exit 134' TERM; while true; do sleep 0.1; done ;;
esac
"""


def _local_multiprocess(tmp_path, **behaviours):
    fake = tmp_path / "fake_mtjax"
    fake.write_text(FAKE_PROCESS)
    fake.chmod(0o755)
    env = {f"BEHAVIOUR_{i}": b for i, b in behaviours.items()}
    start = time.monotonic()
    proc, calls = _run("launch/local_multiprocess.sh", ["2"], tmp_path, tmp_path,
                       MTJAX_BIN=str(fake), MTJAX_LOG_DIR=str(tmp_path), MTJAX_STOP_GRACE_S="2",
                       **env)
    return proc, calls, time.monotonic() - start


def test_local_multiprocess_stops_a_process_stuck_in_start_up_when_another_fails(tmp_path):
    """The others were left to JAX's heartbeat timeout, or forever when stuck starting up."""
    proc, calls, seconds = _local_multiprocess(tmp_path, **{"0": "stuck", "1": "fail"})
    assert proc.returncode == 3, proc.stderr
    assert "process 1 exited with 3; log: " in proc.stderr and "stopping the others" in proc.stderr
    assert seconds < 20  # 0.3 s, then SIGTERM (ignored) and SIGKILL 2 s later


def test_local_multiprocess_exits_with_the_first_failure_in_time(tmp_path):
    """It took the first non-zero code in process order: 134 of process 0's abort rather than
    the SIGKILL (137) of process 1 that caused it."""
    proc, calls, _ = _local_multiprocess(tmp_path, **{"0": "slow_abort", "1": "killed"})
    assert proc.returncode == 137, proc.stderr


def test_local_multiprocess_names_a_log_dir_it_cannot_write(tmp_path):
    proc, calls = _run("launch/local_multiprocess.sh", ["2"], tmp_path, tmp_path,
                       MTJAX_LOG_DIR=str(tmp_path / "missing"))
    assert proc.returncode == 2 and not calls
    assert f"MTJAX_LOG_DIR={tmp_path / 'missing'} is not a writable directory" in proc.stderr


def test_tpu_pod_without_train_arguments_passes_none(tmp_path):
    """`tpu_pod.sh NAME ZONE` alone ran `mtjax train ''` on every worker (printf ' %q' with no
    arguments prints one empty one), which stopped there: "override '' is not of the form
    section.key=value"."""
    _stand_in(tmp_path, "gcloud")
    proc, calls = _run("launch/tpu_pod.sh", ["my-tpu", "zone-a"], tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls[0].split(" xla=")[0].endswith("--command MTJAX_DISTRIBUTED=auto "
                                               "TF_CPP_MIN_LOG_LEVEL=2 mtjax train"), calls
    # Arguments, spaces and quotes included, still reach the workers as one word each.
    (tmp_path / "calls").unlink()
    (tmp_path / "calls.n").unlink()
    proc, calls = _run("launch/tpu_pod.sh", ["my-tpu", "zone-a", "--workdir", "/mnt/a b"],
                       tmp_path, tmp_path)
    assert calls[0].split(" xla=")[0].endswith(r"mtjax train --workdir /mnt/a\ b"), calls


def test_slurm_gives_each_task_the_jobs_cpus(tmp_path):
    """#SBATCH --cpus-per-task=32 did not reach the tasks: since Slurm 22.05 srun no longer
    reads SLURM_CPUS_PER_TASK, so each task ran on one core (input pipeline and XLA's host
    threads included); SRUN_CPUS_PER_TASK passes it on. One the user set stays."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text('#!/usr/bin/env bash\necho "srun_cpus=${SRUN_CPUS_PER_TASK:-unset}" '
                    '>> "$CALLS"\n')
    srun.chmod(0o755)
    for given, want in (({"SLURM_CPUS_PER_TASK": "32"}, "32"),
                        ({"SLURM_CPUS_PER_TASK": "32", "SRUN_CPUS_PER_TASK": "8"}, "8"),
                        ({}, "unset")):
        (tmp_path / "calls").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.endswith("CPUS_PER_TASK")}
        proc = subprocess.run(
            ["bash", str(REPO / "launch/slurm.sbatch")], cwd=REPO, capture_output=True,
            text=True, timeout=60,
            env={**env, **given, "CALLS": str(tmp_path / "calls"), "SLURM_SUBMIT_DIR": str(REPO),
                 "PATH": f"{tmp_path / 'bin'}:{env['PATH']}"})
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "calls").read_text().split() == [f"srun_cpus={want}"], given


def test_gpu_lease_exits_with_the_sweeps_code(tmp_path):
    """benchmarks/gpu/lease.sh printed "sweep exit 124" and then exited 0: a failed or timed-out
    sweep (timeout's 124) read as a success in the run's exit status."""
    for name in ("nvidia-smi", "python3", "timeout"):
        _stand_in(tmp_path, name)
    # nvidia-smi, the version check, the smoke benchmark (timeout), then the sweep (timeout).
    for codes, want in (("0 0 0 124", 124), ("0 0 0 0", 0)):
        for name in ("calls", "calls.n"):
            (tmp_path / name).unlink(missing_ok=True)
        proc, calls = _run("benchmarks/gpu/lease.sh", [], tmp_path, tmp_path,
                           OUT=str(tmp_path / "out"), EXIT_CODES=codes)
        assert len(calls) == 4 and "sweep.py" in calls[3], calls
        assert f"sweep exit {want}" in proc.stdout and proc.returncode == want, proc.stdout
