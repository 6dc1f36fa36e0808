"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names *logical* axes (T5X's vocabulary); this module alone decides which mesh axis
(`data`, `fsdp`, `tensor`) each of them is split over. Presets:

- ``data``: pure data parallel; parameters replicated.
- ``fsdp``: ZeRO-3 style; parameters and optimizer state sharded over ``fsdp`` along ``embed``,
  the batch over ``data`` and ``fsdp``.
- ``fsdp_tensor``: ``fsdp`` plus Megatron-style tensor parallelism (heads and MLP over ``tensor``).

Letter legend used across mtjax: B batch, L length, D embed, H heads, K head dim, F mlp, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mtjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXES = (
    "batch", "length", "embed", "mlp", "heads", "kv", "joined_kv", "vocab", "relpos_buckets",
    "layers",
)

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Every logical name appears in every preset, so a rules table is also the list of known names.
_BATCH = ("batch", ("data", "fsdp"))
_UNSHARDED = (("length", None), ("kv", None), ("relpos_buckets", None), ("layers", None))

RULE_PRESETS: dict[str, AxisRules] = {
    "data": (
        ("batch", ("data", "fsdp")), ("embed", None), ("mlp", None), ("heads", None),
        ("joined_kv", None), ("vocab", None), *_UNSHARDED,
    ),
    "fsdp": (
        _BATCH, ("embed", "fsdp"), ("mlp", None), ("heads", None), ("joined_kv", None),
        ("vocab", None), *_UNSHARDED,
    ),
    "fsdp_tensor": (
        _BATCH, ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
        ("joined_kv", "tensor"), ("vocab", "tensor"), *_UNSHARDED,
    ),
}


class MeshError(UserError, ValueError):
    """A mesh or rules table that cannot work, found before anything compiles."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def resolve_axis_sizes(shape: MeshShape, num_devices: int) -> tuple[int, int, int]:
    """Fill the one axis given as -1 so that the product equals ``num_devices``."""
    sizes = [shape.data, shape.fsdp, shape.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}"
            )
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {num_devices} devices are "
            f"available; set one of mesh.data/mesh.fsdp/mesh.tensor to -1 to fill"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: MeshShape = MeshShape(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes ``data``, ``fsdp``, ``tensor``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(shape, len(devices))
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    else:
        device_array = np.asarray(devices).reshape(sizes)
    # Auto axes: shardings come from jit in/out shardings and constraints, not sharding-in-types.
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def get_rules(preset_or_rules: str | AxisRules) -> AxisRules:
    """A rules table from a preset name or a user table, checked against the mesh axes."""
    if isinstance(preset_or_rules, str):
        if preset_or_rules not in RULE_PRESETS:
            raise MeshError(
                f"mesh.rules: unknown preset {preset_or_rules!r}; choose one of "
                f"{sorted(RULE_PRESETS)} or give a table of (logical, mesh axis) pairs"
            )
        return RULE_PRESETS[preset_or_rules]
    rules = tuple((str(k), v if v is None or isinstance(v, str) else tuple(v))
                  for k, v in preset_or_rules)
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            targets = ()
        else:
            targets = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        for axis in targets:
            if axis not in MESH_AXES:
                raise MeshError(
                    f"mesh.rules: logical axis {logical!r} maps to unknown mesh axis {axis!r}; "
                    f"mesh axes are {MESH_AXES}"
                )
    return rules


@contextlib.contextmanager
def activate(mesh: Mesh, rules: AxisRules) -> Iterator[None]:
    """Make ``mesh`` and ``rules`` current: model creation and sharding constraints read them."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_to_spec(names: Sequence[str | None], rules: AxisRules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec with ``rules`` (first matching rule wins)."""
    table = dict(rules)
    return PartitionSpec(*(None if n is None else table.get(n) for n in names))


def batch_sharding(mesh: Mesh, rules: AxisRules, ndim: int = 2) -> NamedSharding:
    """Sharding of an input batch array [B, L, ...]: batch split by the ``batch`` rule."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def describe(mesh: Mesh) -> str:
    """The mesh as a small table: axis, size, devices."""
    lines = ["axis    size", "------  ----"]
    lines += [f"{name:<6}  {size:>4}" for name, size in mesh.shape.items()]
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    lines.append(f"devices: {mesh.devices.size} ({', '.join(kinds)}) on "
                 f"{jax.process_count()} process(es)")
    return "\n".join(lines)
