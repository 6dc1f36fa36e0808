"""What a named model costs, computed from shapes alone (``jax.eval_shape``; nothing allocated)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mtjax.config import OptimConfig
from mtjax.model import sizes
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import optim
from mtjax.train import state as state_lib


def _tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def model_info(name: str, *, inputs_length: int = 512, targets_length: int = 114,
               vocab_size: int | None = None) -> dict[str, Any]:
    """Parameter count, training FLOPs per token and state memory of a named model.

    FLOPs per token divide one step's matmul FLOPs (``sizes.train_flops_per_step``) by the
    encoder + decoder tokens of one full-length example.
    """
    cfg = sizes.get_config(name)
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1), devices=jax.devices()[:1])
    rules = mesh_lib.get_rules("data")
    info: dict[str, Any] = {"name": name, "vocab_size": cfg.vocab_size,
                            "config": dataclasses.asdict(cfg), "params": sizes.count_params(cfg)}
    flops = sizes.train_flops_per_step(cfg, 1, inputs_length, targets_length)
    info["inputs_length"], info["targets_length"] = inputs_length, targets_length
    info["train_flops_per_token"] = flops / (inputs_length + targets_length)
    abstract_params = state_lib.abstract_params(cfg, mesh, rules)
    info["param_bytes"] = _tree_bytes(abstract_params)
    for opt_name in ("adafactor", "adamw"):
        tx, _ = optim.make_optimizer(OptimConfig(name=opt_name), total_steps=1)
        info[f"{opt_name}_state_bytes"] = _tree_bytes(jax.eval_shape(tx.init, abstract_params))
    return info
