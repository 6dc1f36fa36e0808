"""Listing a run's checkpoints (``mtjax checkpoints RUN_DIR``) from their files alone."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from mtjax.checkpoint.layout import (
    INCOMPLETE_SUFFIX,
    CheckpointError,
    _is_complete,
    _positions_written,
    is_state_item,
)
from mtjax.checkpoint.read import _recorded_config


def given_step(path: str | pathlib.Path) -> int | None:
    """The step of a path given as one checkpoint (``<run>/checkpoints/<step>`` or its
    ``state`` item); None for a run directory or its checkpoints/ folder."""
    step_dir = pathlib.Path(path).absolute()
    if is_state_item(step_dir):
        step_dir = step_dir.parent
    if step_dir.name.isdigit() and step_dir.parent.name == "checkpoints":
        return int(step_dir.name)
    return None


def list_checkpoints(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """Every checkpoint of a run: step, commit time, bytes, metrics; which is latest and best.

    Reads files only (no Orbax manager, nothing moved). Directories set aside as incomplete are
    listed under ``incomplete``.
    """
    run_dir = given = pathlib.Path(run_dir).absolute()
    # Also take what the other commands take: the checkpoints/ folder, one step of it, or that
    # step's state item.
    if is_state_item(run_dir):
        run_dir = run_dir.parent
    if given_step(run_dir) is not None:
        run_dir = run_dir.parent.parent
    elif run_dir.name == "checkpoints" and not (run_dir / "checkpoints").is_dir():
        run_dir = run_dir.parent
    root = run_dir / "checkpoints"
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist; give a run directory")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file; give a run directory (its --workdir), its "
                              f"checkpoints/ folder or one checkpoint in it")
    if not root.is_dir():
        raise CheckpointError(f"{run_dir} holds no checkpoints/ folder; give a run directory")
    if not given.exists():  # a step (or its state item) the run does not have
        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
        raise CheckpointError(f"{given} does not exist (the run's checkpoints: "
                              f"{', '.join(map(str, steps)) or 'none'}); give one of them, or "
                              f"the run directory {run_dir}")
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
