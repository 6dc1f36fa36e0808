"""One metrics writer: JSONL for machines, TensorBoard for curves, a progress bar for people.

Only process 0 writes. Step metrics arrive as sums and counts (see ``step.batch_metrics``);
:func:`summarize` turns them into the ratios users read (loss per token, per task).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtjax import outputs


def summarize(sums: Mapping[str, Any], task_names: Sequence[str]) -> dict[str, float]:
    """Ratios from summed step metrics: ``loss``, ``accuracy``, ``loss/<task>``, ...

    A task with no tokens in the window gets no entry for that window rather than a NaN.
    """
    weight = max(float(sums["weight_sum"]), 1.0)
    out = {
        "loss": float(sums["loss_sum"]) / weight,
        "z_loss": float(sums["z_loss_sum"]) / weight,
        "accuracy": float(sums["correct_sum"]) / weight,
        "target_tokens": float(sums["weight_sum"]),
    }
    for key in ("grad_norm", "param_norm", "learning_rate"):
        if key in sums:
            out[key] = float(sums[key])
    task_loss = np.asarray(sums["task_loss_sum"], np.float64)
    task_correct = np.asarray(sums["task_correct_sum"], np.float64)
    task_weight = np.asarray(sums["task_weight_sum"], np.float64)
    for i, name in enumerate(task_names):
        if task_weight[i] > 0:
            out[f"loss/{name}"] = task_loss[i] / task_weight[i]
            out[f"accuracy/{name}"] = task_correct[i] / task_weight[i]
    return out


def accumulate(total: dict[str, Any] | None, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Add one step's sums into a logging window; norms and learning rate keep the last value."""
    sums = {k: np.asarray(v) for k, v in sums.items()}
    if total is None:
        return dict(sums)
    out = dict(total)
    for key, value in sums.items():
        out[key] = out[key] + value if key.endswith("_sum") else value
    return out


def window_to_json(window: Mapping[str, Any]) -> dict[str, Any]:
    """A logging window as JSON, exactly (float32 values are exact as JSON numbers)."""
    return {key: {"dtype": str(np.asarray(value).dtype), "value": np.asarray(value).tolist()}
            for key, value in window.items()}


def window_from_json(saved: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The window :func:`window_to_json` saved, with its dtypes (None: none saved)."""
    if not saved:
        return None
    return {key: np.asarray(item["value"], dtype=item["dtype"]) for key, item in saved.items()}


class MetricsWriter:
    """Appends to ``metrics.jsonl`` and TensorBoard events in the run directory."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True,
                 purge_from: int | None = None):
        """``purge_from``: TensorBoard discards the events of this step and later that earlier
        writers left in the directory (a restart from a checkpoint, or from scratch)."""
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional on lean accelerator images
                print("mtjax: tensorboardX not installed; TensorBoard events disabled",
                      file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                         purge_step=purge_from)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(outputs.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | pathlib.Path,
               unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a last line cut short (the writer was killed as it
    wrote it) is left out. Another line that is not JSON raises ValueError, or, where
    ``unreadable`` is given, is left out and described in it."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue
            problem = f"record {number} is not JSON ({e.msg})"
            if unreadable is None:
                raise ValueError(problem) from e
            unreadable.append(problem)
    return records
