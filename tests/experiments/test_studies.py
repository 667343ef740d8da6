"""experiments: tiny versions of every config, kill-and-resume, workdir rules, bad configs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import experiment_configs

from experiments import registry
from experiments.core import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Trains tiny runs and starts processes: outside the fast tier (pytest -m 'not slow').
# Flax's layers and optax rely on JAX's default promotion, which users run with.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]
CONFIGS = ("default", "paper_fig1", "lr_sweep", "gradient_agreement", "saturation", "cnn",
           "mnist1d_mlp")
# Synthetic data, a few steps: what the tests change in every config.
TINY = {
    "data.name": "synthetic", "data.num_samples": 256, "batch_size": 16, "num_steps": 20,
    "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 32,
}


def _load(name: str, **overrides):
  config = experiment_configs.load(name, {**TINY, **overrides})
  if config.model.name == "cnn":
    config.data.synthetic_shape = (8, 8, 1)
  else:
    config.model.hidden = tuple(16 for _ in config.model.hidden)
  return config


_quiet = experiment_configs.quiet_reporter


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_tiny(name, tmp_path):
  overrides = {"sweep.learning_rates": (0.1, 3e38)} if name == "lr_sweep" else {}
  config = _load(name, **overrides)
  outcome = registry.train_and_evaluate(config, tmp_path, reporter=_quiet())
  assert (tmp_path / "config.json").exists() and (tmp_path / "summary.md").exists()
  assert json.loads((tmp_path / "config.json").read_text())["study"] == config.study
  assert list((tmp_path / "plots").glob("*.png"))
  for run in outcome["results"]:
    run_dir = tmp_path / "runs" / run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and (run_dir / "metrics.csv").read_text().count("\n") == len(records) + 1
    assert (run_dir / "checkpoints").is_dir()
  assert not list(tmp_path.rglob("*.tmp"))
  if name == "lr_sweep":
    # A diverged run is a result: the sweep went on and reports it.
    results = outcome["results"]
    assert results["plain_lr3e+38"]["diverged"] and not results["bn_lr0.1"]["diverged"]
    assert "diverged" in (tmp_path / "summary.md").read_text()
  if name == "gradient_agreement":
    assert outcome["summary"]["max_rel_grad_diff"] <= 1e-4


def test_same_seed_same_metrics_and_rerun_resumes(tmp_path):
  config = _load("default")
  first = registry.train_and_evaluate(config, tmp_path / "a", reporter=_quiet())
  second = registry.train_and_evaluate(config, tmp_path / "b", reporter=_quiet())
  for run in ("bn", "plain"):
    a = (tmp_path / "a" / "runs" / run / "metrics.jsonl").read_text()
    b = (tmp_path / "b" / "runs" / run / "metrics.jsonl").read_text()
    assert _without_speed(a) == _without_speed(b)
  again = registry.train_and_evaluate(config, tmp_path / "a", reporter=_quiet())  # finished: read back
  assert again["results"] == first["results"]
  assert second["results"]["bn"]["final_test_accuracy"] == first["results"]["bn"]["final_test_accuracy"]


def _without_speed(jsonl: str) -> list[dict]:
  records = [json.loads(line) for line in jsonl.splitlines()]
  return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in records]


def _command(workdir: pathlib.Path, *extra: str) -> list[str]:
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
  return [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
          f"--workdir={workdir}", *overrides, "--config.model.hidden=(16,16,16)",
          "--config.num_steps=40", "--config.checkpoint_every=20", *extra]


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  killed = tmp_path / "killed"
  env = {**os.environ, "XLA_FLAGS": ""}
  # One net (BN: the one with running statistics to restore): each of the three processes
  # compiles its training step, the suite's largest cost here.
  one_net = "--config.variants=('bn',)"
  subprocess.run(_command(uninterrupted, one_net), cwd=ROOT, env=env, check=True,
                 capture_output=True)
  # Killed (SIGKILL) once step 30 is written: the last checkpoint is step 20.
  crash = subprocess.run(_command(killed, one_net), cwd=ROOT, capture_output=True, text=True,
                         env={**env, "JAXBN_FAULT_KILL_AT_STEP": "30"})
  assert crash.returncode == -9, crash.stderr[-2000:]
  assert max(r["step"] for r in _records(killed, "bn")) == 30
  assert not (killed / "summary.md").exists()
  resumed = subprocess.run(_command(killed, one_net), cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True)
  assert "resuming at step 20" in resumed.stdout
  metrics = pathlib.Path("runs", "bn", "metrics.jsonl")
  assert _without_speed((uninterrupted / metrics).read_text()) == \
      _without_speed((killed / metrics).read_text())
  assert json.loads((killed / "summary.json").read_text())["final_test_accuracy"] == \
      json.loads((uninterrupted / "summary.json").read_text())["final_test_accuracy"]
  assert not list(killed.rglob("*.tmp"))


def _records(workdir, run):
  path = workdir / "runs" / run / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_workdir_with_another_config_is_refused_unless_overwrite(tmp_path):
  config = _load("default", variants=("bn",))
  registry.train_and_evaluate(config, tmp_path, reporter=_quiet())
  changed = _load("default", variants=("bn",), seed=1)
  with pytest.raises(config_lib.ConfigError, match=r"different config \(seed: 0 -> 1"):
    registry.train_and_evaluate(changed, tmp_path, reporter=_quiet())
  registry.train_and_evaluate(changed, tmp_path, overwrite=True, reporter=_quiet())
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1


BAD = {
    "negative learning rate": ({"optimizer.learning_rate": -0.1}, "optimizer.learning_rate"),
    "negative batch size": ({"batch_size": -4}, "config.batch_size"),
    "missing dataset": ({"data.name": "fashion_mnist", "data.path": "/nonexistent/fmnist"},
                        "config.data.path"),
    "unknown study": ({"study": "fig2"}, "config.study"),
    "chunking": ({"num_steps": 25}, "config.num_steps"),
    "momentum above one": ({"model.bn_momentum": 1.5}, "config.model.bn_momentum"),
    "unit beyond the layer": ({"diagnostics.unit": 500}, "config.diagnostics.unit"),
    "no hidden layers": ({"model.hidden": ()}, "config.model.hidden"),
    "batch of one with BN": ({"batch_size": 1}, "config.batch_size"),
    "repeated variant": ({"variants": ("bn", "bn")}, "config.variants"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_config_stops_before_training_and_writes_nothing(name, tmp_path):
  overrides, key = BAD[name]
  config = _load("default", **overrides)
  workdir = tmp_path / "never"
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    registry.train_and_evaluate(config, workdir, reporter=_quiet())
  assert not workdir.exists()


def test_unknown_key_and_wrong_type_are_named():
  config = _load("default")
  with pytest.raises(AttributeError, match="batch_sise"):
    config.batch_sise = 3  # configs are locked: a typo in a config file fails at once
  with pytest.raises(TypeError, match="batch_size"):
    config.batch_size = "sixty"
  unlocked = _load("default")
  unlocked.unlock()
  unlocked.optimizer.learnin_rate = 0.5
  with pytest.raises(config_lib.ConfigError, match="optimizer.learnin_rate"):
    registry.validate(unlocked)
  unlocked = _load("default")
  unlocked.unlock()
  del unlocked["seed"]
  unlocked.seed = "zero"
  with pytest.raises(config_lib.ConfigError, match="config.seed must be of type int"):
    registry.validate(unlocked)


def test_command_line_rejects_unknown_key_and_writes_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'never'}", "--config.optimizer.learnin_rate=0.5"],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode != 0 and "learnin_rate" in result.stderr
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'never'}", "--config.optimizer.learning_rate=-1"],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode != 0 and "config.optimizer.learning_rate must be > 0" in result.stderr
  assert not (tmp_path / "never").exists()


def test_fast_allocator_choice_respects_the_user_and_never_fails():
  from experiments.core import allocator

  assert allocator.fast_environment({"LD_PRELOAD": "/my/malloc.so"}) is None
  assert allocator.fast_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert allocator.fast_environment({"JAXBN_ALLOCATOR": "keep"}) is None
  chosen = allocator.fast_environment({})
  assert ("LD_PRELOAD" in chosen and "tcmalloc" in chosen["LD_PRELOAD"]) or \
      chosen["GLIBC_TUNABLES"] == allocator.GLIBC_HUGETLB
  assert allocator.fast_environment(chosen) is None  # re-executed once, not again
  assert allocator.describe({"LD_PRELOAD": "/x/libjemalloc.so.2"}) == "jemalloc"
  assert allocator.describe({}) == "glibc (default)"
