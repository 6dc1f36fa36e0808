"""The command line: user mistakes exit 2 with one line naming the problem, no traceback."""

import pytest

from mtjax import cli


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_key_exits_2_naming_the_key(capsys, tmp_path):
    code, _, err = run(["train", "--workdir", str(tmp_path), "train.stesp=3"], capsys)
    assert code == 2
    assert "train.stesp" in err and "train.steps" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_impossible_kernel_choice_exits_2_before_compiling(capsys, tmp_path):
    """An explicit implementation that cannot run here is a config mistake, told in one line
    when the step is set up, not a traceback from inside the model's tracing."""
    code, _, err = run(["train", "--workdir", str(tmp_path), "model.name=t5_1_1_test",
                        "model.attention=cpu_fused", "model.dtype=bfloat16"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "mtjax: error: model.attention=cpu_fused cannot run: it takes float32 activations "
        "(model.dtype is bfloat16); use model.attention=auto or xla")


@pytest.mark.parametrize("override, needle", [
    ("data.mixture=mtjax_dmo", "Unknown task or mixture 'mtjax_dmo'"),
    ("model.name=t5_tiny", "did you mean t5_1_1_tiny"),
    ("data.tasks_module=/nonexistent/tasks.py", "does not exist"),
])
def test_unknown_names_in_train_are_one_line_before_anything_else(capsys, tmp_path, override,
                                                                  needle):
    workdir = tmp_path / "run"
    code, out, err = run(["train", "--workdir", str(workdir), override], capsys)
    assert code == 2 and needle in err and not out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()  # nothing made on disk either


def test_overrides_may_follow_options(capsys, tmp_path):
    """KEY=VALUE before, between and after options all count, in order (the last one wins)."""
    from mtjax.cli import _parse

    parser = cli.build_parser()
    args = _parse(parser, ["train", "train.steps=3", "--workdir", str(tmp_path), "--no-progress",
                           "model.name=t5_1_1_test", "train.steps=4"])
    assert args.overrides == ["train.steps=3", "model.name=t5_1_1_test", "train.steps=4"]
    assert args.no_progress and args.workdir == str(tmp_path)
    with pytest.raises(SystemExit):  # overrides for a command without them are an error
        _parse(parser, ["model", "list", "a=b"])
    capsys.readouterr()
    code, _, err = run(["train", "--workdir", str(tmp_path), "--no-progress", "stray"], capsys)
    assert code == 2 and "stray" in err and len(err.strip().splitlines()) == 1, err


def test_mistyped_value_exits_2(capsys, tmp_path):
    code, _, err = run(["train", "--workdir", str(tmp_path), "train.batch_size=big"], capsys)
    assert code == 2 and "train.batch_size" in err


def test_unknown_model_exits_2_with_suggestion(capsys):
    code, _, err = run(["model", "info", "t5_1_1_bse"], capsys)
    assert code == 2 and "t5_1_1_base" in err


def test_model_info_reports_published_size(capsys):
    import json

    code, out, _ = run(["model", "info", "t5_1_1_base"], capsys)
    info = json.loads(out)
    assert code == 0
    assert abs(info["params"] - 247.6e6) / 247.6e6 < 0.01
    from mtjax.model import sizes

    cfg = sizes.get_config("t5_1_1_base")
    assert info["train_flops_per_token"] == pytest.approx(
        sizes.train_flops_per_step(cfg, 1, 512, 114) / (512 + 114))
    assert info["param_bytes"] == 4 * info["params"]  # float32 parameters
    # AdamW keeps two float32 moments; Adafactor's factored statistics are far smaller.
    assert info["adamw_state_bytes"] >= 2 * info["param_bytes"]
    assert info["adafactor_state_bytes"] < 0.05 * info["param_bytes"]


def test_model_info_with_the_vocabulary_training_uses(capsys):
    """`mtjax train` of t5_1_1_tiny on the byte tasks reports 4.92M parameters (vocab 384);
    model info says the same when given that vocabulary, and its default otherwise."""
    import json

    from mtjax.model import sizes

    code, out, _ = run(["model", "info", "t5_1_1_tiny", "--vocab-size", "384"], capsys)
    info = json.loads(out)
    assert code == 0 and info["vocab_size"] == 384 and info["params"] == 4_919_808
    code, out, _ = run(["model", "info", "t5_1_1_tiny"], capsys)
    assert json.loads(out)["vocab_size"] == sizes.get_config("t5_1_1_tiny").vocab_size == 32128
    code, _, err = run(["model", "info", "t5_1_1_tiny", "--targets-length", "-1"], capsys)
    assert code == 2 and "--targets-length must be positive" in err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    assert "--workdir" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "model", "bench", "convert", "checkpoints", "tasks",
                                     "vocab", "score", "eval", "infer"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, missing", [
    (["tasks", "show"], "required: name"),
    (["tasks"], "required: {list,show,preview}"),
    (["model"], "required: {info,list}"),
    (["vocab"], "required: {train,encode}"),
])
def test_a_missing_argument_is_named_as_the_usage_names_it(capsys, argv, missing):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().endswith(missing), err


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(tmp_path):
    """`mtjax checkpoints RUN --json | head` printed a BrokenPipeError traceback."""
    import subprocess
    import sys

    (tmp_path / "checkpoints").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mtjax", "checkpoints", str(tmp_path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command has started writing: its write fails
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""
