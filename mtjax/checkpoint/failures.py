"""Why a checkpoint failed to restore (damaged files, another run's checkpoint, or this machine),
and the error's reason in one line."""

from __future__ import annotations

from mtjax.checkpoint.layout import CheckpointError


def _says_dataset_changed(error: BaseException) -> bool:
    """tf.data's refusal of an iterator position saved by a dataset of another structure (its
    NotFoundError: "Make sure the dataset definition has not changed ...")."""
    return (type(error).__name__ == "NotFoundError"
            and "dataset definition has not changed" in str(error))


def _looks_damaged(error: CheckpointError) -> bool:
    """Files of the checkpoint are missing or damaged (set it aside, try an older one), as
    opposed to a checkpoint of another run (the user's change) or a failure of this machine
    (out of memory, permissions: an older checkpoint would fail alike, and this one is fine)."""
    cause = error.__cause__
    if not isinstance(cause, Exception) or isinstance(cause, KeyError):
        return False
    if _this_machine_failed(error):
        return False
    return not _looks_mismatched(error)


def _this_machine_failed(error: CheckpointError) -> bool:
    """The restore failed for this machine, not for the checkpoint: out of host or device
    memory, files it may not read (permissions), a stale NFS handle, too many open files. The
    checkpoint is fine, and an older one reads no better: nothing is to be moved aside."""
    cause = error.__cause__
    text = str(cause).lower()
    return (isinstance(cause, (MemoryError, PermissionError)) or "resource_exhausted" in text
            or any(words in text for words in ("out of memory", "permission denied",
                                               "permission_denied", "stale file handle",
                                               "too many open files")))


def _looks_mismatched(error: CheckpointError) -> bool:
    """A shape or tree mismatch (the user's change), as opposed to unreadable files."""
    text = str(error.__cause__).lower()
    if _says_unreadable(error.__cause__):
        return False
    return any(word in text for word in ("shape", "structure", "mismatch", "missing key",
                                         "dtype"))


def _says_unreadable(cause: BaseException | None) -> bool:
    """The error of a read that found files of the checkpoint missing or damaged."""
    if type(cause) is Exception:  # Orbax reports a damaged array file as a bare Exception
        return True
    text = str(cause).lower()
    return any(word in text for word in ("not_found", "error reading", "data_loss", "corrupt",
                                         "no such file", "unexpected end", "error while reading",
                                         "out_of_range", "read less bytes"))


def _short(error: BaseException | None, limit: int = 240) -> str:
    if type(error) is Exception and error.__cause__ is not None:
        error = error.__cause__  # Orbax's "error while reading array index" wraps the reason
    # Orbax appends the whole TensorStore spec to a failed read: the part before says it all.
    text = " ".join(str(error).split(" See full TensorStore details")[0].split())
    return text if len(text) <= limit else text[:limit] + " ..."
