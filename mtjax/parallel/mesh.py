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
import difflib
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
    """Axis sizes. ``data``/``fsdp``/``tensor`` are within a slice or host (fast ICI/NVLink);
    ``dcn_*`` multiply them across slices or hosts (slow data-centre network). A mesh axis's
    total size is ``ici * dcn``."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @property
    def dcn(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)


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
            names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
            given = " * ".join(f"{n}={v}" for n, v in zip(names, sizes, strict=True) if v != -1)
            raise MeshError(
                f"mesh: {given} = {fixed} does not divide the {num_devices} device(s) here; "
                f"choose sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {num_devices} devices are "
            f"available; set one of mesh.data/mesh.fsdp/mesh.tensor to -1 to fill"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: MeshShape = MeshShape(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes ``data``, ``fsdp``, ``tensor``.

    With any ``dcn_*`` size above 1 the mesh is hybrid: ``mesh_utils.create_hybrid_device_mesh``
    keeps each ICI group inside one slice (TPU multi-slice) or one process (GPU hosts), so only
    the ``dcn_*`` part of an axis crosses the slow network.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    dcn = shape.dcn
    if any(d < 1 for d in dcn):
        raise MeshError(f"mesh: dcn_data/dcn_fsdp/dcn_tensor must be >= 1, got {dcn}")
    num_granules = int(np.prod(dcn))
    if len(devices) % num_granules:
        raise MeshError(f"mesh: {len(devices)} devices cannot be split into "
                        f"dcn_data*dcn_fsdp*dcn_tensor = {num_granules} slices/hosts")
    ici = resolve_axis_sizes(shape, len(devices) // num_granules)
    if num_granules > 1:
        by_slice = getattr(devices[0], "slice_index", None) is not None and len(
            {getattr(d, "slice_index", 0) for d in devices}) > 1
        granules = len({d.slice_index if by_slice else d.process_index for d in devices})
        if granules != num_granules:
            kind = "slices" if by_slice else "process(es)"
            raise MeshError(
                f"mesh: mesh.dcn_data*mesh.dcn_fsdp*mesh.dcn_tensor = {num_granules}, but the "
                f"devices here are on {granules} {kind}, which the dcn_* sizes span; make their "
                f"product {granules} (split the devices of one with mesh.data/fsdp/tensor)")
        try:
            device_array = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices=devices, process_is_granule=not by_slice,
                allow_split_physical_axes=True)
        except ValueError as e:
            raise MeshError(f"mesh: cannot lay out ici {ici} x dcn {dcn} over the devices of "
                            f"{jax.process_count()} process(es): {e}") from None
    elif len(devices) == jax.device_count() and devices == list(jax.devices()):
        device_array = mesh_utils.create_device_mesh(ici, devices=devices)
    else:
        device_array = np.asarray(devices).reshape(ici)
    # Auto axes: shardings come from jit in/out shardings and constraints, not sharding-in-types.
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_rules(text: str) -> AxisRules:
    """A user table written as ``logical=axis[+axis],...``; unnamed logical axes replicate.

    Example: ``batch=data+fsdp,embed=fsdp,heads=tensor,mlp=tensor`` (``logical=`` with nothing
    after it, or ``none``, replicates that axis).
    """
    table: dict[str, str | tuple[str, ...] | None] = dict.fromkeys(LOGICAL_AXES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        logical, sep, target = (x.strip() for x in item.partition("="))
        if not sep:
            raise MeshError(f"mesh.rules: {item!r} is not logical=axis; write e.g. "
                            f"'batch=data+fsdp,embed=fsdp' or name a preset {sorted(RULE_PRESETS)}")
        if logical not in LOGICAL_AXES:
            close = difflib.get_close_matches(logical, LOGICAL_AXES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MeshError(f"mesh.rules: unknown logical axis {logical!r}{hint}; logical axes "
                            f"are {LOGICAL_AXES}")
        axes = tuple(a for a in target.split("+") if a and a != "none")
        table[logical] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


def get_rules(preset_or_rules: str | AxisRules) -> AxisRules:
    """A rules table from a preset name, a ``logical=axis,...`` string or a table of pairs,
    checked against the mesh axes."""
    if isinstance(preset_or_rules, str):
        if "=" in preset_or_rules:
            return get_rules(parse_rules(preset_or_rules))
        if preset_or_rules not in RULE_PRESETS:
            raise MeshError(
                f"mesh.rules: unknown preset {preset_or_rules!r}; choose one of "
                f"{sorted(RULE_PRESETS)} or write a table 'logical=axis,...' "
                f"(e.g. 'batch=data+fsdp,embed=fsdp,heads=tensor')"
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
        if len(set(targets)) < len(targets):
            # JAX refuses such a spec deep inside (DuplicateSpecError), or the batch check
            # first asks for a batch divisible by the axis's size squared.
            raise MeshError(
                f"mesh.rules: logical axis {logical!r} maps to {'+'.join(targets)}, a mesh axis "
                f"twice; name each mesh axis once, e.g. "
                f"{logical}={'+'.join(dict.fromkeys(targets))}")
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
    """The mesh as a small table: axis, size, and the devices along it (first row)."""
    lines = ["axis    size  devices along the axis", "------  ----  ----------------------"]
    for i, (name, size) in enumerate(mesh.shape.items()):
        along = np.moveaxis(mesh.devices, i, 0).reshape(size, -1)[:, 0]
        ids = ",".join(str(d.id) for d in along[:8]) + (",..." if size > 8 else "")
        lines.append(f"{name:<6}  {size:>4}  {ids}")
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    lines.append(f"devices: {mesh.devices.size} ({', '.join(kinds)}) on "
                 f"{jax.process_count()} process(es)")
    return "\n".join(lines)
