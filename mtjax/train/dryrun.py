"""``mtjax train --dry-run``: the mesh, per-device memory of parameters and optimizer state, the
sharding of each parameter group, and the compiled step's memory plan, without running a step
or allocating the model (shapes and shardings only; XLA compiles ahead of time)."""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import numpy as np

from mtjax import config as config_lib
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import setup as setup_lib


def _per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``abstract_tree`` laid out by ``shardings`` (even shards)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings),
                              strict=True):
        shard_shape = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _total_bytes(abstract_tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract_tree)))


def parameter_groups(abstract_params: Any, shardings: Any) -> list[dict[str, Any]]:
    """One row per parameter kind (layer indices folded to ``*``): shape, spec, count."""
    groups: dict[str, dict[str, Any]] = {}
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        name = re.sub(r"\.\d+(?=\.|$)", ".*", ".".join(
            str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
        row = groups.setdefault(name, {"name": name, "shape": list(leaf.shape),
                                       "spec": str(tuple(sharding.spec)), "count": 0})
        row["count"] += 1
    return list(groups.values())


def mixture_vocab_size(config: config_lib.Config) -> int:
    """The model's vocabulary: the mixture's, rounded up to a multiple of 128."""
    from mtjax.data import pipeline as pipeline_lib
    from mtjax.data import vocab as vocab_lib

    pipeline_lib.prepare(config)  # the run's vocabulary default, then the user's tasks module
    task = pipeline_lib.lookup(config.data.mixture)  # a clear error for an unknown name
    vocab = task.output_features["targets"].vocabulary
    return vocab_lib.padded_vocab_size(vocab)


def dry_run(config: config_lib.Config, vocab_size: int | None = None,
            compile_step: bool = True, mesh=None, rules=None) -> dict[str, Any]:
    """The plan of ``config``'s run; compiles the step unless ``compile_step`` is False."""
    if vocab_size is None:
        from mtjax.data import pipeline as pipeline_lib

        vocab_size = mixture_vocab_size(config)
        pipeline_lib.check_eval_mixture(config)  # as the run checks them at start
        pipeline_lib.check_eval_split(config)
    setup = setup_lib.build(config, vocab_size=vocab_size, num_tasks=1, mesh=mesh, rules=rules)
    params, opt_state = setup.abstract_state.params, setup.abstract_state.opt_state
    report: dict[str, Any] = {
        "model": config.model.name,
        "mesh": dict(setup.mesh.shape),
        "rules": [list(r) if r[1] is None or isinstance(r[1], str) else [r[0], list(r[1])]
                  for r in setup.rules],
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "param_bytes_total": _total_bytes(params),
        "param_bytes_per_device": _per_device_bytes(params, setup.shardings.params),
        "optimizer": config.optim.name,
        "opt_state_bytes_total": _total_bytes(opt_state),
        "opt_state_bytes_per_device": _per_device_bytes(opt_state, setup.shardings.opt_state),
        "parameter_groups": parameter_groups(params, setup.shardings.params),
    }
    if compile_step:
        from mtjax.bench import report as bench_report

        batch = setup.abstract_batch(config.train.batch_size, config.data.inputs_length,
                                     config.data.targets_length)
        with mesh_lib.activate(setup.mesh, setup.rules):
            start = time.perf_counter()
            compiled = setup.step.lower(setup.target(), batch).compile()
            report["compile_s"] = time.perf_counter() - start
        # Where set, compile_s may be a load from JAX's persistent cache.
        report["compilation_cache_dir"] = bench_report.environment()["compilation_cache_dir"]
        report["compiled_memory_per_device"] = bench_report.compiled_memory(compiled)
    return report


def format_report(report: dict[str, Any], mesh_table: str) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    lines = [mesh_table, "",
             f"model {report['model']}: {report['params'] / 1e6:.2f}M parameters",
             f"parameters      {gib(report['param_bytes_per_device'])} per device "
             f"(of {gib(report['param_bytes_total'])})",
             f"optimizer state {gib(report['opt_state_bytes_per_device'])} per device "
             f"(of {gib(report['opt_state_bytes_total'])}, {report['optimizer']})", "",
             ]
    rows = [(g["name"] + (f" x{g['count']}" if g["count"] > 1 else ""),
             str(tuple(g["shape"])), str(g["spec"])) for g in report["parameter_groups"]]
    # Columns as wide as their longest entry: long parameter names kept them from lining up.
    name_width = max([len("parameter"), *(len(r[0]) for r in rows)])
    shape_width = max([len("shape"), *(len(r[1]) for r in rows)])
    for name, shape, spec in [("parameter", "shape", "spec"), *rows]:
        lines.append(f"{name:<{name_width}}  {shape:<{shape_width}}  {spec}")
    if "compile_s" in report:
        lines.append(f"\ncompiled the train step in {report['compile_s']:.1f}s")
        memory = report.get("compiled_memory_per_device") or {}
        if memory:
            lines.append("XLA memory plan per device: " + ", ".join(
                f"{k.replace('_size_in_bytes', '')} {gib(v)}" for k, v in memory.items()))
    return "\n".join(lines)
