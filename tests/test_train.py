"""Training end to end on the built-in mixture: the loss falls; checkpoints resume exactly."""

import dataclasses
import json
import re

import pytest

from mtjax import config as config_lib
from mtjax.train import metrics as metrics_lib

# Figures that time the run: they differ between otherwise identical runs.
TIMED = ("tokens_per_s", "model_flops_per_s", "mfu")
TINY = ["model.name=t5_1_1_test", "data.inputs_length=64", "data.targets_length=32",
        "train.batch_size=8", "log.every_steps=5", "log.tensorboard=false",
        "eval.max_examples=8", "eval.batch_size=8"]


def tiny_config(*extra: str) -> config_lib.Config:
    return config_lib.load(None, TINY + list(extra))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from mtjax.train import trainer

    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config("train.steps=30", "checkpoint.every_steps=10", "log.tensorboard=true",
                      "log.profile_steps=2", "log.profile_skip_steps=3")
    result = trainer.train(cfg, workdir, progress=False)
    return workdir, result


def test_thirty_steps_lower_the_loss_clearly(trained_run):
    workdir, result = trained_run
    records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.75 * first, (first, last)
    assert result.step == 30


def test_the_profiled_steps_are_traced_as_steps(trained_run):
    """log.profile_steps=2 after log.profile_skip_steps=3: steps 4 and 5 in one trace, each a
    step annotation around the compiled train step (TensorBoard's and Perfetto's files)."""
    import gzip

    workdir, _ = trained_run
    runs = list((workdir / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert {p.name.split(".", 1)[1] for p in runs[0].iterdir()} >= {"json.gz", "xplane.pb"}
    trace = runs[0] / "perfetto_trace.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = [e for e in events if e.get("name") == "train"]
    assert [e["args"]["step_num"] for e in steps] == ["4", "5"]
    step_calls = [e for e in events if e.get("name", "").startswith("PjitFunction(step")]
    assert len(step_calls) >= 2 and all(
        any(s["ts"] <= c["ts"] <= s["ts"] + s["dur"] for s in steps) for c in step_calls)


def test_a_trace_cut_short_is_closed_and_one_that_cannot_start_is_a_warning(tmp_path):
    import jax
    import jax.numpy as jnp

    from mtjax.train import profiling

    messages: list[str] = []
    profiler = profiling.StepProfiler(tmp_path / "profile", skip=0, steps=5,
                                      log=messages.append)
    for step in (1, 2):  # the run ends after 2 of the 5 steps
        with profiler.step(step):
            out = jnp.ones(4) * step
        profiler.stepped(out)
    assert profiler.tracing
    profiler.close()
    assert not profiler.tracing and list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert messages == [f"mtjax: profile of steps 1-2 in {tmp_path / 'profile'} (tensorboard "
                        f"--logdir {tmp_path / 'profile'}, or its perfetto_trace.json.gz in "
                        f"ui.perfetto.dev)"]

    (tmp_path / "in_the_way").write_text("a file where the trace's folder would go")
    messages.clear()
    warnings: list[str] = []
    profiler = profiling.StepProfiler(tmp_path / "in_the_way", skip=0, steps=1,
                                      log=messages.append, warn=warnings.append)
    with profiler.step(1):
        out = jnp.ones(4)
    profiler.stepped(out)
    assert not messages  # a warning goes to `warn`, which every host prints
    assert len(warnings) == 1 and "no trace (" in warnings[0] and "in_the_way" in warnings[0]

    jax.profiler.start_trace(str(tmp_path / "someone_else"))
    try:
        messages.clear()
        profiler = profiling.StepProfiler(tmp_path / "profile", skip=0, steps=1,
                                          log=messages.append)
        with profiler.step(1):
            out = jnp.ones(4)
        profiler.stepped(out)
        profiler.close()
    finally:
        jax.profiler.stop_trace()
    assert len(messages) == 1 and messages[0].startswith(
        "mtjax: warning: log.profile_steps: no trace (") and "training goes on" in messages[0]


def test_a_trace_ends_with_the_run_and_one_never_reached_is_a_warning(tmp_path, capsys):
    """Steps 3-5 asked for, the run ends at step 4: the trace stopped only when the loop
    exited, so it also held the final evaluation and checkpoint save (Orbax's frames, 35 MB
    instead of 2). A resumed process with fewer steps than log.profile_skip_steps + 1 made no
    trace and said nothing."""
    import gzip

    from mtjax.train import trainer

    workdir = tmp_path / "run"
    one_task = "data.mixture=mtjax_copy"  # one task to evaluate after the trace, not five
    result = trainer.train(tiny_config("train.steps=4", "log.profile_steps=3", one_task),
                           workdir, progress=False)
    assert "eval/mtjax_copy/exact_match" in result.metrics  # the trace could have held one
    assert f"mtjax: profile of steps 3-4 in {workdir / 'profile'}" in capsys.readouterr().err
    (trace,) = (workdir / "profile").glob("plugins/profile/*/*.trace.json.gz")
    names = {e.get("name", "") for e in json.loads(gzip.decompress(trace.read_bytes()))[
        "traceEvents"]}
    assert "PjitFunction(step)" in names
    assert not [n for n in names if "checkpoint" in n or "evaluat" in n]

    trainer.train(tiny_config("train.steps=5", "log.profile_steps=3", one_task,
                              "eval.at_end=false"), workdir, progress=False)
    err = capsys.readouterr().err
    assert ("mtjax: warning: log.profile_steps: no trace; this process ran 1 step(s), and the "
            "trace starts at its step 3 (after log.profile_skip_steps=2)\n") in err
    assert len(list((workdir / "profile").glob("plugins/profile/*"))) == 1


def test_a_trace_that_cannot_be_written_is_a_warning(tmp_path):
    """"Profiling never stops a run": a trace whose export failed (a full disk) raised out of
    the training loop."""
    import jax
    import jax.numpy as jnp

    from mtjax.train import profiling

    messages: list[str] = []
    base = tmp_path / "profile"
    profiler = profiling.StepProfiler(base, skip=0, steps=1, log=messages.append)
    with profiler.step(1):
        out = jnp.ones(4)
    base.rmdir()
    base.write_text("")  # the export cannot create its folders
    try:
        profiler.stepped(out)
    finally:
        if base.is_file():  # JAX keeps a session whose export failed: end it for later tests
            base.unlink()
            jax.profiler.stop_trace()
    assert not profiler.tracing
    assert len(messages) == 1 and messages[0].startswith(
        f"mtjax: warning: log.profile_steps: the trace could not be written to {base} (")
    assert messages[0].endswith("); training goes on")


def test_run_directory_contract(trained_run):
    workdir, result = trained_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 30 and config["model"]["name"] == "t5_1_1_test"
    # What the `auto` settings became here (the config says "auto").
    import jax

    from mtjax.model import attention as attention_lib
    from mtjax.train import step as step_lib

    resolved = config["resolved"]
    assert config["model"]["attention"] == "auto" and resolved["model.attention"] == (
        attention_lib.resolve_attention("auto", jax.numpy.float32))
    assert resolved["train.cross_entropy"] == step_lib.resolve_cross_entropy("auto")
    assert resolved["optim.schedule"] == "rsqrt"  # adafactor's
    assert resolved["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert resolved["devices"] == 1 and resolved["processes"] == 1
    assert resolved["vocab_size"] % 128 == 0 and resolved["jax"] == jax.__version__
    record = metrics_lib.read_jsonl(workdir / "metrics.jsonl")[-1]
    for key in ("step", "loss", "learning_rate", "tokens_per_s", "model_flops_per_s"):
        assert key in record
    assert record["tokens_per_s"] > 0
    # Model FLOPs per token of this shape: between one step's FLOPs over its most and its
    # fewest possible tokens (full rows; at least one target token a row).
    from mtjax.model import sizes

    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=resolved["vocab_size"])
    flops = sizes.train_flops_per_step(cfg, 8, 64, 32)
    ratio = record["model_flops_per_s"] / record["tokens_per_s"]
    assert flops / (8 * (64 + 32)) <= ratio <= flops / (8 * 2), ratio
    assert "mfu" not in record  # a CPU has no published peak
    # Every task of the mixture has its loss, and the per-task losses average to the loss.
    for task in result.task_names:
        assert f"loss/{task}" in record, task
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "20", "30"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 30
    # eval.at_end: each task's seqio metrics on its validation split, in the last record and
    # the summary (span corruption is scored by likelihood only).
    for task in result.task_names:
        assert f"eval/{task}/log_likelihood" in record, task
        assert record[f"eval/{task}/log_likelihood"] < 0
        if task != "mtjax_span_corruption":
            assert 0 <= record[f"eval/{task}/exact_match"] <= 100
        # eval.loss: held-out examples of the same generator, so near the training loss of
        # the last steps (no task overfits in 30 steps).
        assert abs(record[f"eval/{task}/loss"] / record[f"loss/{task}"] - 1) < 0.2, task
    assert summary["metrics"]["eval/mtjax_copy/log_likelihood"] == record[
        "eval/mtjax_copy/log_likelihood"]


def test_rerun_in_same_workdir_resumes_instead_of_restarting(trained_run, tmp_path, capsys):
    from mtjax.train import trainer

    workdir, _ = trained_run
    before = {name: (workdir / name).read_text() for name in ("summary.json", "config.json")}
    # A finished run asked again (with fewer steps, too) trains nothing and rewrites nothing:
    # its summary keeps the final metrics. The restarted command line may still carry the
    # --init-from it started with: resume wins, and the note says the weights are not used.
    # No note of changed settings either: nothing trains with them.
    for steps, init_from in ((30, None), (5, str(tmp_path / "base"))):
        cfg = tiny_config(f"train.steps={steps}", "checkpoint.every_steps=10",
                          "optim.learning_rate=0.5")
        result = trainer.train(cfg, workdir, init_from=init_from, progress=False)
        assert result.start_step == 30 and result.step == 30
        assert result.metrics["step"] == 30 and result.metrics["loss"] > 0
        assert {name: (workdir / name).read_text() for name in before} == before
        err = capsys.readouterr().err
        assert ("--init-from" in err and "is not used" in err) == bool(init_from), err
        assert "settings changed since" not in err, err


def test_a_resumed_run_names_the_settings_that_change_its_training(tmp_path, capsys):
    """Settings that change the training may change on resume, and one note names those that
    did, old and new (and none of those that only change speed, such as remat)."""
    from mtjax.train import trainer

    first = tiny_config("train.steps=1", "eval.at_end=false")
    trainer.train(first, tmp_path, progress=False)
    capsys.readouterr()
    again = tiny_config("train.steps=2", "eval.at_end=false", "model.remat=full",
                        "optim.learning_rate=0.5", "train.label_smoothing=0.1",
                        "train.loss_normalization=per_sequence")
    assert trainer.train(again, tmp_path, progress=False).step == 2
    changed = [line for line in capsys.readouterr().err.splitlines()
               if "settings changed since" in line]
    assert changed == [
        "mtjax: note: steps after 1 train with settings changed since the checkpoint's run: "
        "train.label_smoothing 0.0 -> 0.1; train.loss_normalization 'tokens' -> "
        f"'per_sequence'; optim.learning_rate {first.optim.learning_rate!r} -> 0.5"]


@pytest.fixture
def open_managers(monkeypatch):
    """The RunCheckpoints a test opens and has not closed."""
    from mtjax import checkpoint

    opened = []
    init, close = checkpoint.RunCheckpoints.__init__, checkpoint.RunCheckpoints.close

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    def tracked_close(self):
        close(self)
        opened.remove(self)

    monkeypatch.setattr(checkpoint.RunCheckpoints, "__init__", tracked_init)
    monkeypatch.setattr(checkpoint.RunCheckpoints, "close", tracked_close)
    return opened


def test_changed_model_refuses_to_resume(trained_run, open_managers):
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import trainer

    workdir, _ = trained_run
    cfg = dataclasses.replace(
        tiny_config("train.steps=40"),
        model=dataclasses.replace(tiny_config().model, name="t5_1_1_tiny"))
    config_json = (workdir / "config.json").read_text()
    with pytest.raises(CheckpointError, match="model.name"):
        trainer.train(cfg, workdir, progress=False)
    assert (workdir / "config.json").read_text() == config_json  # the refusal changed nothing
    # The saved input stream restores batches of its own shape: a new one is refused too.
    for override, named in (("train.batch_size=4", "train.batch_size: checkpoint 8 vs now 4"),
                            ("data.targets_length=16",
                             "data.targets_length: checkpoint 32 vs now 16")):
        with pytest.raises(CheckpointError, match=named):
            trainer.train(tiny_config("train.steps=40", override), workdir, progress=False)
    assert not open_managers  # every refusal closed its checkpoint manager


def test_init_from_another_model_size_names_the_models(trained_run, tmp_path, open_managers):
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import trainer

    workdir, _ = trained_run
    cfg = dataclasses.replace(
        tiny_config("train.steps=2"),
        model=dataclasses.replace(tiny_config().model, name="t5_1_1_tiny"))
    with pytest.raises(CheckpointError) as info:
        trainer.train(cfg, tmp_path / "ft", init_from=str(workdir), progress=False)
    message = str(info.value)
    assert "same model size and vocabulary (it holds t5_1_1_test)" in message, message
    assert "strict=False" not in message and "ArrayRestoreArgs" not in message
    # The parameter and both shapes in mtjax's words, not Orbax's "Requested shape: (256,) is
    # not compatible with the stored shape: (32,).;"
    assert ": its decoder.decoder_norm.scale is (32,) where this model's is (256,) (and " in (
        message), message
    assert "Requested shape" not in message and ".;" not in message
    assert not open_managers
    # The refused start left .lock and the manager's empty checkpoints/ in the new directory.
    assert not (tmp_path / "ft").exists()


def test_sigterm_during_set_up_exits_as_preempted(tmp_path, monkeypatch, capsys,
                                                  open_managers):
    """A job preempted while it builds its pipeline, restores or compiles exits 42 (the
    launchers resume on 42; the default action would have been a bare 143), saving nothing,
    and the SIGTERM handler is given back afterwards."""
    import os
    import signal

    from mtjax.train import preemption, trainer

    build = trainer.make_pipeline

    def build_then_get_preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once: the flag is set
        return build(*args, **kwargs)

    monkeypatch.setattr(trainer, "make_pipeline", build_then_get_preempted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted):
        trainer.train(tiny_config("train.steps=5"), tmp_path / "run", progress=False)
    assert "SIGTERM during set-up: nothing new to save; exiting with code 42" in (
        capsys.readouterr().err)
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    assert signal.getsignal(signal.SIGTERM) == before
    assert not open_managers


def test_sigterm_while_mtjax_starts_exits_as_preempted(tmp_path, monkeypatch, capsys):
    """A SIGTERM while `mtjax train` imports and reads its config (before the trainer exists)
    is kept, and the run stops at its first set-up check with 42, not killed with 143."""
    import os
    import signal

    from mtjax import cli

    load = config_lib.load

    def load_then_get_preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(config_lib, "load", load_then_get_preempted)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", "--workdir", str(tmp_path / "run"), "--no-progress",
                     *TINY]) == 42
    assert "SIGTERM during set-up: nothing new to save" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_saves_the_step_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training saves the step it is in and exits 130 (a KeyboardInterrupt lost
    every step since the last checkpoint); the same command then finishes the run."""
    import os
    import signal

    from mtjax.train import preemption, trainer

    build = trainer.make_pipeline

    class InterruptedAtThirdBatch:
        def __init__(self, pipeline):
            self._pipeline, self._served = pipeline, 0

        def __getattr__(self, name):
            return getattr(self._pipeline, name)

        def __next__(self):
            self._served += 1
            if self._served == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return next(self._pipeline)

    monkeypatch.setattr(trainer, "make_pipeline",
                        lambda *a, **k: InterruptedAtThirdBatch(build(*a, **k)))
    # The three runs compile the same programs: the later ones load them from the cache.
    config = tiny_config("train.steps=6", "checkpoint.every_steps=100", "eval.at_end=false",
                         f"train.compilation_cache={tmp_path / 'jax_cache'}")
    with pytest.raises(preemption.Preempted) as info:
        trainer.train(config, tmp_path / "run", progress=False)
    assert info.value.exit_code == 130 and info.value.step == 3
    assert "Ctrl-C: saved step 3; exiting with code 130" in capsys.readouterr().err
    monkeypatch.setattr(trainer, "make_pipeline", build)
    result = trainer.train(config, tmp_path / "run", progress=False)
    assert result.start_step == 3 and result.step == 6
    # Step 3 is no logging step (every 5): steps 1-3 were saved with the checkpoint, not
    # logged early, so the rows are those of an uninterrupted run, to the bit.
    trainer.train(config, tmp_path / "whole", progress=False)
    rows = [{k: v for k, v in r.items() if k not in TIMED}
            for r in metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 6]
    assert rows == [{k: v for k, v in r.items() if k not in TIMED}
                    for r in metrics_lib.read_jsonl(tmp_path / "whole" / "metrics.jsonl")]


def test_sigterm_during_an_evaluation_saves_the_step_without_waiting_for_it(tmp_path,
                                                                          monkeypatch, capsys):
    """A SIGTERM in a periodic evaluation waited for the whole evaluation (minutes with a large
    model, past SLURM's or Kubernetes' grace period) and one more training step before saving:
    the evaluation stops at its next batch, and the evaluated step is saved at once."""
    import os
    import signal

    from mtjax.infer import evaluate as evaluate_lib
    from mtjax.train import preemption, trainer

    decode = evaluate_lib.Decoder.__call__
    decoded = []

    def decode_then_get_preempted(self, *args, **kwargs):
        decoded.append(1)
        if len(decoded) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(evaluate_lib.Decoder, "__call__", decode_then_get_preempted)
    config = tiny_config("train.steps=4", "eval.every_steps=2", "eval.batch_size=2",
                         "eval.loss=false", "checkpoint.every_steps=100",
                         "data.mixture=mtjax_add")
    with pytest.raises(preemption.Preempted) as info:
        trainer.train(config, tmp_path / "run", progress=False)
    assert info.value.exit_code == 42 and info.value.step == 2
    assert len(decoded) == 1  # not the evaluation's other 3 batches
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["2"]
    err = capsys.readouterr().err
    assert "SIGTERM: the step 2 evaluation is left out" in err, err


def test_resuming_a_run_that_recorded_its_vocabulary_relative(tmp_path, monkeypatch):
    """Older versions recorded data.vocabulary as given; the same file given again (now made
    absolute) is the same run, another file is not."""
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import resume

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"")
    saved = config_lib.to_dict(config_lib.load(None, []))
    saved["data"]["vocabulary"] = "spm.model"
    now = config_lib.to_dict(config_lib.load(None, ["data.vocabulary=spm.model"]))
    assert now["data"]["vocabulary"] == str(tmp_path.resolve() / "spm.model")

    class Checkpoints:
        directory = tmp_path / "checkpoints"

    resume.check_resumable(saved, now, Checkpoints, 10)
    saved["data"]["vocabulary"] = "other.model"
    with pytest.raises(CheckpointError, match="data.vocabulary: checkpoint 'other.model'"):
        resume.check_resumable(saved, now, Checkpoints, 10)


def test_train_steps_is_a_changed_setting_where_the_schedule_decays_to_it():
    """A longer run under a schedule that decays to train.steps moves every later step's
    learning rate; under rsqrt or constant it only trains longer."""
    from mtjax.train import resume

    def changed(*overrides):
        saved = config_lib.to_dict(config_lib.load(None, list(overrides)))
        now = config_lib.to_dict(config_lib.load(None, [*overrides, "train.steps=400"]))
        return resume.changed_settings(saved, now)

    assert changed() == []  # adafactor, rsqrt
    assert changed("optim.schedule=constant") == []
    assert changed("optim.name=adamw") == ["train.steps 200 -> 400"]  # auto: cosine
    assert changed("optim.schedule=linear") == ["train.steps 200 -> 400"]


def test_warmup_steps_is_a_changed_setting_while_it_still_shapes_the_learning_rate():
    """A warmup that ended before the resumed step (under both settings) changes nothing under
    the constant schedule; rsqrt decays by it at every step, and linear and cosine decay over
    the steps after it."""
    from mtjax.train import resume

    def changed(step, *overrides):
        saved = config_lib.to_dict(config_lib.load(None, [*overrides, "optim.warmup_steps=100"]))
        now = config_lib.to_dict(config_lib.load(None, [*overrides, "optim.warmup_steps=50"]))
        return resume.changed_settings(saved, now, step)

    assert changed(100, "optim.schedule=constant") == []
    assert changed(99, "optim.schedule=constant") == ["optim.warmup_steps 100 -> 50"]
    for schedule in ("rsqrt", "linear", "cosine"):
        assert changed(150, f"optim.schedule={schedule}") == ["optim.warmup_steps 100 -> 50"]


def test_a_checkpoint_from_before_a_setting_existed_is_compared_with_its_default():
    """A checkpoint written before train.loss_normalization (or label_smoothing) existed
    trained as their defaults: resumed with another value, the note names it (it said
    nothing), and with the defaults it stays silent."""
    from mtjax.train import resume

    saved = config_lib.to_dict(config_lib.load(None, []))
    for key in ("loss_normalization", "label_smoothing"):
        del saved["train"][key]
    del saved["optim"]["schedule"]
    now = config_lib.to_dict(config_lib.load(None, ["train.loss_normalization=per_sequence"]))
    assert resume.changed_settings(saved, now) == [
        "train.loss_normalization 'tokens' -> 'per_sequence'"]
    assert resume.changed_settings(saved, config_lib.to_dict(config_lib.load(None, []))) == []


def test_a_resumed_run_names_no_setting_that_trains_alike():
    """``optim.schedule=auto`` given as the schedule it stands for, and a mixing setting that
    the run's data.mixing does not read, change nothing: no note."""
    from mtjax.train import resume

    def changed(before, after):
        saved = config_lib.to_dict(config_lib.load(None, before))
        now = config_lib.to_dict(config_lib.load(None, after))
        return resume.changed_settings(saved, now)

    assert changed([], ["optim.schedule=rsqrt"]) == []  # adafactor's auto
    assert changed(["optim.name=adamw"], ["optim.name=adamw", "optim.schedule=cosine"]) == []
    assert changed([], ["data.mixing_cap=100", "data.mixing_temperature=3"]) == []  # mixture
    assert changed([], ["optim.schedule=constant"]) == ["optim.schedule 'auto' -> 'constant'"]
    temperature = ["data.mixing=temperature"]
    assert changed(temperature, [*temperature, "data.mixing_cap=100"]) == [
        "data.mixing_cap None -> 100"]
    proportional = ["data.mixing=examples_proportional"]
    assert changed(proportional, [*proportional, "data.mixing_temperature=3"]) == []


@pytest.mark.parametrize("source, message", [
    ("missing", "does not exist"),
    ("a_file", "is a file, not a checkpoint"),
    ("hf_model", "is a Hugging Face model, not an mtjax checkpoint: convert it first"),
    # (it was "no complete checkpoint under ...", as if a save had been cut short)
    ("t5x_run", "is a T5X checkpoint, not an mtjax checkpoint: convert it first"),
    ("t5x_run/checkpoint_1000", "is a T5X checkpoint, not an mtjax checkpoint: convert it"),
    # A step whose save was cut short (no commit record): named, not used silently.
    ("cut_short/checkpoints/7", "cut_short/checkpoints/7 cannot be read, its files are "
                                "damaged (it is incomplete: a save cut short?)"),
])
def test_a_wrong_init_from_fails_before_the_run_starts(tmp_path, source, message,
                                                       open_managers):
    from mtjax.checkpoint import CheckpointError
    from mtjax.train import trainer

    (tmp_path / "a_file").write_text("")
    (tmp_path / "hf_model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "hf_model" / name).write_text("{}")
    (tmp_path / "cut_short/checkpoints/7/state").mkdir(parents=True)
    (tmp_path / "t5x_run/checkpoint_1000").mkdir(parents=True)
    (tmp_path / "t5x_run/checkpoint_1000/checkpoint").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        trainer.train(tiny_config("train.steps=2"), tmp_path / "run",
                      init_from=str(tmp_path / source), progress=False)
    assert not (tmp_path / "run").exists() and not open_managers


def test_a_set_up_error_leaves_no_run_directory_it_made(tmp_path, monkeypatch):
    """Some mistakes show only once the model is set up on the mesh (a parameter it cannot
    split): the run directory this run made, holding only its lock, goes too."""
    from mtjax.parallel.mesh import MeshError
    from mtjax.train import setup as setup_lib
    from mtjax.train import trainer

    def cannot_split(*args, **kwargs):
        raise MeshError("parameter x of shape (6,) cannot be split over mesh.tensor=4")

    monkeypatch.setattr(setup_lib, "build", cannot_split)
    with pytest.raises(MeshError, match="cannot be split"):
        trainer.train(tiny_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a directory the user made stays
    with pytest.raises(MeshError):
        trainer.train(tiny_config(), tmp_path / "kept", progress=False)
    assert (tmp_path / "kept").is_dir()


def test_a_mesh_that_does_not_fit_fails_before_the_run_directory_is_made(tmp_path):
    from mtjax.parallel.mesh import MeshError
    from mtjax.train import trainer

    with pytest.raises(MeshError, match="mesh.data=3"):
        trainer.train(tiny_config("mesh.data=3"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_second_train_in_a_busy_run_directory_is_refused(tmp_path, open_managers):
    """Two writers would resume the same checkpoint, interleave metrics.jsonl and prune each
    other's checkpoints: the second is refused in one line, before anything is written."""
    import os

    from mtjax.train import rundir, trainer

    (tmp_path / "run").mkdir()
    first = rundir.RunLock(tmp_path / "run")  # what a running `mtjax train` holds
    first.acquire()
    try:
        with pytest.raises(rundir.RunInUseError,
                           match=rf"in use by another mtjax train \(pid {os.getpid()} on "):
            trainer.train(tiny_config("train.steps=2"), tmp_path / "run", progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        first.release()
    assert not open_managers


def test_a_best_metric_that_is_never_logged_is_named_once(tmp_path, capsys):
    from mtjax.train import trainer

    trainer.train(tiny_config("train.steps=4", "checkpoint.every_steps=2", "log.every_steps=2",
                              "checkpoint.keep=1", "checkpoint.keep_best=1",
                              "checkpoint.best_metric=los", "eval.at_end=false"),
                  tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert err.count("checkpoint.best_metric=los is not among the logged metrics") == 1, err
    assert "(did you mean loss?)" in err
    trainer.train(tiny_config("train.steps=2", "checkpoint.keep_best=1",
                              "checkpoint.best_metric=eval/mtjax_add/exact_match",
                              "eval.at_end=false"), tmp_path / "run2", progress=False)
    assert "is an evaluation metric, and this run evaluates nothing" in capsys.readouterr().err


def test_a_bucket_url_as_workdir_is_refused_with_the_fix(tmp_path, monkeypatch):
    from mtjax.train import trainer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(config_lib.ConfigError,
                       match="--workdir gs://bucket/runs/x: .*mount the bucket"):
        trainer.train(tiny_config(), "gs://bucket/runs/x", progress=False)
    assert not list(tmp_path.iterdir())  # no local "gs:" directory


def test_a_file_as_workdir_is_refused_in_one_line(tmp_path, capsys):
    """`--workdir runs/x/config.json` ended in FileExistsError's traceback from mkdir."""
    from mtjax import cli

    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["train", "--workdir", str(tmp_path / "config.json"), "--no-progress",
                     *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {tmp_path / 'config.json'} is a file; give a directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_one_step_run_says_its_speed_was_not_measured(tmp_path, capsys):
    """The first step compiles, so a window of it alone has no tokens/s: the record leaves the
    field out, rather than logging 0 (or the compile-bound rate) as the run's speed. The
    start-up line names the loss settings away from their defaults."""
    from mtjax import cli

    argv = ["train", "--workdir", str(tmp_path / "run"), "--no-progress", *TINY,
            "train.steps=1", "log.every_steps=1", "eval.at_end=false", "model.remat=full",
            "log.profile_steps=1", "log.profile_skip_steps=0",
            "train.label_smoothing=0.1", "train.loss_normalization=per_sequence"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    # The one step traced, compilation included (skip 0), and the trace named at the end.
    assert f"mtjax: profile of step 1 in {tmp_path / 'run' / 'profile'}" in err
    assert err.splitlines()[-1].endswith("summary.json, profile/, checkpoints/")
    assert ("training 1 step of batch 8 (64/32 tokens, packed); adafactor (learning rate "
            "0.01, rsqrt decay after 100 steps); activations float32, remat full; loss: label "
            "smoothing 0.1, mean per sequence\n") in err
    assert "tokens/s not measured (only one step ran, and it compiles)" in err
    [record] = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 1 and record["loss"] > 0 and "tokens_per_s" not in record
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tokens_per_s"] is None


def test_the_start_up_line_gives_numbers_as_they_were_set():
    """A log says what ran: the loss's constant and the learning rate are not rounded to six
    digits (2097152 read 2.09715e+06)."""
    from mtjax.train import trainer

    line = trainer._describe_training(config_lib.load(None, [
        "train.loss_normalizing_factor=2097152", "optim.learning_rate=0.0012345678",
        "train.label_smoothing=0.1"]))
    assert ("(learning rate 0.0012345678, rsqrt decay after 100 steps)" in line
            and line.endswith("; loss: label smoothing 0.1, sum over 2097152")), line


def test_result_files_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    """Python writes NaN and Infinity, which jq and other strict JSON readers refuse: a
    non-finite metric (a task's metric function may return NaN) is written as null."""
    from mtjax import outputs

    writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
    writer.write(3, {"loss": 1.5, "eval/t/f1": float("nan"), "eval/t/ppl": float("inf")})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {
        "step": 3, "loss": 1.5, "eval/t/f1": None, "eval/t/ppl": None}
    assert (outputs.dumps({"a": [1.0, float("-inf")], "b": "NaN"})
            == '{"a": [1.0, null], "b": "NaN"}')


def _tensorboard_scalars(run) -> dict[tuple[str, int], list[float]]:
    """(tag, step) -> values, as TensorBoard reads them: event files in order, and a session
    START at step s drops what came before it from step s on."""
    import tensorflow as tf

    values: dict[tuple[str, int], list[float]] = {}
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                values = {key: v for key, v in values.items() if key[1] < event.step}
            for value in event.summary.value:
                values.setdefault((value.tag, event.step), []).append(value.simple_value)
    return values


def test_rows_are_log_every_steps_apart_whatever_the_checkpoint_interval(tmp_path):
    """A checkpoint between logging steps wrote a row of its own, so rows were 1-2 steps apart
    instead of log.every_steps; and summary.json's tokens/s, which also timed the writing of the
    rows, came out below every row's."""
    from mtjax.train import trainer

    common = ("train.steps=7", "eval.at_end=false")
    trainer.train(tiny_config(*common, "log.every_steps=1", "checkpoint.every_steps=100"),
                  tmp_path / "each", progress=False)
    per_step = {r["step"]: r for r in metrics_lib.read_jsonl(tmp_path / "each" / "metrics.jsonl")}
    result = trainer.train(tiny_config(*common, "log.every_steps=3", "checkpoint.every_steps=2",
                                       "checkpoint.keep=10"), tmp_path / "run", progress=False)
    rows = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 7]
    for row, steps in zip(rows, ((1, 2, 3), (4, 5, 6), (7,)), strict=True):
        tokens = [per_step[s]["target_tokens"] for s in steps]
        assert row["target_tokens"] == sum(tokens)
        weighted = sum(per_step[s]["loss"] * t for s, t in zip(steps, tokens, strict=True))
        assert row["loss"] == pytest.approx(weighted / sum(tokens), rel=1e-5)
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    assert min(rates) <= result.tokens_per_s <= max(rates), (rates, result.tokens_per_s)
    flops = [r["model_flops_per_s"] for r in rows if "model_flops_per_s" in r]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert min(flops) <= summary["model_flops_per_s"] <= max(flops), (flops, summary)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "2", "4", "6", "7"]


def test_tensorboard_matches_metrics_jsonl_after_a_run_starts_over(tmp_path, capsys):
    """metrics.jsonl is cut back when a run resumes or starts over, but the earlier process's
    TensorBoard events stayed: two values for the same step, one from the discarded run."""
    import shutil

    from mtjax.train import trainer

    run = tmp_path / "run"
    common = ("train.steps=4", "log.every_steps=1", "eval.at_end=false", "log.tensorboard=true")
    trainer.train(tiny_config(*common), run, progress=False)
    shutil.rmtree(run / "checkpoints")  # as if it had stopped before its first save
    capsys.readouterr()
    trainer.train(tiny_config(*common, "optim.learning_rate=0.05"), run, progress=False)
    assert "the records of an earlier start in metrics.jsonl are dropped" in (
        capsys.readouterr().err)
    rows = metrics_lib.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.05] * 4)
    scalars = _tensorboard_scalars(run)
    for row in rows:
        for tag, value in row.items():
            if tag != "step":
                assert scalars[(tag, row["step"])] == [pytest.approx(value, rel=1e-6)], tag


def test_an_eval_split_no_task_has_stops_before_training(tmp_path):
    """eval.split=bogus was a note, and the run trained without the evaluation asked for
    (`mtjax eval --split bogus` refused it). Found after the workdir was written, the refusal
    left config.json, .lock and an empty checkpoints/ in the new run directory."""
    from mtjax.train import trainer

    with pytest.raises(config_lib.ConfigError, match=r"eval.split='bogus': no task of "
                                                     r"mtjax_demo with metrics has that split "
                                                     r"\(they have: train, validation\)"):
        trainer.train(tiny_config("train.steps=2", "eval.split=bogus"), tmp_path / "run",
                      progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_mixture_evaluates_held_out_tasks_in_training_and_mtjax_eval(tmp_path, capsys):
    """eval.mixture=<a task the run does not train on> evaluates that task alone, during
    training and as `mtjax eval`'s default (zero-shot transfer to held-out tasks)."""
    from mtjax import cli
    from mtjax.train import trainer

    config = tiny_config("train.steps=2", "data.mixture=mtjax_copy", "eval.mixture=mtjax_reverse",
                         "eval.max_examples=4", "eval.max_decode_length=4")
    result = trainer.train(config, tmp_path / "run", progress=False)
    evaluated = {key.split("/")[1] for key in result.metrics if key.startswith("eval/")}
    assert evaluated == {"mtjax_reverse"}, result.metrics
    assert "evaluating eval.mixture mtjax_reverse: mtjax_reverse\n" in capsys.readouterr().err
    assert {key.split("/")[1] for key in result.metrics if key.startswith("loss/")} == {
        "mtjax_copy"}
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--max-examples", "2",
                     "--max-decode-length", "4", "--no-progress", "--no-loss"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"mtjax_reverse"}


def test_an_eval_mixture_that_cannot_be_evaluated_stops_before_training(tmp_path, monkeypatch):
    """An unknown eval.mixture, or one whose tasks use another vocabulary than the training
    tasks' (the model would read their ids as other pieces), is refused by name before the
    run directory is made, also by a run that does not evaluate (`mtjax eval` evaluates it
    then: an unknown name did not say it was eval.mixture, another vocabulary gave metrics
    of nonsense)."""
    import seqio

    from mtjax.data import pipeline
    from mtjax.train import trainer

    def examples(split, shuffle_files=False, seed=None):
        import tensorflow as tf

        return tf.data.Dataset.from_tensors({"inputs": [5, 6], "targets": [7]})

    vocabulary = seqio.PassThroughVocabulary(size=300)
    features = {k: seqio.Feature(vocabulary=vocabulary) for k in ("inputs", "targets")}
    name = "mtjax_test_other_vocabulary"
    seqio.TaskRegistry.add(name, seqio.FunctionDataSource(examples, splits=["validation"]),
                           output_features=features, metric_fns=[])
    try:
        for mixture, error, message in (
                ("mtjax_revers", pipeline.UnknownTaskError,
                 "eval.mixture: Unknown task or mixture 'mtjax_revers'. Did you mean: "
                 "mtjax_reverse"),
                (name, pipeline.VocabularyMismatchError,
                 f"eval.mixture='{name}' uses")):
            # Also where the run does not evaluate: `mtjax eval` takes eval.mixture later.
            for evaluation in ([], ["eval.at_end=false", "eval.every_steps=0"]):
                with pytest.raises(error, match=re.escape(message)):
                    trainer.train(tiny_config("train.steps=2", f"eval.mixture={mixture}",
                                              *evaluation),
                                  tmp_path / "run", progress=False)
                assert not (tmp_path / "run").exists()
    finally:
        seqio.TaskRegistry.remove(name)


def test_throughput_counts_timed_steps_only_and_sums_windows_harmonically():
    from mtjax.train import throughput

    speed = throughput.Throughput(flops_per_step=1e9, peak_flops_per_s=None, first_timed_step=3)
    speed.add(2, 500)  # the process's compiling first step: in no window
    assert speed.close_window(9.0) == {}
    speed.add(3, 100)
    speed.add(4, 300)
    assert speed.close_window(2.0) == {"tokens_per_s": 200.0, "model_flops_per_s": 1e9}
    speed.add(5, 600)
    assert speed.close_window(1.0) == {"tokens_per_s": 600.0, "model_flops_per_s": 1e9}
    # All windows: 1,000 tokens and 3 steps in 3 s (not the mean of the rows' 200 and 600).
    assert speed.overall() == pytest.approx({"tokens_per_s": 1000 / 3, "model_flops_per_s": 1e9})

    chips = throughput.job_peak_flops("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 8)
    assert chips == 8 * 989e12
    speed = throughput.Throughput(flops_per_step=4e14, peak_flops_per_s=chips,
                                  first_timed_step=1)
    speed.add(1, 10)
    assert speed.close_window(0.5)["mfu"] == pytest.approx(8e14 / chips)
    assert throughput.job_peak_flops("cpu", "cpu", "float32", 8) is None
    assert throughput.job_peak_flops("Some Future Chip", "gpu", "bfloat16", 1) is None


def test_custom_architecture_of_init_from_wins_until_the_run_has_a_checkpoint(tmp_path,
                                                                             monkeypatch):
    """A first attempt that stopped in set-up left its --init-from's architecture in the run
    directory; the next attempt, with another --init-from, trained (or failed) on the stale one."""
    from mtjax import checkpoint
    from mtjax.model import sizes
    from mtjax.train import trainer

    def architecture(directory, d_ff):
        directory.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), d_ff=d_ff)
        (directory / sizes.MODEL_CONFIG_FILE).write_text(
            json.dumps({"t5_config": dataclasses.asdict(cfg)}))

    monkeypatch.setattr(sizes, "_custom", sizes._custom)  # restored after the test
    run, given = tmp_path / "run", tmp_path / "converted"
    architecture(run, 40)  # left by the attempt that stopped
    architecture(given, 48)
    monkeypatch.setattr(checkpoint, "find_state_dir", lambda path: given / "checkpoints" / "0")
    monkeypatch.setattr(checkpoint, "run_dir_of", lambda path: given)
    assert trainer._use_custom_architecture(run, str(given)) == given / sizes.MODEL_CONFIG_FILE
    assert sizes.get_config(sizes.CUSTOM).d_ff == 48
    (run / "checkpoints" / "5").mkdir(parents=True)  # a run that saved: it resumes as it was
    assert trainer._use_custom_architecture(run, str(given)) == run / sizes.MODEL_CONFIG_FILE
    assert sizes.get_config(sizes.CUSTOM).d_ff == 40
    assert trainer._use_custom_architecture(run, None) == run / sizes.MODEL_CONFIG_FILE


def test_a_resumed_custom_architecture_run_needs_not_its_init_from(tmp_path, monkeypatch):
    """A run fine-tuning a converted checkpoint (model.name=custom) keeps its own copy of the
    architecture; restarted with its original command line after the converted directory was
    removed, it stopped with "checkpoint .../converted does not exist" instead of resuming."""
    from mtjax.model import sizes
    from mtjax.train import trainer

    monkeypatch.setattr(sizes, "_custom", sizes._custom)  # restored after the test
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), d_ff=40)
    (run / sizes.MODEL_CONFIG_FILE).write_text(json.dumps({"t5_config": dataclasses.asdict(cfg)}))
    gone = str(tmp_path / "converted")
    assert trainer._use_custom_architecture(run, gone) == run / sizes.MODEL_CONFIG_FILE
    assert sizes.get_config(sizes.CUSTOM).d_ff == 40


def test_the_step_before_an_evaluation_is_timed(tmp_path):
    """The end-of-run evaluation waited for the last step's computation (dispatched, still
    running) and its time was taken out of tokens/s as evaluation time: a 2-step demo run
    logged 450,186 tokens/s (8.3 TFLOP/s on 2 CPU cores) for about 2,700. One-step windows
    here, with steps long enough to run behind dispatch: the evaluated step's row must be at
    the other rows' pace."""
    from mtjax.train import trainer

    trainer.train(tiny_config("train.steps=4", "log.every_steps=1", "train.batch_size=64",
                              "data.inputs_length=128", "data.targets_length=64",
                              "data.mixture=mtjax_copy"),
                  tmp_path / "run", progress=False)
    rows = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    *plain, evaluated = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in plain] == [2, 3] and "eval/mtjax_copy/exact_match" in evaluated
    pace = max(r["tokens_per_s"] for r in plain)
    assert evaluated["tokens_per_s"] < 4 * pace, (evaluated["tokens_per_s"], pace)


def test_the_closing_summary_sets_held_out_figures_apart(tmp_path, capsys):
    """With eval.loss a task's line held two `loss` figures, training's and the held-out one,
    with nothing to tell them apart. A label-smoothed training loss says so (it sits above
    the held-out loss, which is not smoothed), and held-out tasks of an eval.mixture get
    lines of their own (they were not printed)."""
    from mtjax.cli import train as train_cli
    from mtjax.train import trainer

    metrics = {"loss": 1.5, "accuracy": 0.5, "loss/a": 1.25, "accuracy/a": 0.625,
               "eval/a/loss": 1.75, "eval/a/exact_match": 12.5, "eval/b/loss": 2.5,
               "eval/c/loss": 3.5}
    result = trainer.TrainResult(workdir=tmp_path, start_step=0, step=10, metrics=metrics,
                                 wall_s=3.0, task_names=["a", "b"],
                                 throughput={"tokens_per_s": 100.0})
    train_cli._print_summary(result, label_smoothing=0.1)
    lines = capsys.readouterr().err.splitlines()
    assert "final loss 1.5000, label-smoothed by 0.1, token accuracy 0.500" in lines
    assert ("  a                            loss 1.2500  accuracy 0.625  | eval: exact_match "
            "12.5  loss 1.75") in lines
    assert ("  b                            (not in the last logged batches)  | eval: loss "
            "2.5") in lines
    # A task of eval.mixture the run did not train on, after the trained ones.
    assert lines[-2] == "  c                            (not trained on)  | eval: loss 3.5"


def test_a_profiler_warning_is_shown_on_the_host_it_concerns(monkeypatch, capsys):
    """A trace that failed on host 1 was reported by host 1 to host 0's log, which prints only
    host 0's lines: the failure went unseen."""
    import jax

    from mtjax.train import trainer

    class Bar:
        def write(self, msg, file):
            print(f"bar: {msg}", file=file)

    trainer._warn_from_any_host(Bar(), "mtjax: warning: x")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    trainer._warn_from_any_host(Bar(), "mtjax: warning: y")
    assert capsys.readouterr().err.splitlines() == ["bar: mtjax: warning: x",
                                                     "[host 1] mtjax: warning: y"]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_workdir_that_cannot_be_made_is_refused_in_one_line(tmp_path, capsys, where):
    """A --workdir under a file, or where no directory can be made (a read-only filesystem,
    /proc), ended in mkdir's or the lock's OSError traceback."""
    from mtjax import cli

    (tmp_path / "config.json").write_text("{}")
    workdir = (str(tmp_path / "config.json" / "run") if where == "under_a_file"
               else "/proc/mtjax_no_such_run")
    assert cli.main(["train", "--workdir", workdir, "--no-progress", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {workdir}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if where == "under_a_file":
        assert f"{tmp_path / 'config.json'} is a file, so no directory can be made" in err


@pytest.mark.parametrize("overrides,expected", [
    (["eval.every_steps=0"], "measured only by the evaluation at the end (eval.every_steps=0)"),
    (["eval.every_steps=300", "checkpoint.every_steps=1000", "train.steps=5000"],
     "checkpoints saved between them (checkpoint.every_steps=1000) rank worst by it"),
    (["eval.every_steps=500", "checkpoint.every_steps=1000", "train.steps=5000"], None),
    (["eval.every_steps=0", "checkpoint.every_steps=1000", "train.steps=1000"], None),
])
def test_a_best_eval_metric_that_checkpoints_miss_is_named(monkeypatch, capsys, overrides,
                                                            expected):
    """checkpoint.keep_best by an eval/ metric kept no best checkpoint where checkpoints are
    saved at steps without an evaluation (they rank worst by it), and said nothing."""
    import types

    from mtjax.infer import evaluate
    from mtjax.train import trainer

    class Evaluator:
        task_names = ["mtjax_add"]

    monkeypatch.setattr(evaluate, "make_evaluator", lambda *args, **kwargs: Evaluator())
    config = tiny_config("checkpoint.keep_best=1", "checkpoint.best_metric=eval/mtjax_add/loss",
                         *overrides)
    setup = types.SimpleNamespace(model_def=None)
    assert isinstance(trainer._make_evaluator(config, None, None, setup), Evaluator)
    err = capsys.readouterr().err
    if expected is None:
        assert "warning" not in err, err
    else:
        assert "warning: checkpoint.best_metric=eval/mtjax_add/loss is" in err and expected in err


def test_summary_json_holds_model_flops_per_s_as_null_when_no_step_was_timed(tmp_path):
    """A one-step run's summary.json wrote tokens_per_s as null but left model_flops_per_s out,
    which the README promises "the same way": a script reading the key failed on such runs."""
    import pathlib

    from mtjax.train import trainer

    def summary(throughput):
        trainer._write_summary(trainer.TrainResult(
            workdir=pathlib.Path(tmp_path), start_step=0, step=1, metrics={"loss": 6.5},
            wall_s=2.0, task_names=["mtjax_add"], throughput=throughput))
        return json.loads((tmp_path / "summary.json").read_text())

    untimed = summary({})
    assert untimed["tokens_per_s"] is None and untimed["model_flops_per_s"] is None
    assert "mfu" not in untimed  # no peak known (CPU, or a chip missing from the table)
    timed = summary({"tokens_per_s": 900.0, "model_flops_per_s": 2e9, "mfu": 0.25})
    assert (timed["tokens_per_s"], timed["model_flops_per_s"], timed["mfu"]) == (900.0, 2e9, 0.25)
