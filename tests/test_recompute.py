"""jaxbn.recompute_batch_stats: population statistics with the final weights, vs float64.

A small linen and nnx model (Dense → BatchNorm → relu → Dense → BatchNorm); the reference is
the float64 mean and biased variance of each BatchNorm's input over all batches concatenated,
computed with the same weights by hand.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as jlinen
from jaxbn import nnx as jnnx

BATCHES, PER_BATCH, IN, HIDDEN = 4, 5, 3, 4


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  # A different mean per batch: the pooled variance then differs visibly from the mean of
  # the per-batch variances (by the spread of the batch means).
  data = rng.standard_normal((BATCHES, PER_BATCH, IN)) + 2 * np.arange(BATCHES)[:, None, None]
  # Placed with jax.device_put: jnp.asarray(b, dtype) compiles a conversion of its own.
  return [jax.device_put(b.astype(np.float32)) for b in data]


class LinenNet(nn.Module):
  unbiased: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: jlinen.BatchNorm(use_running_average=not train, momentum=0.9,
                                       unbiased_running_var=self.unbiased, name=name)
    h = bn("bn1")(nn.Dense(HIDDEN, name="dense1")(x))
    return bn("bn2")(nn.Dense(HIDDEN, name="dense2")(nn.relu(h)))


@functools.partial(jax.jit, static_argnums=0)
def _init(net, x):
  """net's variables, jitted: eager, every op of the init compiles a program of its own."""
  return net.init(jax.random.key(0), x, train=True)


def _population(h):
  h = np.asarray(h, np.float64).reshape(-1, HIDDEN)
  return h.mean(0), h.var(0)


def _bn64(h, gamma, beta):
  """Training-mode BN in float64 (what the layer computes, per batch)."""
  h = np.asarray(h, np.float64)
  return (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(gamma) + np.asarray(beta)


def _linen_reference(variables, batches):
  """Each BatchNorm's input over all batches, the net run in training mode in float64."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in variables["params"].items()}
  first, second = [], []
  for x in batches:
    h1 = np.asarray(x, np.float64) @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    first.append(h1)
    a = np.maximum(_bn64(h1, p["bn1"]["scale"], p["bn1"]["bias"]), 0)
    second.append(a @ p["dense2"]["kernel"] + p["dense2"]["bias"])
  return _population(np.stack(first)), _population(np.stack(second))


@pytest.mark.parametrize("unbiased", [False, True])
def test_linen_recomputes_population_statistics(batches, unbiased):
  net = LinenNet(unbiased=unbiased)
  variables = _init(net, batches[0])
  new = jaxbn.recompute_batch_stats(net, batches, variables=variables, train=True)
  assert new["params"] is variables["params"]
  for name, (mean, var) in zip(("bn1", "bn2"), _linen_reference(variables, batches),
                               strict=True):
    if unbiased:
      total = BATCHES * PER_BATCH
      var = var * total / (total - 1)
    got = new["batch_stats"][name]
    assert got["mean"].dtype == jnp.float32
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)
  # The mean of per-batch variances is visibly smaller: the spread of batch means is in.
  per_batch = np.mean([np.asarray(b, np.float64).var(0) for b in batches], 0)
  assert np.all(np.asarray(batches, np.float64).reshape(-1, IN).var(0) > 2 * per_batch)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linen_average_of_per_batch_variances(batches, unbiased):
  """variance="average": the per-batch variances averaged (PyTorch's update_bn), each made
  unbiased first when the layer keeps an unbiased running variance; the mean is the same."""
  net = LinenNet(unbiased=unbiased)
  variables = _init(net, batches[0])
  new = jaxbn.recompute_batch_stats(net, batches, variables=variables, variance="average",
                                    train=True)
  first, _ = _linen_reference(variables, batches)  # bn1's input, over all batches
  p = variables["params"]["dense1"]
  per_batch = [np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64)
               + np.asarray(p["bias"], np.float64) for x in batches]
  expected = np.mean([h.var(0, ddof=1 if unbiased else 0) for h in per_batch], 0)
  got = new["batch_stats"]["bn1"]
  np.testing.assert_allclose(got["mean"], first[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["var"], expected, rtol=1e-5)
  # The batches' means differ, so this is visibly below the pooled variance.
  assert np.all(expected * 1.5 < first[1])


class NnxNet(nnx.Module):
  def __init__(self, rngs, virtual_batch_size=None):
    self.dense1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.bn1 = jnnx.BatchNorm(HIDDEN, virtual_batch_size=virtual_batch_size, rngs=rngs)
    self.dense2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.bn2 = jnnx.BatchNorm(HIDDEN, rngs=rngs)

  def __call__(self, x):
    return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


def test_nnx_recomputes_in_place_and_leaves_the_rest(batches):
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  assert jaxbn.recompute_batch_stats(model, batches) is model
  assert model.bn1.use_running_average  # still in eval mode
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
  p = {k: np.asarray(v, np.float64) for k, v in (
      ("k1", model.dense1.kernel[...]), ("b1", model.dense1.bias[...]),
      ("k2", model.dense2.kernel[...]), ("b2", model.dense2.bias[...]))}
  h1 = [np.asarray(x, np.float64) @ p["k1"] + p["b1"] for x in batches]
  h2 = [np.maximum(_bn64(h, model.bn1.scale[...], model.bn1.bias[...]), 0) @ p["k2"] + p["b2"]
        for h in h1]
  for bn, h in ((model.bn1, h1), (model.bn2, h2)):
    mean, var = _population(np.stack(h))
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)


def test_ghost_batches_contribute_their_virtual_batches_average(batches):
  """With ghost batches each batch adds its virtual batches' average (what the running
  averages get), pooled across batches: the spread of the virtual batch means is not in."""
  model = NnxNet(nnx.Rngs(1), virtual_batch_size=PER_BATCH)  # one virtual batch = plain
  jaxbn.recompute_batch_stats(model, batches)
  plain = NnxNet(nnx.Rngs(1))
  jaxbn.recompute_batch_stats(plain, batches)
  np.testing.assert_allclose(model.bn1.var[...], plain.bn1.var[...], rtol=1e-6)
  ghost = NnxNet(nnx.Rngs(1), virtual_batch_size=1)  # one example each: variance 0
  firsts = [np.asarray(b, np.float64)[:4] for b in batches]
  jaxbn.recompute_batch_stats(ghost, [jax.device_put(np.asarray(b)[:4]) for b in batches])
  # bn1's input in float64, as in the tests above.
  kernel, bias = (np.asarray(v[...], np.float64) for v in (ghost.dense1.kernel, ghost.dense1.bias))
  h = [x @ kernel + bias for x in firsts]
  means = np.array([x.mean(0) for x in h])
  np.testing.assert_allclose(ghost.bn1.var[...], means.var(0), rtol=1e-5)


def test_errors(batches):
  net = LinenNet()
  variables = _init(net, batches[0])
  with pytest.raises(ValueError, match="no jaxbn BatchNorm ran in training mode"):
    jaxbn.recompute_batch_stats(net, batches, variables=variables, train=False)
  with pytest.raises(ValueError, match="needs variables="):
    jaxbn.recompute_batch_stats(net, batches, train=True)
  with pytest.raises(ValueError, match="batches is empty"):
    jaxbn.recompute_batch_stats(NnxNet(nnx.Rngs(0)), [])
  with pytest.raises(ValueError, match="variance must be one of"):
    jaxbn.recompute_batch_stats(net, batches, variables=variables, variance="mean", train=True)
  with pytest.raises(TypeError, match="must be a flax.linen or flax.nnx Module"):
    jaxbn.recompute_batch_stats(lambda x: x, batches)
