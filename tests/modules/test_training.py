"""Training with jaxbn.linen.BatchNorm: analytic = autodiff trajectories, and data parallelism."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.linen


class MLP(nn.Module):
  gradient: str = "analytic"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    for width in (16, 16):
      x = nn.Dense(width, use_bias=False, param_dtype=x.dtype)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                gradient=self.gradient, axis_name=self.axis_name,
                                param_dtype=x.dtype)(x)
      x = nn.sigmoid(x)
    return nn.Dense(10, param_dtype=x.dtype)(x)


class CNN(nn.Module):
  gradient: str = "analytic"

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(6, (3, 3), use_bias=False, param_dtype=x.dtype)(x)
    x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9,
                              gradient=self.gradient, param_dtype=x.dtype)(x)  # over N·H·W
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
    return nn.Dense(10, param_dtype=x.dtype)(x)


def _batch(shape, seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(shape), dtype),
          jnp.asarray(rng.integers(0, 10, shape[0])))


def _loss(model, params, batch_stats, x, labels):
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates["batch_stats"]


def _sgd_trajectory(model, x, labels, steps=4, learning_rate=0.5):
  variables = model.init(jax.random.key(0), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def step(params, batch_stats):
    (loss, batch_stats), grads = jax.value_and_grad(
        functools.partial(_loss, model), has_aux=True)(params, batch_stats, x, labels)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return params, batch_stats, loss

  losses = []
  for _ in range(steps):
    params, batch_stats, loss = step(params, batch_stats)
    losses.append(loss)
  return params, batch_stats, jnp.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize("model, shape", [(MLP, (16, 8)), (CNN, (4, 6, 6, 2))],
                         ids=["mlp", "cnn"])
def test_analytic_and_autodiff_train_the_same(model, shape):
  x, labels = _batch(shape)
  analytic = _sgd_trajectory(model(gradient="analytic"), x, labels)
  autodiff = _sgd_trajectory(model(gradient="autodiff"), x, labels)
  assert analytic[0]["Dense_0"]["kernel"].dtype == jnp.float64
  assert float(analytic[2][-1]) < float(analytic[2][0])  # it does train
  for got, want in zip(jax.tree.leaves(analytic), jax.tree.leaves(autodiff), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- data parallel

DEVICES = 8


@pytest.mark.slow
def test_sharded_jit_and_shard_map_equal_single_device(mesh):
  x, labels = _batch((32, 8), seed=1, dtype=jnp.float32)
  model = MLP()
  variables = model.init(jax.random.key(0), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  grad_fn = jax.value_and_grad(functools.partial(_loss, model), has_aux=True)

  # One device, the whole batch.
  (loss, stats), grads = jax.jit(grad_fn)(params, batch_stats, x, labels)

  # jit with the batch sharded over 8 devices: XLA inserts the collectives.
  shard = NamedSharding(mesh, P("data"))
  replicate = NamedSharding(mesh, P())
  (loss_jit, stats_jit), grads_jit = jax.jit(grad_fn)(
      jax.device_put(params, replicate), jax.device_put(batch_stats, replicate),
      jax.device_put(x, shard), jax.device_put(labels, shard))
  assert len(grads_jit["Dense_0"]["kernel"].sharding.device_set) == DEVICES

  # shard_map: each device its 4 rows, BN statistics pooled over "data" by axis_name.
  pooled = MLP(axis_name="data")

  def per_device(params, batch_stats, x, labels):
    logits, updates = pooled.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return jax.lax.psum(loss, "data") / x.shape[0] / DEVICES, updates["batch_stats"]

  sharded_loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P()))
  (loss_sm, stats_sm), grads_sm = jax.jit(jax.value_and_grad(sharded_loss, has_aux=True))(
      params, batch_stats, x, labels)

  for got in ((loss_jit, stats_jit, grads_jit), (loss_sm, stats_sm, grads_sm)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves((loss, stats, grads)), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
