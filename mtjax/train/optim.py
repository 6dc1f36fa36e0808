"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mtjax.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """T5's inverse-square-root schedule for Adafactor; warmup + cosine for AdamW.

    rsqrt: ``lr(step) = learning_rate * min(1, sqrt(warmup_steps / step))`` — T5's
    ``1/sqrt(max(step, 10k))`` with the plateau value given as ``learning_rate``.
    """
    warmup = max(cfg.warmup_steps, 1)
    if cfg.name == "adafactor":
        def rsqrt(step):
            step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
            return cfg.learning_rate * jnp.minimum(1.0, jnp.sqrt(warmup / step))
        return rsqrt
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=min(warmup, total_steps),
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * 0.1,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    """The optax transformation named by ``optim.name`` and its schedule."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adafactor":
        # T5 settings: factored second moments, no momentum, update clipping at 1.0,
        # parameter-scale-relative updates.
        tx = optax.adafactor(
            learning_rate=schedule, decay_rate=0.8, clipping_threshold=1.0,
            multiply_by_parameter_scale=True,
            weight_decay_rate=cfg.weight_decay or None,
        )
    else:
        tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx, schedule
