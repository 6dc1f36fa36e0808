"""Meshes and logical sharding on 8 fake CPU devices (subprocesses, so XLA_FLAGS take effect):
sharded training equals single-device training, shardings follow the rules, bad meshes fail
early, and two processes train as one multi-host run."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_python

from mtjax import config as config_lib
from mtjax.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["model.name=t5_1_1_test", "eval.at_end=false",
        "train.batch_size=8", "data.inputs_length=32",
        "data.targets_length=16", "optim.name=adamw", "optim.learning_rate=0.003",
        "optim.warmup_steps=2"]
MESHES = {
    "single": ("1", "1", "1", "fsdp"),
    "data8": ("8", "1", "1", "data"),
    "data2_fsdp4": ("2", "4", "1", "fsdp"),
    "data2_fsdp2_tensor2": ("2", "2", "2", "fsdp_tensor"),
    "fsdp4_tensor2": ("1", "4", "2", "fsdp_tensor"),
}

# Runs 5 steps of the real jitted train step on every mesh, same packed batches; prints JSON.
EQUIVALENCE = """
import json, sys
import jax, numpy as np
from mtjax import config as config_lib
from mtjax.train import setup as setup_lib
from mtjax.train.dryrun import dry_run

tiny, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])

def packed_batches(n, b=8, s=32, t=16, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = {}
        for side, length in (("encoder", s), ("decoder", t)):
            cut, end = length // 2, length - 3  # two examples per row, then padding
            seg = np.zeros((b, length), np.int32); seg[:, :cut] = 1; seg[:, cut:end] = 2
            pos = np.where(seg == 1, np.arange(length), np.arange(length) - cut) * (seg > 0)
            batch[f"{side}_segment_ids"], batch[f"{side}_positions"] = seg, pos.astype(np.int32)
        tok = lambda shape: rng.integers(2, vocab, shape, dtype=np.int32)
        batch["encoder_input_tokens"] = tok((b, s)) * (batch["encoder_segment_ids"] > 0)
        seg = batch["decoder_segment_ids"]
        targets = tok((b, t)) * (seg > 0)
        inputs = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1)
        inputs[batch["decoder_positions"] == 0] = 0  # BOS at each example start
        batch.update(decoder_target_tokens=targets, decoder_input_tokens=inputs * (seg > 0),
                     decoder_loss_weights=(seg > 0).astype(np.int32),
                     decoder_task_ids=np.where(seg > 0, seg, 0).astype(np.int32))
        out.append(batch)
    return out

from mtjax import kernels

results = {}
batches = packed_batches(1) * 5  # one batch, seen 5 times: the loss must fall
for name, (data, fsdp, tensor, rules) in meshes.items():
    print(f"MESH {name}", file=sys.stderr, flush=True)  # XLA's warnings follow on stderr
    # auto keeps the loss kernel off meshes of devices sharing a process: ask for it where the
    # rules keep the vocabulary whole, so the kernel's split is trained here too.
    loss = "cpu_fused" if kernels.cpu_kernel_status()[0] and rules != "fsdp_tensor" else "auto"
    config = config_lib.load(None, tiny + [f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                           f"mesh.tensor={tensor}", f"mesh.rules={rules}",
                                           f"train.cross_entropy={loss}"])
    devices = jax.devices()[:1] if name == "single" else None
    mesh, rules_table = setup_lib.mesh_and_rules(config, devices=devices)
    setup = setup_lib.build(config, vocab_size=256, num_tasks=2, mesh=mesh, rules=rules_table)
    state = setup.init_state(config.train.seed)
    # No mesh in force here: the step brings its own (the trainer's loop has one anyway).
    step_text = setup.step.lower(
        state, {k: jax.device_put(v, setup.batch_sharding) for k, v in batches[0].items()}
    ).as_text()
    losses, tokens = [], []
    for batch in batches:
        expected_tokens = sum(np.count_nonzero(batch[k])
                              for k in ("encoder_input_tokens", "decoder_target_tokens"))
        batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
        state, metrics = setup.step(state, batch)
        losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
        tokens.append((int(metrics["tokens"]), int(expected_tokens)))
    params = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    specs = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a: str(tuple(a.sharding.spec)), state.params))[0]
    opt_specs = [str(tuple(x.sharding.spec)) for x in jax.tree.leaves(state.opt_state)
                 if hasattr(x, "sharding") and x.ndim == 2]
    report = dry_run(config, vocab_size=256, compile_step=False, mesh=mesh, rules=rules_table)
    results[name] = {
        "losses": losses,
        "tokens": tokens,
        "kernel_calls": {kernel: step_text.count(f"mtjax_{kernel}_cpu_forward")
                         for kernel in ("attention", "cross_entropy")},
        "split_per_device": step_text.count("manual_computation"),  # shard_map's regions
        "sharding_constraints": step_text.count("sharding_constraint"),
        "params": {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in params},
        "specs": {jax.tree_util.keystr(k): v for k, v in specs},
        "opt_specs": opt_specs,
        "param_bytes_per_device": report["param_bytes_per_device"],
        "param_bytes_total": report["param_bytes_total"],
        "opt_bytes_per_device": report["opt_state_bytes_per_device"],
        "opt_bytes_total": report["opt_state_bytes_total"],
    }
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def mesh_runs():
    # Warnings on (conftest silences them): XLA's partitioner reports on stderr.
    proc = run_python(EQUIVALENCE, json.dumps(TINY), json.dumps(MESHES), devices=8,
                      env={"TF_CPP_MIN_LOG_LEVEL": "1"})
    runs = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for part in proc.stderr.split("MESH ")[1:]:
        name, _, log = part.partition("\n")
        runs[name]["compile_log"] = log
    return runs


@pytest.mark.parametrize("mesh", [m for m in MESHES if m != "single"])
def test_sharded_training_equals_single_device(mesh_runs, mesh):
    single, sharded = mesh_runs["single"], mesh_runs[mesh]
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=2e-5)
    assert single["losses"][-1] < single["losses"][0]  # the steps really train
    # The step counts the whole batch's tokens, not one device's share (tokens/s in rows).
    for counted, expected in sharded["tokens"] + single["tokens"]:
        assert counted == expected > 0
    for name, value in single["params"].items():
        np.testing.assert_allclose(np.asarray(sharded["params"][name]), np.asarray(value),
                                   rtol=2e-4, atol=2e-6, err_msg=f"{mesh}: {name}")


def test_no_mesh_makes_xla_replicate_a_tensor_whole(mesh_runs):
    """XLA's partitioner replicates a tensor on every device when it finds no collective for
    a change of sharding, and says so: it did for the embedding's cotangent when the batch
    is split over data+fsdp (traffic growing with the global batch, once per stack)."""
    for name, run in mesh_runs.items():
        assert "Involuntary full rematerialization" not in run["compile_log"], (
            name, run["compile_log"][-3000:])


def test_embedding_lookup_runs_where_the_table_lives():
    """``first=("embed",)`` lets ``embed`` keep its mesh axis; the batch takes what is left."""
    import jax

    from mtjax.model import layers

    mesh = jax.sharding.AbstractMesh((2, 4, 1), mesh_lib.MESH_AXES)
    with jax.sharding.use_abstract_mesh(mesh), layers.nnx.logical_axis_rules(
            mesh_lib.get_rules("fsdp")):
        names = ("batch", "length", "embed")
        assert layers.logical_spec(names) == jax.P(("data", "fsdp"), None, None)
        assert layers.logical_spec(names, first=("embed",)) == jax.P("data", None, "fsdp")


def test_sharded_step_runs_the_cpu_kernels_on_each_devices_part(mesh_runs):
    """Whatever mesh the caller has in force (none here), the step traces under its own: the
    model's sharding constraints apply and the CPU kernels run per device (shard_map), the
    loss kernel wherever the rules keep the vocabulary whole (asked for by name there: with
    several devices in one process auto leaves it out)."""
    from mtjax import kernels

    if not kernels.cpu_kernel_status()[0]:
        pytest.skip(f"CPU kernels unavailable: {kernels.cpu_kernel_status()[1]}")
    for name, run in mesh_runs.items():
        vocab_split = name.endswith("tensor2")
        assert run["kernel_calls"] == {"attention": 6, "cross_entropy": 0 if vocab_split else 1}
        if name != "single":
            assert run["split_per_device"] > 0 and run["sharding_constraints"] > 0, name


def test_parameter_shardings_follow_the_rules(mesh_runs):
    query = "['encoder']['layers'][0]['attention']['query']['kernel']"
    wo = "['decoder']['layers'][1]['mlp']['wo']['kernel']"
    assert mesh_runs["data8"]["specs"][query] == "(None, None)"
    assert mesh_runs["data2_fsdp4"]["specs"][query] == "('fsdp', None)"
    assert mesh_runs["data2_fsdp2_tensor2"]["specs"][query] == "('fsdp', 'tensor')"
    assert mesh_runs["fsdp4_tensor2"]["specs"][wo] == "('tensor', 'fsdp')"
    # AdamW's two moments mirror the parameters' shardings (ZeRO-3: optimizer state sharded).
    run = mesh_runs["data2_fsdp4"]
    matrix_specs = [spec for name, spec in run["specs"].items()
                    if np.asarray(run["params"][name]).ndim == 2]
    assert sorted(run["opt_specs"]) == sorted(matrix_specs * 2)
    assert sum("fsdp" in spec for spec in matrix_specs) >= len(matrix_specs) - 2  # not relpos


def test_fsdp_divides_per_device_memory(mesh_runs):
    data = mesh_runs["data8"]
    assert data["param_bytes_per_device"] == data["param_bytes_total"]  # replicated
    for mesh, factor in (("data2_fsdp4", 4), ("data2_fsdp2_tensor2", 4), ("fsdp4_tensor2", 8)):
        run = mesh_runs[mesh]
        # Norm scales and the tiny relative-bias tables may stay replicated: allow 10%.
        assert run["param_bytes_per_device"] <= 1.1 * run["param_bytes_total"] / factor, mesh
        assert run["opt_bytes_per_device"] <= 1.1 * run["opt_bytes_total"] / factor, mesh


# Compiles (runs nothing) the step with 2 microbatches on each mesh; prints its collectives.
MICROBATCH_COLLECTIVES = """
import json, re, sys
from mtjax import config as config_lib
from mtjax.train import setup as setup_lib

tiny, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
results = {}
for name, (data, fsdp, tensor, rules) in meshes.items():
    config = config_lib.load(None, tiny + [
        "train.batch_size=16", "train.microbatches=2", f"mesh.data={data}",
        f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.rules={rules}"])
    setup = setup_lib.build(config, vocab_size=256, num_tasks=2)
    print(f"MESH {name}", file=sys.stderr, flush=True)
    text = setup.step.lower(setup.target(), setup.abstract_batch(16, 32, 16)).compile().as_text()
    results[name] = {
        op: len(re.findall(rf"= \\S+ {op}(-start)?\\(", text))
        for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce")}
print("RESULTS" + json.dumps(results))
"""


def test_microbatches_add_no_collectives():
    """Each microbatch takes rows from every device's part of the batch: splitting a step into
    microbatches moves no rows between devices. With contiguous microbatches a data=8 step
    gained 22 collective permutes and 13 all-gathers, and fsdp=4, tensor=2 replicated the
    embedding lookup's input whole. With train.loss_normalization=per_sequence, whose sums
    over each packed sequence run before the split, rows stay where they are too."""
    meshes = {name: MESHES[name] for name in ("data8", "fsdp4_tensor2")}
    tiny = TINY + ["train.loss_normalization=per_sequence"]
    proc = run_python(MICROBATCH_COLLECTIVES, json.dumps(tiny), json.dumps(meshes), devices=8,
                      env={"TF_CPP_MIN_LOG_LEVEL": "1"})
    counts = json.loads(proc.stdout.split("RESULTS", 1)[1])
    # Data parallel: the gradients' all-reduce and nothing else (as without microbatches).
    data8 = counts["data8"]
    assert data8["all-reduce"] > 0, data8
    assert data8["collective-permute"] == data8["all-gather"] == data8["all-to-all"] == 0, data8
    assert "Involuntary full rematerialization" not in proc.stderr


BAD_MESH = """
import sys
from mtjax import config as config_lib
from mtjax.train import setup as setup_lib
for overrides in (["train.batch_size=6", "mesh.data=4", "mesh.fsdp=2"],
                  ["mesh.data=3", "mesh.fsdp=1"], ["mesh.data=2", "mesh.fsdp=2"],
                  ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4", "mesh.rules=fsdp_tensor",
                   "model.name=t5_1_1_test"],
                  ["mesh.data=2", "mesh.fsdp=4", "mesh.rules=batch=data,embed=fsdp,mlp=fsdp",
                   "model.name=t5_1_1_test"],
                  ["mesh.dcn_data=2"]):
    try:
        config = config_lib.load(None, overrides)
        setup_lib.build(config, vocab_size=384, num_tasks=1)
    except Exception as e:
        print(type(e).__name__, "|", e)
"""


def test_bad_mesh_is_a_clear_error_before_compiling(subprocess_python):
    lines = subprocess_python(BAD_MESH, devices=8).stdout.strip().splitlines()
    assert len(lines) == 6, lines
    assert lines[0].startswith("ConfigError") and "train.batch_size=6" in lines[0]
    assert "mesh.data*mesh.fsdp" in lines[0]
    assert lines[1].startswith("MeshError") and "8 devices" in lines[1]
    assert lines[2].startswith("MeshError") and "-1 to fill" in lines[2]
    # t5_1_1_test has 2 heads: tensor=4 cannot split them; named before compiling.
    assert lines[3].startswith("MeshError") and "mesh.tensor = 4" in lines[3]
    assert "relpos_bias" in lines[3] or "heads" in lines[3]
    # Two axes of one parameter on one mesh axis: named, not JAX's DuplicateSpecError.
    assert lines[4].startswith("MeshError") and "map to mesh axis 'fsdp'" in lines[4]
    assert "mlp.wi" in lines[4] and "mlp=none" in lines[4]
    # dcn_* spans processes: 2 on one process names the count and the fix, not mesh_utils' slices.
    assert lines[5].startswith("MeshError") and "1 process" in lines[5], lines[5]
    assert "mesh.dcn_data" in lines[5] and "mesh.data" in lines[5] and "slices" not in lines[5]


def test_an_unrelated_model_error_is_raised_as_itself(monkeypatch):
    """A failure while building the model's shapes is diagnosed for a doubled mesh axis; an
    unrelated one is raised as it was, not again by the diagnosis with the first chained."""
    from mtjax.model import sizes, t5
    from mtjax.train import state

    def broken(*args, **kwargs):
        raise ValueError("broken model")

    monkeypatch.setattr(t5, "T5", broken)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape())
    with pytest.raises(ValueError, match="broken model") as info:
        state.abstract_model(sizes.get_config("t5_1_1_test"), mesh, mesh_lib.get_rules("fsdp"))
    assert info.value.__context__ is None


def test_rules_table_and_unknown_axis():
    rules = dict(mesh_lib.get_rules("batch=data+fsdp,embed=fsdp,heads=tensor"))
    assert rules["batch"] == ("data", "fsdp") and rules["heads"] == "tensor"
    assert rules["mlp"] is None  # unnamed logical axes replicate
    with pytest.raises(config_lib.ConfigError, match="unknown mesh axis 'fsdpp'"):
        config_lib.load(None, ["mesh.rules=embed=fsdpp"])
    with pytest.raises(config_lib.ConfigError, match="did you mean 'heads'"):
        config_lib.load(None, ["mesh.rules=head=tensor"])


def test_cli_dry_run_reports_plan_without_training(tmp_path, capsys):
    from mtjax import cli

    code = cli.main(["train", "--dry-run", "--workdir", str(tmp_path / "run"), *TINY])
    out, err = capsys.readouterr()
    report = json.loads(out)
    # The table's columns line up however long the names are.
    table = err[err.index("parameter  "):].split("\n\n")[0].splitlines()
    assert len(table) > 5 and len({line.index(" (") for line in table[1:]}) == 1, table
    assert code == 0 and not (tmp_path / "run").exists()
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert report["param_bytes_per_device"] == report["param_bytes_total"] == 4 * report["params"]
    assert report["compile_s"] > 0 and report["compiled_memory_per_device"]
    names = {g["name"] for g in report["parameter_groups"]}
    assert "encoder.layers.*.attention.query.kernel" in names
    # A plan checks what the run would refuse at start: an eval.mixture it cannot evaluate.
    code = cli.main(["train", "--dry-run", *TINY, "eval.mixture=mtjax_revers"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.mixture: Unknown task or mixture 'mtjax_revers'" in err, err
    # And an eval.split no task has (the plan said nothing; the run then refused it).
    code = cli.main(["train", "--dry-run", *TINY, "eval.at_end=true", "eval.split=bogus"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.split='bogus': no task of mtjax_demo with metrics" in err, err


@pytest.mark.slow
def test_two_processes_train_as_one_run(tmp_path):
    """2 processes x 4 CPU devices through launch/local_multiprocess.sh and gloo: same global
    loss on both hosts, the loss falls, disjoint data shards, a profile per host; the checkpoint
    then restores in one process on another mesh and continues from its step."""
    workdir = tmp_path / "run"
    env = dict(os.environ, MTJAX_LOCAL_DEVICES="8",
               MTJAX_BIN=f"{sys.executable} -m mtjax", JAX_PLATFORMS="cpu")
    args = [*TINY, "train.steps=20", "log.every_steps=2", "log.all_processes=true",
            "log.tensorboard=false", "checkpoint.every_steps=10", "log.profile_steps=1",
            "mesh.data=1", "mesh.fsdp=-1", "mesh.dcn_data=2"]  # hybrid: data across hosts
    proc = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), "2",
                           "--workdir", str(workdir), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data       2" in proc.stderr and "fsdp       4" in proc.stderr  # the hybrid mesh
    hosts = [[json.loads(line) for line in (workdir / f"processes/process_{i}.jsonl")
              .read_text().splitlines()] for i in (0, 1)]
    assert [r["step"] for r in hosts[0]] == list(range(2, 21, 2))
    assert [r["loss"] for r in hosts[0]] == [r["loss"] for r in hosts[1]]
    assert hosts[0][-1]["loss"] < 0.9 * hosts[0][0]["loss"]
    seen = [{h for r in host for h in r["example_hashes"]} for host in hosts]
    overlap = len(seen[0] & seen[1]) / min(len(seen[0]), len(seen[1]))
    assert overlap < 0.2, overlap  # the same shard would overlap ~100%
    assert (workdir / "checkpoints/20/data/process_1").is_dir()
    # log.profile_steps: each host traces into its own folder (they share a host name here).
    for i in (0, 1):
        assert len(list((workdir / f"profile/process_{i}").rglob("*.xplane.pb"))) == 1

    # One process, 8 devices, another mesh: restores step 20 and trains on to 24.
    one = subprocess.run(
        [sys.executable, "-m", "mtjax", "train", "--workdir", str(workdir), "--no-progress",
         *TINY, "train.steps=24", "log.every_steps=2", "log.tensorboard=false",
         "checkpoint.every_steps=10", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
         "mesh.rules=fsdp_tensor"],
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming from" in one.stderr and "written by 2 host(s)" in one.stderr
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-2:] == [22, 24]
    assert records[-1]["loss"] < 1.2 * hosts[0][-1]["loss"]


ON_HOST_1 = "import os, signal\nif os.environ['MTJAX_PROCESS_ID'] == '1':\n    {}\n"
CONFIG_FILE = "from mtjax.config import Config\ndef get_config():\n    return Config()\n"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tasks_module", "config_file"])
def test_a_set_up_error_on_one_host_stops_every_host_in_one_line(tmp_path, where):
    """A tasks module or a config file that fails on process 1 alone: process 0 stops too, at
    once, with one line and exit code 2. Before, a tasks module left process 0 to die in the
    run lock's broadcast 30 s later with a gloo traceback and exit code 1, and a config file
    left it waiting 300 s in jax.distributed's start, then aborting with a C++ trace."""
    module = tmp_path / "one_host.py"
    module.write_text(ON_HOST_1.format("raise ValueError('this host lacks the data')")
                      + (CONFIG_FILE if where == "config_file" else ""))
    flag = ["--tasks-module" if where == "tasks_module" else "--config", str(module)]
    host0, host1, code = _run_two_hosts(tmp_path, [*flag, *TINY, "train.steps=2"])
    assert code == 2, host0[-3000:]
    assert "process(es) 1 stopped in set-up" in host0, host0[-3000:]
    assert "this host lacks the data" in host1, host1[-3000:]
    for output in (host0, host1):
        assert "Traceback" not in output and "DEADLINE_EXCEEDED" not in output
    assert not (tmp_path / "run").exists()  # nothing written before every host agreed


def test_a_start_that_fails_leaves_this_hosts_own_error(monkeypatch):
    """A set-up error before jax.distributed started starts it to tell the other hosts; if
    that start fails too (no coordinator), the host's own one-line error is still the one
    raised, not the start's traceback."""
    from mtjax.errors import UserError
    from mtjax.parallel import distributed

    def unreachable() -> bool:
        raise RuntimeError("coordinator unreachable")

    monkeypatch.setattr(distributed, "_started", False)
    monkeypatch.setattr(distributed, "initialize_from_env", unreachable)
    assert distributed.stop_with_the_others(UserError("unknown config key")) is None


@pytest.mark.slow
def test_a_sigterm_while_one_host_starts_stops_every_host(tmp_path):
    """SIGTERM to process 1 while it reads its config, before JAX's preemption service exists:
    every host exits 42 before writing anything (the signal was lost, and the run trained to
    its end and exited 0)."""
    config = tmp_path / "config.py"
    config.write_text(ON_HOST_1.format("os.kill(os.getpid(), signal.SIGTERM)") + CONFIG_FILE)
    host0, host1, code = _run_two_hosts(tmp_path, ["--config", str(config), *TINY,
                                                   "train.steps=2"])
    assert code == 42, host0[-3000:] + host1[-3000:]
    assert "SIGTERM during set-up (process(es) 1): nothing new to save" in host0, host0[-3000:]
    assert not (tmp_path / "run").exists()


def _run_two_hosts(tmp_path: pathlib.Path, args: list[str]) -> tuple[str, str, int]:
    """``mtjax train`` as two local processes of one device each: (process 0's output,
    process 1's log, the launcher's exit code)."""
    env = dict(os.environ, MTJAX_LOCAL_DEVICES="2", MTJAX_LOG_DIR=str(tmp_path),
               MTJAX_BIN=f"{sys.executable} -m mtjax", JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), "2",
                           "--workdir", str(tmp_path / "run"), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    return (proc.stdout + proc.stderr, (tmp_path / "mtjax_process_1.log").read_text(),
            proc.returncode)


# Run by launch/local_multiprocess.sh in place of mtjax (its "train ..." arguments ignored): both
# CPU kernels and the XLA paths on the same global arrays, split over the processes.
KERNELS_OVER_PROCESSES = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mtjax.parallel import distributed
distributed.initialize_from_env()
from mtjax.kernels import attention as kernel_attention
from mtjax.kernels import cross_entropy as fused_ce
from mtjax.model import attention as attention_lib
from mtjax.model import softmax as softmax_lib
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import step as step_lib

rng = np.random.default_rng(0)  # the same global arrays in every process
b, q_len, s_len, h, d = 4, 24, 40, 4, 16
host = {"q": rng.normal(size=(b, q_len, h, d)) * 0.5, "k": rng.normal(size=(b, s_len, h, d)) * 0.5,
        "v": rng.normal(size=(b, s_len, h, d)) * 0.5, "probe": rng.normal(size=(b, q_len, h, d))}
diagonals_host = rng.normal(size=(h, q_len + s_len - 1))
mask_host = rng.random((b, q_len, s_len)) > 0.3
logits_host = rng.normal(size=(b, 6, 301)) * 3
targets_host = rng.integers(0, 301, (b, 6))
probes_host = rng.normal(size=(2, b, 6))

mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(jax.device_count(), 1, 1))
rows = slice(jax.process_index() * b // jax.process_count(),
             (jax.process_index() + 1) * b // jax.process_count())
def split(x, dtype=jnp.float32):  # batch over the processes, each giving its own rows
    spec = P("data", *(None,) * (x.ndim - 1))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec),
                                                  np.asarray(x[rows], dtype))
def replicated(x, dtype=jnp.float32):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(x, dtype))
q, k, v, probe = (split(host[n]) for n in ("q", "k", "v", "probe"))
diagonals, mask = replicated(diagonals_host), split(mask_host, jnp.bool_)
logits, targets = split(logits_host), split(targets_host, jnp.int32)
probes = split(np.moveaxis(probes_host, 0, 1))  # [B, 2, L]

def local(x):
    return np.concatenate([np.asarray(s.data) for s in x.addressable_shards]) if not \\
        x.sharding.is_fully_replicated else np.asarray(x.addressable_data(0))

out = {"process": jax.process_index(), "local_devices": jax.local_device_count()}
with mesh_lib.activate(mesh, mesh_lib.get_rules("fsdp")):
    out["attention"] = attention_lib.resolve_attention("auto", jnp.float32)
    out["loss"] = step_lib.resolve_cross_entropy("auto")
    def attention_grads(attend):
        def objective(q, k, v, dg, mask, probe):
            return jnp.sum(attend(q, k, v, dg, mask) * probe)
        f = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3)))
        value, grads = f(q, k, v, diagonals, mask, probe)
        return f, [local(value), *map(local, grads)]
    f, got = attention_grads(kernel_attention.cpu_attention)
    _, want = attention_grads(lambda q, k, v, dg, mask: attention_lib.softmax_attention(
        q, k, v,
        attention_lib.AttentionBias(None, mask, position_diagonals=dg).dense(q_len, s_len)))
    out["attention_in_hlo"] = "mtjax_attention_cpu_forward" in f.lower(
        q, k, v, diagonals, mask, probe).as_text()
    out["attention_errors"] = [float(np.abs(g - w).max() / max(1.0, np.abs(w).max()))
                               for g, w in zip(got, want)]
    def loss_grads(function):
        def objective(x, targets, probes):
            loss, z, correct = function(x, targets, 1e-2)
            return jnp.sum(loss * probes[:, 0] + z * probes[:, 1]), correct
        f = jax.jit(jax.value_and_grad(objective, has_aux=True))
        (value, correct), grad = f(logits, targets, probes)
        return f, [local(value), local(correct), local(grad)]
    def reference(x, t, z_loss):
        loss, z = step_lib.cross_entropy_with_z_loss(x, t, z_loss)
        return loss, z, (softmax_lib.first_argmax(x) == t).astype(jnp.float32)
    f, got = loss_grads(lambda x, t, z: fused_ce.cross_entropy_with_z_loss(x, t, z))
    _, want = loss_grads(reference)
    out["loss_in_hlo"] = "mtjax_cross_entropy_cpu_forward" in f.lower(
        logits, targets, probes).as_text()
    out["loss_errors"] = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
print("RESULT" + json.dumps(out), flush=True)
"""


def test_cpu_kernels_split_over_processes_equal_xla(tmp_path):
    """Two processes with one CPU device each (a CPU cluster's layout), gloo between them:
    auto picks both kernels, each process runs them on its own batch rows, and the values and
    gradients equal XLA's attention and loss, the position bias's gradient summed across the
    processes."""
    from mtjax import kernels

    if not kernels.cpu_kernel_status()[0]:
        pytest.skip(f"CPU kernels unavailable: {kernels.cpu_kernel_status()[1]}")
    script = tmp_path / "kernels_over_processes.py"
    script.write_text(KERNELS_OVER_PROCESSES)
    env = dict(os.environ, MTJAX_LOCAL_DEVICES="2", MTJAX_LOG_DIR=str(tmp_path),
               MTJAX_BIN=f"{sys.executable} {script}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [proc.stdout, (tmp_path / "mtjax_process_1.log").read_text()]
    results = [json.loads(out.split("RESULT", 1)[1].splitlines()[0]) for out in outputs]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["local_devices"] == 1
        assert (r["attention"], r["loss"]) == ("cpu_fused", "cpu_fused")
        assert r["attention_in_hlo"] and r["loss_in_hlo"]
        assert max(r["attention_errors"]) <= 1e-5  # relative to each output's largest value
        assert r["loss_errors"][0] <= 1e-4 and r["loss_errors"][1] == 0.0
        assert r["loss_errors"][2] <= 1e-6


def _process_with_id(process_id: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mtjax" in cmdline and f"MTJAX_PROCESS_ID={process_id}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_hosts_at_one_step(tmp_path):
    """SIGTERM to process 1 only: both processes save the same step (JAX's preemption sync
    point) and the launcher exits 42; the next run resumes from that step. One device per
    process, as on a real CPU cluster: the step runs both CPU kernels split over the
    processes where they build."""
    import time

    workdir = tmp_path / "run"
    env = dict(os.environ, MTJAX_LOCAL_DEVICES="2", MTJAX_LOG_DIR=str(tmp_path),
               MTJAX_BIN=f"{sys.executable} -m mtjax", JAX_PLATFORMS="cpu")
    args = ["--workdir", str(workdir), "--no-progress", *TINY, "train.batch_size=4",
            "train.steps=500", "log.every_steps=1", "log.tensorboard=false",
            "checkpoint.every_steps=1000"]
    launcher = subprocess.Popen(["bash", str(REPO / "launch/local_multiprocess.sh"), "2", *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.1)
    os.kill(_process_with_id(1), 15)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 42, output[-3000:]
    saved = int(output.split("SIGTERM: saved step ")[1].split(";")[0])
    assert 3 <= saved < 500
    step_dir = workdir / "checkpoints" / str(saved)
    assert (step_dir / "data/process_0").is_dir() and (step_dir / "data/process_1").is_dir()
    assert f"Reached preemption sync point, step={saved}" in (
        tmp_path / "mtjax_process_1.log").read_text()
    # The run directory held by another writer: every process stops in one line (process 1
    # failed later, in a collective, with a traceback).
    import fcntl

    with open(workdir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        again = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), "2", *args],
                               env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "is in use by another mtjax train" in again.stderr
    log_1 = (tmp_path / "mtjax_process_1.log").read_text()
    assert "is in use by another mtjax train (see process 0)" in log_1
    assert "Traceback" not in log_1, log_1[-3000:]


def test_launcher_sigterm_exits_with_the_processes_code(tmp_path):
    """SIGTERM to launch/local_multiprocess.sh reaches every process, and the launcher exits
    with their code (42: preempted), not with the 143 of its own interrupted `wait`."""
    import signal
    import time

    fake = tmp_path / "fake_mtjax.sh"  # stands in for `mtjax`: exits 42 a moment after SIGTERM
    fake.write_text("trap 'sleep 0.5; exit 42' TERM\necho ready\nwhile true; do sleep 0.1; done\n")
    env = dict(os.environ, MTJAX_BIN=f"bash {fake}", MTJAX_LOG_DIR=str(tmp_path),
               MTJAX_LOCAL_DEVICES="2")
    launcher = subprocess.Popen(["bash", str(REPO / "launch/local_multiprocess.sh"), "2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    assert launcher.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # process 1 has started too
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == 42, output


@pytest.mark.parametrize("table", ["batch=fsdp+fsdp", "embed=fsdp+fsdp", "batch=data+fsdp+data"])
def test_a_rule_naming_a_mesh_axis_twice_is_one_line(table):
    """``batch=fsdp+fsdp`` asked for a batch divisible by fsdp squared, and with one that was,
    stopped in JAX's DuplicateSpecError traceback; ``embed=fsdp+fsdp`` said "both embed and
    embed map to mesh axis 'fsdp'"."""
    logical = table.split("=")[0]
    with pytest.raises(config_lib.ConfigError, match=f"logical axis '{logical}' maps to .*, a "
                       f"mesh axis twice; name each mesh axis once, e.g. {logical}="):
        config_lib.load(None, [f"mesh.rules={table}"])
    with pytest.raises(mesh_lib.MeshError, match="a mesh axis twice"):
        mesh_lib.get_rules(tuple(mesh_lib.parse_rules(table)))


@pytest.mark.parametrize("overrides, axis", [
    (["mesh.fsdp=4", "mesh.tensor=2"], "tensor"),  # the default preset, fsdp
    (["mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=data"], "tensor"),
    (["mesh.data=2", "mesh.fsdp=4", "mesh.rules=batch=fsdp,embed=fsdp"], "data"),
])
def test_a_mesh_axis_no_rule_uses_is_one_line(monkeypatch, overrides, axis):
    """mesh.tensor=2 under the fsdp preset (which maps nothing to tensor) trained with every
    device doing twice the FLOPs of fsdp=8 (counted by XLA's cost analysis: 2.23e7 against
    1.14e7 per device for t5_1_1_test), and no word said."""
    import jax

    from mtjax.train import setup as setup_lib

    config = config_lib.load(None, ["train.batch_size=8", *overrides])
    shape = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)  # 8 devices, here none
    monkeypatch.setattr(mesh_lib, "make_mesh", lambda *args, **kwargs: jax.sharding.AbstractMesh(
        shape, mesh_lib.MESH_AXES))
    with pytest.raises(config_lib.ConfigError, match=f"the {axis} axis has 2 devices, but "
                       f"mesh.rules=.* splits nothing over it, .*; set mesh.{axis}=1"):
        setup_lib.mesh_and_rules(config)
    # With rules that use every axis the same mesh is fine.
    config = config_lib.load(None, ["train.batch_size=8", *overrides[:2],
                                    "mesh.rules=batch=data+fsdp,embed=fsdp,heads=tensor"])
    setup_lib.mesh_and_rules(config)
