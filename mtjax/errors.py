"""Exceptions the CLI turns into one line and an exit code (no traceback)."""


class UserError(Exception):
    """A mistake in what the user asked for (config, names, files); the message says the fix."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, mismatched batch); the CLI exits 1."""
