"""mtjax's own XLA kernels (C++ through XLA's FFI), compiled on first use and cached on disk.

CPU kernels for x86-64 with AVX-512 or AVX2 + FMA, in one shared library: ``attention_cpu.cc``
(T5 attention, fused) and ``cross_entropy_cpu.cc`` (the token cross-entropy with z-loss, in
place), written once over the 16-float vectors of ``simd.h``. They are built with the system's
C++ compiler against the headers jaxlib ships (``jax.ffi.include_dir()``), so nothing is
downloaded and the package stays pure Python: where no compiler, neither instruction set or no
x86-64 is found, :func:`cpu_kernel_status` says why and mtjax uses its XLA code instead.

The build targets the best instruction set the CPU has (:func:`cpu_kernel_isa`);
``MTJAX_CPU_KERNEL_ISA=avx2`` (or ``avx512``) asks for one, e.g. to test the AVX2 build on an
AVX-512 machine.

The shared library is cached under ``$MTJAX_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/mtjax/kernels``, else ``~/.cache/mtjax/kernels``), named by a hash of the
source, the compiler command and jaxlib's version, and written atomically, so concurrent
processes (multi-host runs on one machine) never load a half-written file; its SHA-256 is kept
beside it and checked before loading, so a damaged file (a disk fault, a copy cut short) is built
again rather than loaded, which would crash the process. A new build removes
the builds no process has used for 30 days (other versions of mtjax, jaxlib or the compiler).
``MTJAX_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from mtjax import outputs
from mtjax.switches import switched_off

_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "attention_cpu.cc", _HERE / "cross_entropy_cpu.cc")
_HEADERS = (_HERE / "cpu_common.h", _HERE / "simd.h")
# Instruction set -> (the /proc/cpuinfo flags it needs, its compiler flags), best first.
# x86-64-v4 is AVX-512 F/BW/CD/DQ/VL; the AVX2 build asks for nothing beyond AVX2 and FMA.
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512dq", "avx512vl"), ("-march=x86-64-v4",)),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
}
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> the library's handler symbol.
TARGETS = {
    "mtjax_attention_cpu_forward": "MtjaxAttentionForward",
    "mtjax_attention_cpu_backward": "MtjaxAttentionBackward",
    "mtjax_cross_entropy_cpu_forward": "MtjaxCrossEntropyForward",
    "mtjax_cross_entropy_cpu_backward": "MtjaxCrossEntropyBackward",
}


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> pathlib.Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MTJAX_KERNEL_CACHE"):
        return pathlib.Path(os.environ["MTJAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mtjax" / "kernels"


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:
        return None


def cpu_kernel_isa() -> tuple[str | None, str]:
    """(the instruction set the kernels are built for here, why none when it is None).

    The best of :data:`ISAS` the CPU has, or the one ``MTJAX_CPU_KERNEL_ISA`` names.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"they need an x86-64 CPU (this is {platform.machine()})"
    wanted = os.environ.get("MTJAX_CPU_KERNEL_ISA", "auto")
    if wanted != "auto" and wanted not in ISAS:
        return None, (f"MTJAX_CPU_KERNEL_ISA={wanted!r} is not one of "
                      f"{', '.join(('auto', *ISAS))}")
    flags = _cpu_flags()
    if flags is None:
        return None, "no /proc/cpuinfo to check the CPU for AVX-512 or AVX2"
    lacking = []
    for isa, (needed, _) in ISAS.items():
        if wanted in ("auto", isa):
            missing = [flag for flag in needed if flag not in flags]
            if not missing:
                return isa, ""
            lacking.append(f"{isa} (no {', '.join(missing)})")
    return None, f"the CPU lacks {' and '.join(lacking)}"


def _library_path(compiler: str, flags: tuple[str, ...], isa: str,
                  include_dir: str) -> pathlib.Path:
    digest = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join((compiler, *flags)).encode())
    digest.update(importlib.metadata.version("jaxlib").encode())
    # The headers' contents, not their path: every virtual environment with the same jaxlib
    # shares one build (a fresh venv would otherwise compile for 10 s again).
    for header in sorted(pathlib.Path(include_dir).rglob("*.h")):
        digest.update(str(header.relative_to(include_dir)).encode())
        digest.update(header.read_bytes())
    return cache_dir() / f"cpu_kernels-{isa}-{digest.hexdigest()[:16]}.so"


def _avx2_can_stand_in(isa: str) -> bool:
    """An AVX-512 build the compiler refused may give way to the AVX2 build: the instruction set
    was picked, not asked for (MTJAX_CPU_KERNEL_ISA), and the CPU has AVX2."""
    flags = _cpu_flags() or set()
    return (isa == "avx512" and os.environ.get("MTJAX_CPU_KERNEL_ISA", "auto") == "auto"
            and all(flag in flags for flag in ISAS["avx2"][0]))


def _refused_path(library: pathlib.Path) -> pathlib.Path:
    """Where a compiler's refusal of a build is kept, so that later starts skip to AVX2."""
    return library.with_name(library.name + ".refused")


def build(compiler: str | None = None, isa: str | None = None) -> pathlib.Path:
    """The kernels' shared library, compiled now unless a cached build exists.

    ``isa``: the instruction set to build for (default: the best the CPU has). A compiler that
    cannot build the AVX-512 one (GCC before 11 has no ``-march=x86-64-v4``) gets the AVX2
    one instead, said once per cache.

    Raises:
        KernelUnavailable: kernels switched off, an unsupported CPU, no compiler, or the
            compiler failed (its output is in the message).
    """
    if switched_off(os.environ, "MTJAX_CPU_KERNELS"):
        raise KernelUnavailable(
            f"switched off by MTJAX_CPU_KERNELS={os.environ['MTJAX_CPU_KERNELS']}")
    if isa is None:
        isa, why_not = cpu_kernel_isa()
        if isa is None:
            raise KernelUnavailable(why_not)
    flags = (*_COMPILE_FLAGS, *ISAS[isa][1])
    compiler = compiler or os.environ.get("CXX") or "c++"
    compiler_command = shlex.split(compiler)  # CXX may carry flags or a wrapper (ccache g++)
    if not compiler_command or shutil.which(compiler_command[0]) is None:
        raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    import jax.ffi  # late: keeps this module importable without initialising JAX

    include_dir = jax.ffi.include_dir()
    target = _library_path(compiler, flags, isa, include_dir)
    if _refused_path(target).exists() and _avx2_can_stand_in(isa):
        return build(compiler, isa="avx2")
    if target.exists():
        if _intact(target):
            _mark_used(target)
            return target
        # Loading a cut-short library kills the process (SIGBUS): build it again instead.
        # (A build from before digests were kept has none: it is rebuilt without a word.)
        if _digest_path(target).exists():
            print(f"mtjax: the cached kernel build {target} is damaged; building it again",
                  file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent} ({e}); set "
                                "MTJAX_KERNEL_CACHE to a writable directory") from e
    os.close(fd)
    # Seconds of silence otherwise, once per machine and mtjax version.
    print(f"mtjax: building its CPU kernels for {isa} into {target.parent} (once)",
          file=sys.stderr, flush=True)
    command = [*compiler_command, *flags, "-isystem", include_dir, *map(str, _SOURCES), "-o",
               partial]
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as e:  # on PATH but not runnable (a wrapper whose interpreter is gone)
            raise KernelUnavailable(f"the C++ compiler {compiler!r} does not run ({e}); set CXX "
                                    f"to one that does") from e
        if result.returncode != 0 and _avx2_can_stand_in(isa):
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
            print(f"mtjax: {compiler} cannot build the AVX-512 kernels ({last}); building the "
                  f"AVX2 ones instead", file=sys.stderr, flush=True)
            if "x86-64-v4" in result.stderr:
                # The compiler refused the target itself ("bad value ('x86-64-v4') for
                # '-march='", "unknown target CPU"): kept. Another failure (killed for memory,
                # a missing header) is not the compiler's answer for good: tried again.
                try:
                    outputs.write_text(_refused_path(target), result.stderr[-2000:],
                                       flag="kernel cache")
                except OSError:  # (only spares later starts the try: the build goes on)
                    pass
            return build(compiler, isa="avx2")
        if result.returncode != 0:
            raise KernelUnavailable(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
        os.chmod(partial, 0o755)  # other users of a shared cache load it too
        _fsync(partial)  # on disk before its name is: a host crash leaves no torn library
        digest = _sha256(pathlib.Path(partial))
        os.replace(partial, target)  # atomic: readers see no file or the whole file
        outputs.write_text(_digest_path(target), digest + "\n", flag="kernel cache")
        os.chmod(_digest_path(target), 0o644)  # as the library: readable by every user
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _prune(target.parent, keep=target)
    return target


def _digest_path(library: pathlib.Path) -> pathlib.Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: pathlib.Path) -> bool:
    """The library is the whole file its build wrote: the digest recorded beside it matches (a
    library without one is a build that did not finish, or an older cache)."""
    try:
        return _digest_path(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Builds unused this long are removed when another is made (other mtjax or jaxlib versions,
# compilers, instruction sets); a build in use is marked at every start (_mark_used).
UNUSED_BUILD_DAYS = 30


def _mark_used(library: pathlib.Path) -> None:
    try:
        os.utime(library)
    except OSError:  # a read-only cache: nothing is pruned from it either
        pass


def _prune(cache: pathlib.Path, keep: pathlib.Path) -> None:
    """Remove mtjax's kernel builds unused for UNUSED_BUILD_DAYS from ``cache``, and partial
    files a killed build left over a day ago; only files named as mtjax names them."""
    now = time.time()
    for pattern, max_age_s in (("cpu_kernels-*.so", UNUSED_BUILD_DAYS * 86400),
                               ("cpu_kernels-*.so.refused", UNUSED_BUILD_DAYS * 86400),
                               ("cpu_kernels-*.partial", 86400)):
        for path in cache.glob(pattern):
            try:
                if path != keep and now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    _digest_path(path).unlink(missing_ok=True)
            except OSError:  # gone already (another process pruned it) or not ours to remove
                pass


@functools.cache
def _load() -> str:
    """Build, load and register the CPU kernels; '' on success, else the reason."""
    path = cache_dir()
    try:
        path = build()
        library = ctypes.CDLL(str(path))
        handlers = {target: getattr(library, symbol) for target, symbol in TARGETS.items()}
    except KernelUnavailable as e:
        return str(e)
    except (OSError, AttributeError) as e:  # a file that does not load, or not this build
        return f"cannot load the built kernel ({e}); remove {path} to rebuild it"
    import jax.ffi

    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return ""


def cpu_kernel_status() -> tuple[bool, str]:
    """(whether the CPU kernels are built and registered, why not when they are not)."""
    reason = _load()
    return not reason, reason


def cpu_kernel_problem() -> str:
    """Why the CPU kernels cannot run in this process ('' when they can): they need the CPU
    backend and a build for this machine (made here on first use). On a mesh of several
    devices the callers split the work themselves (``jax.shard_map``), since XLA cannot split
    an FFI call."""
    import jax

    if jax.default_backend() != "cpu":
        return f"it runs on CPU only (the backend is {jax.default_backend()})"
    return cpu_kernel_status()[1]


def require() -> None:
    """Raises ``KernelUnavailable`` (saying why) unless the CPU kernels are ready."""
    ready, why_not = cpu_kernel_status()
    if not ready:
        raise KernelUnavailable(f"mtjax's CPU kernels are unavailable: {why_not}")
