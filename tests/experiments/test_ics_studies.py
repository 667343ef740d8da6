"""The probes' studies (noisy_bn, ics, landscape): tiny versions of every config run end to end,
and bad probe settings are refused before anything is written."""

import importlib
import json

import numpy as np
import pytest

import experiment_configs

from experiments import registry
from experiments.core import config as config_lib

# Trains tiny runs: outside the fast tier (pytest -m 'not slow').
# Flax's layers and optax rely on JAX's default promotion, which users run with.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]
ALL_CONFIGS = ("ics_noisy_bn", "ics_definition", "ics_deep_linear", "ics_landscape",
               "ics_landscape_relu")
# One config per study trains (tiny); the other two differ only in the net (linear, ReLU
# activations) and are validated below, which costs no compile.
CONFIGS = ("ics_noisy_bn", "ics_definition", "ics_landscape")
TINY = {
    "data.name": "synthetic", "data.num_samples": 256, "batch_size": 16, "num_steps": 20,
    "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 32,
}


def _load(name: str, **overrides):
  config = experiment_configs.load(name, {**TINY, **overrides})
  config.model.hidden = (8,) * min(len(config.model.hidden), 3)
  return config




_quiet = experiment_configs.quiet_reporter


@pytest.mark.parametrize("name", CONFIGS)
def test_every_probe_config_runs_tiny(name, tmp_path):
  config = _load(name)
  outcome = registry.train_and_evaluate(config, tmp_path, reporter=_quiet())
  summary = outcome["summary"]
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert (tmp_path / "summary.md").read_text().startswith(f"# {config.study}")
  expected_runs = {"bn", "plain"} | ({"noisy_bn"} if config.study == "noisy_bn" else set())
  assert set(outcome["results"]) == expected_runs
  for run in expected_runs:
    records = [json.loads(line) for line in
               (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
  depth = len(config.model.hidden) + 1
  if config.study == "noisy_bn":
    assert (tmp_path / "plots" / "noisy_bn.png").exists()
    shift = summary["distribution_shift"]
    # The noise's mean is redrawn from U(-0.5, 0.5) every step: the noisy net's unit means move
    # between evaluations far more than BN's, whose inputs BN fixes (γ, β barely move).
    assert shift["noisy_bn"]["mean_abs_change_of_unit_means"] > \
        10 * shift["bn"]["mean_abs_change_of_unit_means"]
  elif config.study == "ics":
    assert (tmp_path / "plots" / "ics.png").exists()
    for run in expected_runs:
      records = [json.loads(line) for line in
                 (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
      l2 = np.array([r["ics_l2"] for r in records])
      cosine = np.array([r["ics_cosine"] for r in records])
      assert l2.shape == (2, depth) and np.all(l2[:, 0] == 0) and np.all(l2[:, 1:] > 0)
      assert np.all(np.abs(cosine) <= 1 + 1e-6)
      assert len(summary["median_ics_l2"][run]) == depth - 1
  else:
    assert (tmp_path / "plots" / "landscape.png").exists()
    for row in summary["median_over_training"].values():
      assert row["loss_variation"] >= 0 and row["beta_smoothness"] > 0
    assert set(summary["plain_over_bn"]) >= {"loss_variation", "beta_smoothness"}
  # A finished study re-runs from its results without writing.
  again = registry.train_and_evaluate(config, tmp_path, reporter=_quiet())
  assert again["summary"] == summary


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_probe_config_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  registry.validate(config)
  assert config.study in ("noisy_bn", "ics", "landscape")


@pytest.mark.parametrize("key, value, message", [
    ("probes.noise_std_range", (1.0, 0.5), "noise_std_range"),
    ("probes.noise_mean_range", -1.0, "noise_mean_range"),
    ("probes.step_multiples", (0.5, 0.0), "step_multiples"),
    ("model.name", "cnn", "model.name"),
])
def test_bad_probe_settings_are_refused_before_anything_is_written(key, value, message,
                                                                    tmp_path):
  config = _load("ics_noisy_bn" if "noise" in key else "ics_landscape", **{key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    registry.train_and_evaluate(config, tmp_path / "w", reporter=_quiet())
  assert not (tmp_path / "w").exists()
