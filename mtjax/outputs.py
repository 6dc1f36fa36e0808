"""Result files the commands write (``--output`` of infer, score, eval, bench): checked before
the work starts, and replaced whole or not at all.

A wrong path fails in one line before minutes of decoding or benchmarking, not after; a run that
fails or is interrupted half-way leaves the file that was there (which may be the input itself)
as it was, rather than an emptied or half-written one that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from mtjax.errors import UserError
from mtjax.parallel import distributed


class OutputError(UserError, OSError):
    """An output path that cannot be written; the message names the flag and the fix."""


def check_writable(path: str | os.PathLike, flag: str = "--output") -> pathlib.Path:
    """``path`` if a file can be written there; else :class:`OutputError`."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a directory; give a file name in it")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist; "
                          f"create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r}: the directory {str(parent)!r} is not "
                          f"writable")
    return target


# Partial files of the outputs being written, which SIGTERM removes before the process ends.
_PARTIALS: set[str] = set()


def _remove_partials_and_end(signum, frame) -> None:
    """SIGTERM's default (the process ends, killed by the signal), less the partial files.
    Ending here, not unwinding by an exception: a SystemExit raised mid-computation left JAX's
    threads to the interpreter's shutdown, which crashed (SIGSEGV) now and then."""
    for partial in list(_PARTIALS):
        pathlib.Path(partial).unlink(missing_ok=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _removed_at_sigterm(partial: str) -> Iterator[None]:
    """While the block runs, SIGTERM (a scheduler's stop) removes ``partial`` before the
    process ends. A handler someone else set (the trainer's), or a thread other than the main
    one, is left alone."""
    handler = signal.getsignal(signal.SIGTERM)
    if (threading.current_thread() is not threading.main_thread()
            or handler not in (signal.SIG_DFL, _remove_partials_and_end)
            or distributed.preemption_service_running()):
        yield
        return
    _PARTIALS.add(partial)
    signal.signal(signal.SIGTERM, _remove_partials_and_end)
    try:
        yield
    finally:
        _PARTIALS.discard(partial)
        if not _PARTIALS:  # (a nested write still being watched keeps the handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def replaced_on_success(path: str | os.PathLike, flag: str = "--output") -> Iterator[TextIO]:
    """A text file to write ``path``'s new content into: it replaces ``path`` when the block
    ends normally, and is deleted when it raises (Ctrl-C included) or SIGTERM ends the
    process."""
    given = pathlib.Path(path)
    if given.exists() and not given.is_file() and not given.is_dir():
        # /dev/null, /dev/stdout (a link to a pipe, maybe), a FIFO: written in place.
        with open(given, "w", encoding="utf-8") as out:
            yield out
        return
    # Through a symlink: replace the file it names, not the link (its directory checked too).
    target = check_writable(check_writable(path, flag).resolve(), flag)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                       dir=target.parent)
    with _removed_at_sigterm(partial):
        try:
            out = os.fdopen(handle, "w", encoding="utf-8")
            try:
                try:
                    yield out
                except OSError as e:
                    if e.errno not in _FULL:  # (the block's own failure, e.g. its input's)
                        raise
                    raise _write_failed(flag, path, e) from e
                try:
                    out.flush()
                    os.fsync(out.fileno())  # on disk before its name: a crash leaves no torn file
                    out.close()
                except OSError as e:
                    raise _write_failed(flag, path, e) from e
            finally:
                # After a failed write its buffer still holds text: closing tries to write it
                # again, and that error would stand in for the one raised (the file goes anyway).
                with contextlib.suppress(OSError):
                    out.close()
            if target.exists():  # keep the permissions of the file being replaced
                os.chmod(partial, target.stat().st_mode & 0o7777)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(partial, 0o666 & ~umask)
            os.replace(partial, target)
        except BaseException:
            pathlib.Path(partial).unlink(missing_ok=True)
            raise


# A disk or quota that is full, or a file past its size limit: writes fail whatever is written.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failed(flag: str, path: str | os.PathLike, error: OSError) -> OutputError:
    why = error.strerror or str(error)
    return OutputError(f"{flag} {str(path)!r} could not be written ({why}); it was left as "
                       f"it was: free space there, or give a path on another disk")


def write_text(path: str | os.PathLike, text: str, flag: str = "--output") -> None:
    """Replace ``path`` with ``text``, whole or not at all."""
    with replaced_on_success(path, flag) as out:
        out.write(text)


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, in nested dicts and lists.

    Python writes them as ``NaN``/``Infinity``, which strict JSON readers (jq, browsers, Go)
    refuse; ``null`` is what JSON has for "no number"."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of strict JSON: non-finite numbers become null (see finite_or_null)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
