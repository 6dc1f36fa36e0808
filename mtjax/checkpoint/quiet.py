"""Orbax's and TensorStore's messages that checkpoint reads and saves would print and that say
nothing new: a missing step metadata file when one item is restored, the echoes of one failed
restore, and the removal of a save that a killed process left unfinished."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import re
import sys

from mtjax.checkpoint.layout import ITEMS


class _ItemMetadataExpected(logging.Filter):
    """Orbax warns "Metadata file does not exist" for any directory restored without its own
    _CHECKPOINT_METADATA; that file sits in the step directory, so restoring one item of a step
    (the parameters for eval, infer, score, conversion; the config) always warned. A step
    directory without it still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Metadata file does not exist: "):
            return True
        metadata_file = pathlib.PurePath(record.getMessage().split(": ", 1)[1])
        return metadata_file.parent.name not in ITEMS


logging.getLogger("absl").addFilter(_ItemMetadataExpected())


class _UnfinishedSaveRedone(logging.Filter):
    """Orbax warns "Attempted to create temporary directory ... Removing existing directory since
    it is not finalized" when it saves a step whose earlier save was killed (SIGKILL, a lost
    host). The run resumes from its latest complete step (and says so) or starts afresh; the
    half-written copy was never a checkpoint, so its removal is no news."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Attempted to create temporary directory ")
                    and message.endswith("Removing existing directory since it is not finalized."))


logging.getLogger("absl").addFilter(_UnfinishedSaveRedone())


_ORBAX_READ_ERROR = "Encountered error while reading array index"


# Set once a restore has failed (and been reported in one line): the errors of its other
# tasks that asyncio finds unretrieved later are echoes of that one.
_restore_failed = False


def _raised_in_orbax(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        if f"orbax{os.sep}checkpoint" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _orbax_read_noise(exc: BaseException | None) -> bool:
    """An echo of one failed restore: Orbax's other read tasks failing alike (a damaged file,
    or a shape that does not fit), TensorStore's own futures for them ("OUT_OF_RANGE: Error
    reading ..."), or TensorStore's callbacks reaching the closed event loop of that restore."""
    if exc is not None and _restore_failed and _raised_in_orbax(exc):
        return True
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        type(exc) is Exception and str(exc).startswith(_ORBAX_READ_ERROR)) or (
        isinstance(exc, ValueError) and bool(re.match(r"[A-Z_]+: Error reading ", str(exc))))


class _DropOrbaxReadNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _orbax_read_noise(record.exc_info[1]))


def _note_failed_restore() -> None:
    global _restore_failed
    _restore_failed = True


@functools.cache
def _quiet_failed_reads() -> None:
    """A damaged checkpoint fails one read per array: restore reports it in one line, but
    asyncio logged every other failed task ("Task exception was never retrieved") and
    TensorStore's threads printed a traceback per late callback, thousands of lines in all.
    Only those two kinds of message are dropped."""
    logging.getLogger("asyncio").addFilter(_DropOrbaxReadNoise())
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if not _orbax_read_noise(value):
            previous(kind, value, traceback)

    sys.excepthook = excepthook
    previous_unraisable = sys.unraisablehook

    def unraisablehook(unraisable):
        if not _orbax_read_noise(unraisable.exc_value):
            previous_unraisable(unraisable)

    sys.unraisablehook = unraisablehook
