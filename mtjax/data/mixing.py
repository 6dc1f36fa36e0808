"""Mixing rates from the T5 paper (Raffel et al. 2020, §3.5.2), normalized to sum to 1."""

from collections.abc import Iterable, Mapping

import seqio


def _normalize(weights: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"Mixing weights must have a positive sum, got {dict(weights)}")
    return {name: float(w) / total for name, w in weights.items()}


def examples_proportional(num_examples: Mapping[str, int], cap: int) -> dict[str, float]:
    """Examples-proportional mixing: r_m = min(e_m, K) / sum_n min(e_n, K).

    Args:
        num_examples: examples per task, e_m.
        cap: the artificial dataset size limit K.

    Returns:
        Normalized rate per task.
    """
    return _normalize({name: min(n, cap) for name, n in num_examples.items()})


def temperature_scaled(
    num_examples: Mapping[str, int], temperature: float, cap: int | None = None
) -> dict[str, float]:
    """Temperature-scaled mixing: examples-proportional rates raised to 1/T, renormalized.

    T = 1 is examples-proportional; T -> infinity tends to equal mixing.

    Args:
        num_examples: examples per task, e_m.
        temperature: T >= 1 in the paper (any T > 0 is accepted).
        cap: optional K applied before the temperature; None means no cap.

    Returns:
        Normalized rate per task.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    capped = {k: (n if cap is None else min(n, cap)) for k, n in num_examples.items()}
    proportional = _normalize(capped)
    return _normalize({k: r ** (1.0 / temperature) for k, r in proportional.items()})


def equal(task_names: Iterable[str]) -> dict[str, float]:
    """Equal mixing: every task gets the same rate."""
    return _normalize(dict.fromkeys(task_names, 1.0))


def mixture_rates(mixture_name: str) -> dict[str, float]:
    """Normalized sampling rate of every task of a registered mixture (or 1.0 for a task).

    Mixtures of mixtures are flattened: a sub-mixture's rate is shared among its tasks in
    proportion to their rates inside it (seqio's own `Mixture.get_rate`).
    """
    provider = seqio.get_mixture_or_task(mixture_name)
    if isinstance(provider, seqio.Task):
        return {provider.name: 1.0}
    return _normalize({t.name: provider.get_rate(t) for t in provider.tasks})
