"""The host input pipeline: a SeqIO mixture -> packed numpy batches with per-token task ids."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mtjax.data import files as files_lib
from mtjax.data import mixing as mixing_lib
from mtjax.data import packing, quiet
from mtjax.data import vocab as vocab_lib
from mtjax.errors import InputPositionMismatch, UserError

# Keys of every batch, each an int32 array [batch_size, length].
BATCH_KEYS = (
    "encoder_input_tokens",  # [B, L_enc] input token ids, 0 = padding
    "encoder_segment_ids",  # [B, L_enc] 1, 2, ... per packed example, 0 = padding
    "encoder_positions",  # [B, L_enc] position within its example, 0 on padding
    "decoder_target_tokens",  # [B, L_dec] target ids (with EOS), 0 = padding
    "decoder_input_tokens",  # [B, L_dec] targets shifted right, 0 (BOS) at each example start
    "decoder_loss_weights",  # [B, L_dec] 1 on target tokens, 0 on padding
    "decoder_segment_ids",  # [B, L_dec] as encoder_segment_ids; equal ids pair up across sides
    "decoder_positions",  # [B, L_dec] position within its example
    "decoder_task_ids",  # [B, L_dec] i + 1 for task_names[i], 0 on padding
)

# Beside the iterator in a saved position: the mixture's tasks, which a restore compares.
MIXTURE_FILE = "mixture.json"


class UnknownTaskError(UserError, ValueError):
    """A task or mixture name that neither seqio registry knows."""


class DataError(UserError, ValueError):
    """A task that cannot feed the run (features, split, data); the message names the task."""


class VocabularyMismatchError(DataError):
    """Tasks of a mixture, or the mixture and data.vocabulary, disagree on the vocabulary."""


def lookup(name: str) -> seqio.Task | seqio.Mixture:
    """Returns the registered task or mixture, or raises UnknownTaskError with suggestions."""
    tasks, mixtures = seqio.TaskRegistry.names(), seqio.MixtureRegistry.names()
    if name in mixtures:
        return seqio.MixtureRegistry.get(name)
    if name in tasks:
        return seqio.TaskRegistry.get(name)
    known = mixing_lib.registered_names()
    close = mixing_lib.similar_names(name, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownTaskError(
        f"Unknown task or mixture {name!r}.{hint} If it is your own task, pass the module that "
        f"registers it with --tasks-module. Registered: {len(known)} names "
        f"(e.g. {', '.join(known[:8])})."
    )


def resolve_task_names(mixture: str) -> list[str]:
    """The tasks of a mixture (flattened, sorted by name) or [mixture] for a task.

    Raises:
        UnknownTaskError: the name is not registered.
    """
    provider = lookup(mixture)
    return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [mixture]


def eval_mixture(config: Any) -> str:
    """The task or mixture a run evaluates: ``eval.mixture``, else ``data.mixture``."""
    return config.eval.mixture or config.data.mixture


def mixture_vocabulary(mixture: str, configured: str | None = None) -> seqio.Vocabulary:
    """The vocabulary the tasks of ``mixture`` share (checked against ``configured``, a
    ``data.vocabulary``).

    Raises:
        UnknownTaskError: ``mixture`` is not registered.
        VocabularyMismatchError: its tasks disagree, or disagree with ``configured``.
    """
    return _shared_vocabulary(mixture, [seqio.TaskRegistry.get(n)
                                        for n in resolve_task_names(mixture)], configured)


def check_eval_mixture(config: Any) -> None:
    """An ``eval.mixture`` of its own must be registered and share the training vocabulary
    (the model would decode its tasks' ids as other pieces); after :func:`prepare`.

    Raises:
        UnknownTaskError, VocabularyMismatchError: naming ``eval.mixture``.
    """
    if eval_mixture(config) == config.data.mixture:
        return
    try:
        evaluated = mixture_vocabulary(config.eval.mixture)
    except UnknownTaskError as e:
        raise UnknownTaskError(f"eval.mixture: {e}") from None
    trained = mixture_vocabulary(config.data.mixture, config.data.vocabulary)
    if evaluated != trained:
        raise VocabularyMismatchError(
            f"eval.mixture={config.eval.mixture!r} uses {vocab_lib.describe(evaluated)}, and "
            f"the model learns {vocab_lib.describe(trained)} from data.mixture="
            f"{config.data.mixture!r}: evaluate tasks defined with the training vocabulary")


def check_eval_split(config: Any) -> None:
    """Refuse an eval.split that no task with metrics has (a typo), with the other set-up
    checks (``train`` and ``train --dry-run``): as a note the run trained without the
    evaluation asked for, and found after the workdir was written it left a config.json in a
    new run directory.

    Raises:
        ConfigError: naming ``eval.split`` and the splits there are.
    """
    if not (config.eval.every_steps or config.eval.at_end):
        return
    from mtjax.config import ConfigError

    # The tasks the evaluator takes (infer.evaluate.seqio_evaluators), before their split.
    mixture = eval_mixture(config)
    scored = [t for t in seqio.get_subtasks(seqio.get_mixture_or_task(mixture))
              if t.metric_fns or t.metric_objs]
    if scored and not any(config.eval.split in t.splits for t in scored):
        splits = sorted({s for t in scored for s in t.splits})
        raise ConfigError(
            f"eval.split={config.eval.split!r}: no task of {mixture} with metrics "
            f"has that split (they have: {', '.join(splits)}); fix eval.split, or set "
            f"eval.at_end=false eval.every_steps=0 to train without evaluating")


class TaskIdEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """`EncDecFeatureConverter` that also packs a per-token `task_ids` feature, first-fit.

    Each task example carries `task_ids`, an int32 sequence as long as `targets`, filled with
    the task's index + 1. It is trimmed and packed together with `targets` (seqio packs all
    features of an example at the same offsets), so every decoder token keeps its task's id,
    and comes out as `decoder_task_ids`, 0 on padding.

    Example (pack=True, task_feature_lengths {"inputs": 10, "targets": 7, "task_ids": 7}):

        ds = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1], "task_ids": [2, 2, 2]},
              {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1], "task_ids": [1, 1]}]

        converted_ds = [{
             "encoder_input_tokens": [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
              "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
                "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
            "decoder_target_tokens": [3, 9, 1, 4, 1, 0, 0],
             "decoder_input_tokens": [0, 3, 9, 0, 4, 0, 0],
             "decoder_loss_weights": [1, 1, 1, 1, 1, 0, 0],
              "decoder_segment_ids": [1, 1, 1, 2, 2, 0, 0],
                "decoder_positions": [0, 1, 2, 0, 1, 0, 0],
                 "decoder_task_ids": [2, 2, 2, 1, 1, 0, 0],
        }]

    With pack=False each row holds one example, padded; only the first five keys and
    `decoder_task_ids` are produced (InputPipeline fills in the segment and position keys).
    """

    TASK_FEATURES = {
        **seqio.EncDecFeatureConverter.TASK_FEATURES,
        "task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "decoder_task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def _pack_or_pad(self, ds: tf.data.Dataset, packed_lengths: Mapping[str, int]):
        # First-fit into several open rows instead of seqio's one: same format, fuller rows.
        if self.pack:
            return packing.first_fit_pack(ds, packed_lengths)
        return super()._pack_or_pad(ds, packed_lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        # The packer also made task_ids_segment_ids/_positions; they equal the targets' ones.
        return {**super()._convert_example(features), "decoder_task_ids": features["task_ids"]}

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        if task_feature_lengths["task_ids"] != task_feature_lengths["targets"]:
            raise ValueError(f"task_ids must be as long as targets: {task_feature_lengths}")
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_task_ids"] = task_feature_lengths["task_ids"]
        return lengths


def _add_unpacked_segments(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Unpacked rows: segment id 1 on tokens, 0 on padding; positions count from 0."""
    for side, tokens in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
        mask = tf.cast(ex[tokens] != 0, tf.int32)
        ex[f"{side}_segment_ids"] = mask
        ex[f"{side}_positions"] = tf.range(tf.shape(mask)[-1], dtype=tf.int32) * mask
    return ex


class InputPipeline:
    """Per-host stream of batches from a seqio mixture (or task), checkpointable.

    Attributes:
        task_names: tasks of the mixture; `decoder_task_ids` == i + 1 means task_names[i].
        vocab_size: the raw size of the mixture's output vocabulary.
        vocabulary: that seqio vocabulary; `vocabulary_id` names it (`vocab.describe`).
        rates: normalized sampling rate per task name, under the `mixing` strategy.
        num_examples: examples of each task's split (None where the source cannot tell).
        output_shapes: shape of every batch key, (batch_size, length).
    """

    def __init__(
        self,
        mixture: str,
        *,
        inputs_length: int,
        targets_length: int,
        batch_size: int,
        pack: bool = True,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        split: str = "train",
        mixing: str = "mixture",
        mixing_cap: int | None = None,
        mixing_temperature: float = 2.0,
        vocabulary: str | None = None,
    ):
        self.task_names = resolve_task_names(mixture)
        tasks = [seqio.TaskRegistry.get(n) for n in self.task_names]
        for task in tasks:
            check_task(task, split)
        self.vocabulary = _shared_vocabulary(mixture, tasks, vocabulary)
        self.vocab_size = self.vocabulary.vocab_size
        self.vocabulary_id = vocab_lib.describe(self.vocabulary)
        self.mixture, self.mixing, self.split = mixture, mixing, split
        self._shard_index, self._num_shards = shard_index, num_shards
        self.num_examples = {t.name: mixing_lib.num_examples(t, split) for t in tasks}
        for task in tasks:  # before the rates: an empty split is the error to report
            if self.num_examples[task.name] == 0:
                check_files(task, split)  # a file task says why: malformed lines, or its files
                raise DataError(f"task {task.name!r}: split {split!r} is empty (0 examples)")
        self.rates = mixing_lib.resolve_rates(mixture, mixing, cap=mixing_cap,
                                              temperature=mixing_temperature, split=split)
        lengths = {"inputs": inputs_length, "targets": targets_length}
        shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards)

        datasets = []
        for i, task in enumerate(tasks):
            with _as_data_error(task.name, split):
                ds = task.get_dataset(
                    lengths, split=split, shuffle=True, seed=seed, shard_info=shard,
                    num_epochs=None, try_in_mem_cache=False,  # sources are in memory already
                )
            datasets.append(ds.map(_with_task_id(i + 1), num_parallel_calls=tf.data.AUTOTUNE))
        ds = mix(datasets, [self.rates[n] for n in self.task_names],
                 host_mixing_seed(seed, shard_index))
        converter = TaskIdEncDecFeatureConverter(pack=pack)
        ds = converter(ds, {**lengths, "task_ids": targets_length})
        if not pack:
            ds = ds.map(_add_unpacked_segments, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True  # same seed, same stream: exact resume relies on it
        self._dataset = ds.with_options(options)
        self._iterator = iter(self._dataset)
        self.output_shapes = {k: tuple(v.shape) for k, v in self._dataset.element_spec.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except (tf.errors.OutOfRangeError, StopIteration):
            # Every task repeats without end: an end means no task has an example for this
            # host (a bare StopIteration here stopped the trainer with a traceback, or, with
            # several hosts, left the others waiting in the step).
            raise DataError(
                f"mixture {self.mixture!r}, split {self.split!r}: host {self._shard_index} of "
                f"{self._num_shards} gets no example from any task (a split with fewer "
                f"examples than hosts, divided after reading); give every task at least as "
                f"many examples as there are hosts") from None
        except tf.errors.OpError as e:  # broken data found mid-stream: one line, no TF trace
            raise DataError(f"mixture {self.mixture!r}: reading data failed: "
                            f"{_first_line(e.message)}") from None
        return {k: v.numpy() for k, v in batch.items()}

    def describe(self) -> str:
        """A printable table of each task's examples and effective rate, for the run's start."""
        title = (f"mixture {self.mixture} ({self.mixing} mixing, split {self.split}, "
                 f"vocabulary {self.vocabulary_id}):")
        return mixing_lib.rates_table(self.rates, self.num_examples, title)

    def save(self, path: str) -> None:
        """Writes the iterator position (incl. shuffle and prefetch buffers) into directory path,
        with the mixture's tasks it holds examples of."""
        tf.io.gfile.makedirs(path)
        tf.train.Checkpoint(iterator=self._iterator).write(os.path.join(path, "iterator"))
        with tf.io.gfile.GFile(os.path.join(path, MIXTURE_FILE), "w") as f:
            f.write(json.dumps({"mixture": self.mixture, "tasks": self.task_names}) + "\n")

    def restore(self, path: str) -> None:
        """Restores a position written by `save` of a pipeline built with the same arguments.

        Raises:
            InputPositionMismatch: the mixture's tasks are not those it was saved with. tf.data
                restored a 3-task position into a 2-task mixture without a word, and its
                buffers went on yielding examples of the task removed (task id 3 of 2).
        """
        saved = os.path.join(path, MIXTURE_FILE)
        if tf.io.gfile.exists(saved):  # (positions saved before it was written: not checked)
            with tf.io.gfile.GFile(saved) as f:
                tasks = json.loads(f.read())["tasks"]
            if tasks != self.task_names:
                raise InputPositionMismatch(
                    f"mixture {self.mixture!r} was {', '.join(tasks)} when the position was "
                    f"saved and is {', '.join(self.task_names)} now")
        checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        with quiet.refused_position_lines_dropped():
            checkpoint.read(os.path.join(path, "iterator")).assert_consumed()


def host_mixing_seed(seed: int, shard_index: int) -> int:
    """The seed of one host's task draws. Hosts must draw independently: with one seed, every
    host picks the same task at the same position, and a global batch holds N copies of one
    host's task mix instead of N independent ones. Host 0 keeps ``seed``: one-host runs are
    unchanged."""
    if shard_index == 0:
        return seed
    # (SeedSequence takes non-negative entropy: a negative train.seed as its 64-bit pattern)
    return int(np.random.SeedSequence([seed % 2**64, shard_index]).generate_state(1)[0])


def mix(datasets: list[tf.data.Dataset], rates: list[float], seed: int) -> tf.data.Dataset:
    """Samples each next example from datasets[i] with probability rates[i] (seeded)."""
    return tf.data.Dataset.sample_from_datasets(datasets, weights=rates, seed=seed)


def prepare(config: Any) -> None:
    """Makes a run's tasks available: run defaults from `config.data`, then its tasks module.

    The defaults (data.vocabulary, data.on_malformed) are set first so that task helpers called
    while the user's module is imported see them.
    """
    vocab_lib.set_run_vocabulary(config.data.vocabulary)
    files_lib.RUN_DEFAULTS["on_malformed"] = config.data.on_malformed
    if config.data.tasks_module:
        from mtjax.data import tasks as tasks_lib

        tasks_lib.import_tasks_module(config.data.tasks_module)
    import mtjax.data.builtin  # noqa: F401 - registers the built-in tasks


def from_config(config: Any, batch_size: int, *, split: str = "train", shard_index: int = 0,
                num_shards: int = 1, pack: bool | None = None) -> InputPipeline:
    """The input pipeline a run's config describes (`prepare`, then `InputPipeline`).

    Args:
        config: an `mtjax.config.Config`.
        batch_size: examples (rows) per batch on this host.
        split: the split to read.
        shard_index, num_shards: this host's shard (process index and count).
        pack: overrides data.pack when given.
    """
    prepare(config)
    data = config.data
    return InputPipeline(
        data.mixture, inputs_length=data.inputs_length, targets_length=data.targets_length,
        batch_size=batch_size, pack=data.pack if pack is None else pack, seed=config.train.seed,
        shard_index=shard_index, num_shards=num_shards, split=split, mixing=data.mixing,
        mixing_cap=data.mixing_cap, mixing_temperature=data.mixing_temperature,
        vocabulary=data.vocabulary)


def check_task(task: seqio.Task, split: str) -> None:
    """Raises DataError when `task` cannot feed an encoder-decoder run on `split`."""
    missing = [k for k in ("inputs", "targets") if k not in task.output_features]
    if missing:
        raise DataError(
            f"task {task.name!r} has output features {sorted(task.output_features)}, no "
            f"{' or '.join(map(repr, missing))}: mtjax trains encoder-decoder models on "
            "text-to-text tasks; map the task's text to 'inputs' and 'targets'")
    with _as_data_error(task.name, split):
        splits = list(task.splits)
    if splits and split not in splits:
        raise DataError(f"task {task.name!r} has no split {split!r} (splits: {splits})")


def check_files(task: seqio.Task, split: str) -> None:
    """Raises DataError for a file task's malformed lines (unless skipped) or empty split; other
    sources have nothing to check before reading."""
    check = getattr(task.source, "check", None)
    if check is not None:
        with _as_data_error(task.name, split):
            check(split)


class _as_data_error:  # noqa: N801 - used as a context manager
    """Turns a task's failure to build its dataset into one DataError line naming the task."""

    def __init__(self, task_name: str, split: str):
        self.task_name, self.split = task_name, split

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, UserError):
            return False
        if isinstance(error, (ValueError, KeyError, TypeError, tf.errors.OpError)):
            message = error.message if isinstance(error, tf.errors.OpError) else str(error)
            raise DataError(f"task {self.task_name!r}, split {self.split!r}: "
                            f"{_first_line(message)}") from error
        return False


def _first_line(message: str) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _with_task_id(task_id: int):
    def add(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # Keep only the model features so every task's elements have the same structure.
        targets = ex["targets"]
        task_ids = tf.fill(tf.shape(targets), tf.constant(task_id, tf.int32))
        return {"inputs": ex["inputs"], "targets": targets, "task_ids": task_ids}

    return add


def _shared_vocabulary(mixture: str, tasks: list[seqio.Task],
                       configured: str | None = None) -> seqio.Vocabulary:
    """The vocabulary all tasks share on inputs and targets, checked against `configured`."""
    vocabs = {
        (t.name, k): t.output_features[k].vocabulary for t in tasks for k in ("inputs", "targets")
    }
    first = next(iter(vocabs.values()))
    differing = [f"{n}:{k}={vocab_lib.describe(v)}" for (n, k), v in vocabs.items()
                 if v != first]
    if differing:
        raise VocabularyMismatchError(
            f"Tasks of mixture {mixture!r} disagree on the output vocabulary: expected "
            f"{vocab_lib.describe(first)} ({tasks[0].name}), got {', '.join(differing)}. All "
            "tasks of a mixture must share one vocabulary.")
    if configured is not None:
        try:
            wanted = vocab_lib.get_vocabulary(configured)
        except FileNotFoundError as e:
            raise VocabularyMismatchError(f"data.vocabulary: {e}") from None
        if wanted != first:
            raise VocabularyMismatchError(
                f"data.vocabulary={configured!r} ({vocab_lib.describe(wanted)}) but the tasks of "
                f"{mixture!r} use {vocab_lib.describe(first)}. Unset data.vocabulary to use the "
                "mixture's own, or define the tasks with that vocabulary")
    return first


def _shared_vocab_size(mixture: str, tasks: list[seqio.Task]) -> int:
    """The vocabulary size all tasks share; VocabularyMismatchError if they differ."""
    return _shared_vocabulary(mixture, tasks).vocab_size


def decode_packed_row(
    batch: Mapping[str, np.ndarray], row: int, vocab: seqio.Vocabulary
) -> list[tuple[int, list[int], list[int], str, str]]:
    """Splits one batch row into its examples, for tests and previews.

    Returns:
        One (task_id, input_ids, target_ids, inputs_text, targets_text) per segment; ids
        without padding (with EOS), texts decoded up to EOS.
    """
    out = []
    enc_seg, dec_seg = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
    for s in sorted(set(dec_seg.tolist()) - {0}):
        input_ids = batch["encoder_input_tokens"][row][enc_seg == s].tolist()
        target_ids = batch["decoder_target_tokens"][row][dec_seg == s].tolist()
        task_id = int(batch["decoder_task_ids"][row][dec_seg == s][0])
        out.append((task_id, input_ids, target_ids, vocab.decode(input_ids),
                    vocab.decode(target_ids)))
    return out
