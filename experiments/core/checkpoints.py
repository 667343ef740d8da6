"""Checkpoints a run can trust: each step folder's SHA-256 digest beside orbax's files, and a
resume from the newest step that restores, with damaged ones set aside, never deleted.

orbax checks its own structure but not the bytes of the arrays (a flipped byte restores as a
wrong value), hence the digest. Called by `train.run_loop`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from experiments.core import distributed, workdir as workdir_lib

DIGEST = "jaxbn.sha256"  # in each step folder: `sha256sum -c` format


def restore_newest(name: str, reporter, manager, checkpoints: pathlib.Path, state):
  """(state, step) from the newest checkpoint that restores; (state, None) when none is saved.

  A checkpoint that fails its digest (`checkpoint_damage`) or orbax's restore is
  skipped; once an older one has restored, process 0 moves each skipped one to
  `checkpoints_damaged/<step>-<reason>` and says so in one line. When none restores, nothing
  is moved and WorkdirError names the folder and the choices.

  Every process tries the same steps newest first, and takes a step only when it restored in
  every process (an all-gather of each try's outcome), so all resume from the same step.
  """
  skipped: list[tuple[int, str, str]] = []
  found = None
  for step in sorted(manager.all_steps(), reverse=True):
    damage = checkpoint_damage(checkpoints / str(step))
    restored = None
    if damage is None:
      restored, damage = _try_restore(checkpoints / str(step), state)
    if distributed.all_agree(damage is None):
      state, found = restored, step
      break
    skipped.append((step, *(damage or ("other-process", "it did not restore in another "
                                                          "process"))))
  if skipped and found is None:
    run_dir = checkpoints.parent
    raise workdir_lib.WorkdirError(
        f"No checkpoint of run {name} restores ("
        + "; ".join(f"step {step}: {detail}" for step, _, detail in skipped)
        + f"), so it cannot resume. Nothing was moved: {checkpoints} is as found. Either move "
        f"that folder aside (e.g. to {run_dir / 'checkpoints_damaged' / 'all'}) and rerun, "
        f"which trains {name} again from step 0; or put back a copy of it that restores; or "
        "choose another --workdir.")
  if skipped:
    if distributed.is_primary():
      for step, reason, detail in skipped:
        moved = set_aside(checkpoints / str(step), reason)
        reporter.log(f"{name}: skipped checkpoint step {step}: {detail}; moved it to "
                         f"{moved}, resuming from step {found}.")
    distributed.barrier(f"{name}: damaged checkpoints set aside")
    manager.reload()  # it listed the steps moved aside
  return state, found


def _try_restore(step_dir: pathlib.Path, state) -> tuple[Any, tuple[str, str] | None]:
  """(restored state, None), or (None, (reason, detail)) when orbax cannot restore the
  checkpoint in `step_dir` (this process's part of it).

  orbax's handler, not the CheckpointManager: the manager's restore ends in a barrier of all
  processes, which a process whose restore failed never reaches; the others would wait
  there while it waits for them in `distributed.all_agree`.

  A damaged checkpoint with a digest never gets here (see `checkpoint_damage`); when
  orbax fails on one without, its reads still in flight may print asyncio's tracebacks
  ("Event loop is closed") after the one line that reports the failure.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    _maybe_fail_restore(int(step_dir.name))
    # "default": where the manager puts its one unnamed item.
    return handler.restore(epath.Path(step_dir / "default"),
                           args=ocp.args.StandardRestore(state)), None
  except Exception as error:  # pylint: disable=broad-except
    return None, ("unreadable", f"orbax cannot restore it: {_first_line(error)}")
  finally:
    handler.close()


def _first_line(error: Exception) -> str:
  """The first line of an error, cut to a line's length: orbax's run to pages."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= 160 else line[:159] + "…"


def _maybe_fail_restore(step: int) -> None:
  """Fault injection for the test that processes resume alike:
  JAXBN_FAULT_RESTORE_FAILS=P:N makes process P's restore of step N fail."""
  spec = os.environ.get("JAXBN_FAULT_RESTORE_FAILS")
  if spec is not None and spec == f"{jax.process_index()}:{step}":
    raise OSError(f"JAXBN_FAULT_RESTORE_FAILS={spec}")


def write_digest(step_dir: pathlib.Path) -> None:
  """Records the SHA-256 of every file in a finished checkpoint's step folder (`DIGEST`)."""
  lines = [f"{_sha256(path)}  {rel}" for rel, path in _files(step_dir)]
  workdir_lib.atomic_write(step_dir / DIGEST, "".join(line + "\n" for line in lines))


def checkpoint_damage(step_dir: pathlib.Path) -> tuple[str, str] | None:
  """Why a checkpoint's step folder cannot be trusted, as (short reason for a folder name,
  one-line detail), or None when it is whole as far as `DIGEST` tells (a folder without one,
  written before digests or killed just before its digest, is left to orbax's checks)."""
  if not any(step_dir.iterdir()):
    return "empty", "its folder is empty"
  try:
    text = (step_dir / DIGEST).read_bytes().decode()
  except FileNotFoundError:
    return None
  except UnicodeDecodeError:
    text = "?"
  listed = [re.fullmatch(r"([0-9a-f]{64})  (.+)", line) for line in text.splitlines()]
  if not listed or not all(listed):
    return "changed-bytes", f"its {DIGEST} is garbled"
  missing, changed = [], []
  for digest, rel in (m.groups() for m in listed):
    path = step_dir / rel
    if not path.is_file():
      missing.append(rel)
    elif _sha256(path) != digest:
      changed.append(rel)
  if missing:
    return "missing-files", f"{workdir_lib.listing(missing)} {'is' if len(missing) == 1 else 'are'} missing"
  if changed:
    return "changed-bytes", f"{workdir_lib.listing(changed)} changed since written"
  return None


def set_aside(step_dir: pathlib.Path, reason: str) -> pathlib.Path:
  """Moves a damaged checkpoint's step folder to ../checkpoints_damaged/<step>-<reason>
  (never deleted: what is in it is the user's to inspect); returns where it went."""
  aside = step_dir.parent.parent / "checkpoints_damaged"
  aside.mkdir(exist_ok=True)
  target, n = aside / f"{step_dir.name}-{reason}", 1
  while target.exists():
    n += 1
    target = aside / f"{step_dir.name}-{reason}-{n}"
  os.replace(step_dir, target)
  return target


def _files(directory: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  return sorted((str(p.relative_to(directory)), p) for p in directory.rglob("*")
                if p.is_file() and p.name != DIGEST and workdir_lib.temporary_target(p.name) != DIGEST)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
