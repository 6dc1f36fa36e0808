"""Tests of the data layer: built-in tasks, mixing rates, the packed pipeline with task ids."""

import importlib
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mtjax.data import (
    BATCH_KEYS,
    DEFAULT_MIXTURE,
    InputPipeline,
    TaskIdEncDecFeatureConverter,
    UnknownTaskError,
    builtin,
    decode_packed_row,
    equal,
    examples_proportional,
    get_vocabulary,
    mixing,
    mixture_rates,
    padded_vocab_size,
    temperature_scaled,
)

LENGTHS = {"inputs_length": 128, "targets_length": 64}
BATCH = 16


def _pipeline(**kwargs) -> InputPipeline:
    return InputPipeline(DEFAULT_MIXTURE, batch_size=BATCH, **{**LENGTHS, **kwargs})


@pytest.fixture(scope="module")
def stream():
    """The first four batches of the seed-0 demo stream, and the pipeline that made them."""
    pipeline = _pipeline(seed=0)
    return pipeline, [next(pipeline) for _ in range(4)]


def test_vocabulary():
    vocab = get_vocabulary("byte")
    assert vocab is get_vocabulary("byte")
    assert vocab.vocab_size == 259 and padded_vocab_size(vocab) == 384
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_vocabulary("/nonexistent/spm.model")


def test_registration_is_idempotent():
    importlib.reload(builtin)
    builtin.register()
    assert set(builtin.TASK_NAMES) <= set(seqio.TaskRegistry.names())
    assert len(builtin.TASK_NAMES) >= 5


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "add", "translate",
                                  "span_corruption"])
def test_validation_split_holds_no_train_example(task):
    train = set(zip(*builtin.generate(task, "train"), strict=True))
    validation = list(zip(*builtin.generate(task, "validation"), strict=True))
    assert len(validation) == builtin.SPLIT_SIZES["validation"]
    assert not [pair for pair in validation if pair in train]
    # The size mixing strategies count is the data's own.
    for split in ("train", "validation"):
        counted = mixing.num_examples(seqio.get_mixture_or_task(f"mtjax_{task}"), split)
        assert counted == len(builtin.generate(task, split)[0])


def test_exact_match():
    assert builtin.exact_match(["a", "b"], ["a", "c"]) == {"exact_match": 50.0}


def test_mixing_rate_formulas():
    n = {"a": 100, "b": 1_000, "c": 5_000}
    rates = examples_proportional(n, cap=2_000)
    assert rates == pytest.approx({"a": 100 / 3100, "b": 1000 / 3100, "c": 2000 / 3100})
    assert temperature_scaled(n, 1.0, cap=2_000) == pytest.approx(rates)
    hot = temperature_scaled(n, 2.0, cap=2_000)
    z = sum(math.sqrt(r) for r in rates.values())
    assert hot == pytest.approx({k: math.sqrt(r) / z for k, r in rates.items()})
    assert temperature_scaled(n, 1e9)["a"] == pytest.approx(1 / 3)
    assert equal(["x", "y"]) == {"x": 0.5, "y": 0.5}


def test_mixture_rates_flatten_submixtures():
    demo = mixture_rates(DEFAULT_MIXTURE)
    assert demo == pytest.approx(dict.fromkeys(builtin.TASK_NAMES, 1 / len(builtin.TASK_NAMES)))
    name = "test_nested_mixture"
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, [(DEFAULT_MIXTURE, 2.0), ("mtjax_copy", 1.0)])
    nested = mixture_rates(name)
    k = len(builtin.TASK_NAMES)
    assert nested["mtjax_copy"] == pytest.approx((2 / k + 1) / 3)
    assert nested["mtjax_add"] == pytest.approx((2 / k) / 3)


def test_converter_worked_example():
    ds = tf.data.Dataset.from_generator(  # test-only source; checkpointing is not needed here
        lambda: iter([
            {"inputs": [7, 8, 5, 1], "targets": [3, 9, 1], "task_ids": [2, 2, 2]},
            {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1], "task_ids": [1, 1]},
        ]),
        output_signature={k: tf.TensorSpec([None], tf.int32)
                          for k in ("inputs", "targets", "task_ids")},
    )
    out = TaskIdEncDecFeatureConverter(pack=True)(
        ds, {"inputs": 10, "targets": 7, "task_ids": 7}
    )
    (ex,) = list(out.as_numpy_iterator())
    assert ex["encoder_segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 0]
    assert ex["decoder_target_tokens"].tolist() == [3, 9, 1, 4, 1, 0, 0]
    assert ex["decoder_input_tokens"].tolist() == [0, 3, 9, 0, 4, 0, 0]
    assert ex["decoder_segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert ex["decoder_positions"].tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert ex["decoder_task_ids"].tolist() == [2, 2, 2, 1, 1, 0, 0]


def test_batches_have_configured_shapes(stream):
    pipeline, batches = stream
    assert pipeline.vocab_size == 259
    assert pipeline.task_names == sorted(builtin.TASK_NAMES)
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS)
        for key, array in batch.items():
            length = 128 if key.startswith("encoder") else 64
            assert array.shape == (BATCH, length) == pipeline.output_shapes[key], key
            assert array.dtype == np.int32, key


def test_packing_and_task_ids(stream):
    _, batches = stream
    segments = []
    for batch in batches:
        ids, weights = batch["decoder_task_ids"], batch["decoder_loss_weights"]
        np.testing.assert_array_equal(ids != 0, weights != 0)
        np.testing.assert_array_equal(ids != 0, batch["decoder_target_tokens"] != 0)
        assert ids.max() <= len(builtin.TASK_NAMES)
        for row in range(BATCH):
            seg = batch["decoder_segment_ids"][row]
            segments.append(seg.max())
            for s in range(1, seg.max() + 1):
                assert len(set(ids[row][seg == s].tolist())) == 1  # one task per segment
    assert np.mean(segments) > 1.5 and max(segments) >= 3  # rows really hold several examples


def _uncorrupt(input_ids: list[int], target_ids: list[int]) -> list[int]:
    """Puts span-corrupted spans back: sentinels are ids >= 200 (ASCII bytes are < 131)."""
    spans, current = {}, None
    for t in target_ids[:-1]:  # drop EOS
        if t >= 200:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in input_ids[:-1]:
        out.extend(spans[t] if t >= 200 else [t])
    return out + [1]


def test_every_task_obeys_its_rule(stream):
    _, batches = stream
    vocab = get_vocabulary("byte")
    names = sorted(builtin.TASK_NAMES)
    seen = dict.fromkeys(names, 0)
    words = set(builtin.source_words())
    for batch in batches:
        for row in range(BATCH):
            for task_id, input_ids, target_ids, inputs, targets in decode_packed_row(
                batch, row, vocab
            ):
                name = names[task_id - 1]
                seen[name] += 1
                assert input_ids[-1] == 1 and target_ids[-1] == 1  # EOS kept
                if name == "mtjax_span_corruption":
                    text = vocab.decode(_uncorrupt(input_ids, target_ids))
                    assert 8 <= len(text.split()) <= 14 and set(text.split()) <= words, text
                    assert target_ids[0] == vocab.vocab_size - 1  # sentinels from the top
                else:
                    assert builtin.RULES[name](inputs, targets), (name, inputs, targets)
    assert all(count > 0 for count in seen.values()), seen


def test_same_seed_same_stream_and_exact_resume(stream, tmp_path):
    _, expected = stream
    pipeline = _pipeline(seed=0)
    for i in range(3):
        batch = next(pipeline)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], expected[i][key], err_msg=key)
    pipeline.save(str(tmp_path / "it"))
    resumed = _pipeline(seed=0)
    resumed.restore(str(tmp_path / "it"))
    batch = next(resumed)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(batch[key], expected[3][key], err_msg=key)


def test_shards_differ():
    first = [next(_pipeline(shard_index=i, num_shards=2)) for i in range(2)]
    assert not np.array_equal(first[0]["encoder_input_tokens"], first[1]["encoder_input_tokens"])


def test_hosts_draw_their_tasks_independently():
    """Each host's sequence of tasks is its own: with one seed, every host would pick the same
    task at each position (a global batch of N copies of one task mix)."""
    def row_tasks(shard_index):
        pipeline = _pipeline(pack=False, shard_index=shard_index, num_shards=2)
        return np.concatenate([next(pipeline)["decoder_task_ids"][:, 0] for _ in range(4)])

    first, second = row_tasks(0), row_tasks(1)
    assert set(first) == set(second) and len(set(first)) > 2
    # Independent draws agree about sum(rate**2) of the time (under 0.3 here); one seed: always.
    assert np.mean(first == second) < 0.5, (first, second)


def test_unpacked_batches():
    batch = next(_pipeline(pack=False))
    assert set(batch) == set(BATCH_KEYS)
    tokens = batch["decoder_target_tokens"]
    np.testing.assert_array_equal(batch["decoder_segment_ids"], (tokens != 0).astype(np.int32))
    np.testing.assert_array_equal(batch["decoder_task_ids"] != 0, tokens != 0)
    positions = np.arange(64)[None, :] * (tokens != 0)
    np.testing.assert_array_equal(batch["decoder_positions"], positions)


def test_unknown_mixture_names_it():
    with pytest.raises(UnknownTaskError, match="mtjax_dem") as info:
        InputPipeline("mtjax_dem", batch_size=2, **LENGTHS)
    assert "mtjax_demo" in str(info.value) and "--tasks-module" in str(info.value)


def test_mixture_with_two_vocabularies_is_rejected():
    name = "test_other_vocab"
    if name not in seqio.TaskRegistry.names():
        vocab = seqio.ByteVocabulary(extra_ids=7)
        features = {k: seqio.Feature(vocabulary=vocab) for k in ("inputs", "targets")}
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None, ["train"]),
            output_features=features,
        )
        seqio.MixtureRegistry.add("test_two_vocabs", [name, "mtjax_copy"], default_rate=1.0)
    with pytest.raises(ValueError, match="disagree on the output vocabulary"):
        InputPipeline("test_two_vocabs", batch_size=2, **LENGTHS)


def test_a_negative_seed_gives_each_host_its_own_mixing_seed():
    """train.seed=-1 (the config takes down to -(2**63-1)) stopped every host but host 0 in
    numpy's SeedSequence ("expected non-negative integer"); other seeds draw as before."""
    from mtjax.data import pipeline

    seeds = [pipeline.host_mixing_seed(-1, host) for host in range(3)]
    assert seeds[0] == -1 and len(set(seeds)) == 3, seeds
    assert pipeline.host_mixing_seed(5, 1) == int(
        np.random.SeedSequence([5, 1]).generate_state(1)[0])
