"""First-fit packing of examples into fixed-length rows, in TF ops (checkpointable).

seqio's TF-op packer keeps one open row: an example that does not fit closes it, so a long
example after a few short ones wastes the rest of the row. Here a window of examples is packed
first-fit into as many open rows as needed: each example goes to the first row where all of its
features fit. The output format is seqio's (`trim_and_pack_dataset`), so the feature converter
uses it unchanged.

Worked example (lengths {"inputs": 6, "targets": 4}, window of 3, in order):

    {"inputs": [5, 6, 7, 1], "targets": [8, 1]}           -> row 0, segment 1
    {"inputs": [9, 9, 9, 9, 1], "targets": [3, 3, 1]}     -> does not fit row 0 -> row 1, segment 1
    {"inputs": [4, 1], "targets": [2, 1]}                 -> fits row 0 -> row 0, segment 2

    row 0: inputs [5 6 7 1 4 1], inputs_segment_ids [1 1 1 1 2 2], inputs_positions [0 1 2 3 0 1]
           targets [8 1 2 1],    targets_segment_ids [1 1 2 2],    targets_positions [0 1 0 1]
    row 1: inputs [9 9 9 9 1 0], targets [3 3 1 0], segment ids 1 (0 on padding)

(seqio's packer would have made three rows: [5 6 7 1] closes when [9 9 9 9 1] arrives.)
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

# Examples packed together; the last rows of each window may be left part-empty.
WINDOW = 512


def first_fit_pack(dataset: tf.data.Dataset, feature_lengths: Mapping[str, int],
                   window: int = WINDOW) -> tf.data.Dataset:
    """Trims each feature to its length and packs examples first-fit into rows.

    Args:
        dataset: examples with 1-D int features (0 is padding, never a token).
        feature_lengths: feature -> row length; other features are dropped.
        window: examples packed together.

    Returns:
        Rows with, per feature k: k, k_segment_ids (1, 2, ... per example, 0 on padding) and
        k_positions (position within the example).
    """
    keys = list(feature_lengths)
    ds = dataset.map(lambda ex: {k: tf.cast(ex[k][:feature_lengths[k]], tf.int32) for k in keys},
                     num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.padded_batch(window, padded_shapes={k: [-1] for k in keys})
    ds = ds.map(lambda batch: _pack_window(batch, feature_lengths),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch()


def _assign_rows(sizes_KW: tf.Tensor, limits_K: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """First-fit: (row, offset per feature, segment id) of each of the W examples.

    Args:
        sizes_KW: tokens of each example (W) in each feature (K).
        limits_K: row length of each feature.
    """
    num = tf.shape(sizes_KW)[1]
    used_KW = tf.zeros_like(sizes_KW)  # tokens used per feature in each (potential) row
    count_W = tf.zeros([num], tf.int32)  # examples in each row

    def body(i, used_KW, count_W, rows, offsets, segments):
        size_K = sizes_KW[:, i]
        fits_W = tf.reduce_all(used_KW + size_K[:, None] <= limits_K[:, None], axis=0)
        row = tf.cast(tf.argmax(tf.cast(fits_W, tf.int32)), tf.int32)  # first row that fits
        offsets = offsets.write(i, used_KW[:, row])
        used_KW = tf.tensor_scatter_nd_add(
            used_KW, tf.stack([tf.range(tf.shape(size_K)[0]), tf.fill(tf.shape(size_K), row)],
                              axis=1), size_K)
        count_W = tf.tensor_scatter_nd_add(count_W, [[row]], [1])
        return (i + 1, used_KW, count_W, rows.write(i, row), offsets,
                segments.write(i, count_W[row]))

    arrays = (tf.TensorArray(tf.int32, size=num), tf.TensorArray(tf.int32, size=num),
              tf.TensorArray(tf.int32, size=num))
    _, _, _, rows, offsets, segments = tf.while_loop(
        lambda i, *_: i < num, body, (0, used_KW, count_W, *arrays))
    return rows.stack(), tf.transpose(offsets.stack()), segments.stack()


@tf.autograph.experimental.do_not_convert  # TF ops and tf.while_loop: nothing to convert
def _pack_window(batch: Mapping[str, tf.Tensor],
                 feature_lengths: Mapping[str, int]) -> dict[str, tf.Tensor]:
    keys = list(feature_lengths)
    sizes_KW = tf.stack([tf.reduce_sum(tf.cast(batch[k] != 0, tf.int32), axis=1) for k in keys])
    limits_K = tf.constant([feature_lengths[k] for k in keys], tf.int32)
    rows_W, offsets_KW, segments_W = _assign_rows(sizes_KW, limits_K)
    num_rows = tf.reduce_max(rows_W) + 1
    out = {}
    for j, k in enumerate(keys):
        tokens = batch[k]
        mask = tf.sequence_mask(sizes_KW[j], tf.shape(tokens)[1])
        where = tf.cast(tf.where(mask), tf.int32)  # (example, position) of every token
        example, position = where[:, 0], where[:, 1]
        index = tf.stack([tf.gather(rows_W, example),
                          tf.gather(offsets_KW[j], example) + position], axis=1)
        shape = tf.stack([num_rows, feature_lengths[k]])
        out[k] = tf.scatter_nd(index, tf.gather_nd(tokens, where), shape)
        out[f"{k}_positions"] = tf.scatter_nd(index, position, shape)
        out[f"{k}_segment_ids"] = tf.scatter_nd(index, tf.gather(segments_W, example), shape)
    return out
