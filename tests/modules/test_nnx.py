"""jaxbn.nnx.BatchNorm: a drop-in for flax.nnx.BatchNorm, and agreement with jaxbn.linen."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx


def _x(shape=(8, 4), seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + 1, dtype)


def _pair(**kwargs):
  flax_bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0), **kwargs)
  ours = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0), **kwargs)
  rng = np.random.default_rng(1)
  scale = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
  for bn in (flax_bn, ours):
    if bn.scale is not None:
      bn.scale[...] = scale
  return flax_bn, ours


def _state_signature(module):
  return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(module))


@pytest.mark.parametrize("kwargs", [
    {}, {"use_fast_variance": False}, {"axis": 1}, {"use_bias": False, "use_scale": False},
    {"momentum": 0.5},
], ids=["default", "two-pass", "nchw", "no-affine", "momentum"])
def test_parity_with_flax_nnx(kwargs):
  shape = (2, 4, 3, 3) if kwargs.get("axis") == 1 else (8, 4)
  x, w = _x(shape), _x(shape, seed=2)
  flax_bn, ours = _pair(**kwargs)
  assert _state_signature(ours) == _state_signature(flax_bn)

  def train_step(bn, x):
    loss = lambda bn, x: jnp.sum(w * bn(x))
    return nnx.grad(loss, argnums=(0, 1))(bn, x)

  with jax.numpy_dtype_promotion("standard"):
    flax_grads = nnx.jit(train_step)(flax_bn, x)
    our_grads = nnx.jit(train_step)(ours, x)
  tol = dict(rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol),
               nnx.state(ours), nnx.state(flax_bn))  # running averages updated alike
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), our_grads, flax_grads)
  flax_bn.eval(), ours.eval()
  np.testing.assert_allclose(ours(x), flax_bn(x), **tol)


def test_bf16_input_promotes_like_flax():
  flax_bn, ours = _pair()
  x = _x(dtype=jnp.bfloat16)
  with jax.numpy_dtype_promotion("standard"):
    y_flax, y_ours = flax_bn(x), ours(x)
  assert y_ours.dtype == y_flax.dtype == jnp.float32
  np.testing.assert_allclose(y_ours, y_flax, rtol=2e-5, atol=2e-5)


def test_train_eval_and_call_time_override():
  _, bn = _pair()
  x = _x()
  bn.eval()
  y = bn(x)  # running averages: mean 0, var 1
  np.testing.assert_allclose(y, np.asarray(bn.scale[...])[None] * np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)
  np.testing.assert_array_equal(bn.mean[...], 0)
  bn(x, use_running_average=False)  # the call wins over .eval()
  assert np.all(bn.mean[...] != 0)
  bn.train()
  before = bn.mean[...]
  bn(x)
  assert np.all(bn.mean[...] != before)
  view = nnx.view(bn, use_running_average=True)
  assert view.use_running_average is True


def test_flax_state_loads_into_jaxbn():
  flax_bn, ours = _pair()
  with jax.numpy_dtype_promotion("standard"):
    flax_bn(_x())  # move the running averages away from their init
  nnx.update(ours, nnx.state(flax_bn))
  flax_bn.eval(), ours.eval()
  np.testing.assert_allclose(ours(_x(seed=3)), flax_bn(_x(seed=3)), rtol=1e-6, atol=1e-6)


def test_nnx_and_linen_agree():
  x, w = _x(), _x(seed=2)
  _, nnx_bn = _pair(momentum=0.9)
  linen_bn = jaxbn.linen.BatchNorm(momentum=0.9)
  variables = {"params": {"scale": nnx_bn.scale[...], "bias": nnx_bn.bias[...]},
               "batch_stats": {"mean": nnx_bn.mean[...], "var": nnx_bn.var[...]}}
  _, updates = linen_bn.apply(variables, x, use_running_average=False,
                                    mutable=["batch_stats"])
  grads_linen = jax.grad(lambda p: jnp.sum(w * linen_bn.apply(
      {**variables, "params": p}, x, use_running_average=False, mutable=["batch_stats"])[0]))(
          variables["params"])
  grads_nnx = nnx.grad(lambda bn: jnp.sum(w * bn(x)))(nnx_bn)  # updates nnx_bn's stats once
  np.testing.assert_array_equal(nnx_bn.mean[...], updates["batch_stats"]["mean"])
  np.testing.assert_array_equal(nnx_bn.var[...], updates["batch_stats"]["var"])
  np.testing.assert_array_equal(grads_nnx["scale"][...], grads_linen["scale"])
  np.testing.assert_array_equal(grads_nnx["bias"][...], grads_linen["bias"])
  nnx_bn.eval()
  np.testing.assert_array_equal(
      nnx_bn(x), linen_bn.apply({**variables, **updates}, x, use_running_average=True))


def test_cumulative_average_counts_batches():
  bn = jaxbn.nnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0))
  for seed in range(3):
    bn(_x(seed=seed))
  assert int(bn.count[...]) == 3
  np.testing.assert_allclose(
      bn.mean[...], np.mean([_x(seed=s).mean(0) for s in range(3)], 0), rtol=1e-6)


def test_wrong_feature_size_is_an_error():
  _, bn = _pair()
  with pytest.raises(ValueError, match="num_features=4"):
    bn(jnp.ones((3, 5)))


def test_axis_out_of_range_and_masked_eval():
  _, bn = _pair()
  with pytest.raises(ValueError, match="axis 3 is out of range"):
    jaxbn.nnx.BatchNorm(4, axis=3, rngs=nnx.Rngs(0))(jnp.ones((2, 4)))
  bn.eval()
  x = _x().at[7].set(jnp.nan)
  y = bn(x, mask=(jnp.arange(8) < 7)[:, None])
  np.testing.assert_array_equal(y[7], 0)


# ------------------------------------------------------------- Flax's semantics, pinned


def _identity_promotion(arrays, dtype=None):
  del dtype
  return arrays


@pytest.mark.parametrize("use_running_average", [False, True])
def test_dtype_reaches_the_core_as_in_flax(use_running_average):
  # jaxbn.nnx never passed `dtype` to the core: with promote_dtype = identity, a float16
  # module fed float32 returned float32 where Flax returns float16.
  flax_bn, ours = _pair(dtype=jnp.float16, promote_dtype=_identity_promotion,
                        use_running_average=use_running_average)
  x = _x()  # float32 in, float16 asked for
  y_ours = ours(x)  # strict dtype promotion: jaxbn casts explicitly
  with jax.numpy_dtype_promotion("standard"):  # Flax mixes float16 and float32 implicitly
    y_flax = flax_bn(x)
  assert y_ours.dtype == y_flax.dtype == jnp.float16
  np.testing.assert_allclose(y_ours, y_flax, rtol=2e-3, atol=2e-3)  # float16 output
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               nnx.state(ours, nnx.BatchStat), nnx.state(flax_bn, nnx.BatchStat))


def test_batch_of_one_value_per_feature_matches_flax():
  flax_bn, ours = _pair(momentum=0.9)
  x = _x(shape=(1, 4))
  np.testing.assert_array_equal(ours(x), flax_bn(x))  # y = β
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(flax_bn))


def test_tabulate_and_eval_shape_match_flax():
  class Net(nnx.Module):
    def __init__(self, cls, rngs):
      self.bn = cls(4, rngs=rngs)
      self.linear = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(self.bn(x)))  # reused

  x = _x(shape=(1, 4))
  tables = [re.sub(r"\x1b\[[0-9;]*m", "", nnx.tabulate(Net(cls, nnx.Rngs(0)), x,
                                                       console_kwargs={"width": 240}))
            for cls in (nnx.BatchNorm, jaxbn.nnx.BatchNorm)]
  assert tables[0] == tables[1].replace("jaxbn.nnx.", "")
  shapes = [_state_signature(nnx.eval_shape(lambda: Net(cls, nnx.Rngs(0))))
            for cls in (nnx.BatchNorm, jaxbn.nnx.BatchNorm)]
  assert shapes[0] == shapes[1]


def test_the_batch_count_saturates_instead_of_wrapping():
  """As linen's: the momentum=None count stops at 2**31 − 1 instead of wrapping negative."""
  top = np.iinfo(np.int32).max
  x = jax.device_put(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
  bn = jaxbn.nnx.BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
  bn.count[...] = jnp.asarray(top - 1, jnp.int32)
  call = nnx.jit(lambda bn, x: bn(x))
  for step in range(2):
    old = np.asarray(bn.mean[...], np.float64)
    call(bn, x)
    assert int(bn.count[...]) == top, step
    np.testing.assert_allclose(bn.mean[...], old + (np.asarray(x).mean(0) - old) / top,
                               rtol=1e-6)
