"""The run's checkpoint manager: saves a run's steps (state, input position, config, metrics)
with one Orbax ``CheckpointManager``, keeps the latest and best, and restores the newest step
that reads, setting damaged ones aside."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtjax.checkpoint import digest
from mtjax.checkpoint.failures import (
    _looks_damaged,
    _says_dataset_changed,
    _short,
    _this_machine_failed,
)
from mtjax.checkpoint.layout import (
    INCOMPLETE_SUFFIX,
    LOG_WINDOW_ITEM,
    CheckpointError,
    _is_complete,
    _positions_written,
)
from mtjax.checkpoint.pipeline import (
    Checkpointable,
    PipelineHandler,
    PipelineRestore,
    PipelineSave,
    load_pipeline,
    snapshot_pipeline,
)
from mtjax.checkpoint.quiet import _note_failed_restore, _quiet_failed_reads
from mtjax.checkpoint.read import read_json_item
from mtjax.errors import InputPositionMismatch
from mtjax.parallel import distributed


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


class _PositionDoesNotFit(Exception):
    """A checkpoint whose state restored, and whose input position was saved by an input
    pipeline of another structure (``state``: the restored train state; ``why``: what changed,
    as far as known)."""

    def __init__(self, state: Any, why: str) -> None:
        super().__init__()
        self.state, self.why = state, why


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
        # The digests wait for the state to be computed, as the save's copy off the device does.
        items = {"state": ocp.args.StandardSave(
                     state, custom_metadata={digest.KEY: digest.compute(state)}),
                 "config": ocp.args.JsonSave(config)}
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
        message and the next older one is tried. One whose saved tree does not fit this run
        is the user's change only while no older step of the run fits: a damaged metadata
        file of the newest step reads exactly like a changed model, and the older step that
        restores tells the two apart.
        """
        damaged = list(self.set_aside)
        misfits: list[tuple[int, CheckpointError]] = []  # newest first
        for step in sorted(self.all_steps(), reverse=True):
            if not (self.directory / str(step) / "data").is_dir():
                # Every training save holds the input position: this is `mtjax convert`'s.
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} holds weights only (as mtjax "
                    f"convert writes them), not a run to resume: start a run from it with "
                    f"--init-from {self.directory.parent} and a new --workdir")
            if check is not None:
                check(step, self.restore_config(step))
            if pipeline is not None and self.saved_process_count(step) != jax.process_count():
                _log(f"checkpoint {step} was written by {self.saved_process_count(step)} "
                     f"host(s), this run has {jax.process_count()}: the input stream restarts "
                     f"from a fresh shuffle (seeded by the step) instead of its exact position")
                pipeline = None
            try:
                restored = step, self.restore(step, abstract_state, pipeline), pipeline is not None
            except _PositionDoesNotFit as e:
                # The weights and optimizer state are good: losing them (setting the checkpoint
                # aside as damaged) for a changed task or reader would cost the whole run.
                _log(f"the input position saved in checkpoint {step} does not fit this run's "
                     f"input pipeline ({e.why}): the input stream restarts from a fresh "
                     f"shuffle (seeded by the step) instead of its exact position")
                restored = step, e.state, False
            except digest.DigestMismatch as e:
                self._set_aside_damaged(step, f"is damaged: {e.reason}")
                damaged.append(step)
                continue
            except CheckpointError as e:
                if _looks_damaged(e):
                    self._set_aside_damaged(step, f"cannot be read ({_short(e.__cause__)})")
                    damaged.append(step)
                elif _this_machine_failed(e):
                    # Not the step's fault: it stays, and so do the newer ones (an older step
                    # that then fits in memory says nothing about their trees).
                    raise
                else:
                    misfits.append((step, e))
                continue
            for newer, error in misfits:
                self._set_aside_damaged(
                    newer, f"is damaged: its saved tree does not fit this run while the run's "
                    f"older checkpoint {step} does ({_short(error.__cause__)})")
            return restored
        if misfits:
            raise misfits[0][1]
        if damaged:
            # Starting over here would silently train from step 0 on top of the run's outputs.
            moved = ", ".join(map(str, sorted(damaged, reverse=True)))
            moved = f"steps {moved} were" if len(damaged) > 1 else f"step {moved} was"
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read ({moved} set aside as "
                f"<step>{INCOMPLETE_SUFFIX}); run the same command again to start this run "
                f"over from step 0 (its metrics are then rewritten), or give a new --workdir")
        return None

    def _set_aside_damaged(self, step: int, why: str) -> None:
        """Every host found ``step`` damaged; process 0 moves it aside."""
        if jax.process_index() == 0:
            self._quarantine(step, why)
        _sync(f"mtjax_quarantine_{step}")
        self._manager.reload()

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
        # Array data changed on disk may still decode: compare with the digests saved with it.
        digest.check(self.directory / str(step) / "state", restored["state"])
        if pipeline is not None:
            try:
                load_pipeline(pipeline, restored["data"])
            except InputPositionMismatch as e:
                raise _PositionDoesNotFit(restored["state"], str(e)) from e
            except Exception as e:  # e.g. a truncated iterator file: "Read less bytes"
                if _says_dataset_changed(e):
                    raise _PositionDoesNotFit(
                        restored["state"], "a task's definition, or mtjax's reader, changed "
                        "since it was saved") from e
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
