"""Makes jaxbn's C++ CPU kernels usable in this process, once: build (`jaxbn._cpu.build`),
load the verified file, register its FFI targets, and say why not where that fails.

Called by the kernel primitive's CPU lowering (`jaxbn._cpu.primitive`), which builds the
kernels on first use, and by `jaxbn.kernels.status()`. Where the kernels cannot be built or
loaded, jaxbn uses its pure-JAX path, `status()` says why, and one WARNING per process names
the reason and the fix. Nothing here raises into `batch_norm`.

Environment:
  JAXBN_CPU_KERNEL       0/false/no/off (any case): never build or use the kernels, without a
                         warning; 1/true/yes/on or unset: use them where they can run. Any other
                         value is warned about and taken as off (the pure-JAX path is always
                         correct).
  (and `jaxbn._cpu.build`'s: JAXBN_CACHE_DIR, JAXBN_COMPILE_TIMEOUT, CXX, JAXBN_CXXFLAGS_EXTRA)
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shlex
import shutil
import threading
from pathlib import Path

import jax

from jaxbn._cpu import build, cache

logger = logging.getLogger("jaxbn")

# FFI target name -> exported handler symbol in the compiled library.
TARGETS = {
    "jaxbn_moments": "JaxbnMoments",
    "jaxbn_normalize": "JaxbnNormalize",
    "jaxbn_grad_sums": "JaxbnGradSums",
    "jaxbn_grad_input": "JaxbnGradInput",
    "jaxbn_forward": "JaxbnForward",
    "jaxbn_backward": "JaxbnBackward",
}

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")
_GENERIC_FIX = ("check the compiler ($CXX) and the cache directory ($JAXBN_CACHE_DIR), then "
                "run `jaxbn kernels` to retry and see the error")


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the CPU kernels are usable in this process, and if not, why."""

  available: bool
  reason: str
  library: Path | None = None


_lock = threading.Lock()
_status: Status | None = None
_loaded_fds: list[int] = []


def status() -> Status:
  """Builds (first call per machine), verifies, loads and registers the kernels once per process.

  Never raises: every failure becomes an unavailable `Status`, decided once per process, so
  each `batch_norm` after it takes the pure-JAX path without retrying the build.
  """
  global _status
  with _lock:
    if _status is None:
      _status = _load()
    return _status


def decided() -> Status | None:
  """The status if this process has decided it, or can without a build (JAXBN_CPU_KERNEL
  says off); None while only a build would tell. Never builds, never raises."""
  if _status is None and os.environ.get("JAXBN_CPU_KERNEL", "").strip().lower() not in _ON:
    return status()  # switched off (or an unknown value, taken as off): no build to wait for
  return _status


def _load() -> Status:
  """One attempt to make the kernels usable; logs a WARNING with the fix if they are not."""
  disabled = _disabled()
  if disabled is not None:
    return Status(False, disabled)
  try:
    compiler = shlex.split(os.environ.get("CXX", "")) or next(
        ([c] for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
      raise build.Unavailable("no C++ compiler found",
                              "install g++ (or clang++), or set CXX to a C++17 compiler")
    library, fd = build.verified_library(compiler)
    try:
      handle = ctypes.CDLL(cache.loader_path(library, fd))
    except BaseException:
      os.close(fd)
      raise
    # Loaded: the descriptor stays open for the life of the process, because the loader knows
    # the library by /proc/self/fd/N and answers a later dlopen of that name with it; while
    # the descriptor is open, no other file can be opened under that number.
    _loaded_fds.append(fd)
    handlers = {target: getattr(handle, symbol) for target, symbol in TARGETS.items()}
    for target, handler in handlers.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  except Exception as e:  # whatever broke (a compiler, a file, a symbol), batch_norm must run
    known = isinstance(e, build.Unavailable)
    reason = str(e) if known else f"build or load failed: {e}"
    fix = e.fix if known else _GENERIC_FIX
    logger.warning(
        "jaxbn: the C++ CPU kernels are unavailable, so batch_norm runs its pure-JAX path "
        "(equal to rounding, up to 1.5-4x slower on CPU): %s. To fix: %s. To choose the pure-JAX "
        "path without this warning: JAXBN_CPU_KERNEL=0.", reason, fix)
    return Status(False, reason)
  return Status(True, "compiled and registered", library)


def _disabled() -> str | None:
  """Why JAXBN_CPU_KERNEL turns the kernels off, or None if it leaves them on."""
  value = os.environ.get("JAXBN_CPU_KERNEL", "")
  word = value.strip().lower()
  if word in _ON:
    return None
  if word in _OFF:
    return f"disabled by JAXBN_CPU_KERNEL={value}"
  # Taken as off: the default is on, so whoever sets the variable most likely means off, and
  # the pure-JAX path is always correct.
  logger.warning("jaxbn: JAXBN_CPU_KERNEL=%r is none of 0/false/no/off or 1/true/yes/on; "
                 "taking it as off (the pure-JAX path)", value)
  return f"disabled by JAXBN_CPU_KERNEL={value!r} (not a known value, taken as off)"
