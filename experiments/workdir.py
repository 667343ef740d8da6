"""The workdir: claimed with a marker, atomic files, metrics as JSONL and CSV, the config.

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
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence

from experiments import config as config_lib

MARKER = ".jaxbn-workdir"
MARKER_TEXT = f"""\
A jaxbn experiment workdir (python -m experiments.main).
--overwrite deletes only what jaxbn writes here: config.json, runs/, plots/, summary.json,
summary.md and {MARKER}; it refuses, deleting nothing, while anything else is present.
"""
# What jaxbn writes, by place; atomic_write's temporary files of these may be left by a kill.
TOP_FILES = ("config.json", "summary.json", "summary.md", MARKER)
TOP_DIRS = ("runs", "plots")
RUN_FILES = ("metrics.jsonl", "metrics.csv", "result.json")
RUN_DIRS = ("checkpoints",)  # orbax's; its insides are orbax's to name
# The keys any config.json jaxbn ever wrote holds: a workdir from before the marker existed
# is recognized by them.
CONFIG_KEYS = {"study", "seed", "data", "model", "optimizer"}


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


def _temporary_target(name: str) -> str | None:
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
      target = _temporary_target(name)
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


def _listing(entries: Sequence[str]) -> str:
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
  entries = sorted(workdir.iterdir())
  if not entries:
    return Plan(workdir, "claim")
  saved = _saved_config(workdir)
  if saved is None and not (workdir / MARKER).is_file():
    raise config_lib.ConfigError(
        f"{_show(workdir)} is not empty and is not a jaxbn workdir (no {MARKER}, no "
        f"config.json of jaxbn's); it holds {_listing([e.name for e in entries])}. jaxbn "
        "writes only into a new or empty directory or one it wrote before, and --overwrite "
        "does not change that: choose another --workdir.")
  if saved is not None:
    changed = config_lib.differences(saved, config.to_dict())
    if not changed:
      return Plan(workdir, "resume")
    why = f"holds a run of a different config ({'; '.join(changed[:5])})"
  else:
    results = [e.name for e in entries
               if e.name != MARKER and _temporary_target(e.name) not in TOP_FILES]
    if not results:
      return Plan(workdir, "claim")  # claimed, then killed before config.json was written
    why = f"holds {_listing(results)} but no config.json to tell which config they are of"
  if not overwrite:
    raise config_lib.ConfigError(
        f"{_show(workdir)} {why}; pass --overwrite to replace it, or choose another "
        "--workdir.")
  foreign = foreign_entries(workdir)
  if foreign:
    raise config_lib.ConfigError(
        f"Refusing --overwrite of {_show(workdir)}: it {why}, and also "
        f"{_listing(foreign)}, which jaxbn did not write. Nothing was deleted; move those "
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
      if _temporary_target(entry.name) in TOP_FILES:
        entry.unlink()
  plan.workdir.mkdir(parents=True, exist_ok=True)
  atomic_write(plan.workdir / MARKER, MARKER_TEXT)
  atomic_write(plan.workdir / "config.json", config_lib.to_json(config))
  return plan.workdir
