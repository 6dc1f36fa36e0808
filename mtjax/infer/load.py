"""A model for inference from a checkpoint: config, parameters, vocabulary, mesh.

Every command that takes ``--checkpoint DIR`` loads through :func:`load`. DIR may be a run
directory (its latest checkpoint), its ``checkpoints/`` folder, or one step directory
``checkpoints/<step>/``; the step directory holds the Orbax items ``state`` (parameters, and for
training runs the optimizer state) and ``config`` (the run's ``Config.to_dict()``), as written by
``mtjax train`` and by checkpoint converters. Only the parameters are restored.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax import checkpoint as checkpoint_lib
from mtjax import config as config_lib
from mtjax.checkpoint import CheckpointError
from mtjax.errors import UserError
from mtjax.model import sizes, t5
from mtjax.parallel import mesh as mesh_lib
from mtjax.train import state as state_lib

# Written by converters next to ``checkpoints/``: the exact architecture ({"t5_config": {...}}).
MODEL_CONFIG_FILE = sizes.MODEL_CONFIG_FILE


class VocabularyError(UserError, FileNotFoundError):
    """The checkpoint's vocabulary file cannot be found; the message says where it looked."""


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of the model (as ``mtjax.train.state.ModelDef``): ``merge(params)``."""

    graphdef: Any
    config: sizes.T5Config

    def merge(self, params: dict[str, Any]) -> t5.T5:
        return nnx.merge(self.graphdef, nnx.State(params))


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint ready for decoding and scoring.

    Attributes:
        config: the run's config, as saved with the checkpoint.
        model_def: ``merge(params)`` gives the T5 module.
        params: parameters placed on ``mesh`` by ``rules``.
        mesh: the mesh the parameters live on.
        rules: the logical axis rules.
        step_dir: the checkpoint step directory loaded.
        step: its step number (None when the directory name is not a number).
    """

    config: config_lib.Config
    model_def: ModelDef
    params: Any
    mesh: Mesh
    rules: mesh_lib.AxisRules
    step_dir: pathlib.Path
    step: int | None

    @property
    def vocabulary(self):
        """The seqio vocabulary (see :func:`resolve_vocabulary`)."""
        return resolve_vocabulary(self.config, self.step_dir)


def model_config(config: config_lib.Config, vocab_size: int,
                 step_dir: pathlib.Path | None = None) -> sizes.T5Config:
    """The model's architecture with the checkpoint's vocabulary size and dtype; no dropout.

    The named size ``config.model.name``, unless the run directory holds the exact architecture
    in ``model_config.json`` (converted checkpoints of sizes without a name).
    """
    exact = None if step_dir is None else checkpoint_lib.run_dir_of(step_dir) / MODEL_CONFIG_FILE
    if exact is not None and exact.is_file():
        base = sizes.read_architecture(exact)
    else:
        try:
            base = sizes.get_config(config.model.name)
        except KeyError as e:
            raise config_lib.ConfigError(str(e)) from None
    return dataclasses.replace(base, vocab_size=vocab_size, dtype=config.model.dtype,
                               dropout_rate=0.0, remat="none")


def abstract_model(model_cfg: sizes.T5Config, mesh: Mesh, rules: mesh_lib.AxisRules):
    """(ModelDef, parameters as ShapeDtypeStructs carrying their NamedShardings); rules that
    put one mesh axis on two axes of a parameter stop in one line, as in training."""
    abstract = state_lib.abstract_model(model_cfg, mesh, rules)
    with mesh_lib.activate(mesh, rules):
        graphdef, params = nnx.split(abstract, nnx.Param)
        specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    params = nnx.to_pure_dict(params)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
    return ModelDef(graphdef=graphdef, config=model_cfg), target


def init_params(model_def: ModelDef, target: Any, mesh: Mesh, rules: mesh_lib.AxisRules,
                seed: int = 0) -> Any:
    """Fresh random parameters created directly with ``target``'s shardings (tests, bench)."""
    shardings = jax.tree.map(lambda a: a.sharding, target)

    def init():
        model = t5.T5(model_def.config, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    with mesh_lib.activate(mesh, rules):
        return jax.jit(init, out_shardings=shardings)()


def find_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint step directory of a run dir, its ``checkpoints/`` or a step dir."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a run directory "
                              f"or one of its checkpoints/<step> directories")
    return checkpoint_lib.find_state_dir(path).parent


def read_config(step_dir: pathlib.Path) -> config_lib.Config:
    """The run config saved next to the checkpoint's ``state``."""
    if not (step_dir / "config").is_dir():
        raise CheckpointError(
            f"checkpoint {step_dir} has no 'config' item (written by mtjax train or a converter "
            f"next to 'state'); cannot tell which model it holds")
    return config_lib.from_dict(checkpoint_lib.read_json_item(step_dir / "config"))


def checkpoint_vocab_size(step_dir: pathlib.Path) -> int:
    """Rows of the saved token embedding: the model's (padded) vocabulary size."""
    tree = checkpoint_lib.tree_metadata(step_dir / "state")
    try:
        return int(tree["params"]["token_embedder"]["embedding"].shape[0])
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir} holds no params.token_embedder.embedding") from e


def check_vocabulary_fits(model: LoadedModel) -> None:
    """Refuse a vocabulary with more ids than the model's embedding has rows: the ids past them
    read no row (the gather fills NaN), so every score was null and every prediction noise."""
    rows = checkpoint_vocab_size(model.step_dir)
    vocabulary = model.vocabulary
    if vocabulary.vocab_size > rows:
        from mtjax.data import vocab as vocab_lib

        raise CheckpointError(
            f"checkpoint {model.step_dir}: its vocabulary {vocab_lib.describe(vocabulary)} has "
            f"{vocabulary.vocab_size} ids, and the model's embedding only {rows} rows, so the "
            f"model was not trained with it; convert the checkpoint again with the vocabulary "
            f"it was trained with (mtjax convert --vocab)")


def vocabulary_path(config: config_lib.Config, step_dir: pathlib.Path) -> str | None:
    """``config.data.vocabulary`` as it opens here: ``"byte"``, the SentencePiece file found, or
    None (the vocabulary of the config's mixture). A relative path is looked up in the step
    directory, the run directory (where converters put it) and the current directory, in that
    order.

    Raises:
        VocabularyError: the file is in none of them.
    """
    name = config.data.vocabulary
    if name in (None, "byte"):
        return name
    path = pathlib.Path(name)
    candidates = [path] if path.is_absolute() else [
        step_dir / path, checkpoint_lib.run_dir_of(step_dir) / path, path.absolute()]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise VocabularyError(
        f"vocabulary {name!r} of checkpoint {step_dir} not found (looked in "
        f"{', '.join(str(c) for c in candidates)}); copy the .model file there")


def import_tasks(config: config_lib.Config, step_dir: pathlib.Path,
                 tasks_module: str | None = None) -> None:
    """Register the run's tasks as training did: the run's vocabulary is the default of task
    helpers given none (``pipeline.prepare``'s order) before the tasks module is imported;
    imported first, its tasks had bytes. ``tasks_module`` (``--tasks-module``) replaces the
    run's ``data.tasks_module`` (one that has moved)."""
    from mtjax.data import tasks as tasks_lib
    from mtjax.data import vocab as vocab_lib

    vocab_lib.set_run_vocabulary(vocabulary_path(config, step_dir))
    if tasks_module:
        tasks_lib.import_tasks_module(tasks_module)
    elif config.data.tasks_module:
        try:
            tasks_lib.import_tasks_module(config.data.tasks_module)
        except tasks_lib.TasksModuleError as e:
            raise tasks_lib.TasksModuleError(
                f"{e} (the run's data.tasks_module); if it has moved, give its new place with "
                f"--tasks-module") from e
    import mtjax.data  # noqa: F401 - registers the built-in tasks


def resolve_vocabulary(config: config_lib.Config, step_dir: pathlib.Path):
    """The checkpoint's vocabulary: ``config.data.vocabulary`` when set (see
    :func:`vocabulary_path`), otherwise the output vocabulary of the config's mixture."""
    import_tasks(config, step_dir)
    from mtjax.data import vocab as vocab_lib

    path = vocabulary_path(config, step_dir)
    if path is None:
        import seqio

        from mtjax.data import pipeline

        first = pipeline.resolve_task_names(config.data.mixture)[0]
        return seqio.get_mixture_or_task(first).output_features["targets"].vocabulary
    return vocab_lib.get_vocabulary(path)


def inference_meshes(config: config_lib.Config) -> Iterator[Mesh]:
    """The meshes to try, in order: the run's own shape where it fits the devices here, then
    every ``data`` x ``fsdp`` split of all devices, the most ``fsdp`` (the least memory per
    device) first, down to ``data`` alone, which holds the whole parameters on each device."""
    m = config.mesh
    n = jax.device_count()
    shapes = [mesh_lib.MeshShape(m.data, m.fsdp, m.tensor, m.dcn_data, m.dcn_fsdp, m.dcn_tensor)]
    shapes += [mesh_lib.MeshShape(data=n // f, fsdp=f, tensor=1)
               for f in range(n, 0, -1) if n % f == 0]
    for shape in shapes:
        try:
            mesh = mesh_lib.make_mesh(shape)
        except (mesh_lib.MeshError, ValueError, NotImplementedError):
            # The run's shape on other devices, or a split JAX cannot lay over a TPU's torus
            # (4x4 chips: no data=2, fsdp=8): the next candidate. data=n always lays out.
            continue
        yield mesh


def on_mesh(target: Any, mesh: Mesh) -> Any:
    """``target`` with every parameter's PartitionSpec placed on ``mesh`` instead (the model's
    graph does not depend on the mesh: one abstract model serves every candidate)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec)), target)


def _splits_evenly(target: Any) -> bool:
    """Whether every parameter's dimensions divide over the mesh axes its sharding names."""
    try:
        for leaf in jax.tree.leaves(target):
            leaf.sharding.shard_shape(leaf.shape)
    except ValueError:
        return False
    return True


def load(path: str | pathlib.Path, *, mesh: Mesh | None = None,
         rules: mesh_lib.AxisRules | None = None,
         tasks_module: str | None = None) -> LoadedModel:
    """Load the parameters and config of a checkpoint for inference.

    Args:
        path: a run directory (latest checkpoint), its ``checkpoints/``, or one step directory.
        mesh: where to place the parameters (default: the first of ``inference_meshes`` over
            which the model's dimensions split evenly).
        rules: logical axis rules (default: the run's ``mesh.rules`` preset).
        tasks_module: in place of the run's ``data.tasks_module`` (one that has moved).

    Raises:
        CheckpointError: no checkpoint there, no config item, or parameters that do not fit.
        ConfigError: the saved config names an unknown model.
    """
    step_dir = find_step_dir(path)
    config = read_config(step_dir)
    if tasks_module:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, tasks_module=tasks_module))
    vocab_size = checkpoint_vocab_size(step_dir)
    rules = rules if rules is not None else mesh_lib.get_rules(config.mesh.rules)
    model_cfg = model_config(config, vocab_size, step_dir)
    if mesh is not None:
        model_def, target = abstract_model(model_cfg, mesh, rules)
    else:
        # The first mesh that splits the model's dimensions: on 3 devices fsdp=3 cannot split a
        # 32-wide embedding, and data=3 holds the whole parameters on each device instead.
        # Built one at a time: a mesh after the one taken is never laid out.
        target = None
        for mesh in inference_meshes(config):
            if target is None:
                model_def, target = abstract_model(model_cfg, mesh, rules)
            else:
                target = on_mesh(target, mesh)
            if _splits_evenly(target):
                break
        else:  # only mesh.rules that shard parameters over `data` can get here
            raise CheckpointError(
                f"{step_dir}: its parameters split evenly over no data x fsdp mesh of the "
                f"{jax.device_count()} devices here, as the mesh rules place parameters on "
                f"'data'; run on a device count that divides the model's dimensions, or keep "
                f"parameters off 'data' in mesh.rules")
    params = checkpoint_lib.restore_params(step_dir, target)
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    return LoadedModel(config=config, model_def=model_def, params=params, mesh=mesh,
                       rules=rules, step_dir=step_dir, step=step)
