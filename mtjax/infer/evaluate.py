"""Per-task metrics with ``seqio.Evaluator``: each task's ``metric_fns`` on its eval split.

The evaluator caches each task's examples once (unpacked, ``EncDecFeatureConverter(pack=False)``)
and, per evaluation, asks for predictions (KV-cache decoding, greedy or beam search) when a task
has prediction metrics (exact match, BLEU, ROUGE, ...) and for scores (target log-likelihoods,
as ``mtjax score``) when it has score metrics. Results map task -> metric -> value.

During training, the trainer calls the object :func:`make_evaluator` returns every
``eval.every_steps`` steps; ``mtjax eval --checkpoint DIR`` runs it on a saved checkpoint.
Every host runs the same evaluation on the full eval set (batches are replicated on the way in
and split over the mesh); only the caller decides who writes results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from mtjax import config as config_lib
from mtjax.infer.decode import DecodeOptions, Decoder
from mtjax.infer.score import Scorer
from mtjax.parallel import distributed
from mtjax.parallel import mesh as mesh_lib

Results = dict[str, dict[str, float]]


class Interrupted(Exception):
    """:attr:`Evaluator.stop` said to stop (a SIGTERM or Ctrl-C in training): the evaluation is
    abandoned at its next batch, so that the run saves without waiting for the rest."""


def _batches(dataset, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices [b], features [b, L]) numpy batches of an enumerated seqio eval dataset."""
    yield from dataset.batch(batch_size).as_numpy_iterator()


@contextlib.contextmanager
def _no_split_memory_cache() -> Iterator[None]:
    """Without it, seqio's ``Task.get_dataset`` caches a split of known size under 10,000
    examples in memory *before* the first N are taken, so every partial read printed
    TensorFlow's "did not fully read the dataset being cached" when its iterator died. The
    readers here keep what they took themselves, which makes that first cache useless anyway."""
    from seqio import dataset_providers

    limit = getattr(dataset_providers, "_MAX_EXAMPLES_TO_MEM_CACHE", None)
    if limit is not None:
        dataset_providers._MAX_EXAMPLES_TO_MEM_CACHE = 0
    try:
        yield
    finally:
        if limit is not None:
            dataset_providers._MAX_EXAMPLES_TO_MEM_CACHE = limit


def seqio_evaluator(mixture: str, split: str, max_examples: int | None,
                    sequence_length: Mapping[str, int] | None) -> Any:
    """A ``seqio.Evaluator`` that caches the first ``max_examples`` of each task once, itself
    (see :func:`_no_split_memory_cache`)."""
    import seqio

    with _no_split_memory_cache():
        return seqio.Evaluator(
            mixture, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
            sequence_length=sequence_length, num_examples=max_examples or None,
            use_memory_cache=True, async_compute_metrics=False)


def needs_lengths(task: Any) -> bool:
    """Whether a seqio task has a preprocessor that needs feature lengths (seqio's own test:
    a ``sequence_length`` parameter without a default), such as span corruption's chunking."""
    for preprocessor in task.preprocessors:
        parameter = inspect.signature(preprocessor).parameters.get("sequence_length")
        if parameter is not None and parameter.default is inspect.Parameter.empty:
            return True
    return False


def seqio_evaluators(mixture: str, split: str, max_examples: int | None,
                     sequence_length: Mapping[str, int] | None) -> list[Any]:
    """The ``seqio.Evaluator``s of a mixture: tasks that need feature lengths get
    ``sequence_length``, the others none (each example whole, decoded up to its task's longest
    target).

    One evaluator for the whole mixture had to give every task the lengths once one task
    needed them, so a task's figures changed with its neighbours: ``mtjax_kb_qa`` read its
    inputs cut at ``data.inputs_length`` beside span corruption and whole on its own. Each
    group here evaluates its tasks as they evaluate alone, with one batch shape per group.
    """
    import seqio
    from seqio import dataset_providers

    tasks = [t for t in dataset_providers.get_subtasks(seqio.get_mixture_or_task(mixture))
             if split in t.splits and (t.metric_fns or t.metric_objs)]
    needing = {t.name for t in tasks if needs_lengths(t)}
    groups = [([t.name for t in tasks if t.name not in needing], None),
              ([t.name for t in tasks if t.name in needing], sequence_length or None)]
    evaluators = []
    for names, group_lengths in groups:
        if len(names) > 1:
            # seqio evaluates registered names only: the group is a mixture for the moment the
            # evaluator reads its tasks and caches their examples.
            name = f"_mtjax_eval_group/{mixture}/{'lengths' if group_lengths else 'whole'}"
            seqio.MixtureRegistry.add(name, names, default_rate=1.0)
            try:
                evaluators.append(seqio_evaluator(name, split, max_examples, group_lengths))
            finally:
                seqio.MixtureRegistry.remove(name)
        elif names:
            evaluators.append(seqio_evaluator(names[0], split, max_examples, group_lengths))
    return evaluators


def _scalar(value: Any) -> float | None:
    """A metric value as a float, or None for non-scalar values (text, histograms)."""
    value = getattr(value, "value", value)  # seqio.metrics.Scalar
    if value is None or isinstance(value, (str, bytes)):
        return None  # numpy reads None as NaN, and "12" as 12
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array) if array.ndim == 0 else None


def flatten(results: Mapping[str, Mapping[str, float]], prefix: str = "eval") -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"eval/<task>/<metric>": v}`` for metric writers."""
    return {f"{prefix}/{task}/{metric}": value
            for task, metrics in results.items() for metric, value in metrics.items()}


def loss_tasks(mixture: str, split: str) -> list[str]:
    """The tasks of ``mixture`` with a ``split``: those :class:`TaskLosses` evaluates."""
    import seqio

    return [t.name for t in seqio.get_subtasks(seqio.get_mixture_or_task(mixture))
            if split in t.splits]


def _bucket(length: int, most: int) -> int:
    """``length`` rounded up to a power of two (at least 8), at most ``most``."""
    return min(most, max(8, 1 << max(length - 1, 0).bit_length()))


def _extent(arrays_BL: list[np.ndarray]) -> int:
    """Columns up to the last one that is not padding in any of ``arrays`` (at least 1)."""
    used = [np.flatnonzero(np.any(a != 0, axis=0)) for a in arrays_BL]
    return max((int(u[-1]) + 1 for u in used if u.size), default=1)


def trim_padding(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """A task's loss batches without the padding columns past its longest example (rounded up
    to a power of two, so that tasks of similar lengths share one compiled shape).

    The converter pads every example to the run's lengths, and the forward pass computed on
    that padding: the held-out loss of the quick start's 600 examples at 128/64 took 11 s a
    pass. The figures do not change: padding is masked on the encoder side and after the
    targets on the causal decoder side, and weighs nothing in the loss."""
    if not batches:
        return batches

    def extent(key: str) -> int:
        return _extent([b[key] for b in batches])

    inputs = _bucket(extent("encoder_input_tokens"), batches[0]["encoder_input_tokens"].shape[1])
    targets = _bucket(extent("decoder_target_tokens"),
                      batches[0]["decoder_target_tokens"].shape[1])
    return [{k: v[:, :inputs] if k.startswith("encoder_") else v[:, :targets]
             for k, v in b.items()} for b in batches]


class TaskLosses:
    """The teacher-forced cross-entropy per target token, and token accuracy, of every task of a
    mixture on its eval split (T5X's ``train_eval``), whether the task has metrics or not: the first
    ``max_examples`` examples, cut at the run's lengths as training cuts them, scored as
    ``mtjax score`` scores them (EOS included; no z-loss, no label smoothing). Beside
    training's ``loss/<task>`` it shows each task's generalisation gap, and which task
    overfits first in a mixture.

    The examples are read once, at the first call, in their split's order with a fixed seed
    for random preprocessors (span corruption's noise), so every evaluation and every host
    scores the same examples.
    """

    _KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
             "decoder_loss_weights")

    def __init__(self, mixture: str, scorer: Scorer, *, split: str, max_examples: int | None,
                 sequence_length: Mapping[str, int], batch_size: int, seed: int = 0):
        self.task_names = loss_tasks(mixture, split)
        self.scorer, self.split, self.max_examples = scorer, split, max_examples
        self.sequence_length, self.batch_size, self.seed = sequence_length, batch_size, seed
        self._batches: dict[str, list[dict[str, np.ndarray]]] | None = None

    def _read(self) -> dict[str, list[dict[str, np.ndarray]]]:
        import seqio

        converter = seqio.EncDecFeatureConverter(pack=False)
        batches = {}
        with _no_split_memory_cache():
            for name in self.task_names:
                ds = seqio.get_mixture_or_task(name).get_dataset(
                    self.sequence_length, split=self.split, shuffle=False, num_epochs=1,
                    seed=self.seed)
                if self.max_examples:
                    ds = ds.take(self.max_examples)
                ds = converter(ds, self.sequence_length)
                batches[name] = trim_padding([{k: b[k] for k in self._KEYS}
                                              for b in ds.batch(self.batch_size)
                                              .as_numpy_iterator()])
        return batches

    def __call__(self, params: Any, check: Callable[[], None] = lambda: None) -> Results:
        """task -> {"loss": cross-entropy per target token, "token_accuracy": the fraction of
        target tokens that are the model's argmax}; a task without target tokens in the
        examples read is left out. ``check()`` is called before each batch."""
        if self._batches is None:
            self._batches = self._read()
        results: Results = {}
        for name, batches in self._batches.items():
            log_likelihood, tokens, correct = 0.0, 0.0, 0.0
            for batch in batches:
                check()
                ll, n, right = self.scorer.totals(params, batch, batch_size=self.batch_size)
                log_likelihood, tokens, correct = log_likelihood + ll, tokens + n, correct + right
            if tokens:
                results[name] = {"loss": -log_likelihood / tokens,
                                 "token_accuracy": correct / tokens}
        return results


class Evaluator:
    """Evaluate a model's parameters on every task of a mixture that has metrics.

    Args:
        mixture: a registered seqio task or mixture name.
        model_def: anything with ``merge(params) -> T5``.
        mesh: the mesh the parameters live on.
        rules: the model's logical axis rules.
        split: the eval split of each task.
        max_examples: the first N examples of each task (None or 0: all).
        batch_size: sequences per decoding / scoring batch.
        options: decoding options (default greedy).
        max_decode_length: decoded length (None: each task's longest target).
        sequence_length: feature lengths for the tasks whose preprocessors need them (the
            others, and these when None, take the longest example: no truncation).
        progress: report each model pass on stderr.
        loss: also each task's ``loss`` (:class:`TaskLosses`, at ``sequence_length``), for
            every task with the split, metrics or not.
        seed: the seed of random preprocessors for the loss's examples.
    """

    def __init__(self, mixture: str, model_def: Any, mesh: Mesh, rules: mesh_lib.AxisRules, *,
                 split: str = "validation", max_examples: int | None = None,
                 batch_size: int = 32, options: DecodeOptions | None = None,
                 max_decode_length: int | None = None,
                 sequence_length: Mapping[str, int] | None = None, progress: bool = False,
                 loss: bool = False, seed: int = 0):
        self.batch_size = batch_size
        self.options = options or DecodeOptions()
        self.max_decode_length = max_decode_length
        self.progress = progress
        self._counts = {"decoded": 0, "scored": 0}
        # Asked before each batch: True abandons the evaluation (raises Interrupted).
        self.stop: Callable[[], bool] = lambda: False
        self._noted: set[tuple[str, str]] = set()
        self.decoder = Decoder(model_def, mesh, rules)
        self.scorer = Scorer(model_def, mesh, rules)
        self._seqio = seqio_evaluators(mixture, split, max_examples, sequence_length)
        self.losses = None
        if loss:
            if sequence_length is None:
                raise ValueError("Evaluator(loss=True) needs the run's sequence_length")
            self.losses = TaskLosses(mixture, self.scorer, split=split,
                                     max_examples=max_examples, sequence_length=sequence_length,
                                     batch_size=batch_size, seed=seed)
        # The tasks evaluated: with the loss, every task with the split (a superset).
        self.task_names = (self.losses.task_names if self.losses is not None
                           else [t.name for e in self._seqio for t in e.eval_tasks])

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _note_not_a_number(self, task: str, metric: str, value: Any) -> None:
        """Once per metric: a value that is not one number (seqio Text, Histogram, Image, or
        an array) is not in metrics.jsonl or TensorBoard, and the user hears so."""
        if (task, metric) in self._noted:
            return
        self._noted.add((task, metric))
        distributed.log(
            f"mtjax: note: eval metric {metric!r} of task {task!r} is a "
            f"{type(value).__name__}, not one number: mtjax records numbers only "
            f"(metrics.jsonl, TensorBoard, the eval output), so it is left out; return a "
            f"float (or seqio.metrics.Scalar) to record it")

    def _check_stop(self) -> None:
        if self.stop():
            raise Interrupted

    def _predict_fn(self, params: Any, aux: bool = False) -> Callable:
        """seqio's ``predict_fn``, or with ``aux`` its ``predict_with_aux_fn`` (for metric
        functions of ``(targets, predictions, aux_values)``), whose aux values are T5X's:
        ``{"scores": [each prediction's decoding score]}``."""
        def predict(dataset) -> Any:
            out, scores = [], []
            batches = list(_batches(dataset, self.batch_size))
            # The task's own longest target: seqio pads every task evaluated together to the
            # longest of them all, and their predictions would change with their neighbours.
            length = self.max_decode_length or _extent(
                [features["decoder_target_tokens"] for _, features in batches])
            options = dataclasses.replace(self.options, max_decode_length=length)
            for indices, features in batches:
                self._check_stop()
                tokens_BS = features["encoder_input_tokens"]
                tokens_BT, scores_B = self.decoder(params, tokens_BS, options,
                                                   batch_size=self.batch_size)
                # Whole rows (0 after EOS): seqio stacks them into one array and its
                # vocabulary decodes up to EOS.
                out += [(int(i), row.tolist()) for i, row in zip(indices, tokens_BT, strict=True)]
                scores += [float(s) for s in scores_B]
            self._counts["decoded"] += len(out)
            return (out, {"scores": scores}) if aux else out

        return predict

    def _score_fn(self, params: Any) -> Callable:
        def score(dataset) -> list[tuple[int, float]]:
            out = []
            for indices, features in _batches(dataset, self.batch_size):
                self._check_stop()
                batch = {k: features[k] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                   "decoder_target_tokens",
                                                   "decoder_loss_weights")}
                scores_B, _ = self.scorer(params, batch, batch_size=self.batch_size)
                out += [(int(i), float(s)) for i, s in zip(indices, scores_B, strict=True)]
            self._counts["scored"] += len(out)
            return out

        return score

    def __call__(self, params: Any, step: int | None = None) -> Results:
        """Run every task's metrics with ``params``; returns task -> metric -> value."""
        start, self._counts = time.perf_counter(), {"decoded": 0, "scored": 0}
        all_metrics = {}
        for evaluator in self._seqio:
            future, _ = evaluator.evaluate(compute_metrics=True, step=step,
                                           predict_fn=self._predict_fn(params),
                                           score_fn=self._score_fn(params),
                                           predict_with_aux_fn=self._predict_fn(params, aux=True))
            all_metrics.update(future.result() or {})
        results: Results = {}
        for task, metrics in all_metrics.items():
            values = {name: _scalar(v) for name, v in metrics.items()}
            results[task] = {name: v for name, v in values.items() if v is not None}
            for name in sorted(set(values) - set(results[task])):
                self._note_not_a_number(task, name, metrics[name])
        losses = {} if self.losses is None else self.losses(params, self._check_stop)
        for task, values in losses.items():
            results.setdefault(task, {}).update(values)
        # seqio calls the functions once per task without naming it: one line for them all.
        self._log(f"eval: {len(results)} tasks, decoded {self._counts['decoded']} and scored "
                  f"{self._counts['scored']} examples"
                  + (f", the loss of {len(losses)} tasks" if self.losses is not None else "")
                  + f" in {time.perf_counter() - start:.1f}s")
        return results


def make_evaluator(config: config_lib.Config, mesh: Mesh, rules: mesh_lib.AxisRules,
                   model_def: Any, *, progress: bool = False) -> Evaluator:
    """The evaluator of a run: the tasks of ``eval.mixture`` (else its training mixture), with
    the run's ``eval`` settings.

    Call the result as ``evaluator(params, step) -> {task: {metric: value}}``; see
    :func:`flatten` for metric-writer keys ``eval/<task>/<metric>``.
    """
    from mtjax.data import pipeline

    pipeline.prepare(config)  # the run's vocabulary default, then the user's tasks module
    pipeline.resolve_task_names(pipeline.eval_mixture(config))  # a clear error for unknown names
    options = DecodeOptions(beam_size=config.eval.beam_size, alpha=config.eval.alpha)
    lengths = {"inputs": config.data.inputs_length, "targets": config.data.targets_length}
    kwargs = dict(split=config.eval.split, max_examples=config.eval.max_examples,
                  batch_size=config.eval.batch_size, options=options,
                  max_decode_length=config.eval.max_decode_length or None, progress=progress)
    # Tasks whose preprocessors need lengths (span corruption's chunks) get the run's; the
    # others are evaluated whole, as on their own.
    return Evaluator(pipeline.eval_mixture(config), model_def, mesh, rules,
                     sequence_length=lengths,
                     loss=config.eval.loss, seed=config.train.seed, **kwargs)
