"""The on/off environment switches (``MTJAX_CPU_KERNELS``, ``MTJAX_HUGEPAGES``,
``MTJAX_XLA_DEFAULTS``): each is on unless set to an off spelling. Only ``0`` was read as off,
so ``MTJAX_CPU_KERNELS=false`` left the kernels on without a word. Imported before JAX starts:
nothing heavy here."""

from __future__ import annotations

from collections.abc import Mapping

OFF_VALUES = ("0", "false", "no", "off")


def switched_off(env: Mapping[str, str], name: str) -> bool:
    """Whether ``env[name]`` turns the switch off (``0``, ``false``, ``no``, ``off``, any case)."""
    return env.get(name, "").strip().lower() in OFF_VALUES
