"""jaxbn.recompute_batch_stats: population statistics with the final weights, vs float64.

A small linen and nnx model (Dense → BatchNorm → relu → Dense → BatchNorm), and a block under
each Flax transform; the reference for variance="pooled" is the float64 mean and biased
variance of each BatchNorm's input over all batches concatenated (per scan step or ensemble
member), for variance="average" the mean of the per-batch variances, computed
with the same weights by hand.
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


@functools.partial(jax.jit, static_argnums=0)
def _init_plain(net, *args):
  """net's variables, for a net whose call has no train flag."""
  return net.init(jax.random.key(0), *args)


def _population(h):
  h = np.asarray(h, np.float64).reshape(-1, HIDDEN)
  return h.mean(0), h.var(0)


def _population_in(batches):
  """The mean and biased variance of the batches themselves, in float64."""
  x = np.asarray(batches, np.float64).reshape(-1, IN)
  return x.mean(0), x.var(0)


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
  new = jaxbn.recompute_batch_stats(net, batches, variables=variables, variance="pooled",
                                    train=True)
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


def test_default_is_the_pooled_variance(batches):
  """The default is variance="pooled", the population statistics; on batches with differing
  means the average of the per-batch variances is visibly below it."""
  net = LinenNet()
  variables = _init(net, batches[0])
  recompute = functools.partial(jaxbn.recompute_batch_stats, net, batches,
                                variables=variables, train=True)
  default = recompute()["batch_stats"]
  pooled = recompute(variance="pooled")["batch_stats"]
  average = recompute(variance="average")["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, default, pooled)
  assert np.all(average["bn1"]["var"] * 1.5 < default["bn1"]["var"])
  models = [NnxNet(nnx.Rngs(0)) for _ in range(2)]
  jaxbn.recompute_batch_stats(models[0], batches)
  jaxbn.recompute_batch_stats(models[1], batches, variance="pooled")
  jax.tree.map(np.testing.assert_array_equal, *(nnx.state(m, nnx.BatchStat) for m in models))


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
  assert jaxbn.recompute_batch_stats(model, batches, variance="pooled") is model
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
  jaxbn.recompute_batch_stats(model, batches, variance="pooled")
  plain = NnxNet(nnx.Rngs(1))
  jaxbn.recompute_batch_stats(plain, batches, variance="pooled")
  np.testing.assert_allclose(model.bn1.var[...], plain.bn1.var[...], rtol=1e-6)
  ghost = NnxNet(nnx.Rngs(1), virtual_batch_size=1)  # one example each: variance 0
  firsts = [np.asarray(b, np.float64)[:4] for b in batches]
  firsts_on_device = [jax.device_put(np.asarray(b)[:4]) for b in batches]
  jaxbn.recompute_batch_stats(ghost, firsts_on_device, variance="pooled")
  # bn1's input in float64, as in the tests above.
  kernel, bias = (np.asarray(v[...], np.float64) for v in (ghost.dense1.kernel, ghost.dense1.bias))
  h = [x @ kernel + bias for x in firsts]
  means = np.array([x.mean(0) for x in h])
  np.testing.assert_allclose(ghost.bn1.var[...], means.var(0), rtol=1e-5)
  # "average": what each group of one example was normalized with, a variance of 0.
  jaxbn.recompute_batch_stats(ghost, firsts_on_device, variance="average")
  np.testing.assert_array_equal(ghost.bn1.var[...], 0.0)


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


# Under Flax's transforms: the statistics of the untransformed layers, computed by hand.

STEPS = 3  # scan steps, or ensemble members under vmap


class _Block(nn.Module):
  """Dense → BatchNorm, the layer a transform wraps (a carry in and out, for nn.scan)."""

  @nn.compact
  def __call__(self, h, _=None):
    z = nn.Dense(HIDDEN, name="dense")(h)
    return jlinen.BatchNorm(use_running_average=False, momentum=0.9, name="bn")(z), None


class LinenTransformed(nn.Module):
  transform: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(HIDDEN, name="proj")(x)
    if self.transform == "remat":
      return nn.remat(_Block)(name="block")(h)[0]
    if self.transform == "scan":  # STEPS layers, stacked: per-step variables
      scanned = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True}, length=STEPS)
      return scanned(name="block")(h, None)[0]
    # vmap: an ensemble of STEPS members, each with its own variables, all given h
    ensemble = nn.vmap(_Block, in_axes=None, out_axes=0, axis_size=STEPS,
                       variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True})
    return ensemble(name="block")(h)[0]


def _block_reference(transform, proj, dense, bn, batches):
  """The block's BatchNorm inputs over all batches, by hand in float64: their mean and
  biased variance, per scan step or ensemble member on a leading axis (none for remat)."""
  f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
  proj, dense, bn = f64(proj), f64(dense), f64(bn)
  inputs = []  # per batch: the BatchNorm's input per step / member
  for x in batches:
    h = np.asarray(x, np.float64) @ proj["kernel"] + proj["bias"]
    if transform == "remat":
      inputs.append([h @ dense["kernel"] + dense["bias"]])
    elif transform == "vmap":
      inputs.append([h @ dense["kernel"][e] + dense["bias"][e] for e in range(STEPS)])
    else:  # scan: each step's layer normalizes the previous step's output
      steps = []
      for s in range(STEPS):
        steps.append(h @ dense["kernel"][s] + dense["bias"][s])
        h = _bn64(steps[-1], bn["scale"][s], bn["bias"][s])
      inputs.append(steps)
  z = np.swapaxes(np.asarray(inputs), 0, 1).reshape(len(inputs[0]), -1, HIDDEN)
  mean, var = z.mean(1), z.var(1)
  return (mean[0], var[0]) if transform == "remat" else (mean, var)


@pytest.mark.parametrize("transform", ["remat", "scan", "vmap"])
def test_linen_under_transforms_matches_the_untransformed_layers(batches, transform):
  net = LinenTransformed(transform)
  variables = _init_plain(net, batches[0])
  new = jaxbn.recompute_batch_stats(net, batches, variables=variables, variance="pooled")
  p = variables["params"]
  mean, var = _block_reference(transform, p["proj"], p["block"]["dense"], p["block"]["bn"],
                               batches)
  got = new["batch_stats"]["block"]["bn"]
  assert set(got) == {"mean", "var"}
  assert got["mean"].shape == variables["batch_stats"]["block"]["bn"]["mean"].shape
  np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["var"], var, rtol=1e-5)
  if transform != "remat":  # each step / member has statistics of its own
    assert np.all(np.ptp(mean, axis=0) > 1e-2)


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.bn = jnnx.BatchNorm(HIDDEN, momentum=0.9, rngs=rngs)

  def __call__(self, h):
    return self.bn(self.dense(h))


class NnxTransformed(nnx.Module):
  def __init__(self, transform, rngs):
    self.transform = transform
    self.proj = nnx.Linear(IN, HIDDEN, rngs=rngs)
    if transform == "vmap":  # Flax's ensemble recipe: STEPS members made under nnx.vmap
      @nnx.split_rngs(splits=STEPS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def members(rngs):
        return _NnxBlock(rngs)
      self.block = members(rngs)
    else:
      self.block = _NnxBlock(rngs)

  def __call__(self, x):
    h = self.proj(x)
    if self.transform == "vmap":
      return nnx.vmap(lambda block, h: block(h), in_axes=(0, None))(self.block, h)
    return nnx.remat(lambda block, h: block(h))(self.block, h)


@pytest.mark.parametrize("transform", ["remat", "vmap"])
def test_nnx_under_transforms_matches_the_untransformed_layers(batches, transform):
  model = NnxTransformed(transform, nnx.Rngs(0))
  model.eval()
  linear = lambda layer: {"kernel": layer.kernel[...], "bias": layer.bias[...]}
  bn = {"scale": model.block.bn.scale[...], "bias": model.block.bn.bias[...]}
  mean, var = _block_reference(transform, linear(model.proj), linear(model.block.dense), bn,
                               batches)
  shape = model.block.bn.mean[...].shape
  jaxbn.recompute_batch_stats(model, batches, variance="pooled")
  assert model.block.bn.mean[...].shape == shape
  np.testing.assert_allclose(model.block.bn.mean[...], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.block.bn.var[...], var, rtol=1e-5)
  assert model.block.bn.use_running_average  # still in eval mode
  assert not hasattr(model.block.bn, "recompute_calls")  # the accumulators stay on the copy
  if transform == "vmap":
    assert np.all(np.ptp(mean, axis=0) > 1e-2)


class LinenWithFlaxBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = jlinen.BatchNorm(use_running_average=not train, momentum=0.9, name="ours")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="theirs")(h)


def test_linen_flax_batch_norm_is_left_as_it_is_with_a_warning(batches):
  net = LinenWithFlaxBN()
  variables = _init(net, batches[0])
  with pytest.warns(UserWarning, match="flax.linen.BatchNorm at 'theirs'.*left as they are"):
    new = jaxbn.recompute_batch_stats(net, batches, variables=variables, variance="pooled",
                                      train=True)
  mean, var = _population_in(batches)
  np.testing.assert_allclose(new["batch_stats"]["ours"]["mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["ours"]["var"], var, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"]["theirs"],
               variables["batch_stats"]["theirs"])


class NnxWithFlaxBN(nnx.Module):
  def __init__(self, rngs):
    self.ours = jnnx.BatchNorm(IN, rngs=rngs)
    self.theirs = nnx.BatchNorm(IN, rngs=rngs)

  def __call__(self, x):
    return self.theirs(self.ours(x))


def test_nnx_flax_batch_norm_is_left_as_it_is_with_a_warning(batches):
  model = NnxWithFlaxBN(nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model.theirs, nnx.BatchStat))
  with pytest.warns(UserWarning, match="flax.nnx.BatchNorm at 'theirs'.*left as they are"):
    jaxbn.recompute_batch_stats(model, batches, variance="pooled")
  mean, var = _population_in(batches)
  np.testing.assert_allclose(model.ours.mean[...], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.ours.var[...], var, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model.theirs, nnx.BatchStat), before)


def test_under_jit_is_refused_clearly(batches):
  net = LinenNet()
  variables = _init(net, batches[0])
  with pytest.raises(TypeError, match="under jax.jit.*call it outside"):
    jax.jit(lambda v: jaxbn.recompute_batch_stats(net, batches, variables=v, train=True))(
        variables)
  model = NnxNet(nnx.Rngs(0))
  with pytest.raises(TypeError, match="under jax.jit.*call it outside"):
    nnx.jit(lambda m: jaxbn.recompute_batch_stats(m, batches))(model)


class LinenMasked(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    return jlinen.BatchNorm(use_running_average=False, unbiased_running_var=True,
                            name="bn")(x, mask=mask)


def test_features_without_enough_values_keep_their_statistics(batches):
  """As a training step keeps them: feature 0 sees no values (masked everywhere), feature 1
  one value, too few for an unbiased variance; feature 2 all of them."""
  masks = [np.ones((PER_BATCH, IN), bool) for _ in batches]
  for i, mask in enumerate(masks):
    mask[:, 0] = False
    mask[:, 1] = False
    if i == 0:
      mask[0, 1] = True
  masks = [jax.device_put(m) for m in masks]
  net = LinenMasked()
  variables = _init_plain(net, batches[0], masks[0])
  stale = {"mean": jnp.full((IN,), 3.0, jnp.float32), "var": jnp.full((IN,), 7.0, jnp.float32)}
  new = jaxbn.recompute_batch_stats(net, list(zip(batches, masks)), variance="pooled",
                                    variables={**variables, "batch_stats": {"bn": stale}})
  got = new["batch_stats"]["bn"]
  x = np.asarray(batches, np.float64).reshape(-1, IN)
  np.testing.assert_array_equal(got["mean"][0], 3.0)
  np.testing.assert_array_equal(got["var"][:2], [7.0, 7.0])
  np.testing.assert_allclose(got["mean"][1], x[0, 1], rtol=1e-6)
  np.testing.assert_allclose(got["mean"][2], x[:, 2].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["var"][2], x[:, 2].var(ddof=1), rtol=1e-5)
