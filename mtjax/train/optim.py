"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtjax.config import OptimConfig
from mtjax.train import layerwise


def schedule_name(cfg: OptimConfig) -> str:
    """``optim.schedule`` with "auto" resolved: rsqrt for Adafactor (T5), cosine for AdamW."""
    return resolve_schedule(cfg.schedule, cfg.name)


def resolve_schedule(schedule: str | None, optimizer: str | None) -> str | None:
    """:func:`schedule_name` of the two settings (a recorded config's, say)."""
    if schedule != "auto":
        return schedule
    return "rsqrt" if optimizer == "adafactor" else "cosine"


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each step, by ``optim.schedule``.

    - rsqrt: ``learning_rate * min(1, sqrt(warmup_steps / step))``: T5's ``1/sqrt(max(step,
      10k))`` with the plateau value given as ``learning_rate`` (the "warmup" is the plateau).
    - constant: ``learning_rate`` (T5's fine-tuning: Adafactor at 1e-3), after a linear warmup
      from 0 over ``warmup_steps`` (none at 0).
    - linear: linear warmup, then linear decay to 0 at ``total_steps``.
    - cosine: linear warmup, then cosine decay to a tenth of ``learning_rate`` at ``total_steps``.
    """
    name, peak = schedule_name(cfg), cfg.learning_rate
    if name == "rsqrt":
        warmup = max(cfg.warmup_steps, 1)

        def rsqrt(step):
            step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
            return peak * jnp.minimum(1.0, jnp.sqrt(warmup / step))
        return rsqrt
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)  # optax needs one; a run all warmup never decays
    if name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1)
    elif name == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int, *, per_layer_kind: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation named by ``optim.name`` and its schedule.

    ``per_layer_kind`` (on with ``model.scan_layers``) traces the per-parameter update once per
    kind of layer (``mtjax.train.layerwise``): same state and numbers, far less to compile.
    """
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
    if per_layer_kind:
        tx = layerwise.layerwise(tx)  # before the clipping, which needs every gradient at once
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.state_dtype != "float32":
        tx = with_state_dtype(tx, jnp.dtype(cfg.state_dtype))
    return tx, schedule


def global_norm(tree) -> jax.Array:
    """The L2 norm of all of ``tree``'s leaves together (``optax.tree.norm``), in float32.

    Each leaf's sum of squares is written as one dot contracting all its axes, with float32
    accumulation also for bfloat16 leaves. XLA rewrites that dot as a square and a reduce over
    the flattened leaf, which XLA:CPU runs faster than the reduce over the leaf's own axes that
    ``optax.tree.norm`` gives it: 19 against 29 ms over the 283 MB of the peer model's
    parameters on the Zen 5 machine. On a sharded leaf the partitioner adds up the partial
    sums, as for the reduce.
    """
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        axes = tuple(range(leaf.ndim))
        total += jax.lax.dot_general(leaf, leaf, ((axes, axes), ((), ())),
                                     preferred_element_type=jnp.float32)
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` with the norm from :func:`global_norm`, so that the train
    step's ``grad_norm`` metric is the same computation (XLA computes it once)."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        updates = jax.tree.map(
            lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm), updates)
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update)


# optax's names for running means of the gradient (AdamW's mu, a momentum's ema or trace).
FIRST_MOMENTS = ("mu", "ema", "trace")


def with_state_dtype(tx: optax.GradientTransformation,
                     dtype: jnp.dtype) -> optax.GradientTransformation:
    """``tx`` with its first-moment state (``FIRST_MOMENTS``) stored in ``dtype`` (bfloat16).

    The update is computed in float32 from the upcast state and the new state is rounded back,
    so only storage (and checkpoint size) shrinks. Second moments stay float32, as optax's
    ``mu_dtype`` and T5X's momentum dtype keep them: rounded to nearest after every step, a
    bfloat16 second moment cannot fall by less than half its last bit (0.2-0.4%), where
    b2 = 0.999 moves it by 0.1% of the gap: it rises but never decays, and after a 4x drop in
    gradient scale AdamW's updates were half of float32's (Adafactor's a third). A first
    moment moves by 10% of the gap (b1 = 0.9) and tracks its float32 twin.
    """
    def is_first_moment(path, x) -> bool:
        return (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
                and any(getattr(key, "name", None) in FIRST_MOMENTS for key in path))

    def cast(tree, to):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.astype(to) if is_first_moment(path, x) else x, tree)

    def init(params):
        return cast(tx.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)
