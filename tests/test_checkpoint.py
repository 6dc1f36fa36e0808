"""Checkpoints for long runs: exact resume after SIGKILL and SIGTERM (fresh processes, random
step), incomplete or unreadable checkpoints skipped with a message, keep-latest-plus-best, the
`mtjax checkpoints` listing, and restore onto another mesh."""

import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_python

from mtjax import cli
from mtjax import config as config_lib
from mtjax.train import metrics as metrics_lib

TINY = ["model.name=t5_1_1_test", "eval.at_end=false",
        "data.inputs_length=32", "data.targets_length=16",
        "train.batch_size=4", "log.tensorboard=false"]


def _train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "mtjax", "train", "--workdir", str(workdir), "--no-progress",
            *TINY, *overrides]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _wait_for_step_and_checkpoint(proc, run_dir, step, timeout=300):
    """Polls until the run has logged `step` (or later) and committed at least one checkpoint,
    then returns the last logged step. Both are checked in one poll so that the signal follows
    at once: the run keeps going meanwhile, and a tiny model's step takes milliseconds."""
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        # Orbax writes commit_success.txt into its temporary directory and only then renames
        # it to the step's name: a kill in between leaves no checkpoint, so wait for the name.
        committed = [p for p in (run_dir / "checkpoints").glob("*/commit_success.txt")
                     if p.parent.name.isdigit()]
        if committed and metrics_file.exists():
            steps = [json.loads(x)["step"] for x in metrics_file.read_text().splitlines() if x]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} and committed checkpoint within {timeout}s")


def _params(run_dir, step):
    return _saved_params(run_dir / "checkpoints" / str(step) / "state")


def _saved_params(state_dir):
    """The saved parameters, read onto one device as their tree metadata describes them (Orbax
    warns when a restore is given no shardings)."""
    import jax
    import orbax.checkpoint as ocp

    from mtjax.checkpoint.read import tree_metadata

    tree = tree_metadata(state_dir).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device), tree)
    state = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


class _Position:
    """An input pipeline's position (a run's checkpoint holds one), for RunCheckpoints alone."""

    def save(self, path):
        pathlib.Path(path, "position").write_text("0")

    def restore(self, path):
        pass


def _change_a_parameter_on_disk(step_dir):
    """Flip one bit inside the data file of a step's parameters, at the first of a few places
    where the file still decodes, to other values (each place tried so far does: Orbax keeps no
    checksum of array data)."""
    state_dir = step_dir / "state"
    before = _saved_params(state_dir)
    files = sorted(state_dir.glob("ocdbt.process_*/d/*"), key=lambda f: -f.stat().st_size)
    for f in files[:2]:
        original = f.read_bytes()
        for where in (0.5, 0.35, 0.65, 0.45):
            data = bytearray(original)
            data[int(len(data) * where)] ^= 1
            f.write_bytes(bytes(data))
            try:
                after = _saved_params(state_dir)
            except Exception:  # noqa: BLE001 - a place Orbax finds damaged: try the next
                continue
            if any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
                return
        f.write_bytes(original)
    raise AssertionError(f"no flipped bit in {state_dir} decoded to other parameters")


@pytest.mark.slow
def test_exact_resume_after_sigkill_and_sigterm(tmp_path):
    """An uninterrupted run vs one run stopped at a random step by SIGKILL, restarted with the
    same command, stopped again later by SIGTERM, and restarted again: identical per-step
    losses and final parameters.

    The run is 48 steps though the stops come within the first 25: a signal must land before
    the run ends, and the tiny model goes through a step in tens of milliseconds (a 16-step run
    once finished between the test's polls on a loaded CI machine)."""
    total = 48
    # The four runs compile the same programs: the later ones load them from a cache (about
    # 6 s each here), and the resumed runs must match the uninterrupted one all the same.
    # Logged every 3 steps, saved every 4: a SIGTERM mostly lands between logging steps, and
    # the steps since the last row travel with its checkpoint (the rows must match too).
    overrides = [f"train.steps={total}", "checkpoint.every_steps=4", "log.every_steps=3",
                 f"train.compilation_cache={tmp_path / 'jax_cache'}"]
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(whole, *overrides), env=_env(), check=True, capture_output=True)
    expected = metrics_lib.read_jsonl(whole / "metrics.jsonl")
    rng = random.Random()
    workdir, seen, stops = tmp_path / "stopped", 0, []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(_train_cmd(workdir, *overrides), env=_env(),
                                stderr=subprocess.PIPE, text=True)
        # The second run starts from the first one's rows: wait for steps past them.
        stop_at = rng.randint(seen + 4, seen + 12)
        seen = _wait_for_step_and_checkpoint(proc, workdir, stop_at)
        stops.append(f"{sig.name} after step {seen} (random stop {stop_at})")
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        err = proc.stderr.read()
        if sig == signal.SIGTERM:
            assert "resuming from" in err, err[-3000:]
            assert code == 42, (code, err[-2000:])
            saved = int(err.split("SIGTERM: saved step ")[1].split(";")[0])
            assert saved >= seen and (workdir / "checkpoints" / str(saved)).is_dir()
        else:
            assert code == -signal.SIGKILL
    again = subprocess.run(_train_cmd(workdir, *overrides), env=_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    got = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    message = ", then ".join(stops)
    assert [r["step"] for r in got] == [r["step"] for r in expected], message
    assert [r["loss"] for r in got] == [r["loss"] for r in expected], message
    for a, b in zip(_params(workdir, total), _params(whole, total), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=message)


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """10 steps saved every 2, keeping the latest 1 plus the best 1 by the *highest* loss
    (so that best and latest differ: the loss falls)."""
    from mtjax.train import trainer

    workdir = tmp_path_factory.mktemp("kept")
    config = config_lib.load(None, TINY + [
        "train.steps=10", "checkpoint.every_steps=2", "checkpoint.keep=1",
        "checkpoint.keep_best=1", "checkpoint.best_mode=max", "log.every_steps=2"])
    trainer.train(config, workdir, progress=False)
    return workdir


def test_keeps_latest_plus_best_and_lists_them(kept_run, capsys):
    assert cli.main(["checkpoints", str(kept_run), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    steps = [c["step"] for c in listing["checkpoints"]]
    losses = {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(kept_run / "metrics.jsonl")}
    worst = max(losses, key=losses.get)
    assert steps == sorted({worst, 10}), (steps, losses)
    assert listing["latest"] == 10 and listing["best"] == worst
    for c in listing["checkpoints"]:
        assert c["bytes"] > 0 and c["metrics"]["loss"] == pytest.approx(losses[c["step"]])
    assert cli.main(["checkpoints", str(kept_run)]) == 0
    table = capsys.readouterr().out
    assert "latest" in table and "best" in table
    # The checkpoints/ folder, one checkpoint in it, or its state item lists the same run
    # (the state item, which --checkpoint takes, said "holds no checkpoints/ folder").
    for path in (kept_run / "checkpoints", kept_run / "checkpoints" / "10",
                 kept_run / "checkpoints" / "10" / "state"):
        assert cli.main(["checkpoints", str(path)]) == 0
        assert capsys.readouterr().out == table


def test_a_mixture_whose_tasks_changed_resumes_with_a_fresh_stream(tmp_path, capsys):
    """The mixture's tasks changed under its name between a save and the resume: tf.data
    restored a 3-task position into a 2-task mixture without a word, and its buffers went on
    yielding examples of the removed task (task id 3 of 2)."""
    import seqio

    import mtjax.data.builtin  # noqa: F401  (registers the built-in tasks)
    from mtjax.train import trainer

    def register(task_names):
        if "t_mixture_changed" in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove("t_mixture_changed")
        seqio.MixtureRegistry.add("t_mixture_changed", task_names, default_rate=1.0)

    # A save at step 2 between logging rows keeps the steps' per-task sums (2 tasks then).
    overrides = TINY + ["data.mixture=t_mixture_changed", "checkpoint.every_steps=2",
                        "log.every_steps=3"]
    run = tmp_path / "run"
    register(["mtjax_copy", "mtjax_add"])
    trainer.train(config_lib.load(None, overrides + ["train.steps=3"]), run, progress=False)
    shutil.rmtree(run / "checkpoints" / "3")  # as if it had crashed before that save
    capsys.readouterr()
    register(["mtjax_copy"])
    try:
        result = trainer.train(config_lib.load(None, overrides + ["train.steps=4"]), run,
                               progress=False)
    finally:
        seqio.MixtureRegistry.remove("t_mixture_changed")
    err = capsys.readouterr().err
    assert ("the input position saved in checkpoint 2 does not fit this run's input pipeline "
            "(mixture 't_mixture_changed' was mtjax_add, mtjax_copy when the position was "
            "saved and is mtjax_copy now)") in err, err[-3000:]
    assert "summed over another mixture's tasks; they are left out of the next row" in err
    assert result.start_step == 2 and result.step == 4
    rows = metrics_lib.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4]
    assert all("loss/mtjax_add" not in r for r in rows)
    assert all(r["target_tokens"] > 0 and "loss/mtjax_copy" in r for r in rows)


def test_an_input_position_of_a_changed_pipeline_resumes_with_a_fresh_stream(
        tmp_path, monkeypatch, capsys):
    """A run of a file task saved by an older reader (its examples unshuffled at the source),
    resumed by this one: tf.data refuses the saved position ("dataset definition has
    changed"), which set the checkpoint aside as damaged, and the run could only start over."""
    import tensorflow as tf

    from mtjax.data import memory, tasks
    from mtjax.train import trainer

    (tmp_path / "qa.tsv").write_text("".join(f"question {i}\tanswer {i % 3}\n"
                                             for i in range(64)))
    tasks.add_file_task("t_reader_changed", str(tmp_path / "qa.tsv"))
    overrides = TINY + ["data.mixture=t_reader_changed", "checkpoint.every_steps=2",
                        "log.every_steps=2"]
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(memory, "examples_dataset", lambda columns, shuffle, seed, shard=None: (
            tf.data.Dataset.from_tensor_slices(
                {k: tf.convert_to_tensor(v, tf.string) for k, v in columns.items()})))
        trainer.train(config_lib.load(None, overrides + ["train.steps=2"]), run,
                      progress=False)
    capsys.readouterr()
    result = trainer.train(config_lib.load(None, overrides + ["train.steps=4"]), run,
                           progress=False)
    err = capsys.readouterr().err
    assert "the input position saved in checkpoint 2 does not fit" in err, err[-3000:]
    assert "restarts from a fresh shuffle" in err
    assert result.start_step == 2 and result.step == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def test_incomplete_and_unreadable_checkpoints_are_skipped(kept_run, tmp_path, capsys):
    from mtjax.train import trainer

    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    ckpts = run / "checkpoints"
    # 12: cut short (no commit markers); 14: committed but its array files are gone.
    shutil.copytree(ckpts / "10", ckpts / "12")
    (ckpts / "12" / "_CHECKPOINT_METADATA").unlink()
    # 20: its commit record (_CHECKPOINT_METADATA, written last) cut short.
    shutil.copytree(ckpts / "10", ckpts / "20")
    record = ckpts / "20" / "_CHECKPOINT_METADATA"
    record.write_text(record.read_text()[:10])
    shutil.copytree(ckpts / "10", ckpts / "14")
    for chunk in (ckpts / "14" / "state").rglob("d/*"):
        chunk.unlink()
    # 16: an array file cut short (Orbax raises a bare Exception); 18: the input position's
    # file cut short.
    for step, files in ((16, (ckpts / "16" / "state").rglob("d/*")),
                        (18, (ckpts / "18" / "data").rglob("iterator.data*"))):
        shutil.copytree(ckpts / "10", ckpts / str(step))
        largest = max(files, key=lambda f: f.stat().st_size)
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    # 22: the input position of its one host gone (it resumed from a fresh shuffle, as if the
    # host count had changed); 24, 26: its config or metrics item cut short (a traceback).
    for step, damage in ((22, "data/process_0"), (24, "config/metadata"),
                         (26, "metrics/metrics")):
        shutil.copytree(ckpts / "10", ckpts / str(step))
        target = ckpts / str(step) / damage
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.write_text(target.read_text()[:10])
    # 28: a bit of its parameters' data flipped on disk (the file still decodes).
    shutil.copytree(ckpts / "10", ckpts / "28")
    _change_a_parameter_on_disk(ckpts / "28")
    # metrics.jsonl: a line damaged inside (kept aside), and a last line cut short by a kill as
    # it was written (dropped).
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "\x00\x00 not json")
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "loss": 3.5')
    config = config_lib.load(None, TINY + [
        "train.steps=12", "checkpoint.every_steps=2", "checkpoint.keep=1",
        "checkpoint.keep_best=1", "checkpoint.best_mode=max", "log.every_steps=2"])
    result = trainer.train(config, run, progress=False)
    err = capsys.readouterr().err
    for message in ("12 is incomplete", "14 cannot be read", "16 cannot be read",
                    "18 cannot be read", "20 is incomplete", "22 is incomplete",
                    "24 is incomplete", "26 is incomplete",
                    "28 is damaged: the array data of params."):
        assert message in err, (message, err[-3000:])
    assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
    assert result.start_step == 10 and result.step == 12
    names = sorted(p.name for p in ckpts.iterdir())
    assert {"12.incomplete", "14.incomplete", "16.incomplete", "18.incomplete",
            "20.incomplete", "22.incomplete", "24.incomplete", "26.incomplete",
            "28.incomplete", "12"} <= set(names), names
    assert [r["step"] for r in metrics_lib.read_jsonl(run / "metrics.jsonl")] == [
        2, 4, 6, 8, 10, 12]
    assert "metrics.jsonl: record 2 is not JSON" in err
    assert "not json" in (run / "metrics.jsonl.damaged").read_text()
    assert cli.main(["checkpoints", str(run), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["latest"] == 12 and "14.incomplete" in listing["incomplete"]


@pytest.mark.parametrize("damage", ["array_file", "array_data_changed", "tree_metadata",
                                    "config_item", "state_gone"])
def test_reading_commands_name_a_damaged_checkpoint_and_an_older_one(
        kept_run, tmp_path, capsys, damage):
    """eval/infer/score/--init-from load through infer.load: one line naming the damaged
    checkpoint and a complete older one; nothing in the run is moved."""
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    latest = run / "checkpoints" / "10"
    if damage == "state_gone":  # it loaded the older step silently
        shutil.rmtree(latest / "state")
    elif damage == "array_file":
        files = list((latest / "state").rglob("d/*"))
        for f in files:  # every array: only the parameters are read
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "array_data_changed":  # it still decodes: it loaded other weights silently
        _change_a_parameter_on_disk(latest)
    else:
        f = latest / ("state/_METADATA" if damage == "tree_metadata" else "config/metadata")
        f.write_bytes(f.read_bytes()[:20])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    older = min(int(p) for p in before)
    inputs = tmp_path / "in.txt"
    inputs.write_text("copy: a b\n")
    for command in (["infer", "--checkpoint", str(run), "--input", str(inputs),
                     "--no-progress"],
                    ["convert", "--to", "hf", str(run), str(tmp_path / "hf")]):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert f"checkpoint {latest} cannot be read, its files are damaged" in err, err[-3000:]
        assert f"e.g. {run / 'checkpoints' / str(older)}" in err, err
        lines = [line for line in err.strip().splitlines()
                 if not line.startswith("mtjax convert: reading")]
        assert len(lines) == 1 and lines[0].startswith("mtjax: error:"), err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not (tmp_path / "hf").exists()


def test_a_step_set_aside_as_incomplete_names_the_older_complete_one(kept_run, tmp_path,
                                                                     capsys):
    """`<step>.incomplete` (what train moved aside) given to a reading command: the error said
    "no older checkpoint of this run is complete" beside a complete older step."""
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    ckpts = run / "checkpoints"
    older = min(int(p.name) for p in ckpts.iterdir())
    for f in (ckpts / "10" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (ckpts / "10").rename(ckpts / "10.incomplete")
    inputs = tmp_path / "in.txt"
    inputs.write_text("copy: a b\n")
    assert cli.main(["infer", "--checkpoint", str(ckpts / "10.incomplete"), "--input",
                     str(inputs), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"e.g. {ckpts / str(older)}" in err and "no older" not in err, err


def test_the_listing_sets_apart_steps_whose_metadata_does_not_parse(kept_run, tmp_path, capsys):
    """A garbage state/_METADATA or _sharding was listed as a good step, even 'latest best',
    though train sets it aside and infer refuses it."""
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    ckpts = run / "checkpoints"
    for step, name in ((12, "_METADATA"), (14, "_sharding")):
        shutil.copytree(ckpts / "10", ckpts / str(step))
        (ckpts / str(step) / "state" / name).write_text("\x00garbage")
    assert cli.main(["checkpoints", str(run), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["latest"] == 10 and listing["incomplete"] == ["12", "14"]
    assert 12 not in [c["step"] for c in listing["checkpoints"]]


def test_a_run_whose_every_checkpoint_is_damaged_stops_instead_of_starting_over(
        kept_run, tmp_path, capsys):
    """It trained from step 0 on top of the run, with no word of it, and metrics.jsonl held
    every step twice. Now it stops (exit 2) once, and the same command then starts over."""
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import trainer

    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    for f in (run / "checkpoints").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    records = (run / "metrics.jsonl").read_text()
    config = config_lib.load(None, TINY + ["train.steps=4", "log.every_steps=2"])
    moved = ", ".join(map(str, reversed(steps)))
    with pytest.raises(CheckpointError, match=rf"no checkpoint in .* can be read \(steps "
                                              rf"{moved} were set aside as <step>.incomplete\); "
                                              rf"run the same command again"):
        trainer.train(config, run, progress=False)
    assert (run / "metrics.jsonl").read_text() == records
    result = trainer.train(config, run, progress=False)
    assert result.start_step == 0 and result.step == 4
    assert [r["step"] for r in metrics_lib.read_jsonl(run / "metrics.jsonl")] == [2, 4]
    # The same when the damage shows before any read (a metadata file that does not parse:
    # the step is set aside as incomplete when the run opens its checkpoints).
    for f in (run / "checkpoints").glob("*/state/_METADATA"):
        f.write_text(f.read_text()[:20])
    with pytest.raises(CheckpointError, match=r"can be read \(step 4 was set aside"):
        trainer.train(config, run, progress=False)


def test_resume_refuses_a_new_seed_and_an_optimizer_state_of_another_shape():
    """A new train.seed was accepted and recorded though it changed nothing; clipping switched
    off failed in Orbax's words ("tree structures do not match ... partial_restore=True")."""
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import resume

    class Checkpoints:
        directory = pathlib.Path("/run/checkpoints")

    saved = config_lib.to_dict(config_lib.load(None, TINY))

    def refusal(*overrides):
        current = config_lib.to_dict(config_lib.load(None, TINY + list(overrides)))
        try:
            resume.check_resumable(saved, current, Checkpoints, 8)
        except CheckpointError as e:
            return str(e)
        return None

    assert refusal("optim.learning_rate=0.5", "optim.grad_clip_norm=2.0") is None
    assert "train.seed: checkpoint 0 vs now 1" in refusal("train.seed=1")
    assert ("optim.grad_clip_norm: checkpoint 1.0 vs now 0.0 (clipping on/off changes the "
            "optimizer state)") in refusal("optim.grad_clip_norm=0")
    assert "optim.weight_decay: checkpoint 0.0 vs now 0.001 (Adafactor's weight decay" in (
        refusal("optim.weight_decay=0.001"))


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["checkpoints", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and len(err.strip().splitlines()) == 1
    # A file (a run's config.json, say) was said to hold no checkpoints/ folder.
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["checkpoints", str(tmp_path / "config.json")]) == 2
    assert capsys.readouterr().err == (
        f"mtjax: error: {tmp_path / 'config.json'} is a file; give a run directory (its "
        f"--workdir), its checkpoints/ folder or one checkpoint in it\n")


TOPOLOGY = """
import json, sys
import jax, numpy as np, orbax.checkpoint as ocp
from mtjax import config as config_lib
from mtjax.checkpoint import RunCheckpoints
from mtjax.train import setup as setup_lib, trainer

tiny, workdir = json.loads(sys.argv[1]), sys.argv[2]
saved = config_lib.load(None, tiny + ["train.steps=4", "checkpoint.every_steps=4",
                                      "mesh.data=2", "mesh.fsdp=4"])
trainer.train(saved, workdir, progress=False)
reference = ocp.PyTreeCheckpointer().restore(workdir + "/checkpoints/4/state")
out = {}
for name, overrides, devices in (("one_device", ["mesh.fsdp=1"], jax.devices()[:1]),
                                 ("data4_tensor2", ["mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2",
                                                    "mesh.rules=fsdp_tensor"], None)):
    config = config_lib.load(None, tiny + overrides)
    mesh, rules = setup_lib.mesh_and_rules(config, devices=devices)
    setup = setup_lib.build(config, vocab_size=384, num_tasks=6, mesh=mesh, rules=rules)
    step, state, _ = RunCheckpoints(workdir, every_steps=4, keep=3).restore_latest(
        setup.target(), None)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(state.params), jax.tree.leaves(reference["params"]),
                   strict=True))
    placed = all(a.sharding == s for a, s in zip(jax.tree.leaves(state.params),
                                                 jax.tree.leaves(setup.shardings.params)))
    out[name] = {"step": step, "same": same, "placed": placed,
                 "devices": len(state.params["lm_head"]["kernel"].sharding.device_set)}
print("RESULT" + json.dumps(out))
"""


def test_restore_onto_another_mesh(tmp_path):
    """Saved on 8 devices (data=2, fsdp=4), restored onto 1 device and onto data=4/tensor=2:
    equal values, laid out by the new shardings."""
    out = run_python(TOPOLOGY, json.dumps(TINY + ["train.batch_size=8"]), tmp_path / "run",
                     devices=8).stdout
    result = json.loads(out.split("RESULT", 1)[1])
    assert result["one_device"] == {"step": 4, "same": True, "placed": True, "devices": 1}
    assert result["data4_tensor2"] == {"step": 4, "same": True, "placed": True, "devices": 8}


def test_bench_checkpoint_smoke(capsys, monkeypatch):
    """The wait for the last asynchronous save counts against the saving run (it was timed
    outside it, so the overhead came out near zero or negative): that wait made 1 s slower
    must show in the figures."""
    from mtjax import bench
    from mtjax.checkpoint import RunCheckpoints

    wait = RunCheckpoints.wait

    def slow_async_wait(self):
        # Only the bench's own wait for the last save (saves also wait inside RunCheckpoints).
        if "async" in str(self.directory) and sys._getframe(1).f_globals["__name__"] == (
                "mtjax.bench.checkpoint"):
            # The saves themselves cost ~0.4 s of the window here; the sleep is twice what the
            # figures must show, so a loaded machine's slower steps in the other window do not
            # hide it (it failed once at a load of 8 on 2 cores).
            time.sleep(2.0)
        return wait(self)

    monkeypatch.setattr(RunCheckpoints, "wait", slow_async_wait)
    assert bench.main(["checkpoint", "--smoke"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["state_bytes"] > 0 and result["saves"] == 3
    steps = result["steps_timed"]
    assert result["step_s_with_saving"] * steps >= result["step_s_without_saving"] * steps + 1.0
    assert result["async_cost_per_save_s"] >= 1.0 / result["saves"]  # (2 s were added)
    for key in ("save_mb_per_s", "restore_mb_per_s", "save_disk_mb_per_s",
                "restore_disk_mb_per_s", "step_s_without_saving", "step_s_with_saving",
                "overhead_every_100_steps"):
        assert np.isfinite(result[key]) and result[key] >= 0, key
    # MB/s of what was written, beside MB/s of the state in memory.
    assert 0 < result["disk_bytes"]
    assert result["save_disk_mb_per_s"] == pytest.approx(
        result["disk_bytes"] / 1e6 / result["save_s"])
    assert result["save_mb_per_s"] == pytest.approx(result["state_bytes"] / 1e6 / result["save_s"])
    # --verify of the last synchronous save: every array read back, and its checksum matched.
    assert result["verify_status"] == "ok" and result["verify_s"] > 0
    assert result["verify_mb_per_s"] == pytest.approx(
        result["state_bytes"] / 1e6 / result["verify_s"], rel=1e-3)


# A learning rate of 1e30 (warming up over 1e6 steps) blows the parameters up at step 2.
EXPLODING = TINY + ["optim.name=adamw", "optim.learning_rate=1e30", "optim.warmup_steps=1000000",
                    "optim.grad_clip_norm=0", "checkpoint.every_steps=1", "log.every_steps=1"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """The step-2 update overflows the weights (their norm is Inf) while its loss, taken before
    the update, is finite: the run stops there, and no checkpoint holds the overflowed weights
    (before, step 2 was saved and the run stopped only on step 3's loss)."""
    from mtjax.errors import TrainingError
    from mtjax.train import trainer

    config = config_lib.load(None, EXPLODING + ["train.steps=8"])
    with pytest.raises(TrainingError, match="non-finite updated weights at step 2"):
        trainer.train(config, tmp_path / "stop", progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "stop/checkpoints").iterdir())
    assert steps == [1]
    assert all(np.isfinite(a).all() for a in _params(tmp_path / "stop", 1))
    logged = metrics_lib.read_jsonl(tmp_path / "stop" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1] and np.isfinite(logged[0]["param_norm"])

    skip = config_lib.load(None, EXPLODING + ["train.steps=5", "train.on_nonfinite=skip",
                                             "checkpoint.keep=10"])
    result = trainer.train(skip, tmp_path / "skip", progress=False)
    # Every update from step 2 on is non-finite and skipped: parameters stay those of step 1.
    for a, b in zip(_params(tmp_path / "skip", 5), _params(tmp_path / "skip", 1), strict=True):
        np.testing.assert_array_equal(a, b)
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert result.skipped_steps == summary["skipped_steps"] == [2, 3, 4, 5]
    assert summary["metrics_step"] == 1 and summary["step"] == 5


def test_only_a_step_directory_missing_its_metadata_warns(caplog):
    from absl import logging as absl_logging

    import mtjax.checkpoint  # noqa: F401 - installs the filter (run alone, nothing else had)

    with caplog.at_level(logging.WARNING, logger="absl"):
        for where in ("20/state", "20/config", "20"):
            absl_logging.warning("Metadata file does not exist: run/checkpoints/%s/"
                                 "_CHECKPOINT_METADATA", where)
    assert [r.getMessage() for r in caplog.records] == [
        "Metadata file does not exist: run/checkpoints/20/_CHECKPOINT_METADATA"]


def test_a_save_without_metrics_ranks_worst_and_orbax_does_not_warn(tmp_path, caplog):
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints

    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=1, keep_best=1,
                                 best_metric="loss", best_mode="min", async_save=False)
    state = {"w": jnp.ones((4,))}
    with caplog.at_level(logging.WARNING):
        checkpoints.save(1, state, None, config={}, metrics={"loss": 2.0})
        checkpoints.save(2, state, None, config={})
        checkpoints.save(3, state, None, config={}, metrics={"loss": 3.0})
        checkpoints.wait()
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
    assert checkpoints.best_step() == 1 and checkpoints.all_steps() == [1, 3]
    checkpoints.close()


def test_a_save_killed_earlier_is_redone_without_orbax_warning(tmp_path, caplog):
    """A SIGKILL during a save leaves <step>.orbax-checkpoint-tmp; the resumed run saving that
    step again printed absl's "WARNING:absl:Attempted to create temporary directory ... Removing
    existing directory since it is not finalized." The run resumes from its latest complete
    step (and says so), so the partial save's removal is no news."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints

    leftover = tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp" / "state"
    leftover.mkdir(parents=True)
    (leftover / "partial").write_bytes(b"cut short")
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=2, async_save=False)
    with caplog.at_level(logging.WARNING, logger="absl"):
        checkpoints.save(1, {"w": jnp.ones((4,))}, None, config={})
        checkpoints.wait()
    assert not [r for r in caplog.records if "temporary directory" in r.getMessage()]
    assert checkpoints.all_steps() == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    checkpoints.close()


def test_an_evaluation_after_only_skipped_updates_is_logged_and_saved_as_its_own(
        tmp_path, monkeypatch):
    """With every update since the last row skipped (train.on_nonfinite=skip), the step's
    evaluation was printed but left out of metrics.jsonl and summary.json, and its checkpoint
    was saved with the metrics of that earlier row (`mtjax checkpoints` showed step 1's loss
    as step 2's)."""
    from mtjax.checkpoint import list_checkpoints
    from mtjax.infer import evaluate
    from mtjax.train import trainer

    class Evaluator:  # stands in for seqio's: no decoding to compile
        task_names = ["mtjax_add"]

        def __call__(self, params, step):
            return {"mtjax_add": {"exact_match": 12.5}}

    monkeypatch.setattr(evaluate, "make_evaluator", lambda *args, **kwargs: Evaluator())
    config = config_lib.load(None, EXPLODING + ["train.steps=2", "train.on_nonfinite=skip",
                                                "checkpoint.keep=10", "eval.at_end=true"])
    result = trainer.train(config, tmp_path / "run", progress=False)
    assert result.skipped_steps == [2]
    rows = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["eval/mtjax_add/exact_match"] == 12.5 and "loss" not in rows[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics_step"] == 2
    assert summary["metrics"]["eval/mtjax_add/exact_match"] == 12.5
    saved = {row["step"]: row["metrics"] for row in
             list_checkpoints(tmp_path / "run")["checkpoints"]}
    assert saved[1]["loss"] == rows[0]["loss"]
    assert saved[2] == {"eval/mtjax_add/exact_match": 12.5, **{
        k: rows[1][k] for k in rows[1] if k != "step" and not k.startswith("eval/")}}


def _flip_a_byte_of(state_dir: pathlib.Path, stored: bytes) -> None:
    """Flip one bit inside ``stored`` (an array's bytes) where a data file of ``state_dir``
    holds them verbatim (random bytes do not compress: zstd keeps them as they are), so that
    the file still decodes, to one different element."""
    for f in state_dir.rglob("d/*"):
        data = bytearray(f.read_bytes())
        at = data.find(stored)
        if at >= 0:
            data[at + len(stored) // 2] ^= 1
            f.write_bytes(bytes(data))
            return
    raise AssertionError(f"no data file of {state_dir} holds the array's bytes")


def test_array_data_changed_on_disk_is_caught_and_the_step_before_is_used(tmp_path, capsys):
    """A flipped bit in an array's data file decodes (Orbax keeps no checksum of array data):
    the run resumed from the changed weights without a word. The digests saved with the state
    catch it; the step is set aside as damaged and the one before it restores."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints

    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    states = {step: {"params": {"noise": jnp.asarray(noise) + step,
                                "w": jnp.full((3, 5), 0.5 * step, jnp.float32)},
                     "step": jnp.int32(step)} for step in (1, 2)}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3, async_save=False)
    for step, state in states.items():
        checkpoints.save(step, state, _Position(), config={})
    checkpoints.close()
    # A normal round trip passes the check.
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3)
    step, state, _ = checkpoints.restore_latest(states[2], _Position())
    assert step == 2 and np.array_equal(state["params"]["noise"], states[2]["params"]["noise"])
    checkpoints.close()

    _flip_a_byte_of(tmp_path / "checkpoints/2/state", (noise + 2).tobytes()[:4096])
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3)
    step, state, _ = checkpoints.restore_latest(states[2], _Position())
    checkpoints.close()
    err = capsys.readouterr().err
    assert step == 1 and int(state["step"]) == 1, err
    assert (f"checkpoint {tmp_path / 'checkpoints' / '2'} is damaged: the array data of "
            f"params.noise no longer matches the checksum saved with it; moved aside to "
            f"2.incomplete, not used") in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.incomplete"]


def test_a_checkpoint_saved_without_digests_restores_unchecked_without_a_word(tmp_path, capsys):
    """Older mtjax saved no digests: such a step restores as before, with nothing said."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints

    state = {"w": jnp.arange(6, dtype=jnp.float32)}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=1, async_save=False)
    checkpoints.save(1, state, None, config={})
    checkpoints.close()
    metadata = tmp_path / "checkpoints/1/state/_METADATA"
    saved = json.loads(metadata.read_text())
    assert set(saved["custom_metadata"]["mtjax_digest"]["leaves"]) == {"w"}
    metadata.write_text(json.dumps(dict(saved, custom_metadata=None)))
    restored = RunCheckpoints(tmp_path, every_steps=1, keep=1).restore(1, state, None)
    assert np.array_equal(restored["w"], state["w"])
    assert capsys.readouterr().err == ""


def test_a_damaged_tree_metadata_of_the_newest_step_falls_back_to_the_step_before(
        tmp_path, capsys):
    """A changed byte in a step's _METADATA or array_metadatas (JSON that still parses) read as
    "does not fit this run (changed model ...)" and stopped the run (exit 2), although the step
    before it restored: an older step that fits tells damage from the user's change."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints
    from mtjax.checkpoint.layout import CheckpointError

    states = {step: {"w": jnp.full((3, 5), 0.5 * step, jnp.float32), "step": jnp.int32(step)}
              for step in (1, 2, 3)}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3, async_save=False)
    for step, state in states.items():
        checkpoints.save(step, state, _Position(), config={})
    checkpoints.close()
    for step, (name, key) in ((3, ("_METADATA", "key_type")),
                              (2, ("array_metadatas/process_0", "write_shape"))):
        f = tmp_path / f"checkpoints/{step}/state/{name}"
        f.write_text(f.read_text().replace(f'"{key}"', f'"{key[:-1]}x"'))
    # The user's change (another shape for "w") fits no step: refused, and nothing is moved.
    changed = dict(states[3], w=jnp.zeros((4, 5), jnp.float32))
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3)
    with pytest.raises(CheckpointError, match=r"checkpoints/3 does not fit this run"):
        checkpoints.restore_latest(changed, _Position())
    checkpoints.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]
    capsys.readouterr()

    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3)
    step, state, _ = checkpoints.restore_latest(states[3], _Position())
    checkpoints.close()
    err = capsys.readouterr().err
    assert step == 1 and np.array_equal(state["w"], states[1]["w"]), err
    for newer in (3, 2):
        assert (f"checkpoint {tmp_path / 'checkpoints' / str(newer)} is damaged: its saved tree "
                f"does not fit this run while the run's older checkpoint 1 does") in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "1", "2.incomplete", "3.incomplete"]


def test_checkpoints_verify_reads_every_array_and_names_the_damaged_steps(
        kept_run, tmp_path, capsys):
    """`mtjax checkpoints --verify` reads each step's arrays back (in groups, onto one device)
    and compares them with the checksums saved with them: changed array data, an array file
    cut short and a step saved without checksums are told apart; the exit status is 1 when a step
    is damaged."""
    from mtjax.checkpoint.verify import verify_step

    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    ckpts = run / "checkpoints"
    assert cli.main(["checkpoints", str(run), "--verify", "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)["checkpoints"]
    saved = json.loads((ckpts / "10/state/_METADATA").read_text())
    arrays = len(saved["custom_metadata"]["mtjax_digest"]["leaves"])
    assert [(r["step"], r["verify"]["status"], r["verify"]["arrays"]) for r in clean] == [
        (2, "ok", arrays), (10, "ok", arrays)]

    for step in (12, 14, 16):
        shutil.copytree(ckpts / "10", ckpts / str(step))
    _change_a_parameter_on_disk(ckpts / "12")
    largest = max((ckpts / "14" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    metadata = ckpts / "16/state/_METADATA"
    metadata.write_text(json.dumps(dict(saved, custom_metadata=None)))
    assert cli.main(["checkpoints", str(run), "--verify", "--json"]) == 1
    out, err = capsys.readouterr()
    rows = {r["step"]: r["verify"] for r in json.loads(out)["checkpoints"]}
    assert {step: row["status"] for step, row in rows.items()} == {
        2: "ok", 10: "ok", 12: "damaged", 14: "damaged", 16: "unchecked"}
    assert re.fullmatch(r"the array data of params\.\S+ no longer matches the checksum saved "
                        r"with it", rows[12]["reason"]), rows[12]
    assert rows[14]["reason"].startswith("its arrays cannot be read ("), rows[14]
    assert rows[16]["arrays"] == arrays
    assert "damaged: step 12, 14 (" in err and "give step 16" in err, err
    # Read in several groups (the others Orbax placeholders), the same array is named.
    assert verify_step(ckpts / "12", group_bytes=200_000)["reason"] == rows[12]["reason"]


def test_weights_read_from_a_tree_that_lacks_a_parameter_are_refused(tmp_path):
    """A partial restore handed back the wanted ShapeDtypeStruct, as if it were the weights,
    for a parameter the saved tree lacks (a changed name in _METADATA, or another model); a
    missing entry of Orbax's own was named as if it were the user's mistake."""
    import jax
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints, restore_params
    from mtjax.checkpoint.layout import CheckpointError

    state = {"params": {"w": jnp.ones((3, 5), jnp.float32), "b": jnp.zeros(5, jnp.float32)}}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=1, async_save=False)
    checkpoints.save(1, state, None, config={})
    checkpoints.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        state["params"])
    restored = restore_params(tmp_path / "checkpoints/1", abstract)
    assert np.array_equal(restored["w"], state["params"]["w"])
    metadata = tmp_path / "checkpoints/1/state/_METADATA"
    saved = metadata.read_text()
    # An entry of Orbax's own renamed (--init-from read it as "cannot take weights: 'key_type'").
    metadata.write_text(saved.replace('"key_type"', '"key_typx"'))
    with pytest.raises(CheckpointError, match=r"checkpoints/1 cannot be read, its files are "
                       r"damaged \(its tree metadata does not parse \(KeyError: 'key_type'\)\)"):
        restore_params(tmp_path / "checkpoints/1", abstract)
    metadata.write_text(saved.replace('"w"', '"v"'))
    with pytest.raises(CheckpointError, match=r"state: its saved tree holds no w \(a checkpoint "
                       r"of another model, or its state/_METADATA file is damaged\)$"):
        restore_params(tmp_path / "checkpoints/1", abstract)


def test_listing_a_step_the_run_does_not_have_is_an_error(tmp_path, capsys):
    """`mtjax checkpoints RUN/checkpoints/999` (a misspelt step) listed the run and exited 0,
    as if the step were there; --checkpoint refuses it."""
    for step in ("20", "40"):
        (tmp_path / "run" / "checkpoints" / step).mkdir(parents=True)
    missing = tmp_path / "run" / "checkpoints" / "999"
    assert cli.main(["checkpoints", str(missing)]) == 2
    captured = capsys.readouterr()
    assert not captured.out and len(captured.err.strip().splitlines()) == 1, captured.err
    assert (f"{missing} does not exist (the run's checkpoints: 20, 40); give one of them, or "
            f"the run directory {tmp_path / 'run'}") in captured.err


def test_checkpoints_verify_finds_an_array_its_tree_metadata_no_longer_holds(tmp_path):
    """A state/_METADATA changed so that an array is skipped (not read at all) was verified
    "ok", and one whose checksum record names no array it holds "unchecked" (exit 0): every
    array saved has a checksum, so one not read is the step's damage."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints
    from mtjax.checkpoint.verify import verify_step

    state = {"w": jnp.ones((3, 5), jnp.bfloat16), "b": jnp.arange(4, dtype=jnp.int32)}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3, async_save=False)
    checkpoints.save(1, state, None, config={})
    checkpoints.close()
    step = tmp_path / "checkpoints" / "1"
    assert verify_step(step)["status"] == "ok"
    metadata = step / "state/_METADATA"
    saved = json.loads(metadata.read_text())
    tree = saved["tree_metadata"]["('b',)"]["value_metadata"]
    metadata.write_text(json.dumps({**saved, "tree_metadata": {
        **saved["tree_metadata"], "('b',)": {
            **saved["tree_metadata"]["('b',)"], "value_metadata": {
                **tree, "skip_deserialize": True}}}}))
    row = verify_step(step)
    assert (row["status"], row["arrays"], row["reason"]) == (
        "damaged", 1, "the array b, saved with a checksum, is not in its tree metadata "
        "(state/_METADATA)")
    leaves = saved["custom_metadata"]["mtjax_digest"]["leaves"]
    leaves["x"] = leaves.pop("w")  # one changed byte in the record's name
    metadata.write_text(json.dumps(saved))
    row = verify_step(step)
    assert (row["status"], row["arrays"], row["reason"]) == (
        "damaged", 2, "the array x, saved with a checksum, is not in its tree metadata "
        "(state/_METADATA)")


def test_weights_from_a_tree_laid_out_otherwise_are_another_model_not_damage(tmp_path):
    """A saved tree with a subtree where this model has an array (or a list where it has a
    dict), Orbax's TypeError "Type mismatch", was called damaged files and pointed at an older
    step, which fails alike: it is a checkpoint of another model."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from mtjax.checkpoint import restore_params
    from mtjax.checkpoint.layout import CheckpointError

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"enc": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=device)},
                "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)}
    for name, params in (("list", {"enc": [jnp.ones((2, 3))], "b": jnp.ones(3)}),
                         ("tree", {"enc": {"w": jnp.ones((2, 3))}, "b": {"q": jnp.ones(3)}})):
        ocp.PyTreeCheckpointer().save(tmp_path / name / "state", {"params": params})
        wrong = {"list": "params.enc", "tree": "params.b"}[name]
        with pytest.raises(CheckpointError, match=(
                rf"^cannot take weights from {tmp_path / name / 'state'}: its saved tree is laid "
                rf"out otherwise than this model's at {wrong}; --init-from needs a checkpoint "
                rf"of the same model size and vocabulary$")):
            restore_params(tmp_path / name, abstract)


def test_checkpoints_verify_holds_one_group_of_arrays_at_a_time(tmp_path, monkeypatch):
    """The last array of a group stayed referenced while the next group was read, so verifying
    held a group plus that array (an embedding larger than the group: twice its memory)."""
    import weakref

    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints, verify

    state = {name: jnp.full((64, 64), i, jnp.float32) for i, name in enumerate("abcd")}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=1, async_save=False)
    checkpoints.save(1, state, None, config={})
    checkpoints.close()
    del state
    read_group, alive = verify._read_group, []

    def watched(*args):
        alive.append(sum(ref() is not None for ref in refs))
        arrays = read_group(*args)
        refs.extend(weakref.ref(a) for a in arrays.values())
        return arrays

    refs = []
    monkeypatch.setattr(verify, "_read_group", watched)
    row = verify.verify_step(tmp_path / "checkpoints/1", group_bytes=2 * 64 * 64 * 4)
    assert (row["status"], row["arrays"], alive) == ("ok", 4, [0, 0])


@pytest.mark.parametrize("failure, message", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3221225472 "
                  "bytes."), r"checkpoints/2 cannot be read: RESOURCE_EXHAUSTED"),
    (PermissionError(13, "Permission denied"), r"checkpoints/2 "),
    (RuntimeError("PERMISSION_DENIED: error opening file: .../ocdbt.process_0/d/ab12"),
     r"checkpoints/2 "),
    (OSError(116, "Stale file handle"), r"checkpoints/2 "),
    (RuntimeError("UNKNOWN: Too many open files"), r"checkpoints/2 "),
])
def test_a_restore_that_fails_for_this_machine_moves_nothing(tmp_path, capsys, failure, message):
    """Out of memory while restoring the newest step is this machine's failure, not the step's:
    it was taken for a tree that does not fit, and when the step before then restored (memory
    freed by the failed try) the newest, good step was moved aside as damaged. Files it may not
    read, a stale NFS handle or too many open files were taken for the step's damage, with the
    same end (its metrics cut back to the older step). All of them now stop the run as is."""
    import jax.numpy as jnp

    from mtjax.checkpoint import RunCheckpoints
    from mtjax.checkpoint.layout import CheckpointError

    states = {step: {"w": jnp.full((3, 5), 0.5 * step, jnp.float32)} for step in (1, 2)}
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3, async_save=False)
    for step, state in states.items():
        checkpoints.save(step, state, _Position(), config={})
    checkpoints.close()
    checkpoints = RunCheckpoints(tmp_path, every_steps=1, keep=3)
    restore = checkpoints._manager.restore

    def failing_at_2(step, args):
        if step == 2 and "state" in args.keys():
            raise failure
        return restore(step, args=args)

    checkpoints._manager.restore = failing_at_2
    with pytest.raises(CheckpointError, match=message):
        checkpoints.restore_latest(states[2], _Position())
    checkpoints.close()
    assert "moved aside" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_checkpoints_verify_given_one_step_reads_that_step_alone(kept_run, tmp_path, capsys):
    """`mtjax checkpoints RUN/checkpoints/STEP --verify` read every step of the run (minutes
    for a large run, and exit 1 for another step's damage): it reads the step given."""
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    ckpts = run / "checkpoints"
    _change_a_parameter_on_disk(ckpts / "10")

    def verified(path):
        code = cli.main(["checkpoints", str(path), "--verify", "--json"])
        rows = json.loads(capsys.readouterr().out)["checkpoints"]
        return code, {r["step"]: r["verify"]["status"] for r in rows if "verify" in r}

    assert verified(ckpts / "2") == (0, {2: "ok"})
    assert verified(ckpts / "10" / "state") == (1, {10: "damaged"})
    assert verified(run) == (1, {2: "ok", 10: "damaged"})
