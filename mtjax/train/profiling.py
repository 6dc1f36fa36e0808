"""A trace of a few training steps (``log.profile_steps``) with JAX's profiler.

The trace holds what the host dispatched and what the devices ran, step by step (each step is a
``StepTraceAnnotation``, which TensorBoard's profile plugin and XProf read as steps). Training
writes it to ``<workdir>/profile/``, ``mtjax bench train --profile DIR`` to DIR (each under
``process_<i>/`` in a multi-host job): ``plugins/profile/<time>/<host>.xplane.pb`` for
TensorBoard / XProf, and ``perfetto_trace.json.gz`` beside it for Perfetto.

A trace that cannot start (another one is running in this process) or cannot be written (a
full disk) is a warning: profiling never stops a run.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax


def trace_dir(base: pathlib.Path) -> pathlib.Path:
    """Where this process writes its trace: ``base``, or ``base/process_<i>`` in a job of
    several processes (which may share a machine, and so the trace's file names)."""
    if jax.process_count() == 1:
        return base
    return base / f"process_{jax.process_index()}"


class StepProfiler:
    """Traces the steps ``skip + 1 .. skip + steps`` that this process runs (its first step
    compiles; the default skips it and the next, which can still carry start-up work).

    ``log`` reports where the trace went, or that the run ended before it began; ``warn``
    what kept this host from making or writing it (the trainer prints those on every host: a
    failure on host 3 is host 3's to report).

    Call :meth:`step` around each step's dispatch and :meth:`stepped` after it with the step's
    outputs; :meth:`close` ends a trace the run left early (its last step, preemption, an error).
    """

    def __init__(self, base: pathlib.Path, *, skip: int, steps: int,
                 log: Callable[[str], None], warn: Callable[[str], None] | None = None) -> None:
        self.dir = trace_dir(base)
        self.first, self.last = skip + 1, skip + steps  # counted in this process's steps
        self.log = log  # the trace's whereabouts: one line for the job
        self.warn = warn or log  # what went wrong on this host: every host's own
        self.run = 0  # steps this process has dispatched
        self.tracing = False
        self.global_steps: list[int] = []

    @property
    def enabled(self) -> bool:
        return self.last >= self.first

    @contextlib.contextmanager
    def step(self, global_step: int) -> Iterator[None]:
        """The dispatch of ``global_step`` (1-based, as the logs count)."""
        self.run += 1
        if self.enabled and self.run == self.first:
            self._start()
        if not self.tracing:
            yield
            return
        self.global_steps.append(global_step)
        with jax.profiler.StepTraceAnnotation("train", step_num=global_step):
            yield

    def stepped(self, outputs: Any, *, final: bool = False) -> None:
        """After the step's dispatch: the trace ends once its last step has run on the
        devices (the dispatch returns before they finish), or after the run's ``final`` step
        (the last, or a stop), before the evaluation and checkpoint that follow it."""
        if self.tracing and (self.run >= self.last or final):
            jax.block_until_ready(outputs)
            self._stop()

    def close(self) -> None:
        if self.tracing:  # an error left it open: the last or a stopping step ends it in stepped
            self._stop()
        elif self.enabled and self.run < self.first:
            # Asked for a trace, given none: say why rather than leave profile/ missing (once
            # for the job: every host ran the same steps).
            self.log(f"mtjax: warning: log.profile_steps: no trace; this process ran "
                     f"{self.run} step(s), and the trace starts at its step {self.first} "
                     f"(after log.profile_skip_steps={self.first - 1})")

    def _start(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
        except (OSError, RuntimeError) as e:  # a file in the way; a trace already running
            self.warn(f"mtjax: warning: log.profile_steps: no trace ({e}); training goes on")
            return
        self.tracing = True

    def _stop(self) -> None:
        self.tracing = False
        try:
            jax.profiler.stop_trace()
        except Exception as e:  # writing it failed (a full disk, a quota): training goes on
            self.warn(f"mtjax: warning: log.profile_steps: the trace could not be written to "
                      f"{self.dir} ({e}); training goes on")
            return
        if self.global_steps:
            first, last = self.global_steps[0], self.global_steps[-1]
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            self.log(f"mtjax: profile of {steps} in {self.dir} (tensorboard --logdir {self.dir}, "
                     f"or its perfetto_trace.json.gz in ui.perfetto.dev)")
