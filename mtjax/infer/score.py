"""Scoring (T5X's "score" mode): the log-likelihood of given targets under the model.

A target's score is the sum of its tokens' log-probabilities, EOS included, in float32, with the
same teacher-forced forward pass and the same cross-entropy as training: ``-score`` summed over a
batch equals the training loss sum (without z-loss) of that batch. Ranking candidate targets by
score is rank classification.

Letter legend: B batch, S encoder length, T decoder length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax.infer import batching
from mtjax.model.softmax import first_argmax
from mtjax.parallel import mesh as mesh_lib

# Batch keys the model reads; segment ids and positions only for packed batches.
_MODEL_INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
                 "decoder_segment_ids")


def token_log_likelihoods(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """float32 [B, T]: log-probability of each target token (``-cross-entropy``)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logit_BT - log_z_BT


def _scored(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [B, T, V], token log-likelihoods [B, T], float32 weights [B, T]) of a batch."""
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    logits_BTV = model(**inputs, deterministic=True)
    targets_BT = batch["decoder_target_tokens"]
    weights_BT = batch.get("decoder_loss_weights")
    weights_BT = (targets_BT > 0) if weights_BT is None else weights_BT
    return logits_BTV, token_log_likelihoods(logits_BTV, targets_BT), weights_BT.astype(
        jnp.float32)


def score_batch(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-row target log-likelihood and token count; traceable.

    Args:
        model: a ``T5``.
        batch: ``encoder_input_tokens``, ``decoder_input_tokens``, ``decoder_target_tokens``
            (EOS included) and optionally ``decoder_loss_weights`` (default: targets > 0) and
            segment ids.

    Returns:
        (float32 scores [B], int32 numbers of scored tokens [B]).
    """
    _, log_likelihood_BT, weights_BT = _scored(model, batch)
    scores_B = jnp.sum(log_likelihood_BT * weights_BT, axis=-1)
    return scores_B, jnp.sum(weights_BT, axis=-1).astype(jnp.int32)


def score_totals(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole batch's target log-likelihood, scored tokens, and scored tokens the model
    predicts (its argmax, teacher-forced); traceable, float32 scalars."""
    logits_BTV, log_likelihood_BT, weights_BT = _scored(model, batch)
    correct_BT = first_argmax(logits_BTV) == batch["decoder_target_tokens"]
    return (jnp.sum(log_likelihood_BT * weights_BT), jnp.sum(weights_BT),
            jnp.sum(correct_BT * weights_BT))


class Scorer:
    """Scoring of one model on a mesh, compiled once per batch shape.

    Args:
        model_def: anything with ``merge(params) -> T5``.
        mesh: the mesh the parameters live on.
        rules: the logical axis rules the model was built with.
    """

    def __init__(self, model_def: Any, mesh: Mesh, rules: mesh_lib.AxisRules):
        self.model_def = model_def
        self.mesh = mesh
        self.rules = rules
        self._batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        self.batch_multiple = batching.batch_shards(mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._fn: Callable = jax.jit(
            lambda params, batch: score_batch(self.model_def.merge(params), batch),
            out_shardings=replicated)
        self._totals_fn: Callable = jax.jit(
            lambda params, batch: score_totals(self.model_def.merge(params), batch),
            out_shardings=replicated)

    def _run(self, fn: Callable, params: Any, batch: Mapping[str, np.ndarray],
             batch_size: int | None) -> Any:
        """``fn`` on a host batch (the same on every host) padded with zero rows to the mesh."""
        rows = batching.padded_size(len(batch["decoder_target_tokens"]), self.batch_multiple,
                                    batch_size)
        device_batch = {k: batching.to_global(batching.pad_rows(np.asarray(v), rows),
                                              self._batch_sharding)
                        for k, v in batch.items()}
        with mesh_lib.activate(self.mesh, self.rules):
            return jax.device_get(fn(params, device_batch))

    def __call__(self, params: Any, batch: Mapping[str, np.ndarray], *,
                 batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Score a host batch (the same on every host); zero rows pad it to the mesh.

        Returns:
            (float32 scores [B], int32 token counts [B]) as numpy arrays.
        """
        n = len(batch["decoder_target_tokens"])
        scores_B, counts_B = self._run(self._fn, params, batch, batch_size)
        return np.asarray(scores_B)[:n], np.asarray(counts_B)[:n]

    def totals(self, params: Any, batch: Mapping[str, np.ndarray], *,
               batch_size: int | None = None) -> tuple[float, float, float]:
        """(log-likelihood, scored tokens, tokens predicted right) summed over a host batch
        (:func:`score_totals`; the zero rows that pad it weigh nothing)."""
        return tuple(float(x) for x in self._run(self._totals_fn, params, batch, batch_size))
