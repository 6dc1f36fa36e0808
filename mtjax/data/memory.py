"""In-memory examples as a seqio source's dataset: made of TF ops (the input iterator can be saved
in a checkpoint), and shuffled whole at every epoch when training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    import seqio


def examples_dataset(columns: Mapping[str, Sequence[str] | tf.Tensor], shuffle: bool,
                     seed: int | None, shard_info: seqio.ShardInfo | None = None
                     ) -> tf.data.Dataset:
    """Examples held in memory (feature -> strings); with ``shuffle``, in a new order of the
    whole split at each pass (seqio repeats the source for each epoch, then shuffles within a
    buffer of 1,000 examples only: a file sorted by label or source trained on one label at a
    time, and every epoch of a split came in nearly the same order).

    Each pass draws one random number, and the order is a permutation computed from it: the
    input iterator's checkpoint holds that number and a position. (A shuffle buffer of the
    indices held 280 bytes per example in every checkpoint: 28 MB for 100,000 examples.)

    With ``shard_info`` (shuffled only), a host takes every num_shards-th example of each
    pass's order, from its index on: every host draws the same numbers (one seed), so the
    hosts' shares of a pass are disjoint and together the whole split, new at each pass.
    Each pass leaves out its order's last ``size % num_shards`` examples (others at each
    pass), so every host's pass has the same length: with 7 examples and 2 hosts, host 0
    took 4 a pass and host 1 took 3, and host 1's epochs ran ahead of host 0's. With fewer
    examples than hosts, every host takes one example a pass (hosts share some)."""
    tensors = {k: tf.convert_to_tensor(v, tf.string) for k, v in columns.items()}
    if not shuffle:
        return tf.data.Dataset.from_tensor_slices(tensors)
    size = tf.shape(next(iter(tensors.values())))[0]

    def one_pass(draw: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(size), seed=tf.stack([draw, tf.constant(seed or 0, tf.int64)]))
        if shard_info is not None and shard_info.num_shards > 1:
            hosts = shard_info.num_shards
            # Positions index, index + hosts, ... below size - size % hosts. A split smaller
            # than the hosts gives each host one example a pass, some the same one (a host
            # with an empty share ended its stream, and the run with it).
            per_host = tf.maximum(size // hosts, 1)
            order = tf.gather(order, tf.range(shard_info.index,
                                              shard_info.index + per_host * hosts, hosts) % size)
        return tf.data.Dataset.from_tensor_slices(order)

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    return draws.flat_map(one_pass).map(
        lambda i: {k: tf.gather(v, i) for k, v in tensors.items()})
