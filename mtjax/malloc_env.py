"""Huge pages for the host allocator: the ``mtjax`` command re-executes itself once to get them.

Measured on the 2-core test machine (Zen 5, jaxlib 0.10, peer-shape train step; README
Performance): XLA's CPU runtime allocates the step's temporary buffer (2.2 GiB there) afresh on
every execution. glibc serves an allocation that large with a fresh ``mmap``, so every step
touches 4 KiB pages the kernel must fault in and zero: 730,000 page faults and 1.2 s of kernel time
in a 3.3 s step. glibc's ``glibc.malloc.hugetlb=1`` tunable asks for transparent huge pages on
those mappings (``madvise``), which cut the faults 30-fold and the step to 2.6 s (1.27x); small-K
matmuls such as attention's QK^T, whose large output is written once, ran twice as fast.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so the command line re-executes itself
with it set, before importing JAX. Nothing changes where it would not help (not Linux, glibc
older than 2.35, transparent huge pages ``never`` or already ``always``), where the user set the
tunable or ``MTJAX_HUGEPAGES=0``, or when mtjax is used as a library.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from mtjax.switches import switched_off

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "MTJAX_HUGEPAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def transparent_hugepage_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library, or None when it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    major, _, minor = version.partition(".")
    try:
        return (int(major), int(minor.split(".")[0])) if name == "glibc" else None
    except ValueError:
        return None


def tunables_to_set(env: Mapping[str, str], thp_mode: str | None,
                    glibc: tuple[int, int] | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None to run as is.

    Args:
        env: the process environment.
        thp_mode: :func:`transparent_hugepage_mode`.
        glibc: :func:`glibc_version`.
    """
    if switched_off(env, OPT_OUT) or glibc is None or glibc < _MIN_GLIBC:
        return None
    # "always" already backs large mappings with huge pages; "never" ignores the advice.
    if thp_mode != "madvise":
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:  # the user's choice, or this process was already re-executed
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with the tunable set, where it helps.

    Returns only when nothing is to be done or the exec failed (then the run goes on as is).
    """
    if sys.platform != "linux" or not getattr(sys, "orig_argv", None):
        return
    tunables = tunables_to_set(os.environ, transparent_hugepage_mode(), glibc_version())
    if tunables is None:
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return
