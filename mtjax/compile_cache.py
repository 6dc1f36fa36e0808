"""JAX's persistent compilation cache for mtjax's runs (the ``train.compilation_cache`` key).

A restarted run (after preemption or a crash, or the next run of a sweep with the same shapes)
compiles the same programs again: the t5_1_1_base and t5_1_1_large train steps took 30-70 s
to compile on an H200 (2026-12-04). With the cache a later process loads the executable an
earlier one wrote.

``"auto"`` (the default) caches in ``~/.cache/mtjax/jax`` on GPU and TPU, and not on CPU, where
jax's AOT loader rejects every cached entry on some x86 hosts and logs an error for each
(jax#38445: LLVM tuning attributes taken for missing CPU features); a directory set with JAX's
own ``JAX_COMPILATION_CACHE_DIR`` is kept as it is, on any backend. ``"off"`` disables the cache,
and any other value is a directory (or a ``gs://`` path) to cache in, on any backend.

mtjax's own default directory is bounded to :data:`DEFAULT_MAX_BYTES` (least recently used
entries go first) where the ``filelock`` package that JAX's eviction needs is installed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax

from mtjax.switches import OFF_VALUES

DEFAULT_DIR = pathlib.Path("~/.cache/mtjax/jax")
DEFAULT_MAX_BYTES = 16 * 1024**3
_BACKENDS_BY_DEFAULT = ("gpu", "tpu")
# Ways of saying "off" (they made a directory of that name, and cached there): the switches'
# own, and "none".
OFF_SPELLINGS = (*OFF_VALUES, "none")


@dataclasses.dataclass
class CacheUse:
    """Where the cache is (None: off) and what it did for this process since ``enable``."""

    directory: str | None
    requests: int = 0  # compilations that asked the cache
    hits: int = 0  # ... and were loaded from it
    saved_s: float = 0.0  # compile time the hits saved, as JAX estimates it

    def describe(self) -> str:
        if self.directory is None:
            return "compilation cache off"
        return (f"compilation cache {self.directory}: {self.hits} of {self.requests} "
                f"programs loaded, {self.saved_s:.0f}s of compiling saved")

    def to_json(self) -> dict[str, object]:
        return {"directory": self.directory, "requests": self.requests, "hits": self.hits,
                "compile_s_saved": round(self.saved_s, 2)}


def resolve(setting: str, backend: str, jax_dir: str | None) -> str | None:
    """The directory ``setting`` stands for on ``backend`` (None: no cache).

    Args:
        setting: ``"auto"``, ``"off"`` or a directory.
        backend: ``jax.default_backend()``.
        jax_dir: JAX's own ``jax_compilation_cache_dir`` (set by the user), or None.
    """
    if setting.strip().lower() in OFF_SPELLINGS:
        return None
    if setting != "auto":
        # Absolute: the summary names the directory wherever the run started.
        return setting if "://" in setting else str(pathlib.Path(setting).expanduser().absolute())
    if jax_dir:
        return jax_dir
    if backend in _BACKENDS_BY_DEFAULT:
        return str(DEFAULT_DIR.expanduser())
    return None


_use: CacheUse | None = None
_UNSET = object()
_users_dir: object = _UNSET  # jax_compilation_cache_dir before mtjax first set it


def enable(setting: str) -> CacheUse:
    """Point JAX's persistent cache where ``setting`` says; call before the first compilation.

    Returns the process's :class:`CacheUse`, whose counts grow as later compilations ask the
    cache. Never fails a run: a directory that cannot be created turns the cache off, with a
    warning on stderr.
    """
    global _use, _users_dir
    if _users_dir is _UNSET:
        _users_dir = jax.config.jax_compilation_cache_dir
    directory = resolve(setting, jax.default_backend(), _users_dir)
    if directory is not None and "://" not in directory:
        try:
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):  # else JAX warns at every program
                raise PermissionError("not writable")
        except OSError as e:
            import sys

            print(f"mtjax: warning: compilation cache {directory} unusable ({e}); "
                  "compiling without it", file=sys.stderr)
            directory = None
    # JAX decides once per process whether and where it caches; start that decision afresh.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        if (directory == str(DEFAULT_DIR.expanduser())
                and jax.config.jax_compilation_cache_max_size == -1 and _has_filelock()):
            jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
    if _use is None:
        _listen()
    _use = CacheUse(directory)
    return _use


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def _listen() -> None:
    def on_event(event: str, **kwargs) -> None:
        if _use is None or _use.directory is None:
            return
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            _use.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            _use.hits += 1

    def on_duration(event: str, duration_secs: float, **kwargs) -> None:
        if (_use is not None and _use.directory is not None
                and event == "/jax/compilation_cache/compile_time_saved_sec"):
            _use.saved_s += max(duration_secs, 0.0)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
