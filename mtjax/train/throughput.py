"""Training throughput for metrics.jsonl and summary.json: tokens/s, model FLOP/s and MFU.

Counts come from the compiled step (the global batch's non-padding tokens), so every host logs
the job's own figures. FLOPs are the bench's model FLOPs (``sizes.train_flops_per_step``: the
matmuls of forward and backward at the configured shape, padding included, since the step
computes it; rematerialization's recomputation is not counted, as MFU's definition asks). MFU
divides them by the published peak of the job's chips (``bench.peak.PEAK_TABLE``); on CPU, or a
chip not in the table, there is no agreed peak and rows carry FLOP/s only.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Throughput:
    """Tokens and steps of the timed training steps, per logging window and in all.

    Attributes:
        flops_per_step: model FLOPs of one training step.
        peak_flops_per_s: the whole job's peak (one chip's times the chips), or None.
        first_timed_step: steps before it are not timed (the first step of a process compiles).
    """

    flops_per_step: float
    peak_flops_per_s: float | None
    first_timed_step: int
    _tokens: int = 0
    _steps: int = 0
    _logged_tokens: int = 0
    _logged_steps: int = 0
    _logged_s: float = 0.0

    def add(self, step: int, tokens: int) -> None:
        """Counts a finished step's tokens (a step the first timed step does not reach is not
        counted: its time is not in any window)."""
        if step >= self.first_timed_step:
            self._tokens += int(tokens)
            self._steps += 1

    def close_window(self, elapsed_s: float) -> dict[str, float]:
        """The window's figures (empty when it timed no step), and a new window."""
        figures = {}
        if self._steps:
            elapsed_s = max(elapsed_s, 1e-9)
            figures = self._figures(self._tokens, self._steps, elapsed_s)
            self._logged_tokens += self._tokens
            self._logged_steps += self._steps
            self._logged_s += elapsed_s
        self._tokens, self._steps = 0, 0
        return figures

    def overall(self) -> dict[str, float]:
        """All logged windows together (so a figure of summary.json is its rows' own: their
        token- or step-weighted harmonic mean); empty when none timed a step."""
        if not self._logged_steps:
            return {}
        return self._figures(self._logged_tokens, self._logged_steps, self._logged_s)

    def _figures(self, tokens: int, steps: int, seconds: float) -> dict[str, float]:
        flops_per_s = steps * self.flops_per_step / seconds
        figures = {"tokens_per_s": tokens / seconds, "model_flops_per_s": flops_per_s}
        if self.peak_flops_per_s:
            figures["mfu"] = flops_per_s / self.peak_flops_per_s
        return figures


def job_peak_flops(device_kind: str, platform: str, dtype: str, num_devices: int
                   ) -> float | None:
    """The published peak of ``num_devices`` chips of ``device_kind`` at ``dtype``; None on CPU
    (no agreed peak; ``mtjax bench train`` measures one) and for chips missing from the table."""
    from mtjax.bench import peak

    if platform == "cpu":
        return None
    one = peak.lookup_peak(device_kind, dtype)
    return None if one is None else one * num_devices
