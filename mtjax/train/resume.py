"""Whether this run's config may resume a checkpoint: the settings that decide the shapes of the
state and of the saved input stream must match, and so must those the checkpoint already fixes
(the seed). Settings that change what is trained but not those shapes may change; the resumed
run names the ones that did (``changed_settings``)."""

from __future__ import annotations

import os
from typing import Any

from mtjax.checkpoint import CheckpointError
from mtjax.train import optim as optim_lib


def check_resumable(saved: dict[str, Any], current: dict[str, Any], checkpoints, step) -> None:
    """Refuse to resume a checkpoint whose model or data shapes differ from this run's config."""
    # The shapes of the model and optimizer, and of the saved input stream's batches (its
    # iterator restores batches of the saved size and lengths only).
    # train.seed: a resumed run's shuffle and random state come from the checkpoint, so a new
    # seed would change nothing but what config.json records.
    keys = [("model", "name"), ("data", "mixture"), ("data", "vocabulary"), ("data", "mixing"),
            ("optim", "name"), ("train", "batch_size"), ("data", "inputs_length"),
            ("data", "targets_length"), ("data", "pack"), ("train", "seed")]
    def same(s: str, k: str) -> bool:
        if (s, k) == ("data", "vocabulary") and None not in (saved[s][k], current[s][k]):
            # Runs of older versions recorded a vocabulary file as given, relative.
            return os.path.abspath(saved[s][k]) == os.path.abspath(current[s][k])
        return saved[s][k] == current[s][k]

    differ = [f"{s}.{k}: checkpoint {saved[s][k]!r} vs now {current[s][k]!r}"
              for s, k in keys if k in saved.get(s, {}) and not same(s, k)]
    # Settings that add or remove a part of the optimizer state (its values may change freely).
    for key, why in _optimizer_state_parts(saved.get("optim", {}), current["optim"]):
        differ.append(f"optim.{key}: checkpoint {saved['optim'][key]!r} vs now "
                      f"{current['optim'][key]!r} ({why} changes the optimizer state)")
    if differ:
        raise CheckpointError(
            f"{checkpoints.directory / str(step)} was written by a different run ("
            + "; ".join(differ) + "). Use another --workdir, or --init-from for weights only")


def _optimizer_state_parts(saved: dict[str, Any], current: dict[str, Any]
                           ) -> list[tuple[str, str]]:
    """(key, what it switches) for each optim setting turned on in one config and off in the
    other where that adds a transform, and so a part of the state (see
    optim.make_optimizer)."""
    def on(optim: dict[str, Any], key: str) -> bool:
        return (optim.get(key) or 0) > 0

    parts = []
    if "grad_clip_norm" in saved and on(saved, "grad_clip_norm") != on(current, "grad_clip_norm"):
        parts.append(("grad_clip_norm", "clipping on/off"))
    if (current["name"] == saved.get("name") == "adafactor" and "weight_decay" in saved
            and on(saved, "weight_decay") != on(current, "weight_decay")):
        parts.append(("weight_decay", "Adafactor's weight decay on/off"))
    return parts


# Settings a resumed run may change that change the training from there on: its objective, its
# learning rate, its numerics, its data rates. (Those that change speed or memory alone, such as
# model.remat or train.microbatches, and logging, checkpointing and evaluation, are not named.)
_TRAJECTORY_KEYS = (
    ("train", "z_loss"), ("train", "label_smoothing"), ("train", "loss_normalizing_factor"),
    ("train", "loss_normalization"), ("train", "on_nonfinite"),
    ("optim", "schedule"), ("optim", "learning_rate"), ("optim", "warmup_steps"),
    ("optim", "weight_decay"), ("optim", "grad_clip_norm"), ("optim", "state_dtype"),
    ("model", "dtype"), ("model", "dropout_rate"),
    ("data", "mixing_cap"), ("data", "mixing_temperature"),
)


def changed_settings(saved: dict[str, Any], current: dict[str, Any],
                     step: int | None = None) -> list[str]:
    """``"key old -> new"`` for each setting that changes the training and differs between the
    checkpoint's run (``saved``, its recorded config) and this one. ``train.steps`` too where
    the schedule decays to it (linear, cosine): the learning rate of every later step moves.
    A key the saved config lacks (written by an mtjax before the setting existed) counts as
    its default, which each of these settings was added with to train as before (a checkpoint
    from then resumed with ``train.loss_normalization=per_sequence`` is named). A mixing
    setting that the run's ``data.mixing`` does not read is not compared, and
    ``optim.schedule`` is compared as ``auto`` resolves (``auto`` and the schedule it stands
    for train alike). ``optim.warmup_steps`` is not named from a resumed ``step`` past both
    warmups of the constant schedule, which only warms up with it (rsqrt decays by it, and
    linear and cosine decay over the steps after it)."""
    from mtjax import config as config_lib

    defaults = config_lib.to_dict(config_lib.Config())
    saved = {s: {**defaults[s], **saved.get(s, {})} for s in defaults}
    keys = [key for key in _TRAJECTORY_KEYS if _read_by_mixing(key, current["data"])]
    if (step is not None and _schedule(saved["optim"]) == _schedule(current["optim"]) == "constant"
            and step >= max(saved["optim"]["warmup_steps"], current["optim"]["warmup_steps"])):
        keys.remove(("optim", "warmup_steps"))
    if _decays_to_the_end(saved["optim"]) or _decays_to_the_end(current["optim"]):
        keys.append(("train", "steps"))

    def differs(s: str, k: str) -> bool:
        if (s, k) == ("optim", "schedule"):
            return _schedule(saved[s]) != _schedule(current[s])
        return saved[s][k] != current[s][k]

    return [f"{s}.{k} {saved[s][k]!r} -> {current[s][k]!r}"
            for s, k in keys if differs(s, k)]


# The mixing settings each data.mixing reads (config.unused_settings names the others when set);
# data.mixing itself cannot change on resume, so a setting it does not read changes nothing.
_MIXING_READS = {"examples_proportional": ("mixing_cap",),
                 "temperature": ("mixing_cap", "mixing_temperature")}


def _read_by_mixing(key: tuple[str, str], data: dict[str, Any]) -> bool:
    section, name = key
    if section != "data" or not name.startswith("mixing_"):
        return True
    return name in _MIXING_READS.get(data.get("mixing"), ())


def _schedule(optim: dict[str, Any]) -> str | None:
    """A recorded ``optim.schedule`` with ``auto`` resolved."""
    return optim_lib.resolve_schedule(optim.get("schedule"), optim.get("name"))


def _decays_to_the_end(optim: dict[str, Any]) -> bool:
    return _schedule(optim) in ("linear", "cosine")
