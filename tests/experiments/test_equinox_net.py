"""The paper MLP written in Equinox (`model.bn_impl = "equinox"`): the studies that train
`models.create`'s nets run it; the others, and what it does not take, are refused first."""

import json

import jax
import numpy as np
import optax
import pytest

import experiment_configs
from experiments import registry
from experiments.core import config as config_lib
from experiments.core import models, train

pytest.importorskip("equinox", reason="the Equinox net needs jaxbn[equinox]")
# Trains whole studies: the slow tier, with JAX's standard promotion as users run it.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]

TINY = {"data.name": "synthetic", "data.num_samples": 256, "batch_size": 16, "num_steps": 20,
        "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 32,
        "model.hidden": (16, 16, 16), "model.bn_impl": "equinox"}


def test_paper_fig1_with_the_equinox_net_runs_tiny_and_resumes(tmp_path):
  config = experiment_configs.load("paper_fig1", TINY)
  outcome = registry.train_and_evaluate(config, tmp_path,
                                        reporter=experiment_configs.quiet_reporter())
  assert set(outcome["results"]) == {"bn", "plain"}
  for run in outcome["results"]:
    records = [json.loads(line) for line in
               (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert records and np.isfinite(records[-1]["test_accuracy"])
  assert list((tmp_path / "plots").glob("*.png"))  # Figure 1 from the sown activations
  again = registry.train_and_evaluate(config, tmp_path,
                                      reporter=experiment_configs.quiet_reporter())
  assert again["results"] == outcome["results"]


def test_the_equinox_net_trains_like_equinox_runs_it():
  """One step of the adapter equals the Equinox model stepped by hand: vmapped over the batch
  with axis_name, its State carried as batch_stats, its arrays as Flax-named parameters."""
  import equinox as eqx
  from experiments.core import equinox_models

  config = experiment_configs.load("paper_fig1", TINY)
  model = models.create(config.model, batch_norm=True)
  x = np.random.default_rng(0).random((16, 784), np.float32)
  y = np.arange(16) % 10
  tx = optax.sgd(0.1)
  state = train.init_state(model, tx, x, seed=0)
  stepped, loss = jax.jit(lambda s: train.train_step(model, tx, s, x, y))(state)
  assert {"Dense_0", "Dense_3", "BatchNorm_2"} <= set(state.params)
  assert state.params["Dense_1"]["kernel"].shape == (16, 16)

  net, bn_state = eqx.nn.make_with_state(equinox_models._EquinoxMLP)(
      784, (16, 16, 16), 10, True, "sigmoid", 0.01, 0.99, jax.random.key(1))
  arrays, static = eqx.partition(net, eqx.is_inexact_array)
  paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
  names = [equinox_models._flax_name(path, 3) for path, _ in paths]
  net = eqx.combine(jax.tree.unflatten(treedef, [state.params[m][n] for m, n in names]),
                    static)
  bn_state = jax.tree.unflatten(jax.tree.structure(bn_state), [
      state.batch_stats["equinox"][str(i)] for i in range(len(jax.tree.leaves(bn_state)))])

  def loss_fn(net):
    logits, new_state, _ = jax.vmap(net, axis_name="batch", in_axes=(0, None),
                                    out_axes=(0, None, 0))(x, bn_state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

  (want_loss, want_state), grads = eqx.filter_jit(
      eqx.filter_value_and_grad(loss_fn, has_aux=True))(net)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for i, leaf in enumerate(jax.tree.leaves(want_state)):
    np.testing.assert_allclose(stepped.batch_stats["equinox"][str(i)], leaf, rtol=1e-6,
                               atol=1e-7)
  grad_leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
  for (m, n), g in zip(names, grad_leaves, strict=True):
    np.testing.assert_allclose(stepped.params[m][n], state.params[m][n] - 0.1 * g, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("overrides,named", [
    ({"model.name": "cnn"}, "model.name"),
    ({"model.gradient": "autodiff"}, "model.gradient"),
    ({"model.residual": True}, "model.residual"),
    ({"study": "gradient_agreement"}, "gradient_agreement"),
    ({"study": "noisy_bn"}, "noisy_bn"),
])
def test_what_the_equinox_net_does_not_take_is_refused_before_any_work(overrides, named,
                                                                       tmp_path):
  config = experiment_configs.load("paper_fig1", {**TINY, **overrides})
  with pytest.raises(config_lib.ConfigError, match=named):
    registry.train_and_evaluate(config, tmp_path / "run",
                                reporter=experiment_configs.quiet_reporter())
  assert not (tmp_path / "run").exists()
