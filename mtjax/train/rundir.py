"""The run directory's files besides checkpoints: the lock that keeps one ``mtjax train`` per run
directory, the per-host logs of ``log.all_processes``, and the records a resumed run drops."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import zlib

import jax
import numpy as np

from mtjax import outputs
from mtjax.errors import UserError
from mtjax.parallel.distributed import log
from mtjax.train import metrics as metrics_lib


def remove_if_only_lock(workdir: pathlib.Path) -> None:
    """Remove a run directory that holds only its lock, and the empty checkpoints/ the
    checkpoint manager made before a restore was refused (an --init-from of another size)."""
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        if sorted(p.name for p in workdir.iterdir()) == [RunLock.FILE, "checkpoints"]:
            checkpoints.rmdir()
    if [p.name for p in workdir.iterdir()] == [RunLock.FILE]:
        (workdir / RunLock.FILE).unlink()
        workdir.rmdir()


class RunInUseError(UserError, RuntimeError):
    """Another ``mtjax train`` holds the run directory."""


class RunLock:
    """One writer per run directory: process 0 holds an advisory lock on ``<workdir>/.lock``
    while it trains. A second ``mtjax train`` in the same directory would otherwise resume the
    same checkpoint, interleave metrics.jsonl and prune the other's checkpoints. The lock ends
    with the process (a crash leaves no stale lock); the file records who holds it."""

    FILE = ".lock"

    def __init__(self, workdir: pathlib.Path):
        self.path, self.handle = workdir / self.FILE, None

    def acquire(self) -> None:
        holder = None  # who holds the lock, where process 0 could not take it
        if jax.process_index() == 0:
            holder = self._try_lock()
        if jax.process_count() > 1:
            # Every process learns the outcome and stops alike (the others failed later in a
            # collective, with a traceback of their own).
            from jax.experimental import multihost_utils

            refused = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
            if int(refused) and holder is None:
                holder = "see process 0"
        if holder is not None:
            raise RunInUseError(
                f"run directory {self.path.parent} is in use by another mtjax train "
                f"({holder}); wait for it to finish, or give another --workdir")

    def _try_lock(self) -> str | None:
        """Take the lock (None), or say who holds it."""
        import fcntl
        import socket

        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # releases the lock
            self.handle = None


class HostLog:
    """``log.all_processes``: every host writes ``processes/process_<i>.jsonl`` with the loss
    it sees and a hash of each example it read, to check multi-host runs (same global loss,
    disjoint data shards)."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.path(workdir).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path(workdir), "a")  # noqa: SIM115
        self._hashes: list[int] = []

    @staticmethod
    def path(workdir: pathlib.Path) -> pathlib.Path:
        return workdir / "processes" / f"process_{jax.process_index()}.jsonl"

    def add_batch(self, host_batch: dict[str, np.ndarray]) -> None:
        tokens_BS, segments_BS = host_batch["encoder_input_tokens"], host_batch[
            "encoder_segment_ids"]
        for tokens_S, segments_S in zip(tokens_BS, segments_BS, strict=True):
            for segment in np.unique(segments_S[segments_S > 0]):
                self._hashes.append(zlib.crc32(tokens_S[segments_S == segment].tobytes()))

    def write(self, step: int, summary: dict[str, float]) -> None:
        record = {"step": step, "process": jax.process_index(), "loss": summary.get("loss"),
                  "example_hashes": self._hashes}
        self._file.write(outputs.dumps(record) + "\n")
        self._file.flush()
        self._hashes = []


def truncate_metrics(path: pathlib.Path, last_step: int, writer: int | None = 0) -> None:
    """Drop records past the resumed step so a resumed run's JSONL reads like an unbroken one;
    ``writer``: the process that writes ``path`` (None: every process its own)."""
    if writer not in (None, jax.process_index()) or not path.exists():
        return
    unreadable: list[str] = []
    records = metrics_lib.read_jsonl(path, unreadable)
    if unreadable:  # damaged inside, not just a last line cut short
        # A log must not stop the run: keep the file as it was beside the readable records.
        damaged = path.with_name(path.name + ".damaged")
        shutil.copyfile(path, damaged)
        log(f"mtjax: warning: {path}: {'; '.join(unreadable)}; kept as it was in "
             f"{damaged.name}, and the readable records go on")
    kept = [json.dumps(record) for record in records if record.get("step", 0) <= last_step]
    # Replaced whole: a kill during the rewrite leaves the old file, not half of it.
    outputs.write_text(path, "".join(line + "\n" for line in kept), flag=path.name)
