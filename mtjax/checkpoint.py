"""Orbax checkpoints of a run: train state, input-pipeline position per host, config, metrics.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}`` written by one Orbax
``CheckpointManager``. Orbax writes each step into a temporary directory and commits it by
renaming, so a save killed half-way is never listed as a step.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from mtjax.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run; the message says which."""


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

class RunCheckpoints:
    """Saves and restores a run's checkpoints in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int,
                 async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": PipelineHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def save_due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, pipeline: Checkpointable | None,
             config: dict[str, Any], metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously); returns whether a save was started."""
        if not force and not self._manager.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if pipeline is not None:
            items["data"] = PipelineSave(snapshot_pipeline(pipeline))
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                  force=force)

    def restore(self, step: int, abstract_state: Any, pipeline: Checkpointable | None) -> Any:
        """Restore ``step`` onto ``abstract_state``'s shapes and shardings; moves ``pipeline``."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if pipeline is not None:
            items["data"] = PipelineRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this run "
                f"(changed model, optimizer or data?): {e}. Use a new --workdir, or "
                f"--init-from to start from its weights only") from e
        if pipeline is not None:
            load_pipeline(pipeline, restored["data"])
        return restored["state"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def find_state_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The ``state`` item of a checkpoint given as a run dir, its ``checkpoints/`` or one step."""
    path = pathlib.Path(path).absolute()
    if (path / "state").is_dir():
        return path / "state"
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in root.glob("*")
                   if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint under {path}; give a run directory, its checkpoints/ "
            f"folder, or one checkpoint step directory")
    return steps[-1][1] / "state"


def restore_params(path: str | pathlib.Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, onto ``abstract_params``' shapes and shardings."""
    state_dir = find_state_dir(path)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                abstract_params)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot take weights from {state_dir}: {e}") from e
    return restored["params"]
