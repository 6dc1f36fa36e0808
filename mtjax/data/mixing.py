"""Mixing rates from the T5 paper (Raffel et al. 2020, §3.5.2), normalized to sum to 1."""

import difflib
import functools
from collections.abc import Iterable, Mapping, Sequence

import seqio
import tensorflow as tf

from mtjax.errors import UserError


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


# --- Strategies selected by name (config data.mixing), and mixtures that compute their rates ---

STRATEGIES = ("mixture", "examples_proportional", "temperature", "equal")


class MixingError(UserError, ValueError):
    """A mixing strategy that cannot be applied as configured; the message says why."""


def num_examples(task: seqio.Task, split: str = "train") -> int | None:
    """Examples in a task's split before preprocessing, or None when the source cannot tell.

    Asks the source (TFDS metadata, a file scan); else uses the cardinality of an in-memory
    source dataset, which is known without reading it. A source that says why it cannot be
    read (a UserError: no file matches, a column not in the header) raises it: taken for an
    unknown size, it became "cannot tell its size, use data.mixing=equal".
    """
    try:
        n = task.num_input_examples(split)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError):  # e.g. TFDS metadata without split sizes
        n = None
    if n is None:
        try:
            cardinality = int(task.source.get_dataset(split=split, shuffle=False).cardinality())
        except UserError:
            raise
        except (KeyError, ValueError, TypeError, tf.errors.OpError):
            return None
        n = cardinality if cardinality >= 0 else None
    return n


def _sizes(names: Iterable[str], split: str, strategy: str, size_of, fix: str) -> dict[str, int]:
    sizes = {name: size_of(name) for name in names}
    unknown = [name for name, n in sizes.items() if n is None]
    if unknown:
        raise MixingError(
            f"mixing {strategy!r} needs the size of every task's {split!r} split, but "
            f"{', '.join(unknown)} cannot tell its size (give its source num_input_examples, "
            f"or {fix})")
    return sizes


def strategy_rates(strategy: str, sizes: Mapping[str, int], *, cap: int | None = None,
                   temperature: float = 2.0) -> dict[str, float]:
    """Normalized rates of `strategy` ("examples_proportional", "temperature", "equal")."""
    if cap is not None and cap <= 0:
        raise MixingError(f"mixing cap K (data.mixing_cap) must be positive, got {cap}")
    if strategy == "equal":
        return equal(sizes)
    if strategy in ("examples_proportional", "temperature") and not any(sizes.values()):
        # Rates would be 0 / 0 (a bare ValueError with a traceback).
        raise MixingError(f"mixing {strategy!r} has no examples to weigh: "
                          + ", ".join(f"{name} has 0 examples" for name in sizes))
    if strategy == "examples_proportional":
        return examples_proportional(sizes, cap if cap is not None else max(sizes.values()))
    if strategy == "temperature":
        if temperature <= 0:
            raise MixingError(
                f"mixing temperature T (data.mixing_temperature) must be > 0, got {temperature}")
        return temperature_scaled(sizes, temperature, cap)
    raise MixingError(f"unknown mixing strategy {strategy!r}; choose one of {STRATEGIES}")


def resolve_rates(mixture: str, strategy: str = "mixture", *, cap: int | None = None,
                  temperature: float = 2.0, split: str = "train") -> dict[str, float]:
    """The normalized rate of every leaf task of `mixture` under a configured strategy.

    Args:
        mixture: a registered mixture or task name.
        strategy: "mixture" keeps the registered rates (mixtures of mixtures flattened);
            the others recompute rates over the leaf tasks from their split sizes.
        cap: K of examples-proportional (and temperature) mixing; None: no cap.
        temperature: T of temperature-scaled mixing.
        split: whose sizes count.

    Returns:
        Task name -> rate, summing to 1, sorted by task name.
    """
    if strategy == "mixture":
        return mixture_rates(mixture)
    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    by_name = {t.name: t for t in tasks}
    if strategy == "equal":  # needs no sizes (a task may not know its own)
        return equal(by_name)
    sizes = _sizes(by_name, split, strategy, lambda n: num_examples(by_name[n], split),
                   fix="use data.mixing=equal or data.mixing=mixture")
    return strategy_rates(strategy, sizes, cap=cap, temperature=temperature)


class StrategyMixture(seqio.Mixture):
    """A seqio Mixture whose members (tasks or mixtures) may have callable rates.

    seqio insists on numbers for sub-mixture rates; this computes them lazily, when the mixture
    is first sampled, so that registering it reads no data.
    """

    def _get_submixture_rate(self, mix: seqio.Mixture) -> float:
        rate = self.rate_per_task_name[mix.name]
        return float(rate(mix) if callable(rate) else rate)


def add_mixture(name: str, members: Sequence[str | tuple[str, float]], *,
                mixing: str = "equal", cap: int | None = None, temperature: float = 2.0,
                split: str = "train") -> seqio.Mixture:
    """Registers a mixture of tasks and/or mixtures with a T5 mixing strategy.

    Args:
        name: the mixture's name.
        members: task or mixture names; with mixing="explicit", (name, weight) pairs.
        mixing: "examples_proportional", "temperature", "equal" or "explicit". A member mixture
            counts as one member whose size is the sum of its tasks' sizes, and keeps its own
            rates inside.
        cap: K, the artificial size limit of examples-proportional and temperature mixing.
        temperature: T of temperature mixing.
        split: whose sizes count.

    Returns:
        The registered mixture (an existing one of that name is replaced).
    """
    for member in members:
        _check_registered(name, member if isinstance(member, str) else member[0])
    if mixing == "explicit":
        if not all(isinstance(m, tuple) for m in members):
            raise MixingError(f"mixture {name!r}: explicit mixing needs (name, weight) pairs")
        pairs = list(members)
    else:
        if mixing not in STRATEGIES[1:]:
            raise MixingError(f"mixture {name!r}: mixing must be one of "
                              f"{(*STRATEGIES[1:], 'explicit')}, got {mixing!r}")
        names = [m if isinstance(m, str) else m[0] for m in members]

        @functools.cache
        def rates() -> dict[str, float]:
            if mixing == "equal":  # needs no sizes (a task may not know its own)
                return equal(names)

            def size(member: str) -> int | None:
                provider = seqio.get_mixture_or_task(member)
                tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
                counts = [num_examples(t, split) for t in tasks]
                return None if None in counts else sum(counts)

            sizes = _sizes(names, split, mixing, size, fix=(
                f"register {name!r} with mixing='equal' or 'explicit' (name, weight) pairs"))
            return strategy_rates(mixing, sizes, cap=cap, temperature=temperature)

        pairs = [(n, lambda provider, n=n: rates()[n]) for n in names]
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, pairs, mixture_cls=StrategyMixture)


def registered_names() -> list[str]:
    """Every registered task and mixture name, sorted."""
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def similar_names(name: str, n: int) -> list[str]:
    """Up to ``n`` registered task or mixture names close to ``name`` (for "did you mean")."""
    return difflib.get_close_matches(name, registered_names(), n=n, cutoff=0.5)


def _check_registered(mixture: str, member: str) -> None:
    """A member must be registered before its mixture: one line with the names it may mean
    (seqio's own error says only "Provider name not registered")."""
    if member in seqio.TaskRegistry.names() or member in seqio.MixtureRegistry.names():
        return
    close = similar_names(member, n=3)
    raise MixingError(
        f"mixture {mixture!r}: no task or mixture {member!r} is registered"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + "; register it before the mixture")


def rates_table(rates: Mapping[str, float], sizes: Mapping[str, int | None] | None = None,
                title: str = "") -> str:
    """A printable table of effective rates, e.g. for the start of a run::

        task                      examples    rate
        mtjax_add                   20,000   16.7%
    """
    sizes = sizes or {}
    width = max([len("task"), *map(len, rates)])
    lines = [title] if title else []
    lines.append(f"{'task':<{width}}  {'examples':>10}  {'rate':>6}")
    for name, rate in rates.items():
        n = sizes.get(name)
        lines.append(f"{name:<{width}}  {'?' if n is None else f'{n:,}':>10}  {rate:>6.1%}")
    return "\n".join(lines)
