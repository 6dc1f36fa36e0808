"""Helpers to bring the user's own SeqIO tasks into a run, each in one call.

    from mtjax.data import tasks
    tasks.add_file_task("my_qa", {"train": "qa_train.tsv", "validation": "qa_dev.tsv"},
                        columns={"inputs": "question", "targets": "answer"}, header=True)
    tasks.add_tfds_task("cola", "glue/cola:2.0.0",
                        columns={"inputs": "sentence", "targets": "label"}, inputs_prefix="cola: ")
    tasks.add_file_task("my_text_sc", "corpus/*.txt", objective="span_corruption")
    tasks.add_span_corruption_task("my_qa_sc", "my_qa", text_key=("inputs", "targets"))
    tasks.add_mixture("my_mix", ["my_qa", "my_text_sc"], mixing="examples_proportional", cap=2**16)

Every helper registers a `seqio.Task` (replacing one of the same name) whose output features are
`inputs` and `targets` with EOS, and returns it. Sources are TF ops (files, TFDS, in-memory
tensors), never `from_generator`, so the run's input iterator can be checkpointed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import pathlib
import sys
import sysconfig
import traceback
import types
from collections.abc import Callable, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from mtjax.data import objectives
from mtjax.data.files import FileSource, infer_format
from mtjax.data.mixing import add_mixture  # noqa: F401 - re-exported: one import for users
from mtjax.data.vocab import get_vocabulary, run_vocabulary
from mtjax.errors import UserError

OBJECTIVES = ("span_corruption", "prefix_lm")


class TaskDefinitionError(UserError, ValueError):
    """A task helper called with arguments that cannot make a task; the message says why."""


class TasksModuleError(UserError, ImportError):
    """The ``--tasks-module`` could not be imported; the message names it and the cause."""


class TfdsNotPreparedError(UserError, RuntimeError):
    """A TFDS dataset with no prepared data where the task reads; the message says how."""


class TfdsSplitError(UserError, LookupError):
    """A task split mapped to a TFDS split its dataset lacks; the message names both."""


def import_tasks_module(name_or_path: str) -> types.ModuleType:
    """Import a module path (``my_project.tasks``) or a ``.py`` file that registers tasks.

    Importing registers the module's tasks and mixtures with SeqIO before the mixture is looked
    up, which is what an unimported registry module would otherwise make fail.
    """
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = pathlib.Path(name_or_path).absolute()
        if path.is_dir():
            raise TasksModuleError(f"tasks module {name_or_path!r} is a folder; give the .py "
                                   f"file that registers your tasks")
        if not path.is_file():
            # A relative path given in a --config file is read from the current directory,
            # not the config file's: say where it was looked for.
            where = ("" if pathlib.Path(name_or_path).expanduser().is_absolute()
                     else f" (looked for at {path}: a relative path is read from the "
                     f"directory mtjax runs in)")
            raise TasksModuleError(f"tasks module file {name_or_path!r} does not exist{where}")
        if path.suffix != ".py":
            raise _not_python(name_or_path)
        module_name = f"mtjax_user_tasks_{path.stem}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise _failed_import(name_or_path, e) from e
        return module
    try:
        return importlib.import_module(name_or_path)
    except ModuleNotFoundError as e:
        if e.name is not None and not name_or_path.startswith(e.name):
            raise _failed_import(name_or_path, e) from e  # a module the tasks module imports
        if pathlib.Path(name_or_path).is_file():  # `data.tsv`: read as module `tsv` of `data`
            raise _not_python(name_or_path) from e
        as_file = pathlib.Path(*name_or_path.split(".")).with_suffix(".py")
        if as_file.is_file():  # `mtjax` does not put the current directory on sys.path
            raise TasksModuleError(
                f"tasks module {name_or_path!r} not found on Python's module path, but "
                f"{as_file} is here: give the file, --tasks-module {as_file}") from e
        raise TasksModuleError(
            f"tasks module {name_or_path!r} not found ({e}); give an importable module path "
            f"or a .py file") from e
    except Exception as e:
        raise _failed_import(name_or_path, e) from e


def _not_python(name: str) -> TasksModuleError:
    """A file that is no Python module, most likely the task's data file given in its place."""
    return TasksModuleError(f"tasks module file {name!r} is not a .py file; give the Python "
                            f"file that registers your tasks (it names the data files)")


def _failed_import(name_or_path: str, error: Exception) -> TasksModuleError:
    """One line: the error, its type, and where in the user's code it was raised: the last
    frame outside mtjax, seqio, the import machinery, the standard library and installed
    packages (a ``json.loads`` that fails is the user's line calling it, not json's own), else
    the last frame outside the first three (a tasks module installed as a package)."""
    frames = list(reversed(traceback.extract_tb(error.__traceback__)))
    ours = (f"{os.sep}mtjax{os.sep}", f"{os.sep}seqio{os.sep}", "<frozen ")
    installed = tuple(str(pathlib.Path(p)) + os.sep for key, p in sysconfig.get_paths().items()
                      if key in ("stdlib", "platstdlib", "purelib", "platlib"))

    def users(frame, strict: bool) -> bool:
        return not any(part in frame.filename for part in ours) and not (
            strict and frame.filename.startswith(installed))

    where = ""
    for strict in (True, False):
        frame = next((f for f in frames if users(f, strict)), None)
        if frame is not None:
            where = f" (at {frame.filename}:{frame.lineno})"
            break
    if isinstance(error, SyntaxError):
        where = f" (at {error.filename}:{error.lineno})"
        error = SyntaxError(error.msg)
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return TasksModuleError(f"tasks module {name_or_path!r} failed to import{where}: {message}")



# --- Helpers -------------------------------------------------------------------------------------

Files = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def add_file_task(name: str, files: Files, *, columns: Mapping[str, int | str] | None = None,
                  format: str | None = None, header: bool | None = None,  # noqa: A002
                  objective: str | None = None, inputs_prefix: str = "",
                  vocabulary: str | None = None, on_malformed: str | None = None,
                  metric_fns: Sequence[Callable] = (), noise_density: float | None = None,
                  mean_noise_span_length: float = objectives.MEAN_NOISE_SPAN_LENGTH
                  ) -> seqio.Task:
    """Registers a task over local TSV, JSONL or text files.

    Args:
        name: the task's name.
        files: file pattern(s) of the train split, or a mapping split -> pattern(s).
        columns: output feature -> TSV column (index, or header name with header=True) or
            JSONL key. Default: {"inputs": 0, "targets": 1} (TSV), {"inputs": "inputs",
            "targets": "targets"} (JSONL), the line (text). With an `objective`, map one
            column only, e.g. {"text": "body"}; default: column 0 (TSV), key "text" (JSONL).
        format: "tsv", "jsonl" or "text"; default from the extension (.tsv, .jsonl, .txt).
        header: TSV files start with a header line (default: when a column is named).
        objective: None (supervised: needs inputs and targets), "span_corruption" or
            "prefix_lm" (pretraining over one text column).
        inputs_prefix: text put before every input, e.g. "question: ".
        vocabulary: "byte" or a SentencePiece .model path; None: the run's (data.vocabulary).
        on_malformed: "fail" or "skip" malformed lines; None: the run's (data.on_malformed).
        metric_fns: seqio metric functions for evaluation.
        noise_density: of the objective (default 0.15 for span corruption, 0.5 prefix LM).
        mean_noise_span_length: of span corruption.

    Returns:
        The registered seqio.Task.
    """
    splits = _split_map(files)
    fmt = format or infer_format(_first_pattern(splits))
    if columns is None:
        columns = ({"text": "text"} if fmt == "jsonl" and objective else
                   {"text": 0} if fmt == "text" or objective else
                   {"inputs": 0, "targets": 1} if fmt == "tsv" else
                   {"inputs": "inputs", "targets": "targets"})
    if fmt == "jsonl" and not all(isinstance(c, str) for c in columns.values()):
        raise TaskDefinitionError(f"task {name!r}: JSONL columns are record keys (text), got "
                                  f"{dict(columns)}")
    if header is None:
        header = fmt == "tsv" and any(isinstance(c, str) for c in columns.values())
    if fmt == "text" and len(columns) != 1:
        raise TaskDefinitionError(f"task {name!r}: a text file has one column (the line); "
                                  f"got columns {dict(columns)}")
    source = FileSource(splits, fmt, columns, header=header, on_malformed=on_malformed,
                        task_name=name)
    if objective is None:
        _require_supervised(name, columns, fmt)
        preprocessors = _supervised(inputs_prefix)
    else:
        if len(columns) != 1:
            raise TaskDefinitionError(f"task {name!r}: objective {objective!r} reads one "
                                      f"text column; got {dict(columns)}")
        preprocessors = [_text_field(next(iter(columns)), name), seqio.preprocessors.tokenize,
                         _objective(objective, noise_density, mean_noise_span_length),
                         seqio.preprocessors.append_eos_after_trim]
    return _register(name, source, preprocessors, _vocab(vocabulary), metric_fns)


def add_tfds_task(name: str, tfds_name: str, *, columns: Mapping[str, str],
                  splits: Sequence[str] | Mapping[str, str] | None = None,
                  data_dir: str | None = None, objective: str | None = None,
                  inputs_prefix: str = "", vocabulary: str | None = None,
                  metric_fns: Sequence[Callable] = (), noise_density: float | None = None,
                  mean_noise_span_length: float = objectives.MEAN_NOISE_SPAN_LENGTH
                  ) -> seqio.Task:
    """Registers a task over a TFDS dataset already prepared on this machine (no download).

    Args:
        name: the task's name.
        tfds_name: e.g. "glue/cola:2.0.0".
        columns: output feature -> TFDS feature, e.g. {"inputs": "sentence", "targets": "label"};
            class labels become their names, numbers their decimal text. With an objective,
            one entry, e.g. {"text": "text"}.
        splits: split names, or a mapping of split -> TFDS split (e.g. {"validation":
            "train[:5%]"}); None: all of the dataset's splits.
        data_dir: TFDS data directory (default: TFDS's).
        objective, inputs_prefix, vocabulary, metric_fns, noise_density,
        mean_noise_span_length: as for `add_file_task`.

    Returns:
        The registered seqio.Task.
    """
    source = TfdsSource(tfds_name, tfds_data_dir=data_dir, splits=splits)
    select = _tfds_columns(source, dict(columns), name)
    if objective is None:
        _require_supervised(name, columns, "TFDS")
        preprocessors = [select, *_supervised(inputs_prefix)]
    else:
        if len(columns) != 1:
            raise TaskDefinitionError(f"task {name!r}: objective {objective!r} reads one "
                                      f"text column; got {dict(columns)}")
        preprocessors = [select, _text_field(next(iter(columns)), name),
                         seqio.preprocessors.tokenize,
                         _objective(objective, noise_density, mean_noise_span_length),
                         seqio.preprocessors.append_eos_after_trim]
    return _register(name, source, preprocessors, _vocab(vocabulary), metric_fns)


def add_span_corruption_task(name: str, text_task: str, *,
                             text_key: str | Sequence[str] | None = None,
                             noise_density: float = objectives.NOISE_DENSITY,
                             mean_noise_span_length: float = objectives.MEAN_NOISE_SPAN_LENGTH,
                             vocabulary: str | None = None) -> seqio.Task:
    """Registers T5 span corruption over the text of any registered task.

    Args:
        name: the new task's name.
        text_task: a registered task; its source and its preprocessors up to tokenization are
            reused.
        text_key: the raw feature holding the text, or several joined by a space; None:
            "text" if the examples have it, else "targets".
        noise_density: fraction of tokens masked (T5: 0.15).
        mean_noise_span_length: mean masked span length (T5: 3).
        vocabulary: None: the text task's targets vocabulary.

    Returns:
        The registered seqio.Task.
    """
    return _derived(name, text_task, text_key, vocabulary, objectives.span_corruption(
        noise_density, mean_noise_span_length))


def add_prefix_lm_task(name: str, text_task: str, *, text_key: str | Sequence[str] | None = None,
                       noise_density: float = 0.5, vocabulary: str | None = None) -> seqio.Task:
    """Registers prefix-LM pretraining (T5) over the text of any registered task.

    Arguments as for `add_span_corruption_task`; `noise_density` is the mean fraction of a
    chunk that becomes targets, at most 0.5 (T5's 0.5: a split point uniform over the chunk).
    """
    return _derived(name, text_task, text_key, vocabulary, objectives.prefix_lm(noise_density))


class TfdsSource(seqio.TfdsDataSource):
    """`seqio.TfdsDataSource` that reads prepared data only and copes with TFDS metadata
    lacking split information.

    It never downloads or generates a dataset (seqio's default calls ``tfds.load(...,
    download=True)``); data that is not there is one line saying how to provide it. Without
    split information its size is None (not a KeyError), and its split one shard, so hosts
    shard examples.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, read_only=True, **kwargs)

    def _not_prepared(self) -> TfdsNotPreparedError:
        builder = self.tfds_dataset.builder
        name = self.tfds_dataset.name
        return TfdsNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (mtjax reads TFDS "
            f"data offline): prepare it where the internet is reachable (`tfds build {name} "
            f"--data_dir DIR`), copy DIR here, and pass add_tfds_task(..., data_dir=DIR) or "
            f"set TFDS_DATA_DIR")

    @property
    def splits(self):
        splits = super().splits
        if not splits and not self.tfds_dataset.builder.is_prepared():
            raise self._not_prepared()
        return splits

    @contextlib.contextmanager
    def _split_named(self, split: str) -> Iterator[None]:
        """TFDS's "Unknown split 'x'. Should be one of [...]" as one line naming the task's
        split and the fix."""
        try:
            yield
        except ValueError as e:
            if not str(e).startswith("Unknown split"):
                raise
            raise TfdsSplitError(
                f"task split {split!r} of TFDS dataset {self.tfds_dataset.name!r}: {e} "
                f"(fix splits= in add_tfds_task)") from None

    def get_dataset(self, split: str = "train", *args, **kwargs) -> tf.data.Dataset:
        try:
            with self._split_named(split):
                return super().get_dataset(split, *args, **kwargs)
        except AssertionError as e:  # TFDS's own way of saying it: "could not find data"
            if "could not find data" in str(e):
                raise self._not_prepared() from None
            raise

    def num_input_examples(self, split: str) -> int | None:
        try:
            with self._split_named(split):
                return super().num_input_examples(split)
        except KeyError:  # metadata without split information
            return None

    def list_shards(self, split: str):
        try:
            with self._split_named(split):
                return super().list_shards(split)
        except KeyError:
            return [split]


# --- Internals -----------------------------------------------------------------------------------


def _split_map(files: Files) -> dict[str, str | Sequence[str]]:
    if isinstance(files, Mapping):
        return dict(files)
    return {"train": files}


def _first_pattern(splits: Mapping[str, str | Sequence[str]]) -> str:
    first = next(iter(splits.values()))
    return first if isinstance(first, str) else first[0]


def _vocab(name: str | None) -> seqio.Vocabulary:
    return run_vocabulary() if name is None else get_vocabulary(name)


def _require_supervised(name: str, columns: Mapping, where: str) -> None:
    missing = [k for k in ("inputs", "targets") if k not in columns]
    if missing:
        raise TaskDefinitionError(
            f"task {name!r}: columns {dict(columns)} map no {' or '.join(missing)}; a "
            f"supervised {where} task needs both 'inputs' and 'targets' (or pass "
            f"objective={OBJECTIVES[0]!r} or {OBJECTIVES[1]!r} with one text column)")


def _supervised(inputs_prefix: str) -> list:
    preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    if inputs_prefix:
        @seqio.map_over_dataset
        def add_prefix(ex):
            return {**ex, "inputs": tf.strings.join([inputs_prefix, ex["inputs"]])}

        preprocessors.insert(0, add_prefix)
    return preprocessors


def _objective(objective: str, noise_density: float | None, mean_noise_span_length: float):
    if objective == "span_corruption":
        return objectives.span_corruption(
            objectives.NOISE_DENSITY if noise_density is None else noise_density,
            mean_noise_span_length)
    if objective == "prefix_lm":
        return objectives.prefix_lm(0.5 if noise_density is None else noise_density)
    raise TaskDefinitionError(f"objective must be one of {OBJECTIVES} or None, got {objective!r}")


def _text_field(text_key: str | Sequence[str] | None, task_name: str):
    """Preprocessor: raw examples -> {"targets": text}, checked against the examples' keys."""

    def preprocessor(dataset: tf.data.Dataset) -> tf.data.Dataset:
        keys = sorted(dataset.element_spec)
        wanted = text_key or ("text" if "text" in keys else "targets")
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        missing = [k for k in wanted if k not in keys]
        if missing:
            raise TaskDefinitionError(
                f"task {task_name!r}: text_key {missing} not among the examples' features "
                f"{keys}; pass text_key=")
        return dataset.map(
            lambda ex: {"targets": tf.strings.reduce_join([ex[k] for k in wanted], separator=" ")},
            num_parallel_calls=tf.data.AUTOTUNE)

    return preprocessor


def _tfds_columns(source: seqio.TfdsDataSource, columns: dict[str, str], task_name: str):
    """Preprocessor: TFDS examples -> one string per mapped column (labels by name)."""

    def preprocessor(dataset: tf.data.Dataset) -> tf.data.Dataset:
        spec = dataset.element_spec
        missing = [c for c in columns.values() if c not in spec]
        if missing:
            raise TaskDefinitionError(
                f"task {task_name!r}: TFDS features {missing} not in {sorted(spec)}")
        info_features = source.tfds_dataset.info.features
        names = {c: tf.constant(info_features[c].names) for c in columns.values()
                 if hasattr(info_features[c], "names")}

        def select(ex):
            out = {}
            for key, column in columns.items():
                value = ex[column]
                if column in names:
                    value = tf.gather(names[column], value)
                elif value.dtype != tf.string:
                    value = _number_text(value)
                out[key] = value
            return out

        return dataset.map(select, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocessor


def _number_text(value: tf.Tensor) -> tf.Tensor:
    """A number's shortest decimal text that reads back as the same value: 3.8, 1e-07,
    12345678 (tf.strings.as_string alone writes six decimals: 3.800000, 0.000000), and ints
    and bools as they are."""
    if not value.dtype.is_floating:
        return tf.strings.as_string(value)
    if value.dtype not in (tf.float32, tf.float64):
        value = tf.cast(value, tf.float32)  # float16, bfloat16: exact in float32
    digits = 17 if value.dtype == tf.float64 else 9  # enough for any value to read back
    text = tf.strings.as_string(value, precision=digits, shortest=True)
    for precision in range(digits - 1, 0, -1):
        shorter = tf.strings.as_string(value, precision=precision, shortest=True)
        reads_back = tf.equal(tf.strings.to_number(shorter, value.dtype), value)
        text = tf.where(reads_back & (tf.strings.length(shorter) <= tf.strings.length(text)),
                        shorter, text)
    return text


def _before_tokenization(task: seqio.Task) -> list:
    """A task's preprocessors that run on raw text (those before its tokenize step)."""
    out = []
    for p in task.preprocessors:
        fn = p.func if isinstance(p, functools.partial) else p
        if fn in (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos):
            break
        if not isinstance(p, seqio.CacheDatasetPlaceholder):
            out.append(p)
    return out


def _derived(name: str, text_task: str, text_key, vocabulary: str | None, objective) -> seqio.Task:
    from mtjax.data.pipeline import lookup

    base = lookup(text_task)
    if isinstance(base, seqio.Mixture):
        raise TaskDefinitionError(f"{text_task!r} is a mixture; give one of its tasks")
    vocab = (base.output_features["targets"].vocabulary if vocabulary is None
             else get_vocabulary(vocabulary))
    preprocessors = [*_before_tokenization(base), _text_field(text_key, name),
                     seqio.preprocessors.tokenize, objective,
                     seqio.preprocessors.append_eos_after_trim]
    return _register(name, base.source, preprocessors, vocab, ())


def _register(name: str, source: seqio.DataSource, preprocessors: list,
              vocab: seqio.Vocabulary, metric_fns: Sequence[Callable]) -> seqio.Task:
    """Registers (or replaces) a text-to-text task with EOS on inputs and targets."""
    features = {k: seqio.Feature(vocabulary=vocab, add_eos=True) for k in ("inputs", "targets")}
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=source, output_features=features,
                                  preprocessors=preprocessors, metric_fns=list(metric_fns))
