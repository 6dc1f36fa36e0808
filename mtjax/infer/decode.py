"""Decoding with a KV cache: greedy, temperature sampling (top-k / top-p) and beam search.

The encoder runs once; each step feeds one token per sequence through ``T5.decode_step``, which
reads and extends a cache of self-attention keys/values and the precomputed cross-attention
keys/values. The loop is a ``lax.while_loop`` that stops early once every sequence is done, so a
whole decode is one compiled program per (options, batch shape). :class:`Decoder` compiles it
under the mesh and logical rules the model was built with, pads the batch to the mesh, and
returns host numpy arrays.

Output conventions (as T5X): token 0 after EOS; a greedy or sampled sequence's score is the sum of
its tokens' log-probabilities under the model (EOS included, temperature not applied); a beam's
score is that sum divided by T5's length penalty ``((5 + length) / 6) ** alpha``, where length
counts the generated tokens including EOS. A beam search item that finished no sequence within
``max_decode_length`` returns its live beams with their raw log-probability sums.

Letter legend: B batch, S encoder length, T decode length, V vocab, K beams.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax.config import MAX_DECODE_LENGTH  # one limit for the flags and eval.max_decode_length
from mtjax.errors import UserError
from mtjax.infer import batching
from mtjax.parallel import mesh as mesh_lib

# "Effective minus infinity" for log-probabilities of dead beams and masked candidates (T5X's
# value): finite, so sums of a few of them stay ordered and never turn into NaN.
NEG_INF = -1.0e7

_MAX_SEED = 2**63 - 1  # the int64 jax.random.key takes
EOS_ID = 1  # T5 vocabularies (SentencePiece and byte) put EOS at id 1; 0 is padding/BOS


class DecodeOptionsError(UserError, ValueError):
    """Decoding options that do not go together; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode.

    Attributes:
        max_decode_length: decoder positions (generated tokens, EOS included).
        beam_size: 1 for greedy or sampling; more for beam search.
        alpha: beam search length penalty exponent (T5: 0.6); 0 ranks by log-probability.
        temperature: 0 for greedy (argmax); above 0 samples from softmax(logits / temperature).
        top_k: when sampling, keep only the k most likely tokens (0: all).
        top_p: when sampling, keep the smallest set of most likely tokens whose probability
            reaches p (1.0: all).
        eos_id: the end-of-sequence id; -1 never stops early (benchmarks).
        seed: sampling seed.
    """

    max_decode_length: int = 64
    beam_size: int = 1
    alpha: float = 0.6
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = EOS_ID
    seed: int = 0

    def __post_init__(self):
        for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p),
                            ("--alpha", self.alpha)):
            if not math.isfinite(value):  # NaN passes every comparison below
                raise DecodeOptionsError(f"{flag} must be a finite number, got {value}")
        if self.max_decode_length > MAX_DECODE_LENGTH:
            raise DecodeOptionsError(
                f"--max-decode-length {self.max_decode_length} is more than mtjax decodes "
                f"({MAX_DECODE_LENGTH}: its cache is allocated for the whole length)")
        if self.max_decode_length < 1:
            raise DecodeOptionsError(
                f"--max-decode-length must be at least 1, got {self.max_decode_length}")
        if self.beam_size < 1:
            raise DecodeOptionsError(f"--beam-size must be at least 1, got {self.beam_size}")
        if self.temperature < 0:
            raise DecodeOptionsError(f"--temperature must be >= 0, got {self.temperature}")
        if self.beam_size > 1 and (self.temperature > 0 or self.top_k or self.top_p < 1):
            raise DecodeOptionsError(
                "beam search (--beam-size > 1) is deterministic: drop --temperature, --top-k "
                "and --top-p, or use --beam-size 1 to sample")
        if self.top_k < 0:
            raise DecodeOptionsError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DecodeOptionsError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            # Greedy decoding ignores them; a silent argmax would look like a sampled answer.
            raise DecodeOptionsError(
                "--top-k and --top-p restrict sampling, and decoding is greedy without "
                "--temperature: add --temperature T (1.0 samples from the model's distribution)")
        if self.alpha < 0:
            raise DecodeOptionsError(f"--alpha must be >= 0, got {self.alpha}")
        if not -_MAX_SEED <= self.seed <= _MAX_SEED:  # beyond, jax.random.key overflows
            raise DecodeOptionsError(f"--seed must be between -{_MAX_SEED} and {_MAX_SEED} "
                                     f"(as train.seed), got {self.seed}")

    @property
    def sampling(self) -> bool:
        return self.beam_size == 1 and self.temperature > 0


def length_penalty(length, alpha: float):
    """T5's (GNMT's) length penalty ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + length) / 6.0) ** alpha


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p``; the most likely token is always kept. Ties at a threshold are kept.
    """
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = mass_before_BV < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


def _encode_and_cache(model, encoder_input_tokens_BS, max_length: int, num_decodes: int = 1):
    # Beams of one input are adjacent rows b * K + k of the self-attention cache; they share
    # the input's cross-attention keys/values (one copy per input).
    encoded_BSD = model.encode(encoder_input_tokens_BS)
    return model.init_cache(encoded_BSD, encoder_input_tokens_BS, max_length, num_decodes)


def _padding_rows(b: int, rows: int | jax.Array | None) -> jax.Array:
    """bool [B]: the rows past ``rows`` (none when None). They end the loop as if finished:
    a batch padded to its compiled size ran to ``max_decode_length`` after every input ended,
    since all-zero rows rarely say EOS."""
    if rows is None:
        return jnp.zeros((b,), bool)
    return jnp.arange(b) >= rows


def sample_decode(model, encoder_input_tokens_BS: jax.Array, options: DecodeOptions,
                  rng: jax.Array | None = None, first_row: int | jax.Array = 0,
                  rows: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy (temperature 0) or sampled decoding; traceable, call under ``jax.jit``.

    Args:
        model: a ``T5`` (merged inside the traced function).
        encoder_input_tokens_BS: int32 [B, S], 0 is padding.
        options: max length, temperature, top-k, top-p, EOS.
        rng: a PRNG key when sampling.
        first_row: the index of row 0 in the whole input. Row r samples with ``rng`` folded
            with ``first_row + r``: a record's sample depends on the seed and its place in
            the input, not on the batch it landed in (one key for every batch repeated the
            same noise in each batch's row r).
        rows: the rows that are inputs (None: all); the rest pad the batch, start finished
            and decode to zeros.

    Returns:
        (int32 tokens [B, T], float32 log-probability sums [B]).
    """
    b = encoder_input_tokens_BS.shape[0]
    t = options.max_decode_length
    cache = _encode_and_cache(model, encoder_input_tokens_BS, t)
    if rng is None:
        rng = jax.random.key(options.seed)
    row_keys_B = jax.vmap(lambda row: jax.random.fold_in(rng, row))(first_row + jnp.arange(b))

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < t) & ~jnp.all(done_B)

    def body(carry):
        i, tokens_BT, prev_B1, cache, done_B, logprob_B = carry
        logits_BV, cache = model.decode_step(prev_B1, cache, i)
        token_B = jnp.argmax(logits_BV, axis=-1)  # greedy
        if options.sampling:
            # In float32: a tiny temperature overflows logits / T to inf, and categorical
            # then takes the first infinite logit, not the largest; such rows stay greedy.
            scaled_BV = logits_BV.astype(jnp.float32) / options.temperature
            filtered_BV = filter_logits(scaled_BV, options.top_k, options.top_p)
            sampled_B = jax.vmap(lambda key, row_V: jax.random.categorical(
                jax.random.fold_in(key, i), row_V))(row_keys_B, filtered_BV)
            token_B = jnp.where(jnp.all(jnp.isfinite(scaled_BV), axis=-1), sampled_B, token_B)
        token_B = jnp.where(done_B, 0, token_B).astype(jnp.int32)
        logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
        token_logprob_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
        logprob_B = logprob_B + jnp.where(done_B, 0.0, token_logprob_B)
        tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, token_B[:, None], i, axis=1)
        done_B = done_B | (token_B == options.eos_id)
        return i + 1, tokens_BT, token_B[:, None], cache, done_B, logprob_B

    init = (jnp.int32(0), jnp.zeros((b, t), jnp.int32), jnp.zeros((b, 1), jnp.int32), cache,
            _padding_rows(b, rows), jnp.zeros((b,), jnp.float32))
    _, tokens_BT, _, _, _, logprob_B = jax.lax.while_loop(cond, body, init)
    return tokens_BT, logprob_B


def _gather_beams(x_BKX: jax.Array, index_BN: jax.Array) -> jax.Array:
    """Pick beams ``index`` [B, N] of every batch item from ``x`` [B, K, ...]."""
    index = index_BN.reshape(index_BN.shape + (1,) * (x_BKX.ndim - 2))
    return jnp.take_along_axis(x_BKX, index, axis=1)


def beam_search(model, encoder_input_tokens_BS: jax.Array, options: DecodeOptions,
                rows: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Beam search with T5's length penalty; traceable, call under ``jax.jit``.

    Each step extends every live beam by every token, keeps the 2K best candidates (so that K
    stay live even if K of them end with EOS), moves those ending with EOS into the finished set
    (scored with the length penalty) and keeps the K best others live. Stops when no live beam
    can still beat the worst finished one, or at ``max_decode_length``. Items past ``rows``
    (padding; None: none) do not keep the search going.

    Returns:
        (int32 tokens [B, K, T], float32 scores [B, K]), best first.
    """
    b = encoder_input_tokens_BS.shape[0]
    k, t, alpha = options.beam_size, options.max_decode_length, options.alpha
    cache = _encode_and_cache(model, encoder_input_tokens_BS, t, num_decodes=k)
    batch_offsets_B1 = (jnp.arange(b) * k)[:, None]
    padding_B1 = _padding_rows(b, rows)[:, None]

    def cond(state):
        i, live_logprobs_BK, _, finished_scores_BK, finished_BK, _ = state
        # The best a live beam can still reach: its log-probability only falls, and the
        # penalty's denominator grows at most to that of the longest length.
        best_live_B1 = live_logprobs_BK[:, :1] / length_penalty(t, alpha)
        worst_finished_BK = jnp.where(finished_BK, jnp.min(finished_scores_BK, axis=1,
                                                           keepdims=True), NEG_INF)
        return (i < t) & ~jnp.all((worst_finished_BK > best_live_B1) | padding_B1)

    def body(state):
        i, live_logprobs_BK, live_seqs_BKT, finished_scores_BK, finished_BK, rest = state
        finished_seqs_BKT, cache = rest
        prev_BK = jax.lax.dynamic_index_in_dim(live_seqs_BKT, jnp.maximum(i - 1, 0), axis=2,
                                               keepdims=False)
        prev_BK = jnp.where(i == 0, 0, prev_BK)
        logits_NV, cache = model.decode_step(prev_BK.reshape(b * k, 1), cache, i)
        v = logits_NV.shape[-1]
        logprobs_BKV = jax.nn.log_softmax(logits_NV, axis=-1).reshape(b, k, v)
        candidates_BKV = live_logprobs_BK[:, :, None] + logprobs_BKV
        top_logprobs_BC, top_index_BC = jax.lax.top_k(candidates_BKV.reshape(b, k * v), 2 * k)
        source_beam_BC, token_BC = top_index_BC // v, top_index_BC % v
        seqs_BCT = _gather_beams(live_seqs_BKT, source_beam_BC)
        seqs_BCT = jax.lax.dynamic_update_slice_in_dim(seqs_BCT, token_BC[:, :, None], i, axis=2)
        # Candidates grown from the dead initial beams (log-probability near NEG_INF) never
        # count as finished, even if they end with EOS.
        is_eos_BC = (token_BC == options.eos_id) & (top_logprobs_BC > NEG_INF / 2)

        # Live: the K best candidates that did not just end.
        live_logprobs_BK, keep_BK = jax.lax.top_k(top_logprobs_BC + is_eos_BC * NEG_INF, k)
        live_seqs_BKT = _gather_beams(seqs_BCT, keep_BK)
        rows_N = (batch_offsets_B1 + _gather_beams(source_beam_BC, keep_BK)).reshape(-1)
        cache = {**cache, "layers": [
            {**layer, "self_k": layer["self_k"][rows_N], "self_v": layer["self_v"][rows_N]}
            for layer in cache["layers"]]}

        # Finished: merge the candidates that just ended with the finished set; keep K best.
        new_scores_BC = top_logprobs_BC / length_penalty(i + 1, alpha) + ~is_eos_BC * NEG_INF
        all_scores = jnp.concatenate([finished_scores_BK, new_scores_BC], axis=1)
        finished_scores_BK, best_BK = jax.lax.top_k(all_scores, k)
        finished_BK = _gather_beams(jnp.concatenate([finished_BK, is_eos_BC], axis=1), best_BK)
        finished_seqs_BKT = _gather_beams(
            jnp.concatenate([finished_seqs_BKT, seqs_BCT], axis=1), best_BK)
        return (i + 1, live_logprobs_BK, live_seqs_BKT, finished_scores_BK, finished_BK,
                (finished_seqs_BKT, cache))

    live_logprobs_BK = jnp.tile(jnp.array([[0.0] + [NEG_INF] * (k - 1)], jnp.float32), (b, 1))
    zeros_BKT = jnp.zeros((b, k, t), jnp.int32)
    init = (jnp.int32(0), live_logprobs_BK, zeros_BKT, jnp.full((b, k), NEG_INF, jnp.float32),
            jnp.zeros((b, k), bool), (zeros_BKT, cache))
    _, live_logprobs_BK, live_seqs_BKT, finished_scores_BK, finished_BK, rest = (
        jax.lax.while_loop(cond, body, init))
    any_finished_B = jnp.any(finished_BK, axis=1)
    seqs_BKT = jnp.where(any_finished_B[:, None, None], rest[0], live_seqs_BKT)
    scores_BK = jnp.where(any_finished_B[:, None], finished_scores_BK, live_logprobs_BK)
    return seqs_BKT, scores_BK


def decode(model, encoder_input_tokens_BS: jax.Array, options: DecodeOptions,
           rng: jax.Array | None = None, first_row: int | jax.Array = 0,
           rows: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The best sequence [B, T] and its score [B] by the algorithm ``options`` select
    (``first_row``, ``rows``: see ``sample_decode``)."""
    if options.beam_size > 1:
        seqs_BKT, scores_BK = beam_search(model, encoder_input_tokens_BS, options, rows)
        return seqs_BKT[:, 0], scores_BK[:, 0]
    return sample_decode(model, encoder_input_tokens_BS, options, rng, first_row, rows)


class Decoder:
    """Decoding of one model on a mesh, compiled once per (options, batch shape).

    Args:
        model_def: anything with ``merge(params) -> T5`` (``mtjax.train.state.ModelDef`` or
            ``mtjax.infer.load.ModelDef``).
        mesh: the mesh the parameters live on.
        rules: the logical axis rules the model was built with.
    """

    def __init__(self, model_def: Any, mesh: Mesh, rules: mesh_lib.AxisRules):
        self.model_def = model_def
        self.mesh = mesh
        self.rules = rules
        self._batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_multiple = batching.batch_shards(mesh, rules)
        self._compiled: dict[DecodeOptions, Callable] = {}

    def _fn(self, options: DecodeOptions) -> Callable:
        options = dataclasses.replace(options, seed=0)  # the key is an argument: no recompile
        if options not in self._compiled:
            def run(params, tokens_BS, rng, first_row, rows):
                model = self.model_def.merge(params)
                return decode(model, tokens_BS, options, rng, first_row, rows)

            # Inputs keep the shardings they are placed with (parameters by their logical
            # rules, tokens split over the batch axes); outputs are replicated so that every
            # host can read all of them.
            self._compiled[options] = jax.jit(run, out_shardings=self._replicated)
        return self._compiled[options]

    def __call__(self, params: Any, encoder_input_tokens_BS: np.ndarray,
                 options: DecodeOptions, *, batch_size: int | None = None,
                 rng: jax.Array | None = None,
                 first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decode a host batch (the same on every host).

        Args:
            params: the model's parameters, placed on ``mesh``.
            encoder_input_tokens_BS: int32 [B, S], 0 is padding.
            options: the decoding algorithm and its settings.
            batch_size: pad to this many rows (keeps one compiled shape across batches).
            rng: sampling key (default: from ``options.seed``).
            first_row: the index of the batch's first row in the whole input (sampling
                draws each row's noise from its index, whatever the batch).

        Returns:
            (int32 tokens [B, T], float32 scores [B]) as numpy arrays.
        """
        n = encoder_input_tokens_BS.shape[0]
        rows = batching.padded_size(n, self.batch_multiple, batch_size)
        tokens_BS = batching.to_global(
            batching.pad_rows(np.asarray(encoder_input_tokens_BS, np.int32), rows),
            self._batch_sharding)
        if rng is None:
            rng = jax.random.key(options.seed)
        with mesh_lib.activate(self.mesh, self.rules):
            tokens_BT, scores_B = self._fn(options)(params, tokens_BS, rng,
                                                    np.int32(first_row), np.int32(n))
        tokens_BT, scores_B = jax.device_get((tokens_BT, scores_B))
        return np.asarray(tokens_BT)[:n], np.asarray(scores_B)[:n]


def trim_at_eos(tokens_T: np.ndarray, eos_id: int = EOS_ID) -> list[int]:
    """Token ids before the first EOS, for ``vocabulary.decode``."""
    tokens = [int(x) for x in tokens_T.tolist()]
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
