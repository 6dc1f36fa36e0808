"""Built-in generated text-to-text tasks and the `mtjax_demo` mixture; registered on import.

Every task's data is generated lazily, in Python, from a fixed seed per (task, split) and fed
through `tf.data.Dataset.from_tensor_slices`, so the stream is reproducible and its iterator can
be saved with `tf.train.Checkpoint` (which `from_generator` would not allow). Words are
pseudo-words built from syllables, so no data or vocabulary is ever downloaded.
"""

import functools
import random
from collections.abc import Callable

import seqio
import tensorflow as tf

from mtjax.data import memory, objectives
from mtjax.data.vocab import get_vocabulary

DEFAULT_MIXTURE = "mtjax_demo"
SPLIT_SIZES = {"train": 20_000, "validation": 500}


@functools.cache
def _lexicon(name: str, size: int, onsets: str, vowels: str) -> tuple[str, ...]:
    """Returns `size` distinct pseudo-words of 2-3 syllables, the same every run."""
    rng = random.Random(f"mtjax-lexicon-{name}")
    words: dict[str, None] = {}
    while len(words) < size:
        n = rng.choice((2, 2, 3))
        words["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n))] = None
    return tuple(words)


def source_words() -> tuple[str, ...]:
    """The 200 source-language words: nouns [0:100], adjectives [100:150], verbs [150:200]."""
    return _lexicon("source", 200, "bdfgklmnprstvz", "aeiou")


def target_words() -> tuple[str, ...]:
    """The target-language word for each source word, at the same index."""
    return _lexicon("target", 200, "chjqwxy", "aeiouy")


@functools.cache
def _source_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(source_words())}


def translate(sentence: str) -> str:
    """The synthetic translation rule: map each word, and put adjectives after their noun."""
    tgt, index = target_words(), _source_index()
    out: list[str] = []
    pending_adjective = None
    for word in sentence.split():
        i = index[word]
        if 100 <= i < 150:  # adjective: emit after the noun that follows it
            pending_adjective = tgt[i]
            continue
        out.append(tgt[i])
        if pending_adjective is not None:
            out.append(pending_adjective)
            pending_adjective = None
    return " ".join(out)


def _sentence(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(source_words()) for _ in range(rng.randint(lo, hi))]


def _noun_phrase(rng: random.Random) -> list[str]:
    words = source_words()
    phrase = [rng.choice(words[100:150])] if rng.random() < 0.6 else []
    return phrase + [rng.choice(words[:100])]


def _make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (inputs, targets) pair of `task`; inputs <= ~100 bytes, targets <= ~60 bytes."""
    if task == "add":
        a, b = rng.randint(0, 99_999), rng.randint(0, 99_999)
        return f"add: {a} + {b}", str(a + b)
    if task == "translate":
        words = _noun_phrase(rng) + [rng.choice(source_words()[150:])] + _noun_phrase(rng)
        return "translate: " + " ".join(words), translate(" ".join(words))
    if task == "span_corruption":
        return "", " ".join(_sentence(rng, 8, 14))
    words = _sentence(rng, 3, 8)
    target = {"copy": words, "reverse": words[::-1], "sort": sorted(words)}[task]
    return f"{task}: " + " ".join(words), " ".join(target)


@functools.cache
def generate(task: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Returns (inputs, targets) of a built-in task's split; deterministic, cached."""
    rng = random.Random(f"mtjax-{task}-{split}")
    # Held-out splits hold no example of the train split: a copy would score as learned.
    seen = set() if split == "train" else set(zip(*generate(task, "train"), strict=True))
    pairs = []
    while len(pairs) < SPLIT_SIZES[split]:
        pair = _make_example(task, rng)
        if pair not in seen:
            pairs.append(pair)
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _dataset_fn(task: str) -> Callable[..., tf.data.Dataset]:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        # seqio passes its shuffle as shuffle_files: in training, each epoch in a new order.
        # tf.constant of the tuple: a Python list went through tf.data's per-element type
        # checks (60 ms a call against 2, and the pipeline, the evaluator and the length
        # report each call this per task).
        inputs, targets = map(tf.constant, generate(task, split))
        if task == "span_corruption":  # inputs are made from targets by the preprocessor
            return memory.examples_dataset({"targets": targets}, shuffle_files, seed)
        return memory.examples_dataset({"inputs": inputs, "targets": targets}, shuffle_files,
                                       seed)

    return dataset_fn


# Rules the targets obey, as a function of the inputs text (span corruption is checked on ids).
RULES: dict[str, Callable[[str, str], bool]] = {
    "mtjax_copy": lambda i, t: t == i.removeprefix("copy: "),
    "mtjax_reverse": lambda i, t: t.split() == i.removeprefix("reverse: ").split()[::-1],
    "mtjax_sort": lambda i, t: t.split() == sorted(i.removeprefix("sort: ").split()),
    "mtjax_add": lambda i, t: int(t) == sum(int(x) for x in i.removeprefix("add: ").split("+")),
    "mtjax_translate": lambda i, t: t == translate(i.removeprefix("translate: ")),
}


def exact_match(targets: list[str], predictions: list[str]) -> dict[str, float]:
    """seqio metric fn: percentage of predictions equal to their target."""
    hits = sum(t == p for t, p in zip(targets, predictions, strict=True))
    return {"exact_match": 100.0 * hits / max(len(targets), 1)}


def log_likelihood(targets: list[str], scores: list[float]) -> dict[str, float]:
    """seqio score metric fn: mean log-likelihood of the targets (sum over tokens, with EOS)."""
    del targets
    return {"log_likelihood": float(sum(scores)) / max(len(scores), 1)}


# T5 span corruption (Raffel et al. 2020, §3.1.4) of each short text whole: objectives' noise
# and sentinels without its chunking (one sentence is one example), fresh noise every epoch.
@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert  # plain TF ops: converting only costs start-up
def span_corruption(features, seed, output_features):
    """Tokenized `targets` -> `inputs` with spans replaced by sentinels, `targets` the spans."""
    tokens = features["targets"]
    vocab_size = output_features["targets"].vocabulary.vocab_size
    mask = objectives.random_spans_noise_mask(tf.size(tokens), seed)
    return {
        "inputs": objectives.noise_span_to_unique_sentinel(tokens, mask, vocab_size),
        "targets": objectives.noise_span_to_unique_sentinel(tokens, tf.logical_not(mask),
                                                            vocab_size),
    }


TASK_NAMES = tuple(
    f"mtjax_{t}" for t in ("copy", "reverse", "sort", "add", "translate", "span_corruption")
)


def register() -> None:
    """Registers the built-in tasks and the `mtjax_demo` mixture; idempotent."""
    vocab = get_vocabulary("byte")
    features = {k: seqio.Feature(vocabulary=vocab, add_eos=True) for k in ("inputs", "targets")}
    for name in TASK_NAMES:
        if name in seqio.TaskRegistry.names():
            continue
        task = name.removeprefix("mtjax_")
        preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
        if task == "span_corruption":
            preprocessors.insert(1, span_corruption)
        seqio.TaskRegistry.add(
            name,
            # No num_input_examples: seqio would then cache these splits in memory (under
            # 10,000 examples), and the evaluator's partial read of the cache prints TF's "did
            # not fully read the dataset being cached" once per task. Counting the in-memory
            # data (mixing asks) costs milliseconds.
            source=seqio.FunctionDataSource(_dataset_fn(task), splits=tuple(SPLIT_SIZES)),
            output_features=features,
            preprocessors=preprocessors,
            # Span corruption's `targets_pretokenized` is the uncorrupted text, not the spans
            # the model predicts, so only its likelihood is a meaningful metric.
            metric_fns=([log_likelihood] if task == "span_corruption"
                        else [exact_match, log_likelihood]),
        )
    if DEFAULT_MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(DEFAULT_MIXTURE, list(TASK_NAMES), default_rate=1.0)
    from mtjax.data import knowledge  # the knowledge-base suite (transfer between tasks)

    knowledge.register()


register()
