"""What a checkpoint step directory holds, whether a step is complete enough to use, and the
error a checkpoint that is missing, incomplete or does not fit raises."""

from __future__ import annotations

import json
import pathlib

from mtjax.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run; the message says which."""


# The items of a step directory (the CheckpointManager's item_handlers in manager.py, plus the
# metrics best_fn makes it keep).
LOG_WINDOW_ITEM = "log_window"
ITEMS = ("state", "data", "config", "metrics", LOG_WINDOW_ITEM)


# Files Orbax writes last when it commits a step and an item (see ``_is_complete``).
_COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/commit_success.txt",
                   "config/commit_success.txt")
INCOMPLETE_SUFFIX = ".incomplete"


# The JSON files of a step: Orbax's commit record (written last: cut short, the commit did not
# finish; a commit marker, so always there), the state's tree and shardings, the run config, the
# metrics and the logging window (where saved); each must parse, or the step is not used. (A
# damaged array file shows only when read: `mtjax train` then sets the step aside.)
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "config/metadata",
               "metrics/metrics", f"{LOG_WINDOW_ITEM}/metadata")
_PROCESS_COUNT_FILE = "num_processes"  # in data/: how many hosts wrote their position (not
# named process_*: those are the positions)


def is_state_item(path: pathlib.Path) -> bool:
    """Whether ``path`` is one step's ``state`` item (where T5X and Orbax users point; its
    ``_METADATA`` alone would read as an Orbax tree): the commands take it for its step."""
    return path.name == "state" and (path.parent / "config").is_dir()


def _is_complete(step_dir: pathlib.Path) -> bool:
    if not all((step_dir / marker).exists() for marker in _COMMIT_MARKERS):
        return False
    for name in _JSON_FILES:
        path = step_dir / name
        if path.exists():
            try:
                if not isinstance(json.loads(path.read_text()), dict):
                    return False
            except (OSError, ValueError):
                return False
    return _data_complete(step_dir / "data")


def _data_complete(data: pathlib.Path) -> bool:
    """Every host's input position is there (a step saved without a pipeline has no data/)."""
    if not data.is_dir():
        return True
    written = _positions_written(data)
    try:
        return written == int((data / _PROCESS_COUNT_FILE).read_text())
    except (OSError, ValueError):  # written before the count was recorded
        return written > 0


def _positions_written(data: pathlib.Path) -> int:
    """How many hosts' input positions a step's ``data/`` holds (0: none, or no ``data/``)."""
    return len(list(data.glob("process_*"))) if data.is_dir() else 0
