"""Looking at tasks before training: descriptions, decoded examples, lengths, truncation.

Truncation is measured on examples exactly as training makes them (same preprocessors and
sequence lengths) except that `append_eos_after_trim` does not trim, so an example's full length
is seen and compared with the configured one.
"""

from __future__ import annotations

import codecs
import functools
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mtjax.data import mixing as mixing_lib
from mtjax.data import vocab as vocab_lib
from mtjax.data.pipeline import (
    _as_data_error,
    _shared_vocabulary,
    check_files,
    check_task,
    lookup,
)

FEATURES = ("inputs", "targets")
# Above this truncated fraction a run is warned: most examples would lose tokens.
TRUNCATION_WARNING = 0.5


def untrimmed_examples(task: seqio.Task, split: str, lengths: dict[str, int], n: int,
                       seed: int = 0) -> list[dict[str, Any]]:
    """The first `n` examples of a task's split, preprocessed for `lengths` but not trimmed.

    Returns:
        Dicts with numpy `inputs`/`targets` ids (EOS included) and, where the task keeps them,
        the raw `inputs_pretokenized`/`targets_pretokenized` texts.
    """
    check_task(task, split)
    with _as_data_error(task.name, split):
        ds = task.source.get_dataset(split=split, shuffle=False, seed=seed)
        with seqio.utils.map_seed_manager(seed):
            for p in task.preprocessors:
                if isinstance(p, seqio.CacheDatasetPlaceholder):
                    continue
                fn = p.func if isinstance(p, functools.partial) else p
                if fn is seqio.preprocessors.append_eos_after_trim:
                    p = seqio.preprocessors.append_eos  # same EOS, no trimming
                ds = seqio.utils.add_kwargs_to_transform(
                    p, sequence_length=lengths, output_features=task.output_features)(ds)
        out = []
        for ex in ds.take(n).as_numpy_iterator():
            out.append({k: v for k, v in ex.items()
                        if k in FEATURES or k.endswith("_pretokenized")})
    return out


def length_stats(examples: list[dict[str, Any]], lengths: dict[str, int]) -> dict[str, Any]:
    """Token length statistics per feature and the fraction the configured lengths truncate."""
    stats: dict[str, Any] = {"examples": len(examples)}
    truncated_any = np.zeros(len(examples), bool)
    for key in FEATURES:
        sizes = np.array([len(ex[key]) for ex in examples]) if examples else np.zeros(0, int)
        cut = sizes > lengths[key]
        truncated_any |= cut
        stats[key] = {
            "length": lengths[key],
            "mean": float(sizes.mean()) if sizes.size else 0.0,
            "p50": int(np.percentile(sizes, 50)) if sizes.size else 0,
            "p90": int(np.percentile(sizes, 90)) if sizes.size else 0,
            "max": int(sizes.max()) if sizes.size else 0,
            "truncated": float(cut.mean()) if sizes.size else 0.0,
        }
    stats["truncated"] = float(truncated_any.mean()) if examples else 0.0
    return stats


def truncation_warnings(stats_by_task: dict[str, dict[str, Any]]) -> list[str]:
    """One warning per task whose configured lengths truncate most examples."""
    out = []
    for name, stats in stats_by_task.items():
        if stats["truncated"] > TRUNCATION_WARNING:
            worst = max(FEATURES, key=lambda k: stats[k]["truncated"])
            s = stats[worst]
            out.append(
                f"warning: data.{worst}_length={s['length']} truncates {stats['truncated']:.0%} "
                f"of {name}'s examples ({worst}: median {s['p50']}, p90 {s['p90']}, max "
                f"{s['max']} tokens); raise data.{worst}_length or shorten the task's text")
    return out


def mixture_length_report(mixture: str, lengths: dict[str, int], *, split: str = "train",
                          n: int = 256, seed: int = 0) -> tuple[dict[str, dict], list[str]]:
    """Length statistics of `n` examples of every task of `mixture`, and warnings.

    A run can print the warnings at its start (they cost reading `n` examples per task).
    """
    provider = lookup(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    stats = {t.name: length_stats(untrimmed_examples(t, split, lengths, n, seed), lengths)
             for t in tasks}
    return stats, truncation_warnings(stats)


def describe(name: str, *, mixture: str | None = None, mixing: str = "mixture",
             cap: int | None = None, temperature: float = 2.0,
             split: str = "train", vocabulary: str | None = None) -> dict[str, Any]:
    """What `mtjax tasks show NAME` prints: source, preprocessors, features, sizes, rates.

    Args:
        name: a task or mixture.
        mixture: the run's mixture; a task's rate inside it is reported.
        mixing, cap, temperature: the run's mixing strategy (config data.mixing...).
        split: whose size is reported first.
        vocabulary: the run's data.vocabulary: tasks on another are refused, as `train` does.
    """
    provider = lookup(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
        check_task(task, split)  # a misspelt --split is an error, not ignored
        # A file task's malformed lines and empty splits stop `show` as they stop `train` (its
        # sizes counted only the good lines, and it exited 0 without a word).
        for each in [split] if isinstance(provider, seqio.Mixture) else task.splits:
            check_files(task, each)  # (nothing to read for a task that is not a file task)
    _shared_vocabulary(name, tasks, vocabulary)
    if isinstance(provider, seqio.Mixture):
        rates = mixing_lib.resolve_rates(name, mixing, cap=cap, temperature=temperature,
                                         split=split)
        sizes = {t.name: mixing_lib.num_examples(t, split) for t in provider.tasks}
        return {
            "name": name, "kind": "mixture", "mixing": mixing,
            "members": {m: (r if isinstance(r, (int, float)) else "computed")
                        for m, r in provider.rate_per_task_name.items()},
            "tasks": {t: {"rate": rates[t], "examples": sizes[t]} for t in rates},
            "table": mixing_lib.rates_table(rates, sizes),
        }
    task = provider
    with _as_data_error(task.name, split):
        splits = list(task.splits)
    info: dict[str, Any] = {
        "name": name, "kind": "task",
        "source": repr(task.source),
        "splits": {s: mixing_lib.num_examples(task, s) for s in splits},
        "preprocessors": [_name(p) for p in task.preprocessors],
        "output_features": {
            k: {"vocabulary": vocab_lib.describe(f.vocabulary), "add_eos": f.add_eos,
                "dtype": f.dtype.name if hasattr(f.dtype, "name") else str(f.dtype)}
            for k, f in task.output_features.items()},
        "metric_fns": [_name(f) for f in task.metric_fns],
    }
    if mixture is not None:
        try:
            rates = mixing_lib.resolve_rates(mixture, mixing, cap=cap, temperature=temperature,
                                             split=split)
        except mixing_lib.MixingError:
            rates = {}
        info["rate"] = {"mixture": mixture, "mixing": mixing, "rate": rates.get(name),
                        "in_mixture": name in rates}
    return info


def decode(vocab: seqio.Vocabulary, ids: np.ndarray, length: int) -> tuple[str, bool]:
    """The text the model sees for `ids` at `length` tokens, and whether it was truncated.

    Sentinels are shown as <extra_id_N>, N counted from the top of the vocabulary as T5 does:
    a SentencePiece vocabulary's extra ids, and for bytes (ByT5) every byte that is not part
    of valid UTF-8.
    """
    ids = [int(i) for i in ids]
    truncated = len(ids) > length
    if truncated:
        ids = ids[:length - 1]
    ids = [i for i in ids if i != vocab.eos_id]
    top = vocab.vocab_size - 1
    if isinstance(vocab, seqio.ByteVocabulary):
        raw = bytes(i - 3 for i in ids if 3 <= i < 259)
        return raw.decode("utf-8", errors="mtjax_sentinel"), truncated
    extra = getattr(vocab, "extra_ids", 0) or 0
    pieces, run = [], []
    for i in ids:
        if extra and i >= vocab.vocab_size - extra:
            pieces.append(vocab.decode(run) if run else "")
            run = []
            pieces.append(f"<extra_id_{top - i}>")
        else:
            run.append(i)
    pieces.append(vocab.decode(run) if run else "")
    return "".join(pieces), truncated


def _sentinel_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    byte = error.object[error.start]
    return f"<extra_id_{255 - byte}>", error.start + 1


codecs.register_error("mtjax_sentinel", _sentinel_bytes)


def _name(fn) -> str:
    fn = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(fn, "__name__", None) or type(fn).__name__


def as_json(value: Any) -> Any:
    """Numpy and bytes values made JSON-ready (for --json output)."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tf.Tensor):
        return as_json(value.numpy())
    return value
