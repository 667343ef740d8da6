"""The CPU kernels' streaming-store path: outputs (y, dx) of at least kStreamingMinBytes
(jaxbn/csrc/simd.h) are written with non-temporal stores after an unaligned head peeled
one value at a time (maps.h, WriteRun). The shapes here are just above that size, with
feature counts and runs that leave rows and runs off the 32-byte boundary (37 features of
float32 or bfloat16 channels-last, runs of 2801 values channels-first), so every head, body
and tail branch runs (and 64 bfloat16 features, whole-line rows); each is checked against float64 truth and against the pure-JAX path.
"""

import os
import pathlib
import re
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

SIMD_H = pathlib.Path(jaxbn.__file__).parent / "csrc" / "simd.h"


def _streaming_min_bytes():
  match = re.search(r"kStreamingMinBytes = int64_t\{(\d+)\} << (\d+);", SIMD_H.read_text())
  assert match, "kStreamingMinBytes not found in simd.h: update this test with it"
  return int(match.group(1)) << int(match.group(2))


# (layout, (N, C, S), dtype): N·C·S just above the threshold in the dtype's bytes.
CASES = [
    ("last", (64, 37, 900), jnp.float32),
    ("first", (40, 19, 2801), jnp.float32),
    ("last", (64, 37, 1777), jnp.bfloat16),
    # 64 features: rows of whole lines, the bfloat16 loop nest of maps.h (MapRows).
    ("last", (64, 64, 1025), jnp.bfloat16),
]


def _truth(x, scale, bias, dy, epsilon=1e-5):
  """Eqs. (1)-(7) in float64 on (N, C, S) arrays: y, dx, dγ, dβ."""
  mean = x.mean(axis=(0, 2), keepdims=True)
  var = ((x - mean) ** 2).mean(axis=(0, 2), keepdims=True)
  inv = 1 / np.sqrt(var + epsilon)
  xhat = (x - mean) * inv
  g = scale[None, :, None]
  dbias = dy.sum(axis=(0, 2))
  dscale = (dy * xhat).sum(axis=(0, 2))
  m = x.shape[0] * x.shape[2]
  dx = g * inv * (dy - dbias[None, :, None] / m - xhat * dscale[None, :, None] / m)
  return g * xhat + bias[None, :, None], dx, dscale, dbias


def _steps(axis, paths, mask=None):
  """One jit: y, dx, dγ, dβ of batch_norm for each use_cpu_kernel in `paths`."""
  @jax.jit
  def steps(x, scale, bias, dy):
    out = []
    for use_cpu_kernel in paths:
      def f(x, scale, bias, use_cpu_kernel=use_cpu_kernel):
        return jaxbn.batch_norm(x, scale, bias, axis=axis, mask=mask,
                                use_cpu_kernel=use_cpu_kernel)[0]
      y, vjp = jax.vjp(f, x, scale, bias)
      out.append((y, *vjp(dy)))
    return out
  return steps


def _to_layout(v, layout):
  """(N, C, S) → the layout's array: (N, C, S) channels-first, (N, S, C) channels-last."""
  return v if layout == "first" else np.swapaxes(v, 1, 2)


def _data(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[1]
  # Rounded to the dtype first (in NumPy: bfloat16 is an ml_dtypes type), so that the truth
  # sees the values the kernels see.
  x, dy = (np.asarray(v, dtype).astype(np.float64)
           for v in (rng.standard_normal(shape) * 2 + 3, rng.standard_normal(shape)))
  return x, dy, rng.uniform(0.5, 2, c), rng.standard_normal(c)


def test_the_cases_are_above_the_streaming_threshold():
  threshold = _streaming_min_bytes()
  for _, shape, dtype in CASES:
    assert np.prod(shape) * jnp.dtype(dtype).itemsize >= threshold, (shape, dtype)
  assert kernels.available(), kernels.status().reason


@pytest.mark.parametrize("layout,shape,dtype", CASES)
def test_streamed_outputs_match_float64_truth_and_the_pure_path(layout, shape, dtype):
  x, dy, scale, bias = _data(shape, dtype)
  want = _truth(x, scale, bias, dy)
  axis = 1 if layout == "first" else -1
  args = (np.asarray(_to_layout(x, layout), dtype), np.asarray(scale, np.float32),
          np.asarray(bias, np.float32), np.asarray(_to_layout(dy, layout), dtype))
  got, pure = _steps(axis, (True, False))(*args)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for name, w, k, p in zip(("y", "dx", "dscale", "dbias"), want, got, pure):
    if name in ("y", "dx"):
      k, p = (_to_layout(np.asarray(v, np.float64), layout) for v in (k, p))
    atol = tol * float(np.max(np.abs(w)))
    np.testing.assert_allclose(np.asarray(k, np.float64), w, rtol=0, atol=atol,
                               err_msg=f"kernels {name}")
    np.testing.assert_allclose(np.asarray(k, np.float64), np.asarray(p, np.float64), rtol=0,
                               atol=atol, err_msg=f"kernels against the pure path, {name}")


@pytest.mark.parametrize("layout,shape,dtype", CASES[:2])
def test_streamed_masked_outputs_are_zero_and_nan_padding_does_not_leak(layout, shape, dtype):
  x, dy, scale, bias = _data(shape, dtype, seed=1)
  n = shape[0]
  keep = np.arange(n) % 4 != 1  # a quarter of the examples are padding, holding NaN
  x[~keep] = np.nan
  want = _truth(x[keep], scale, bias, dy[keep])
  mask = np.asarray(keep).reshape(n, 1, 1)
  (got,) = _steps(1 if layout == "first" else -1, (True,), mask)(
      np.asarray(_to_layout(x, layout), dtype), np.asarray(scale, np.float32),
      np.asarray(bias, np.float32), np.asarray(_to_layout(dy, layout), dtype))
  y, dx = (_to_layout(np.asarray(v, np.float64), layout) for v in got[:2])
  assert np.all(y[~keep] == 0) and np.all(dx[~keep] == 0), "padding not zeroed"
  for name, w, g in zip(("y", "dx", "dscale", "dbias"), want, (y[keep], dx[keep], *got[2:])):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0,
                               atol=2e-5 * float(np.max(np.abs(w))), err_msg=name)
