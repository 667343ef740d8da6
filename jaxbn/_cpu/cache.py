"""What in the kernel cache may be loaded: jaxbn's own complete build, only this user's (or
root's), opened once and loaded as that same open file. Called by `jaxbn._cpu.build`.

After a successful compile the library's sha256 and size are written beside it
(`*.so.sha256`), and they are checked before `dlopen`, so a truncated, empty or foreign file
at the cache path is rebuilt (atomically replaced), never loaded. The library is opened once,
checked and hashed through that open file, and handed to the loader as that same file
(`/proc/self/fd/N` on Linux, elsewhere its absolute path), so what loads is what was verified:
neither a file renamed over it after the check nor a library of the same name on
LD_LIBRARY_PATH. The cache directory, the library and its digest must belong to the current
user or root and be writable by no one else, so that no other user of a shared cache can swap
in code this process would run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path

NOT_BUILT = "is not built yet"


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


def loader_path(library: Path, fd: int) -> str:
  """The name to give dlopen for the file open on `fd`: /proc/self/fd/N is that very file
  (the inode whose digest was checked), whatever has been renamed over `library` since."""
  proc = f"/proc/self/fd/{fd}"
  if os.path.exists(proc):
    return proc
  # No /proc: the verified path, absolute, so the loader opens it rather than searching.
  return os.path.abspath(library)


def digest_path(library: Path) -> Path:
  return library.with_name(library.name + ".sha256")


def digest(library: Path, data: bytes) -> bytes:
  """The digest file's contents for `data` built as `library`: sha256, size, name."""
  return f"{hashlib.sha256(data).hexdigest()} {len(data)} {library.name}\n".encode()


def untrusted(path: Path, info: os.stat_result) -> str | None:
  """Why another user could have written `path`, or None if only this user or root could."""
  if not hasattr(os, "getuid"):
    return None
  if info.st_uid not in (os.getuid(), 0):
    return f"{path} belongs to uid {info.st_uid}, neither this user ({os.getuid()}) nor root"
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})"
  return None


def open_verified(library: Path) -> tuple[int | None, str | None]:
  """A descriptor open on `library` if it is jaxbn's own complete build (its digest matches
  the bytes read through that descriptor), else None and why not. Everything is checked on
  the open files, not on paths that could be renamed over between the check and the load."""
  try:
    opened = _open_regular(library)
  except _NotRegular:
    return None, "is not a regular file"
  if opened is None:
    return None, NOT_BUILT
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
  digest_file = digest_path(library)
  try:
    opened = _open_regular(digest_file)
  except _NotRegular:
    return f"is not trusted: its digest {digest_file} is not a regular file"
  if opened is None:
    return "has no digest, so it is not a complete jaxbn build"
  digest_fd, digest_info = opened
  try:
    for path, path_info in ((library, info), (digest_file, digest_info)):
      reason = untrusted(path, path_info)
      if reason:
        return f"is not trusted: {reason}"
    recorded = _read(digest_fd)
  finally:
    os.close(digest_fd)
  fields = recorded.split()
  if len(fields) != 3 or fields[1] != str(info.st_size).encode():
    # Checked before reading: a truncated library is what makes dlopen die of SIGBUS.
    return f"is {info.st_size} bytes, not the size its digest records (truncated or replaced)"
  if digest(library, _read(fd)) != recorded:
    return "does not match its digest (damaged or replaced)"
  return None


def write_atomically(path: Path, data: bytes):
  """Writes `data` to `path` (mode 0o644) through a temporary file renamed over it: a reader
  sees the old file or the new one, never a part."""
  fd, partial = tempfile.mkstemp(prefix=f"{path.name}-", suffix=".partial", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(partial, 0o644)
    os.replace(partial, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)
