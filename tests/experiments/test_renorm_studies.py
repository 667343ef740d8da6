"""The renorm studies (experiments/renorm_studies.py): the non-i.i.d. sampler, the summary's
statistics and bars, config refusals, and a tiny run of each study (slow)."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiment_configs

from experiments import registry
from experiments.studies.renorm import batches, plots as renorm_plots, recompute_variance
from experiments.core import progress
from experiments.core import config as config_lib

# Tests of experiments/ code, not of the library: outside the fast tier (pytest -m 'not slow').
# Flax's layers and optax rely on JAX's default promotion, which users run with.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]

# ----------------------------------------------------------------------------- sampler


def _labels(counts):
  rng = np.random.default_rng(0)
  return rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)


def test_class_table_lists_each_class_examples():
  labels = _labels([3, 0, 5, 1])
  table, counts = batches.class_table(labels, 4)
  assert counts.tolist() == [3, 0, 5, 1]
  for c in range(4):
    members = table[c, :counts[c]]
    assert sorted(members.tolist()) == np.flatnonzero(labels == c).tolist()


UNEQUAL = [40, 7, 25, 0, 60, 13, 30, 2, 50, 9]  # unequal class sizes; class 3 empty


@pytest.fixture(scope="module", params=[1, 2])
def noniid_draw(request):
  """(labels, classes_per_batch, a jitted lax.map of sample_noniid over keys): one compile.

  lax.map, not vmap: the same draws (each key through the unbatched sampler), but XLA compiles
  the batched sort and choice about 3.5x slower (≈6 s against ≈1.7 s on two cores)."""
  labels = _labels(UNEQUAL)
  table, counts = batches.class_table(labels, 10)
  draw = jax.jit(lambda keys: jax.lax.map(lambda k: batches.sample_noniid(
      k, jnp.asarray(table), jnp.asarray(counts), batch_size=12,
      classes_per_batch=request.param), keys))
  return labels, request.param, draw


def test_noniid_batches_hold_that_many_classes_in_equal_shares(noniid_draw):
  labels, classes_per_batch, draw = noniid_draw
  idx = np.asarray(draw(jax.random.split(jax.random.key(0), 300)))
  assert idx.shape == (300, 12) and idx.min() >= 0 and idx.max() < labels.size
  seen = set()
  for row in labels[idx]:
    classes, per_class = np.unique(row, return_counts=True)
    assert len(classes) == classes_per_batch
    assert (per_class == 12 // classes_per_batch).all()
    seen.update(classes.tolist())
  # Every class with examples is drawn sometimes, the empty one never.
  assert seen == {0, 1, 2, 4, 5, 6, 7, 8, 9}
  # The order inside a batch is shuffled: one class is not always first.
  if classes_per_batch > 1:
    assert any(len(set(labels[row[:12 // classes_per_batch]])) > 1 for row in idx)


def test_noniid_sampler_is_a_function_of_its_key(noniid_draw):
  _, _, draw = noniid_draw
  keys = jax.random.split(jax.random.key(1), 300)
  first, again = np.asarray(draw(keys)), np.asarray(draw(keys))
  assert (first == again).all() and not (first[0] == first[1:]).all(axis=1).all()


def test_check_noniid_names_the_argument():
  _, counts = batches.class_table(_labels([5, 5, 0]), 3)
  with pytest.raises(ValueError, match="classes_per_batch must be in \\[1, 2\\]"):
    batches.check_noniid(counts, batch_size=10, classes_per_batch=3)
  with pytest.raises(ValueError, match="must divide batch_size"):
    batches.check_noniid(counts, batch_size=9, classes_per_batch=2)
  with pytest.raises(ValueError, match="labels must lie in"):
    batches.class_table(np.array([0, 3]), 3)


# -------------------------------------------------------------------- summary helpers


def test_spread_and_bars():
  s = renorm_plots.spread([0.8, 0.82, 0.84])
  assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02)
  assert (s["min"], s["max"]) == (0.8, 0.84)
  assert renorm_plots.spread([0.5])["std"] == 0.0
  high, low = renorm_plots.spread([0.9, 0.91, 0.92]), renorm_plots.spread([0.8, 0.85, 0.9])
  assert renorm_plots.beats(high, low)["met"]  # +0.06 > 0.05
  assert not renorm_plots.beats(renorm_plots.spread([0.86, 0.87, 0.88]), low)["met"]


# ---------------------------------------------------------------------- config refusals


TINY = {"data.name": "synthetic", "data.num_samples": 240, "data.synthetic_shape": (6,),
        "model.hidden": (8, 8), "batch_size": 12, "num_steps": 20, "eval_every": 10,
        "checkpoint_every": 20, "renorm.group_sizes": (2, 12), "renorm.recompute_batches": 3, "renorm.seeds": (0, 1)}


def _load(name, **overrides):
  return experiment_configs.load(name, {**TINY, **overrides})


@pytest.mark.parametrize("name, overrides, message", [
    ("renorm_groups", {"renorm.group_sizes": (5,)}, "group_sizes must be ints >= 2 that divide"),
    ("renorm_groups", {"renorm.norms": ("bn", "gn")}, "norms must be a non-empty subset"),
    ("renorm_groups", {"renorm.seeds": (1, 1)}, "seeds must be distinct"),
    ("renorm_groups", {"renorm.rmax": 0.5}, "rmax must be >= 1"),
    ("renorm_groups", {"renorm.dmax": -1.0}, "dmax must be >= 0"),
    ("renorm_groups", {"renorm.classes_per_batch": 2}, "classes_per_batch must be 0"),
    ("renorm_noniid", {"renorm.classes_per_batch": 5}, "must divide config.batch_size"),
    ("renorm_noniid", {"renorm.classes_per_batch": 0}, "must be > 0 for study renorm_noniid"),
])
def test_bad_renorm_configs_are_refused(name, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    registry.validate(_load(name, **overrides))


# ----------------------------------------------------------------- tiny runs (slow)




@pytest.mark.parametrize("name, groups, norms", [
    ("renorm_groups", (2, 12), ("bn", "renorm", "plain")),
    ("renorm_noniid", (12,), ("bn", "renorm"))])
def test_tiny_study_writes_its_summary_and_plots(name, groups, norms, tmp_path, capsys):
  config = _load(name, **{"renorm.group_sizes": groups, "renorm.norms": norms})
  reporter = progress.LogReporter(stream=io.StringIO())
  outcome = registry.train_and_evaluate(config, tmp_path, reporter=reporter)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary == json.loads(json.dumps(outcome["summary"]))
  expected = ({f"{norm}_g{g}" for norm in ("bn", "renorm") for g in groups}
              | ({"plain"} if "plain" in norms else set()))
  assert set(summary["runs"]) == expected
  for run_name, run in summary["runs"].items():
    keys = {"test_accuracy", "train_mode_accuracy", "train_minus_inference"}
    if run["norm"] != "plain":
      keys |= {"recomputed_test_accuracy"}
    if name == "renorm_noniid":
      keys |= {"noniid_train_mode_accuracy", "noniid_train_minus_inference"}
    assert keys <= set(run), run_name
    for key in keys:
      assert len(run[key]["per_seed"]) == 2
      assert np.isfinite(run[key]["per_seed"]).all()
      assert 0.0 <= run[key]["mean"] <= 1.0 or "minus" in key
  if "plain" in norms:  # without a normalization, train and inference mode are one function
    assert summary["runs"]["plain"]["train_minus_inference"]["per_seed"] == [0.0, 0.0]
  bars = summary["bars"]
  if name == "renorm_groups":
    assert {"renorm_beats_bn_g2", "renorm_within_0.5_points_of_bn_g12"} <= set(bars)
  else:
    assert "renorm_beats_bn_g12" in bars
  assert {f"recomputed_not_worse_than_ema_{n}" for n in expected - {"plain"}} <= set(bars)
  for plot in (f"{name}.png", "curves.png"):
    assert (tmp_path / "plots" / plot).stat().st_size > 1000
  assert "## Bars" in (tmp_path / "summary.md").read_text()
  # Each normalized run's checkpoints, evaluated with both recomputed variances.
  capsys.readouterr()
  recompute_variance.main(tmp_path)
  printed = capsys.readouterr().out
  for run_name in expected - {"plain"}:
    for label in ("running (EMA)", "pooled", "average"):
      assert f"{run_name}: {label}: test accuracy" in printed
