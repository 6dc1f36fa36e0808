"""Helpers to bring the user's own SeqIO tasks into a run."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import types

from mtjax.errors import UserError


class TasksModuleError(UserError, ImportError):
    """The ``--tasks-module`` could not be imported; the message names it and the cause."""


def import_tasks_module(name_or_path: str) -> types.ModuleType:
    """Import a module path (``my_project.tasks``) or a ``.py`` file that registers tasks.

    Importing registers the module's tasks and mixtures with SeqIO before the mixture is looked
    up, which is what an unimported registry module would otherwise make fail.
    """
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = pathlib.Path(name_or_path).absolute()
        if not path.is_file():
            raise TasksModuleError(f"tasks module file {name_or_path!r} does not exist")
        module_name = f"mtjax_user_tasks_{path.stem}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise TasksModuleError(f"tasks module {name_or_path!r} failed to import: {e}") from e
        return module
    try:
        return importlib.import_module(name_or_path)
    except ModuleNotFoundError as e:
        raise TasksModuleError(
            f"tasks module {name_or_path!r} not found ({e}); give an importable module path "
            f"or a .py file") from e

