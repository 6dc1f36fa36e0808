"""Stopping a run cleanly: SIGTERM (what SLURM, Kubernetes and TPU maintenance send) or Ctrl-C
makes the trainer save at a step every host agrees on, then exit with a code the launchers act on.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax

from mtjax.parallel.distributed import log, preemption_service_running

# Exit code after a SIGTERM-triggered checkpoint: the launch scripts requeue on it.
PREEMPTED_EXIT_CODE = 42
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process stopped by Ctrl-C


class Preempted(Exception):
    """Raised after SIGTERM (or Ctrl-C) once the checkpoint is written; the CLI exits with
    ``exit_code``: 42 after SIGTERM (launchers resume on it), 130 after Ctrl-C."""

    def __init__(self, step: int, exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        super().__init__(step)
        self.step, self.exit_code = step, exit_code


class Preemption:
    """SIGTERM (what SLURM, Kubernetes and TPU maintenance send) -> stop at a step every host
    agrees on. One process: a flag set by our handler. Several: JAX's preemption sync point (the
    coordination service spreads the notice and picks the step), called at every step."""

    def __init__(self) -> None:
        self.raised = False
        self.signal_name = "SIGTERM"  # or "Ctrl-C", where that came first
        self._multihost = jax.process_count() > 1 and preemption_service_running()
        self._previous: dict[int, Any] = {}
        from mtjax.train import early_stop

        # A SIGTERM that came while mtjax started, before JAX's preemption service or our
        # handler existed: the hosts agree on it in set-up (:meth:`stop_at_start`).
        self.at_start = early_stop.take()
        if not self._multihost:
            self.raised = self.at_start
            # Ctrl-C too, on one process: save and stop instead of a KeyboardInterrupt that
            # loses every step since the last checkpoint. A second Ctrl-C stops at once.
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.raised and self.signal_name == "Ctrl-C":
                print("\nCtrl-C again: stopping now, without saving (the run resumes from its "
                      "last checkpoint)", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            if not self.raised:
                self.signal_name = "Ctrl-C"
                print("\nCtrl-C: saving at the end of this step (Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
        self.raised = True

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signal_name == "Ctrl-C" else PREEMPTED_EXIT_CODE

    def stop_at_start(self, processes: list[int]) -> None:
        """Raise :class:`Preempted` on every host when any host had a SIGTERM while mtjax
        started (``processes``, agreed by every host): nothing is written yet."""
        if processes:
            where = (f" (process(es) {', '.join(map(str, processes))})"
                     if self._multihost else "")
            log(f"SIGTERM during set-up{where}: nothing new to save; exiting with code "
                 f"{PREEMPTED_EXIT_CODE}")
            raise Preempted(-1, PREEMPTED_EXIT_CODE)

    def stop_during_set_up(self, step: int | None = None) -> None:
        """Raise :class:`Preempted` if a signal came while the run was being set up (one
        process; several stop at an agreed step of the loop): nothing is trained yet, so
        nothing is saved, and the launcher restarts the job without waiting for the rest of
        the set-up (a restore or a compilation can take minutes, longer than SLURM's grace)."""
        if self.raised and not self._multihost:
            at = f" (the run is at step {step})" if step is not None else ""
            log(f"{self.signal_name} during set-up: nothing new to save{at}; exiting with code "
                 f"{self.exit_code}")
            raise Preempted(-1 if step is None else step, self.exit_code)

    def reached(self, step: int) -> bool:
        if self._multihost:
            from jax.experimental import multihost_utils

            self.raised = self.raised or multihost_utils.reached_preemption_sync_point(step)
        return self.raised

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
