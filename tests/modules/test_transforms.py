"""jaxbn's modules under Flax's and JAX's transformations, each against Flax's own BatchNorm
under the same transformation: same outputs, running statistics and gradients.

Both sides use the two-pass variance (`use_fast_variance=False`); they then differ only by
jaxbn's shifted sums, within float32 rounding.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

TOL = dict(rtol=2e-5, atol=2e-5)
LINEN = {"flax": nn.BatchNorm, "jaxbn": jaxbn.linen.BatchNorm}
NNX = {"flax": nnx.BatchNorm, "jaxbn": jaxbn.nnx.BatchNorm}


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + 1, jnp.float32)


def _assert_trees_close(ours, theirs):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), ours, theirs)


# ------------------------------------------------------------------------------- linen


class _Block(nn.Module):
  """Dense → BatchNorm → tanh: a scanned or vmapped layer."""

  bn: type

  @nn.compact
  def __call__(self, x, _=None):
    x = nn.Dense(x.shape[-1], use_bias=False)(x)
    x = self.bn(use_running_average=False, momentum=0.9, use_fast_variance=False)(x)
    return jnp.tanh(x), None


class _Ensemble(nn.Module):
  """Three blocks under nn.vmap, each with its own parameters and batch_stats and batch."""

  bn: type

  @nn.compact
  def __call__(self, x_ExBxF):
    vmapped = nn.vmap(_Block, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, in_axes=0)
    return vmapped(self.bn)(x_ExBxF)[0]


class _Stack(nn.Module):
  """Three blocks under nn.scan (stacked parameters and batch_stats)."""

  bn: type

  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, length=3)
    return scanned(self.bn)(x, None)[0]


class _Remat(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x):
    return nn.remat(_Block)(self.bn)(x)[0]


class _Jit(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x):
    return nn.jit(_Block)(self.bn)(x)[0]


LINEN_CASES = {"vmap": (_Ensemble, (3, 6, 4)), "scan": (_Stack, (6, 4)),
               "remat": (_Remat, (6, 4)), "jit": (_Jit, (6, 4))}


@pytest.mark.slow
@pytest.mark.parametrize("case", LINEN_CASES)
def test_linen_transform_matches_flax(case):
  module, shape = LINEN_CASES[case]
  x, w = _x(shape), _x(shape, seed=1)
  results = {}
  for name, bn in LINEN.items():
    model = module(bn)
    variables = model.init(jax.random.key(0), x)

    def loss(params, model=model, variables=variables):
      y, updates = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(w * y), updates

    (_, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    results[name] = (jax.tree.map(jnp.shape, variables), updates, grads)
  assert results["jaxbn"][0] == results["flax"][0]  # the same variables, stacked the same
  _assert_trees_close(results["jaxbn"][1:], results["flax"][1:])


# --------------------------------------------------------------------------------- nnx


class _NnxBlock(nnx.Module):
  def __init__(self, bn, rngs):
    self.linear = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
    self.bn = bn(4, momentum=0.9, use_fast_variance=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.bn(self.linear(x)))


def _nnx_ensemble(bn, x_ExBxF):
  """Flax's ensemble recipe: three blocks made under nnx.vmap with split rngs, each trained
  on its own batch; StateAxes stack parameters and batch statistics on axis 0."""

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _NnxBlock(bn, rngs)

  model = create(nnx.Rngs(0))
  state_axes = nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0})

  @nnx.vmap(in_axes=(state_axes, 0))
  def forward(model, x):
    return model(x)

  return model, lambda model: forward(model, x_ExBxF)


def _nnx_stack(bn, x):
  """Three stacked blocks run by nnx.scan."""

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _NnxBlock(bn, rngs)

  model = create(nnx.Rngs(0))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, block):
    return block(x)

  return model, lambda model: forward(x, model)


def _nnx_remat(bn, x):
  model = _NnxBlock(bn, nnx.Rngs(0))
  return model, lambda model: nnx.remat(lambda m: m(x))(model)


def _nnx_jit(bn, x):
  model = _NnxBlock(bn, nnx.Rngs(0))
  return model, nnx.jit(lambda model: model(x))


NNX_CASES = {"vmap": (_nnx_ensemble, (3, 6, 4)), "scan": (_nnx_stack, (6, 4)),
             "remat": (_nnx_remat, (6, 4)), "jit": (_nnx_jit, (6, 4))}


@pytest.mark.slow
@pytest.mark.parametrize("case", NNX_CASES)
def test_nnx_transform_matches_flax(case):
  build, shape = NNX_CASES[case]
  x, w = _x(shape), _x(shape, seed=1)
  results = {}
  for name, bn in NNX.items():
    model, forward = build(bn, x)
    grads = nnx.jit(nnx.grad(lambda model, forward=forward: jnp.sum(w * forward(model))))(model)
    state = nnx.state(model, nnx.BatchStat)  # updated by the traced call, as Flax's
    results[name] = (jax.tree.map(jnp.shape, nnx.state(model)), state, nnx.state(grads))
  assert results["jaxbn"][0] == results["flax"][0]
  _assert_trees_close(results["jaxbn"][1:], results["flax"][1:])


# ------------------------------------------------------------------ jax.vmap on the core


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["analytic", "autodiff"])
def test_vmap_without_axis_name_is_one_batch_norm_per_instance(gradient):
  x, dy = _x((3, 6, 4)), _x((3, 6, 4), seed=1)
  scale, bias = _x((3, 4), seed=2), _x((3, 4), seed=3)
  f = functools.partial(jaxbn.batch_norm, gradient=gradient)
  vjp = lambda x, s, b, dy: jax.vjp(lambda *a: f(*a)[0], x, s, b)[1](dy)
  batched, looped = jax.jit(lambda x, scale, bias, dy: (  # one compilation for both
      (jax.vmap(f)(x, scale, bias), jax.vmap(vjp)(x, scale, bias, dy)),
      [(f(x[i], scale[i], bias[i]), vjp(x[i], scale[i], bias[i], dy[i])) for i in range(3)]))(
          x, scale, bias, dy)
  _assert_trees_close(batched, jax.tree.map(lambda *v: jnp.stack(v), *looped))


def test_vmap_with_axis_name_pools_like_flax():
  # Flax's own statistics under the same vmap: pmean of the per-instance moments.
  x = _x((3, 6, 4))
  flax_bn = nn.BatchNorm(use_running_average=False, axis_name="i", use_fast_variance=False,
                         use_bias=False, use_scale=False)
  variables = flax_bn.init(jax.random.key(0), x[0])
  ours, (theirs, updates) = jax.jit(lambda x: (  # one compilation for both
      jax.vmap(lambda x: jaxbn.batch_norm(x, axis_name="i"), axis_name="i")(x),
      jax.vmap(lambda x: flax_bn.apply(variables, x, mutable=["batch_stats"]),
               axis_name="i")(x)))(x)
  _assert_trees_close(ours[0], theirs)
  expected_mean = 0.99 * 0 + 0.01 * ours[1].mean
  _assert_trees_close(updates["batch_stats"]["mean"], expected_mean)
