"""Host batches for inference: token lists to padded arrays, padding to the mesh, placement.

Inference batches are the same on every host (each host reads all inputs); they are split over
the mesh's batch axes on the way in, and results come back replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mtjax.model import layers
from mtjax.parallel import mesh as mesh_lib


def batch_shards(mesh: Mesh, rules: mesh_lib.AxisRules) -> int:
    """How many ways the ``batch`` rule splits rows on ``mesh``: batches pad to a multiple."""
    axes = layers.mesh_axes(mesh_lib.logical_to_spec(("batch",), rules)[0])
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))


def pad_rows(array_BX: np.ndarray, rows: int) -> np.ndarray:
    """Append zero rows up to ``rows`` (no-op when already that long)."""
    n = array_BX.shape[0]
    if rows <= n:
        return array_BX
    return np.concatenate([array_BX, np.zeros((rows - n,) + array_BX.shape[1:], array_BX.dtype)])


def padded_size(n: int, multiple: int, batch_size: int | None = None) -> int:
    """``max(n, batch_size)`` rounded up to ``multiple``."""
    return -(-max(n, batch_size or n) // multiple) * multiple


def to_global(array_BX: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the full batch that every host holds."""
    return jax.make_array_from_callback(array_BX.shape, sharding, lambda index: array_BX[index])


def bucket_length(n: int, minimum: int = 8) -> int:
    """The next power of two >= n (at least ``minimum``): few distinct shapes, few compiles."""
    length = minimum
    while length < n:
        length *= 2
    return length


def pad_ids(rows: list[list[int]], length: int) -> np.ndarray:
    """int32 [len(rows), length], right-padded with 0; longer rows are cut."""
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, :len(row)] = row
    return out


def score_batch_arrays(inputs: list[list[int]], targets: list[list[int]], *,
                       inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
    """An unpacked host batch from token id lists (targets with EOS).

    The decoder input is the target shifted right with 0 (BOS) in front, as seqio's
    ``EncDecFeatureConverter`` makes it.
    """
    targets_BT = pad_ids(targets, targets_length)
    decoder_inputs_BT = np.zeros_like(targets_BT)
    decoder_inputs_BT[:, 1:] = targets_BT[:, :-1]
    return {
        "encoder_input_tokens": pad_ids(inputs, inputs_length),
        "decoder_input_tokens": decoder_inputs_BT,
        "decoder_target_tokens": targets_BT,
        "decoder_loss_weights": (targets_BT > 0).astype(np.int32),
    }
