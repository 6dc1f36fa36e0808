"""Decoding, scoring, evaluation and the inference commands on tiny models.

The KV-cache decoder is checked against the uncached forward pass; beam search against brute
force over every sequence of a 4-token vocabulary; scores against the training loss; sharded
decoding against one device; the evaluator against an untrained model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtjax.infer import batching
from mtjax.infer import load as load_lib
from mtjax.infer.decode import DecodeOptions, Decoder, filter_logits
from mtjax.infer.score import Scorer
from mtjax.model import sizes
from mtjax.parallel import mesh as mesh_lib

BASE = sizes.get_config("t5_1_1_test")
ENC = np.array([[5, 9, 17, 33, 1, 0, 0, 0], [40, 41, 1, 0, 0, 0, 0, 0]], np.int32)


class Tiny:
    """A random-weight model on a one-device mesh, with its decoder and scorer."""

    def __init__(self, cfg: sizes.T5Config, seed: int = 0):
        self.mesh = mesh_lib.make_mesh(mesh_lib.MeshShape())
        self.rules = mesh_lib.get_rules("fsdp_tensor")
        self.model_def, target = load_lib.abstract_model(cfg, self.mesh, self.rules)
        self.params = load_lib.init_params(self.model_def, target, self.mesh, self.rules, seed)
        self.decoder = Decoder(self.model_def, self.mesh, self.rules)
        self.scorer = Scorer(self.model_def, self.mesh, self.rules)

    def logits(self, enc_BS, dec_BT) -> np.ndarray:
        """The uncached, teacher-forced forward pass."""
        with mesh_lib.activate(self.mesh, self.rules):
            return np.asarray(_forward(self.model_def.merge(self.params), jnp.asarray(enc_BS),
                                       jnp.asarray(dec_BT)))


@nnx.jit
def _forward(model, enc, dec):
    return model(enc, dec)


@pytest.fixture(scope="module")
def tiny():
    return Tiny(dataclasses.replace(BASE, vocab_size=64))


@pytest.fixture(scope="module")
def four_tokens():
    """Vocabulary {0 pad/BOS, 1 EOS, 2, 3}: every sequence of length <= 3 can be listed."""
    return Tiny(dataclasses.replace(BASE, vocab_size=4), seed=3)


def shift_right(tokens_BT: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(tokens_BT[:, :1]), tokens_BT[:, :-1]], axis=1)


# --- KV cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["t5_1_1", "t5_1_0_umt5"])
def test_cached_step_logits_equal_full_forward(variant, tiny):
    m = tiny
    if variant != "t5_1_1":  # tied output layer, ReLU MLP, per-layer relative bias
        m = Tiny(dataclasses.replace(BASE, vocab_size=64, tie_embeddings=True,
                                     mlp_activation="relu", per_layer_relative_bias=True))
    dec = np.array([[0, 7, 8, 9, 10, 11], [0, 12, 1, 0, 0, 0]], np.int32)

    @jax.jit
    def stepwise(params, enc_BS, dec_BT):
        model = m.model_def.merge(params)
        cache = model.init_cache(model.encode(enc_BS), enc_BS, dec_BT.shape[1])

        def body(cache, position_and_tokens):
            position, tokens_B = position_and_tokens
            logits_BV, cache = model.decode_step(tokens_B[:, None], cache, position)
            return cache, logits_BV

        positions = jnp.arange(dec_BT.shape[1], dtype=jnp.int32)
        _, logits_TBV = jax.lax.scan(body, cache, (positions, dec_BT.T))
        return logits_TBV.transpose(1, 0, 2)

    with mesh_lib.activate(m.mesh, m.rules):
        cached = np.asarray(stepwise(m.params, jnp.asarray(ENC), jnp.asarray(dec)))
    np.testing.assert_allclose(cached, m.logits(ENC, dec), atol=2e-5, rtol=1e-5)


def test_greedy_tokens_and_scores_match_uncached_forward(tiny):
    tokens, scores = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7))
    logits = tiny.logits(ENC, shift_right(tokens))
    logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    for b in range(len(ENC)):
        row = tokens[b].tolist()
        length = row.index(1) + 1 if 1 in row else len(row)
        assert (logits[b, :length].argmax(-1) == tokens[b, :length]).all()
        assert (tokens[b, length:] == 0).all()
        expected = logprobs[b, np.arange(length), tokens[b, :length]].sum()
        np.testing.assert_allclose(scores[b], expected, rtol=1e-5, atol=1e-5)


def test_rows_that_pad_a_batch_do_not_keep_decoding_going(tiny):
    """A batch padded to its compiled size (the last one of a task, say) decoded until every
    row ended, and all-zero rows rarely say EOS: it ran to max_decode_length after its inputs
    had ended. Rows past ``rows`` now start finished: the inputs decode as alone, the padding
    to zeros, and with no input rows the loop ends before its first step."""
    from mtjax.infer.decode import decode

    padded = np.concatenate([ENC, np.zeros_like(ENC)])

    def run(enc, options, rows):
        with mesh_lib.activate(tiny.mesh, tiny.rules):
            fn = jax.jit(lambda p, e, r: decode(tiny.model_def.merge(p), e, options, rows=r))
            return jax.device_get(fn(tiny.params, enc, rows))

    for options in (DecodeOptions(max_decode_length=7),
                    DecodeOptions(max_decode_length=7, beam_size=3)):
        alone = run(ENC, options, None)
        tokens, scores = run(padded, options, np.int32(len(ENC)))
        np.testing.assert_array_equal(tokens[:len(ENC)], alone[0])
        np.testing.assert_allclose(scores[:len(ENC)], alone[1], rtol=1e-6)
        if options.beam_size == 1:
            assert not tokens[len(ENC):].any() and not scores[len(ENC):].any()
        nothing, _ = run(padded, options, np.int32(0))
        assert not nothing.any(), options


# --- Beam search ------------------------------------------------------------------------------

def test_beam_size_one_equals_greedy(tiny):
    from mtjax.infer.decode import beam_search

    greedy = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7))
    # Decoder dispatches beam_size=1 to the greedy loop; call beam search itself.

    with mesh_lib.activate(tiny.mesh, tiny.rules):
        seqs, beam_scores = jax.jit(lambda p, e: beam_search(
            tiny.model_def.merge(p), e, DecodeOptions(max_decode_length=7, beam_size=1,
                                                      alpha=0.0)))(tiny.params, ENC)
    np.testing.assert_array_equal(np.asarray(seqs)[:, 0], greedy[0])
    np.testing.assert_allclose(np.asarray(beam_scores)[:, 0], greedy[1], rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_returns_best_of_all_sequences(four_tokens, alpha):
    m, max_len = four_tokens, 3
    enc = np.array([[2, 3, 2, 1], [3, 3, 1, 0]], np.int32)
    # Every sequence that ends with EOS within max_len (non-EOS tokens 0, 2, 3).
    candidates = [list(p) + [1] for n in range(max_len)
                  for p in itertools.product((0, 2, 3), repeat=n)]
    inputs = [row[row > 0].tolist() for row in enc for _ in candidates]
    batch = batching.score_batch_arrays(inputs, candidates * len(enc), inputs_length=4,
                                        targets_length=max_len)
    # Token 0 can be a real output here: weight every position up to the EOS.
    batch["decoder_loss_weights"] = np.array(
        [[1] * len(c) + [0] * (max_len - len(c)) for c in candidates * len(enc)], np.int32)
    logprob, _ = m.scorer(m.params, batch)
    lengths = np.array([len(c) for c in candidates] * len(enc))
    penalized = (logprob / ((5 + lengths) / 6) ** alpha).reshape(len(enc), len(candidates))

    # 18 beams keep every prefix alive, so the search is exhaustive.
    options = DecodeOptions(max_decode_length=max_len, beam_size=18, alpha=alpha)
    tokens, scores = m.decoder(m.params, enc, options)
    for b in range(len(enc)):
        best = candidates[int(penalized[b].argmax())]
        assert tokens[b].tolist() == best + [0] * (max_len - len(best))
        np.testing.assert_allclose(scores[b], penalized[b].max(), rtol=1e-5)


# --- Sampling ---------------------------------------------------------------------------------

def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]], jnp.float32))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))
    assert kept_k.tolist() == [[True, True, False, False]]
    # Nucleus: 0.5 < 0.7, 0.5 + 0.25 >= 0.7 -> the two most likely tokens.
    kept_p = np.isfinite(np.asarray(filter_logits(logits, top_p=0.7)))
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_small = np.isfinite(np.asarray(filter_logits(logits, top_p=0.01)))
    assert kept_small.tolist() == [[True, False, False, False]]


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
    greedy, _ = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7))
    top1, _ = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7, temperature=1.0,
                                                           top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    sample = DecodeOptions(max_decode_length=7, temperature=1.5, top_p=0.9, seed=1)
    a, score_a = tiny.decoder(tiny.params, ENC, sample)
    b, _ = tiny.decoder(tiny.params, ENC, sample)
    c, _ = tiny.decoder(tiny.params, ENC, dataclasses.replace(sample, seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The score is the model's (untempered) log-probability of the sampled tokens.
    logprobs = jax.nn.log_softmax(jnp.asarray(tiny.logits(ENC, shift_right(a))), axis=-1)
    for row in range(len(ENC)):
        tokens = a[row].tolist()
        n = tokens.index(1) + 1 if 1 in tokens else len(tokens)
        expected = float(np.asarray(logprobs)[row, np.arange(n), a[row, :n]].sum())
        np.testing.assert_allclose(score_a[row], expected, rtol=1e-5)


def test_each_row_samples_its_own_noise_whatever_the_batch(tiny):
    """A row's sample depends on the seed and its index in the input: repeated inputs differ,
    and decoding one row at a time (first_row says where) gives what one batch gives."""
    same = np.repeat(ENC[:1], 4, axis=0)
    options = DecodeOptions(max_decode_length=7, temperature=1.0, seed=3)
    whole, scores = tiny.decoder(tiny.params, same, options)
    assert len({tuple(row) for row in whole.tolist()}) > 1, whole
    for row in range(4):
        alone, score = tiny.decoder(tiny.params, same[row:row + 1], options, first_row=row)
        np.testing.assert_array_equal(alone[0], whole[row])
        np.testing.assert_allclose(score[0], scores[row], rtol=1e-5)


def test_a_vanishing_temperature_is_greedy(tiny):
    """logits / 1e-45 overflows float32 to inf, where sampling took the first infinite logit
    rather than the largest."""
    greedy, _ = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7))
    for temperature in (1e-6, 1e-45):
        cold, _ = tiny.decoder(tiny.params, ENC, DecodeOptions(max_decode_length=7,
                                                               temperature=temperature))
        np.testing.assert_array_equal(cold, greedy, err_msg=str(temperature))


# --- Scoring ----------------------------------------------------------------------------------

def test_score_equals_training_loss(tiny):
    from mtjax.train import step as step_lib

    inputs = [[5, 6, 7, 1], [8, 9, 1], [10, 1]]
    targets = [[11, 12, 1], [13, 1], [14, 15, 16, 17, 1]]
    batch = batching.score_batch_arrays(inputs, targets, inputs_length=6, targets_length=6)
    scores, counts = tiny.scorer(tiny.params, batch)
    assert counts.tolist() == [3, 2, 5]

    train_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    train_batch["decoder_task_ids"] = (train_batch["decoder_target_tokens"] > 0).astype(
        jnp.int32)
    with mesh_lib.activate(tiny.mesh, tiny.rules):
        logits = step_lib.model_logits(tiny.model_def, tiny.params, train_batch, None)
        loss_sum, sums = step_lib.batch_metrics(logits, train_batch, num_tasks=1, z_loss=0.0)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(-scores.sum(), float(loss_sum), rtol=1e-5)
    assert counts.sum() == float(sums["weight_sum"])


# --- Sharded == single device -----------------------------------------------------------------

MESH_CODE = """
import dataclasses, json, jax, numpy as np
from mtjax.infer import load as load_lib
from mtjax.infer.decode import DecodeOptions, Decoder
from mtjax.model import sizes
from mtjax.parallel import mesh as mesh_lib

cfg = dataclasses.replace(sizes.get_config("t5_1_1_test"), vocab_size=64)
enc = np.array([[5, 9, 17, 33, 1, 0, 0, 0], [40, 41, 1, 0, 0, 0, 0, 0],
                [7, 7, 7, 1, 0, 0, 0, 0], [3, 1, 0, 0, 0, 0, 0, 0]], np.int32)
rules = mesh_lib.get_rules("fsdp_tensor")
one = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), devices=jax.devices()[:1])
four = mesh_lib.make_mesh(mesh_lib.MeshShape(data=2, fsdp=1, tensor=2))
model_def, target = load_lib.abstract_model(cfg, one, rules)
params = load_lib.init_params(model_def, target, one, rules, seed=0)
out = {}
for name, mesh in (("one", one), ("four", four)):
    model_def, target = load_lib.abstract_model(cfg, mesh, rules)
    placed = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)
    decoder = Decoder(model_def, mesh, rules)
    greedy = decoder(placed, enc, DecodeOptions(max_decode_length=6))
    beam = decoder(placed, enc, DecodeOptions(max_decode_length=6, beam_size=3))
    out[name] = [x.tolist() for x in (*greedy, *beam)]
print(json.dumps(out))
"""


def test_decoding_on_data2_tensor2_mesh_equals_one_device(subprocess_python):
    proc = subprocess_python(MESH_CODE, devices=4)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["one"], out["four"]
    assert one[0] == four[0] and one[2] == four[2]  # greedy and beam tokens
    for i in (1, 3):  # greedy and beam scores
        np.testing.assert_allclose(four[i], one[i], rtol=1e-4, atol=1e-5)


# --- A trained checkpoint: loader, evaluator, commands ----------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from mtjax import config as config_lib
    from mtjax.train import trainer

    workdir = tmp_path_factory.mktemp("copy_run")
    config = config_lib.load(None, [
        "model.name=t5_1_1_test", "eval.at_end=false", "data.mixture=mtjax_copy",
        "data.inputs_length=64", "data.targets_length=32", "train.batch_size=8", "train.steps=20",
        "checkpoint.every_steps=20", "log.tensorboard=false", "eval.max_examples=16",
        "eval.batch_size=16"])
    trainer.train(config, workdir, progress=False)
    return workdir


def test_load_from_run_dir_or_step_dir(trained_run, caplog):
    with caplog.at_level(logging.WARNING):
        by_run = load_lib.load(trained_run)
        by_step = load_lib.load(trained_run / "checkpoints" / "20")
        # The step's Orbax item, as T5X and Orbax users give it: that step.
        by_state = load_lib.load(trained_run / "checkpoints" / "20" / "state")
    # Restoring one item of a step is not a missing-metadata problem (Orbax warned it was).
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
    assert by_run.step == by_step.step == by_state.step == 20
    assert by_run.config.model.name == "t5_1_1_test"
    assert by_run.model_def.config.vocab_size == 384  # byte vocabulary, padded to 128
    assert by_run.vocabulary.vocab_size == 259
    for a, b in zip(jax.tree.leaves(by_run.params), jax.tree.leaves(by_step.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vocabulary_paths_resolve_or_fail_clearly(tmp_path):
    from mtjax import config as config_lib

    config = config_lib.load(None, ["data.vocabulary=byte"])
    assert load_lib.resolve_vocabulary(config, tmp_path).vocab_size == 259
    config = config_lib.load(None, ["data.vocabulary=spm/missing.model"])
    with pytest.raises(load_lib.VocabularyError, match="missing.model"):
        load_lib.resolve_vocabulary(config, tmp_path)


def test_tasks_that_name_no_vocabulary_take_the_runs_in_inference(tmp_path, monkeypatch):
    """A run on a SentencePiece data.vocabulary whose tasks module names none (the helpers'
    default: the run's): infer, score and eval register those tasks with it, as training did.
    They got bytes, so `infer --task` fed the model byte ids and `mtjax eval` refused the run's
    own tasks as 'another vocabulary'."""
    import types

    import sentencepiece
    import seqio

    from mtjax import compile_cache
    from mtjax import config as config_lib
    from mtjax.cli import _inference
    from mtjax.data import vocab as vocab_lib

    monkeypatch.setattr(vocab_lib, "_RUN_VOCABULARY", [None])
    run = tmp_path / "run"
    step_dir = run / "checkpoints" / "5"
    step_dir.mkdir(parents=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"word{i} text{i % 7} sample" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(run / "sp"), vocab_size=30, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2)
    (tmp_path / "d.tsv").write_text("a\tb\n")
    config, configs = config_lib.load(None, []), {}
    for name in ("mtjax_test_run_vocab_a", "mtjax_test_run_vocab_b"):
        module = tmp_path / f"{name}.py"
        module.write_text(f"from mtjax.data import tasks\ntasks.add_file_task({name!r}, "
                          f"{{'validation': {str(tmp_path / 'd.tsv')!r}}})\n")
        # data.vocabulary as a converter records it: relative to the run directory.
        configs[name] = dataclasses.replace(config, data=dataclasses.replace(
            config.data, vocabulary="sp.model", tasks_module=str(module), mixture=name))
    try:
        # The run's own tasks module, imported while the vocabulary is looked up.
        config_a = configs["mtjax_test_run_vocab_a"]
        model_vocabulary = load_lib.resolve_vocabulary(config_a, step_dir)
        assert isinstance(model_vocabulary, seqio.SentencePieceVocabulary)
        task = seqio.TaskRegistry.get("mtjax_test_run_vocab_a")
        assert task.output_features["inputs"].vocabulary == model_vocabulary

        # --tasks-module, which the commands import before the checkpoint loads.
        monkeypatch.setattr(vocab_lib, "_RUN_VOCABULARY", [None])  # a fresh process's
        config_b = configs["mtjax_test_run_vocab_b"]
        monkeypatch.setattr(load_lib, "find_step_dir", lambda path: step_dir)
        monkeypatch.setattr(load_lib, "read_config", lambda path: config_b)
        loaded = types.SimpleNamespace(config=config_b, step_dir=step_dir)
        monkeypatch.setattr(load_lib, "load", lambda path, tasks_module=None: loaded)
        monkeypatch.setattr(load_lib, "check_vocabulary_fits", lambda model: None)
        monkeypatch.setattr(compile_cache, "enable", lambda setting: None)
        args = types.SimpleNamespace(batch_size=1, checkpoint=str(run), no_progress=True,
                                     tasks_module=config_b.data.tasks_module)
        assert _inference.load(args) is loaded
        task = seqio.TaskRegistry.get("mtjax_test_run_vocab_b")
        assert task.output_features["inputs"].vocabulary == model_vocabulary
    finally:
        for name in ("mtjax_test_run_vocab_a", "mtjax_test_run_vocab_b"):
            seqio.TaskRegistry.remove(name)


def test_evaluator_beats_untrained_model(trained_run):
    from mtjax.infer import evaluate

    model = load_lib.load(trained_run)
    evaluator = evaluate.make_evaluator(model.config, model.mesh, model.rules, model.model_def)
    assert evaluator.task_names == ["mtjax_copy"]
    trained = evaluator(model.params, step=20)["mtjax_copy"]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          model.params)
    fresh = load_lib.init_params(model.model_def, target, model.mesh, model.rules, seed=1)
    untrained = evaluator(fresh, step=0)["mtjax_copy"]
    assert set(trained) == {"exact_match", "log_likelihood", "loss", "token_accuracy"}
    assert 0.0 <= trained["exact_match"] <= 100.0
    # eval.loss: per target token, so about ln(384) = 5.95 for random weights, far less trained.
    assert 4.5 < untrained["loss"] < 7.5 and trained["loss"] < untrained["loss"] - 2
    assert untrained["token_accuracy"] < 0.05 < 0.15 < trained["token_accuracy"] <= 1
    # Mean target log-likelihood: the trained model beats random weights (about uniform over
    # 384 ids, ~-6 nats per token) by a wide margin after 20 steps.
    assert trained["log_likelihood"] < 0
    assert trained["log_likelihood"] > untrained["log_likelihood"] + 20, (trained, untrained)
    flat = evaluate.flatten({"mtjax_copy": trained})
    assert set(flat) == {"eval/mtjax_copy/exact_match", "eval/mtjax_copy/log_likelihood",
                         "eval/mtjax_copy/loss", "eval/mtjax_copy/token_accuracy"}


def test_a_task_scores_the_same_beside_a_task_that_needs_lengths():
    """A task evaluates as it does alone, whatever its neighbours: one evaluator for the whole
    mixture gave every task the run's lengths once span corruption needed them, so
    mtjax_kb_qa's questions (about 35 bytes) were cut at data.inputs_length=24 in the mixture
    and whole alone (log-likelihood -36.149 against -36.174 on a 12-step model)."""
    import seqio

    import mtjax.data.builtin  # noqa: F401  (registers the built-in tasks)
    from mtjax import config as config_lib
    from mtjax.infer import evaluate

    name = "test_eval_qa_beside_span_corruption"
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, ["mtjax_kb_qa", "mtjax_kb_bio_span_corruption"],
                                  default_rate=1.0)
    m = Tiny(dataclasses.replace(BASE, vocab_size=384))
    results = {}
    for mixture in ("mtjax_kb_qa", name):
        config = config_lib.load(None, [
            f"data.mixture={mixture}", "data.inputs_length=24", "data.targets_length=16",
            "eval.max_examples=2", "eval.batch_size=2", "eval.max_decode_length=2"])
        evaluator = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)
        results[mixture] = evaluator(m.params, step=0)
    assert set(results[name]) == {"mtjax_kb_qa", "mtjax_kb_bio_span_corruption"}
    alone, beside = results["mtjax_kb_qa"]["mtjax_kb_qa"], results[name]["mtjax_kb_qa"]
    np.testing.assert_allclose(beside["log_likelihood"], alone["log_likelihood"], rtol=1e-5)


def test_each_task_decodes_to_its_own_longest_target(tmp_path):
    """Tasks evaluated together were all decoded to the longest target of any of them, so a
    task's predictions (a beam search's, or any that ends with no EOS) changed with its
    neighbours, and its decoding took as long as theirs."""
    import seqio

    from mtjax import config as config_lib
    from mtjax.data import tasks
    from mtjax.infer import evaluate

    (tmp_path / "short.tsv").write_text("copy: ab\tab\n")  # targets: 2 bytes + EOS
    (tmp_path / "long.tsv").write_text("copy: a\tabcdefghijklmn\ncopy: b\tb\n")  # 14 + EOS
    for name in ("short", "long"):
        files = str(tmp_path / f"{name}.tsv")
        tasks.add_file_task(f"t_decode_{name}", {"train": files, "validation": files},
                            vocabulary="byte", metric_fns=[lambda targets, predictions: {}])
    seqio.MixtureRegistry.add("t_decode_both", ["t_decode_short", "t_decode_long"],
                              default_rate=1.0)
    m = Tiny(dataclasses.replace(BASE, vocab_size=384))
    try:
        config = config_lib.load(None, ["data.mixture=t_decode_both", "eval.batch_size=4",
                                        "eval.loss=false"])
        evaluator = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)
        decoded, decoder = {}, evaluator.decoder

        def record(params, tokens_BS, options, **kwargs):
            decoded[len(tokens_BS)] = options.max_decode_length  # rows: the task's examples
            return decoder(params, tokens_BS, options, **kwargs)

        evaluator.decoder = record
        evaluator(m.params, step=0)
    finally:
        seqio.MixtureRegistry.remove("t_decode_both")
        for name in ("short", "long"):
            seqio.TaskRegistry.remove(f"t_decode_{name}")
    assert decoded == {1: 3, 2: 15}


def test_a_metric_that_is_not_a_number_is_left_out_with_a_note(tmp_path, capsys):
    """A seqio Text metric (sample predictions, say) was dropped without a word."""
    import seqio

    from mtjax import config as config_lib
    from mtjax.data import tasks
    from mtjax.infer import evaluate

    (tmp_path / "v.tsv").write_text("copy: ab\tab\ncopy: cd\tcd\n")

    def with_sample(targets, predictions):
        return {"first_target": seqio.metrics.Text(targets[0]), "count": len(predictions)}

    tasks.add_file_task("t_text_metric", {"train": str(tmp_path / "v.tsv"),
                                          "validation": str(tmp_path / "v.tsv")},
                        vocabulary="byte", metric_fns=[with_sample])
    m = Tiny(dataclasses.replace(BASE, vocab_size=384))
    config = config_lib.load(None, ["data.mixture=t_text_metric", "eval.batch_size=2",
                                    "eval.max_decode_length=2", "eval.loss=false"])
    evaluator = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)
    capsys.readouterr()
    assert evaluator(m.params, step=0) == {"t_text_metric": {"count": 2.0}}
    assert evaluator(m.params, step=1) == {"t_text_metric": {"count": 2.0}}
    notes = [line for line in capsys.readouterr().err.splitlines() if "not one number" in line]
    assert notes == [
        "mtjax: note: eval metric 'first_target' of task 't_text_metric' is a Text, not one "
        "number: mtjax records numbers only (metrics.jsonl, TensorBoard, the eval output), so "
        "it is left out; return a float (or seqio.metrics.Scalar) to record it"]  # once


def test_every_task_with_the_split_gets_its_teacher_forced_loss(tmp_path):
    """eval.loss (T5X's train_eval): the training loss function's cross-entropy per target token
    on the task's eval examples, cut at the run's lengths as training cuts them; for a task
    without metric_fns too, which was not evaluated at all."""
    from mtjax import config as config_lib
    from mtjax.data import tasks
    from mtjax.infer import evaluate
    from mtjax.train import step as step_lib

    (tmp_path / "v.tsv").write_text("copy: ab\tab\ncopy: cd\tcd\ncopy: e\te\n")
    tasks.add_file_task("t_loss_only", {"train": str(tmp_path / "v.tsv"),
                                        "validation": str(tmp_path / "v.tsv")},
                        vocabulary="byte")
    m = Tiny(dataclasses.replace(BASE, vocab_size=384))
    config = config_lib.load(None, ["data.mixture=t_loss_only", "data.inputs_length=8",
                                    "data.targets_length=4", "eval.batch_size=2"])
    evaluator = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)
    assert evaluator.task_names == ["t_loss_only"]
    results = evaluator(m.params, step=0)
    assert list(results) == ["t_loss_only"]
    assert list(results["t_loss_only"]) == ["loss", "token_accuracy"]

    # By hand: byte ids are the byte + 3, EOS 1; inputs cut to 7 bytes + EOS.
    def ids(text: str, length: int) -> list[int]:
        row = [b + 3 for b in text.encode()][:length - 1] + [1]
        return row + [0] * (length - len(row))

    def by_hand(inputs_length: int, targets_length: int) -> tuple[float, float]:
        """(loss, token accuracy) of the model over the rows padded to these lengths."""
        rows = [("copy: ab", "ab"), ("copy: cd", "cd"), ("copy: e", "e")]
        enc = np.array([ids(i, inputs_length) for i, _ in rows], np.int32)
        targets = np.array([ids(t, targets_length) for _, t in rows], np.int32)
        dec_in = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)
        logits = m.logits(enc, dec_in)
        loss_BL, _ = step_lib.cross_entropy_with_z_loss(jnp.asarray(logits),
                                                         jnp.asarray(targets), 0.0)
        weights = (targets > 0).astype(np.float32)
        right = (np.argmax(logits, axis=-1) == targets) * weights
        return (float(np.sum(np.asarray(loss_BL) * weights) / weights.sum()),
                float(right.sum() / weights.sum()))

    loss, token_accuracy = by_hand(8, 4)
    np.testing.assert_allclose(results["t_loss_only"]["loss"], loss, rtol=1e-5)
    assert results["t_loss_only"]["token_accuracy"] == pytest.approx(token_accuracy)
    assert evaluator(m.params, step=1) == results  # the same examples every time

    # At 32/16 tokens the examples are whole, and their batches are cut to 16/8 columns past
    # them: the same figures as the forward pass over the converter's padding.
    config = config_lib.load(None, ["data.mixture=t_loss_only", "data.inputs_length=32",
                                    "data.targets_length=16", "eval.batch_size=2"])
    wide = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)(m.params, step=0)
    loss, token_accuracy = by_hand(32, 16)
    np.testing.assert_allclose(wide["t_loss_only"]["loss"], loss, rtol=1e-5)
    assert wide["t_loss_only"]["token_accuracy"] == pytest.approx(token_accuracy)


def test_loss_batches_lose_the_padding_past_the_longest_example():
    """Columns past a task's longest example (rounded up to a power of two, at least 8) are
    cut from its loss batches; what is kept is unchanged."""
    from mtjax.infer import evaluate

    rng = np.random.default_rng(0)
    batches = []
    for used_inputs, used_targets in ((9, 3), (5, 2)):
        batch = {k: np.zeros((2, 32 if k.startswith("encoder_") else 16), np.int32)
                 for k in evaluate.TaskLosses._KEYS}
        batch["encoder_input_tokens"][0, :used_inputs] = rng.integers(1, 99, used_inputs)
        batch["decoder_target_tokens"][1, :used_targets] = rng.integers(1, 99, used_targets)
        batch["decoder_loss_weights"][1, :used_targets] = 1
        batches.append(batch)
    trimmed = evaluate.trim_padding(batches)
    for before, after in zip(batches, trimmed, strict=True):
        assert after["encoder_input_tokens"].shape == (2, 16)  # 9 -> 16
        assert after["decoder_target_tokens"].shape == after["decoder_loss_weights"].shape == (
            2, 8)  # 3 -> at least 8
        for key, value in after.items():
            np.testing.assert_array_equal(value, before[key][:, :value.shape[1]])
            assert not before[key][:, value.shape[1]:].any()
    assert evaluate.trim_padding(batches[:1])[0]["encoder_input_tokens"].shape == (2, 16)
    full = [dict(batches[0], encoder_input_tokens=np.ones((2, 32), np.int32))]
    assert evaluate.trim_padding(full)[0]["encoder_input_tokens"].shape == (2, 32)


def test_none_and_text_metric_values_are_not_numbers():
    """None (a metric fn's 'no value') became NaN, recorded as null beside the other metrics
    and read as a diverged model; text of digits ("12", b"3.5") became the number."""
    import seqio

    from mtjax.infer import evaluate

    for value in (None, seqio.metrics.Scalar(None), "12", b"3.5", "abc"):
        assert evaluate._scalar(value) is None, value
    assert evaluate._scalar(seqio.metrics.Scalar(2)) == 2.0
    assert np.isnan(evaluate._scalar(float("nan")))  # a NaN the metric computed stays one


def _cli(argv, capsys):
    from mtjax import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors (usage line and message)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_and_infer_commands(trained_run, tmp_path, capsys):
    scores_in = tmp_path / "pairs.jsonl"
    scores_in.write_text(json.dumps({"inputs": "copy: bada", "targets": "bada"}) + "\n"
                         + json.dumps({"inputs": "copy: bada", "targets": "zz"}) + "\n")
    out = tmp_path / "scores.jsonl"
    code, _, err = _cli(["score", "--checkpoint", str(trained_run), "--input", str(scores_in),
                         "--output", str(out), "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["num_tokens"] for r in rows] == [5, 3]  # bytes + EOS
    assert all(r["score"] < 0 for r in rows) and rows[0]["targets"] == "bada"

    lines = tmp_path / "inputs.txt"
    lines.write_text("copy: bada kilo\n" + json.dumps({"inputs": "copy: zuzu"}) + "\n")
    code, stdout, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(lines),
                              "--max-decode-length", "8", "--beam-size", "2", "--scores",
                              "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["inputs"] for r in rows] == ["copy: bada kilo", "copy: zuzu"]
    assert all(isinstance(r["prediction"], str) and len(r["prediction"].encode()) <= 8
               for r in rows)
    assert all("score" in r for r in rows)


def test_eval_command_writes_task_metric_json(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = _cli(["eval", "--checkpoint", str(trained_run), "--max-examples", "4",
                              "--max-decode-length", "8", "--output", str(out),
                              "--no-progress"], capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert json.loads(stdout) == results
    assert set(results) == {"mtjax_copy"}
    assert set(results["mtjax_copy"]) == {"exact_match", "log_likelihood", "loss",
                                          "token_accuracy"}
    code, stdout, err = _cli(["eval", "--checkpoint", str(trained_run), "--max-examples", "4",
                              "--max-decode-length", "8", "--no-loss", "--no-progress"], capsys)
    assert code == 0 and json.loads(stdout)["mtjax_copy"] == {
        k: v for k, v in results["mtjax_copy"].items() if k not in ("loss", "token_accuracy")}, err
    code, stdout, err = _cli(["eval", "--checkpoint", str(trained_run), "--split", "valdation",
                              "--no-progress"], capsys)
    assert code == 2 and not stdout and "split 'valdation'" in err, err
    assert "splits: train, validation" in err and len(err.strip().splitlines()) == 1, err

    # Tasks of another vocabulary than the model's: refused, not scored as noise.
    import seqio

    def examples(split, shuffle_files=False, seed=None):
        import tensorflow as tf

        return tf.data.Dataset.from_tensors({"inputs": [5, 6], "targets": [7]})

    features = {k: seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=300))
                for k in ("inputs", "targets")}
    seqio.TaskRegistry.add("mtjax_test_eval_vocabulary", seqio.FunctionDataSource(
        examples, splits=["validation"]), output_features=features, metric_fns=[])
    try:
        code, stdout, err = _cli(["eval", "--checkpoint", str(trained_run), "--mixture",
                                  "mtjax_test_eval_vocabulary", "--no-progress"], capsys)
    finally:
        seqio.TaskRegistry.remove("mtjax_test_eval_vocabulary")
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1, err
    assert ("'mtjax_test_eval_vocabulary' uses PassThroughVocabulary(300), and the model of "
            in err and "reads byte(259): evaluate tasks defined with the model's vocabulary"
            in err), err


@pytest.mark.parametrize("argv, message", [
    (["score", "--checkpoint", "{missing}", "--input", "{pairs}"], "does not exist"),
    (["score", "--checkpoint", "{empty}", "--input", "{pairs}"], "no complete checkpoint"),
    (["score", "--checkpoint", "{missing}", "--input", "{missing}"], "input file"),
    (["score", "--checkpoint", "{missing}", "--input", "{bad}"], "bad.jsonl:2"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--beam-size", "2",
      "--temperature", "0.5"], "--temperature"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--top-p", "0"], "--top-p"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--top-k", "5"],
     "add --temperature T"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--seed", "3"],
     "drop --seed"),
    # The length penalty of beam search, which greedy decoding ignored without a word.
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--alpha", "1.0"],
     "add --beam-size N, or drop --alpha"),
    (["eval", "--checkpoint", "{missing}", "--alpha", "1.0"],
     "add --beam-size N, or drop --alpha"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--beam-size", "2",
      "--alpha", "-1"], "--alpha must be >= 0, got -1.0"),
    (["eval", "--checkpoint", "{missing}"], "does not exist"),
    # A file (a run's config.json, a model.safetensors) is named as one, not searched "under".
    (["score", "--checkpoint", "{pairs}", "--input", "{pairs}"],
     "pairs.jsonl is a file, not a checkpoint; give a run directory"),
    # Checked before the checkpoint loads (it does not exist here).
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--output",
      "{missing}/out.jsonl"], "the directory"),
    (["score", "--checkpoint", "{missing}", "--input", "{pairs}", "--output", "{empty}"],
     "is a directory; give a file name in it"),
    (["infer", "--checkpoint", "{missing}", "--input", "{latin1}"],
     "latin1.txt:2: not UTF-8 text (byte 0xe9)"),
    (["infer", "--checkpoint", "{missing}", "--input", "{empty}"], "is a directory; give a file"),
    (["eval", "--checkpoint", "{missing}", "--beam-size", "0"], "--beam-size must be at least 1"),
    (["eval", "--checkpoint", "{missing}", "--max-examples", "-3"], "--max-examples must be"),
    # NaN passed every `value < least` check.
    (["eval", "--checkpoint", "{missing}", "--alpha", "nan"],
     "--alpha must be at least 0, got nan"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--temperature", "nan"],
     "--temperature must be a finite number, got nan"),
    (["infer", "--checkpoint", "{missing}", "--input", "{pairs}", "--max-decode-length",
      "100000000"], "--max-decode-length 100000000 is more than mtjax decodes (65536"),
    (["score", "--checkpoint", "{missing}", "--input", "{surrogate}"],
     "surrogate.jsonl:2: field 'inputs' holds a lone UTF-16 surrogate"),
    # A flag of another command is not taken for the --tasks-module it abbreviates.
    (["score", "--checkpoint", "{missing}", "--input", "{pairs}", "--task", "x"],
     "mtjax score: error: unrecognized arguments: --task x"),
])
def test_command_mistakes_exit_2_with_one_line(argv, message, tmp_path, capsys):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty",
             "pairs": tmp_path / "pairs.jsonl", "bad": tmp_path / "bad.jsonl",
             "latin1": tmp_path / "latin1.txt", "surrogate": tmp_path / "surrogate.jsonl"}
    paths["empty"].mkdir()
    paths["pairs"].write_text(json.dumps({"inputs": "a", "targets": "b"}) + "\n")
    paths["bad"].write_text(json.dumps({"inputs": "a", "targets": "b"}) + "\n{oops\n")
    paths["latin1"].write_bytes(b"fine\ncaf\xe9\n")
    paths["surrogate"].write_text('{"inputs": "a", "targets": "b"}\n'
                                  '{"inputs": "a\\ud800b", "targets": "x"}\n')
    code, _, err = _cli([a.format(**paths) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err, err
    assert len([line for line in err.strip().splitlines() if "error" in line]) == 1, err


def test_bench_decode_smoke():
    from mtjax import bench
    from mtjax.bench import decode as bench_decode
    from mtjax.bench.train import BenchOptions

    config = bench.config_lib.load(None, [*bench.SMOKE_OVERRIDES, "data.inputs_length=8",
                                          "data.targets_length=4"])
    result = bench_decode.run(config, BenchOptions(steps=1, warmup=0))
    assert [c["case"] for c in result["cases"]] == ["greedy_b1", "greedy_b64", "beam4_b1",
                                                   "beam4_b64"]
    assert all(c["tokens_per_s"] > 0 for c in result["cases"])
    assert result["model"] == "t5_1_1_test" and result["num_params"] == sizes.count_params(BASE)
    assert (result["mesh"], result["mesh_rules"]) == ({"data": 1, "fsdp": 1, "tensor": 1},
                                                      config.mesh.rules)


def test_infer_with_a_task_checks_the_fields_its_source_yields(trained_run, tmp_path, capsys):
    """--task runs the task's preprocessing on each record: a record without the fields the
    task's data source yields is one line naming them (exit 2), not a TensorFlow traceback."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"inputs": "bada"}) + "\n")
    code, stdout, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(good),
                              "--task", "mtjax_copy", "--max-decode-length", "6",
                              "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["inputs"] == "bada"
    for record, problem in (({"text": "bada"}, "input record 1 lacks field 'inputs'"),
                            ({"inputs": 3}, "input record 1 has a wrongly typed field 'inputs'")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(record) + "\n")
        code, _, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(bad),
                             "--task", "mtjax_copy", "--no-progress"], capsys)
        assert code == 2 and problem in err and "'mtjax_copy' reads 'inputs' (string)" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('copy: ok\n{"inputs": "add: 3 +\n')
    code, _, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(broken),
                         "--no-progress"], capsys)
    assert code == 2 and f"{broken}:2: not a JSON object" in err, err
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"inputs": 3}) + "\n")
    code, _, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(plain),
                         "--no-progress"], capsys)
    assert code == 2 and "non-string field 'inputs'" in err, err


def test_outputs_are_replaced_whole_or_not_at_all(trained_run, tmp_path, capsys):
    """A failure half-way (here: record 3 is bad for the task) leaves --output as it was, even
    when it is the input; a good run replaces it; a byte-order mark is not part of line 1."""
    records = tmp_path / "records.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in ({"inputs": "bada"}, {"inputs": "kilo"},
                                                  {"inputs": 5}))
    records.write_text(text)
    code, _, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(records),
                         "--task", "mtjax_copy", "--batch-size", "1", "--output", str(records),
                         "--max-decode-length", "4", "--no-progress"], capsys)
    assert code == 2 and "input record 3 has a wrongly typed field 'inputs'" in err, err
    assert records.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]  # no partial file

    records.write_bytes("\ufeff".encode() + text.rsplit("{", 1)[0].encode())  # BOM, 2 records
    records.chmod(0o640)
    code, _, err = _cli(["infer", "--checkpoint", str(trained_run), "--input", str(records),
                         "--output", str(records), "--max-decode-length", "4", "--no-progress"],
                        capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["inputs"] for r in rows] == ["bada", "kilo"]
    assert records.stat().st_mode & 0o777 == 0o640

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = _cli(["score", "--checkpoint", str(trained_run), "--input", str(empty),
                         "--output", str(tmp_path / "none.jsonl"), "--no-progress"], capsys)
    assert code == 0 and "holds no records" in err, err
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_a_reader_that_stops_early_ends_infer_quietly(trained_run, tmp_path):
    import subprocess
    import sys

    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"copy: w{i}\n" for i in range(6)))
    proc = subprocess.run(
        f"{sys.executable} -m mtjax infer --checkpoint {trained_run} --input {lines} "
        f"--batch-size 1 --max-decode-length 4 --no-progress | head -1",
        shell=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    assert len(proc.stdout.splitlines()) == 1 and json.loads(proc.stdout)["inputs"] == "copy: w0"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_infer_refuses_a_task_of_another_vocabulary_than_the_models():
    """`infer --task` with a task whose vocabulary is not the checkpoint's fed the model ids of
    other pieces and printed noise without a word; `mtjax eval` refuses such tasks already."""
    import types

    import seqio

    from mtjax.data import vocab as vocab_lib
    from mtjax.errors import UserError
    from mtjax.infer import records

    def examples(split, shuffle_files=False, seed=None):
        import tensorflow as tf

        return tf.data.Dataset.from_tensors({"inputs": "a", "targets": "b"})

    features = {k: seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=300))
                for k in ("inputs", "targets")}
    seqio.TaskRegistry.add("mtjax_test_infer_vocabulary", seqio.FunctionDataSource(
        examples, splits=["validation"]), output_features=features)
    model = types.SimpleNamespace(vocabulary=vocab_lib.get_vocabulary("byte"),
                                  step_dir=pathlib.Path("run/checkpoints/20"))
    try:
        with pytest.raises(UserError, match=r"--task 'mtjax_test_infer_vocabulary' uses "
                           r"PassThroughVocabulary\(300\), and the model of run/checkpoints/20 "
                           r"reads byte\(259\)"):
            next(records.predict(model, [{"inputs": "a"}], DecodeOptions(),
                                 task="mtjax_test_infer_vocabulary"))
    finally:
        seqio.TaskRegistry.remove("mtjax_test_infer_vocabulary")


def test_a_record_whose_number_the_source_cannot_hold_is_one_line():
    """A fraction in a field the task's source yields as an integer (or a number where it
    yields a bool) was a TensorFlow TypeError traceback, not the record's line."""
    import seqio
    import tensorflow as tf

    from mtjax.data import vocab as vocab_lib
    from mtjax.infer import records

    def examples(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensors({"inputs": "a", "label": tf.constant(3, tf.int64),
                                             "flag": tf.constant(True)})

    byte = vocab_lib.get_vocabulary("byte")
    seqio.TaskRegistry.add(
        "mtjax_test_numeric_fields", seqio.FunctionDataSource(examples, splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={k: seqio.Feature(byte) for k in ("inputs", "targets")})
    try:
        task = records.TaskText("mtjax_test_numeric_fields")
        good = {"inputs": "a", "label": 4, "flag": False}
        assert task.encode([good])[0] == [list(byte.encode("a"))]
        for number, field, value in ((2, "label", 1.5), (3, "flag", 2)):
            with pytest.raises(records.InputError, match=f"input record {number} has a wrongly "
                               f"typed field '{field}'"):
                task.encode([good, {**good, field: value}], first=number - 1)
    finally:
        seqio.TaskRegistry.remove("mtjax_test_numeric_fields")


def test_a_task_whose_source_yields_lines_takes_the_line(tmp_path):
    """A seqio.TextLineDataSource yields bare strings, not a dict of fields: --task takes the
    record's text line (or its `text` field) as that string (it was an AttributeError)."""
    import seqio
    import tensorflow as tf

    from mtjax.data import vocab as vocab_lib
    from mtjax.errors import UserError
    from mtjax.infer import records

    (tmp_path / "upper.tsv").write_text("one\tONE\n")

    @seqio.map_over_dataset
    def parse(line):
        inputs, targets = tf.io.decode_csv(line, record_defaults=["", ""], field_delim="\t",
                                           use_quote_delim=False)
        return {"inputs": "upper: " + inputs, "targets": targets}

    byte = vocab_lib.get_vocabulary("byte")
    seqio.TaskRegistry.remove("t_lines")
    seqio.TaskRegistry.add(
        "t_lines", source=seqio.TextLineDataSource({"train": str(tmp_path / "upper.tsv")}),
        preprocessors=[parse, seqio.preprocessors.tokenize],
        output_features={k: seqio.Feature(byte) for k in ("inputs", "targets")})
    task = records.TaskText("t_lines")
    ids, examples = task.encode([{"inputs": "two\t"}, {"text": "three\tTHREE"}])
    assert [ex["inputs_pretokenized"] for ex in examples] == [b"upper: two", b"upper: three"]
    assert ids[0] == list(byte.encode("upper: two"))
    with pytest.raises(UserError, match="input record 4 has no text: task 't_lines' reads "
                                        "lines"):
        task.encode([{"question": "x"}], first=4)


def test_a_tasks_module_given_replaces_the_one_the_run_recorded(tmp_path, monkeypatch, capsys):
    """--tasks-module (help: "default: the one the run was trained with") was imported beside
    the module the run recorded, so once that file had moved every command stopped with "tasks
    module file '.../my_tasks.py' does not exist", whatever --tasks-module named."""
    from mtjax import cli

    byt5 = pathlib.Path(__file__).parent / "fixtures" / "hf_t5" / "byt5"
    assert cli.main(["convert", str(byt5), str(tmp_path / "ckpt")]) == 0
    read = load_lib.read_config
    moved = str(tmp_path / "moved" / "my_tasks.py")

    def recorded_where_it_was(step_dir):
        config = read(step_dir)
        return dataclasses.replace(
            config, data=dataclasses.replace(config.data, tasks_module=moved))

    monkeypatch.setattr(load_lib, "read_config", recorded_where_it_was)
    (tmp_path / "qa_tasks_now_here.py").write_text("")
    (tmp_path / "in.jsonl").write_text('{"inputs": "a", "targets": "b"}\n')
    capsys.readouterr()
    assert cli.main(["score", "--checkpoint", str(tmp_path / "ckpt"), "--no-progress",
                     "--input", str(tmp_path / "in.jsonl"),
                     "--tasks-module", str(tmp_path / "qa_tasks_now_here.py")]) == 0, (
        capsys.readouterr().err)
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 2
    # Without it, the error says whose module is missing and what to give.
    assert cli.main(["score", "--checkpoint", str(tmp_path / "ckpt"), "--no-progress",
                     "--input", str(tmp_path / "in.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"tasks module file '{moved}' does not exist (the run's data.tasks_module)" in err
    assert "give its new place with --tasks-module" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["--input", "--checkpoint"])
def test_a_file_one_host_lacks_stops_every_host_of_infer(trained_run, tmp_path, missing):
    """`mtjax infer` as two processes of one multi-host run, where process 1 is given a file
    that does not exist: both stop with one line and exit code 2. Before, a missing --input
    left process 0 waiting 300 s for process 1 in jax.distributed's start, then aborting."""
    import socket
    import subprocess
    import sys

    good = tmp_path / "inputs.jsonl"
    good.write_text('{"inputs": "copy: a b c"}\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for process_id in (0, 1):
        paths = {"--input": good, "--checkpoint": trained_run}
        if process_id == 1:
            paths[missing] = tmp_path / "not_on_this_host"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
                   MTJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MTJAX_NUM_PROCESSES="2",
                   MTJAX_PROCESS_ID=str(process_id))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mtjax", "infer", "--no-progress",
             *(str(x) for pair in paths.items() for x in pair)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            p.kill()  # where one waits for the other (the failure): leave no process behind
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert "process(es) 1 stopped in set-up" in err0, err0[-2000:]
    assert "not_on_this_host" in err1, err1[-2000:]
    for err in (err0, err1):
        assert "Traceback" not in err, err[-3000:]


CACHE_WARNING_CODE = r"""
import gc, sys
import seqio
from mtjax.data import builtin  # registers mtjax_kb_qa_only (800 validation examples, sized)
from mtjax.infer import evaluate

def build(make):
    make()
    gc.collect()  # TensorFlow logs the warning when the partly read iterator is destroyed
    sys.stderr.flush()

build(lambda: seqio.Evaluator("mtjax_kb_qa_only", seqio.EncDecFeatureConverter(pack=False),
                              eval_split="validation", num_examples=4, use_memory_cache=True))
print("--- mtjax ---", file=sys.stderr, flush=True)
ev = evaluate.seqio_evaluator("mtjax_kb_qa_only", "validation", 4, None)
gc.collect()
print(sum(1 for _ in ev._cached_model_datasets["mtjax_kb_qa"]))
"""


def test_evaluating_part_of_a_small_split_prints_no_tensorflow_cache_warning(subprocess_python):
    """seqio caches a split of known size under 10,000 examples in memory before the evaluator
    takes eval.max_examples of it; the partial read printed "did not fully read the dataset
    being cached" at the end of every run. The plain seqio.Evaluator is the control."""
    proc = subprocess_python(CACHE_WARNING_CODE, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    control, ours = proc.stderr.split("--- mtjax ---")
    assert "did not fully read the dataset being cached" in control
    assert "did not fully read" not in ours
    assert proc.stdout.split() == ["4"]


def test_lines_end_at_newlines_only(tmp_path):
    """str.splitlines() also broke at U+2028, U+0085 and form feeds: a JSON string holding one
    raw (as infer and score write it) became a malformed line, and a text line two inputs."""
    from mtjax.infer import records

    path = tmp_path / "in.txt"
    path.write_text('{"inputs": "a\u2028b", "targets": "x"}\r\npage one\fpage two\n'
                    'nel\x85here\n', encoding="utf-8")
    got = records.read_records(str(path), allow_text=True)
    assert [r["inputs"] for r in got] == ["a\u2028b", "page one\fpage two", "nel\x85here"]


def test_an_output_through_a_symlink_or_into_a_fifo_is_written_there(tmp_path):
    """os.replace swapped the link itself, or the device or FIFO, for a new regular file (as
    root, --output /dev/null would have replaced the system's /dev/null)."""
    import stat
    import threading

    from mtjax import outputs

    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    outputs.write_text(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    outputs.write_text(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert received == ["through the pipe\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    # /dev/stdout is a link to /proc/self/fd/1: into a pipe, its target resolves to a name
    # that does not exist ("pipe:[N]"), so it is written as given.
    stdout_like = tmp_path / "stdout"
    stdout_like.symlink_to(fifo)
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    outputs.write_text(stdout_like, "again\n")
    reader.join(timeout=10)
    assert received[-1] == "again\n"
    # A link into a directory that does not exist: one line, as for the path itself.
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "missing" / "x.jsonl")
    with pytest.raises(outputs.OutputError, match="does not exist; create it first"):
        outputs.write_text(dangling, "x\n")


def test_task_preprocessing_noise_does_not_depend_on_the_batch_size(trained_run):
    """Span corruption was seeded afresh for every batch, so a record's corruption (and its
    prediction) depended on its place in its batch: --batch-size changed the output."""
    from mtjax.infer import records

    model = load_lib.load(trained_run)
    texts = ["the quick brown fox jumps over the lazy dog"] * 3 + [
        "pack my box with five dozen liquor jugs"] * 2
    options = DecodeOptions(max_decode_length=8)
    outs = [list(records.predict(model, [{"targets": t} for t in texts], options,
                                 batch_size=size, task="mtjax_span_corruption"))
            for size in (1, 2, 8)]
    assert outs[0] == outs[1] == outs[2]
    assert len({o["inputs"] for o in outs[0][:3]}) > 1  # each record its own noise


def test_a_batch_too_large_for_memory_is_one_line(trained_run, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED came out as a traceback (a 40,000-character input asked for
    2 TB at batch 32)."""
    from mtjax.infer import records

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2234993607064 bytes.")

    monkeypatch.setattr(Decoder, "__call__", out_of_memory)
    model = load_lib.load(trained_run)
    with pytest.raises(records.InputError, match=r"out of memory on records 1-2 \(inputs of up "
                                                 r"to 47 tokens, 8 decoded tokens, batches of 2 "
                                                 r"rows\): lower --batch-size, shorten the "
                                                 r"longest inputs, or lower --max-decode"):
        list(records.predict(model, [{"inputs": "copy: " + "x" * 40}, {"inputs": "y"}],
                             DecodeOptions(max_decode_length=8), batch_size=4))


def test_a_few_records_are_not_padded_to_a_large_batch_size(trained_run, monkeypatch):
    """Rows are padded to --batch-size: 4 lines at --batch-size 8192 decoded 8192 rows."""
    from mtjax.infer import records

    sizes = []
    decode = Decoder.__call__

    def recording(self, params, tokens_BS, options, *, batch_size, **kwargs):
        sizes.append(batch_size)
        return decode(self, params, tokens_BS, options, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(Decoder, "__call__", recording)
    model = load_lib.load(trained_run)
    texts = [{"inputs": f"copy: {w}"} for w in ("a", "b", "c")]
    options = DecodeOptions(max_decode_length=8)
    small = list(records.predict(model, texts, options, batch_size=8192))
    assert sizes == [4]
    assert small == list(records.predict(model, texts, options, batch_size=2))


INFER_CODE = """
import sys
from mtjax.cli import main
sys.exit(main(["infer", "--checkpoint", sys.argv[1], "--input", sys.argv[2],
               "--max-decode-length", "6", "--no-progress"]))
"""


MESH_THEN_INFER_CODE = """
import json, sys
from mtjax.cli import main
from mtjax.infer import load
print(json.dumps(dict(load.load(sys.argv[1]).mesh.shape)), file=sys.stderr)
sys.exit(main(["infer", "--checkpoint", sys.argv[1], "--input", sys.argv[2],
               "--max-decode-length", "6", "--no-progress"]))
"""


def test_a_device_count_that_does_not_split_the_model_still_infers(trained_run, tmp_path,
                                                                   subprocess_python):
    """On 3 devices the run's mesh (fsdp=-1) is fsdp=3, which cannot split t5_1_1_test's
    32-wide embedding: the loader places the parameters whole on each device (data=3) instead
    of failing with Orbax's tiling error and a hint about --init-from. On 6 devices fsdp=2
    splits it, and is taken over data=6 (which held the whole model on every device)."""
    inputs = tmp_path / "in.txt"
    inputs.write_text("abc\nhello world\nxyz\n")
    runs = {n: subprocess_python(MESH_THEN_INFER_CODE, trained_run, inputs, devices=n)
            for n in (1, 3, 6)}
    meshes = {n: next(json.loads(line) for line in run.stderr.splitlines()
                      if line.startswith('{"data"')) for n, run in runs.items()}
    assert meshes[3] == {"data": 3, "fsdp": 1, "tensor": 1}
    assert meshes[6] == {"data": 3, "fsdp": 2, "tensor": 1}
    assert len(runs[1].stdout.splitlines()) == 3
    assert runs[3].stdout == runs[1].stdout and runs[6].stdout == runs[1].stdout


UNLAYABLE_SPLIT_CODE = """
import json, sys
from jax.experimental import mesh_utils
from mtjax.infer import load

made = []
create = mesh_utils.create_device_mesh

def like_a_tpu_torus(shape, *args, **kwargs):
    # What a TPU v5e 4x4 answers for data=2, fsdp=8 (no 8-chip ring): here data=2, fsdp=3.
    made.append(list(shape))
    if tuple(shape) == (2, 3, 1):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 1")
    return create(shape, *args, **kwargs)

mesh_utils.create_device_mesh = like_a_tpu_torus
print(json.dumps({"mesh": dict(load.load(sys.argv[1]).mesh.shape), "made": made}))
"""


def test_a_split_the_chips_cannot_lay_out_is_passed_over(trained_run, subprocess_python):
    """On a TPU, JAX cannot lay some data x fsdp splits over the chips' torus (4x4: no data=2,
    fsdp=8). All candidates were built before the first was tried, so such a split made every
    load fail, even where the run's own mesh fitted; now meshes are built in turn until one
    splits the model, and one that cannot be laid out is passed over."""
    out = json.loads(subprocess_python(UNLAYABLE_SPLIT_CODE, trained_run, devices=6).stdout)
    # fsdp=6 does not split the 32-wide model, data=2 x fsdp=3 cannot be laid out: data=3 x 2.
    assert out["mesh"] == {"data": 3, "fsdp": 2, "tensor": 1}
    assert out["made"] == [[1, 6, 1], [1, 6, 1], [2, 3, 1], [3, 2, 1]]  # none beyond it


def test_a_sigterm_half_way_leaves_the_output_and_no_partial_file(trained_run, tmp_path):
    """SIGTERM (what a scheduler sends) ended infer at once: the output was kept, but its
    hidden `.out.jsonl.*.partial` stayed beside it."""
    inputs = tmp_path / "in.txt"
    inputs.write_text("".join(f"copy: line {i}\n" for i in range(20000)))
    output = tmp_path / "out.jsonl"
    output.write_text("ORIGINAL\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtjax", "infer", "--checkpoint", str(trained_run), "--input",
         str(inputs), "--output", str(output), "--beam-size", "4", "--batch-size", "8",
         "--no-progress"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.jsonl.*.partial")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(1)
    assert proc.poll() is None, "infer ended before the signal: give it more input"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # Ended by the signal, as without mtjax's handler (a SystemExit(143) raised mid-decoding
    # crashed the interpreter's shutdown with SIGSEGV now and then).
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-2000:])
    assert output.read_text() == "ORIGINAL\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.jsonl"]


SIGTERM_UNDER_JAX_PREEMPTION = """
import os, signal, socket, sys, tempfile, time
import jax
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=1,
                           process_id=0)
from jax._src import distributed
from mtjax import outputs
outputs.write_text(os.path.join(tempfile.mkdtemp(), "x.json"), "{}\\n")
os.kill(os.getpid(), signal.SIGTERM)
# The notice reaches the sync point through the coordination service: a step or a few later.
manager, noticed = distributed.global_state.preemption_sync_manager, False
for step in range(300):
    if manager.reached_sync_point(step):
        noticed = True
        break
    time.sleep(0.1)
print("noticed", noticed)
"""


def test_an_output_written_under_jax_preemption_service_keeps_its_sigterm_handler(tmp_path):
    """JAX's preemption service (a multi-host run) takes SIGTERM in C++, which Python's
    signal.getsignal does not see (it says SIG_DFL): writing an output installed mtjax's
    handler over it and then set SIG_DFL, so the next SIGTERM killed the process instead of
    reaching the preemption sync point."""
    script = tmp_path / "probe.py"
    script.write_text(SIGTERM_UNDER_JAX_PREEMPTION)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                            "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "noticed True" in proc.stdout


RULES_ON_DATA_CODE = """
import sys
from mtjax.checkpoint import CheckpointError
from mtjax.infer import load
from mtjax.parallel import mesh as mesh_lib
try:
    load.load(sys.argv[1], rules=mesh_lib.get_rules("embed=data,mlp=fsdp"))
except CheckpointError as e:
    print(e)
"""


def test_parameters_that_no_mesh_splits_are_one_clear_error(trained_run, subprocess_python):
    """On 3 devices, rules with the 32-wide embedding on data and the 64-wide MLP on fsdp split
    over neither data=3 nor fsdp=3: one message, not Orbax's tiling error."""
    message = subprocess_python(RULES_ON_DATA_CODE, trained_run, devices=3).stdout
    assert "split evenly over no data x fsdp mesh of the 3 devices" in message
    assert "mesh.rules" in message


def test_an_eval_decode_length_past_the_decoders_limit_is_refused_with_the_config():
    """eval.max_decode_length took up to 2**20 while decoding refuses more than 65536: a run
    with 70000 trained until its first evaluation and stopped there."""
    from mtjax import config as config_lib
    from mtjax.infer.decode import MAX_DECODE_LENGTH

    longest = config_lib.load(None, [f"eval.max_decode_length={MAX_DECODE_LENGTH}"])
    DecodeOptions(max_decode_length=longest.eval.max_decode_length)  # the decoder takes it
    with pytest.raises(config_lib.ConfigError, match=r"'eval.max_decode_length'.*at most 65536"):
        config_lib.load(None, [f"eval.max_decode_length={MAX_DECODE_LENGTH + 1}"])


def test_a_metric_of_predictions_and_aux_values_gets_the_decoding_scores(tmp_path):
    """seqio's third kind of metric function, ``(targets, predictions, aux_values)`` (T5X passes
    ``{"scores": ...}``), stopped every evaluation with seqio's KeyError
    PREDICTION_WITH_AUX: mtjax gave seqio no predict_with_aux_fn."""
    from mtjax import config as config_lib
    from mtjax.data import tasks
    from mtjax.infer import evaluate

    rows = [("copy: ab", "ab"), ("copy: cd", "cd"), ("copy: e", "e")]
    (tmp_path / "v.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in rows))
    seen = {}

    def with_aux(targets, predictions, aux_values):
        seen.update(targets=list(targets), predictions=list(predictions), **aux_values)
        return {"examples": len(predictions)}

    tasks.add_file_task("t_aux_metric", {"train": str(tmp_path / "v.tsv"),
                                         "validation": str(tmp_path / "v.tsv")},
                        vocabulary="byte", metric_fns=[with_aux])
    m = Tiny(dataclasses.replace(BASE, vocab_size=384))
    config = config_lib.load(None, ["data.mixture=t_aux_metric", "eval.batch_size=2",
                                    "eval.max_decode_length=3", "eval.loss=false"])
    evaluator = evaluate.make_evaluator(config, m.mesh, m.rules, m.model_def)
    assert evaluator(m.params, step=0) == {"t_aux_metric": {"examples": 3.0}}
    assert seen["targets"] == [t for _, t in rows] and len(seen["predictions"]) == 3
    # The scores of the predictions, in the examples' order (byte ids are the byte + 3).
    enc = batching.pad_ids([[b + 3 for b in i.encode()] + [1] for i, _ in rows], 9)
    _, scores = m.decoder(m.params, enc, DecodeOptions(max_decode_length=3))
    np.testing.assert_allclose(seen["scores"], scores, rtol=1e-5)


def test_eval_refuses_a_decode_length_past_the_decoders_limit_by_its_flag(tmp_path, capsys):
    """--max-decode-length 100000 was checked against no upper bound before the checkpoint
    loaded, and then refused as the config key eval.max_decode_length."""
    code, _, err = _cli(["eval", "--checkpoint", str(tmp_path / "nope"),
                         "--max-decode-length", "100000"], capsys)
    assert code == 2
    assert "--max-decode-length 100000 is more than mtjax decodes (65536" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["infer", "--input", "{lines}", "--task", "mtjax_cpoy"], "Did you mean: mtjax_copy"),
    (["infer", "--input", "{lines}", "--task", "mtjax_kb"], "'mtjax_kb' is a mixture"),
    (["eval", "--mixture", "mtjax_cpoy"], "Did you mean: mtjax_copy"),
])
def test_an_unknown_task_or_mixture_fails_before_the_checkpoint_loads(
        trained_run, tmp_path, capsys, monkeypatch, argv, message):
    """A misspelt --task or --mixture was found only once the parameters were loaded (minutes,
    for a large model), and infer's after its compile bar had started."""
    lines = tmp_path / "inputs.txt"
    lines.write_text("copy: bada\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(load_lib, "load", no_loading)
    argv = [a.format(lines=lines) for a in argv]
    code, stdout, err = _cli([*argv, "--checkpoint", str(trained_run)], capsys)
    assert code == 2 and not stdout and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_seed_beyond_64_bits_is_one_line_before_the_checkpoint_loads(tmp_path, capsys):
    """--seed 2**63 passed every check and stopped in jax.random.key with an OverflowError
    traceback, after the checkpoint had loaded."""
    lines = tmp_path / "inputs.txt"
    lines.write_text("copy: bada\n")
    for seed in (2**63, -(2**63)):
        code, stdout, err = _cli(["infer", "--checkpoint", str(tmp_path / "nope"), "--input",
                                  str(lines), "--temperature", "1", "--seed", str(seed)], capsys)
        assert code == 2 and not stdout, err
        assert err.strip().splitlines() == [
            f"mtjax: error: --seed must be between -{2**63 - 1} and {2**63 - 1} (as train.seed), "
            f"got {seed}"], err
    DecodeOptions(temperature=1.0, seed=2**63 - 1)  # the largest one JAX takes is fine


def test_an_output_whose_disk_is_full_is_one_line_and_left_as_it_was(tmp_path, monkeypatch):
    """A full disk while writing --output (its write, flush or fsync) ended in a traceback
    (exit 1) after all the work; the file that was there stays, and no partial file."""
    import errno

    from mtjax import outputs

    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(outputs.OutputError, match=r"^--output '.*out.jsonl' could not be written "
                       r"\(No space left on device\); it was left as it was: free space there, "
                       r"or give a path on another disk$"):
        outputs.write_text(target, "new\n")
    monkeypatch.undo()
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        with outputs.replaced_on_success(target) as out:
            out.write("new\n")
            full()
    # Another failure of the block is its own (e.g. reading its input), not the output's.
    with pytest.raises(FileNotFoundError):
        with outputs.replaced_on_success(target) as out:
            open(tmp_path / "missing")  # noqa: SIM115
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_an_output_past_a_real_size_limit_is_one_line_and_left_as_it_was(tmp_path):
    """A write that really fails (here a file size limit, EFBIG, as a full disk fails) leaves
    its text in the file object's buffer, and closing the file wrote it again: that second
    OSError stood in for the one-line error, a traceback."""
    code = (
        "import pathlib, resource, sys\n"
        "from mtjax import outputs\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE,\n"
        "                   (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "target = pathlib.Path(sys.argv[1])\n"
        "for text in ('x' * 6000, 'y' * 100_000):  # fails at the flush, and in the block\n"
        "    try:\n"
        "        outputs.write_text(target, text)\n"
        "    except outputs.OutputError as e:\n"
        "        print(e)\n")
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                            text=True, timeout=60, cwd=pathlib.Path(__file__).parent.parent)
    line = (f"--output {str(target)!r} could not be written (File too large); it was left as "
            f"it was: free space there, or give a path on another disk")
    assert result.stdout.splitlines() == [line, line], result.stdout + result.stderr
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
