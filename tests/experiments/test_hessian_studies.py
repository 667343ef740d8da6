"""The Hessian studies: tiny versions of every config run end to end,
population statistics are the pooled ones, and bad settings are refused before anything is
written."""

import json

import jax
import numpy as np
import pytest

import experiment_configs

from experiments import registry
from experiments.core import config as config_lib
from experiments.core import models, train
from experiments.studies.hessian import runs

# Trains tiny runs: outside the fast tier (pytest -m 'not slow').
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]
CONFIGS = ("hessian_spectrum", "hessian_population", "hessian_agreement")
TINY = {
    "data.name": "synthetic", "data.num_samples": 256, "batch_size": 16, "num_steps": 20,
    "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 32,
    "hessian.seeds": (0,), "hessian.probe_steps": (10, 20), "hessian.batches": 2,
    "hessian.lanczos_order": 12, "hessian.top_k": 6, "hessian.concentration_k": 3,
    "hessian.trace_samples": 3, "hessian.population_every": 5,
    "hessian.population_batches": 3, "hessian.hvp_vectors": 2,
}


def _load(name: str, **overrides):
  config = experiment_configs.load(name, {**TINY, **overrides})
  config.model.hidden = (8, 8)
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_hessian_config_runs_tiny(name, tmp_path):
  # Two seeds where the summary pools them; one elsewhere (each run compiles its own HVPs).
  seeds = (0, 1) if name == "hessian_spectrum" else (0,)
  config = _load(name, **{"hessian.seeds": seeds})
  outcome = registry.train_and_evaluate(config, tmp_path,
                                        reporter=experiment_configs.quiet_reporter())
  summary = outcome["summary"]
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert (tmp_path / "summary.md").read_text().startswith(f"# {config.study}")
  variants = {"hessian_spectrum": ("bn", "plain"), "hessian_population": ("bn", "population"),
              "hessian_agreement": ("bn",)}[name]
  assert set(outcome["results"]) == {f"{v}_seed{s}" for v in variants for s in seeds}
  if name == "hessian_agreement":
    assert (tmp_path / "plots" / "hvp_agreement.png").exists()
    differences = summary["max_relative_difference"]
    # float32 products differ by rounding; float64 ones by far less; both HVP modes.
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
      assert differences["float64"][mode] < 1e-10 < differences["float32"][mode] < 1e-3
    return
  assert (tmp_path / "plots" / "density.png").exists()
  for variant in variants:
    steps = summary["spectrum"][variant]
    assert sorted(steps, key=int) == ["10", "20"]
    for row in steps.values():
      assert row["lambda_max"]["seeds"] == len(seeds)
      assert row["lambda_max"]["mean"] >= row["edge"]["mean"]
      # Counted per factor from the top eigenvalues: a stricter factor never counts more.
      counts = [row[f"outliers_{f:g}x"]["mean"] for f in config.hessian.outlier_factors]
      assert counts == sorted(counts, reverse=True) and counts[0] <= config.hessian.top_k
      assert 0 <= row["gradient_concentration"]["min"] <= row["gradient_concentration"]["max"] <= 1
  record = json.loads((tmp_path / "runs" / f"{variants[0]}_seed0" / "metrics.jsonl")
                      .read_text().splitlines()[-1])
  assert len(record["hessian_top_eigenvalues"]) == 6
  assert np.all(np.diff(record["hessian_top_eigenvalues"]) <= 0)
  np.testing.assert_allclose(np.sum(record["hessian_slq_weights"], axis=1), 1.0, rtol=1e-6)


def test_population_statistics_are_pooled_over_the_drawn_batches(tmp_path):
  config = _load("hessian_population")
  ctx = train.Context(config, tmp_path, _dataset(config), experiment_configs.quiet_reporter())
  model = models.create(config.model, batch_norm=True)
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  state = train.init_state(model, tx, ctx.x_grad, 0)
  refreshed = runs.refresh_population(model, ctx, state, batches=3)
  # By hand: the first layer's pre-BN values over the same 3 batches, mean and biased var of
  # all of them (pooled; the mean of the per-batch variances would be ~6% lower here).
  key = jax.random.fold_in(jax.random.split(jax.random.key(config.seed + 1))[1], state.step)
  index = np.asarray(jax.random.randint(key, (3, config.batch_size), 0,
                                        ctx.x_train.shape[0])).ravel()
  x = np.asarray(ctx.x_train)[index].reshape(len(index), -1).astype(np.float64)
  z = x @ np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  stats = refreshed.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], z.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], z.var(0), rtol=1e-4, atol=1e-6)
  assert not np.allclose(stats["var"], 1.0)  # not the initial statistics


def _dataset(config):
  from experiments.core import data
  return data.load(config.data, config.seed)


@pytest.mark.parametrize("key, value, message", [
    ("hessian.seeds", (0, 0), "config.hessian.seeds must be distinct ints"),
    ("hessian.probe_steps", (15,), "config.hessian.probe_steps must be a non-empty tuple of "
                                   "multiples of config.eval_every"),
    ("hessian.probe_steps", (), "config.hessian.probe_steps"),
    ("hessian.lanczos_order", 0, "config.hessian.lanczos_order must be an int >= 1"),
    ("hessian.top_k", 40, "concentration_k <= top_k <= lanczos_order"),
    ("hessian.trace_samples", 1, "config.hessian.trace_samples must be >= 2"),
    ("hessian.outlier_factors", (2.0, 1.0), "config.hessian.outlier_factors must be a "
                                            "non-empty tuple of factors > 1"),
    ("hessian.population_every", 3, "config.hessian.population_every \\(3\\) must divide"),
    ("data_parallel", True, "config.data_parallel must be False"),
    ("model.bn_impl", "equinox", "not for study"),
])
def test_bad_hessian_settings_are_refused_before_anything_is_written(key, value, message,
                                                                     tmp_path):
  config = experiment_configs.override(_load("hessian_population"), {key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    registry.train_and_evaluate(config, tmp_path / "w",
                                reporter=experiment_configs.quiet_reporter())
  assert not (tmp_path / "w").exists()
