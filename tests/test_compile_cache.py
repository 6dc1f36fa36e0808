"""train.compilation_cache: where JAX's persistent cache goes, and a restarted run loading its
compiled train step from it instead of compiling again."""

import logging
import pathlib

import jax
import pytest

from mtjax import compile_cache
from mtjax import config as config_lib
from mtjax.train import metrics as metrics_lib

TINY = ["model.name=t5_1_1_test", "data.inputs_length=64", "data.targets_length=32",
        "train.batch_size=8", "train.steps=4", "log.every_steps=2", "log.tensorboard=false",
        "eval.at_end=false", "checkpoint.every_steps=100"]
# jax#38445: on some x86 hosts jax's CPU loader rejects every cached executable.
REJECTED_ON_THIS_HOST = "doesn't match the machine type for execution"


@pytest.mark.parametrize("setting, backend, jax_dir, expected", [
    ("auto", "cpu", None, None),
    ("auto", "gpu", None, str(compile_cache.DEFAULT_DIR.expanduser())),
    ("auto", "tpu", None, str(compile_cache.DEFAULT_DIR.expanduser())),
    ("auto", "cpu", "/scratch/jax", "/scratch/jax"),  # the user's JAX_COMPILATION_CACHE_DIR
    ("off", "gpu", "/scratch/jax", None),
    ("~/cc", "cpu", None, str(pathlib.Path("~/cc").expanduser())),
    ("gs://bucket/cc", "tpu", "/scratch/jax", "gs://bucket/cc"),
    # Other ways of saying off (each made a directory of its name in the current one).
    ("Off", "gpu", None, None), ("false", "cpu", None, None), ("none", "tpu", None, None),
    ("rel/cc", "cpu", None, str(pathlib.Path("rel/cc").absolute())),
])
def test_resolve(setting, backend, jax_dir, expected):
    assert compile_cache.resolve(setting, backend, jax_dir) == expected


def test_a_value_that_is_no_directory_is_refused(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for value in ("", str(a_file)):
        with pytest.raises(config_lib.ConfigError, match="train.compilation_cache"):
            config_lib.load(None, [f"train.compilation_cache={value}"])
    assert config_lib.load(None, [f"train.compilation_cache={tmp_path}/new"])


def test_a_directory_it_cannot_write_turns_the_cache_off_in_one_line(tmp_path, capsys):
    """JAX warned twice per program (a UserWarning and its source line) for a cache directory
    that exists but cannot be written."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere
        locked = pathlib.Path("/proc/self")  # exists, and not writable even by root
    try:
        use = compile_cache.enable(str(locked))
        assert use.directory is None
        assert capsys.readouterr().err.startswith(
            f"mtjax: warning: compilation cache {locked} unusable")
    finally:
        compile_cache.enable("off")


@pytest.fixture
def cache_everything():
    """Cache programs however fast they compile (the test model's step compiles in ~1 s)."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
    compile_cache.enable("off")


def test_a_restarted_run_loads_its_train_step_from_the_cache(tmp_path, cache_everything, caplog,
                                                             capfd):
    from mtjax.train import trainer

    cache = tmp_path / "cache"
    config = config_lib.load(None, TINY + [f"train.compilation_cache={cache}"])

    jax.clear_caches()  # as in a new process: nothing compiled in memory
    first = trainer.train(config, tmp_path / "first", progress=False)
    assert first.compilation_cache.directory == str(cache)
    assert first.compilation_cache.hits == 0 and first.compilation_cache.requests > 0
    assert list(cache.glob("jit_step-*")), sorted(p.name for p in cache.iterdir())

    jax.clear_caches()
    caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
    second = trainer.train(config, tmp_path / "second", progress=False)
    if REJECTED_ON_THIS_HOST in capfd.readouterr().err:
        pytest.skip("jax's CPU AOT loader rejects cached executables on this host (jax#38445)")
    hits = [r.getMessage() for r in caplog.records if "cache hit for" in r.getMessage()]
    assert any("'jit_step'" in h for h in hits), hits
    assert second.compilation_cache.hits == len(hits) >= 2  # the state's init and the step
    assert second.compilation_cache.requests >= second.compilation_cache.hits
    summary = (tmp_path / "second" / "summary.json").read_text()
    assert f'"hits": {second.compilation_cache.hits}' in summary
    # The loaded step trains exactly as the compiled one did.
    losses = [[r["loss"] for r in metrics_lib.read_jsonl(tmp_path / run / "metrics.jsonl")]
              for run in ("first", "second")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_off_and_auto_on_cpu_compile_without_the_cache(tmp_path):
    for setting in ("off", "auto"):
        use = compile_cache.enable(setting)
        assert use.directory is None and not jax.config.jax_enable_compilation_cache
        assert use.describe() == "compilation cache off"


def test_mtjax_default_directory_is_bounded(tmp_path, monkeypatch, cache_everything):
    """Only mtjax's own directory gets the LRU bound (never one the user chose), and JAX's
    eviction, which needs filelock, then still stores and finds programs."""
    default = tmp_path / "default"
    monkeypatch.setattr(compile_cache, "DEFAULT_DIR", default)
    previous = jax.config.jax_compilation_cache_max_size
    try:
        compile_cache.enable(str(tmp_path / "chosen"))
        assert jax.config.jax_compilation_cache_max_size == previous == -1
        use = compile_cache.enable(str(default))
        assert jax.config.jax_compilation_cache_max_size == compile_cache.DEFAULT_MAX_BYTES

        def program(x):
            return jax.numpy.tanh(x) * 3.0

        jax.jit(program)(jax.numpy.ones(7)).block_until_ready()
        assert list(default.glob("jit_program-*-cache")) and list(default.glob("*-atime"))
        assert use.requests >= 1 and use.hits == 0
    finally:
        jax.config.update("jax_compilation_cache_max_size", previous)
