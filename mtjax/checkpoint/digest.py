"""Per-array checksums of a saved state: computed on the devices at save, written into the state
item's metadata, and compared after a restore, so that array data damaged on disk in a way that
still decodes (a flipped byte in a data file) is caught instead of trained on.

Orbax writes no checksum of array data (zarr2 + zstd, no frame checksum; zarr3's crc32c covers
the shard index only, and its codecs are not a setting), and a flipped byte there restores
silently as different values. Each array's digest is a wrapping uint32 sum over its elements of
``fmix32(bits ^ index * golden)``, of the array's bit pattern at its global flat index:
computed inside one jitted function on the sharded arrays, it is one global value that every
host holds (a replicated scalar), whatever the mesh; a mix that is a bijection per element
makes any one changed element change the sum, and a swap of two elements almost surely.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.checkpoint.layout import CheckpointError

ALGORITHM = "mtjax-fmix32-sum-v1"
# Where in ``state/_METADATA`` (Orbax's custom_metadata of the item) the digests are kept.
KEY = "mtjax_digest"


class DigestMismatch(CheckpointError):
    """A restored array whose digest differs from the one saved with it (``leaves``: their
    names, the first first)."""

    def __init__(self, step_dir: pathlib.Path, leaves: list[str]) -> None:
        more = f" (and {len(leaves) - 1} more arrays)" if len(leaves) > 1 else ""
        self.step_dir, self.leaves = step_dir, leaves
        self.reason = (f"the array data of {leaves[0]}{more} no longer matches the checksum "
                       f"saved with it")
        super().__init__(f"checkpoint {step_dir} is damaged: {self.reason}")


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bit pattern as uint32 words (a 64-bit element: two, on a last axis)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits in (32, 64):  # a 64-bit element: shape + (2,)
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {8: jnp.uint8, 16: jnp.uint16}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    w = _words(x)
    # The global flat index, from one iota per axis (no reshape: it stays sharded like x).
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(
            stride % 2**32)
        stride *= w.shape[axis]
    h = w ^ (index * np.uint32(0x9E3779B9))
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


def _digests(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_digest(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


@functools.cache
def _jitted(out_sharding: jax.sharding.Sharding | None):
    """``_digests`` compiled to put its result on every device of the state's mesh (each host
    then holds the global value)."""
    return jax.jit(_digests, out_shardings=out_sharding)


def _replicated(leaves: list[jax.Array]) -> jax.sharding.Sharding | None:
    sharding = leaves[0].sharding if leaves else None
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (on several hosts it is not fully addressable,
    but every host holds all of it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _array_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
    return [(_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(leaf, jax.Array)]


def compute(tree: Any) -> dict[str, Any]:
    """The digests of ``tree``'s arrays, as the JSON saved with the state: ``{"algorithm": ...,
    "leaves": {name: [dtype, digest]}}``. Blocks until the arrays are computed (as a save's copy
    off the device does anyway)."""
    named = _array_leaves(tree)
    leaves = [leaf for _, leaf in named]
    values = _host_value(_jitted(_replicated(leaves))(leaves))
    return {"algorithm": ALGORITHM,
            "leaves": {name: [str(leaf.dtype), int(value)]
                       for (name, leaf), value in zip(named, values, strict=True)}}


def saved(state_dir: pathlib.Path) -> dict[str, Any] | None:
    """The digests saved with a state item (None: saved without, by an older mtjax)."""
    try:
        custom = json.loads((state_dir / "_METADATA").read_text()).get("custom_metadata")
    except (OSError, ValueError, AttributeError):
        return None  # (unreadable metadata is the restore's error to report)
    found = custom.get(KEY) if isinstance(custom, dict) else None
    if not isinstance(found, dict) or found.get("algorithm") != ALGORITHM:
        return None
    return found


def check(state_dir: pathlib.Path, tree: Any) -> None:
    """Raise :class:`DigestMismatch` where an array of ``tree`` (restored from ``state_dir``,
    whole or a part such as ``{"params": ...}``) differs from the digest saved with it.

    Arrays restored into another dtype than saved (a changed ``optim.state_dtype``) are not
    checked, nor is a state saved without digests (by an older mtjax)."""
    expected = saved(state_dir)
    if expected is None:
        return
    leaves = expected.get("leaves")
    leaves = leaves if isinstance(leaves, dict) else {}
    differ = []
    for name, (dtype, value) in compute(tree)["leaves"].items():
        entry = leaves.get(name)
        if not (isinstance(entry, list) and len(entry) == 2):
            if entry is not None:  # the saved record itself damaged
                differ.append(name)
        elif entry[0] == dtype and entry[1] != value:
            differ.append(name)
    if differ:
        raise DigestMismatch(state_dir.parent, differ)
