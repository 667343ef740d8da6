"""Builds, verifies, caches and registers jaxbn's C++ CPU kernels (`jaxbn/csrc/batch_norm_cpu.cc`
and the headers beside it).

The kernels are compiled on first use with the machine's C++ compiler against the XLA FFI
headers that ship with jaxlib, and cached, so an install needs no compiler and no build step.
Compiling logs one WARNING line (it takes about 10 s, once per machine). Where the kernels
cannot be built or loaded, jaxbn uses its pure-JAX path, `status()` says why, and one WARNING
per process names the reason and the fix. Nothing here raises into `batch_norm`.

A cached library is loaded only once it is verified as jaxbn's own complete build: after a
successful compile its sha256 and size are written beside it (`*.so.sha256`), and they are
checked before `dlopen`, so a truncated, empty or foreign file at the cache path is rebuilt
(atomically replaced), never loaded. The library is opened once, checked and hashed through
that open file, and handed to the loader as that same file (`/proc/self/fd/N` on Linux,
elsewhere its absolute path), so what loads is what was verified: neither a file renamed over
it after the check nor a library of the same name on LD_LIBRARY_PATH. The cache directory, the
library and its digest must belong to the current user or root and be writable by no one
else, so that no other user of a shared cache can swap in code this process would run: a
library or digest that fails this is rebuilt, a directory that fails it is not used at all.
Directories it creates for the cache are never writable by group or others, whatever the
umask. One process compiles at a time (a lock file in the cache directory); the compiler runs
in its own process group, killed as a group when it overruns the timeout, and a build that
died leaves `*.partial` files that the next build removes.

Environment:
  JAXBN_CPU_KERNEL       0/false/no/off (any case): never build or use the kernels, without a
                         warning; 1/true/yes/on or unset: use them where they can run. Any other
                         value is warned about and taken as off (the pure-JAX path is always
                         correct).
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
import ctypes
import dataclasses
import errno
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jaxlib

try:
  import fcntl
except ImportError:  # Windows: no inter-process lock; the atomic renames still hold
  fcntl = None

logger = logging.getLogger("jaxbn")

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "batch_norm_cpu.cc"  # the one translation unit; its headers sit beside it
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
# A build takes about 10 s on two cores; a compiler still running after two minutes is stuck.
DEFAULT_COMPILE_TIMEOUT_S = 120.0
LOCK_FILE = ".build.lock"

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")
_NOT_BUILT = "is not built yet"
_GENERIC_FIX = ("check the compiler ($CXX) and the cache directory ($JAXBN_CACHE_DIR), then "
                "run `jaxbn kernels` to retry and see the error")


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the CPU kernels are usable in this process, and if not, why."""

  available: bool
  reason: str
  library: Path | None = None


class _Unavailable(Exception):
  """A failure whose fix is known: the message is the reason, `fix` what the user can do."""

  def __init__(self, reason: str, fix: str):
    super().__init__(reason)
    self.fix = fix


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
      raise _Unavailable("no C++ compiler found",
                         "install g++ (or clang++), or set CXX to a C++17 compiler")
    library, fd = _build(compiler)
    try:
      handle = ctypes.CDLL(_loader_path(library, fd))
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
    known = isinstance(e, _Unavailable)
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


def _build(compiler: list[str]) -> tuple[Path, int]:
  """The verified library for this compiler, compiled first if the cache lacks a good one,
  and a descriptor open on exactly the file that was verified, which the caller owns."""
  timeout = _compile_timeout()
  command, library = _cache_path(compiler, timeout)
  directory = library.parent
  _make_directories(directory)
  untrusted = _untrusted(directory, os.stat(directory))
  if untrusted:
    raise _Unavailable(f"cache directory {untrusted}",
                       "set JAXBN_CACHE_DIR to a directory only you can write, or "
                       f"`chmod go-w {directory}`")
  fd, problem = _open_verified(library)
  if fd is not None:
    return library, fd
  with _build_lock(directory, timeout):
    fd, problem = _open_verified(library)  # another process may have built it meanwhile
    if fd is not None:
      return library, fd
    _remove_stale_partials(directory, timeout)
    logger.warning("jaxbn: compiling the CPU kernels once per machine (about 10 s) into %s%s",
                   library, "" if problem == _NOT_BUILT else f"; the cached copy {problem}")
    _compile(compiler, command, library, timeout)
    fd, problem = _open_verified(library)  # what loads is checked, even just after the build
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


class _NotRegular(Exception):
  """The path is a symlink, a directory, a FIFO or a device, not a regular file."""


# A FIFO or device planted at the cache path must not block the open; a symlink is refused.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_BINARY", 0))


def _open_regular(path: Path) -> tuple[int, os.stat_result] | None:
  """An open descriptor on `path` and its stat, or None where `path` is missing; raises
  _NotRegular where it is a symlink or not a regular file."""
  try:
    fd = os.open(path, _OPEN_FLAGS)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
      raise _NotRegular from None
    raise
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode):
    os.close(fd)
    raise _NotRegular
  return fd, info


def _read(fd: int) -> bytes:
  with open(fd, "rb", closefd=False) as f:
    return f.read()


def _loader_path(library: Path, fd: int) -> str:
  """The name to give dlopen for the file open on `fd`: /proc/self/fd/N is that very file
  (the inode whose digest was checked), whatever has been renamed over `library` since."""
  proc = f"/proc/self/fd/{fd}"
  if os.path.exists(proc):
    return proc
  # No /proc: the verified path, absolute, so the loader opens it rather than searching.
  return os.path.abspath(library)


def _digest_path(library: Path) -> Path:
  return library.with_name(library.name + ".sha256")


def _digest(library: Path, data: bytes) -> bytes:
  return f"{hashlib.sha256(data).hexdigest()} {len(data)} {library.name}\n".encode()


def _untrusted(path: Path, info: os.stat_result) -> str | None:
  """Why another user could have written `path`, or None if only this user or root could."""
  if not hasattr(os, "getuid"):
    return None
  if info.st_uid not in (os.getuid(), 0):
    return f"{path} belongs to uid {info.st_uid}, neither this user ({os.getuid()}) nor root"
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})"
  return None


def _open_verified(library: Path) -> tuple[int | None, str | None]:
  """A descriptor open on `library` if it is jaxbn's own complete build (its digest matches
  the bytes read through that descriptor), else None and why not. Everything is checked on
  the open files, not on paths that could be renamed over between the check and the load."""
  try:
    opened = _open_regular(library)
  except _NotRegular:
    return None, "is not a regular file"
  if opened is None:
    return None, _NOT_BUILT
  fd, info = opened
  try:
    problem = _verify(library, fd, info)
  except BaseException:
    os.close(fd)
    raise
  if problem is not None:
    os.close(fd)
    return None, problem
  return fd, None


def _verify(library: Path, fd: int, info: os.stat_result) -> str | None:
  """None if the library open on `fd` is jaxbn's own complete build, else why not."""
  digest = _digest_path(library)
  try:
    opened = _open_regular(digest)
  except _NotRegular:
    return f"is not trusted: its digest {digest} is not a regular file"
  if opened is None:
    return "has no digest, so it is not a complete jaxbn build"
  digest_fd, digest_info = opened
  try:
    for path, path_info in ((library, info), (digest, digest_info)):
      untrusted = _untrusted(path, path_info)
      if untrusted:
        return f"is not trusted: {untrusted}"
    recorded = _read(digest_fd)
  finally:
    os.close(digest_fd)
  fields = recorded.split()
  if len(fields) != 3 or fields[1] != str(info.st_size).encode():
    # Checked before reading: a truncated library is what makes dlopen die of SIGBUS.
    return f"is {info.st_size} bytes, not the size its digest records (truncated or replaced)"
  if _digest(library, _read(fd)) != recorded:
    return "does not match its digest (damaged or replaced)"
  return None


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
          raise _Unavailable(
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
    _write_atomically(_digest_path(library), _digest(library, data))
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)


def _write_atomically(path: Path, data: bytes):
  fd, partial = tempfile.mkstemp(prefix=f"{path.name}-", suffix=".partial", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(partial, 0o644)
    os.replace(partial, path)
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
    raise _Unavailable(
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
