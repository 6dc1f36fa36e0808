"""A built-in task suite that shows transfer: facts read in one task answer another's questions.

A generated knowledge base of 400 people, each with a city, a job, a favourite colour and a birth
year, feeds two kinds of task:

- `mtjax_kb_bio_span_corruption`, `mtjax_kb_bio_prefix_lm`: biographies of **all** people
  (facts in shuffled order, paraphrased), trained with T5's span corruption or prefix LM.
- `mtjax_kb_qa`: questions such as "question: where does zorvak live?" -> "pelinor". Its train
  split asks only about the first half of the people, its validation split only about the
  second half, whose facts appear nowhere but in the biographies.

So a model trained on `mtjax_kb` (biographies + QA) can answer held-out questions only by
transfer from the biography text; `mtjax_kb_qa_only` (QA alone) is the control that cannot (it
stays near the per-attribute majority baseline of `majority_baseline()`). Everything is generated
from fixed seeds, in memory, as tensors (checkpointable iterators, no download).
"""

from __future__ import annotations

import functools
import random
from collections import Counter

import seqio
import tensorflow as tf

from mtjax.data import memory, objectives
from mtjax.data.vocab import get_vocabulary

NUM_PEOPLE = 400
BIOGRAPHIES_PER_PERSON = {"train": 25, "validation": 1}
ATTRIBUTES = ("city", "job", "color", "year")
JOBS = ("baker", "farmer", "painter", "doctor", "pilot", "teacher", "singer", "sailor",
        "writer", "lawyer", "nurse", "miner", "tailor", "potter", "judge", "clerk")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown",
          "pink", "gray", "gold")
STATEMENTS = {
    "city": ("{name} lives in {value}.", "{name} has a home in {value}."),
    "job": ("{name} works as a {value}.", "{name} earns a living as a {value}."),
    "color": ("{name} likes the color {value}.", "the favorite color of {name} is {value}."),
    "year": ("{name} was born in {value}.", "{name} came into the world in {value}."),
}
QUESTIONS = {
    "city": "where does {name} live?",
    "job": "what does {name} do for a living?",
    "color": "what color does {name} like?",
    "year": "when was {name} born?",
}
TASK_NAMES = ("mtjax_kb_bio_span_corruption", "mtjax_kb_bio_prefix_lm", "mtjax_kb_qa")
MIXTURE, CONTROL_MIXTURE = "mtjax_kb", "mtjax_kb_qa_only"


def _words(seed: str, size: int, onsets: str, vowels: str) -> list[str]:
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(onsets) + rng.choice(vowels)
                      for _ in range(rng.choice((2, 3))))] = None
    return list(words)


@functools.cache
def knowledge_base() -> tuple[dict[str, str], ...]:
    """The people: one dict per person with name, city, job, color and year; fixed forever."""
    names = _words("mtjax-kb-names", NUM_PEOPLE, "bdfgklmnprstvz", "aeiou")
    cities = _words("mtjax-kb-cities", 24, "chjqwxy", "aeiouy")
    rng = random.Random("mtjax-kb-facts")
    return tuple({"name": name, "city": rng.choice(cities), "job": rng.choice(JOBS),
                  "color": rng.choice(COLORS), "year": str(rng.randint(1900, 1999))}
                 for name in names)


def qa_people(split: str) -> tuple[dict[str, str], ...]:
    """Whom a QA split asks about: train the first half of the people, validation the rest."""
    people, half = knowledge_base(), NUM_PEOPLE // 2
    return people[:half] if split == "train" else people[half:]


@functools.cache
def biographies(split: str) -> tuple[str, ...]:
    """Biographies of every person: all facts, shuffled order and paraphrase per copy."""
    rng = random.Random(f"mtjax-kb-bio-{split}")
    out = []
    for _ in range(BIOGRAPHIES_PER_PERSON[split]):
        for person in knowledge_base():
            attributes = list(ATTRIBUTES)
            rng.shuffle(attributes)
            out.append(" ".join(rng.choice(STATEMENTS[a]).format(name=person["name"],
                                                                   value=person[a])
                                for a in attributes))
    rng.shuffle(out)
    return tuple(out)


@functools.cache
def questions(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, targets) of the QA split: one question per person and attribute."""
    pairs = [("question: " + QUESTIONS[a].format(name=p["name"]), p[a])
             for p in qa_people(split) for a in ATTRIBUTES]
    random.Random(f"mtjax-kb-qa-{split}").shuffle(pairs)
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def majority_baseline(split: str = "validation") -> float:
    """Exact match (%) of always answering the most common value of the asked attribute."""
    people, hits = qa_people(split), 0
    for a in ATTRIBUTES:
        hits += Counter(p[a] for p in people).most_common(1)[0][1]
    return 100.0 * hits / (len(people) * len(ATTRIBUTES))


def _bio_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    # seqio passes its shuffle as shuffle_files: in training, each epoch in a new order.
    return memory.examples_dataset({"text": tf.constant(biographies(split))}, shuffle_files,
                                   seed)


def _qa_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    inputs, targets = questions(split)
    return memory.examples_dataset({"inputs": tf.constant(inputs), "targets": tf.constant(targets)},
                                   shuffle_files, seed)


@seqio.map_over_dataset
def _text_to_targets(ex):
    return {"targets": ex["text"]}


def register() -> None:
    """Registers the suite's tasks and its two mixtures; idempotent."""
    from mtjax.data.builtin import exact_match, log_likelihood  # builtin calls register()

    vocab = get_vocabulary("byte")
    features = {k: seqio.Feature(vocabulary=vocab, add_eos=True) for k in ("inputs", "targets")}
    splits = tuple(BIOGRAPHIES_PER_PERSON)
    bio_source = seqio.FunctionDataSource(
        _bio_dataset, splits=splits,
        num_input_examples={s: NUM_PEOPLE * n for s, n in BIOGRAPHIES_PER_PERSON.items()})
    objective = {"mtjax_kb_bio_span_corruption": objectives.span_corruption(),
                 "mtjax_kb_bio_prefix_lm": objectives.prefix_lm()}
    for name, preprocess in objective.items():
        if name not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                name, source=bio_source, output_features=features,
                preprocessors=[_text_to_targets, seqio.preprocessors.tokenize, preprocess,
                               seqio.preprocessors.append_eos_after_trim],
                metric_fns=[log_likelihood])  # targets are the masked spans: score only
    if "mtjax_kb_qa" not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            "mtjax_kb_qa",
            source=seqio.FunctionDataSource(
                _qa_dataset, splits=splits,
                num_input_examples={s: len(qa_people(s)) * len(ATTRIBUTES) for s in splits}),
            output_features=features,
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            metric_fns=[exact_match, log_likelihood])
    if MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(MIXTURE, list(TASK_NAMES), default_rate=1.0)
    if CONTROL_MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(CONTROL_MIXTURE, ["mtjax_kb_qa"], default_rate=1.0)
