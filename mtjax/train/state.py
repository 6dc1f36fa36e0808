"""The train state and its creation directly sharded on the mesh.

Order (DESIGN.md): abstract init with ``nnx.eval_shape`` → logical names → mesh shardings →
``jax.jit(init, out_shardings=...)``. No full replica of the parameters ever exists on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax.model import layers, t5
from mtjax.model.sizes import T5Config
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import layerwise


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree of arrays (checkpointed as is)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: dict[str, Any]  # pure nested dict of float32 arrays (nnx.to_pure_dict of nnx.Param)
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of the model: what ``nnx.merge`` needs besides the parameters."""

    graphdef: Any
    rest: Any  # non-parameter state (RNG streams); small, replicated, never trained
    config: T5Config

    def merge(self, params: dict[str, Any]) -> t5.T5:
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)


def abstract_model(config: T5Config, mesh: Mesh, rules: mesh_lib.AxisRules, seed: int = 0):
    """The model's shapes and logical names, without allocating anything."""
    try:
        with mesh_lib.activate(mesh, rules):
            return nnx.eval_shape(lambda: t5.T5(config, rngs=nnx.Rngs(seed)))
    except Exception:  # noqa: BLE001 - JAX's own error for it is private and 90 lines deep
        try:
            _check_no_axis_twice(config, mesh, rules)
        except mesh_lib.MeshError:
            raise
        except Exception:  # noqa: BLE001, S110 - the first failure again: it is the one to show
            pass
        raise


def _check_no_axis_twice(config: T5Config, mesh: Mesh, rules: mesh_lib.AxisRules) -> None:
    """A mesh axis can split one dimension of a parameter only: name the first parameter whose
    logical axes ``rules`` map to one mesh axis twice."""
    replicated = tuple((logical, None) for logical, _ in rules)
    with mesh_lib.activate(mesh, replicated):
        model = nnx.eval_shape(lambda: t5.T5(config, rngs=nnx.Rngs(0)))
    table = dict(rules)
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = tuple(getattr(param, "out_sharding", None) or ())
        seen: dict[str, str] = {}
        for logical in names:
            for axis in layers.mesh_axes(table.get(logical)):
                if axis in seen:
                    name = ".".join(str(part) for part in path)
                    raise mesh_lib.MeshError(
                        f"mesh.rules: {name} has logical axes {names}, and both {seen[axis]} and "
                        f"{logical} map to mesh axis {axis!r}; a mesh axis splits one dimension "
                        f"of a parameter: map {logical} (or {seen[axis]}) elsewhere, e.g. "
                        f"{logical}=none")
                seen[axis] = logical


def abstract_params(config: T5Config, mesh: Mesh, rules: mesh_lib.AxisRules) -> dict[str, Any]:
    """The parameters as a pure dict of ShapeDtypeStructs."""
    return nnx.to_pure_dict(nnx.state(abstract_model(config, mesh, rules), nnx.Param))


def param_shardings(abstract: t5.T5, mesh: Mesh, rules: mesh_lib.AxisRules) -> dict[str, Any]:
    """NamedShardings for the parameters, from their logical axis names and ``rules``."""
    with mesh_lib.activate(mesh, rules):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


# optax's Adafactor (``scale_by_factored_rms``) factors a parameter's two largest axes, in
# ``np.argsort``'s order, and keeps each statistic without one of them: ``v_row`` without the
# largest, ``v_col`` without the other.
_FACTORED_STATISTICS = {"v_row": -1, "v_col": -2}


def _factored_axis(field: str | None, param_shape: tuple[int, ...]) -> int | None:
    """The parameter axis that optax's factored statistic ``field`` averages out (None: not one)."""
    if field not in _FACTORED_STATISTICS or len(param_shape) < 2:
        return None
    return int(np.argsort(param_shape)[_FACTORED_STATISTICS[field]])


def _opt_leaf_spec(leaf_shape: tuple[int, ...], param_shape: tuple[int, ...],
                   param_spec: PartitionSpec, dropped: int | None = None) -> PartitionSpec:
    """Sharding of one optimizer-state leaf that mirrors one parameter.

    Adam moments have the parameter's shape; Adafactor's factored rows/columns drop one axis:
    ``dropped`` where known (:func:`_factored_axis`), since the shape alone cannot tell which of
    two equal axes (a square kernel's) went; else the first axis whose removal fits.
    """
    spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if tuple(leaf_shape) == tuple(param_shape):
        return PartitionSpec(*spec)
    for axis in ([] if dropped is None else [dropped]) + list(range(len(param_shape))):
        if tuple(leaf_shape) == param_shape[:axis] + param_shape[axis + 1:]:
            return PartitionSpec(*(spec[:axis] + spec[axis + 1:]))
    return PartitionSpec()


def opt_state_shardings(abstract_opt_state, abstract_params, p_shardings, mesh: Mesh):
    """Shard every optimizer-state subtree that mirrors the parameter tree like the parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())
    mirrors_params = layerwise.mirror_of(abstract_params)

    def shard(path, node):
        if mirrors_params(node):
            field = getattr(path[-1], "name", None) if path else None  # v_row of FactoredState
            return jax.tree.map(
                lambda leaf, p, s: NamedSharding(mesh, _opt_leaf_spec(
                    leaf.shape, p.shape, s.spec, _factored_axis(field, p.shape))),
                node, abstract_params, p_shardings)
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree_util.tree_map_with_path(shard, abstract_opt_state, is_leaf=mirrors_params)


def _model_rest(config: T5Config, seed: int) -> Any:
    """The non-parameter state (RNG streams) of a fresh model; XLA drops the unused params."""
    return nnx.split(t5.T5(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)[2]


def state_shardings(config: T5Config, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: mesh_lib.AxisRules, seed: int = 0):
    """(ModelDef, abstract TrainState, TrainState of NamedShardings); allocates no parameters."""
    abstract = abstract_model(config, mesh, rules, seed)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    abstract_params = nnx.to_pure_dict(abstract_params)
    p_shardings = param_shardings(abstract, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shardings = opt_state_shardings(abstract_opt, abstract_params, p_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
    shardings = TrainState(step=replicated, params=p_shardings, opt_state=o_shardings)
    rest = abstract_rest
    if jax.tree.leaves(rest):  # only models that keep RNG streams need their values
        with mesh_lib.activate(mesh, rules):
            rest = jax.jit(lambda: _model_rest(config, seed), out_shardings=replicated)()
    model_def = ModelDef(graphdef=graphdef, rest=rest, config=config)
    return model_def, abstract_state, shardings


def init_train_state(model_def: ModelDef, tx: optax.GradientTransformation,
                     shardings: TrainState, mesh: Mesh, rules: mesh_lib.AxisRules,
                     seed: int = 0) -> TrainState:
    """A freshly initialised train state, created directly with ``shardings``."""

    def init() -> TrainState:
        model = t5.T5(model_def.config, rngs=nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))

    with mesh_lib.activate(mesh, rules):
        return jax.jit(init, out_shardings=shardings)()
