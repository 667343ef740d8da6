"""The experiments' workdir, data and checkpoints under faults: workdirs that are not jaxbn's,
runs that diverge at once, configs and data files refused before the workdir is written,
read-only reruns, damaged checkpoints, a second process on a workdir in use.

Most need no training: they call the workdir functions and `registry.validate` directly; two
tiny runs are shared by the rest.
"""

import gzip
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import experiment_configs

from configs import default as default_config
from experiments import registry
from experiments.core import progress
from experiments.core import checkpoints as checkpoints_lib
from experiments.core import config as config_lib
from experiments.core import data as data_lib
from experiments.studies.paper import plots
from experiments.core import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Trains tiny runs and starts processes: outside the fast tier (pytest -m 'not slow').
# The finished run below is a session fixture, computed once per xdist worker that needs it
# (--dist loadgroup would keep this file on one worker; under pytest 9.2 it does not, see
# pyproject.toml: a 10-step run, computed twice).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(name="finished_run")]
ConfigError = config_lib.ConfigError


TINY = {"data.name": "synthetic", "data.num_samples": 64, "batch_size": 8, "num_steps": 10,
        "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 16,
        "model.hidden": (8, 8)}


def _tiny(**overrides):
  """The default config shrunk to one 10-step chunk on synthetic data."""
  return experiment_configs.override(default_config.get_config(), {**TINY, **overrides})


_quiet = experiment_configs.quiet_reporter


def _train(config, workdir, reporter=None, **kwargs):
  # Flax's layers and optax rely on JAX's default promotion (conftest makes it strict).
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    return registry.train_and_evaluate(config, workdir, reporter=reporter or _quiet(), **kwargs)


def _snapshot(directory: pathlib.Path) -> dict:
  """Every entry's identity and modification time: a rewrite (atomic: a new inode) or an
  in-place write changes it."""
  return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*"))}


# The finished run below: one net, two 10-step chunks, a checkpoint after each.
FINISHED = {"variants": ("bn",), "num_steps": 20}


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
  """A real, finished jaxbn workdir and its config and outcome; copy before changing."""
  config = _tiny(**FINISHED)
  workdir = tmp_path_factory.mktemp("finished") / "run"
  outcome = _train(config, workdir)
  return config, workdir, outcome


def _copy(finished, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(finished[1], tmp_path / "copy"))


# ----------------------------------------------------------------------------- item 1


def test_a_folder_jaxbn_did_not_write_is_refused_and_kept(tmp_path):
  thesis = tmp_path / "thesis"
  (thesis / "runs").mkdir(parents=True)
  (thesis / "thesis.tex").write_text("three years of work")
  (thesis / "runs" / "notes.txt").write_text("mine")
  (thesis / "config.json").write_text('{"model": "bert"}')  # JSON, but not jaxbn's
  before = {p: p.read_bytes() for p in thesis.rglob("*") if p.is_file()}
  for overwrite in (True, False):  # writing into someone's folder is refused too
    with pytest.raises(ConfigError, match=rf"{re.escape(str(thesis))} is not empty and is "
                       r"not a jaxbn workdir.*thesis\.tex"):
      _train(_tiny(), thesis, overwrite=overwrite)
  assert {p: p.read_bytes() for p in thesis.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_workdir_is_refused_and_the_current_directory_kept(overwrite, tmp_path,
                                                                    monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "keep.txt").write_text("mine")
  for workdir in ("", "  "):
    with pytest.raises(ConfigError, match="--workdir is empty"):
      _train(_tiny(), workdir, overwrite=overwrite)
  assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _jaxbn_workdir(path: pathlib.Path) -> pathlib.Path:
  """A directory holding only what jaxbn writes (no training needed)."""
  workdir_lib.prepare(path, _tiny(), overwrite=False)
  (path / "runs" / "bn").mkdir(parents=True)
  (path / "runs" / "bn" / "metrics.jsonl").write_text("{}\n")
  return path


@pytest.mark.parametrize("case", ["dot", "cwd", "parent of cwd", "root", "home", "repository"])
def test_overwrite_refuses_directories_no_run_is_worth(case, tmp_path, monkeypatch):
  # A jaxbn workdir (plus .git for the repository): only the protection can refuse it.
  workdir = _jaxbn_workdir(tmp_path / "w")
  argument, reason = {
      "dot": (".", "it is the current directory"),
      "cwd": (str(workdir), "it is the current directory"),
      "parent of cwd": (str(workdir), "it holds the current directory"),
      "root": ("/", "it is the filesystem root"),
      "home": (str(workdir), "it is the home directory"),
      "repository": (str(workdir), "it is the root of a git repository"),
  }[case]
  monkeypatch.chdir({"dot": workdir, "cwd": workdir, "parent of cwd": workdir / "runs"}.get(
      case, tmp_path))
  if case == "home":
    monkeypatch.setenv("HOME", str(workdir))
  if case == "repository":
    (workdir / ".git").mkdir()
  before = _snapshot(workdir)
  # "/" goes to the check alone: were it ever to pass, prepare would start deleting.
  claim = workdir_lib.check if case == "root" else workdir_lib.prepare
  with pytest.raises(ConfigError, match=rf"Refusing --overwrite of {re.escape(argument)}.*"
                     rf"{reason}\. Nothing was deleted"):
    claim(argument, _tiny(seed=1), overwrite=True)
  assert _snapshot(workdir) == before


def test_overwrite_replaces_a_real_jaxbn_workdir_and_only_that(finished, tmp_path):
  assert workdir_lib.foreign_entries(finished[1]) == []  # everything a run writes is known
  other = _tiny(**FINISHED, seed=1)
  # Marked (current) and unmarked (written before the marker existed) workdirs.
  for marked in (True, False):
    workdir = _copy(finished, tmp_path)
    if not marked:
      (workdir / workdir_lib.MARKER).unlink()
    with pytest.raises(ConfigError, match=r"different config \(seed: 0 -> 1\); pass --overwrite"):
      workdir_lib.prepare(workdir, other, overwrite=False)
    workdir_lib.prepare(workdir, other, overwrite=True)
    # The lock file stays: deleting it would let a second process lock a new one.
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK, workdir_lib.MARKER,
                                                         "config.json"]
    assert json.loads((workdir / "config.json").read_text())["seed"] == 1
    shutil.rmtree(workdir)
  # A file of the user's anywhere in it: nothing is deleted.
  workdir = _copy(finished, tmp_path)
  (workdir / "runs" / "bn" / "analysis.ipynb").write_text("mine")
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match=r"Refusing --overwrite .*runs/bn/analysis\.ipynb, "
                     "which jaxbn did not write. Nothing was deleted"):
    workdir_lib.prepare(workdir, other, overwrite=True)
  assert _snapshot(workdir) == before


def test_command_line_refuses_an_empty_workdir_and_deletes_nothing(tmp_path):
  (tmp_path / "thesis.tex").write_text("three years of work")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={ROOT / 'configs/default.py'}",
       "--workdir=", "--overwrite"], cwd=tmp_path, capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""})
  assert result.returncode != 0 and "--workdir is empty" in result.stderr
  assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


# ----------------------------------------------------------------------------- item 2


def test_a_run_that_diverges_before_its_first_evaluation_is_summarized(tmp_path):
  config = _tiny(**{"optimizer.learning_rate": 1e30, "model.activation": "relu"})
  outcome = _train(config, tmp_path / "w")
  for name in ("bn", "plain"):
    result = outcome["results"][name]
    assert result["diverged"] and result["diverged_at"] <= config.eval_every
    assert result["final_test_accuracy"] is None
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["diverged_at"] == {k: r["diverged_at"] for k, r in outcome["results"].items()}
  text = (tmp_path / "w" / "summary.md").read_text()
  assert "before its first evaluation" in text and "| at step " in text
  assert {p.name for p in (tmp_path / "w" / "plots").iterdir()} == {"fig1.png",
                                                                   "saturation.png"}
  again = _train(config, tmp_path / "w")  # rerun: read back, same summary
  assert again["summary"] == outcome["summary"]


def test_runs_evaluated_at_different_steps_are_compared_by_step(tmp_path):
  # plain diverged in its second chunk; bn went on: BN leads from plain's divergence on.
  def evals(steps, accuracy):
    return [{"step": s, "test_accuracy": a, "unit_percentiles": [0.0, 0.1, 0.2],
             "saturated_fraction": [0.0], "grad_norm": [1.0]}
            for s, a in zip(steps, accuracy, strict=True)]
  histories = {"bn": evals([10, 20, 30], [0.2, 0.3, 0.4]), "plain": evals([10], [0.5])}
  results = {"bn": {"diverged": False, "diverged_at": None, "final_test_accuracy": 0.4,
                    "steps_per_second": 1.0, "compile_seconds": 1.0},
             "plain": {"diverged": True, "diverged_at": 12, "final_test_accuracy": None,
                       "steps_per_second": 1.0, "compile_seconds": 1.0}}
  summary = plots.compare_summary(histories, results)
  assert summary["bn_ahead_from_step"] == 20 and summary["diverged_at"]["plain"] == 12
  plots.plot_saturation({"bn": histories["bn"], "plain": []}, tmp_path / "s.png", results)


@pytest.mark.parametrize("key, value", [
    ("optimizer.learning_rate", float("inf")),
    ("optimizer.learning_rate", float("nan")),
    ("optimizer.learning_rate", 1e39),  # finite in float64, inf in float32
    ("optimizer.momentum", float("inf")),
    ("model.init_std", float("nan")),
    ("model.bn_momentum", float("nan")),
    ("diagnostics.saturation", float("inf")),
    ("sweep.learning_rates", (0.1, float("inf"))),
])
def test_non_finite_hyperparameters_are_refused(key, value):
  config = _tiny(study="lr_sweep", **{key: value})
  name = f"{key}[1]" if key == "sweep.learning_rates" else key
  with pytest.raises(ConfigError, match=rf"config\.{re.escape(name)} must be finite"):
    registry.validate(config)


# ----------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("overrides, message", [
    ({"data.num_samples": 1}, r"config\.data\.num_samples \(1\) gives a training split of 1"),
    ({"data.synthetic_shape": (0,)}, r"config\.data\.synthetic_shape must be a tuple of "
                                     r"positive ints"),
    ({"seed": 2**63 - 1}, r"config\.seed must be at most 4294967253"),
    ({"model.name": "cnn", "model.cnn_features": (4,)}, r"'cnn' needs images"),
    ({"model.name": "cnn", "data.synthetic_shape": (2, 2, 1)}, r"at least 4 pixels a side"),
])
def test_configs_that_crashed_after_writing_are_refused_before(overrides, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    _train(_tiny(**overrides), tmp_path / "never")
  assert not (tmp_path / "never").exists()


def test_the_largest_seed_accepted_works_for_every_consumer_and_one_more_does_not():
  registry.validate(_tiny(seed=config_lib.MAX_SEED))
  jax.random.key(config_lib.MAX_SEED + 1)  # the data key
  data_lib._mnist1d(20, config_lib.MAX_SEED)
  with pytest.raises(ValueError, match="Seed must be between 0 and 2"):
    data_lib._mnist1d(20, config_lib.MAX_SEED + 1)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _idx_dataset(directory: pathlib.Path, *, train_labels=100, label=3) -> None:
  files = data_lib.IDX_FILES
  directory.mkdir()
  _write_idx(directory / files["x_train"], np.zeros((100, 4, 4)))
  _write_idx(directory / files["y_train"], np.full(train_labels, label))
  _write_idx(directory / files["x_test"], np.zeros((20, 4, 4)))
  _write_idx(directory / files["y_test"], np.full(20, 1))


def test_idx_files_that_do_not_pair_up_are_refused_naming_both(tmp_path):
  files = data_lib.IDX_FILES
  _idx_dataset(tmp_path / "good")
  good = _tiny(**{"data.name": "mnist", "data.path": str(tmp_path / "good")})
  registry.validate(good)
  dataset = data_lib.load(good.data, 0)
  assert dataset.x_train.shape == (100, 4, 4, 1) and dataset.y_test.shape == (20,)
  _idx_dataset(tmp_path / "short", train_labels=50)
  config = _tiny(**{"data.name": "mnist", "data.path": str(tmp_path / "short")})
  with pytest.raises(ConfigError, match=rf"{files['x_train']} holds 100 images but "
                     rf".*{files['y_train']} holds 50 labels"):
    registry.validate(config)
  _idx_dataset(tmp_path / "label", label=12)
  config = _tiny(**{"data.name": "mnist", "data.path": str(tmp_path / "label")})
  with pytest.raises(ConfigError, match=rf"{files['y_train']} holds label 12; labels must "
                     "be 0 to 9"):
    registry.validate(config)


def test_a_finished_rerun_rewrites_nothing_not_even_an_identical_config(finished, tmp_path):
  config, _, outcome = finished
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  # As root, chmod cannot stop a write; the unchanged inodes and mtimes prove none happened.
  read_only = os.geteuid() != 0
  if read_only:
    subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
  try:
    again = _train(config, workdir)
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)
  assert again["results"] == outcome["results"] and again["summary"] == outcome["summary"]
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------- damaged checkpoints


def _garble(step_dir: pathlib.Path) -> None:
  """Flips one byte in the middle of every data file of the checkpoint (OCDBT's d/ folders)."""
  data = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for path in data:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))


def _empty(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir)
  step_dir.mkdir()


# Damage, the reason in the set-aside folder's name, the skip line's reason.
DAMAGE = {
    "garbled data": (_garble, "changed-bytes", r"default/.* changed since written"),
    "no OCDBT manifest": (lambda d: (d / "default" / "manifest.ocdbt").unlink(), "missing-files",
                          r"default/manifest\.ocdbt is missing"),
    "empty step folder": (_empty, "empty", r"its folder is empty"),
}


def _killed_after_last_checkpoint(finished, tmp_path) -> pathlib.Path:
  """A copy of the finished workdir as a kill after the run's last checkpoint leaves it: no
  result.json, so a rerun restores and trains instead of reading the result back."""
  workdir = _copy(finished, tmp_path)
  (workdir / "runs" / "bn" / "result.json").unlink()
  return workdir


def _files(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
          if p.is_file()}


def _run_finished_config(workdir: pathlib.Path) -> subprocess.CompletedProcess:
  """`experiments.main` with the finished run's config, on `workdir`."""
  settings = {**TINY, **FINISHED}
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
       f"--workdir={workdir}", *(f"--config.{k}={v!r}" if isinstance(v, tuple) else
                                 f"--config.{k}={v}" for k, v in settings.items())],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})


def _without_timing(workdir: pathlib.Path, results: dict) -> tuple:
  """A run's results and metrics without the wall-clock fields, which no two runs share."""
  timing = ("steps_per_second", "compile_seconds")
  records = [{k: v for k, v in r.items() if k not in timing}
             for r in workdir_lib.read_metrics(workdir / "runs" / "bn")]
  return ({name: {k: v for k, v in r.items() if k not in timing} for name, r in results.items()},
          records)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(damage, finished,
                                                                              tmp_path):
  config, original, outcome = finished
  workdir = _killed_after_last_checkpoint(finished, tmp_path)
  checkpoints = workdir / "runs" / "bn" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "20"]  # two are kept
  spoil, reason, why = DAMAGE[damage]
  spoil(checkpoints / "20")
  damaged = _files(checkpoints / "20")
  log = io.StringIO()
  again = _train(config, workdir, reporter=progress.LogReporter(stream=log))
  lines = log.getvalue().splitlines()
  aside = workdir / "runs" / "bn" / "checkpoints_damaged" / f"20-{reason}"
  skips = [line for line in lines if "checkpoint" in line]
  assert len(skips) == 1, lines
  assert re.fullmatch(rf"bn: skipped checkpoint step 20: {why}; moved it to "
                      rf"{re.escape(str(aside.resolve()))}, resuming from step 10\.", skips[0])
  assert "bn: resuming at step 10 (20 steps)" in lines
  # Moved, not deleted: every byte of the damaged checkpoint is where the line says.
  assert _files(aside) == damaged
  # Trained again from step 10: the uninterrupted run's result, exactly.
  assert _without_timing(workdir, again["results"]) == _without_timing(original,
                                                                      outcome["results"])
  assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "20"]
  assert checkpoints_lib.checkpoint_damage(checkpoints / "20") is None
  assert workdir_lib.foreign_entries(workdir) == []  # --overwrite may still replace it


def test_a_checkpoint_without_a_digest_that_orbax_cannot_restore_is_skipped(finished,
                                                                            tmp_path):
  # As one written before digests: orbax's own checks decide. In a process of its own, as
  # orbax's failed reads may print tracebacks after the failure (see checkpoints._try_restore).
  original = finished[1]
  workdir = _killed_after_last_checkpoint(finished, tmp_path)
  step = workdir / "runs" / "bn" / "checkpoints" / "20"
  (step / checkpoints_lib.DIGEST).unlink()
  (step / "default" / "manifest.ocdbt").unlink()
  result = _run_finished_config(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  aside = workdir / "runs" / "bn" / "checkpoints_damaged" / "20-unreadable"
  assert re.search(r"^bn: skipped checkpoint step 20: orbax cannot restore it: NOT_FOUND: .*; "
                   rf"moved it to {re.escape(str(aside.resolve()))}, resuming from step 10\.$",
                   result.stdout, re.MULTILINE), result.stdout
  assert "bn: resuming at step 10 (20 steps)" in result.stdout.splitlines()
  assert (aside / "default").is_dir() and not (aside / "default" / "manifest.ocdbt").exists()
  # Resumed from step 10's checkpoint. (The steps after it differ from the fixture's: its
  # float64 draws other batch indices than the command line's float32.)
  result = json.loads((workdir / "runs" / "bn" / "result.json").read_text())
  assert result["steps"] == 20 and not result["diverged"]
  first = lambda w: _without_timing(w, {})[1][0]
  assert first(workdir) == first(original) and first(workdir)["step"] == 10


def test_when_no_checkpoint_restores_the_run_is_refused_and_nothing_is_moved(finished,
                                                                            tmp_path):
  config = finished[0]
  workdir = _killed_after_last_checkpoint(finished, tmp_path)
  checkpoints = workdir / "runs" / "bn" / "checkpoints"
  (checkpoints / "20" / "default" / "manifest.ocdbt").unlink()
  _empty(checkpoints / "10")
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"No checkpoint of run bn restores \(step 20: default/manifest\.ocdbt "
                           r"is missing; step 10: its folder is empty\).*Nothing was moved: "
                           rf"{re.escape(str(checkpoints.resolve()))} is as found\. Either move "
                           r"that folder aside .* or put back a copy of it that restores; or "
                           r"choose another --workdir\."):
    _train(config, workdir)
  assert _snapshot(workdir) == before
  # The command line says the same in a few lines, with no traceback, and fails.
  result = _run_finished_config(workdir)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "No checkpoint of run bn restores" in result.stderr
  assert len(result.stderr.splitlines()) <= 3, result.stderr
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------------ the workdir lock


def test_a_workdir_in_use_is_refused_at_once_naming_the_process_that_holds_it(finished,
                                                                             tmp_path):
  config = finished[0]
  workdir = _killed_after_last_checkpoint(finished, tmp_path)
  # Another process holding the workdir's lock file as a run does.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\n"
       "fcntl.flock(os.open(sys.argv[1], os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)\n"
       "print('locked', flush=True)\ntime.sleep(300)", str(workdir / workdir_lib.LOCK)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    before = _snapshot(workdir)
    in_use = (rf"{re.escape(str(workdir))} is in use by pid {holder.pid} \(.*python.* -c "
              rf"import fcntl.*\).* Wait for it to end, stop it \(kill {holder.pid}\), or "
              r"choose another --workdir\.")
    with pytest.raises(workdir_lib.WorkdirError, match=in_use):
      _train(config, workdir)
    assert _snapshot(workdir) == before  # refused before any work
    result = _run_finished_config(workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(in_use, result.stderr), result.stderr
    assert _snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  # The kernel drops the lock with its holder, however it died: no stale lock to clear.
  workdir_lib.lock(workdir).release()
  assert _snapshot(workdir) == before
