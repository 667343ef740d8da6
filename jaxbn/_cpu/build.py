"""Compiles jaxbn's C++ CPU kernels (`jaxbn/csrc/batch_norm_cpu.cc` and the headers beside it)
into the cache, and hands back the verified library. Called by `jaxbn._cpu.library`.

The kernels are compiled on first use with the machine's C++ compiler against the XLA FFI
headers that ship with jaxlib, and cached, so an install needs no compiler and no build step.
Compiling logs one WARNING line (it takes about 10 s, once per machine). What in the cache may
be loaded is `jaxbn._cpu.cache`'s to decide: a library that fails its checks is rebuilt, a
cache directory that fails them is not used at all. Directories created for the cache are
never writable by group or others, whatever the umask. One process compiles at a time (a lock
file in the cache directory); the compiler runs in its own process group, killed as a group
when it overruns the timeout, and a build that died leaves `*.partial` files that the next
build removes.

Environment:
  JAXBN_CACHE_DIR        where compiled kernels live (default: $XDG_CACHE_HOME/jaxbn or
                         ~/.cache/jaxbn); one file per source/compiler/jaxlib/CPU combination.
                         A relative path is taken from the working directory at the first
                         `batch_norm`; an empty value means unset (the default). A relative
                         XDG_CACHE_HOME is ignored, as the XDG spec says.
  JAXBN_COMPILE_TIMEOUT  seconds the compiler may run before it is killed (default 120); also
                         bounds the wait for another process's build.
  CXX                    the C++ compiler (default: c++, g++ or clang++ on PATH).
  JAXBN_CXXFLAGS_EXTRA   flags appended to the compile command, e.g. sanitizers (they are part
                         of the cache key).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jaxlib

from jaxbn._cpu import cache

try:
  import fcntl
except ImportError:  # Windows: no inter-process lock; the atomic renames still hold
  fcntl = None

logger = logging.getLogger("jaxbn")

CSRC = Path(__file__).parent.parent / "csrc"
SOURCE = CSRC / "batch_norm_cpu.cc"  # the one translation unit; its headers sit beside it
# -march=native: the library is built on (and cached for) the CPU that runs it.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# A build takes about 10 s on two cores; a compiler still running after two minutes is stuck.
DEFAULT_COMPILE_TIMEOUT_S = 120.0
LOCK_FILE = ".build.lock"


class Unavailable(Exception):
  """A failure whose fix is known: the message is the reason, `fix` what the user can do."""

  def __init__(self, reason: str, fix: str):
    super().__init__(reason)
    self.fix = fix


def cache_dir() -> Path:
  """The cache directory, always absolute: a bare file name would send `dlopen` searching
  LD_LIBRARY_PATH and the loader's cache for a library of that name instead of this file."""
  # Empty means unset, as for XDG_CACHE_HOME: `JAXBN_CACHE_DIR=` in a shell or a CI matrix
  # most likely means "no override", and the cwd is no place to run code from by accident.
  directory = os.environ.get("JAXBN_CACHE_DIR")
  if not directory:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    directory = base / "jaxbn"
  return Path(os.path.abspath(directory))


def _compile_timeout() -> float:
  """JAXBN_COMPILE_TIMEOUT in seconds, or the default (with a warning) if it is not one."""
  value = os.environ.get("JAXBN_COMPILE_TIMEOUT", "")
  if not value.strip():
    return DEFAULT_COMPILE_TIMEOUT_S
  try:
    seconds = float(value)
  except ValueError:
    seconds = math.nan
  if not 0 < seconds < math.inf:
    logger.warning("jaxbn: JAXBN_COMPILE_TIMEOUT=%r is not a positive number of seconds; "
                   "using %g", value, DEFAULT_COMPILE_TIMEOUT_S)
    return DEFAULT_COMPILE_TIMEOUT_S
  return seconds


def _cache_path(compiler: list[str], timeout: float) -> tuple[list[str], Path]:
  """The compile command (without source and output) and the library it caches to."""
  extra = shlex.split(os.environ.get("JAXBN_CXXFLAGS_EXTRA", ""))
  command = [*compiler, *FLAGS, *extra, f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256()
  for part in (_sources_digest(), " ".join(command).encode(),
               _compiler_version(compiler, timeout), jaxlib.__version__.encode(),
               platform.machine().encode(), _cpu_flags()):
    key.update(part)
  return command, cache_dir() / f"batch_norm_cpu-{key.hexdigest()[:16]}.so"


def _sources_digest() -> bytes:
  """Every file the compile reads from csrc, by name and content: a header edit rebuilds.
  (`#include "x.h"` finds the headers beside SOURCE without an -I.)"""
  digest = hashlib.sha256()
  for path in sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h")]):
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
  return digest.digest()


def verified_library(compiler: list[str]) -> tuple[Path, int]:
  """The verified library for this compiler, compiled first if the cache lacks a good one,
  and a descriptor open on exactly the file that was verified, which the caller owns."""
  timeout = _compile_timeout()
  command, library = _cache_path(compiler, timeout)
  directory = library.parent
  _make_directories(directory)
  untrusted = cache.untrusted(directory, os.stat(directory))
  if untrusted:
    raise Unavailable(f"cache directory {untrusted}",
                      "set JAXBN_CACHE_DIR to a directory only you can write, or "
                      f"`chmod go-w {directory}`")
  fd, problem = cache.open_verified(library)
  if fd is not None:
    return library, fd
  with _build_lock(directory, timeout):
    fd, problem = cache.open_verified(library)  # another process may have built it meanwhile
    if fd is not None:
      return library, fd
    _remove_stale_partials(directory, timeout)
    logger.warning("jaxbn: compiling the CPU kernels once per machine (about 10 s) into %s%s",
                   library, "" if problem == cache.NOT_BUILT else f"; the cached copy {problem}")
    _compile(compiler, command, library, timeout)
    fd, problem = cache.open_verified(library)  # what loads is checked, even after a build
  if fd is None:
    raise RuntimeError(f"the library just built at {library} {problem}")
  return library, fd


def _make_directories(directory: Path):
  """Creates `directory` and its missing parents with mode 0o755: Path.mkdir(parents=True)
  makes the parents 0o777 less the umask, writable by everyone under umask 000. The mode given
  to mkdir is an upper bound (the umask or a default ACL only narrow it)."""
  try:
    os.mkdir(directory, 0o755)
  except FileExistsError:
    return
  except FileNotFoundError:
    if directory.parent == directory:
      raise
    _make_directories(directory.parent)
    with contextlib.suppress(FileExistsError):  # another process may have made it meanwhile
      os.mkdir(directory, 0o755)


@contextlib.contextmanager
def _build_lock(directory: Path, timeout: float):
  """One compile at a time across processes; waits about as long as one compile may take."""
  if fcntl is None:
    yield
    return
  fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    wait = timeout + 10
    deadline = time.monotonic() + wait
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise Unavailable(
              f"another process has held the build lock {directory / LOCK_FILE} for more "
              f"than {wait:g} s", "wait for that build to finish, or stop it") from None
        time.sleep(0.1)
    yield
  finally:
    os.close(fd)  # releases the lock


def _remove_stale_partials(directory: Path, timeout: float):
  """Removes what builds that died (killed, out of power) left behind, once it is old enough
  that no live build can still be writing it."""
  cutoff = time.time() - timeout
  for path in directory.glob("*.partial"):
    with contextlib.suppress(OSError):
      if path.lstat().st_mtime < cutoff:
        path.unlink()


def _compile(compiler: list[str], command: list[str], library: Path, timeout: float):
  """Compiles into a temporary file and publishes it with its digest, atomically."""
  directory = library.parent
  fd, partial = tempfile.mkstemp(prefix=f"{library.stem}-", suffix=".so.partial", dir=directory)
  os.close(fd)
  try:
    returncode, _, stderr = _run([*command, str(SOURCE), "-o", partial], timeout)
    if returncode != 0:
      # Diagnostics come in the locale's encoding (Latin-1, say), not necessarily UTF-8.
      diagnostics = stderr.decode("utf-8", errors="replace").strip()[-2000:]
      raise RuntimeError(f"{shlex.join(compiler)} exited with {returncode}: {diagnostics}")
    data = Path(partial).read_bytes()
    if not data or (sys.platform.startswith("linux") and not data.startswith(b"\x7fELF")):
      raise RuntimeError(f"{shlex.join(compiler)} exited with 0 but wrote "
                         f"{'nothing' if not data else 'no shared library'} to {partial}")
    os.chmod(partial, 0o755)  # mkstemp made it 0600: a shared cache must be loadable by all
    # Library first, digest last: until the digest is written, readers see an unverified
    # library and wait for the build lock instead of loading it.
    os.replace(partial, library)
    cache.write_atomically(cache.digest_path(library), cache.digest(library, data))
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)


def _run(command: list[str], timeout: float) -> tuple[int, bytes, bytes]:
  """Runs `command` in its own process group, killing the whole group if it overruns
  `timeout` or this process is interrupted: no compiler (or its children) outlives a build."""
  process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    _kill_group(process)
    raise Unavailable(
        f"the compiler {shlex.join(command[:1])} ran for more than {timeout:g} s and was killed",
        "raise JAXBN_COMPILE_TIMEOUT (seconds), or build ahead of time with `jaxbn kernels`"
    ) from None
  except BaseException:
    _kill_group(process)
    raise
  return process.returncode, stdout, stderr


def _kill_group(process: subprocess.Popen):
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (AttributeError, OSError):  # no process groups (Windows), or the group is gone
    process.kill()
  process.wait()
  for pipe in (process.stdout, process.stderr):
    pipe.close()


def _compiler_version(compiler: list[str], timeout: float) -> bytes:
  return _run([*compiler, "--version"], timeout)[1]


def _cpu_flags() -> bytes:
  # -march=native code may not run on another CPU sharing the cache directory.
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line.encode()
  except OSError:
    pass
  return platform.processor().encode()
