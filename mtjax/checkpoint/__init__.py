"""Orbax checkpoints of a run: train state, input-pipeline position per host, config, metrics.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config,metrics}`` written by one Orbax
``CheckpointManager``. Orbax writes each step into a temporary directory and commits it by
renaming, so a save killed half-way is never listed as a step. A step directory that is there but
incomplete or unreadable anyway (copied half-way, disk full, files lost) is moved aside to
``<step>.incomplete`` with a message, and the run resumes from the newest complete one. So is a
step whose array data restores to other values than were saved (a flipped byte in a data file
still decodes): each array's digest is saved with the state and compared after a restore.

The package's modules, one job each:

    layout.py    what a step directory holds, and whether a step is complete
    pipeline.py  each host's input-pipeline position, as an Orbax item
    manager.py   RunCheckpoints: save, keep, and restore the newest step that reads
    digest.py    per-array checksums of the state, computed on the devices at save, checked
                 after a restore
    read.py      reading one checkpoint for commands that only read (params, tree, JSON items)
    failures.py  why a restore failed (damaged files, another run, this machine), in one line
    quiet.py     Orbax's and TensorStore's messages that checkpoint reads and saves silence
    listing.py   `mtjax checkpoints RUN_DIR`: a run's checkpoints from their files alone

The names below are the package's interface: import them from ``mtjax.checkpoint``.
"""

from mtjax.checkpoint.layout import (
    INCOMPLETE_SUFFIX,
    ITEMS,
    LOG_WINDOW_ITEM,
    CheckpointError,
    is_state_item,
)
from mtjax.checkpoint.listing import list_checkpoints
from mtjax.checkpoint.manager import RunCheckpoints, metric_key_fn
from mtjax.checkpoint.pipeline import (
    Checkpointable,
    PipelineHandler,
    PipelineRestore,
    PipelineSave,
    load_pipeline,
    snapshot_pipeline,
)
from mtjax.checkpoint.read import (
    find_state_dir,
    read_json_item,
    restore_params,
    run_dir_of,
    tree_metadata,
    unreadable,
)

__all__ = [
    "INCOMPLETE_SUFFIX",
    "ITEMS",
    "LOG_WINDOW_ITEM",
    "CheckpointError",
    "Checkpointable",
    "PipelineHandler",
    "PipelineRestore",
    "PipelineSave",
    "RunCheckpoints",
    "find_state_dir",
    "is_state_item",
    "list_checkpoints",
    "load_pipeline",
    "metric_key_fn",
    "read_json_item",
    "restore_params",
    "run_dir_of",
    "snapshot_pipeline",
    "tree_metadata",
    "unreadable",
]
