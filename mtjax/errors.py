"""Exceptions the CLI turns into one line and an exit code (no traceback)."""


class UserError(Exception):
    """A mistake in what the user asked for (config, names, files); the message says the fix."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, mismatched batch); the CLI exits 1."""


class InputPositionMismatch(Exception):
    """A saved input-pipeline position that does not fit the pipeline asked to restore it (the
    mixture's tasks changed); the message says what changed. The run keeps the checkpoint's
    weights and restarts its input stream."""
