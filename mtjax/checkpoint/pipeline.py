"""Input-pipeline position: one small tf.data checkpoint per host, snapshotted synchronously
(the iterator moves on as soon as training continues) and written asynchronously."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from mtjax.checkpoint.layout import _PROCESS_COUNT_FILE, CheckpointError


class Checkpointable(Protocol):
    """An input pipeline whose position can be written to and read from a directory."""

    def save(self, path: str) -> None: ...
    def restore(self, path: str) -> None: ...


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
