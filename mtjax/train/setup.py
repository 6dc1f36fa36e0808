"""Everything the trainer, the dry run and the benchmark build before the first step: the mesh,
the rules, the model's shapes, the state's shardings and the jitted step. One place, so that what
``mtjax bench train`` and ``mtjax train --dry-run`` compile is what ``mtjax train`` runs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax import config as config_lib
from mtjax import kernels
from mtjax.model import attention as attention_lib
from mtjax.model import layers, sizes
from mtjax.parallel import distributed
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import optim
from mtjax.train import state as state_lib
from mtjax.train.step import make_train_step, resolve_cross_entropy


def mesh_and_rules(config: config_lib.Config,
                   devices: list[jax.Device] | None = None) -> tuple[Mesh, mesh_lib.AxisRules]:
    """The configured mesh and rules, checked against the batch before anything compiles."""
    m = config.mesh
    mesh = mesh_lib.make_mesh(
        mesh_lib.MeshShape(m.data, m.fsdp, m.tensor, m.dcn_data, m.dcn_fsdp, m.dcn_tensor),
        devices=devices)
    rules = mesh_lib.get_rules(config.mesh.rules)
    check_axes_used(config, mesh, rules)
    check_batch_divides(config, mesh, rules)
    return mesh, rules


def check_axes_used(config: config_lib.Config, mesh: Mesh, rules: mesh_lib.AxisRules) -> None:
    """Every mesh axis of several devices must split something: along one that no rule names,
    each device repeats the others' work (mesh.tensor=2 with the fsdp preset: twice the FLOPs
    per device, silently)."""
    named = {axis for _, target in rules for axis in layers.mesh_axes(target)}
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in named:
            raise config_lib.ConfigError(
                f"mesh: the {axis} axis has {size} devices, but mesh.rules={config.mesh.rules} "
                f"splits nothing over it, so each would repeat the others' work; set "
                f"mesh.{axis}=1 (mesh.fsdp=-1 takes the devices), or use rules that map a "
                f"logical axis to {axis} (mesh.rules=fsdp_tensor uses all three axes)")


def check_batch_divides(config: config_lib.Config, mesh: Mesh, rules: mesh_lib.AxisRules) -> None:
    """The global batch (per microbatch) must split evenly over the mesh axes of ``batch``."""
    batch_axes = layers.mesh_axes(dict(rules).get("batch"))
    shards = 1
    for axis in batch_axes:
        shards *= mesh.shape[axis]
    needed = shards * config.train.microbatches
    if config.train.batch_size % needed:
        names = "*".join(f"mesh.{a}" for a in batch_axes) or "1"
        raise config_lib.ConfigError(
            f"train.batch_size={config.train.batch_size} must be divisible by {names}"
            f"*train.microbatches = {needed} (mesh {dict(mesh.shape)}); change the batch or "
            f"the mesh")
    if config.train.batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"train.batch_size={config.train.batch_size} must be divisible by the number of "
            f"processes ({jax.process_count()})")


def check_params_divide(abstract_params: Any, shardings: Any, model_name: str) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes (else XLA fails
    deep inside compilation)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        for dim, entry in zip(leaf.shape, sharding.spec, strict=False):
            axes = layers.mesh_axes(entry)
            parts = 1
            for axis in axes:
                parts *= sharding.mesh.shape[axis]
            if dim % parts:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                raise mesh_lib.MeshError(
                    f"mesh: {model_name}'s {name} has shape {tuple(leaf.shape)}; its dimension "
                    f"{dim} cannot be split over {'*'.join(f'mesh.{a}' for a in axes)} = {parts}; "
                    f"use a smaller mesh.{axes[-1]} or other mesh.rules")


def model_config(config: config_lib.Config, vocab_size: int) -> sizes.T5Config:
    """The named model size with the run's vocabulary, dtype, dropout, remat, scan and attention
    settings."""
    try:
        base = sizes.get_config(config.model.name)
    except KeyError as e:
        raise config_lib.ConfigError(str(e.args[0]) if e.args else str(e)) from None
    return dataclasses.replace(base, vocab_size=vocab_size, dtype=config.model.dtype,
                               dropout_rate=config.model.dropout_rate, remat=config.model.remat,
                               scan_layers=config.model.scan_layers,
                               attention=config.model.attention,
                               weight_grad=config.model.weight_grad)


@dataclasses.dataclass
class TrainSetup:
    mesh: Mesh
    rules: mesh_lib.AxisRules
    model_cfg: sizes.T5Config
    model_def: state_lib.ModelDef
    tx: optax.GradientTransformation
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs
    shardings: state_lib.TrainState  # NamedShardings
    batch_sharding: NamedSharding
    step: Any  # jax.jit(step_fn) with in/out shardings and donation
    attention_kernel: str  # what model.attention resolved to on this mesh ("cpu_fused", ...)
    cross_entropy_kernel: str  # what train.cross_entropy resolved to on this mesh

    def target(self) -> state_lib.TrainState:
        """Abstract state carrying its shardings: what Orbax restores onto."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.shardings)

    def init_state(self, seed: int) -> state_lib.TrainState:
        return state_lib.init_train_state(self.model_def, self.tx, self.shardings, self.mesh,
                                          self.rules, seed)

    def abstract_batch(self, batch_size: int, inputs_length: int,
                       targets_length: int) -> dict[str, jax.ShapeDtypeStruct]:
        from mtjax.train.step import BATCH_KEYS

        def spec(key: str) -> jax.ShapeDtypeStruct:
            length = inputs_length if key.startswith("encoder") else targets_length
            return jax.ShapeDtypeStruct((batch_size, length), jax.numpy.int32,
                                        sharding=self.batch_sharding)

        return {k: spec(k) for k in BATCH_KEYS}


@functools.cache
def _say_why_no_cpu_kernels(parts: str = "attention and loss") -> None:
    """On CPU, a step without mtjax's CPU kernels is slower (README, "mtjax's CPU kernels"):
    say why once, unless they were switched off on purpose."""
    if jax.default_backend() != "cpu":
        return
    ready, why_not = kernels.cpu_kernel_status()
    if not ready and "switched off by MTJAX_CPU_KERNELS" not in why_not:
        distributed.log(f"mtjax: the step runs XLA's {parts}: mtjax's faster CPU kernels "
                        f"are unavailable here ({why_not})")


def _traced_under(step_fn: Callable, mesh: Mesh, rules: mesh_lib.AxisRules) -> Callable:
    """``step_fn`` traced with ``mesh`` and ``rules`` in force whatever the caller's context:
    the model's sharding constraints and the CPU kernels' per-device split read them while
    tracing, and without them the step would compile to a different program."""

    # jax 0.11 also exports it at the top level; jax.sharding's name is the one 0.10 has.
    use_abstract_mesh = getattr(jax, "use_abstract_mesh", None) or jax.sharding.use_abstract_mesh

    def step(state, batch):
        with use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
            return step_fn(state, batch)

    return step


def build(config: config_lib.Config, *, vocab_size: int, num_tasks: int,
          total_steps: int | None = None, mesh: Mesh | None = None,
          rules: mesh_lib.AxisRules | None = None) -> TrainSetup:
    """Shapes, shardings and the jitted train step for ``config``; allocates nothing."""
    # The attention and loss implementations, resolved now rather than while the step traces:
    # an impossible explicit choice stops here, and mtjax's CPU kernels, where the step will
    # run them, are built before any progress bar starts (seconds, once per machine).
    if mesh is None or rules is None:
        mesh, rules = mesh_and_rules(config)
    try:  # under the mesh: whether the loss kernel fits depends on how it splits the vocabulary
        with mesh_lib.activate(mesh, rules):
            attention_kernel = attention_lib.resolve_attention(
                config.model.attention, jax.numpy.dtype(config.model.dtype))
            cross_entropy_kernel = resolve_cross_entropy(config.train.cross_entropy,
                                                         config.train.label_smoothing)
    except ValueError as e:  # the message names the key, why, and what to use instead
        raise config_lib.ConfigError(str(e)) from None
    if config.model.dropout_rate > 0 and attention_kernel in ("cpu_fused", "dot_product"):
        # Neither fused kernel applies dropout to the attention probabilities: training steps
        # take the XLA path (evaluation, without dropout, still uses the kernel).
        if config.model.attention != "auto":
            raise config_lib.ConfigError(
                f"model.attention={config.model.attention} cannot train with "
                f"model.dropout_rate={config.model.dropout_rate}: the kernel has no dropout on "
                f"the attention probabilities; use model.attention=auto or xla")
        attention_kernel = "xla"
    automatic = [part for part, key in (("attention", config.model.attention),
                                        ("loss", config.train.cross_entropy)) if key == "auto"]
    if automatic:
        _say_why_no_cpu_kernels(" and ".join(automatic))
    model_cfg = model_config(config, vocab_size)
    tx, schedule = optim.make_optimizer(config.optim, total_steps or config.train.steps,
                                        per_layer_kind=config.model.scan_layers)
    model_def, abstract_state, shardings = state_lib.state_shardings(
        model_cfg, tx, mesh, rules, config.train.seed)
    check_params_divide(abstract_state.params, shardings.params, config.model.name)
    step_fn = make_train_step(
        model_def, tx, schedule, num_tasks=num_tasks, z_loss=config.train.z_loss,
        microbatches=config.train.microbatches, dropout=config.model.dropout_rate > 0,
        seed=config.train.seed, skip_nonfinite=config.train.on_nonfinite == "skip",
        cross_entropy=cross_entropy_kernel, label_smoothing=config.train.label_smoothing,
        loss_normalizing_factor=config.train.loss_normalizing_factor,
        loss_normalization=config.train.loss_normalization)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    # in: the state where its shardings say (params by their logical rules, optimizer state
    # mirroring them), the batch split over the mesh axes of `batch`; out: the same state
    # shardings (so donation reuses the buffers), metrics replicated (scalars, per-task vectors).
    jitted = jax.jit(_traced_under(step_fn, mesh, rules),
                     in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    return TrainSetup(mesh=mesh, rules=rules, model_cfg=model_cfg, model_def=model_def, tx=tx,
                      abstract_state=abstract_state, shardings=shardings,
                      batch_sharding=batch_sharding, step=jitted,
                      attention_kernel=attention_kernel,
                      cross_entropy_kernel=cross_entropy_kernel)
