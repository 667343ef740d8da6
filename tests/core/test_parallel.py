"""batch_norm with axis_name: pooled statistics across devices equal one big batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn

DEVICES = 8
PER_DEVICE = 3
FEATURES = 4


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  # Uneven means per device, so a per-device (unpooled) statistic would be visibly wrong.
  x = rng.standard_normal((DEVICES, PER_DEVICE, FEATURES)) + np.arange(DEVICES)[:, None, None]
  dy = rng.standard_normal(x.shape)
  scale = rng.uniform(0.5, 2.0, FEATURES)
  bias = rng.standard_normal(FEATURES)
  # Different numbers of real rows per device: 3, 2, 1, 3, 2, 1, ... (count-weighted stats).
  rows = np.arange(PER_DEVICE)[None, :] < (PER_DEVICE - np.arange(DEVICES) % 3)[:, None]
  mask = rows[..., None]
  x_padded = np.where(mask, x, np.nan)
  # Placed with jax.device_put: jnp.asarray of a NumPy array compiles a program of its own.
  return {k: jax.device_put(v) for k, v in dict(
      x=x, x_padded=x_padded, dy=dy, scale=scale, bias=bias, mask=mask).items()}


@functools.partial(jax.jit, static_argnames="gradient")
def _single_device(x, scale, bias, dy, mask, gradient):
  """Reference: one batch_norm over the concatenated batch (8·3 rows); jitted, so that the
  tests asking for the same reference share one compilation."""
  flat = lambda v: None if v is None else v.reshape(-1, v.shape[-1])
  loss = lambda x, s, b: jnp.sum(
      flat(dy) * jaxbn.batch_norm(x, s, b, mask=flat(mask), gradient=gradient)[0]
  )
  y, stats = jaxbn.batch_norm(flat(x), scale, bias, mask=flat(mask), gradient=gradient)
  grads = jax.grad(loss, argnums=(0, 1, 2))(flat(x), scale, bias)
  return y, stats, grads


def _per_device(x, scale, bias, dy, mask, gradient):
  """What each device runs: its own rows, statistics pooled over "data"."""
  def loss(x, s, b):
    y, _ = jaxbn.batch_norm(x, s, b, mask=mask, axis_name="data", gradient=gradient)
    return jnp.sum(dy * y)

  y, stats = jaxbn.batch_norm(x, scale, bias, mask=mask, axis_name="data", gradient=gradient)
  return y, stats, jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)


def _assert_matches_single_device(y, stats, grads, want, rtol=1e-12):
  # In NumPy: reshaping a jax array outside jit compiles a program of its own.
  y, stats, grads, want = jax.tree.map(np.asarray, (y, stats, grads, want))
  y_want, stats_want, grads_want = want
  np.testing.assert_allclose(np.nan_to_num(y).reshape(-1, FEATURES), y_want, rtol=rtol, atol=1e-12)
  np.testing.assert_allclose(stats.mean, stats_want.mean, rtol=rtol)
  np.testing.assert_allclose(stats.var, stats_want.var, rtol=rtol)
  dx, dscale, dbias = grads
  np.testing.assert_allclose(dx.reshape(-1, FEATURES), grads_want[0], rtol=rtol, atol=1e-12)
  np.testing.assert_allclose(dscale, grads_want[1], rtol=rtol)
  np.testing.assert_allclose(dbias, grads_want[2], rtol=rtol)
  assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("gradient", ["analytic", "autodiff"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "per-device-masks"])
def test_shard_map_equals_single_device(mesh, batch, gradient, masked):
  x = batch["x_padded"] if masked else batch["x"]
  mask = batch["mask"] if masked else None
  want = _single_device(x, batch["scale"], batch["bias"], batch["dy"], mask, gradient)

  def step(x, scale, bias, dy, mask):
    y, stats, (dx, dscale, dbias) = _per_device(x[0], scale, bias, dy[0], None if mask is None else mask[0],
                                                gradient)
    # dγ, dβ are this device's sums (as autodiff gives them inside shard_map); the replicated
    # parameters' gradient is their psum, which JAX's transpose of the replication inserts.
    return y[None], stats, (dx[None], dscale, dbias)

  run = jax.jit(jax.shard_map(
      step, mesh=mesh,
      in_specs=(P("data"), P(), P(), P("data"), None if mask is None else P("data")),
      out_specs=(P("data"), P(), (P("data"), P(), P())),
  ))
  y, stats, grads = run(x, batch["scale"], batch["bias"], batch["dy"], mask)
  _assert_matches_single_device(y, stats, grads, want)


def test_shard_map_gradient_through_replicated_params(mesh, batch):
  """jax.grad outside shard_map: the replicated γ, β get the global sums, as with autodiff."""
  def loss(scale, bias, x, dy, gradient):
    def inner(x, scale, bias, dy):
      y, _ = jaxbn.batch_norm(x[0], scale, bias, axis_name="data", gradient=gradient)
      return jax.lax.psum(jnp.sum(dy[0] * y), "data")
    return jax.shard_map(inner, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                         out_specs=P())(x, scale, bias, dy)

  args = (batch["scale"], batch["bias"], batch["x"], batch["dy"])
  analytic, autodiff = jax.jit(lambda *args: tuple(  # one compilation for both
      jax.grad(loss, argnums=(0, 1))(*args, gradient) for gradient in ("analytic", "autodiff")))(
          *args)
  _, _, want = _single_device(batch["x"], batch["scale"], batch["bias"], batch["dy"], None,
                              "autodiff")
  for got, ref, full in zip(analytic, autodiff, want[1:], strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(got, full, rtol=1e-12)


def test_pmap_equals_single_device(batch):
  want = _single_device(batch["x_padded"], batch["scale"], batch["bias"], batch["dy"],
                        batch["mask"], "analytic")
  run = jax.pmap(functools.partial(_per_device, gradient="analytic"), axis_name="data",
                 in_axes=(0, None, None, 0, 0))
  y, stats, (dx, dscale, dbias) = jax.tree.map(np.asarray, run(
      batch["x_padded"], batch["scale"], batch["bias"], batch["dy"], batch["mask"]))
  # pmap keeps per-device γ, β gradients; their sum is the single-device gradient.
  _assert_matches_single_device(
      y, jax.tree.map(lambda s: s[0], stats), (dx, dscale.sum(0), dbias.sum(0)), want)
  np.testing.assert_allclose(stats.mean, np.broadcast_to(stats.mean[0], stats.mean.shape))


@pytest.mark.slow
def test_vmap_axis_name_equals_single_device(batch):
  want = _single_device(batch["x"], batch["scale"], batch["bias"], batch["dy"], None, "analytic")
  y, stats, (dx, dscale, dbias) = jax.vmap(
      functools.partial(_per_device, gradient="analytic"), axis_name="data",
      in_axes=(0, None, None, 0, None),
  )(batch["x"], batch["scale"], batch["bias"], batch["dy"], None)
  _assert_matches_single_device(
      y, jax.tree.map(lambda s: s[0], stats), (dx, dscale.sum(0), dbias.sum(0)), want)


def test_axis_index_groups_pool_within_groups(batch):
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  run = jax.pmap(
      lambda x: jaxbn.batch_norm(x, axis_name="data", axis_index_groups=groups)[1].mean,
      axis_name="data")
  means = np.asarray(run(batch["x"]))
  x = np.asarray(batch["x"])
  for group in groups:
    want = x[np.array(group)].reshape(-1, FEATURES).mean(0)
    for device in group:
      np.testing.assert_allclose(means[device], want, rtol=1e-12)
