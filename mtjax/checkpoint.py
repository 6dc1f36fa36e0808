"""Orbax checkpoints of a run: train state, input-pipeline position per host, config, metrics.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config,metrics}`` written by one Orbax
``CheckpointManager``. Orbax writes each step into a temporary directory and commits it by
renaming, so a save killed half-way is never listed as a step. A step directory that is there but
incomplete or unreadable anyway (copied half-way, disk full, files lost) is moved aside to
``<step>.incomplete`` with a message, and the run resumes from the newest complete one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from mtjax.errors import UserError
from mtjax.parallel import distributed


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run; the message says which."""


# The items of a step directory (the CheckpointManager's item_handlers below, plus the metrics
# best_fn makes it keep).
LOG_WINDOW_ITEM = "log_window"
ITEMS = ("state", "data", "config", "metrics", LOG_WINDOW_ITEM)


class _ItemMetadataExpected(logging.Filter):
    """Orbax warns "Metadata file does not exist" for any directory restored without its own
    _CHECKPOINT_METADATA; that file sits in the step directory, so restoring one item of a step
    (the parameters for eval, infer, score, conversion; the config) always warned. A step
    directory without it still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Metadata file does not exist: "):
            return True
        metadata_file = pathlib.PurePath(record.getMessage().split(": ", 1)[1])
        return metadata_file.parent.name not in ITEMS


logging.getLogger("absl").addFilter(_ItemMetadataExpected())


class Checkpointable(Protocol):
    """An input pipeline whose position can be written to and read from a directory."""

    def save(self, path: str) -> None: ...
    def restore(self, path: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Input-pipeline position: one small tf.data checkpoint per host, snapshotted synchronously
# (the iterator moves on as soon as training continues) and written asynchronously.
# ---------------------------------------------------------------------------------------------

def snapshot_pipeline(pipeline: Checkpointable) -> dict[str, bytes]:
    """The pipeline's position as file name → bytes, taken now."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.save(tmp)
        return _read_tree(pathlib.Path(tmp))


def _read_tree(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


def load_pipeline(pipeline: Checkpointable, files: dict[str, bytes]) -> None:
    """Move ``pipeline`` to the position in ``files`` (from :func:`snapshot_pipeline`)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = pathlib.Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        pipeline.restore(tmp)


class PipelineHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Writes each host's pipeline files under ``process_<index>/``."""

    async def async_save(self, directory: epath.Path, args: PipelineSave):
        async def write() -> None:
            target = directory / f"process_{jax.process_index()}"
            target.mkdir(parents=True, exist_ok=True)
            if jax.process_index() == 0:  # so that a host's missing position shows
                (directory / _PROCESS_COUNT_FILE).write_text(f"{jax.process_count()}\n")
            for name, data in args.files.items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(data)

        return [ocp_future.CommitFutureAwaitingContractedSignals(write(), name="mtjax_data")]

    def save(self, directory: epath.Path, args: PipelineSave) -> None:
        from orbax.checkpoint._src import asyncio_utils

        async def run() -> None:
            for f in await self.async_save(directory, args):
                f.result()

        asyncio_utils.run_sync(run())

    def restore(self, directory: epath.Path, args: PipelineRestore | None = None):
        source = directory / f"process_{jax.process_index()}"
        if not source.exists():
            raise CheckpointError(
                f"{directory} holds no input-pipeline position for process "
                f"{jax.process_index()}; was it written by a run with fewer hosts?")
        return _read_tree(pathlib.Path(source))


@ocp.args.register_with_handler(PipelineHandler, for_save=True)
@dataclasses.dataclass
class PipelineSave(ocp.args.CheckpointArgs):
    files: dict[str, bytes]


@ocp.args.register_with_handler(PipelineHandler, for_restore=True)
@dataclasses.dataclass
class PipelineRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------------------------------------
# The run's checkpoint manager.
# ---------------------------------------------------------------------------------------------

# Files Orbax writes last when it commits a step and an item (see ``_is_complete``).
_COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/commit_success.txt",
                   "config/commit_success.txt")
INCOMPLETE_SUFFIX = ".incomplete"


# The JSON files of a step: Orbax's commit record (written last: cut short, the commit did not
# finish; a commit marker, so always there), the state's tree and shardings, the run config, the
# metrics and the logging window (where saved); each must parse, or the step is not used. (A
# damaged array file shows only when read: `mtjax train` then sets the step aside.)
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "config/metadata",
               "metrics/metrics", f"{LOG_WINDOW_ITEM}/metadata")
_PROCESS_COUNT_FILE = "num_processes"  # in data/: how many hosts wrote their position (not
# named process_*: those are the positions)


def _is_complete(step_dir: pathlib.Path) -> bool:
    if not all((step_dir / marker).exists() for marker in _COMMIT_MARKERS):
        return False
    for name in _JSON_FILES:
        path = step_dir / name
        if path.exists():
            try:
                if not isinstance(json.loads(path.read_text()), dict):
                    return False
            except (OSError, ValueError):
                return False
    return _data_complete(step_dir / "data")


def _data_complete(data: pathlib.Path) -> bool:
    """Every host's input position is there (a step saved without a pipeline has no data/)."""
    if not data.is_dir():
        return True
    written = _positions_written(data)
    try:
        return written == int((data / _PROCESS_COUNT_FILE).read_text())
    except (OSError, ValueError):  # written before the count was recorded
        return written > 0


def _positions_written(data: pathlib.Path) -> int:
    """How many hosts' input positions a step's ``data/`` holds (0: none, or no ``data/``)."""
    return len(list(data.glob("process_*"))) if data.is_dir() else 0


def _log(message: str) -> None:
    distributed.log(f"mtjax: {message}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def metric_key_fn(metric: str, mode: str):
    """The value Orbax ranks a checkpoint's metrics by; a missing or NaN metric ranks worst."""
    worst = math.inf if mode == "min" else -math.inf

    def get(metrics: dict[str, float]) -> float:
        value = metrics.get(metric) if metrics else None
        return worst if value is None or not math.isfinite(value) else float(value)

    return get


class RunCheckpoints:
    """Saves and restores a run's checkpoints in ``<workdir>/checkpoints``.

    Keeps the latest ``keep`` steps plus the best ``keep_best`` by ``best_metric`` (a key of the
    metrics saved with each step, ``best_mode`` "min" or "max"); Orbax never deletes the latest.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int,
                 async_save: bool = True, keep_best: int = 0, best_metric: str = "loss",
                 best_mode: str = "min", read_only: bool = False):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every_steps = every_steps
        self.best_metric, self.best_mode = best_metric, best_mode
        self.set_aside: list[int] = []  # steps this process found incomplete and moved aside
        if not read_only:
            self._set_aside_incomplete()
        policies = ocp.checkpoint_managers
        latest = policies.LatestN(n=keep)
        preservation = latest if not keep_best else policies.AnyPreservationPolicy([
            latest,
            # BestN keeps the end of an ascending sort: reverse it when smaller is better.
            policies.BestN(get_metric_fn=metric_key_fn(best_metric, best_mode),
                           reverse=best_mode == "min", n=keep_best)])
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            preservation_policy=None if read_only else preservation,
            # best_fn makes Orbax store each step's metrics (the `metrics` item).
            best_fn=metric_key_fn(best_metric, best_mode), best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": PipelineHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           LOG_WINDOW_ITEM: ocp.JsonCheckpointHandler()},
        )

    def _set_aside_incomplete(self) -> None:
        """Rename step directories that lack Orbax's commit markers or whose metadata does not
        parse; process 0 renames, and every host notes which (read before the renames), so that
        all of them know when nothing of the run was left to resume."""
        found = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
        incomplete = [p for p in found if p.name.isdigit() and not _is_complete(p)]
        self.set_aside = [int(p.name) for p in incomplete]
        _sync("mtjax_checkpoint_scanned")
        if jax.process_index() == 0:
            for step_dir in incomplete:
                self._quarantine(int(step_dir.name),
                                 "is incomplete (a save cut short, or a damaged metadata file)")
        _sync("mtjax_checkpoint_scan")

    def _quarantine(self, step: int, why: str) -> None:
        step_dir = self.directory / str(step)
        target = step_dir.with_name(step_dir.name + INCOMPLETE_SUFFIX)
        n = 1
        while target.exists():
            target, n = step_dir.with_name(f"{step_dir.name}{INCOMPLETE_SUFFIX}{n}"), n + 1
        step_dir.rename(target)
        _log(f"checkpoint {step_dir} {why}; moved aside to {target.name}, not used")

    def save_due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, pipeline: Checkpointable | None,
             config: dict[str, Any], metrics: dict[str, float] | None = None,
             force: bool = False, log_window: dict[str, Any] | None = None) -> bool:
        """Start saving ``step`` (asynchronously); returns whether a save was started.

        ``log_window``: the metrics of the steps since the last logged row, where a stop comes
        between logging steps (JSON; see :meth:`log_window`)."""
        if not force and not self._manager.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if log_window is not None:
            items[LOG_WINDOW_ITEM] = ocp.args.JsonSave(log_window)
        if pipeline is not None:
            items["data"] = PipelineSave(snapshot_pipeline(pipeline))
        # {} rather than None: a step without metrics ranks worst (metric_key_fn), and Orbax
        # warns at every save that is given None.
        return self._manager.save(step, args=ocp.args.Composite(**items),
                                  metrics={} if metrics is None else metrics, force=force)

    def best_step(self) -> int | None:
        """The saved step with the best ``best_metric`` (None without checkpoints)."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict[str, float] | None:
        return self._manager.metrics(step)

    def saved_process_count(self, step: int) -> int:
        """How many hosts wrote an input-pipeline position into ``step`` (0: none)."""
        return _positions_written(self.directory / str(step) / "data")

    def restore_latest(self, abstract_state: Any, pipeline: Checkpointable | None,
                       check=None) -> tuple[int, Any, bool] | None:
        """The newest checkpoint that restores, as (step, state, whether ``pipeline`` was moved
        to its saved position); None when there is none.

        ``check(step, saved_config)`` may raise to refuse a checkpoint of another run (that is
        the user's error, not damage). A checkpoint that fails to read is moved aside with a
        message and the next older one is tried.
        """
        damaged = list(self.set_aside)
        for step in sorted(self.all_steps(), reverse=True):
            if check is not None:
                check(step, self.restore_config(step))
            if pipeline is not None and self.saved_process_count(step) != jax.process_count():
                _log(f"checkpoint {step} was written by {self.saved_process_count(step)} "
                     f"host(s), this run has {jax.process_count()}: the input stream restarts "
                     f"from a fresh shuffle (seeded by the step) instead of its exact position")
                pipeline = None
            try:
                return step, self.restore(step, abstract_state, pipeline), pipeline is not None
            except _PositionDoesNotFit as e:
                # The weights and optimizer state are good: losing them (setting the checkpoint
                # aside as damaged) for a changed task or reader would cost the whole run.
                _log(f"the input position saved in checkpoint {step} does not fit this run's "
                     f"input pipeline (a task's definition, or mtjax's reader, changed since "
                     f"it was saved): the input stream restarts from a fresh shuffle (seeded by "
                     f"the step) instead of its exact position")
                return step, e.state, False
            except CheckpointError as e:
                if not _looks_damaged(e):
                    raise
                if jax.process_index() == 0:
                    self._quarantine(step, f"cannot be read ({_short(e.__cause__)})")
                _sync(f"mtjax_quarantine_{step}")
                self._manager.reload()
                damaged.append(step)
        if damaged:
            # Starting over here would silently train from step 0 on top of the run's outputs.
            moved = ", ".join(map(str, sorted(damaged, reverse=True)))
            moved = f"steps {moved} were" if len(damaged) > 1 else f"step {moved} was"
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read ({moved} set aside as "
                f"<step>{INCOMPLETE_SUFFIX}); run the same command again to start this run "
                f"over from step 0 (its metrics are then rewritten), or give a new --workdir")
        return None

    def restore(self, step: int, abstract_state: Any, pipeline: Checkpointable | None) -> Any:
        """Restore ``step`` onto ``abstract_state``'s shapes and shardings; moves ``pipeline``."""
        _quiet_failed_reads()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if pipeline is not None:
            items["data"] = PipelineRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, OSError) as e:
            _note_failed_restore()
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this run "
                f"(changed model, optimizer or data?): {_short(e)}. Use a new --workdir, or "
                f"--init-from to start from its weights only") from e
        except Exception as e:  # Orbax reports a damaged array file as a bare Exception
            _note_failed_restore()
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be read: {_short(e)}") from e
        if pipeline is not None:
            try:
                load_pipeline(pipeline, restored["data"])
            except Exception as e:  # e.g. a truncated iterator file: "Read less bytes"
                if _says_dataset_changed(e):
                    raise _PositionDoesNotFit(restored["state"]) from e
                raise CheckpointError(
                    f"the input position in checkpoint {self.directory / str(step)} cannot be "
                    f"read: {_short(e)}") from e
        return restored["state"]

    def log_window(self, step: int) -> dict[str, Any] | None:
        """The logging window saved with ``step`` (None: it was saved at a logging step)."""
        item = self.directory / str(step) / LOG_WINDOW_ITEM
        return read_json_item(item) if item.is_dir() else None

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


_ORBAX_READ_ERROR = "Encountered error while reading array index"


# Set once a restore has failed (and been reported in one line): the errors of its other
# tasks that asyncio finds unretrieved later are echoes of that one.
_restore_failed = False


def _raised_in_orbax(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        if f"orbax{os.sep}checkpoint" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _orbax_read_noise(exc: BaseException | None) -> bool:
    """An echo of one failed restore: Orbax's other read tasks failing alike (a damaged file,
    or a shape that does not fit), TensorStore's own futures for them ("OUT_OF_RANGE: Error
    reading ..."), or TensorStore's callbacks reaching the closed event loop of that restore."""
    if exc is not None and _restore_failed and _raised_in_orbax(exc):
        return True
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        type(exc) is Exception and str(exc).startswith(_ORBAX_READ_ERROR)) or (
        isinstance(exc, ValueError) and bool(re.match(r"[A-Z_]+: Error reading ", str(exc))))


class _DropOrbaxReadNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _orbax_read_noise(record.exc_info[1]))


def _note_failed_restore() -> None:
    global _restore_failed
    _restore_failed = True


@functools.cache
def _quiet_failed_reads() -> None:
    """A damaged checkpoint fails one read per array: restore reports it in one line, but
    asyncio logged every other failed task ("Task exception was never retrieved") and
    TensorStore's threads printed a traceback per late callback, thousands of lines in all.
    Only those two kinds of message are dropped."""
    logging.getLogger("asyncio").addFilter(_DropOrbaxReadNoise())
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if not _orbax_read_noise(value):
            previous(kind, value, traceback)

    sys.excepthook = excepthook
    previous_unraisable = sys.unraisablehook

    def unraisablehook(unraisable):
        if not _orbax_read_noise(unraisable.exc_value):
            previous_unraisable(unraisable)

    sys.unraisablehook = unraisablehook


class _PositionDoesNotFit(Exception):
    """A checkpoint whose state restored, and whose input position was saved by an input
    pipeline of another structure (``state``: the restored train state)."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state


def _says_dataset_changed(error: BaseException) -> bool:
    """tf.data's refusal of an iterator position saved by a dataset of another structure (its
    NotFoundError: "Make sure the dataset definition has not changed ...")."""
    return (type(error).__name__ == "NotFoundError"
            and "dataset definition has not changed" in str(error))


def _looks_damaged(error: CheckpointError) -> bool:
    """Files of the checkpoint are missing or damaged (set it aside, try an older one), as
    opposed to a checkpoint of another run (the user's change) or a failure of this machine
    (out of memory: an older checkpoint would fail alike, and this one is fine)."""
    cause = error.__cause__
    if not isinstance(cause, Exception) or isinstance(cause, (KeyError, MemoryError)):
        return False
    text = str(cause).lower()
    if "resource_exhausted" in text or "out of memory" in text:
        return False
    return not _looks_mismatched(error)


def _looks_mismatched(error: CheckpointError) -> bool:
    """A shape or tree mismatch (the user's change), as opposed to unreadable files."""
    text = str(error.__cause__).lower()
    if _says_unreadable(error.__cause__):
        return False
    return any(word in text for word in ("shape", "structure", "mismatch", "missing key",
                                         "dtype"))


def _says_unreadable(cause: BaseException | None) -> bool:
    """The error of a read that found files of the checkpoint missing or damaged."""
    if type(cause) is Exception:  # Orbax reports a damaged array file as a bare Exception
        return True
    text = str(cause).lower()
    return any(word in text for word in ("not_found", "error reading", "data_loss", "corrupt",
                                         "no such file", "unexpected end", "error while reading",
                                         "out_of_range", "read less bytes"))


def _short(error: BaseException | None, limit: int = 240) -> str:
    if type(error) is Exception and error.__cause__ is not None:
        error = error.__cause__  # Orbax's "error while reading array index" wraps the reason
    # Orbax appends the whole TensorStore spec to a failed read: the part before says it all.
    text = " ".join(str(error).split(" See full TensorStore details")[0].split())
    return text if len(text) <= limit else text[:limit] + " ..."


def run_dir_of(step_dir: pathlib.Path) -> pathlib.Path:
    """The run directory of a checkpoint step: ``<run>/checkpoints/<step>`` -> ``<run>``; a
    step directory outside a ``checkpoints/`` folder belongs to its parent."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def find_state_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The ``state`` item of a checkpoint given as a run dir, its ``checkpoints/`` or one step."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a run directory, its "
                              f"checkpoints/ folder, or one checkpoint step directory")
    if (path / "state").is_dir():
        return _complete_state_dir(path) if path.name.isdigit() else path / "state"
    if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()):
        raise CheckpointError(f"{path} is a Hugging Face model, not an mtjax checkpoint: "
                              f"convert it first (mtjax convert {path} DIR) and give DIR")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    # Every step directory, whole or not: the latest one cut short is named, not skipped.
    steps = sorted((int(p.name), p) for p in root.glob("*") if p.name.isdigit() and p.is_dir())
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint under {path}; give a run directory, its checkpoints/ "
            f"folder, or one checkpoint step directory")
    return _complete_state_dir(steps[-1][1])


def _complete_state_dir(step_dir: pathlib.Path) -> pathlib.Path:
    """``step_dir/state``, or the error naming the step as incomplete and an older one (reading
    commands move nothing, and do not fall back silently to an older checkpoint)."""
    if not _is_complete(step_dir):
        raise unreadable(step_dir, OSError("it is incomplete: a save cut short?"))
    return step_dir / "state"


def restore_params(path: str | pathlib.Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, onto ``abstract_params``' shapes and shardings."""
    state_dir = find_state_dir(path)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                abstract_params)
    _quiet_failed_reads()
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True))
    except Exception as e:
        _note_failed_restore()
        if _says_unreadable(e):
            raise unreadable(state_dir.parent, e) from e
        if not isinstance(e, (ValueError, KeyError, FileNotFoundError)):
            raise
        # Orbax's advice (strict=False, ArrayRestoreArgs) is about its API, not this command.
        reason = str(e).split(" Truncating/padding")[0].strip()
        hint = ""
        if "shape" in reason:
            saved = _saved_model_name(state_dir.parent)
            hint = ("; --init-from needs a checkpoint of the same model size and vocabulary"
                    + (f" (it holds {saved})" if saved else ""))
        raise CheckpointError(f"cannot take weights from {state_dir}: {reason}{hint}") from e
    return restored["params"]


def _no_metadata_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to get item metadata from directory")


def tree_metadata(state_dir: pathlib.Path) -> Any:
    """The saved tree of ``state`` (shapes and dtypes), for commands that only read a
    checkpoint; damaged metadata raises :func:`unreadable`."""
    try:
        # Orbax takes unreadable metadata for absent metadata: a warning, and None.
        json.loads((state_dir / "_METADATA").read_text())
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_no_metadata_warning)
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
        finally:
            absl_logger.removeFilter(_no_metadata_warning)
        tree = getattr(metadata, "item_metadata", metadata)
        if tree is None:
            raise OSError(f"no readable tree metadata in {state_dir}")
    except Exception as e:
        raise unreadable(state_dir.parent, e) from e
    return tree


def read_json_item(item_dir: pathlib.Path) -> dict[str, Any]:
    """A JSON item of a checkpoint step (``config``, ``metrics``); damage raises
    :func:`unreadable`."""
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item_dir)
    except Exception as e:
        raise unreadable(item_dir.parent, e) from e


def unreadable(step_dir: pathlib.Path, error: BaseException) -> CheckpointError:
    """A checkpoint whose files are damaged, for commands that only read it: the error names the
    older checkpoints of the run to use instead (nothing is moved; ``mtjax train`` sets damaged
    checkpoints aside when it resumes)."""
    older = sorted((int(p.name) for p in step_dir.parent.glob("*")
                    if p.name.isdigit() and _is_complete(p)
                    and step_dir.name.isdigit() and int(p.name) < int(step_dir.name)),
                   reverse=True)
    fix = (f"give an older one instead, e.g. {step_dir.parent / str(older[0])} "
           f"(complete: {', '.join(map(str, older))})" if older
           else "no older checkpoint of this run is complete")
    return CheckpointError(f"checkpoint {step_dir} cannot be read, its files are damaged "
                           f"({_short(error, 160)}); {fix}")


def _recorded_config(step_dir: pathlib.Path) -> dict[str, Any]:
    """The run config a checkpoint step recorded ({} where it recorded none); read as a file,
    without Orbax."""
    config_file = step_dir / "config" / "metadata"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _saved_model_name(step_dir: pathlib.Path) -> str | None:
    """model.name in a checkpoint's recorded config, where there is one."""
    try:
        return _recorded_config(step_dir)["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Listing a run's checkpoints (``mtjax checkpoints RUN_DIR``).
# ---------------------------------------------------------------------------------------------

def list_checkpoints(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """Every checkpoint of a run: step, commit time, bytes, metrics; which is latest and best.

    Reads files only (no Orbax manager, nothing moved). Directories set aside as incomplete are
    listed under ``incomplete``.
    """
    run_dir = pathlib.Path(run_dir).absolute()
    # Also take what the other commands take: the checkpoints/ folder or one step of it.
    if run_dir.name.isdigit() and run_dir.parent.name == "checkpoints":
        run_dir = run_dir.parent.parent
    elif run_dir.name == "checkpoints" and not (run_dir / "checkpoints").is_dir():
        run_dir = run_dir.parent
    root = run_dir / "checkpoints"
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist; give a run directory")
    if not root.is_dir():
        raise CheckpointError(f"{run_dir} holds no checkpoints/ folder; give a run directory")
    config = {}
    rows, incomplete = [], []
    for step_dir in sorted(root.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not step_dir.name.isdigit():
            if INCOMPLETE_SUFFIX in step_dir.name or ".orbax-checkpoint-tmp" in step_dir.name:
                incomplete.append(step_dir.name)
            continue
        if not _is_complete(step_dir):
            incomplete.append(step_dir.name)
            continue
        meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
        metrics_file = step_dir / "metrics" / "metrics"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({
            "step": int(step_dir.name),
            "time": meta.get("commit_timestamp_nsecs", 0) / 1e9,
            "bytes": sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file()),
            "metrics": metrics,
            "hosts": _positions_written(step_dir / "data"),
            "path": str(step_dir),
        })
        config = _recorded_config(step_dir) or config
    rows.sort(key=lambda r: r["step"])
    checkpoint_config = config.get("checkpoint", {})
    metric = checkpoint_config.get("best_metric", "loss")
    mode = checkpoint_config.get("best_mode", "min")
    ranked = [r for r in rows if metric in r["metrics"]
              and math.isfinite(r["metrics"][metric])]
    best = None
    if ranked:
        pick = min if mode == "min" else max
        best = pick(ranked, key=lambda r: r["metrics"][metric])["step"]
    return {"run_dir": str(run_dir), "checkpoints": rows, "incomplete": incomplete,
            "latest": rows[-1]["step"] if rows else None, "best": best,
            "best_metric": metric, "best_mode": mode}
