"""Reading every array of a checkpoint back and comparing it with the checksum saved with it
(``mtjax checkpoints RUN_DIR --verify``): damage that a resume or ``eval`` would meet only when
it reads the step, found before the step is needed (or before its older steps are deleted).

One process, no mesh: arrays are read onto one device in groups of at most ``group_bytes``
(the other leaves are Orbax placeholders, not read), so verifying needs memory for one group,
not for the whole train state.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtjax.checkpoint import digest
from mtjax.checkpoint.failures import _short
from mtjax.checkpoint.layout import CheckpointError, _is_complete
from mtjax.checkpoint.quiet import _note_failed_restore, _quiet_failed_reads
from mtjax.checkpoint.read import tree_metadata

GROUP_BYTES = 256 * 2**20


@functools.cache
def _leaf_digest():
    # One program per array shape and dtype (jit's cache): the train state repeats a few shapes.
    return jax.jit(digest._leaf_digest)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    """(name as the digests name it, ArrayMetadata) of every array of a saved tree."""
    return [(digest._name(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]


def _groups(leaves: list[tuple[str, Any]], group_bytes: int) -> list[list[int]]:
    groups, current, size = [], [], 0
    for i, (_, leaf) in enumerate(leaves):
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        if current and size + nbytes > group_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    return groups + [current] if current else groups


def _read_group(state_dir: pathlib.Path, tree: Any, names: set[str]) -> dict[str, jax.Array]:
    """The arrays ``names`` of the saved ``tree``, on one device; the others are not read."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def wanted(path, leaf):
        return hasattr(leaf, "shape") and digest._name(path) in names

    item = jax.tree_util.tree_map_with_path(
        lambda p, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        if wanted(p, leaf) else ocp.PLACEHOLDER, tree)
    restore_args = jax.tree_util.tree_map_with_path(
        lambda p, leaf: ocp.ArrayRestoreArgs(sharding=device) if wanted(p, leaf)
        else ocp.PLACEHOLDER, tree)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    return {digest._name(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
            if isinstance(leaf, jax.Array)}


def verify_step(step_dir: str | pathlib.Path, group_bytes: int = GROUP_BYTES) -> dict[str, Any]:
    """Read every array of one checkpoint step and compare it with its saved checksum.

    Returns ``{"step", "status", "reason", "arrays", "bytes", "seconds"}``; ``status`` is
    ``"ok"`` (every array read and matched its checksum), ``"unchecked"`` (every array read, but
    the step was saved without checksums, by an older mtjax) or ``"damaged"`` (``reason`` says
    which file or array).
    """
    step_dir = pathlib.Path(step_dir)
    state_dir = step_dir / "state"
    start = time.perf_counter()
    row: dict[str, Any] = {"step": int(step_dir.name), "status": "ok", "reason": None,
                           "arrays": 0, "bytes": 0}

    def done(status: str | None = None, reason: str | None = None) -> dict[str, Any]:
        if status is not None:
            row.update(status=status, reason=reason)
        row["seconds"] = round(time.perf_counter() - start, 3)
        return row

    if not _is_complete(step_dir):
        return done("damaged", "incomplete (commit markers or metadata missing)")
    try:
        tree = tree_metadata(state_dir)
    except CheckpointError as e:
        return done("damaged", f"its tree metadata cannot be read ({_short(e.__cause__)})")
    tree = getattr(tree, "tree", tree)
    leaves = _leaves(tree)
    expected = digest.saved(state_dir)
    saved = expected.get("leaves") if expected else None
    saved = saved if isinstance(saved, dict) else None
    differ, unchecked, read = [], [], set()
    _quiet_failed_reads()
    for group in _groups(leaves, group_bytes):
        names = {leaves[i][0] for i in group}
        try:
            arrays = _read_group(state_dir, tree, names)
        except Exception as e:  # any failed read is the step's damage, named by Orbax
            _note_failed_restore()
            return done("damaged", f"its arrays cannot be read ({_short(e)})")
        for name, array in arrays.items():
            row["arrays"] += 1
            row["bytes"] += array.nbytes
            read.add(name)
            entry = saved.get(name) if saved is not None else None
            if not (isinstance(entry, list) and len(entry) == 2):
                (differ if entry is not None else unchecked).append(name)
            elif entry[0] != str(array.dtype) or entry[1] != int(_leaf_digest()(array)):
                differ.append(name)
        arrays = array = None  # (the last one too) freed before the next group is read
    if differ:
        return done("damaged", digest.DigestMismatch(step_dir, differ).reason)
    # Every array saved has a checksum: one whose array was not read is missing from the tree
    # metadata (a changed byte there can make Orbax skip an array, or name it otherwise).
    lost = [name for name in saved or {} if name not in read]
    if lost:
        more = f" (and {len(lost) - 1} more arrays)" if len(lost) > 1 else ""
        return done("damaged", f"the array {lost[0]}{more}, saved with a checksum, is not in "
                    f"its tree metadata (state/_METADATA)")
    if saved is None:
        return done("unchecked", "saved without checksums (by an older mtjax): every "
                    "array was read, none could be compared")
    if unchecked:
        return done("unchecked", f"{len(unchecked)} arrays have no saved checksum, e.g. "
                    f"{unchecked[0]}")
    return done()
