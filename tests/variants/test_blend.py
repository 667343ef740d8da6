"""Normalization with statistics blended with running ones: jaxbn.batch_norm(blend=...).

The forward against a NumPy float64 formula, the analytic backward against JAX's autodiff of
the literal reference (`jaxbn.reference.batch_norm_reference(blend=...)`), both paths, masks,
devices pooled with axis_name, the two ends of the weight, and the errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import reference

EPS = 1e-5


def _inputs(seed=0, shape=(6, 3)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.array([1.0, 2.0, 0.5]) + np.array([0.3, -1.0, 2.0])
  blend = jaxbn.Blend(mean=np.array([0.5, -2.0, 2.5]), var=np.array([2.0, 0.5, 1.5]),
                      weight=0.3)
  return (x, rng.uniform(0.5, 2.0, 3), rng.standard_normal(3), rng.standard_normal(shape),
          blend)


def _numpy_forward(x, g, b, blend, mask=None):
  """y = γ (x − μ̃)/√(σ̃² + ε) + β in NumPy float64, the batch's statistics over unmasked rows."""
  rows = x if mask is None else x[mask.ravel()]
  w = blend.weight
  mean = (1 - w) * rows.mean(0) + w * blend.mean
  var = (1 - w) * rows.var(0) + w * blend.var
  return g * (x - mean) / np.sqrt(var + EPS) + b


def _vjp(fn, x, g, b, dy):
  y, vjp = jax.vjp(fn, x, g, b)
  return y, vjp(dy)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "nan-padded"])
@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_forward_and_backward_match_float64_references(masked, use_cpu_kernel, host):
  x, g, b, dy, blend = _inputs()
  mask = None
  if masked:
    mask = (np.arange(6) < 5)[:, None]
    x = np.where(mask, x, np.nan)
  analytic = lambda x, g, b: jaxbn.batch_norm(x, g, b, blend=blend, mask=mask, epsilon=EPS,
                                              use_cpu_kernel=use_cpu_kernel)[0]
  literal = lambda x, g, b: reference.batch_norm_reference(x, g, b, blend=blend, mask=mask,
                                                           epsilon=EPS)
  (y, grads), (y_ref, grads_ref) = host(jax.jit(lambda x, g, b, dy: (
      _vjp(analytic, x, g, b, dy), _vjp(literal, x, g, b, dy)))(x, g, b, dy))
  want = _numpy_forward(np.nan_to_num(x), g, b, blend, mask)
  if masked:
    want = np.where(mask, want, 0.0)
  np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(y_ref, want, rtol=1e-12, atol=1e-12)
  for got, ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
  assert np.all(np.isfinite(grads[0]))
  if masked:
    np.testing.assert_array_equal(grads[0][~mask.ravel()], 0.0)


def test_the_weight_spans_batch_norm_to_running_statistics(host):
  """w = 0 is plain BN, forward and backward; w = 1 normalizes with the running statistics
  alone, so y is the inference formula and dx = γ/σ_R · dy (no batch term left)."""
  x, g, b, dy, blend = _inputs(1)
  run = jax.jit(lambda x, g, b, dy: (
      _vjp(lambda *a: jaxbn.batch_norm(*a, blend=blend._replace(weight=0.0))[0], x, g, b, dy),
      _vjp(lambda *a: jaxbn.batch_norm(*a)[0], x, g, b, dy),
      _vjp(lambda *a: jaxbn.batch_norm(*a, blend=blend._replace(weight=1.0))[0], x, g, b, dy)))
  (y0, grads0), (y_bn, grads_bn), (y1, (dx1, _, _)) = host(run(x, g, b, dy))
  np.testing.assert_allclose(y0, y_bn, rtol=1e-13, atol=1e-13)
  for got, want in zip(grads0, grads_bn, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
  inv_running_std = 1 / np.sqrt(blend.var + EPS)
  np.testing.assert_allclose(y1, g * (x - blend.mean) * inv_running_std + b, rtol=1e-12)
  np.testing.assert_allclose(dx1, g * inv_running_std * dy, rtol=1e-12, atol=1e-14)


def test_autodiff_mode_and_second_order_gradients_agree():
  x, g, b, dy, blend = _inputs(2)

  def hvp(gradient):
    loss = lambda x: jnp.sum(dy * jnp.sin(jaxbn.batch_norm(x, g, b, blend=blend,
                                                           gradient=gradient)[0]))
    return jax.grad(loss)(x), jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)

  (grad_a, hvp_a), (grad_d, hvp_d) = jax.jit(lambda: (hvp("analytic"), hvp("autodiff")))()
  np.testing.assert_allclose(grad_a, grad_d, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(hvp_a, hvp_d, rtol=1e-9, atol=1e-12)


def test_the_running_statistics_and_weight_get_no_gradient():
  x, g, b, dy, blend = _inputs(3)
  loss = lambda blend: jnp.sum(dy * jaxbn.batch_norm(x, g, b, blend=blend)[0])
  grads = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, blend))
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf, 0.0)


def test_a_traced_weight_equals_a_static_one(host):
  x, g, b, dy, blend = _inputs(4)
  traced = jax.jit(lambda w: _vjp(lambda *a: jaxbn.batch_norm(*a, blend=blend._replace(
      weight=w))[0], x, g, b, dy))
  static = jax.jit(lambda: _vjp(lambda *a: jaxbn.batch_norm(*a, blend=blend)[0], x, g, b, dy))
  for got, want in zip(jax.tree.leaves(host(traced(0.3))), jax.tree.leaves(host(static())),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_float32_and_bfloat16_within_their_rounding_of_float64(use_cpu_kernel, host):
  x, g, b, dy, blend = _inputs(5, (64, 3))
  fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, blend=blend, use_cpu_kernel=use_cpu_kernel)[0]
  truth = host(jax.jit(lambda x, g, b, dy: _vjp(fn, x, g, b, dy))(x, g, b, dy))
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    got = host(jax.jit(lambda x, g, b, dy: _vjp(fn, x.astype(dtype), g, b, dy.astype(dtype)))(
        x, g, b, dy))
    for a, want in zip(jax.tree.leaves(got), jax.tree.leaves(truth), strict=True):
      scale = np.max(np.abs(want))
      assert np.max(np.abs(np.asarray(a, np.float64) - want)) <= tol * scale, dtype


def test_pooled_across_devices_equals_one_batch(mesh):
  devices, per_device = 8, 2
  x, g, b, dy, blend = _inputs(6, (devices * per_device, 3))

  def loss(x, g, b):
    def inner(x, g, b, dy):
      y, stats = jaxbn.batch_norm(x, g, b, blend=blend, axis_name="data")
      return jax.lax.psum(jnp.sum(dy * y), "data"), stats
    return jax.shard_map(inner, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                         out_specs=(P(), P()))(x, g, b, dy)

  one = lambda x, g, b: jnp.sum(dy * jaxbn.batch_norm(x, g, b, blend=blend)[0])
  ((value, stats), grads), want_value, want_grads = jax.jit(lambda x, g, b: (
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, g, b),
      *jax.value_and_grad(one, argnums=(0, 1, 2))(x, g, b)))(x, g, b)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)  # the batch's own statistics
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_vmap_with_axis_name_pools_like_one_batch(host):
  """Equinox's way: one example per call, the batch a vmapped axis named for the pooling."""
  x, g, b, dy, blend = _inputs(7)
  per_example = jax.vmap(
      lambda x: jaxbn.batch_norm(x[None], g, b, blend=blend, axis_name="batch")[0][0],
      axis_name="batch")
  y, want = host(jax.jit(lambda x: (per_example(x),
                                    jaxbn.batch_norm(x, g, b, blend=blend)[0]))(x))
  np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(renorm=jaxbn.RenormCorrection(np.ones(3), np.zeros(3))), ValueError, "pass one"),
    (dict(virtual_batch_size=3), ValueError, "virtual_batch_size"),
    (dict(weight=1.5), ValueError, r"blend.weight=1.5 must be in \[0, 1\]"),
    (dict(weight=float("nan")), ValueError, "blend.weight=nan"),
    (dict(weight=True), TypeError, "blend.weight must be a real scalar"),
    (dict(weight="0.3"), TypeError, "blend.weight must be a real scalar"),
    (dict(weight=np.ones(3)), TypeError, "blend.weight must be a real scalar"),
    (dict(mean=np.zeros(4)), ValueError, "blend.mean"),
    (dict(var=np.zeros((3, 1))), ValueError, "blend.var"),
    (dict(blend=(np.zeros(3), np.ones(3), 0.3)), TypeError, "jaxbn.Blend"),
])
def test_bad_blends_raise_at_trace_time_naming_the_argument(kwargs, error, message):
  x, g, b, _, blend = _inputs(8)
  call = {k: kwargs.pop(k) for k in ("renorm", "virtual_batch_size", "blend") if k in kwargs}
  call.setdefault("blend", blend._replace(**kwargs))
  with pytest.raises(error, match=message):
    jax.jit(functools.partial(jaxbn.batch_norm, **call)).lower(x, g, b)
