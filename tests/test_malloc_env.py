"""The command line's re-exec for huge pages: when it applies, and that it cuts page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtjax import cli, malloc_env

MADVISE_GLIBC = (2, 36)


@pytest.mark.parametrize("env, thp, glibc, expected", [
    ({}, "madvise", MADVISE_GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", MADVISE_GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", MADVISE_GLIBC, None),  # user's
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", MADVISE_GLIBC, None),  # re-exec'd
    ({"MTJAX_HUGEPAGES": "0"}, "madvise", MADVISE_GLIBC, None),  # opted out
    ({}, "always", MADVISE_GLIBC, None),  # the kernel already does it
    ({}, "never", MADVISE_GLIBC, None),  # the kernel ignores the advice
    ({}, None, MADVISE_GLIBC, None),  # no THP (not Linux, or no sysfs)
    ({}, "madvise", (2, 34), None),  # glibc without the tunable
    ({}, "madvise", None, None),  # musl and others
])
def test_tunables_to_set(env, thp, glibc, expected):
    assert malloc_env.tunables_to_set(env, thp, glibc) == expected


def test_transparent_hugepage_mode_parses_sysfs(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert malloc_env.transparent_hugepage_mode(str(path)) == "madvise"
    assert malloc_env.transparent_hugepage_mode(str(tmp_path / "missing")) is None


# Re-executes itself through malloc_env, then reports the tunable in force and the page faults
# that touching a fresh 512 MiB allocation costs.
_CHILD = """
import ctypes, json, os, resource, sys
from mtjax import malloc_env
malloc_env.reexec_with_hugepages()
libc = ctypes.CDLL(None)  # glibc's malloc itself: numpy would madvise huge pages on its own
libc.malloc.restype = ctypes.c_void_p
size = 512 * 2**20  # malloc serves this with a fresh mmap, as XLA's temp buffer is served
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _child(**env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MTJAX_HUGEPAGES")}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    malloc_env.tunables_to_set({}, malloc_env.transparent_hugepage_mode(),
                               malloc_env.glibc_version()) is None,
    reason="huge pages by madvise unavailable here (not Linux/glibc >= 2.35/THP madvise)")
def test_reexec_sets_the_tunable_and_cuts_page_faults():
    with_hugepages = _child()
    opted_out = _child(MTJAX_HUGEPAGES="0")
    assert with_hugepages["tunables"] == "glibc.malloc.hugetlb=1"
    assert opted_out["tunables"] == ""
    # 4 KiB pages: one fault per page (131,072); 2 MiB pages: a few hundred at most. Allow for
    # huge pages the kernel could not find (fragmented memory) with a 10x margin.
    assert opted_out["faults"] >= 100_000, opted_out
    assert with_hugepages["faults"] * 10 < opted_out["faults"], (with_hugepages, opted_out)


def test_only_a_real_command_line_reexecs(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc_env, "reexec_with_hugepages", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["mtjax", "bench", "--help"])
    with pytest.raises(SystemExit):
        cli.main()  # argv from the command line: this process is the command's
    assert calls == [True]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])  # called from Python: the caller's process is left alone
    assert calls == [True]
