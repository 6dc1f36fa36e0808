"""Config schema: overrides are typed, unknown keys and bad values fail with the key's name."""

import json

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
