"""The workdir: claimed with a marker, locked while a run uses it, atomic files, metrics as
JSONL and CSV, the config, checkpoint digests.

Every file is written to a temporary name in the same directory and renamed into place, so
a run killed at any moment leaves each file either as it was or complete. A file whose
content would not change is left alone, so re-running a finished run writes nothing.

jaxbn writes only into a new or empty directory, or one it wrote before (marked by
`MARKER`), and `--overwrite` deletes only the entries jaxbn writes — and nothing at all
while anything else is there.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence

from experiments.core import config as config_lib

MARKER = ".jaxbn-workdir"
# Locked (flock) by the process that runs in the workdir; empty, and never deleted: a new file
# in its place would let a second process lock it while the first still holds the old one.
LOCK = ".jaxbn-lock"
MARKER_TEXT = f"""\
A jaxbn experiment workdir (python -m experiments.main).
--overwrite deletes only what jaxbn writes here: config.json, runs/, plots/, summary.json,
summary.md and {MARKER}; it refuses, deleting nothing, while anything else is present.
"""
# What jaxbn writes, by place; atomic_write's temporary files of these may be left by a kill.
TOP_FILES = ("config.json", "summary.json", "summary.md", MARKER, LOCK)
TOP_DIRS = ("runs", "plots")
RUN_FILES = ("metrics.jsonl", "metrics.csv", "result.json")
# orbax's checkpoints (their insides are orbax's to name), and those set aside as damaged.
RUN_DIRS = ("checkpoints", "checkpoints_damaged")
# In each checkpoint's step folder: the SHA-256 of every file orbax wrote there, in
# `sha256sum -c` format. orbax checks its own metadata but not the arrays' bytes: a garbled
# byte in the data restores silently as a wrong number.
# The keys any config.json jaxbn ever wrote holds: a workdir from before the marker existed
# is recognized by them.
CONFIG_KEYS = {"study", "seed", "data", "model", "optimizer"}


class WorkdirError(config_lib.ConfigError):
  """The workdir cannot be used as it stands (held by another process, no checkpoint that
  restores): a short message for the user, not a command-line mistake."""


def atomic_write(path: pathlib.Path, data: str | bytes) -> None:
  """Writes `data` to `path` atomically, unless `path` already holds exactly `data`."""
  if _holds(path, data.encode() if isinstance(data, str) else data):
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for reading
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_metrics(directory: pathlib.Path, records: Sequence[dict]) -> None:
  """metrics.jsonl (one record per line) and metrics.csv (one column per key)."""
  atomic_write(directory / "metrics.jsonl",
               "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
  columns = sorted({k for r in records for k in r})
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=columns)
  writer.writeheader()
  for record in records:
    writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                     for k, v in record.items()})
  atomic_write(directory / "metrics.csv", out.getvalue())


def read_metrics(directory: pathlib.Path) -> list[dict]:
  path = directory / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _holds(path: pathlib.Path, data: bytes) -> bool:
  try:
    return path.stat().st_size == len(data) and path.read_bytes() == data
  except OSError:
    return False


def temporary_target(name: str) -> str | None:
  """The file an atomic_write temporary (`.NAME.XXXXXXXX.tmp`) was to become, else None."""
  match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]+\.tmp", name)
  return match[1] if match else None


def foreign_entries(workdir: pathlib.Path) -> list[str]:
  """Paths under `workdir` (relative; directories end in /) that jaxbn does not write:
  what --overwrite must not delete. Symbolic links are never jaxbn's."""
  found = []

  def scan(directory: pathlib.Path, is_file, is_dir, prefix: str) -> None:
    for entry in sorted(directory.iterdir()):
      name, link = entry.name, entry.is_symlink()
      target = temporary_target(name)
      if not link and entry.is_dir() and is_dir(name):
        continue
      if not link and entry.is_file() and (is_file(name) or target and is_file(target)):
        continue
      found.append(f"{prefix}{name}{'/' if entry.is_dir() else ''}")

  scan(workdir, lambda n: n in TOP_FILES, lambda n: n in TOP_DIRS, "")
  runs, plots = workdir / "runs", workdir / "plots"
  if _is_dir(runs):
    scan(runs, lambda n: False, lambda n: True, "runs/")  # one directory per run
    for run in sorted(runs.iterdir()):
      if _is_dir(run):
        scan(run, lambda n: n in RUN_FILES, lambda n: n in RUN_DIRS, f"runs/{run.name}/")
  if _is_dir(plots):
    scan(plots, lambda n: n.endswith(".png"), lambda n: False, "plots/")
  return found


def _is_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and not path.is_symlink()


def _saved_config(workdir: pathlib.Path) -> dict | None:
  """config.json as a dict if it is one jaxbn wrote; None if absent or not jaxbn's."""
  try:
    saved = json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError):
    return None
  return saved if isinstance(saved, dict) and CONFIG_KEYS <= set(saved) else None


def _show(workdir: pathlib.Path) -> str:
  """The workdir as given, and where it is when that differs."""
  resolved = str(workdir.resolve())
  return f"{workdir}" if str(workdir) == resolved else f"{workdir} ({resolved})"


def listing(entries: Sequence[str]) -> str:
  more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
  return ", ".join(entries[:5]) + more


def _refuse_protected(workdir: pathlib.Path) -> None:
  """--overwrite never touches directories whose loss no run is worth, whatever they hold."""
  resolved = workdir.resolve()
  cwd = pathlib.Path.cwd().resolve()
  source = pathlib.Path(__file__).resolve().parents[1]
  reasons = [
      (resolved == resolved.parent, "it is the filesystem root"),
      (resolved == pathlib.Path.home().resolve(), "it is the home directory"),
      (resolved == cwd, "it is the current directory"),
      (resolved in cwd.parents, "it holds the current directory"),
      ((resolved / ".git").exists(), "it is the root of a git repository"),
      (resolved == source or resolved in source.parents, "it holds jaxbn's own source"),
  ]
  for protected, why in reasons:
    if protected:
      raise config_lib.ConfigError(
          f"Refusing --overwrite of {_show(workdir)}: {why}. Nothing was deleted; name a "
          "workdir of its own (e.g. runs/NAME).")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `prepare` will do with a workdir `check` accepted."""

  workdir: pathlib.Path
  action: str  # "claim" (new or empty), "resume" (same config), "replace" (--overwrite)


def check(workdir: str | os.PathLike, config, *, overwrite: bool) -> Plan:
  """Decides, writing nothing, whether `config` may run in `workdir`; raises ConfigError
  naming the path and the reason otherwise.

  Accepted: a new or empty directory; a jaxbn workdir holding the same config (resume);
  with `overwrite`, a jaxbn workdir holding another config, when it holds nothing jaxbn
  did not write and is not a protected directory (see `_refuse_protected`).
  """
  if not str(workdir).strip():
    raise config_lib.ConfigError(
        "--workdir is empty: name a directory for the run's files (e.g. runs/default); an "
        "empty value would mean the current directory.")
  workdir = pathlib.Path(workdir)
  if overwrite:
    _refuse_protected(workdir)
  if not workdir.exists():
    if workdir.is_symlink():
      raise config_lib.ConfigError(f"--workdir {workdir} is a symbolic link to nothing.")
    return Plan(workdir, "claim")
  if not workdir.is_dir():
    raise config_lib.ConfigError(f"--workdir {_show(workdir)} is not a directory.")
  # The lock file alone is what a claim killed before the marker leaves (see `lock`).
  entries = sorted(e for e in workdir.iterdir() if e.name != LOCK)
  if not entries:
    return Plan(workdir, "claim")
  saved = _saved_config(workdir)
  if saved is None and not (workdir / MARKER).is_file():
    raise config_lib.ConfigError(
        f"{_show(workdir)} is not empty and is not a jaxbn workdir (no {MARKER}, no "
        f"config.json of jaxbn's); it holds {listing([e.name for e in entries])}. jaxbn "
        "writes only into a new or empty directory or one it wrote before, and --overwrite "
        "does not change that: choose another --workdir.")
  if saved is not None:
    changed = config_lib.differences(saved, config.to_dict())
    if not changed:
      return Plan(workdir, "resume")
    why = f"holds a run of a different config ({'; '.join(changed[:5])})"
  else:
    results = [e.name for e in entries
               if e.name != MARKER and temporary_target(e.name) not in TOP_FILES]
    if not results:
      return Plan(workdir, "claim")  # claimed, then killed before config.json was written
    why = f"holds {listing(results)} but no config.json to tell which config they are of"
  if not overwrite:
    raise config_lib.ConfigError(
        f"{_show(workdir)} {why}; pass --overwrite to replace it, or choose another "
        "--workdir.")
  foreign = foreign_entries(workdir)
  if foreign:
    raise config_lib.ConfigError(
        f"Refusing --overwrite of {_show(workdir)}: it {why}, and also "
        f"{listing(foreign)}, which jaxbn did not write. Nothing was deleted; move those "
        "out, or choose another --workdir.")
  return Plan(workdir, "replace")


def prepare(workdir: str | os.PathLike, config, *, overwrite: bool) -> pathlib.Path:
  """Claims `workdir` for `config` as `check` decides; returns it as a path.

  Replacing deletes jaxbn's entries only, config.json last: a kill midway leaves the old
  config in place, so the next run still asks for --overwrite instead of resuming from
  half-deleted results.
  """
  plan = check(workdir, config, overwrite=overwrite)
  if plan.action == "resume":
    return plan.workdir  # nothing written: a finished run re-runs in a read-only workdir
  if plan.action == "replace":
    for name in (*TOP_DIRS, "summary.json", "summary.md", "config.json"):
      path = plan.workdir / name
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink(missing_ok=True)
    for entry in plan.workdir.iterdir():
      if temporary_target(entry.name) in TOP_FILES:
        entry.unlink()
  plan.workdir.mkdir(parents=True, exist_ok=True)
  atomic_write(plan.workdir / MARKER, MARKER_TEXT)
  atomic_write(plan.workdir / "config.json", config_lib.to_json(config))
  return plan.workdir


def claim_outputs(workdir: str | os.PathLike, outputs: Sequence[str], *,
                  tool: str) -> pathlib.Path:
  """The workdir rules for a tool that rewrites a fixed set of files (the benchmark): a new or
  empty directory is claimed with `MARKER`; one claimed before is reused while it holds only
  `outputs` (and their temporary files); anything else is refused, naming what is there,
  before anything is written. Returns the workdir as a path."""
  if not str(workdir).strip():
    raise config_lib.ConfigError(
        "--workdir is empty: name a directory for the files (e.g. runs/benchmark); an empty "
        "value would mean the current directory.")
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise config_lib.ConfigError(f"--workdir {_show(workdir)} is not a directory.")
  mine = {MARKER, LOCK, *outputs}
  entries = sorted(e.name for e in workdir.iterdir()) if workdir.exists() else []
  foreign = [e for e in entries if e not in mine and temporary_target(e) not in mine]
  if foreign or (entries and set(entries) - {LOCK} and MARKER not in entries):
    raise config_lib.ConfigError(
        f"{_show(workdir)} is not empty and not a workdir of this tool's; it holds "
        f"{listing(foreign or entries)}. jaxbn writes only into a new or empty directory or "
        "one it wrote before: choose another --workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  atomic_write(workdir / MARKER, f"A jaxbn workdir of {tool}; it rewrites {', '.join(outputs)}.\n")
  return workdir


# ----------------------------------------------------------------------------- the lock


class Lock:
  """An exclusive flock on the workdir's `LOCK` file, held until `release` or the process
  ends (the kernel drops it however the process dies: no stale lock to clear by hand)."""

  def __init__(self, fd: int | None):
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def lock(workdir: str | os.PathLike) -> Lock:
  """Locks `workdir` for this process, creating it and `LOCK` if need be; raises
  WorkdirError at once, naming the holder, while another process holds it.

  Call it after `check` accepted the workdir (it writes `LOCK` there). A workdir this process
  cannot write is locked only if `LOCK` is already there (a finished run re-run read-only),
  and otherwise not at all: this process cannot change it either.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / LOCK
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    try:
      fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      return Lock(None)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _lock_holder(fd)
    os.close(fd)
    who = (f"pid {holder[0]} ({holder[1]})" if holder else
           "another process (its pid is not known on this machine)")
    kill = f"stop it (kill {holder[0]})" if holder else "stop it"
    raise WorkdirError(
        f"{_show(workdir)} is in use by {who}; two runs in one workdir would overwrite each "
        f"other's checkpoints and metrics. Wait for it to end, {kill}, or choose another "
        "--workdir.") from None
  except OSError as error:
    # A filesystem without locks (NFS without a lock daemon: ENOLCK) runs unlocked:
    # refusing would stop every run there, even the ones nothing else disturbs.
    os.close(fd)
    logging.getLogger(__name__).warning("%s: not locked (%s); nothing stops a second run "
                                        "from using it at the same time.", path, error)
    return Lock(None)
  return Lock(fd)


def _lock_holder(fd: int) -> tuple[int, str] | None:
  """(pid, command line) of the process holding a flock on `fd`'s file, from /proc/locks
  (Linux); None where that is not known. The holder records nothing in the file, so that a
  finished run re-run writes nothing."""
  st = os.fstat(fd)
  # /proc/locks names a file "MAJOR:MINOR:INODE", the device numbers in hex.
  exact = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
  try:
    lines = pathlib.Path("/proc/locks").read_text().splitlines()
  except OSError:
    return None
  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; "1: -> FLOCK ..." is a waiter.
  held = [f for f in (line.split() for line in lines) if len(f) >= 6 and f[1] == "FLOCK"]
  matches = [f for f in held if f[5] == exact]
  if not matches:
    # Where stat's device is not the one locks see (overlay filesystems), the inode alone,
    # if no other file held has it.
    matches = [f for f in held if f[5].rsplit(":", 1)[-1] == str(st.st_ino)]
    if len({f[5] for f in matches}) != 1:
      return None
  pid = int(matches[0][4])
  try:
    # One line however the arguments were spaced: the refusal is one line.
    command = " ".join(pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
                       .decode(errors="replace").replace("\0", " ").split())
  except OSError:
    command = "command not readable"
  return pid, command[:300] + ("…" if len(command) > 300 else "")
