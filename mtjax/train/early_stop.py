"""A SIGTERM from the moment ``mtjax train`` starts, before the trainer's own handler exists.

Importing JAX, TensorFlow and SeqIO takes seconds; a SIGTERM then (a job preempted as it starts)
used to kill the process with code 143, which the launchers do not restart on. This records it
instead, and the trainer stops at its next set-up check with the preemption exit code (42).
Light on purpose: it is installed before anything heavy is imported.
"""

from __future__ import annotations

import signal
from typing import Any

received = False


def _record(signum, frame) -> None:
    global received
    received = True


def install() -> Any:
    """Record SIGTERM from now on; returns the handler it replaces."""
    global received
    received = False
    return signal.signal(signal.SIGTERM, _record)


def take() -> bool:
    """Whether a SIGTERM was recorded since :func:`install`; the trainer takes it over once."""
    global received
    was, received = received, False
    return was
