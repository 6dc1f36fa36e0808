"""Text in, JSON records out: what ``mtjax score`` and ``mtjax infer`` do with a loaded model.

Inputs are encoded with the checkpoint's vocabulary plus EOS (as seqio features with
``add_eos=True``), or, with a task name, by that task's own preprocessors (and its
postprocessor turns predictions back into the task's output). Batches have a fixed number of rows
and a power-of-two length, so a file needs only a few compilations.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mtjax import outputs
from mtjax.errors import UserError
from mtjax.infer import batching
from mtjax.infer.decode import EOS_ID, DecodeOptions, Decoder, trim_at_eos
from mtjax.infer.load import LoadedModel
from mtjax.infer.score import Scorer


class InputError(UserError, ValueError):
    """An input file that is missing or malformed; the message names the file and line."""


def read_records(path: str, *, required: Sequence[str] = ("inputs",),
                 allow_text: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file (or ``-`` for stdin).

    Args:
        path: the file, or ``-``.
        required: keys every record must have, with string values.
        allow_text: a line that does not start with ``{`` is the ``inputs`` text itself (one
            that does must be a valid JSON object).

    Raises:
        InputError: missing file, malformed line or missing key (with the line number).
    """
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        file = pathlib.Path(path)
        if file.is_dir():
            raise InputError(f"input {path!r} is a directory; give a file")
        if not file.is_file():
            raise InputError(f"input file {path!r} does not exist")
        data = file.read_bytes()
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1.
        # Lines end at \n (or \r\n) only: str.splitlines() also breaks at U+2028, U+0085,
        # form feeds..., which JSON strings may hold raw (infer and score write them so).
        lines = [line.removesuffix("\r") for line in data.decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError as e:
        number = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{number}: not UTF-8 text (byte {data[e.start]:#04x}); "
                         f"convert the file, e.g. iconv -f latin1 -t utf-8") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = None
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # A line that opens a JSON object was meant as one, even where text is allowed:
                # decoding its broken text would hide the mistake.
                raise InputError(f"{path}:{number}: not a JSON object ({e.msg}); fix the line, "
                                 "or give the text as {\"inputs\": ...}") from None
        if record is None:
            if not allow_text:
                raise InputError(f"{path}:{number}: expected a JSON object with "
                                 f"{', '.join(map(repr, required))}")
            record = {"inputs": line}
        for key in required:
            if not isinstance(record.get(key), str):
                problem = "missing" if key not in record else "non-string"
                raise InputError(f"{path}:{number}: {problem} field {key!r} "
                                 f"(expected string fields: {', '.join(required)})")
        for key, value in record.items():
            if isinstance(value, str) and not _is_text(value):
                raise InputError(f"{path}:{number}: field {key!r} holds a lone UTF-16 "
                                 f"surrogate (an escape such as \\ud800 without its pair), "
                                 f"which is not text; fix the escape")
        records.append(record)
    return records


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fitted_batch_size(batch_size: int, count: int) -> int:
    """``batch_size``, or for fewer records the power of two that holds them: rows are padded
    to the batch size, and 4 lines at --batch-size 8192 decoded 8192 rows (19 s against 9)."""
    return min(batch_size, batching.bucket_length(count, minimum=1))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def encode_texts(vocabulary, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text followed by EOS."""
    eos = EOS_ID if vocabulary.eos_id is None else vocabulary.eos_id
    return [list(vocabulary.encode(text)) + [eos] for text in texts]


_LINE = object()  # the one unnamed field of a source that yields bare lines


class TaskText:
    """A seqio task's preprocessing of raw records, and its postprocessing of predictions."""

    def __init__(self, name: str):
        import seqio

        from mtjax.data import pipeline

        if name not in seqio.TaskRegistry.names():
            pipeline.resolve_task_names(name)  # "did you mean" for unknown names
            raise InputError(f"--task {name!r} is a mixture; give one of its tasks")
        self.task = seqio.TaskRegistry.get(name)

    @functools.cached_property
    def source_fields(self) -> dict[str, Any] | None:
        """The scalar fields the task's source yields and their TF dtypes (None: unknown); built
        once, as it opens the source's dataset."""
        source = self.task.source
        try:
            split = next(iter(source.splits))
            spec = source.get_dataset(split=split, shuffle=False).element_spec
        except Exception:  # noqa: BLE001 - a source that cannot say: records are taken as given
            return None
        if not isinstance(spec, dict):  # lines of a seqio.TextLineDataSource, say
            return {_LINE: spec.dtype} if getattr(spec, "shape", None) == () else None
        return {k: v.dtype for k, v in spec.items() if v.shape.rank == 0}

    def _columns(self, records: Sequence[dict[str, Any]], first: int = 1) -> dict[str, Any]:
        """The records (the input's record ``first`` on) as the source's columns, each in its
        dtype; a missing or mistyped field is an InputError naming the record and the fields
        the task reads."""
        import tensorflow as tf

        fields = self.source_fields
        if fields is None:  # as the records come: their string fields
            keys = sorted({k for r in records for k, v in r.items() if isinstance(v, str)})
            columns = {k: [r.get(k, "") for r in records] for k in keys}
            columns.setdefault("targets", [""] * len(records))
            return columns
        if _LINE in fields:
            # The source yields bare lines: the record's `text`, or the input line itself.
            lines = [r.get("text", r.get("inputs")) for r in records]
            for number, line in enumerate(lines, first):
                if not isinstance(line, str):
                    raise InputError(
                        f"input record {number} has no text: task {self.task.name!r} reads "
                        f"lines from its data source; give each record as a text line, or a "
                        f"'text' field holding the line")
            return {_LINE: tf.constant(lines, dtype=fields[_LINE])}
        wanted = ", ".join(f"{k!r} ({dtype.name})" for k, dtype in fields.items())
        columns = {}
        for key, dtype in fields.items():
            values = []
            for number, record in enumerate(records, first):
                # Targets are what the model predicts: optional here.
                value = record.get(key, "" if key == "targets" and dtype == tf.string else None)
                # TensorFlow takes no fraction as an integer and no number as a bool.
                ok = (isinstance(value, str) if dtype == tf.string else
                      isinstance(value, bool) if dtype == tf.bool else
                      isinstance(value, int) if dtype.is_integer else
                      isinstance(value, bool | int | float))
                if not ok:
                    problem = "lacks" if value is None else "has a wrongly typed"
                    raise InputError(f"input record {number} {problem} field {key!r}: task "
                                     f"{self.task.name!r} reads {wanted} from its data source")
                values.append(value)
            columns[key] = tf.constant(values, dtype=dtype)
        return columns

    def encode(self, records: Sequence[dict[str, Any]],
               first: int = 1) -> tuple[list[list[int]], list[dict]]:
        """(input ids, preprocessed examples) of records holding the task source's fields;
        ``first``: the input's number of the first record, for messages."""
        import tensorflow as tf

        columns = self._columns(records, first)
        dataset = tf.data.Dataset.from_tensor_slices(columns.get(_LINE, columns))
        try:  # tf.data traces the task's functions in map(), and runs them when iterated
            dataset = self.task.preprocess_precache(dataset, seed=0)
            dataset = self.task.preprocess_postcache(dataset, sequence_length=None, seed=0)
            examples = list(dataset.as_numpy_iterator())
        except Exception as e:  # noqa: BLE001 - the task's own code failed on these records
            raise InputError(f"task {self.task.name!r} could not preprocess the records "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give "
                             "each record the fields of the task's data source") from None
        if len(examples) != len(records):
            raise InputError(f"task {self.task.name!r} preprocessing turned {len(records)} "
                             f"records into {len(examples)} examples; cannot pair them up")
        return [[int(x) for x in ex["inputs"]] for ex in examples], examples

    def check_vocabulary(self, vocabulary, step_dir) -> None:
        """The model must read the task's ids: another vocabulary's are other pieces to it."""
        from mtjax.data import vocab as vocab_lib

        for feature in ("inputs", "targets"):
            used = getattr(self.task.output_features.get(feature), "vocabulary", vocabulary)
            if used != vocabulary:
                raise InputError(
                    f"--task {self.task.name!r} uses {vocab_lib.describe(used)}, and the model "
                    f"of {step_dir} reads {vocab_lib.describe(vocabulary)}: give a task defined "
                    f"with the model's vocabulary")

    def postprocess(self, text: str, example: dict) -> Any:
        return self.task.postprocess_fn(text, example=example, is_target=False)


@contextlib.contextmanager
def _out_of_memory_is_an_input_error(done: int, chunk: Sequence[Any], batch_size: int,
                                     input_tokens: int, what: str,
                                     also: str) -> Iterator[None]:
    """A batch too large for the device is the input's or the flags' doing: say which records
    and what to change, not XLA's allocation traceback."""
    try:
        yield
    except Exception as e:  # jax's JaxRuntimeError; its class moved between versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise InputError(
            f"out of memory on records {done + 1}-{done + len(chunk)} (inputs of up to "
            f"{input_tokens} tokens, {what}, batches of {batch_size} rows): lower --batch-size, "
            f"shorten the longest inputs, or {also}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def predict(model: LoadedModel, records: Sequence[dict[str, Any]], options: DecodeOptions, *,
            batch_size: int = 32, task: str | None = None, scores: bool = False,
            progress=None) -> Iterator[dict[str, Any]]:
    """Decode each record's ``inputs``; yields ``{"inputs", "prediction"[, "score"]}`` in order.

    Args:
        model: a loaded checkpoint.
        records: dicts with ``inputs`` (and, with ``task``, the task source's other fields).
        options: decoding options.
        batch_size: rows per compiled batch.
        task: apply this seqio task's preprocessors to the records and its postprocessor to
            the predictions.
        scores: add ``score`` (log-probability sum; beam search: length-normalised).
        progress: called with the number of records done after each batch.
    """
    vocabulary = model.vocabulary
    batch_size = _fitted_batch_size(batch_size, len(records))
    task_text = TaskText(task) if task else None
    if task_text:
        task_text.check_vocabulary(vocabulary, model.step_dir)
        # All records in one pass: a random preprocessor (span corruption) draws each record's
        # noise by its place in the input, not in its batch, so --batch-size changes nothing.
        all_ids, all_examples = task_text.encode(records)
    decoder = Decoder(model.model_def, model.mesh, model.rules)
    done = 0
    for chunk in _chunks(records, batch_size):
        if task_text:
            ids = all_ids[done:done + len(chunk)]
            examples = all_examples[done:done + len(chunk)]
        else:
            ids, examples = encode_texts(vocabulary, (r["inputs"] for r in chunk)), None
        tokens_BS = batching.pad_ids(ids, batching.bucket_length(max(map(len, ids))))
        with _out_of_memory_is_an_input_error(
                done, chunk, batch_size, max(map(len, ids)),
                f"{options.max_decode_length} decoded tokens", "lower --max-decode-length"):
            tokens_BT, scores_B = decoder(model.params, tokens_BS, options,
                                          batch_size=batch_size, first_row=done)
        for i, record in enumerate(chunk):
            text = vocabulary.decode(trim_at_eos(tokens_BT[i], options.eos_id))
            prediction = task_text.postprocess(text, examples[i]) if task_text else text
            inputs = record["inputs"] if "inputs" in record else vocabulary.decode(ids[i])
            out = {"inputs": inputs, "prediction": _jsonable(prediction)}
            if scores:
                out["score"] = float(scores_B[i])
            yield out
        done += len(chunk)
        if progress:
            progress(done)


def score(model: LoadedModel, records: Sequence[dict[str, Any]], *, batch_size: int = 32,
          progress=None) -> Iterator[dict[str, Any]]:
    """Score each record's ``targets`` given its ``inputs``; yields the record plus ``score``
    (float32 sum of target token log-likelihoods, EOS included) and ``num_tokens``."""
    vocabulary = model.vocabulary
    batch_size = _fitted_batch_size(batch_size, len(records))
    scorer = Scorer(model.model_def, model.mesh, model.rules)
    done = 0
    for chunk in _chunks(records, batch_size):
        inputs = encode_texts(vocabulary, (r["inputs"] for r in chunk))
        targets = encode_texts(vocabulary, (r["targets"] for r in chunk))
        batch = batching.score_batch_arrays(
            inputs, targets, inputs_length=batching.bucket_length(max(map(len, inputs))),
            targets_length=batching.bucket_length(max(map(len, targets))))
        with _out_of_memory_is_an_input_error(
                done, chunk, batch_size, max(map(len, inputs)),
                f"targets of up to {max(map(len, targets))} tokens", "shorten the targets"):
            scores_B, counts_B = scorer(model.params, batch, batch_size=batch_size)
        for record, value, count in zip(chunk, scores_B, counts_B, strict=True):
            yield {**record, "score": float(value), "num_tokens": int(count)}
        done += len(chunk)
        if progress:
            progress(done)


def write_jsonl(records: Iterable[dict[str, Any]], path: str | None) -> int:
    """Write records as JSONL; returns their number.

    To a file: it replaces ``path`` once every record is written (a failure or Ctrl-C leaves
    what was there; ``path`` may be the input). To stdout (None or ``-``): a line at a time, and
    a reader that stops early (``| head``) ends the writing quietly.
    """
    if path not in (None, "-"):
        with outputs.replaced_on_success(path) as out:
            return _write_lines(records, out)
    try:
        return _write_lines(records, sys.stdout, flush=True)
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return -1


def _write_lines(records: Iterable[dict[str, Any]], out, flush: bool = False) -> int:
    count = 0
    for record in records:
        out.write(outputs.dumps(record, ensure_ascii=False, default=str) + "\n")
        if flush:
            out.flush()
        count += 1
    return count
