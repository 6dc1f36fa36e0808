"""Task helpers (files, TFDS, objectives), vocabularies, mixing strategies and data errors."""

import json
import os
import pathlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from mtjax import config as config_lib
from mtjax.data import builtin, knowledge, mixing, objectives, preview, tasks
from mtjax.data import files as files_lib
from mtjax.data import vocab as vocab_lib
from mtjax.data.pipeline import DataError, InputPipeline, VocabularyMismatchError
from mtjax.errors import UserError

LENGTHS = {"inputs": 64, "targets": 32}


def _examples(task, split="train", lengths=None, n=1000):
    ds = task.get_dataset(lengths or LENGTHS, split=split, shuffle=False)
    return list(ds.take(n).as_numpy_iterator())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "qa.tsv").write_text(
        "question\tanswer\nwhat is one\tone\nbad line\nwhat is two\ttwo\n\n"
        "what is three\tthree\textra\nwhat is four\tfour\r\n")
    (d / "qa.jsonl").write_text(
        '{"q": "a?", "a": "b"}\n{"q": 3, "a": "c"}\nnot json\n\n{"q": "x"}\n'
        '{"q": ["l"], "a": "d"}\n')
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    (d / "corpus.txt").write_text("".join(
        " ".join(rng.choice(words, rng.integers(5, 80))) + "\n" for _ in range(400)))
    for name, n in (("small", 200), ("medium", 1_000), ("large", 4_000)):
        (d / f"{name}.tsv").write_text("".join(f"{name} {i}\t{i % 7}\n" for i in range(n)))
    return d


def test_tsv_malformed_lines_fail_with_count_and_location(data_dir):
    task = tasks.add_file_task("t_tsv_fail", str(data_dir / "qa.tsv"),
                               columns={"inputs": "question", "targets": "answer"})
    with pytest.raises(files_lib.DataFileError) as info:
        _examples(task)
    message = str(info.value)
    # The blank line 5 carries no example, as in text and JSONL files: it is not malformed.
    assert "2 malformed line(s)" in message and "t_tsv_fail" in message
    assert "qa.tsv:3: 1 tab-separated fields, expected 2" in message
    assert "qa.tsv:6: 3 tab-separated fields" in message and "on_malformed='skip'" in message
    # The same error reaches a run as one DataError line (a UserError), not a TF trace.
    with pytest.raises(files_lib.DataFileError):
        InputPipeline("t_tsv_fail", inputs_length=32, targets_length=8, batch_size=2)


def test_tsv_skip_keeps_the_good_lines(data_dir, capsys):
    task = tasks.add_file_task("t_tsv_skip", str(data_dir / "qa.tsv"),
                               columns={"inputs": "question", "targets": "answer"},
                               inputs_prefix="q: ", on_malformed="skip")
    got = [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
           for ex in _examples(task)]
    assert got == [("q: what is one", "one"), ("q: what is two", "two"),
                   ("q: what is four", "four")]
    assert "skipping 2 malformed line(s)" in capsys.readouterr().err
    assert task.num_input_examples("train") == 3


def test_run_default_on_malformed(data_dir):
    task = tasks.add_file_task("t_tsv_default", str(data_dir / "qa.tsv"),
                               columns={"inputs": "question", "targets": "answer"})
    files_lib.RUN_DEFAULTS["on_malformed"] = "skip"  # what data.on_malformed=skip sets
    try:
        assert len(_examples(task)) == 3
    finally:
        files_lib.RUN_DEFAULTS["on_malformed"] = "fail"


def test_jsonl_task_with_column_mapping(data_dir):
    task = tasks.add_file_task("t_jsonl", str(data_dir / "qa.jsonl"),
                               columns={"inputs": "q", "targets": "a"}, on_malformed="skip")
    got = [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
           for ex in _examples(task)]
    assert got == [("a?", "b"), ("3", "c")]
    scan = task.source.scan("train")
    assert scan.malformed == 3 and scan.examples == 2
    assert any("qa.jsonl:3: invalid JSON" in x for x in scan.locations)
    assert any("qa.jsonl:5: no key 'a'" in x for x in scan.locations)
    # Numbers and true/false reach the model as the file writes them (json.dumps of the
    # parsed value gave "100000.0" for 1e5 and "1.1" for 1.10).
    (data_dir / "numbers.jsonl").write_text(
        '{"q": 1e5, "a": 1.10}\n{"q": true, "a": -0}\n{"q": 12, "a": "x"}\n')
    task = tasks.add_file_task("t_numbers", str(data_dir / "numbers.jsonl"),
                               columns={"inputs": "q", "targets": "a"})
    assert [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
            for ex in _examples(task)] == [("1e5", "1.10"), ("true", "-0"), ("12", "x")]


def test_jsonl_pretraining_task_reads_the_text_key_by_default(data_dir):
    """A JSONL file with an objective and no columns reads each record's "text": the default
    was key 0, so every line of a well-formed file was 'malformed: no key 0'."""
    (data_dir / "docs.jsonl").write_text(
        '{"text": "alpha beta gamma delta epsilon"}\n{"text": "zeta eta theta"}\n')
    task = tasks.add_file_task("t_docs_sc", str(data_dir / "docs.jsonl"),
                               objective="span_corruption", vocabulary="byte")
    assert task.source.check("train").examples == 2
    assert len(_examples(task)) >= 1


def test_jsonl_lone_surrogate_escape_is_a_malformed_line(data_dir):
    """JSON accepts a lone surrogate escape (half an emoji cut off, "\\ud83d"), which no
    UTF-8 text can hold: it is a malformed line, located (it failed the run with 'Error
    converting unicode string while converting Python sequence to Tensor', no file named)."""
    (data_dir / "surrogate.jsonl").write_text(
        '{"inputs": "cut \\ud83d", "targets": "x"}\n{"inputs": "ok \\ud83d\\ude00", '
        '"targets": "y"}\n')
    task = tasks.add_file_task("t_surrogate", str(data_dir / "surrogate.jsonl"))
    with pytest.raises(files_lib.DataFileError, match="surrogate.jsonl:1: key 'inputs'"):
        _examples(task)
    task = tasks.add_file_task("t_surrogate", str(data_dir / "surrogate.jsonl"),
                               on_malformed="skip")
    shuffled = task.source.get_dataset("train", shuffle=True, seed=1)
    assert [ex["inputs"].decode() for ex in shuffled.as_numpy_iterator()] == ["ok \U0001f600"]
    assert [ex["targets_pretokenized"] for ex in _examples(task)] == [b"y"]


def test_header_is_refused_for_files_other_than_tsv(data_dir):
    """header=True applies to TSV files: a text file's reader skipped its first line while the
    count (mixing rates, an empty split) still held it, and JSONL ignored it without a word."""
    (data_dir / "titled.txt").write_text("A TITLE\nline one\n")
    for path in ("titled.txt", "qa.jsonl"):
        with pytest.raises(files_lib.DataFileError, match="header=True.*TSV"):
            tasks.add_file_task("t_header", str(data_dir / path), objective="prefix_lm",
                                columns={"text": "q"} if path.endswith("jsonl") else None,
                                header=True)


def test_a_json_document_given_as_jsonl_is_named_as_such(data_dir):
    """A .json file holding one list (or one pretty-printed object) has no line that is a
    record: the error says JSONL is one object per line, not only 'Fix them, or skip them'
    (skipping them left an empty split)."""
    (data_dir / "records.json").write_text(json.dumps(
        [{"inputs": "a", "targets": "b"}, {"inputs": "c", "targets": "d"}], indent=2))
    for on_malformed in ("fail", "skip"):
        tasks.add_file_task("t_json_doc", str(data_dir / "records.json"),
                            on_malformed=on_malformed)
        with pytest.raises(files_lib.DataFileError, match="one JSON object per line"):
            InputPipeline("t_json_doc", inputs_length=8, targets_length=8, batch_size=2)


def test_file_task_definition_errors(data_dir):
    with pytest.raises(tasks.TaskDefinitionError, match="needs both 'inputs' and 'targets'"):
        tasks.add_file_task("t_bad", str(data_dir / "qa.jsonl"), columns={"inputs": "q"})
    with pytest.raises(files_lib.DataFileError, match="cannot tell the format"):
        tasks.add_file_task("t_bad", str(data_dir / "qa.csv"))
    tasks.add_file_task("t_missing", str(data_dir / "nothing*.tsv"))
    with pytest.raises(UserError, match="no file matches"):
        InputPipeline("t_missing", inputs_length=32, targets_length=8, batch_size=2)
    # A plain (not wildcard) relative path that is not there, as when `mtjax eval` runs in
    # another directory: named, with the directory it was looked for in.
    tasks.add_file_task("t_missing_plain", "no_such_dir/capitals.tsv")
    with pytest.raises(UserError, match=r"no file matches 'no_such_dir/capitals.tsv' "
                                        r"\(relative paths are read from the current directory"):
        InputPipeline("t_missing_plain", inputs_length=32, targets_length=8, batch_size=2)
    (data_dir / "empty.tsv").write_text("")
    tasks.add_file_task("t_empty", str(data_dir / "empty.tsv"))
    with pytest.raises(UserError, match="is empty"):
        InputPipeline("t_empty", inputs_length=32, targets_length=8, batch_size=2)
    # Every line malformed: the pipeline says which and why, not just "empty".
    (data_dir / "latin1.tsv").write_bytes("caf\xe9\tcoffee\n".encode("latin-1"))
    tasks.add_file_task("t_latin1", str(data_dir / "latin1.tsv"))
    with pytest.raises(UserError, match=r"1 malformed line\(s\): .*latin1.tsv:1: not UTF-8"):
        InputPipeline("t_latin1", inputs_length=32, targets_length=8, batch_size=2)
    # The task is registered here, so the test holds when run alone (`-k`).
    tasks.add_file_task("t_train_only", str(data_dir / "small.tsv"))
    with pytest.raises(DataError, match="no split 'validation'"):
        InputPipeline("t_train_only", inputs_length=32, targets_length=8, batch_size=2,
                      split="validation")


def test_the_count_of_a_file_task_is_what_its_reader_yields(data_dir):
    """Lines of Unicode whitespace (U+3000, NBSP, \\x1f) are text to the reader, which strips
    ASCII whitespace only; the count (mixing rates, `tasks show`) said 2 examples of 4."""
    (data_dir / "spaces.tsv").write_text("a\tb\n\u3000\t\u3000\nc\td\n\x1f\t\xa0\n \t \n\n")
    task = tasks.add_file_task("t_spaces", str(data_dir / "spaces.tsv"))
    got = [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
           for ex in _examples(task)]
    assert got == [("a", "b"), ("\u3000", "\u3000"), ("c", "d"), ("\x1f", "\xa0")]
    assert task.source.num_input_examples("train") == len(got)


@pytest.fixture(scope="module")
def sorted_tasks(data_dir):
    """The same 2,000 examples as TSV and JSONL, sorted by their answer: yes, then no."""
    (data_dir / "sorted.tsv").write_text("".join(
        f"question {i}\t{'yes' if i < 1000 else 'no'}\n" for i in range(2000)))
    (data_dir / "sorted.jsonl").write_text("".join(json.dumps(
        {"inputs": f"question {i}", "targets": "yes" if i < 1000 else "no"}) + "\n"
        for i in range(2000)))
    return {fmt: tasks.add_file_task(f"t_sorted_{fmt}", str(data_dir / f"sorted.{fmt}"),
                                     vocabulary="byte") for fmt in ("tsv", "jsonl")}


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_a_sorted_file_is_shuffled_whole_at_every_epoch(sorted_tasks, fmt):
    """seqio repeats a source, then shuffles within a buffer of 1,000 examples: a file sorted
    by its answer trained on 'yes' alone for its first half (the first 500 examples were 100%
    'yes')."""
    task = sorted_tasks[fmt]
    two_epochs = [ex["inputs"].decode() for ex in task.source.get_dataset(
        "train", shuffle=True, seed=3).repeat(2).as_numpy_iterator()]
    first, second = two_epochs[:2000], two_epochs[2000:]
    everything = [f"question {i}" for i in range(2000)]
    assert sorted(first) == sorted(second) == sorted(everything)  # each epoch: each once
    assert first != second and first != everything
    ds = task.get_dataset(LENGTHS, split="train", shuffle=True, seed=3, num_epochs=None,
                          try_in_mem_cache=False)
    answers = [ex["targets_pretokenized"] for ex in ds.take(500).as_numpy_iterator()]
    assert 0.4 < answers.count(b"yes") / len(answers) < 0.6
    # The same seed, the same order (exact resume rebuilds it).
    again = [ex["inputs"].decode() for ex in task.source.get_dataset(
        "train", shuffle=True, seed=3).as_numpy_iterator()]
    assert again == first


@pytest.mark.parametrize("position", [1990, 3000])
def test_a_shuffled_file_task_resumes_exactly_across_an_epoch(sorted_tasks, tmp_path, position):
    """Saved 10 examples before the second epoch (seqio's buffer of 1,000 already draws from
    it), or in the middle of it: the restored stream goes on alike, into the next epoch's
    order too."""
    ds = sorted_tasks["tsv"].get_dataset(LENGTHS, split="train", shuffle=True, seed=5,
                                         num_epochs=None, try_in_mem_cache=False)
    iterator = iter(ds)
    for _ in range(position):
        next(iterator)
    saved = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "position"))
    expected = [next(iterator)["inputs_pretokenized"].numpy() for _ in range(1100)]
    restored = iter(sorted_tasks["tsv"].get_dataset(LENGTHS, split="train", shuffle=True,
                                                    seed=5, num_epochs=None,
                                                    try_in_mem_cache=False))
    tf.train.Checkpoint(iterator=restored).read(saved).assert_consumed()
    assert [next(restored)["inputs_pretokenized"].numpy() for _ in range(1100)] == expected


def test_hosts_read_disjoint_halves_of_a_shuffled_file_new_at_every_epoch(sorted_tasks):
    """One file, two hosts: seqio shards the examples after the source, and every host's source
    shuffles alike (one seed), so the hosts' shares of an epoch are disjoint and whole."""
    def host(index, epochs):
        ds = sorted_tasks["jsonl"].get_dataset(
            LENGTHS, split="train", shuffle=True, seed=3, num_epochs=epochs,
            shard_info=seqio.ShardInfo(index=index, num_shards=2),
            try_in_mem_cache=False)  # as the input pipeline asks: a cache replays epoch 1
        return [ex["inputs_pretokenized"] for ex in ds.as_numpy_iterator()]

    first, second = host(0, 1), host(1, 1)
    assert len(first) == len(second) == 1000 and not set(first) & set(second)
    assert len(set(first) | set(second)) == 2000
    assert len(set(host(0, 2))) > 1000  # its second epoch's half is another one


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_share_a_split_of_uneven_files_evenly(data_dir, fmt, hosts):
    """Files of 200, 1,000 and 4,000 examples: seqio divided 3 files among 2 hosts by file,
    4,200 examples to host 0 and 1,000 to host 1, whose examples then came 4.2 times as often
    (and with 4 hosts, by example). Held in memory, the split is divided by example whatever
    the files: shares differ by one example at most, disjoint, whole, new at each epoch."""
    names = ("small", "medium", "large")
    if fmt == "jsonl":
        for name in names:
            lines = (data_dir / f"{name}.tsv").read_text().splitlines()
            (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(dict(zip(
                ("inputs", "targets"), line.split("\t"), strict=True))) + "\n" for line in lines))
    task = tasks.add_file_task(f"t_uneven_{fmt}", [str(data_dir / f"{n}.{fmt}") for n in names],
                               vocabulary="byte")

    def share(index):
        ds = task.get_dataset(LENGTHS, split="train", shuffle=True, seed=3, num_epochs=1,
                              shard_info=seqio.ShardInfo(index=index, num_shards=hosts),
                              try_in_mem_cache=False)
        return [ex["inputs_pretokenized"] for ex in ds.as_numpy_iterator()]

    shares = [share(i) for i in range(hosts)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, list(map(len, shares))
    assert sum(map(len, shares)) == len(set().union(*shares)) == 5200
    # The source's own two passes (seqio's buffer would blur them): another share each epoch.
    two = [ex["inputs"] for ex in task.source.get_dataset(
        "train", shuffle=True, seed=3, shard_info=seqio.ShardInfo(index=1, num_shards=hosts)
    ).repeat(2).as_numpy_iterator()]
    first, second = two[:len(shares[1])], two[len(shares[1]):]
    assert set(first) == set(shares[1]) and len(second) == len(first)
    assert set(second) != set(first)


def test_hosts_passes_are_equal_when_the_split_does_not_divide():
    """7 examples, 2 hosts: host 0 took 4 a pass and host 1 took 3, so host 1's epochs ran
    ahead and its examples came more often. Now each pass leaves out one example (another at
    each pass) and both hosts take 3, disjoint."""
    from mtjax.data import memory

    columns = {"targets": [f"example {i}" for i in range(7)]}

    def passes(index, count):
        ds = memory.examples_dataset(columns, True, 11, seqio.ShardInfo(index, 2))
        seen = [ex["targets"].decode() for ex in ds.repeat(count).as_numpy_iterator()]
        assert len(seen) == 3 * count
        return [seen[i:i + 3] for i in range(0, len(seen), 3)]

    host0, host1 = passes(0, 20), passes(1, 20)
    assert all(len(p) == 3 for p in host0 + host1)
    for a, b in zip(host0, host1, strict=True):
        assert not set(a) & set(b)
    left_out = {next(iter(set(columns["targets"]) - set(a) - set(b)))
                for a, b in zip(host0, host1, strict=True)}
    assert len(left_out) > 1  # not always the same example
    # Fewer examples than hosts: every host takes one a pass. Host 1 of 2 with 1 example, and
    # host 3 of 4 with 3, had an empty share: its stream ended at once (StopIteration in the
    # trainer, the other hosts waiting in the step's collectives).
    for size, hosts in ((1, 2), (3, 4)):
        few = {"targets": [f"example {i}" for i in range(size)]}
        shares = [[ex["targets"].decode() for ex in memory.examples_dataset(
            few, True, 11, seqio.ShardInfo(h, hosts)).repeat(5).as_numpy_iterator()]
            for h in range(hosts)]
        assert [len(share) for share in shares] == [5] * hosts
        assert set().union(*shares) == set(few["targets"])


def test_files_past_the_memory_limit_stream_and_say_so(sorted_tasks, monkeypatch, capsys):
    monkeypatch.setattr(files_lib, "SHUFFLE_IN_MEMORY_BYTES", 1000)
    ds = sorted_tasks["tsv"].source.get_dataset("train", shuffle=True, seed=3)
    assert sorted(ex["inputs"].decode() for ex in ds.as_numpy_iterator()) == sorted(
        f"question {i}" for i in range(2000))
    err = capsys.readouterr().err
    assert ("'t_sorted_tsv', split 'train': 1 MiB of files, more than the 0 MiB held in "
            "memory") in err, err
    assert "split a sorted file into many shuffled files" in err


def test_hosts_divide_files_past_the_memory_limit_by_bytes(data_dir, monkeypatch, capsys):
    """Streamed (too large to hold), a split is divided among hosts by file: seqio dealt files
    in turn (small+large to host 0: 4,200 examples; medium to host 1: 1,000). By bytes, the
    large file is one host's share and the other two the other's; what stays uneven is said."""
    assert files_lib.host_files(["a", "b", "c", "d"], [5, 0, 0, 5], 2) == [["a", "b"],
                                                                          ["c", "d"]]
    assert files_lib.host_files(["a", "b", "c"], [1, 9, 4], 2) == [["b"], ["a", "c"]]
    monkeypatch.setattr(files_lib, "SHUFFLE_IN_MEMORY_BYTES", 1000)
    names = ("small", "medium", "large")
    task = tasks.add_file_task("t_uneven_streamed", [str(data_dir / f"{n}.tsv") for n in names],
                               vocabulary="byte")

    def share(index, hosts):
        ds = task.source.get_dataset("train", shuffle=True, seed=3,
                                     shard_info=seqio.ShardInfo(index=index, num_shards=hosts))
        return {ex["inputs"].decode().split()[0] for ex in ds.as_numpy_iterator()}, len(list(
            ds.as_numpy_iterator()))

    assert [share(i, 2) for i in range(2)] == [({"large"}, 4000), ({"small", "medium"}, 1200)]
    err = capsys.readouterr().err
    assert ("3 files divided among 2 hosts make shares of 0 to 0 MiB, and every host reads its "
            "share at the same rate: the smaller shares' examples come up to 3.4x as often"
            ) in err, err
    # A file without examples is no host's share: with 4 files for 4 hosts, host 3 got the
    # 0-byte one (or one of blank lines) alone and read nothing (its stream ended at once); 3
    # files with examples for 4 hosts divide by example.
    (data_dir / "empty.tsv").write_text("")
    (data_dir / "blank.tsv").write_text("\n \n\n")
    for none in ("empty", "blank"):
        with_none = tasks.add_file_task(
            f"t_uneven_streamed_{none}", [str(data_dir / f"{n}.tsv") for n in (*names, none)],
            vocabulary="byte")
        counts = [len(list(with_none.source.get_dataset(
            "train", shuffle=True, seed=3, shard_info=seqio.ShardInfo(index=i, num_shards=4)
        ).as_numpy_iterator())) for i in range(4)]
        assert counts == [1300] * 4, (none, counts)


def test_a_host_without_examples_is_a_clear_error(data_dir, monkeypatch):
    """3 examples streamed to 4 hosts (divided after reading): host 3 got none, and its
    pipeline raised a bare StopIteration that stopped the trainer with a traceback."""
    monkeypatch.setattr(files_lib, "SHUFFLE_IN_MEMORY_BYTES", 10)
    (data_dir / "three.tsv").write_text("a\tb\nc\td\ne\tf\n")
    tasks.add_file_task("t_three", str(data_dir / "three.tsv"), vocabulary="byte")
    host = InputPipeline("t_three", inputs_length=8, targets_length=8, batch_size=1,
                         shard_index=3, num_shards=4)
    with pytest.raises(DataError, match=r"mixture 't_three', split 'train': host 3 of 4 gets "
                                        r"no example from any task"):
        next(host)
    first = InputPipeline("t_three", inputs_length=8, targets_length=8, batch_size=1,
                          shard_index=0, num_shards=4)
    # Host 0's one example a pass repeats without end: 5 batches of it.
    assert {next(first)["encoder_input_tokens"].shape for _ in range(5)} == {(1, 8)}


def test_file_tasks_read_what_editors_write_and_refuse_what_they_cannot(data_dir):
    """A byte-order mark and a trailing blank line are read as the editor meant; a null JSON
    value, a compressed file and a missing file of a list are named, not turned into text or
    dropped."""
    (data_dir / "bom.tsv").write_bytes("\ufeffq\ta\nhello\tworld\nfoo\tbar\n\n".encode())
    task = tasks.add_file_task("t_bom", str(data_dir / "bom.tsv"),
                               columns={"inputs": "q", "targets": "a"})
    got = [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode())
           for ex in _examples(task)]
    assert got == [("hello", "world"), ("foo", "bar")]
    (data_dir / "bom.jsonl").write_bytes('\ufeff{"inputs": "x", "targets": "y"}\n'.encode())
    assert [ex["inputs_pretokenized"] for ex in _examples(
        tasks.add_file_task("t_bom_jsonl", str(data_dir / "bom.jsonl")))] == [b"x"]

    (data_dir / "nulls.jsonl").write_text('{"inputs": "a", "targets": null}\n')
    task = tasks.add_file_task("t_nulls", str(data_dir / "nulls.jsonl"))
    with pytest.raises(files_lib.DataFileError, match="nulls.jsonl:1: key 'targets' is null"):
        _examples(task)

    with pytest.raises(files_lib.DataFileError, match="is compressed.*decompress it"):
        tasks.add_file_task("t_gz", str(data_dir / "qa.tsv.gz"))

    task = tasks.add_file_task("t_list", [str(data_dir / "small.tsv"),
                                          str(data_dir / "smal_typo.tsv")])
    with pytest.raises(UserError, match=r"t_list.*no file matches '.*smal_typo.tsv'"):
        task.num_input_examples("train")
    task = tasks.add_file_task("t_glob_list", [str(data_dir / "small.tsv"),
                                               str(data_dir / "nomatch*/x.tsv")])
    with pytest.raises(UserError, match=r"no file matches '.*nomatch\*/x.tsv'"):
        task.num_input_examples("train")


def test_task_without_targets_is_a_clear_error():
    name = "t_inputs_only"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None, ["train"]),
        output_features={"inputs": seqio.Feature(vocab_lib.get_vocabulary("byte"))})
    with pytest.raises(DataError, match="no 'targets'"):
        InputPipeline(name, inputs_length=32, targets_length=8, batch_size=2)


def test_random_spans_helper_matches_t5():
    assert objectives.random_spans_helper(512) == (568, 114)


@pytest.mark.parametrize("density,mean_span", [(0.5, 1.0), (0.75, 2.0)])
def test_dense_short_span_noise_masks_have_as_many_spans_as_fit(density, mean_span):
    """Noise spans alternate with kept spans, so there are at most as many as kept tokens:
    density 0.5 with spans of 1 asked for 4 spans among 3 kept tokens of a 7-token chunk, and
    the stream failed mid-training ('Shapes of all inputs must match')."""
    for length in range(2, 40):
        mask = objectives.random_spans_noise_mask(tf.constant(length), tf.constant([length, 1]),
                                                  density, mean_span).numpy()
        noise = int(round(length * density))
        assert mask.sum() == min(max(noise, 1), length - 1), (length, mask)
        assert not mask[0]  # a kept span first, as in T5


def test_span_corruption_worked_example():
    """objectives' docstring example: one sentinel per span on each side, counted down from
    the top id; the targets end with the sentinel of the last kept span, as in T5 (the
    docstring left it out)."""
    tokens = tf.range(10, 20)
    mask = tf.constant([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]) > 0
    assert objectives.noise_span_to_unique_sentinel(tokens, mask, 259).numpy().tolist() == [
        10, 11, 258, 14, 15, 16, 257, 18, 19]
    assert objectives.noise_span_to_unique_sentinel(
        tokens, tf.logical_not(mask), 259).numpy().tolist() == [258, 12, 13, 257, 17, 256]
    assert "[258 t2 t3 257 t7 256]" in objectives.__doc__


def _uncorrupt(inputs, targets, vocab_size):
    """Puts the spans back; returns (tokens, noise count, spans)."""
    spans, current = {}, None
    for t in targets:
        if t >= vocab_size - 40:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t >= vocab_size - 40 else [t])
    return out, sum(map(len, spans.values())), len(spans)


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 8.0)])
def test_span_corruption_matches_its_parameters(data_dir, density, mean_span):
    task = tasks.add_file_task(f"t_sc_{density}", str(data_dir / "corpus.txt"),
                               objective="span_corruption", noise_density=density,
                               mean_noise_span_length=mean_span)
    vocab = task.output_features["targets"].vocabulary
    lengths = {"inputs": 256, "targets": 128}
    examples = _examples(task, lengths=lengths, n=200)
    chunk, targets_length = objectives.random_spans_helper(256, density, mean_span)
    noise = total = spans = 0
    for ex in examples:
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS on both
        tokens, n_noise, n_spans = _uncorrupt(ex["inputs"][:-1], ex["targets"][:-1],
                                              vocab.vocab_size)
        assert len(tokens) <= chunk and ex["targets"][0] == vocab.vocab_size - 1
        assert set(vocab.decode(tokens)) <= set("abcdeghilmnopstz ")  # the corpus, restored
        noise, total, spans = noise + n_noise, total + len(tokens), spans + n_spans
        if len(tokens) == chunk:  # a full chunk fills the inputs exactly, as T5 sizes them
            assert len(ex["inputs"]) == 256 and len(ex["targets"]) == targets_length
    assert len(examples) > 50
    assert abs(noise / total - density) < 0.01, noise / total
    assert abs(noise / spans - mean_span) < 0.1 * mean_span, noise / spans


def test_prefix_lm_splits_at_a_uniform_point_as_t5():
    """T5's prefix LM (noise_density 0.5) splits a chunk at a point uniform over it, so half
    of its tokens are targets on average; the split was drawn from the second half only (a
    quarter of the tokens were targets, never more than half)."""
    fractions = [objectives.random_prefix_noise_mask(tf.constant(101), tf.constant([i, 7]),
                                                     0.5).numpy().mean() for i in range(300)]
    assert 0.45 < np.mean(fractions) < 0.55, np.mean(fractions)
    assert max(fractions) > 0.9 and min(fractions) < 0.1
    # 0.25: the prefix keeps at least half of the chunk, the targets a quarter on average.
    fractions = [objectives.random_prefix_noise_mask(tf.constant(101), tf.constant([i, 7]),
                                                     0.25).numpy().mean() for i in range(300)]
    assert 0.2 < np.mean(fractions) < 0.3 and max(fractions) < 0.51
    with pytest.raises(ValueError, match="noise_density"):
        objectives.prefix_lm(0.6)


def test_prefix_lm_splits_a_chunk_without_truncation(data_dir):
    base = tasks.add_file_task("t_text", str(data_dir / "corpus.txt"), objective="prefix_lm")
    lengths = {"inputs": 64, "targets": 32}
    stats = preview.length_stats(preview.untrimmed_examples(base, "train", lengths, 200), lengths)
    assert stats["truncated"] == 0.0
    assert stats["targets"]["max"] <= 32 and stats["inputs"]["max"] <= 64


def test_span_corruption_over_another_task():
    task = tasks.add_span_corruption_task("t_kb_qa_sc", "mtjax_kb_qa",
                                          text_key=("inputs", "targets"))
    (ex, *_) = _examples(task, n=3)
    vocab = task.output_features["targets"].vocabulary
    assert 258 in ex["inputs"] and ex["targets"][0] == 258
    text = preview.decode(vocab, ex["inputs"], 64)[0]
    assert "question:" in text or "<extra_id_0>" in text
    with pytest.raises(tasks.TaskDefinitionError, match="text_key"):
        _examples(tasks.add_prefix_lm_task("t_bad_key", "mtjax_kb_qa", text_key="body"))


def test_tfds_task_with_mock_data():
    task = tasks.add_tfds_task("t_cola", "glue/cola:2.0.0",
                               columns={"inputs": "sentence", "targets": "label"},
                               splits=["train", "validation"], inputs_prefix="cola: ")
    with tfds.testing.mock_data(num_examples=8):
        examples = _examples(task)
        assert len(examples) == 8
        for ex in examples:
            assert ex["inputs_pretokenized"].startswith(b"cola: ")
            assert ex["targets_pretokenized"] in (b"acceptable", b"unacceptable")
        batch = next(InputPipeline("t_cola", inputs_length=64, targets_length=8, batch_size=2))
        assert batch["decoder_task_ids"].max() == 1


@pytest.mark.parametrize("splits", [None, ["train", "validation"]])
def test_a_tfds_dataset_not_prepared_is_one_line_and_never_downloaded(tmp_path, splits):
    """seqio's TFDS source called tfds.load(download=True): with the splits given, a dataset
    not prepared locally started "Downloading and preparing" (and failed deep in TFDS);
    without them it was "Task ... has no splits"."""
    tasks.add_tfds_task("t_unprepared", "glue/cola:2.0.0", data_dir=str(tmp_path),
                        columns={"inputs": "sentence", "targets": "label"}, splits=splits)
    with pytest.raises(tasks.TfdsNotPreparedError,
                       match=r"TFDS dataset 'glue/cola:2.0.0' is not prepared in .*tfds build"):
        InputPipeline("t_unprepared", inputs_length=32, targets_length=8, batch_size=2)
    assert not list(tmp_path.iterdir())  # nothing downloaded or generated there


class MtjaxTinyQa(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset built here, offline: real split metadata, unlike mock_data."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"question": f"question {i}", "answer": f"answer {i}"}


def test_a_tfds_split_the_dataset_lacks_is_one_line_naming_both(tmp_path):
    """splits={"validation": "valid"} on a dataset without 'valid' was TFDS's ValueError
    traceback at the start of training and `null` for its size in `tasks show`."""
    MtjaxTinyQa(data_dir=str(tmp_path)).download_and_prepare()
    task = tasks.add_tfds_task("t_tiny_qa", "mtjax_tiny_qa:1.0.0", data_dir=str(tmp_path),
                               columns={"inputs": "question", "targets": "answer"},
                               splits={"train": "train", "validation": "valid"})
    assert mixing.num_examples(task, "train") == 5
    assert sorted(ex["targets_pretokenized"] for ex in _examples(task)) == [
        f"answer {i}".encode() for i in range(5)]
    wrong = (r"task split 'validation' of TFDS dataset 'mtjax_tiny_qa:1.0.0': Unknown split "
             r"'valid'. Should be one of \['train', 'validation'\]. \(fix splits= in add_tfds")
    with pytest.raises(tasks.TfdsSplitError, match=wrong):
        mixing.num_examples(task, "validation")
    with pytest.raises(tasks.TfdsSplitError, match=wrong):
        _examples(task, split="validation")
    with pytest.raises(tasks.TfdsSplitError, match=wrong):
        preview.describe("t_tiny_qa")


def test_tfds_numbers_become_their_shortest_decimal_text():
    """A float feature became six fixed decimals: 3.8 -> 3.800000, 1e-7 -> 0.000000."""
    values = tf.constant([3.8, 1e-7, 12345678.0, 100.0, 0.1, -2.5, 1e16], tf.float32)
    assert [t.decode() for t in tasks._number_text(values).numpy()] == [
        "3.8", "1e-07", "12345678", "100", "0.1", "-2.5", "1e+16"]
    assert tasks._number_text(tf.constant([0.30000000000000004], tf.float64)).numpy()[0] == (
        b"0.30000000000000004")
    assert tasks._number_text(tf.constant([70000, -3], tf.int64)).numpy().tolist() == [
        b"70000", b"-3"]
    assert tasks._number_text(tf.constant([True, False])).numpy().tolist() == [b"true", b"false"]
    # Through a task: STS-B's float label reads back as the same float32.
    task = tasks.add_tfds_task("t_stsb", "glue/stsb:2.0.0",
                               columns={"inputs": "sentence1", "targets": "label"},
                               splits=["train"])
    with tfds.testing.mock_data(num_examples=8):
        labels = sorted(float(ex["label"]) for ex in
                        tfds.load("glue/stsb:2.0.0", split="train").as_numpy_iterator())
        texts = [ex["targets_pretokenized"].decode() for ex in _examples(task)]
    assert sorted(float(np.float32(t)) for t in texts) == labels
    assert not [t for t in texts if len(t) > len(f"{np.float32(float(t))!r}")], texts


@pytest.fixture(scope="module")
def spm_model(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    corpus = out / "bios.txt"
    corpus.write_text("\n".join(knowledge.biographies("validation")) + "\n")
    return vocab_lib.train_sentencepiece([str(corpus)], 200, str(out))


def test_vocab_train_round_trip(spm_model):
    assert spm_model["vocab_size"] == 200 + 100 and spm_model["model_vocab_size"] == 384
    vocab = vocab_lib.get_vocabulary(spm_model["model"])
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    text = knowledge.biographies("train")[0]
    assert vocab.decode(vocab.encode(text)) == text
    with pytest.raises(vocab_lib.VocabularyError, match="Vocabulary size too high"):
        vocab_lib.train_sentencepiece([spm_model["inputs"][0]], 5000, spm_model["model"] + "d")


def test_vocab_train_keeps_an_existing_model(spm_model):
    model = pathlib.Path(spm_model["model"])
    saved = model.read_bytes()
    corpus = spm_model["inputs"]
    with pytest.raises(vocab_lib.VocabularyError, match="exists.*--force"):
        vocab_lib.train_sentencepiece(corpus, 150, str(model.parent))
    # --force that fails (too many pieces) leaves the old model whole, and no scratch behind.
    with pytest.raises(vocab_lib.VocabularyError, match="Vocabulary size too high"):
        vocab_lib.train_sentencepiece(corpus, 5000, str(model.parent), force=True)
    assert model.read_bytes() == saved
    assert not list(model.parent.glob(".spm-training-*"))
    with pytest.raises(vocab_lib.VocabularyError, match="is a file; give a directory"):
        vocab_lib.train_sentencepiece(corpus, 150, str(model))


def test_run_vocabulary_and_conflicts(data_dir, spm_model):
    vocab_lib.set_run_vocabulary(spm_model["model"])  # what data.vocabulary=... sets
    try:
        task = tasks.add_file_task("t_spm_sc", str(data_dir / "corpus.txt"),
                                   objective="span_corruption")
    finally:
        vocab_lib.set_run_vocabulary(None)
    vocab = task.output_features["targets"].vocabulary
    assert vocab.vocab_size == 300
    ex = _examples(task, n=1)[0]
    assert ex["targets"][0] == 299  # <extra_id_0>
    assert preview.decode(vocab, ex["targets"], 32)[0].startswith("<extra_id_0>")
    pipeline = InputPipeline("t_spm_sc", inputs_length=64, targets_length=32, batch_size=2,
                             vocabulary=spm_model["model"])
    assert pipeline.vocabulary_id.startswith("spm:") and pipeline.vocab_size == 300
    with pytest.raises(VocabularyMismatchError, match="data.vocabulary"):
        InputPipeline("mtjax_kb_qa", inputs_length=64, targets_length=32, batch_size=2,
                      vocabulary=spm_model["model"])
    tasks.add_mixture("t_two_vocabs", ["t_spm_sc", "mtjax_kb_qa"])
    with pytest.raises(VocabularyMismatchError, match="disagree"):
        InputPipeline("t_two_vocabs", inputs_length=64, targets_length=32, batch_size=2)


def test_span_corruption_needs_no_more_spans_than_sentinels(data_dir, spm_model):
    """At data.inputs_length=2048 a chunk has 114 noise spans, and a SentencePiece vocabulary
    100 sentinels: the last 14 spans were marked with ordinary pieces, silently."""
    task = tasks.add_file_task("t_spm_long_sc", str(data_dir / "corpus.txt"),
                               objective="span_corruption", vocabulary=spm_model["model"])
    with pytest.raises(ValueError, match="114 noise spans.*100 sentinel"):
        _examples(task, lengths={"inputs": 2048, "targets": 512}, n=1)
    assert _examples(task, lengths={"inputs": 1024, "targets": 256}, n=1)  # 57 spans


def _chi2(observed, expected_rates) -> float:
    expected = np.sum(observed) * np.asarray(expected_rates)
    return float(np.sum((np.asarray(observed) - expected) ** 2 / expected))


CHI2_P001_DOF2 = 13.8  # chi-square critical value, 2 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def three_tasks(data_dir):
    """Tasks of 200, 1,000 and 4,000 examples in a mixture with explicit weights 1:3:6."""
    for name in ("small", "medium", "large"):
        tasks.add_file_task(f"t_{name}", str(data_dir / f"{name}.tsv"))
    tasks.add_mixture("t_three", [("t_small", 1), ("t_medium", 3), ("t_large", 6)],
                      mixing="explicit")
    return ["t_small", "t_medium", "t_large"]


@pytest.mark.parametrize("strategy,kwargs,expected", [
    ("examples_proportional", {"cap": 2_000}, [200, 1_000, 2_000]),
    ("temperature", {"temperature": 2.0}, np.sqrt([200, 1_000, 4_000])),
    ("equal", {}, [1, 1, 1]),
    ("mixture", {}, [1, 3, 6]),  # the registered mixture's explicit weights
])
def test_sampling_rates_match_the_formula(three_tasks, strategy, kwargs, expected):
    from mtjax.data.pipeline import mix

    expected = np.asarray(expected, float) / np.sum(expected)
    rates = mixing.resolve_rates("t_three", strategy, **kwargs)
    assert [rates[n] for n in three_tasks] == pytest.approx(expected)
    # 10,000 draws of the pipeline's sampler over streams that yield their task's index.
    streams = [tf.data.Dataset.from_tensors(i).repeat() for i in range(3)]
    draws = next(iter(mix(streams, [rates[n] for n in three_tasks], 0).batch(10_000))).numpy()
    assert _chi2(np.bincount(draws, minlength=3), expected) < CHI2_P001_DOF2


def test_pipeline_samples_at_the_configured_rates(three_tasks):
    pipeline = InputPipeline("t_three", inputs_length=16, targets_length=8, batch_size=1_000,
                             pack=False, seed=1, mixing="temperature", mixing_temperature=2.0)
    counts = np.zeros(4, int)
    for _ in range(10):  # 10,000 examples, one per unpacked row
        counts += np.bincount(next(pipeline)["decoder_task_ids"][:, 0], minlength=4)
    expected = np.sqrt([200, 1_000, 4_000]) / np.sqrt([200, 1_000, 4_000]).sum()
    order = [pipeline.task_names.index(n) + 1 for n in three_tasks]
    assert counts[0] == 0 and _chi2(counts[order], expected) < CHI2_P001_DOF2


def test_mixture_of_mixtures_with_strategies(three_tasks):
    tasks.add_mixture("t_inner", ["t_small", "t_medium"], mixing="examples_proportional")
    tasks.add_mixture("t_outer", ["t_inner", "t_large"], mixing="equal")
    rates = mixing.mixture_rates("t_outer")
    assert rates == pytest.approx({"t_small": 0.5 / 6, "t_medium": 0.5 * 5 / 6,
                                   "t_large": 0.5})
    tasks.add_mixture("t_outer_t", ["t_inner", "t_large"], mixing="temperature",
                      temperature=1.0)  # T = 1: proportional to 1,200 vs 4,000 examples
    assert mixing.mixture_rates("t_outer_t")["t_large"] == pytest.approx(4_000 / 5_200)
    table = InputPipeline("t_outer", inputs_length=16, targets_length=8, batch_size=2).describe()
    assert "t_large" in table and "50.0%" in table and "4,000" in table


def test_equal_mixing_needs_no_sizes_and_members_must_be_registered(three_tasks):
    """A task whose source cannot tell its size (a generator: the plain seqio pattern) mixes
    equally; the strategies that need sizes say which task lacks one and what to do."""
    name = "t_sizeless"
    seqio.TaskRegistry.remove(name)

    def generate(split, shuffle_files):
        return tf.data.Dataset.from_generator(
            lambda: iter([{"inputs": "a", "targets": "b"}] * 5),
            output_signature={k: tf.TensorSpec([], tf.string) for k in ("inputs", "targets")})

    byte = vocab_lib.get_vocabulary("byte")
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(generate, ["train"]),
                           preprocessors=[seqio.preprocessors.tokenize],
                           output_features={k: seqio.Feature(byte) for k in ("inputs", "targets")})
    assert mixing.num_examples(seqio.get_mixture_or_task(name)) is None
    tasks.add_mixture("t_sizeless_equal", [name, "t_small"], mixing="equal")
    assert mixing.mixture_rates("t_sizeless_equal") == {name: 0.5, "t_small": 0.5}
    assert mixing.resolve_rates("t_sizeless_equal", "equal") == {name: 0.5, "t_small": 0.5}
    with pytest.raises(mixing.MixingError, match="t_sizeless cannot tell its size.*"
                                                 "data.mixing=equal"):
        mixing.resolve_rates("t_sizeless_equal", "examples_proportional")
    tasks.add_mixture("t_sizeless_prop", [name, "t_small"], mixing="examples_proportional")
    with pytest.raises(mixing.MixingError, match="register 't_sizeless_prop' with "
                                                 "mixing='equal'"):
        mixing.mixture_rates("t_sizeless_prop")
    with pytest.raises(mixing.MixingError, match="mixture 't_typo': no task or mixture "
                                                 "'t_smal' is registered .did you mean t_small"):
        tasks.add_mixture("t_typo", ["t_smal", "t_large"])
    assert "t_typo" not in seqio.MixtureRegistry.names()


@pytest.mark.parametrize("strategy", ["examples_proportional", "temperature"])
def test_size_strategies_over_empty_tasks_only_say_which_task_is_empty(data_dir, strategy):
    """Rates of a mixture whose every task has 0 examples were 0 / 0: a bare ValueError
    ("Mixing weights must have a positive sum, got {'t_blank': 0}") with a traceback, from
    `mtjax train` and `mtjax tasks show` alike, before the empty split's own DataError."""
    (data_dir / "blank.tsv").write_text("\n\n")
    tasks.add_file_task("t_blank", str(data_dir / "blank.tsv"))
    tasks.add_mixture("t_blank_only", ["t_blank"], mixing="equal")
    for name in ("t_blank_only", "t_blank"):
        with pytest.raises(mixing.MixingError, match="t_blank has 0 examples"):
            mixing.resolve_rates(name, strategy)
        with pytest.raises(UserError, match="t_blank.*is empty"):
            InputPipeline(name, inputs_length=16, targets_length=8, batch_size=2,
                          mixing=strategy)
        # `tasks show` stops on the empty split as `train` does (it reported rate None).
        with pytest.raises(UserError, match="t_blank.*is empty"):
            preview.describe(name, mixture=name, mixing=strategy)


@pytest.mark.parametrize("name", ["mtjax_copy", "mtjax_span_corruption", "mtjax_kb_qa",
                                  "mtjax_kb_bio_prefix_lm"])
def test_built_in_tasks_train_on_each_epoch_in_a_new_order(name):
    """Their sources gave one order, and seqio's buffer of 1,000 examples only blurred it:
    every epoch came in nearly the same order."""
    builtin.register()
    knowledge.register()
    source = seqio.get_mixture_or_task(name).source
    first_key = next(iter(source.get_dataset("train", shuffle=False).element_spec))
    whole = [ex[first_key] for ex in source.get_dataset("train", shuffle=False)
             .as_numpy_iterator()]
    passes = [ex[first_key] for ex in source.get_dataset("train", shuffle=True, seed=1)
              .repeat(2).as_numpy_iterator()]
    first, second = passes[:len(whole)], passes[len(whole):]
    assert sorted(first) == sorted(second) == sorted(whole)
    assert first != whole and second != first
    unshuffled_again = [ex[first_key] for ex in source.get_dataset("train", shuffle=False)
                        .as_numpy_iterator()]
    assert unshuffled_again == whole  # evaluation and counts read it in its own order


def test_knowledge_suite_holds_out_qa_people():
    train = {q.split()[-1] for q in knowledge.questions("train")[0]}
    held_out = {p["name"] for p in knowledge.qa_people("validation")}
    bios = " ".join(knowledge.biographies("train"))
    assert held_out and all(f"{name} " in bios for name in held_out)  # facts only in the text
    assert not any(name + "?" in train for name in held_out)
    person = knowledge.qa_people("validation")[0]
    assert f"{person['name']} lives in {person['city']}." in bios or (
        f"{person['name']} has a home in {person['city']}." in bios)
    assert 0 < knowledge.majority_baseline() < 25
    assert json.dumps(knowledge.knowledge_base()[0])  # plain data


def test_truncation_warning_names_the_rate():
    stats, warnings = preview.mixture_length_report(
        "mtjax_kb_qa", {"inputs": 16, "targets": 8}, n=50)
    assert stats["mtjax_kb_qa"]["truncated"] == 1.0
    (warning,) = warnings
    assert "data.inputs_length=16 truncates 100%" in warning


def test_training_prints_the_truncation_warning_once_prefixed(capsys):
    from mtjax.train import trainer

    trainer._warn_truncation(config_lib.load(None, [
        "data.mixture=mtjax_kb_qa", "data.inputs_length=16", "data.targets_length=8"]))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mtjax: warning: data.inputs_length=16 truncates 100% of mtjax_kb_qa")


def test_first_fit_packing_worked_example_and_round_trip():
    from mtjax.data.packing import first_fit_pack

    def packed(examples, lengths, window):
        ds = tf.data.Dataset.from_tensor_slices(
            {k: tf.ragged.constant([e[k] for e in examples]) for k in lengths})
        ds = ds.map(lambda ex: {k: v for k, v in ex.items()})
        return list(first_fit_pack(ds, lengths, window).as_numpy_iterator())

    docstring = [{"inputs": [5, 6, 7, 1], "targets": [8, 1]},
                 {"inputs": [9, 9, 9, 9, 1], "targets": [3, 3, 1]},
                 {"inputs": [4, 1], "targets": [2, 1]}]
    row0, row1 = packed(docstring, {"inputs": 6, "targets": 4}, 3)
    assert row0["inputs"].tolist() == [5, 6, 7, 1, 4, 1]
    assert row0["inputs_segment_ids"].tolist() == [1, 1, 1, 1, 2, 2]
    assert row0["inputs_positions"].tolist() == [0, 1, 2, 3, 0, 1]
    assert row0["targets"].tolist() == [8, 1, 2, 1]
    assert row0["targets_segment_ids"].tolist() == [1, 1, 2, 2]
    assert row1["inputs"].tolist() == [9, 9, 9, 9, 1, 0]
    assert row1["targets_segment_ids"].tolist() == [1, 1, 1, 0]

    rng = np.random.default_rng(0)
    examples = [{k: rng.integers(2, 50, rng.integers(1, n)).tolist() + [1] for k, n in
                 (("inputs", 30), ("targets", 12))} for _ in range(300)]
    rows = packed(examples, {"inputs": 32, "targets": 16}, 300)
    restored = []
    for row in rows:
        for s in range(1, row["targets_segment_ids"].max() + 1):
            restored.append(tuple(tuple(row[k][row[f"{k}_segment_ids"] == s].tolist())
                                  for k in ("inputs", "targets")))
            for k in ("inputs", "targets"):
                positions = row[f"{k}_positions"][row[f"{k}_segment_ids"] == s]
                assert positions.tolist() == list(range(len(positions)))
    assert sorted(restored) == sorted((tuple(e["inputs"]), tuple(e["targets"]))
                                      for e in examples)
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.ragged.constant([e[k] for e in examples]) for k in ("inputs", "targets")})
    seqio_rows = len(list(seqio.utils.trim_and_pack_dataset(
        ds.map(lambda ex: dict(ex)), {"inputs": 32, "targets": 16})))
    assert len(rows) < 0.9 * seqio_rows, (len(rows), seqio_rows)  # fuller rows than seqio's


def test_tensorflow_startup_notices_are_dropped_and_the_rest_passed_on(capfd, monkeypatch):
    from mtjax.data import quiet

    notices = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1796523014.423752    7420 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.\n"
        "E0000 00:00:1796523015.944185    7420 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    other = "E0000 some_op.cc:1] a real problem\n"
    with quiet.startup_notices_dropped():
        os.write(2, (notices + other).encode())  # as C++ writes: past sys.stderr
    assert capfd.readouterr().err == other
    with pytest.raises(ImportError), quiet.startup_notices_dropped():
        os.write(2, notices.encode())
        raise ImportError("broken TF")
    assert capfd.readouterr().err == notices  # a failure shows everything
    monkeypatch.setenv("MTJAX_TF_NOTICES", "1")
    with quiet.startup_notices_dropped():
        os.write(2, notices.encode())
    assert capfd.readouterr().err == notices


def test_tf_data_log_of_a_refused_input_position_is_dropped(capfd):
    """tf.data logs its refusal of a saved position in two C++ lines of several hundred
    characters before raising; mtjax says what it does about it in one line of its own."""
    from mtjax.data import quiet

    refused = (
        "W0000 00:00:1796616390.009267    4437 op_kernel.cc:1858] OP_REQUIRES failed at "
        "iterator_ops.cc:1151 : NOT_FOUND: Failed to restore dataset iterator from checkpoint: "
        "Iterator::Root::Prefetch::FlatMap. Make sure the dataset definition has not changed\n"
        "W0000 00:00:1796616390.015868    4437 local_rendezvous.cc:412] Local rendezvous is "
        "aborting with status: NOT_FOUND: Failed to restore dataset iterator from checkpoint: "
        "Iterator::Root\n")
    other = "E0000 some_op.cc:1] a real problem\n"
    with pytest.raises(tf.errors.NotFoundError), quiet.refused_position_lines_dropped():
        os.write(2, (refused + other).encode())
        raise tf.errors.NotFoundError(None, None, "Failed to restore dataset iterator")
    assert capfd.readouterr().err == other


def test_seqio_advice_that_does_not_apply_is_dropped(caplog):
    import logging

    from absl import logging as absl_logging

    from mtjax.data import quiet

    assert any(isinstance(f, quiet.SeqioAdviceFilter) for f in logging.getLogger("absl").filters)
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logging.warning("'logger_cls' is empty so seqio.Evaluator will not log its results.")
        absl_logging.warning("Using an uncached FunctionDataset for training is not recommended")
        absl_logging.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_file_task_notes_print_on_the_first_host_only(monkeypatch, capsys):
    """Every host scans the same files and reaches the same note: a job's merged log showed
    it once per host."""
    import jax

    monkeypatch.setattr(files_lib, "_WARNED", set())
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    files_lib._warn_once("mtjax: note: seen by every host")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    files_lib._warn_once("mtjax: note: seen by every host, once")
    files_lib._warn_once("mtjax: note: seen by every host, once")
    assert capsys.readouterr().err == "mtjax: note: seen by every host, once\n"
    # Outside a multi-host job, JAX is not asked (it would start its backends): printed.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax, "process_index", lambda: pytest.fail("backends started"))
    files_lib._warn_once("mtjax: note: one process")
    assert capsys.readouterr().err == "mtjax: note: one process\n"


@pytest.mark.parametrize("strategy", ["examples_proportional", "temperature"])
def test_size_strategies_name_a_file_task_whose_files_are_missing(data_dir, strategy):
    """A file task whose pattern matches no file has no size to weigh: the error is the missing
    file, not "cannot tell its size (... use data.mixing=equal)", which sent the user to
    change the mixing instead of the path."""
    tasks.add_file_task("t_nofile", str(data_dir / "no_such_file.tsv"))
    tasks.add_file_task("t_small", str(data_dir / "small.tsv"))
    tasks.add_mixture("t_nofile_mix", ["t_small", "t_nofile"], mixing="equal")
    with pytest.raises(files_lib.DataFileError, match="no file matches .*no_such_file.tsv"):
        mixing.resolve_rates("t_nofile_mix", strategy)
    with pytest.raises(files_lib.DataFileError, match="no file matches .*no_such_file.tsv"):
        InputPipeline("t_nofile_mix", inputs_length=16, targets_length=8, batch_size=2,
                      mixing=strategy)
    tasks.add_mixture("t_nofile_prop", ["t_small", "t_nofile"], mixing=strategy)
    with pytest.raises(files_lib.DataFileError, match="no file matches .*no_such_file.tsv"):
        mixing.mixture_rates("t_nofile_prop")


@pytest.mark.parametrize("density,mean_span,inputs_length", [
    (0.15, 3.0, 172), (0.15, 3.0, 512), (0.15, 3.0, 1180), (0.3, 8.0, 130), (0.15, 1.0, 4)])
def test_random_spans_helper_gives_the_lengths_the_noise_mask_makes(density, mean_span,
                                                                    inputs_length):
    """The helper counted noise in float64 and the mask in float32: at 172 inputs its chunk
    of 190 tokens (190 * 0.15 = 28.5) made 40 targets where it reported 38, and a run given
    targets_length=38 from it cut 2 tokens off every full chunk's targets."""
    chunk, targets_length = objectives.random_spans_helper(inputs_length, density, mean_span)
    tokens = tf.range(10, 10 + chunk)
    mask = objectives.random_spans_noise_mask(tf.constant(chunk), tf.constant([3, 4]), density,
                                              mean_span)
    inputs = objectives.noise_span_to_unique_sentinel(tokens, mask, 1000)
    targets = objectives.noise_span_to_unique_sentinel(tokens, tf.logical_not(mask), 1000)
    assert (len(inputs) + 1, len(targets) + 1) == (inputs_length, targets_length)  # + EOS


def test_a_stray_first_tsv_line_is_the_malformed_one(tmp_path):
    """Without a header, the number of fields most lines have is the expected one: taken from
    the first line, a stray first line (a title, a row with an extra tab) made every good line
    malformed, and on_malformed='skip' trained on the stray line alone."""
    good = "".join(f"question {i}\tanswer {i}\n" for i in range(6))
    for first, fields in (("my dataset\n", 1), ("what\tis\tthis\n", 3)):
        path = tmp_path / f"stray_{fields}.tsv"
        path.write_text(first + good)
        task = tasks.add_file_task(f"t_stray_{fields}", str(path), on_malformed="skip")
        assert task.source.scan("train").examples == 6
        assert [ex["targets_pretokenized"] for ex in _examples(task)] == [
            f"answer {i}".encode() for i in range(6)]
        failing = tasks.add_file_task(f"t_stray_fail_{fields}", str(path), on_malformed="fail")
        with pytest.raises(files_lib.DataFileError,
                           match=rf"1 malformed line\(s\): {path}:1: {fields} tab-separated "
                                 r"fields, expected 2\."):
            _examples(failing)


def test_prefix_lm_keeps_the_token_of_a_one_token_chunk_as_the_target():
    """The last chunk of a document group can be one token: its targets were empty (EOS
    alone), where T5 makes it the target with empty inputs; longer chunks split as before."""
    for seed in range(5):
        mask = objectives.random_prefix_noise_mask(tf.constant(1), tf.constant([seed, 7]), 0.5)
        assert mask.numpy().tolist() == [True]
        mask = objectives.random_prefix_noise_mask(tf.constant(2), tf.constant([seed, 7]), 0.5)
        assert mask.numpy().tolist() == [False, True]
