"""Ghost batches: jaxbn.batch_norm(virtual_batch_size=...) and the modules' field.

Against the literal reference, which normalizes each virtual batch on its own (picked out by
index, not by jaxbn's reshape), in float64: outputs, the analytic gradient vs autodiff, masks,
the CPU kernels and pure JAX, renorm per virtual batch, across devices, bfloat16, errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import linen as jlinen
from jaxbn import nnx as jnnx
from jaxbn import reference

V = 2  # virtual batch size
N, C = 6, 3


def _inputs(seed=0, shape=(N, C)):
  """x, scale, bias, dy in NumPy float64: the tests slice, fill and cast them in NumPy and
  hand them to jitted functions (outside jit every jnp op compiles a program of its own)."""
  rng = np.random.default_rng(seed)
  # Example-dependent offsets: every virtual batch has visibly different statistics.
  x = rng.standard_normal(shape) + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
  feature = C
  return (x, rng.uniform(0.5, 2.0, feature), rng.standard_normal(feature),
          rng.standard_normal(shape))


def _vjp(fn, x, g, b, dy):
  y, vjp = jax.vjp(fn, x, g, b)
  return y, vjp(dy)


def _grads(fn, x, g, b, dy):
  """y and the VJP of dy, in one jit compilation."""
  return jax.jit(functools.partial(_vjp, fn))(x, g, b, dy)


_plain_batch_norm = jax.jit(lambda x, g, b: jaxbn.batch_norm(x, g, b)[0])


def _padding_mask():  # example 4 is padding: virtual batch 1 (examples 1, 4) keeps one value
  return (np.arange(N) != 4)[:, None]


@functools.cache
def _reference_grads(masked):
  """The reference's y and VJP, jitted once per mask and shared by the kernels and pure-JAX
  cases (x, NaN-padded or not, is an argument)."""
  fn = functools.partial(reference.batch_norm_reference, virtual_batch_size=V,
                         mask=_padding_mask() if masked else None)
  return jax.jit(functools.partial(_vjp, fn))


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "nan-padded"])
@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_each_virtual_batch_is_normalized_on_its_own(masked, use_cpu_kernel):
  x, g, b, dy = _inputs()
  mask = None
  if masked:
    mask = _padding_mask()
    x = np.where(mask, x, np.nan)
  analytic = functools.partial(jaxbn.batch_norm, virtual_batch_size=V, mask=mask,
                               use_cpu_kernel=use_cpu_kernel)
  y, grads = jax.tree.map(np.asarray, _grads(lambda *a: analytic(*a)[0], x, g, b, dy))
  y_ref, grads_ref = _reference_grads(masked)(x, g, b, dy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  for got, want in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # Keras 2's split: virtual batch g holds examples g, g + N/V, ... (here {0, 3}, {1, 4}, ...).
  alone = _plain_batch_norm(x[np.array([0, 3])], g, b)
  np.testing.assert_allclose(y[np.array([0, 3])], alone, rtol=1e-12, atol=1e-12)


def test_stats_average_the_virtual_batches():
  x, g, b, _ = _inputs(1)
  stats = jax.jit(lambda *a: jaxbn.batch_norm(*a, virtual_batch_size=V)[1])(x, g, b)
  groups = [x[np.arange(k, N, N // V)] for k in range(N // V)]
  np.testing.assert_allclose(stats.mean, np.mean([v.mean(0) for v in groups], 0), rtol=1e-12)
  np.testing.assert_allclose(stats.var, np.mean([v.var(0) for v in groups], 0), rtol=1e-12)
  np.testing.assert_allclose(stats.count, V)


def test_one_virtual_batch_is_plain_bn():
  x, g, b, dy = _inputs(2)
  (y, grads), (y_bn, grads_bn) = jax.jit(lambda *a: (  # one compilation for both
      _vjp(lambda *p: jaxbn.batch_norm(*p, virtual_batch_size=N)[0], *a),
      _vjp(lambda *p: jaxbn.batch_norm(*p)[0], *a)))(x, g, b, dy)
  np.testing.assert_allclose(y, y_bn, rtol=1e-14, atol=1e-14)
  for got, want in zip(grads, grads_bn, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_nchw_and_renorm_per_virtual_batch():
  """Conv layout, feature axis 1, with renorm: r and d per (virtual batch, feature)."""
  x, g, b, dy = _inputs(3, (4, C, 2, 2))
  renorm = jaxbn.Renorm(jax.device_put(np.array([1.0, 0.0, 2.0])),
                        jax.device_put(np.array([2.0, 0.5, 1.0])), rmax=1.5, rmin=0.7, dmax=0.5)
  kwargs = dict(axis=1, virtual_batch_size=2, renorm=renorm)

  @jax.jit  # y, the VJP and the statistics, and the reference's, in one compilation
  def run(x, g, b, dy):
    y, vjp, stats = jax.vjp(functools.partial(jaxbn.batch_norm, **kwargs), x, g, b,
                            has_aux=True)
    return (y, vjp(dy), stats,
            _vjp(functools.partial(reference.batch_norm_reference, **kwargs), x, g, b, dy))

  y, grads, stats, (y_ref, grads_ref) = run(x, g, b, dy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  for got, want in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert stats.r.shape == stats.d.shape == (2, C)  # (virtual batches, features)


def test_virtual_batches_pool_across_devices(mesh):
  """Virtual batch g of every device pools: one device with the devices' rows interleaved."""
  devices, per_device = 8, 4
  x, g, b, dy = _inputs(4, (devices * per_device, C))

  def loss(x, g, b):
    def inner(x, g, b, dy):
      y, stats = jaxbn.batch_norm(x, g, b, virtual_batch_size=2, axis_name="data")
      return jax.lax.psum(jnp.sum(dy * y), "data"), stats
    return jax.shard_map(inner, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                         out_specs=(P(), P()))(x, g, b, dy)

  # On device k, row i is in virtual batch i mod 2: globally, virtual batch j is every row
  # with index ≡ j (mod 2), i.e. the even rows and the odd rows.
  def one(x, g, b):
    y = jnp.zeros_like(x)
    for j in range(2):
      rows = np.arange(j, x.shape[0], 2)
      y = y.at[rows].set(jaxbn.batch_norm(x[rows], g, b)[0])
    return jnp.sum(dy * y)

  ((value, stats), grads), (want_value, want_grads) = jax.jit(lambda x, g, b: (  # one compile
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, g, b),
      jax.value_and_grad(one, argnums=(0, 1, 2))(x, g, b)))(x, g, b)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  halves = [x[j::2] for j in range(2)]
  np.testing.assert_allclose(stats.var, np.mean([h.var(0) for h in halves], 0), rtol=1e-12)


def test_bfloat16_within_bfloat16_rounding_of_float64():
  x, g, b, dy = _inputs(5)
  x16 = x.astype(jnp.bfloat16)
  g32, b32 = g.astype(np.float32), b.astype(np.float32)
  (y, (dx, _, _)), (y64, (dx64, _, _)) = jax.jit(lambda low, high: (  # one compilation
      _vjp(lambda *a: jaxbn.batch_norm(*a, virtual_batch_size=3)[0], *low),
      _vjp(functools.partial(reference.batch_norm_reference, virtual_batch_size=3), *high)))(
          (x16, g32, b32, dy.astype(jnp.bfloat16)),
          (x16.astype(np.float64), g, b, dy.astype(jnp.bfloat16).astype(np.float64)))
  assert y.dtype == dx.dtype == jnp.bfloat16
  y, dx, y64, dx64 = (np.asarray(v) for v in (y, dx, y64, dx64))
  bf16_eps = 2.0**-8
  assert np.max(np.abs(y.astype(np.float64) - y64)) <= 2 * bf16_eps * np.max(np.abs(y64))
  assert np.max(np.abs(dx.astype(np.float64) - dx64)) <= 4 * bf16_eps * np.max(np.abs(dx64))


@pytest.mark.parametrize("size, error, message", [
    (4, ValueError, "virtual_batch_size=4 does not divide the batch: x has shape \\(6, 3\\)"),
    (np.int64(4), ValueError, "virtual_batch_size=4 does not divide the batch"),
    (0, ValueError, "virtual_batch_size must be a positive int"),
    (True, TypeError, "virtual_batch_size must be an int or None, got True"),
    (np.bool_(True), TypeError, "virtual_batch_size must be an int or None, got (np.)?True"),
    (2.0, TypeError, "virtual_batch_size must be an int or None, got 2.0"),
    ("2", TypeError, "virtual_batch_size must be an int or None, got '2'"),
])
def test_bad_virtual_batch_size_raises_at_trace_time(size, error, message):
  x = jax.device_put(np.ones((N, C)))
  with pytest.raises(error, match=message):
    jax.jit(lambda x: jaxbn.batch_norm(x, virtual_batch_size=size)[0]).lower(x)


def test_numpy_integer_virtual_batch_sizes_are_ints():
  """A NumPy integer (e.g. from a config loaded with NumPy) is the same virtual batch size."""
  x = jax.device_put(_inputs(7)[0])
  sizes = (V, np.int64(V), np.int32(V), np.uint8(V))
  ys = jax.jit(lambda x: [jaxbn.batch_norm(x, virtual_batch_size=v)[0] for v in sizes])(x)
  for y in ys[1:]:
    np.testing.assert_array_equal(y, ys[0])


def test_modules_keep_the_virtual_batches_average():
  x = jax.device_put(_inputs(6)[0].astype(np.float32))
  lin = jlinen.BatchNorm(momentum=0.0, virtual_batch_size=V)

  @jax.jit  # linen's init and apply and the function, in one compilation
  def linen_and_function(x):
    variables = lin.init(jax.random.key(0), x, use_running_average=False)
    y, updates = lin.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return variables, y, updates, jaxbn.batch_norm(x, virtual_batch_size=V)

  variables, y, updates, (want_y, want) = linen_and_function(x)
  assert set(variables["batch_stats"]) == {"mean", "var"}  # no new state
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], want.mean, rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], want.var, rtol=1e-6)
  mod = jnnx.BatchNorm(C, momentum=0.0, virtual_batch_size=V, rngs=nnx.Rngs(0))
  # nnx.jit writes the module's updated statistics back, as the eager call would.
  np.testing.assert_allclose(nnx.jit(lambda mod, x: mod(x))(mod, x), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mod.var[...], want.var, rtol=1e-6)
  with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide"):
    jnnx.BatchNorm(C, virtual_batch_size=4, rngs=nnx.Rngs(0))(x)
