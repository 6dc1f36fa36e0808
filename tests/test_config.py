"""Config schema: overrides are typed, unknown keys and bad values fail with the key's name."""

import json
import re

import pytest

from mtjax import config as config_lib


def test_overrides_are_parsed_to_the_field_type():
    cfg = config_lib.load(None, ["train.steps=7", "optim.learning_rate=3e-4", "data.pack=false",
                                 "optim.name=adamw", "data.tasks_module=my.tasks"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.data.pack is False
    assert cfg.optim.name == "adamw"
    assert cfg.data.tasks_module == "my.tasks"


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, ["train.stpes=5"])
    assert "train.stpes" in str(e.value) and "train.steps" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.steps=ten", "train.steps"),
    ("data.pack=maybe", "data.pack"),
    ("optim.name=sgd", "optim.name"),
    ("train.batch_size=0", "train.batch_size"),
    ("nosection", "nosection"),
    ("data.mixing_cap=0", "data.mixing_cap"),
    ("data.mixing_temperature=-1", "data.mixing_temperature"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, [override])
    assert key in str(e.value)


def test_config_file_and_json_round_trip(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import dataclasses\n"
        "from mtjax.config import Config, TrainConfig\n"
        "def get_config():\n"
        "    return Config(train=TrainConfig(steps=11))\n")
    cfg = config_lib.load(path, ["train.seed=3"])
    assert cfg.train.steps == 11 and cfg.train.seed == 3
    config_lib.dump(cfg, tmp_path / "config.json")
    again = config_lib.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    # Each was accepted and failed later: NaN after compiling, a traceback, or silently.
    ("optim.learning_rate=nan", "'optim.learning_rate' must be a finite number >= 0.0, got nan"),
    ("optim.learning_rate=-0.01", "'optim.learning_rate' must be a finite number >= 0.0"),
    ("optim.learning_rate=inf", "'optim.learning_rate' must be a finite number"),
    ("optim.grad_clip_norm=-1", "'optim.grad_clip_norm' must be a finite number >= 0.0"),
    ("optim.weight_decay=-1", "'optim.weight_decay'"),
    ("optim.warmup_steps=-5", "'optim.warmup_steps' must be a finite number >= 0"),
    ("train.z_loss=nan", "'train.z_loss'"),
    ("train.label_smoothing=1.0", "'train.label_smoothing' must be a finite number >= 0.0 and "
                                  "below 1"),
    ("train.label_smoothing=-0.1", "'train.label_smoothing'"),
    ("train.loss_normalizing_factor=-233472", "'train.loss_normalizing_factor' must be a finite "
                                              "number >= 0.0, got -233472.0"),
    ("train.loss_normalizing_factor=inf", "'train.loss_normalizing_factor'"),
    ("eval.alpha=nan", "'eval.alpha'"),
    ("model.dropout_rate=1.5", "'model.dropout_rate' must be a finite number >= 0.0 and below 1"),
    ("model.dropout_rate=1.0", "'model.dropout_rate'"),
    ("train.seed=99999999999999999999", "'train.seed'"),
    ("data.inputs_length=99999999999", "'data.inputs_length' must be a finite number >= 1 and "
                                       "at most 1048576"),
    ("data.mixing_temperature=inf", "'data.mixing_temperature'"),
])
def test_numbers_out_of_range_are_refused_by_name(override, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load(None, [override])


def test_label_smoothing_with_the_cpu_loss_kernel_is_refused_with_the_fix():
    """The fused CPU loss kernel has no label smoothing: naming it would train unsmoothed."""
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, ["train.label_smoothing=0.1", "train.cross_entropy=cpu_fused"])
    assert str(e.value) == ("train.cross_entropy=cpu_fused has no label smoothing "
                            "(train.label_smoothing=0.1); use train.cross_entropy=auto or xla, "
                            "or train.label_smoothing=0")
    assert config_lib.load(None, ["train.label_smoothing=0.1"]).train.cross_entropy == "auto"


@pytest.mark.parametrize("override, fix", [
    ("train.loss_normalizing_factor=AVERAGE_PER_SEQUENCE", "train.loss_normalization=per_sequence"),
    ("train.loss_normalizing_factor='NUM_TOTAL_TARGET_TOKENS'",
     "train.loss_normalization=total_tokens"),
    ("train.loss_normalization=num_real_target_tokens", "train.loss_normalization=tokens"),
])
def test_t5x_loss_normalizing_factor_names_are_answered_with_the_setting(override, fix):
    """T5X's gin takes a named factor where mtjax's constant is a number: the message names
    mtjax's setting instead of "expects float"."""
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, [override])
    assert f"is {fix} in mtjax" in str(e.value)
    assert config_lib.load(None, [fix]).train.loss_normalization == fix.split("=")[1]


@pytest.mark.parametrize("train, fix", [
    ({"loss_normalizing_factor": "AVERAGE_PER_SEQUENCE"}, "train.loss_normalization=per_sequence"),
    ({"loss_normalization": "NUM_TOTAL_TARGET_TOKENS"}, "train.loss_normalization=total_tokens"),
])
def test_t5x_loss_normalizing_factor_names_in_a_config_file_are_answered_too(tmp_path, train,
                                                                          fix):
    """A get_config() that sets T5X's named factor gets the same answer as the command line,
    not "expects float" or "must be one of"."""
    path = tmp_path / "t5x_habit.py"
    path.write_text("from mtjax.config import Config, TrainConfig\n\ndef get_config():\n"
                    f"    return Config(train=TrainConfig(**{train!r}))\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(str(path), [])
    assert f"is {fix} in mtjax" in str(e.value)


def test_a_constant_loss_normalizing_factor_and_a_named_one_are_refused_together():
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            "train.loss_normalizing_factor=233472.0 divides the loss by that constant, and "
            "train.loss_normalization=per_sequence by a count of the batch; set only one")):
        config_lib.load(None, ["train.loss_normalizing_factor=233472",
                               "train.loss_normalization=per_sequence"])


def test_a_config_file_that_is_not_python_or_whose_get_config_raises_is_one_line(tmp_path):
    """A run's config.json given as --config, or a get_config() that raised, was a traceback
    with exit 1 (AttributeError on a None loader; the function's own exception)."""
    recorded = tmp_path / "config.json"
    config_lib.dump(config_lib.load(None), recorded)
    with pytest.raises(config_lib.ConfigError, match="is not a .py file.*config.json records"):
        config_lib.load(recorded)
    with pytest.raises(config_lib.ConfigError, match="is a directory"):
        config_lib.load(tmp_path)
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    with pytest.raises(config_lib.ConfigError,
                       match=r"get_config\(\) in .*raising.py' failed: RuntimeError: boom"):
        config_lib.load(raising)


def test_a_config_file_that_assigns_to_a_field_is_told_how_to_build_it(tmp_path):
    """T5X and ml_collections configs are assigned to (`config.train.steps = 10`); mtjax's are
    frozen, and the error said only FrozenInstanceError, not how to write it instead."""
    assigning = tmp_path / "assigning.py"
    assigning.write_text("from mtjax.config import Config\n\ndef get_config():\n"
                         "    config = Config()\n    config.train.steps = 10\n"
                         "    return config\n")
    with pytest.raises(config_lib.ConfigError, match=(
            r"failed: FrozenInstanceError: cannot assign to field 'steps'; the config is "
            r"frozen: build it, e.g. Config\(train=TrainConfig\(steps=1000\)\), or copy it "
            r"with dataclasses.replace")):
        config_lib.load(assigning)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "nope.py")


def test_demo_config_file_is_the_default():
    import pathlib

    demo = pathlib.Path(__file__).parent.parent / "configs" / "demo.py"
    assert config_lib.load(demo) == config_lib.Config()


def test_a_relative_tasks_file_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(None, ["data.tasks_module=my_tasks.py"])
    assert cfg.data.tasks_module == str(tmp_path.resolve() / "my_tasks.py")
    # Module paths and files that do not exist are left as given (the import says what is wrong).
    assert config_lib.load(None, ["data.tasks_module=nope.py"]).data.tasks_module == "nope.py"


def test_a_relative_vocabulary_file_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "spm.model").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(None, ["data.vocabulary=vocab/spm.model"])
    assert cfg.data.vocabulary == str(tmp_path.resolve() / "vocab" / "spm.model")
    for name in ("byte", "missing.model"):
        assert config_lib.load(None, [f"data.vocabulary={name}"]).data.vocabulary == name


def _config_file(tmp_path, body):
    path = tmp_path / "cfg.py"
    path.write_text("import dataclasses\n"
                    "from mtjax.config import Config, DataConfig, OptimConfig, TrainConfig\n"
                    f"def get_config():\n    return {body}\n")
    return path


@pytest.mark.parametrize("body, message", [
    ("Config(train=TrainConfig(steps='ten'))", "'train.steps' expects int, got 'ten'"),
    ("Config(data=DataConfig(pack='no'))", "'data.pack' expects bool, got 'no'"),
    ("Config(train=TrainConfig(steps=True))", "'train.steps' expects int, got True"),
    ("Config(data=DataConfig(mixing_cap='5'))", "'data.mixing_cap' expects int or None"),
    ("Config(optim=OptimConfig(learning_rate='1e-3'))", "'optim.learning_rate' expects float"),
])
def test_config_file_values_are_type_checked(tmp_path, body, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(_config_file(tmp_path, body))


def test_an_int_given_for_a_float_is_taken_as_that_float(tmp_path):
    cfg = config_lib.load(_config_file(tmp_path, "Config(optim=OptimConfig(learning_rate=1))"))
    assert cfg.optim.learning_rate == 1.0 and type(cfg.optim.learning_rate) is float
    # The config a run records round-trips to the same, typed config.
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_a_recorded_config_with_a_wrong_type_is_refused():
    data = config_lib.to_dict(config_lib.Config())
    data["train"]["batch_size"] = "16"
    with pytest.raises(config_lib.ConfigError, match="'train.batch_size' expects int"):
        config_lib.from_dict(data)


def test_a_later_value_of_a_key_wins_and_the_cli_says_so(capsys):
    # Launch scripts put the user's overrides after their defaults.
    given = ["train.steps=3", "train.seed=1", "train.steps=4"]
    assert config_lib.load(None, given).train.steps == 4
    assert config_lib.repeated_keys(given) == [
        "train.steps is given 2 times (train.steps=3 train.steps=4); the last one counts"]
    from mtjax import cli

    # (a misspelt key too, so that nothing trains)
    assert cli.main(["train", "train.seed=1", "train.seed=2", "train.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert "mtjax: note: train.seed is given 2 times" in err and "'train.stepz'" in err


def test_an_unknown_section_is_one_line_naming_the_sections():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, ["foo.bar=1"])
    message = str(e.value)
    assert "no section 'foo'" in message and "train, data, model" in message
    assert "train.steps" not in message and "\n" not in message


def test_train_help_lists_every_key_with_its_default(capsys):
    from mtjax import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for key in config_lib.all_keys():
        assert f"{key}={config_lib.get(config_lib.Config(), key)}" in text, key


def test_mixing_values_that_the_strategy_does_not_use_are_noted():
    notes = config_lib.unused_settings(config_lib.load(None, [
        "data.mixing=equal", "data.mixing_cap=100", "data.mixing_temperature=4"]))
    assert len(notes) == 2 and "data.mixing_cap=100 is not used with data.mixing=equal" in notes[0]
    assert not config_lib.unused_settings(config_lib.load(None, [
        "data.mixing=temperature", "data.mixing_cap=100", "data.mixing_temperature=4"]))


def test_a_recorded_adafactor_bfloat16_state_of_an_older_version_is_read():
    # mtjax before 2026-12-06 accepted optim.state_dtype=bfloat16 with adafactor; a run it
    # recorded so must stay readable (eval, infer, score, convert read this record), not be
    # refused with advice to change a setting of a run that has already trained.
    data = config_lib.to_dict(config_lib.Config())
    data["optim"]["name"], data["optim"]["state_dtype"] = "adafactor", "bfloat16"
    assert config_lib.from_dict(data).optim.state_dtype == "float32"
    # Given now, on the command line, it is still refused.
    with pytest.raises(config_lib.ConfigError, match="adafactor keeps none"):
        config_lib.load(None, ["optim.state_dtype=bfloat16"])
