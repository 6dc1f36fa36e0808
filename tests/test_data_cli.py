"""`mtjax tasks` and `mtjax vocab`, a user's task module training by path, per-task losses."""

import dataclasses
import json
import textwrap

import jax
import numpy as np
import optax
import pytest

from mtjax import cli

USER_TASKS = textwrap.dedent('''
    """A user's tasks: a TSV question-answer task and span corruption over its text."""
    import pathlib

    from mtjax.data import tasks

    HERE = pathlib.Path(__file__).parent
    tasks.add_file_task("user_qa", str(HERE / "qa.tsv"),
                        columns={"inputs": "question", "targets": "answer"})
    tasks.add_span_corruption_task("user_qa_sc", "user_qa", text_key=("inputs", "targets"))
    tasks.add_mixture("user_mix", ["user_qa", "user_qa_sc"], mixing="equal")
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    rows = [f"what is {a} plus {b}?\t{a + b}" for a in range(30) for b in range(10)]
    (d / "qa.tsv").write_text("question\tanswer\n" + "\n".join(rows) + "\n")
    (d / "my_tasks.py").write_text(USER_TASKS)
    return d / "my_tasks.py"


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tasks_list_show_preview(capsys, user_module):
    code, out, _ = run(["tasks", "list", "--json", "--tasks-module", str(user_module)], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    names = {r["name"]: r["kind"] for r in rows}
    assert code == 0 and names["user_mix"] == "mixture" and names["user_qa"] == "task"
    assert names["mtjax_demo"] == "mixture" and names["mtjax_kb_qa"] == "task"

    code, out, _ = run(["tasks", "show", "user_qa", "--tasks-module", str(user_module),
                        "data.mixture=user_mix"], capsys)
    info = json.loads(out)
    assert code == 0 and info["splits"] == {"train": 300}
    assert info["preprocessors"] == ["tokenize", "append_eos_after_trim"]
    assert info["output_features"]["targets"]["vocabulary"] == "byte(259)"
    assert info["rate"]["rate"] == pytest.approx(0.5) and "FileSource" in info["source"]

    code, out, err = run(["tasks", "preview", "user_qa", "-n", "2", "--sample", "50",
                          "--json", "--tasks-module", str(user_module),
                          "data.inputs_length=16"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    examples, (stats,) = lines[:2], lines[2:]
    assert code == 0 and examples[0]["inputs"].startswith("what is") and len(examples) == 2
    assert examples[0]["inputs_truncated"] and examples[0]["inputs_tokens"] > 16
    assert stats["stats"]["inputs"]["truncated"] == 1.0
    assert "data.inputs_length=16 truncates 100% of user_qa" in err


def test_tasks_show_stops_on_malformed_lines_as_train_does(tmp_path, capsys):
    """`show` counted only the good lines ("train": 5 of 7) and exited 0 without a word."""
    (tmp_path / "bad.tsv").write_text("q\ta\n" + "".join(f"q{i}\ta{i}\n" for i in range(5))
                                      + "only one field\nthree\tfields\there\n")
    module = tmp_path / "bad_tasks.py"
    module.write_text("import pathlib\nfrom mtjax.data import tasks\n"
                      "tasks.add_file_task('user_bad_show', str(pathlib.Path(__file__).parent / "
                      "'bad.tsv'), columns={'inputs': 'q', 'targets': 'a'})\n"
                      "tasks.add_mixture('user_bad_mix', ['user_bad_show'])\n")
    for name in ("user_bad_show", "user_bad_mix"):
        code, out, err = run(["tasks", "show", name, "--tasks-module", str(module)], capsys)
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert "2 malformed line(s)" in err and "bad.tsv:7" in err and "on_malformed" in err
    code, out, err = run(["tasks", "show", "user_bad_show", "--tasks-module", str(module),
                          "data.on_malformed=skip"], capsys)
    assert code == 0 and json.loads(out)["splits"] == {"train": 5}


@pytest.mark.parametrize("command", ["show", "preview"])
def test_tasks_show_and_preview_check_the_runs_vocabulary(capsys, command):
    """They take the run's overrides, yet data.vocabulary naming no file passed unchecked
    (exit 0), where `train` stops."""
    code, out, err = run(["tasks", command, "mtjax_copy", "data.vocabulary=/nonexistent/spm.model"],
                         capsys)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert "data.vocabulary" in err and "/nonexistent/spm.model" in err


def test_tasks_preview_span_corruption_text(capsys):
    code, out, _ = run(["tasks", "preview", "mtjax_kb_bio_span_corruption", "-n", "1",
                        "--sample", "20"], capsys)
    assert code == 0 and "<extra_id_0>" in out and "truncates   0.0%" in out


@pytest.mark.parametrize("argv,needle", [
    (["tasks", "show", "mtjax_dmo"], "Did you mean: mtjax_demo"),
    (["tasks", "preview", "user_nope", "--tasks-module", "/nonexistent/tasks.py"],
     "does not exist"),
    (["tasks", "show", "mtjax_kb", "data.mixing=temprature"], "data.mixing"),
    (["vocab", "train", "--input", "/nonexistent.txt", "--out", "/tmp/x"], "not found"),
    (["vocab", "encode", "{tmp}/raises.py", "hi"], "raises.py is not a SentencePiece model"),
    (["tasks", "show", "mtjax_add", "--split", "nosuch"],
     "task 'mtjax_add' has no split 'nosuch'"),
    (["tasks", "list", "--tasks-module", "{tmp}/raises.py"],
     "failed to import (at {tmp}/raises.py:2): KeyError: 'text_col'"),
    (["tasks", "list", "--tasks-module", "{tmp}/broken.py"],
     "failed to import (at {tmp}/broken.py:1): SyntaxError: invalid syntax"),
    # Raised inside the standard library: the user's line that called it is named.
    (["tasks", "list", "--tasks-module", "{tmp}/bad_json.py"],
     "failed to import (at {tmp}/bad_json.py:3): JSONDecodeError: Expecting property name"),
    # A module name for a file of the current directory, which is not on the module path.
    (["tasks", "list", "--tasks-module", "raises"],
     "'raises' not found on Python's module path, but raises.py is here: give the file, "
     "--tasks-module raises.py"),
    # A data file, or a folder, where the module that registers the tasks belongs.
    (["tasks", "list", "--tasks-module", "data.tsv"],
     "tasks module file 'data.tsv' is not a .py file; give the Python file that registers "
     "your tasks (it names the data files)"),
    (["tasks", "list", "--tasks-module", "{tmp}/data.tsv"],
     "tasks module file '{tmp}/data.tsv' is not a .py file"),
    (["tasks", "list", "--tasks-module", "{tmp}/"],
     "is a folder; give the .py file that registers your tasks"),
])
def test_mistakes_are_one_line(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raises.py").write_text("columns = {}\ncolumn = columns['text_col']\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "bad_json.py").write_text("import json\n\njson.loads('{oops')\n")
    (tmp_path / "data.tsv").write_text("question\tanswer\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    needle = needle.format(tmp=tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2 and needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_vocab_cli_round_trip(capsys, tmp_path):
    from mtjax.data import knowledge

    corpus = tmp_path / "bios.txt"
    corpus.write_text("\n".join(knowledge.biographies("validation")) + "\n")
    code, out, _ = run(["vocab", "train", "--input", str(corpus), "--size", "150", "--out",
                        str(tmp_path / "v")], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["vocab_size"] == 250
    code, out, _ = run(["vocab", "encode", summary["model"], "kopido lives in cuxaca."], capsys)
    encoded = json.loads(out)
    assert encoded["decoded"] == "kopido lives in cuxaca." and encoded["ids"][-1] != 1


def test_lossless_vocabulary_gives_back_any_text(capsys, tmp_path):
    """T5's SentencePiece settings normalise text (NFKC, whitespace runs) and map unseen
    characters to UNK; --lossless decodes back exactly what was encoded."""
    from mtjax.data import get_vocabulary, knowledge

    corpus = tmp_path / "bios.txt"
    corpus.write_text("\n".join(knowledge.biographies("validation")) + "\n")
    texts = ["def  f(x):\n\treturn x", "\ufb01ne caf\u00e9 \u65e5\u672c \U0001f600",
             " lead, trail "]
    decoded = {}
    for lossless in (False, True):
        out_dir = tmp_path / f"lossless_{lossless}"
        code, out, _ = run(["vocab", "train", "--input", str(corpus), "--size", "300", "--out",
                            str(out_dir), *(["--lossless"] if lossless else [])], capsys)
        assert code == 0 and json.loads(out)["lossless"] is lossless
        vocab = get_vocabulary(str(out_dir / "spm.model"))
        decoded[lossless] = [vocab.decode(vocab.encode(t)) for t in texts]
    assert decoded[True] == texts
    # The README's exceptions: SentencePiece's space sign, and text that spells a sentinel.
    assert vocab.decode(vocab.encode("meta\u2581char")) == "meta char"
    assert vocab.vocab_size - 1 - 3 in vocab.encode("a <extra_id_3> b")
    assert all(got != text for got, text in zip(decoded[False], texts, strict=True))


def test_user_task_module_trains_by_path(capsys, tmp_path, user_module):
    code, _, err = run([
        "train", "--workdir", str(tmp_path), "--tasks-module", str(user_module), "--no-progress",
        "data.mixture=user_mix", "model.name=t5_1_1_test", "train.steps=2",
        "train.batch_size=2", "data.inputs_length=32", "data.targets_length=16",
        "log.every_steps=1", "log.tensorboard=false", "checkpoint.every_steps=2",
        "eval.every_steps=0"], capsys)
    assert code == 0, err
    # Its tasks have no metric_fns (and no validation split): eval.at_end says so in mtjax's
    # words, once, in place of seqio's warning.
    assert "note: no task of user_mix has a 'validation' split" in err, err
    assert "No eval task" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and summary["tasks"] == ["user_qa", "user_qa_sc"]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["loss/user_qa"]) and np.isfinite(last["loss/user_qa_sc"])


def test_per_task_loss_equals_the_task_alone():
    """Each task's loss in a packed mixture batch equals its examples' loss in a batch alone."""
    from mtjax.data import DEFAULT_MIXTURE, InputPipeline, decode_packed_row, get_vocabulary
    from mtjax.infer.batching import score_batch_arrays
    from mtjax.model import sizes
    from mtjax.parallel import mesh as mesh_lib
    from mtjax.train import state as state_lib
    from mtjax.train import step as step_lib

    pipeline = InputPipeline(DEFAULT_MIXTURE, inputs_length=64, targets_length=32, batch_size=4)
    batch = next(pipeline)
    num_tasks = len(pipeline.task_names)
    cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=384)
    mesh, rules = mesh_lib.make_mesh(mesh_lib.MeshShape()), mesh_lib.get_rules("fsdp")
    tx = optax.sgd(0.1)
    model_def, _, shardings = state_lib.state_shardings(cfg, tx, mesh, rules, 0)
    params = state_lib.init_train_state(model_def, tx, shardings, mesh, rules, 0).params

    @jax.jit
    def sums(params, batch):
        logits = step_lib.model_logits(model_def, params, batch, None)
        return step_lib.batch_metrics(logits, batch, num_tasks, z_loss=1e-4)[1]

    with mesh_lib.activate(mesh, rules):
        packed = jax.device_get(sums(params, batch))
        by_task: dict[int, list] = {}
        for row in range(len(batch["decoder_target_tokens"])):
            for task_id, input_ids, target_ids, _, _ in decode_packed_row(
                    batch, row, get_vocabulary("byte")):
                by_task.setdefault(task_id, []).append((input_ids, target_ids))
        assert len(by_task) >= 3
        rows = max(len(v) for v in by_task.values())
        for task_id, examples in by_task.items():
            alone = score_batch_arrays([e[0] for e in examples], [e[1] for e in examples],
                                       inputs_length=64, targets_length=32)
            alone = {k: np.pad(v, [(0, rows - len(v)), (0, 0)]) for k, v in alone.items()}
            alone["decoder_task_ids"] = alone["decoder_loss_weights"] * task_id
            single = jax.device_get(sums(params, alone))
            i = task_id - 1
            assert packed["task_weight_sum"][i] == single["weight_sum"]
            np.testing.assert_allclose(
                packed["task_loss_sum"][i] / packed["task_weight_sum"][i],
                single["loss_sum"] / single["weight_sum"], rtol=1e-5)


def test_bench_data_smoke(capsys):
    from mtjax import bench

    assert bench.main(["data", "--smoke"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["cases"]) == {"mixture", "span_corruption"}
    for case in result["cases"].values():
        assert case["batches"] == 30 and case["examples_per_s"] > 0
        assert 0 < case["packing_efficiency"] <= case["binding_side_efficiency"] <= 1
    assert result["cases"]["mixture"]["mixture"] == "mtjax_demo"
    # Versions recorded as in every bench JSON, the input pipeline's own libraries too.
    assert {"jax", "tensorflow", "seqio"} <= set(result["environment"]["versions"])
    assert result["environment"]["versions"]["seqio"]


def test_bench_data_shapes_follow_the_smoke_flag_not_the_numbers(monkeypatch):
    """Span corruption ran at the configured lengths whenever steps < 10 and inputs < 64, and at
    512/128 with --smoke --steps 10."""
    from mtjax import config as config_lib
    from mtjax.bench import data as data_bench
    from mtjax.bench.train import BenchOptions

    seen = {}

    def fake_case(config, mixture, lengths, batches, warmup):
        seen[mixture] = lengths
        return {k: 1.0 for k in ("examples_per_s", "packed_tokens_per_s", "packing_efficiency",
                                 "binding_side_efficiency")}

    monkeypatch.setattr(data_bench, "_case", fake_case)
    config = config_lib.load(None, ["data.inputs_length=32", "data.targets_length=16"])
    data_bench.run(config, BenchOptions(steps=2))
    assert seen[data_bench.SPAN_CORRUPTION_TASK] == data_bench.SPAN_CORRUPTION_LENGTHS
    data_bench.run(config, BenchOptions(steps=10, smoke=True))
    assert seen[data_bench.SPAN_CORRUPTION_TASK] == (32, 16)


def test_bench_data_takes_a_users_mixture_and_names_an_unknown_one(user_module, capsys):
    from mtjax import bench

    assert bench.main(["data", "--smoke", "--tasks-module", str(user_module),
                       "data.mixture=user_mix"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cases"]["mixture"]["mixture"] == "user_mix"
    assert result["cases"]["mixture"]["examples_per_s"] > 0
    assert bench.main(["data", "--smoke", "data.mixture=user_mixx"]) == 2
    err = capsys.readouterr().err
    assert "mtjax bench: error: Unknown task or mixture 'user_mixx'" in err
    assert "Traceback" not in err and "--tasks-module" in err


def test_vocab_encode_shows_the_bytes_of_a_multibyte_character(capsys):
    code, out, _ = run(["vocab", "encode", "byte", "hé"], capsys)
    assert code == 0 and json.loads(out)["pieces"] == ["h", "<0xC3>", "<0xA9>"]


def test_a_vocabulary_that_is_no_sentencepiece_model_is_one_line(capsys, tmp_path):
    """`vocab train` writes spm.model and spm.vocab side by side; data.vocabulary=.../spm.vocab
    (the text listing) ended in protobuf's DecodeError traceback when the tasks tokenized."""
    (tmp_path / "spm.vocab").write_text("<pad>\t0\n</s>\t0\n<unk>\t0\n")
    (tmp_path / "qa.tsv").write_text("what is 1 plus 1?\t2\n")
    (tmp_path / "t.py").write_text(
        f"from mtjax.data import tasks\ntasks.add_file_task('t', {str(tmp_path / 'qa.tsv')!r})\n")
    code, _, err = run(["tasks", "preview", "t", "--tasks-module", str(tmp_path / "t.py"),
                        f"data.vocabulary={tmp_path / 'spm.vocab'}"], capsys)
    assert code == 2 and f"{tmp_path / 'spm.vocab'} is not a SentencePiece model" in err
    assert "give the .model file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_tasks_help_gives_overrides_that_apply_to_tasks():
    """The KEY=VALUE example was train's (train.steps=100 model.name=...), which tasks ignore."""
    from mtjax.cli import tasks as tasks_cli

    for command in ("list", "show", "preview"):
        text = " ".join(tasks_cli.build_parser(command).format_help().split())
        assert "e.g. data.inputs_length=512 data.mixing=temperature" in text
        assert "train.steps" not in text


def test_a_relative_tasks_module_that_is_not_found_says_where_it_was_looked_for(
        capsys, tmp_path, monkeypatch):
    """A --config file beside its tasks module, naming it relative (`tasks_module="my_tasks.py"`),
    run from another directory, said only that 'my_tasks.py' does not exist (it is right
    beside the config): the error now names the path read, and what relative paths are read
    from."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my_tasks.py").write_text("")
    (tmp_path / "configs" / "exp.py").write_text(
        "from mtjax.config import Config, DataConfig\n\n"
        "def get_config():\n    return Config(data=DataConfig(tasks_module='my_tasks.py'))\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["tasks", "list", "--config", "configs/exp.py"], capsys)
    assert code == 2, err
    assert (f"tasks module file 'my_tasks.py' does not exist (looked for at "
            f"{tmp_path / 'my_tasks.py'}: a relative path is read from the directory mtjax "
            f"runs in)") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_sentencepiece_model_with_sentencepieces_default_ids_is_refused(tmp_path, capsys):
    """SentencePiece's defaults (UNK 0, BOS 1, EOS 2, no PAD) were taken as they are: every
    unknown piece encoded as 0, seqio's padding (out of the loss), and EOS 2 never stopped
    mtjax's decoder (which stops at 1)."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over a dog\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "default"),
                                   vocab_size=40, minloglevel=2)
    model = tmp_path / "default.model"
    code, out, err = run(["vocab", "encode", str(model), "the fox"], capsys)
    assert (code, out) == (2, ""), (code, out, err)
    assert (f"Vocabulary {model} has PAD none, EOS 2, UNK 0; T5 models need PAD 0, EOS 1, "
            f"UNK 2: train it with pad_id=0 eos_id=1 unk_id=2 bos_id=-1 (as `mtjax vocab "
            f"train` does)") in err, err
    assert "Traceback" not in err, err


def test_vocab_train_on_empty_text_is_one_plain_line_and_makes_no_directory(capsys, tmp_path):
    """Text files of blank lines gave SentencePiece's "INTERNAL: src/trainer_interface.cc(467)
    [!sentences_.empty()]", and a failed training left the --out directories it had made."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    out = tmp_path / "new" / "vocab"
    code, stdout, err = run(["vocab", "train", "--input", str(blank), "--size", "50", "--out",
                             str(out)], capsys)
    assert code == 2 and not stdout, err
    assert err.strip().splitlines()[-1] == (
        "mtjax: error: vocab train: SentencePiece failed: the input files hold no text (every "
        "line is empty) (--size 50, 1 input file(s))")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]


@pytest.mark.parametrize("coverage", ["2", "0.5", "nan"])
def test_vocab_train_names_the_character_coverage_it_takes(capsys, tmp_path, coverage):
    """SentencePiece refused a coverage outside [0.98, 1] with its internal check,
    "INTERNAL: src/trainer_interface.cc(94) [trainer_spec.character_coverage() >= 0.98 && ...]",
    after creating --out."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("a few words of text\n")
    code, stdout, err = run(["vocab", "train", "--input", str(corpus), "--size", "50", "--out",
                             str(tmp_path / "v"), "--character-coverage", coverage], capsys)
    assert code == 2 and not stdout, err
    assert err.strip().splitlines() == [
        f"mtjax: error: vocab train: --character-coverage must be between 0.98 and 1.0 (1.0 "
        f"for small alphabets, 0.9995 for CJK), got {float(coverage)}"], err
    assert not (tmp_path / "v").exists()
