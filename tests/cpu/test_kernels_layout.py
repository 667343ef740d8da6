"""The CPU kernels' two layouts on the same values: channels-last (features on the last axis,
vectorized across features) and channels-first (features on axis 1, vectorized along each
feature's contiguous run) must give the same batch norm, and both the float64 truth.

The spatial sizes reach every branch of the channels-first sweeps (jaxbn/csrc/moments.h, grad_sums.h, maps.h;
SweepRun: two vectors of lanes at a time, then one, then single values) with and without a
mask, and the channels-last ones (whole vectors of features, then the features left over;
several chunks of rows, float sums added into double ones).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import kernels

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
    reason="no C++ compiler on this machine, so the kernels cannot be built")

# (N, C, S): S = 32 + 16 + 5 values per run (float32 lanes: 2·16 + 16 + 5) and 64 + 7; C with
# a remainder past whole vectors of 16 features channels-last (37 = 2·16 + 5) or none (32).
SHAPES = [(3, 37, 53), (5, 32, 71), (40, 19, 7)]


def _truth(x, scale, bias, dy, epsilon=1e-5):
  """Eqs. (1)-(7) in float64 on (N, C, S) arrays: y, dx, dγ, dβ."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
  mean = x.mean(axis=(0, 2), keepdims=True)
  var = ((x - mean) ** 2).mean(axis=(0, 2), keepdims=True)
  inv = 1 / np.sqrt(var + epsilon)
  xhat = (x - mean) * inv
  g = scale[None, :, None]
  y = g * xhat + bias[None, :, None]
  dbias = dy.sum(axis=(0, 2))
  dscale = (dy * xhat).sum(axis=(0, 2))
  m = x.shape[0] * x.shape[2]
  dx = g * inv * (dy - dbias[None, :, None] / m - xhat * dscale[None, :, None] / m)
  return y, dx, dscale, dbias


def _step(x, scale, bias, dy, axis, mask=None):
  def f(x, scale, bias):
    return jaxbn.batch_norm(x, scale, bias, axis=axis, mask=mask, use_cpu_kernel=True)[0]
  y, vjp = jax.vjp(f, x, scale, bias)
  return (y, *vjp(dy.astype(y.dtype)))


def _both_layouts(x, scale, bias, dy, mask=None):
  """_step channels-first on (N, C, S) x and dy, and channels-last on the same values
  transposed to (N, S, C), from one compilation; every result back in NumPy, (N, C, S).
  mask: per example, (N, 1, 1), the same for both layouts."""
  first, last = jax.jit(lambda x, scale, bias, dy, x_last, dy_last: (
      _step(x, scale, bias, dy, 1, mask), _step(x_last, scale, bias, dy_last, -1, mask)))(
          x, scale, bias, dy, x.transpose(0, 2, 1), dy.transpose(0, 2, 1))
  first, last = (tuple(np.asarray(v) for v in out) for out in (first, last))
  return first, (last[0].transpose(0, 2, 1), last[1].transpose(0, 2, 1), last[2], last[3])


def _data(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  n, c, _ = shape
  x = rng.standard_normal(shape) * 2 + 3
  dy = rng.standard_normal(shape)
  scale = rng.uniform(0.5, 2, c)
  bias = rng.standard_normal(c)
  # Rounded to the dtype first, so that the truth sees the values the kernels see (in NumPy:
  # outside jit every jnp op compiles a program of its own).
  x, dy = (v.astype(dtype).astype(np.float32) for v in (x, dy))
  return x, dy, scale.astype(np.float32), bias.astype(np.float32)


def test_kernels_serve_both_layouts():
  assert kernels.available(), kernels.status().reason


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_channels_last_and_channels_first_agree_with_float64_truth(shape, dtype, tol):
  x, dy, scale, bias = _data(shape, dtype)
  want = _truth(x, scale, bias, dy)
  # The same values with the features first and, transposed to (N, S, C), last.
  first, last = _both_layouts(x.astype(dtype), scale, bias, dy.astype(dtype))
  for name, w, a, b in zip(("y", "dx", "dscale", "dbias"), want, first, last):
    atol = tol * float(np.max(np.abs(w)))
    np.testing.assert_allclose(np.asarray(a, np.float64), w, rtol=0, atol=atol,
                               err_msg=f"channels-first {name}")
    np.testing.assert_allclose(np.asarray(b, np.float64), w, rtol=0, atol=atol,
                               err_msg=f"channels-last {name}")


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_masked_layouts_agree_and_ignore_the_padding(shape):
  x, dy, scale, bias = _data(shape, jnp.float32, seed=1)
  n = shape[0]
  keep = np.arange(n) != 1  # example 1 is padding, and holds NaN: it must not leak
  x[1] = np.nan
  want = _truth(x[keep], scale, bias, dy[keep])
  first, last = _both_layouts(x, scale, bias, dy, keep.reshape(n, 1, 1))
  for got, label in ((first, "channels-first"), (last, "channels-last")):
    y, dx = np.asarray(got[0], np.float64), np.asarray(got[1], np.float64)
    assert np.all(y[1] == 0) and np.all(dx[1] == 0), f"{label}: padding not zeroed"
    for name, w, g in zip(("y", "dx", "dscale", "dbias"), want,
                          (y[keep], dx[keep], got[2], got[3])):
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0,
                                 atol=2e-5 * float(np.max(np.abs(w))),
                                 err_msg=f"{label} {name}")
