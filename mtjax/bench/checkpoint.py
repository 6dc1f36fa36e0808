"""``mtjax bench checkpoint``: what checkpointing costs a run.

1. Save and restore throughput (MB/s) of the train state, synchronously, through the run's own
   ``RunCheckpoints``: of the state's bytes in memory and of the bytes on disk.
2. The training-time overhead of asynchronous saving: the same compiled step timed without
   saving and with a save every ``save_every`` steps, where ``save_every`` spans at least twice
   a synchronous save (a save that is still writing when the next one starts makes that one
   wait, which is not the cost of one save), three saves per window; the overhead per save is
   then expressed for a save every 100 steps, the default cadence (goal: under 5%).
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from mtjax import config as config_lib
from mtjax.bench import report
from mtjax.bench.train import BenchOptions, synthetic_batch
from mtjax.checkpoint import RunCheckpoints
from mtjax.checkpoint.verify import verify_step
from mtjax.model import sizes
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import setup as setup_lib

REFERENCE_INTERVAL = 100  # steps between saves that the overhead is quoted for


def _tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _dir_bytes(root: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _run_steps(step, state, batch, count: int, on_step=None):
    start = time.perf_counter()
    for i in range(count):
        state, metrics = step(state, batch)
        if on_step is not None:
            on_step(i + 1, state)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def run(config: config_lib.Config, options: BenchOptions) -> dict[str, Any]:
    vocab_size = sizes.get_config(config.model.name).vocab_size
    b, s, t = config.train.batch_size, config.data.inputs_length, config.data.targets_length
    setup = setup_lib.build(config, vocab_size=vocab_size, num_tasks=1, total_steps=1000)
    host_batch = synthetic_batch(b // jax.process_count(), s, t, vocab_size, config.train.seed)
    batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
             for k, v in host_batch.items()}
    config_dict = config_lib.to_dict(config)
    result: dict[str, Any] = {"benchmark": "checkpoint", "model": config.model.name,
                              "num_params": sizes.count_params(setup.model_cfg)}
    with tempfile.TemporaryDirectory() as tmp, mesh_lib.activate(setup.mesh, setup.rules):
        state = setup.init_state(config.train.seed)
        state, _ = _run_steps(setup.step, state, batch, 1 + options.warmup)  # compile, warm up
        state_bytes = _tree_bytes(state)

        # 1. Synchronous save / restore throughput (median of 3).
        sync = RunCheckpoints(pathlib.Path(tmp, "sync"), every_steps=1, keep=2,
                              async_save=False)
        save_s, restore_s = [], []
        for i in range(3):
            start = time.perf_counter()
            sync.save(100 + i, state, None, config_dict, force=True)
            sync.wait()
            save_s.append(time.perf_counter() - start)
            if i == 0:  # what one checkpoint takes on disk (Orbax compresses some arrays)
                disk_bytes = _dir_bytes(pathlib.Path(tmp, "sync"))
            start = time.perf_counter()
            restored = sync.restore(100 + i, setup.target(), None)
            jax.block_until_ready(restored)
            restore_s.append(time.perf_counter() - start)
        sync.close()
        del restored
        # `mtjax checkpoints --verify` of the last one: every array read back on one device and
        # compared with its checksum (a cold run of it also compiles the per-shape digests).
        verified = verify_step(sync.directory / "102")

        # 2. Async overhead: the same steps without and with saves (best of 2 each).
        state, one_step_s = _run_steps(setup.step, state, batch, 1)
        save_every = max(options.steps, int(np.ceil(2 * statistics.median(save_s) / one_step_s)))
        steps = 3 * save_every
        plain, saving = [], []
        for repeat in range(2):
            state, seconds = _run_steps(setup.step, state, batch, steps)
            plain.append(seconds)
            manager = RunCheckpoints(pathlib.Path(tmp, f"async{repeat}"), every_steps=save_every,
                                     keep=2, async_save=True)

            def save(i, current, manager=manager):
                if i % save_every == 0:
                    manager.save(i, current, None, config_dict, force=True)

            start = time.perf_counter()
            state, _ = _run_steps(setup.step, state, batch, steps, on_step=save)
            manager.wait()  # the last save's tail counts against the run too
            saving.append(time.perf_counter() - start)
            manager.close()
    step_s = min(plain) / steps
    saves = steps // save_every
    per_save_s = max(min(saving) - min(plain), 0.0) / saves
    mb, disk_mb = state_bytes / 1e6, disk_bytes / 1e6
    result.update({
        "state_bytes": state_bytes,
        "disk_bytes": disk_bytes,
        "save_s": statistics.median(save_s), "restore_s": statistics.median(restore_s),
        # Of the state in memory; the disk figures divide what was written instead. The
        # restore reads a checkpoint just written, so mostly from the OS page cache.
        "save_mb_per_s": mb / statistics.median(save_s),
        "restore_mb_per_s": mb / statistics.median(restore_s),
        "save_disk_mb_per_s": disk_mb / statistics.median(save_s),
        "restore_disk_mb_per_s": disk_mb / statistics.median(restore_s),
        "verify_s": verified["seconds"], "verify_status": verified["status"],
        "verify_mb_per_s": verified["bytes"] / 1e6 / max(verified["seconds"], 1e-9),
        "steps_timed": steps, "save_every_steps": save_every, "saves": saves,
        "step_s_without_saving": step_s,
        "step_s_with_saving": min(saving) / steps,
        # Clamped as per_save_s is: on a noisy machine the run with saves can be the faster.
        "overhead_measured": max(min(saving) / min(plain) - 1.0, 0.0),
        "async_cost_per_save_s": per_save_s,
        f"overhead_every_{REFERENCE_INTERVAL}_steps": per_save_s / (REFERENCE_INTERVAL * step_s),
        "host_peak_memory_bytes": report.host_peak_memory_bytes(),
        "environment": report.environment(),
        "config": config_dict,
    })
    return result
