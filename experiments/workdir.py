"""The workdir: atomic files, metrics as JSONL and CSV, and the saved config.

Every file is written to a temporary name in the same directory and renamed into place, so
a run killed at any moment leaves each file either as it was or complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

from experiments import config as config_lib


def atomic_write(path: pathlib.Path, data: str | bytes) -> None:
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


def prepare(workdir: pathlib.Path, config, *, overwrite: bool) -> None:
  """Claims `workdir` for `config`: a workdir holding another config is refused unless
  `overwrite`; the same config resumes."""
  saved_path = workdir / "config.json"
  if saved_path.exists():
    changed = config_lib.differences(json.loads(saved_path.read_text()), config.to_dict())
    if changed and not overwrite:
      raise config_lib.ConfigError(
          f"{workdir} holds a run of a different config ({'; '.join(changed[:5])}); "
          "pass --overwrite to replace it, or choose another --workdir.")
    if changed:
      shutil.rmtree(workdir)
  elif overwrite and workdir.exists():
    shutil.rmtree(workdir)
  atomic_write(saved_path, config_lib.to_json(config))
