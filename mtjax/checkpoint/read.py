"""Reading a checkpoint for the commands that only read one (eval, infer, score, convert,
--init-from): finding its step, its parameters, tree and JSON items, and the error that names an
older step where its files are damaged. Nothing is moved."""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtjax.checkpoint import digest
from mtjax.checkpoint.failures import _says_unreadable, _short
from mtjax.checkpoint.layout import (
    INCOMPLETE_SUFFIX,
    CheckpointError,
    _is_complete,
    is_state_item,
)
from mtjax.checkpoint.quiet import _note_failed_restore, _quiet_failed_reads


def run_dir_of(step_dir: pathlib.Path) -> pathlib.Path:
    """The run directory of a checkpoint step: ``<run>/checkpoints/<step>`` -> ``<run>``; a
    step directory outside a ``checkpoints/`` folder belongs to its parent."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def find_state_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The ``state`` item of a checkpoint given as a run dir, its ``checkpoints/`` or one step."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a run directory, its "
                              f"checkpoints/ folder, or one checkpoint step directory")
    if is_state_item(path):
        path = path.parent
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not a checkpoint; give a run directory, its "
                              f"checkpoints/ folder, or one checkpoint step directory")
    if (path / "state").is_dir():
        return _complete_state_dir(path) if path.name.isdigit() else path / "state"
    if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()):
        raise CheckpointError(f"{path} is a Hugging Face model, not an mtjax checkpoint: "
                              f"convert it first (mtjax convert {path} DIR) and give DIR")
    if (path / "checkpoint").is_file() or any(p.is_dir() for p in path.glob("checkpoint_*")):
        raise CheckpointError(f"{path} is a T5X checkpoint, not an mtjax checkpoint: convert it "
                              f"first (mtjax convert {path} DIR --vocab FILE|byte) and give DIR")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    # Every step directory, whole or not: the latest one cut short is named, not skipped.
    steps = sorted((int(p.name), p) for p in root.glob("*") if p.name.isdigit() and p.is_dir())
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint under {path}; give a run directory, its checkpoints/ "
            f"folder, or one checkpoint step directory")
    return _complete_state_dir(steps[-1][1])


def _complete_state_dir(step_dir: pathlib.Path) -> pathlib.Path:
    """``step_dir/state``, or the error naming the step as incomplete and an older one (reading
    commands move nothing, and do not fall back silently to an older checkpoint)."""
    if not _is_complete(step_dir):
        raise unreadable(step_dir, OSError("it is incomplete: a save cut short?"))
    return step_dir / "state"


def restore_params(path: str | pathlib.Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, onto ``abstract_params``' shapes and shardings."""
    state_dir = find_state_dir(path)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                abstract_params)
    _quiet_failed_reads()
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True))
    except Exception as e:
        _note_failed_restore()
        if _says_unreadable(e):
            raise unreadable(state_dir.parent, e) from e
        # A subtree saved where this model has an array, or the other way round (another
        # model's tree, as a shape that differs), is Orbax's TypeError "Type mismatch at ...".
        mismatch = isinstance(e, TypeError) and "type mismatch" in str(e).lower()
        if not mismatch and isinstance(e, (KeyError, AttributeError, TypeError,
                                           json.JSONDecodeError)):
            # Orbax's own metadata files that do not parse as it wrote them: a missing entry
            # (a partial restore takes a missing parameter quietly), or not JSON at all.
            raise unreadable(state_dir.parent, OSError(
                f"its tree metadata does not parse ({type(e).__name__}: {e})")) from e
        if not mismatch and not isinstance(e, (ValueError, FileNotFoundError)):
            raise
        # Orbax's advice (strict=False, ArrayRestoreArgs) is about its API, not this command.
        reason = str(e).split(" Truncating/padding")[0].strip()
        if mismatch:
            at = re.search(r"key path \((.*?)\)", reason)
            name = ".".join(re.findall(r"'([^']*)'", at.group(1))) if at else "a parameter"
            reason = f"its saved tree is laid out otherwise than this model's at {name}"
        hint = ""
        if "shape" in reason or mismatch:
            # Orbax names neither the parameter nor, of its many failed reads, a fixed one.
            reason = _shapes_that_differ(state_dir, abstract_params) or reason
            saved = _saved_model_name(state_dir.parent)
            if saved == "custom":  # (sizes.CUSTOM) its architecture is in model_config.json
                saved = "a converted size without a name: give model.name=custom"
            hint = ("; --init-from needs a checkpoint of the same model size and vocabulary"
                    + (f" (it holds {saved})" if saved else ""))
        raise CheckpointError(f"cannot take weights from {state_dir}: {reason}{hint}") from e
    # A partial restore hands back the wanted shape itself for a parameter the checkpoint's tree
    # does not hold (another model, or a changed name in its _METADATA): not weights.
    missing = [jax.tree_util.keystr(path, simple=True, separator=".") for path, leaf in
               jax.tree_util.tree_flatten_with_path(restored["params"])[0]
               if not isinstance(leaf, jax.Array)]
    if missing:
        more = f" (and {len(missing) - 1} more parameters)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"cannot take weights from {state_dir}: its saved tree holds no {missing[0]}{more} "
            f"(a checkpoint of another model, or its state/_METADATA file is damaged)")
    try:
        digest.check(state_dir, {"params": restored["params"]})
    except digest.DigestMismatch as e:
        raise unreadable(state_dir.parent, OSError(e.reason)) from e
    return restored["params"]


def _shapes_that_differ(state_dir: pathlib.Path, abstract_params: Any) -> str | None:
    """The first parameter whose saved shape is not this model's, with both shapes and how many
    more differ; None where the saved tree does not say (unreadable, or no shape differs)."""
    try:
        saved = _shapes(tree_metadata(state_dir)["params"])
    except (CheckpointError, KeyError, TypeError):
        return None
    differ = [(name, saved[name], shape) for name, shape in _shapes(abstract_params).items()
              if name in saved and saved[name] != shape]
    if not differ:
        return None
    name, stored, wanted = differ[0]
    more = f" (and {len(differ) - 1} more parameters)" if len(differ) > 1 else ""
    return f"its {name} is {stored} where this model's is {wanted}{more}"


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """``{"decoder.layers.0.mlp.wo.kernel": shape}`` of a parameter tree (arrays or metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in flat}


def _no_metadata_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to get item metadata from directory")


def tree_metadata(state_dir: pathlib.Path) -> Any:
    """The saved tree of ``state`` (shapes and dtypes), for commands that only read a
    checkpoint; damaged metadata raises :func:`unreadable`."""
    try:
        # Orbax takes unreadable metadata for absent metadata: a warning, and None.
        json.loads((state_dir / "_METADATA").read_text())
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_no_metadata_warning)
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
        finally:
            absl_logger.removeFilter(_no_metadata_warning)
        tree = getattr(metadata, "item_metadata", metadata)
        if tree is None:
            raise OSError(f"no readable tree metadata in {state_dir}")
    except Exception as e:
        raise unreadable(state_dir.parent, e) from e
    return tree


def read_json_item(item_dir: pathlib.Path) -> dict[str, Any]:
    """A JSON item of a checkpoint step (``config``, ``metrics``); damage raises
    :func:`unreadable`."""
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item_dir)
    except Exception as e:
        raise unreadable(item_dir.parent, e) from e


def unreadable(step_dir: pathlib.Path, error: BaseException) -> CheckpointError:
    """A checkpoint whose files are damaged, for commands that only read it: the error names the
    older checkpoints of the run to use instead (nothing is moved; ``mtjax train`` sets damaged
    checkpoints aside when it resumes)."""
    # A step train set aside is <step>.incomplete[n]: older than it is older than <step>.
    step = step_dir.name.partition(INCOMPLETE_SUFFIX)[0]
    older = sorted((int(p.name) for p in step_dir.parent.glob("*")
                    if p.name.isdigit() and _is_complete(p)
                    and step.isdigit() and int(p.name) < int(step)),
                   reverse=True)
    fix = (f"give an older one instead, e.g. {step_dir.parent / str(older[0])} "
           f"(complete: {', '.join(map(str, older))})" if older
           else "no older checkpoint of this run is complete")
    return CheckpointError(f"checkpoint {step_dir} cannot be read, its files are damaged "
                           f"({_short(error, 160)}); {fix}")


def _recorded_config(step_dir: pathlib.Path) -> dict[str, Any]:
    """The run config a checkpoint step recorded ({} where it recorded none); read as a file,
    without Orbax."""
    config_file = step_dir / "config" / "metadata"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _saved_model_name(step_dir: pathlib.Path) -> str | None:
    """model.name in a checkpoint's recorded config, where there is one."""
    try:
        return _recorded_config(step_dir)["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
