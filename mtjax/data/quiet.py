"""TensorFlow's and SeqIO's notices that say nothing to mtjax's users, kept off their terminal.

- Importing TensorFlow 2.20+ writes a dozen lines to the process's stderr from C++ (absl's
  pre-initialisation warning, oneDNN and CPU-feature notes, "Could not find cuda drivers",
  "failed call to cuInit" on machines without a GPU), twice, and ``TF_CPP_MIN_LOG_LEVEL`` no
  longer silences them: :func:`startup_notices_dropped` drops those while passing on anything
  else TF writes as it starts. mtjax runs only TF's input pipeline, on the host, which gains
  nothing from oneDNN, so ``TF_ENABLE_ONEDNN_OPTS`` defaults to 0 (its first int32 op logged an
  error-level line otherwise).
- SeqIO's advice, through absl's Python logger, that does not apply to how mtjax uses it
  (:class:`SeqioAdviceFilter`).

``MTJAX_TF_NOTICES=1`` shows TensorFlow's start-up lines as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Lines known to be start-up notices, matched anywhere in the line.
NOTICES = re.compile("|".join((
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .*rebuild TensorFlow",
)))


# tf.data's C++ log of a refused input position (a checkpoint saved by a pipeline of another
# structure); the error it raises reaches mtjax, which says what it does about it in one line.
REFUSED_POSITION = re.compile(r"Failed to restore dataset iterator from checkpoint")


def passed_on(text: str, dropped: re.Pattern = NOTICES) -> str:
    """``text`` without the whole lines ``dropped`` matches (the start-up notices)."""
    return "".join(line for line in text.splitlines(keepends=True) if not dropped.search(line))


@contextlib.contextmanager
def startup_notices_dropped() -> Iterator[None]:
    """Run the block with file descriptor 2 captured (C++ writes there, past ``sys.stderr``),
    then write what it captured, less the notices, to stderr. On an exception everything
    captured is written, notices too."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if os.environ.get("MTJAX_TF_NOTICES") == "1":  # to see them all, e.g. when TF misbehaves
        yield
        return
    with _stderr_lines_dropped(NOTICES, on_error=False):
        yield


@contextlib.contextmanager
def refused_position_lines_dropped() -> Iterator[None]:
    """Run the block (a restore of the input position) without tf.data's C++ log lines of a
    refused position, on success or error alike; other lines pass on."""
    with _stderr_lines_dropped(REFUSED_POSITION, on_error=True):
        yield


@contextlib.contextmanager
def _stderr_lines_dropped(dropped: re.Pattern, on_error: bool) -> Iterator[None]:
    """Capture file descriptor 2 in the block and write it back less the lines ``dropped``
    matches (and, where not ``on_error``, everything when the block raises)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters): leave it
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = text if failed and not on_error else passed_on(text, dropped)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class SeqioAdviceFilter(logging.Filter):
    """Drops SeqIO warnings whose advice does not apply here:

    - uncached FunctionDataSources (once per task): caching is advised against poor shuffling
      across restarts; mtjax's sources are in memory and shuffled whole at every epoch, and
      the iterator position is checkpointed, so restarts resume the exact stream;
    - an Evaluator without ``logger_cls``: mtjax writes the metrics it returns itself
      (metrics.jsonl, summary.json, TensorBoard);
    - an Evaluator with no task to evaluate: ``mtjax eval`` refuses it and ``mtjax train``
      says so, naming the mixture and the split.
    """

    ADVICE = ("uncached FunctionDataset", "'logger_cls' is empty so seqio.Evaluator",
              "No eval task with valid split and metric fn found")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(advice in message for advice in self.ADVICE)


def drop_seqio_advice() -> None:
    """Install :class:`SeqioAdviceFilter` on absl's logger, once."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, SeqioAdviceFilter) for f in logger.filters):
        logger.addFilter(SeqioAdviceFilter())
