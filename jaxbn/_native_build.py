"""Builds, caches and registers jaxbn's C++ CPU kernels (`jaxbn/csrc/batch_norm_cpu.cc`).

The kernels are compiled on first use with the machine's C++ compiler against the XLA FFI
headers that ship with jaxlib, and cached, so an install needs no compiler and no build step:
where compiling is impossible (no compiler, a read-only cache, JAXBN_CPU_KERNEL=0) jaxbn uses
its pure-JAX path and `status()` says why.

Environment:
  JAXBN_CPU_KERNEL=0   never build or use the kernels.
  JAXBN_CACHE_DIR      where compiled kernels live (default: $XDG_CACHE_HOME/jaxbn or
                       ~/.cache/jaxbn); one file per source/compiler/jaxlib/CPU combination.
  CXX                  the C++ compiler (default: c++, g++ or clang++ on PATH).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

logger = logging.getLogger("jaxbn")

SOURCE = Path(__file__).parent / "csrc" / "batch_norm_cpu.cc"
# FFI target name -> exported handler symbol in the compiled library.
TARGETS = {
    "jaxbn_moments": "JaxbnMoments",
    "jaxbn_normalize": "JaxbnNormalize",
    "jaxbn_grad_sums": "JaxbnGradSums",
    "jaxbn_grad_input": "JaxbnGradInput",
    "jaxbn_forward": "JaxbnForward",
    "jaxbn_backward": "JaxbnBackward",
}
# -march=native: the library is built on (and cached for) the CPU that runs it.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the CPU kernels are usable in this process, and if not, why."""

  available: bool
  reason: str
  library: Path | None = None


_lock = threading.Lock()
_status: Status | None = None


def status() -> Status:
  """Builds (first call per machine), loads and registers the kernels once per process."""
  global _status
  with _lock:
    if _status is None:
      _status = _load()
    return _status


def _load() -> Status:
  if os.environ.get("JAXBN_CPU_KERNEL", "1") == "0":
    return Status(False, "disabled by JAXBN_CPU_KERNEL=0")
  compiler = shlex.split(os.environ.get("CXX", "")) or next(
      ([c] for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
  if compiler is None:
    return Status(False, "no C++ compiler found (set CXX or install g++)")
  try:
    library = _build(compiler)
    handle = ctypes.CDLL(str(library))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
                                  platform="cpu")
  except (OSError, subprocess.SubprocessError, AttributeError) as e:
    logger.warning("jaxbn: CPU kernels unavailable, using the pure-JAX path: %s", e)
    return Status(False, f"build or load failed: {e}")
  return Status(True, "compiled and registered", library)


def cache_dir() -> Path:
  if "JAXBN_CACHE_DIR" in os.environ:
    return Path(os.environ["JAXBN_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "jaxbn"


def _build(compiler: list[str]) -> Path:
  include = jax.ffi.include_dir()
  command = [*compiler, *FLAGS, f"-I{include}"]
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(command).encode(), _compiler_version(compiler),
               jaxlib.__version__.encode(), platform.machine().encode(), _cpu_flags()):
    key.update(part)
  directory = cache_dir()
  library = directory / f"batch_norm_cpu-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  logger.info("jaxbn: compiling the CPU kernels into %s (once per machine)", library)
  # Compile beside the target and rename: another process never sees a half-written file.
  fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=directory)
  os.close(fd)
  try:
    result = subprocess.run([*command, str(SOURCE), "-o", partial], capture_output=True,
                            text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
      raise subprocess.SubprocessError(
          f"{' '.join(compiler)} exited with {result.returncode}: "
          f"{result.stderr.strip()[-2000:]}")
    os.chmod(partial, 0o755)  # mkstemp made it 0600: a shared cache must be loadable by all
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return library


def _compiler_version(compiler: list[str]) -> bytes:
  return subprocess.run([*compiler, "--version"], capture_output=True, timeout=60,
                        check=False).stdout


def _cpu_flags() -> bytes:
  # -march=native code may not run on another CPU sharing the cache directory.
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line.encode()
  except OSError:
    pass
  return platform.processor().encode()
