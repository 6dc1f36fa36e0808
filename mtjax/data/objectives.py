"""Unsupervised objectives over text, as seqio preprocessors: T5 span corruption and prefix LM.

Both follow T5 (Raffel et al. 2020, §3.1.4 and §3.3; `t5.data.preprocessors`), rewritten in TF
ops so that they run inside the checkpointable tf.data pipeline and draw fresh noise every epoch
(they are post-cache preprocessors: seqio repeats the source before applying them).

Worked example (span corruption, byte vocabulary of size 259, so sentinels are 258, 257, ...):

    targets tokens  [t0 t1 t2 t3 t4 t5 t6 t7 t8 t9]     noise mask [0 0 1 1 0 0 0 1 0 0]
    inputs   ->     [t0 t1 258 t4 t5 t6 257 t8 t9]      (each noise span -> one sentinel)
    targets  ->     [258 t2 t3 257 t7 256]              (each kept span -> one sentinel)

EOS is appended afterwards by `seqio.preprocessors.append_eos_after_trim`.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from mtjax.data.vocab import describe as describe_vocab

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# Documents concatenated before chunking, as T5's `reduce_concat_tokens(batch_size=128)`: short
# documents then fill whole chunks instead of leaving padding for the packer.
CONCAT_DOCUMENTS = 128


def random_spans_helper(
    inputs_length: int, noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """The raw chunk length whose corruption fills `inputs_length` exactly (T5's helper).

    Args:
        inputs_length: the configured inputs length, EOS included.
        noise_density: fraction of tokens replaced by noise spans.
        mean_noise_span_length: mean length of a noise span.

    Returns:
        (tokens_length, targets_length): chunk length before corruption, and the targets length
        (EOS included) that chunk produces. T5's 512 inputs give (568, 114).
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _noise_counts(tokens_length, noise_density,
                                             mean_noise_span_length)
        num_nonnoise = tokens_length - num_noise
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = max(inputs_length - 1, 2)
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def _noise_counts(tokens_length: int, noise_density: float,
                  mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of ``tokens_length`` tokens, computed exactly as
    `random_spans_noise_mask` does: in float32 and clipped. (T5's helper counts in float64,
    and where length * density is a half in float64 but just above one in float32, 190 * 0.15
    say, it counted one noise token and one span fewer than the mask makes: targets 2 tokens
    longer than it reported.)"""
    length = max(tokens_length, 2)
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, min(max(num_spans, 1), min(num_noise, length - num_noise))


def _noise_span_count(tokens_length: int, noise_density: float,
                      mean_noise_span_length: float) -> int:
    """Noise spans in a chunk of ``tokens_length`` tokens, as the noise mask makes them."""
    return _noise_counts(tokens_length, noise_density, mean_noise_span_length)[1]


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
    """Splits `num_items` into `num_segments` random non-empty parts; returns their lengths."""
    is_first = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    order = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))
    first_in_segment = tf.pad(tf.gather(is_first, order), [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(
    length: tf.Tensor, seed, noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
    """Boolean [length] mask: round(length * noise_density) noise tokens in random spans.

    Spans alternate non-noise, noise, ..., starting with non-noise; their number is
    round(num_noise / mean_noise_span_length) (at least 1, at most the non-noise tokens), so
    the mean noise span length is mean_noise_span_length up to rounding. Lengths below 2 are
    treated as 2, as in T5.
    """
    orig_length = length
    length = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    # Each noise span follows a kept span: at most as many spans as kept tokens (dense noise
    # of short spans asked for more, and the spans' lengths no longer paired up).
    num_spans = tf.clip_by_value(num_spans, 1, tf.minimum(num_noise, length - num_noise))
    seeds = tf.random.experimental.stateless_split(seed, 2)
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    span_starts = tf.cumsum(interleaved)[:-1]
    starts = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
    return (tf.math.floormod(tf.cumsum(starts), 2) == 1)[:orig_length]


def random_prefix_noise_mask(length: tf.Tensor, seed, noise_density: float = 0.5) -> tf.Tensor:
    """Boolean [length] mask that is True on a random suffix (T5's prefix-LM split).

    The prefix (kept as inputs) has between round((1 - 2 * noise_density) * (length - 1)) and
    length - 1 tokens, uniformly, as in T5: the suffix (the targets) holds noise_density of the
    tokens on average (0.5: a split point uniform over the chunk), and is never empty.
    """
    max_inputs = tf.maximum(length - 1, 1)
    min_inputs = tf.cast(tf.round((1.0 - 2 * noise_density) * tf.cast(max_inputs, tf.float32)),
                         tf.int32)
    min_inputs = tf.clip_by_value(min_inputs, 1, max_inputs)
    num_inputs = tf.random.stateless_uniform(
        [], minval=min_inputs, maxval=max_inputs + 1, dtype=tf.int32, seed=seed)
    # A 1-token chunk (the last of a document group) keeps its token as the target, as T5
    # does, with empty inputs: a target of EOS alone teaches nothing.
    return tf.range(length) >= tf.minimum(num_inputs, length - 1)


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                  vocab_size: int) -> tf.Tensor:
    """Each masked span becomes one sentinel; sentinels count down from vocab_size - 1.

    vocab_size - 1 is `<extra_id_0>` of a SentencePiece vocabulary with extra ids, and byte 255
    (never valid UTF-8) of the byte vocabulary, as in ByT5.
    """
    previous = tf.pad(noise_mask[:-1], [[1, 0]])
    first = tf.logical_and(noise_mask, tf.logical_not(previous))
    sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
    tokens = tf.where(first, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(tf.logical_and(noise_mask, previous)))


def _targets_only(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Keeps the tokenized `targets` and drops empty documents."""
    ds = ds.map(lambda ex: {"targets": ex["targets"]}, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda ex: tf.size(ex["targets"]) > 0)


def concat_and_split(ds: tf.data.Dataset, chunk_length: int,
                     concat_documents: int = CONCAT_DOCUMENTS) -> tf.data.Dataset:
    """Concatenates `concat_documents` documents' `targets`, then cuts chunks of `chunk_length`.

    T5's `reduce_concat_tokens` + `split_tokens`: every chunk but the last of a group is full.
    """
    ds = _targets_only(ds)
    if concat_documents > 1:
        ds = ds.padded_batch(concat_documents, padded_shapes={"targets": [-1]})
        ds = ds.map(lambda ex: {"targets": tf.boolean_mask(
            tf.reshape(ex["targets"], [-1]), tf.reshape(ex["targets"], [-1]) != 0)},
            num_parallel_calls=tf.data.AUTOTUNE)

    def split(ex):
        tokens = ex["targets"]
        n = tf.size(tokens, out_type=tf.int64)
        size = tf.constant(chunk_length, tf.int64)
        num_chunks = (n + size - 1) // size
        lengths = tf.minimum(size, n - tf.range(num_chunks) * size)
        return {"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)}

    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def span_corruption(noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                    concat_documents: int = CONCAT_DOCUMENTS):
    """The span-corruption preprocessor; put it after `tokenize`, before `append_eos_after_trim`.

    Tokenized `targets` (documents) are concatenated and cut into chunks whose corruption fills
    the configured inputs length exactly (`random_spans_helper`), then corrupted: `inputs` keep
    the unmasked tokens with one sentinel per noise span, `targets` hold the noise spans, each
    after its sentinel.

    Args:
        noise_density: fraction of each chunk's tokens that are noise (T5: 0.15).
        mean_noise_span_length: mean number of tokens per noise span (T5: 3).
        concat_documents: documents concatenated before chunking; 1 keeps documents apart.

    Returns:
        A seqio preprocessor `fn(dataset, sequence_length, output_features)`.
    """
    _check_rates(noise_density, mean_noise_span_length)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(features, seed, output_features):
        tokens = features["targets"]
        vocab_size = output_features["targets"].vocabulary.vocab_size
        mask = random_spans_noise_mask(tf.size(tokens), seed, noise_density,
                                       mean_noise_span_length)
        return {
            "inputs": noise_span_to_unique_sentinel(tokens, mask, vocab_size),
            "targets": noise_span_to_unique_sentinel(tokens, tf.logical_not(mask), vocab_size),
        }

    def preprocessor(dataset, sequence_length, output_features):
        check_sentinels(output_features["targets"].vocabulary)
        if sequence_length and sequence_length.get("inputs"):
            chunk, _ = random_spans_helper(sequence_length["inputs"], noise_density,
                                           mean_noise_span_length)
            _check_sentinel_count(output_features["targets"].vocabulary, chunk, noise_density,
                                  mean_noise_span_length, sequence_length["inputs"])
            dataset = concat_and_split(dataset, chunk, concat_documents)
        else:  # no lengths (e.g. scoring whole documents): one example per document
            dataset = _targets_only(dataset)
        return corrupt(dataset, output_features=output_features)

    preprocessor.__name__ = f"span_corruption_{noise_density}_{mean_noise_span_length}"
    return preprocessor


def prefix_lm(noise_density: float = 0.5, concat_documents: int = CONCAT_DOCUMENTS):
    """The prefix-LM preprocessor; put it after `tokenize`, before `append_eos_after_trim`.

    Documents are concatenated and cut into chunks sized so that neither side is truncated
    (`prefix_lm_chunk_length`). Each chunk is split at a random point: the prefix becomes
    `inputs`, the rest `targets`.

    Args:
        noise_density: the mean fraction of a chunk that goes to the targets, at most 0.5
            (T5: 0.5, a split point uniform over the chunk).
        concat_documents: documents concatenated before chunking; 1 keeps documents apart.

    Returns:
        A seqio preprocessor `fn(dataset, sequence_length, output_features)`.
    """
    _check_rates(noise_density, 1.0)
    if noise_density > 0.5:  # the split point is uniform from the start at 0.5 already
        raise ValueError(f"prefix LM noise_density must be at most 0.5, got {noise_density}")

    @seqio.map_over_dataset(num_seeds=1)
    def split(features, seed):
        tokens = features["targets"]
        mask = random_prefix_noise_mask(tf.size(tokens), seed, noise_density)
        return {"inputs": tf.boolean_mask(tokens, tf.logical_not(mask)),
                "targets": tf.boolean_mask(tokens, mask)}

    def preprocessor(dataset, sequence_length):
        if sequence_length and sequence_length.get("inputs") and sequence_length.get("targets"):
            chunk = prefix_lm_chunk_length(sequence_length["inputs"],
                                           sequence_length["targets"], noise_density)
            dataset = concat_and_split(dataset, chunk, concat_documents)
        else:
            dataset = _targets_only(dataset)
        return split(dataset)

    preprocessor.__name__ = f"prefix_lm_{noise_density}"
    return preprocessor


def prefix_lm_chunk_length(inputs_length: int, targets_length: int,
                           noise_density: float = 0.5) -> int:
    """The longest chunk whose prefix-LM split fits both lengths (EOS included) untruncated."""

    def longest_targets(chunk: int) -> int:  # as random_prefix_noise_mask rounds (float32)
        min_inputs = np.round(np.float32(1.0 - 2 * noise_density) * np.float32(chunk - 1))
        return chunk - int(min(max(min_inputs, 1), chunk - 1))

    chunk = max(inputs_length, 3)
    while chunk > 2 and longest_targets(chunk) > targets_length - 1:
        chunk -= 1
    return chunk


def check_sentinels(vocab: seqio.Vocabulary) -> None:
    """Raises ValueError when the top ids of `vocab` are ordinary pieces, not sentinels."""
    if isinstance(vocab, seqio.SentencePieceVocabulary) and not vocab.extra_ids:
        raise ValueError(
            f"span corruption needs sentinel ids, but {vocab} has no extra ids: use "
            "seqio.SentencePieceVocabulary(path, extra_ids=100) (what mtjax's get_vocabulary "
            "returns for a .model path)")


def _check_sentinel_count(vocab: seqio.Vocabulary, chunk: int, noise_density: float,
                          mean_noise_span_length: float, inputs_length: int) -> None:
    """Raises ValueError when a full chunk has more noise spans than `vocab` has sentinels:
    the spans past them would be marked with ordinary pieces (or, past the bytes of the byte
    vocabulary, UNK, EOS and padding)."""
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        sentinels = vocab.extra_ids
    elif isinstance(vocab, seqio.ByteVocabulary):
        sentinels = 256 + vocab.extra_ids  # ByT5: the top byte values
    else:
        return
    spans = _noise_span_count(chunk, noise_density, mean_noise_span_length)
    if spans > sentinels:
        raise ValueError(
            f"span corruption at inputs length {inputs_length} makes {spans} noise spans per "
            f"chunk, but {describe_vocab(vocab)} has {sentinels} sentinel ids: shorten "
            f"data.inputs_length, or raise mean_noise_span_length")


def _check_rates(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
