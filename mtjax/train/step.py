"""The pure training step: loss, gradients (with microbatch accumulation), update, metrics.

``make_train_step`` returns a function ``step(state, batch) -> (state, metrics)`` that the
trainer compiles once with ``jax.jit`` and explicit shardings. Metrics are sums and counts (not
ratios) so that hosts, microbatches and logging windows combine them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtjax.config import smoothing_without_kernel
from mtjax.model.softmax import first_argmax
from mtjax.train import optim
from mtjax.train.state import ModelDef, TrainState

Batch = dict[str, jax.Array]

# The step's input contract: int32 [B, L] arrays named as SeqIO's EncDecFeatureConverter
# names them (packed), plus per-token task ids for per-task metrics.
BATCH_KEYS = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_target_tokens",
    "decoder_input_tokens", "decoder_loss_weights", "decoder_segment_ids", "decoder_positions",
    "decoder_task_ids",
)

MODEL_INPUTS = (
    "encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids", "decoder_segment_ids",
    "encoder_positions", "decoder_positions",
)


def cross_entropy_with_z_loss(logits_BLV: jax.Array, targets_BL: jax.Array, z_loss: float,
                              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy plus T5X's z-loss ``z_loss * log(Z)**2``, in float32.

    ``label_smoothing`` > 0: the cross-entropy against T5X's smoothed targets instead
    (:func:`smoothed_cross_entropy`); 0 computes exactly what it did before the option existed.

    Returns:
      (total per-token loss [B, L], z-loss part [B, L]).
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # A masked sum rather than take_along_axis: its gradient is elementwise and fuses with the
    # softmax's, where take_along_axis's is a scatter into a [B, L, V] zero array.
    vocab_V = jnp.arange(logits_BLV.shape[-1], dtype=targets_BL.dtype)
    is_target_BLV = targets_BL[..., None] == vocab_V[None, None]
    target_logit_BL = jnp.sum(jnp.where(is_target_BLV, logits_BLV, 0.0), axis=-1)
    z_BL = z_loss * jnp.square(log_z_BL)
    if label_smoothing:
        ce_BL = smoothed_cross_entropy(logits_BLV, log_z_BL, target_logit_BL, label_smoothing)
        return ce_BL + z_BL, z_BL
    return log_z_BL - target_logit_BL + z_BL, z_BL


def smoothed_cross_entropy(logits_BLV: jax.Array, log_z_BL: jax.Array,
                           target_logit_BL: jax.Array, label_smoothing: float) -> jax.Array:
    """T5X's label-smoothed cross-entropy (``compute_weighted_cross_entropy``): against soft
    targets of ``1 - ls`` on the target and ``ls / (V - 1)`` elsewhere, minus those targets'
    own entropy, so that a model predicting them exactly scores 0.

    The soft targets sum to 1, so ``-sum(soft * (logits - log_z))`` is
    ``log_z - (confidence - low) * target_logit - low * sum(logits)``: no [B, L, V] soft-target
    array, and the gradient is ``softmax - soft`` all the same."""
    vocab_size = logits_BLV.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)
    # T5X's constant, 1e-20 included (it keeps log finite at ls = 0 there); Python floats: it
    # is known when the step traces.
    entropy = -(confidence * math.log(confidence)
                + (vocab_size - 1) * low * math.log(low + 1e-20))
    logit_sum_BL = jnp.sum(logits_BLV, axis=-1)
    return log_z_BL - (confidence - low) * target_logit_BL - low * logit_sum_BL - entropy


def model_logits(model_def: ModelDef, params: dict[str, Any], batch: Batch,
                 dropout_key: jax.Array | None) -> jax.Array:
    """The model's float32 logits for ``batch`` (dropout on when a key is given)."""
    model = model_def.merge(params)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if dropout_key is None:
        return model(**inputs, deterministic=True)
    return model(**inputs, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))


def resolve_cross_entropy(kind: str, label_smoothing: float = 0.0) -> str:
    """The loss implementation ``kind`` (``train.cross_entropy``) stands for: ``"auto"`` is
    mtjax's fused CPU kernel (``"cpu_fused"``, ``mtjax.kernels``) on CPU where it builds, with
    one device per process, and, on a mesh of several devices (the one in force), where the
    rules keep the vocabulary whole, and without label smoothing (the kernel has none); else
    ``"xla"`` (the functions above).

    Several devices in one process share its cores: there the loss kernel gained nothing and
    made steps uneven (2 devices on 2 cores, peer shape: 2.22-2.70 s median with both kernels,
    2.18-2.26 s with the attention kernel alone), so ``auto`` leaves it to ``cpu_fused``.

    Raises:
        ValueError: ``"cpu_fused"`` asked for where it cannot run, or with label smoothing
            (the message says why).
    """
    if kind == "xla":
        return kind
    if label_smoothing:
        if kind == "cpu_fused":
            raise ValueError(smoothing_without_kernel(label_smoothing))
        return "xla"
    from mtjax import kernels
    from mtjax.kernels import cross_entropy as fused

    problem = kernels.cpu_kernel_problem() or fused.mesh_problem()
    if kind == "cpu_fused" and problem:
        raise ValueError(f"train.cross_entropy=cpu_fused cannot run: {problem}; "
                         "use train.cross_entropy=auto or xla")
    if problem or (kind == "auto" and fused.devices_share_a_process()):
        return "xla"
    return "cpu_fused"


def batch_metrics(logits_BLV: jax.Array, batch: Batch, num_tasks: int, z_loss: float,
                  cross_entropy: str = "xla", label_smoothing: float = 0.0,
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted loss sum to differentiate (the step scales it by
    ``inverse_loss_denominator``) and the metric sums of one (micro)batch; ``cross_entropy`` as
    in ``resolve_cross_entropy`` (same numbers either way, tested). With ``label_smoothing``
    the loss sums are of the smoothed loss (as T5X logs it); accuracy is unaffected.

    The loss to differentiate weighs tokens by ``batch["gradient_weights"]`` where the batch
    has them (``train.loss_normalization=per_sequence``), else by its loss weights; the
    metric sums always use the loss weights, so logged losses stay per-token means."""
    targets_BL = batch["decoder_target_tokens"]
    weights_BL = batch["decoder_loss_weights"].astype(jnp.float32)
    if resolve_cross_entropy(cross_entropy, label_smoothing) == "cpu_fused":
        from mtjax.kernels import cross_entropy as fused

        loss_BL, z_BL, correct_BL = fused.cross_entropy_with_z_loss(logits_BLV, targets_BL,
                                                                     z_loss)
    else:
        loss_BL, z_BL = cross_entropy_with_z_loss(logits_BLV, targets_BL, z_loss,
                                                  label_smoothing)
        correct_BL = (first_argmax(logits_BLV) == targets_BL).astype(jnp.float32)
    # One-hot over tasks: [B, L, T]; task id 0 is padding, task i is id i + 1.
    task_BLT = (batch["decoder_task_ids"][..., None]
                == jnp.arange(1, num_tasks + 1)[None, None, :]
                ).astype(jnp.float32) * weights_BL[..., None]
    sums = {
        "loss_sum": jnp.sum(loss_BL * weights_BL),
        "z_loss_sum": jnp.sum(z_BL * weights_BL),
        "correct_sum": jnp.sum(correct_BL * weights_BL),
        "weight_sum": jnp.sum(weights_BL),
        "task_loss_sum": jnp.einsum("bl,blt->t", loss_BL, task_BLT),
        "task_correct_sum": jnp.einsum("bl,blt->t", correct_BL, task_BLT),
        "task_weight_sum": jnp.sum(task_BLT, axis=(0, 1)),
    }
    gradient_weights_BL = batch.get("gradient_weights")
    if gradient_weights_BL is None:
        return sums["loss_sum"], sums
    return jnp.sum(loss_BL * gradient_weights_BL), sums


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [microbatches, B / microbatches, ...], microbatch i holding rows i, i + n,
    i + 2n, ... (n = microbatches). The batch is split over devices in contiguous blocks of
    rows; strided microbatches take the same number of rows from every block, so each device
    computes on rows it holds. Contiguous microbatches (rows 0..B/n-1 first) lived on a part
    of the devices, and XLA moved rows between devices for every microbatch (22 collective
    permutes in a data=8 step, and a whole replicated tensor on fsdp=4, tensor=2)."""
    rows = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
    return jnp.swapaxes(rows, 0, 1)


LOSS_NORMALIZATIONS = ("tokens", "total_tokens", "per_sequence")


def per_sequence_weights(weights_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """Each token's loss weight over the total weight of its sequence (its packed segment), 0
    for a sequence without weight: every sequence's weights then sum to 1, so a sequence
    counts once whatever its length (T5X's AVERAGE_PER_SEQUENCE).

    A row's sequences lie one after another, 0 on padding (``data.pipeline``); they are
    numbered 1, 2, ... again in that order, so a row's totals are one segment sum of length
    L + 1, and rows stay on the devices that hold them. (The packer's decoder ids can pass the
    row's length: an example without target tokens, from a task without EOS on its targets,
    keeps its number. Out of range, a sequence's tokens got weight 0.)"""
    weights_BL = weights_BL.astype(jnp.float32)
    num_segments = segment_ids_BL.shape[-1] + 1

    def row_totals(weights_L, segment_ids_L):
        starts_L = jnp.concatenate([segment_ids_L[:1] != 0,
                                    segment_ids_L[1:] != segment_ids_L[:-1]])
        dense_L = jnp.where(segment_ids_L != 0, jnp.cumsum(starts_L), 0)
        totals_S = jax.ops.segment_sum(weights_L, dense_L, num_segments=num_segments)
        return totals_S[dense_L]

    totals_BL = jax.vmap(row_totals)(weights_BL, segment_ids_BL)
    return jnp.where(totals_BL > 0, weights_BL / jnp.where(totals_BL > 0, totals_BL, 1.0), 0.0)


def inverse_loss_denominator(batch: Batch, loss_normalizing_factor: float,
                             loss_normalization: str = "tokens") -> jax.Array:
    """1 / what the step divides the loss sum by: ``loss_normalizing_factor`` where positive
    (T5X's constant; its fine-tuning configs take 233472 = 2048 × 114 to match Mesh TensorFlow
    T5), else by ``loss_normalization``:

    - ``"tokens"``: the whole batch's loss-weighted target tokens (T5X's
      NUM_REAL_TARGET_TOKENS; T5X's own default, no factor, is the sum: a constant of 1);
    - ``"total_tokens"``: batch size × targets length, padding included (NUM_TOTAL_TARGET_TOKENS);
    - ``"per_sequence"``: the number of sequences with loss weight, the batch's
      ``gradient_weights`` (:func:`per_sequence_weights`) summed (AVERAGE_PER_SEQUENCE).

    Each is known before the forward pass, so the backward pass starts from it and yields the
    scaled gradients directly, in the arrays it writes anyway (dividing summed gradients
    afterwards was one more pass over every gradient), and every microbatch scales by the
    same number."""
    if loss_normalizing_factor:
        return jnp.asarray(1.0 / loss_normalizing_factor, jnp.float32)
    if loss_normalization == "total_tokens":
        return jnp.asarray(1.0 / math.prod(batch["decoder_target_tokens"].shape), jnp.float32)
    weights = (batch["gradient_weights"] if loss_normalization == "per_sequence"
               else batch["decoder_loss_weights"])
    return 1.0 / jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_tasks: int, z_loss: float,
                    microbatches: int = 1, dropout: bool = False, seed: int = 0,
                    skip_nonfinite: bool = False, cross_entropy: str = "xla",
                    label_smoothing: float = 0.0, loss_normalizing_factor: float = 0.0,
                    loss_normalization: str = "tokens",
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The pure step function; compile it with ``jax.jit`` (see ``Trainer``).
    ``cross_entropy``: the loss's implementation (``resolve_cross_entropy``);
    ``label_smoothing``: T5X's (``smoothed_cross_entropy``); ``loss_normalizing_factor``:
    a positive number differentiates the loss sum over that constant (T5X's), 0 over what
    ``loss_normalization`` names (``inverse_loss_denominator``); the metrics are sums either
    way."""
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization {loss_normalization!r} is not one of "
                         f"{LOSS_NORMALIZATIONS}")
    base_key = jax.random.key(seed)

    def grads_and_sums(params, batch, key, inv_denom):
        def loss_fn(p):
            logits = model_logits(model_def, p, batch, key)
            loss_sum, sums = batch_metrics(logits, batch, num_tasks, z_loss, cross_entropy,
                                           label_smoothing)
            return loss_sum * inv_denom, sums
        return jax.grad(loss_fn, has_aux=True)(params)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(base_key, state.step) if dropout else None
        if loss_normalization == "per_sequence" and not loss_normalizing_factor:
            # Over the whole batch before it is split: the denominator counts all its sequences.
            batch = dict(batch, gradient_weights=per_sequence_weights(
                batch["decoder_loss_weights"], batch["decoder_segment_ids"]))
        inv_denom = inverse_loss_denominator(batch, loss_normalizing_factor, loss_normalization)
        if microbatches == 1:
            grads, sums = grads_and_sums(state.params, batch, key, inv_denom)
        else:
            # Split the batch into microbatches and add up their gradients (each already over
            # the whole batch's count, or the constant) in a scan:
            # memory of one microbatch, same result as the full batch.
            micro = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)

            def body(carry, xs):
                i, mb = xs
                k = None if key is None else jax.random.fold_in(key, i)
                g, s = grads_and_sums(state.params, mb, k, inv_denom)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.eval_shape(grads_and_sums, state.params,
                                   jax.tree.map(lambda x: x[0], micro), key, inv_denom)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), micro))

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm, param_norm = optim.global_norm(grads), optim.global_norm(new_params)
        # A finite loss can still give infinite gradients, or an update that overflows the
        # weights (a learning rate far too large): none of them may reach a checkpoint.
        finite = (jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(param_norm))
        if skip_nonfinite:
            # Weights and statistics keep their old values; the optimizer's step counts (its
            # integer leaves) advance with state.step, so the update after a skip uses
            # schedule(state.step), the learning rate logged for it.
            new_params, new_opt_state = jax.tree.map(
                lambda new, old: (jnp.where(finite, new, old)
                                  if jnp.issubdtype(new.dtype, jnp.inexact) else new),
                (new_params, new_opt_state), (state.params, state.opt_state))
            param_norm = optim.global_norm(new_params)  # of the weights kept
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state)
        metrics = dict(sums)
        metrics["grad_norm"] = grad_norm
        metrics["param_norm"] = param_norm
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics["finite"] = finite
        # The whole (global) batch's non-padding encoder + decoder tokens, for tokens/s: every
        # host then logs the job's exact count instead of its own times the hosts.
        metrics["tokens"] = (jnp.count_nonzero(batch["encoder_input_tokens"])
                             + jnp.count_nonzero(batch["decoder_target_tokens"]))
        return new_state, metrics

    return step
