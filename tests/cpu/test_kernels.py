"""jaxbn.kernels: the C++ CPU kernels against float64 truth, their pure-JAX twins and the
pure-JAX path of batch_norm; when calls use them; how jaxbn behaves where they cannot build."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import kernels
from jaxbn._cpu import library

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
    reason="no C++ compiler on this machine, so the kernels cannot be built")

# (shape, feature axes). The sizes reach every code path of the kernels: feature
# counts that are not a multiple of the SIMD width (tails), more rows than one chunk, enough
# elements for two threads, channels-first runs longer than one chunk, a batch of one, one row.
CASES = {
    "nhwc-tail": ((7, 5, 3, 33), -1),
    "dense-two-threads": ((3000, 70), -1),
    "dense-wide": ((96, 1100), -1),
    "nchw": ((4, 6, 9, 10), 1),
    "nchw-long-runs": ((2, 3, 70001), 1),
    "nchw-one-example": ((1, 2, 90001), 1),  # one example: threads split within a segment
    "two-axes": ((5, 6, 7), (1, 2)),
    "one-row-of-pairs": ((2, 17), -1),
    # 64 features: bfloat16 rows of whole 64-byte lines, which maps.h maps by its plain
    # loop nest.
    "nhwc-whole-lines": ((3, 5, 4, 64), -1),
}


def _view(shape, axis):
  axes = sorted(a % len(shape) for a in np.atleast_1d(axis))
  return kernels.FeatureView(int(np.prod([shape[a] for a in axes])),
                        int(np.prod(shape[axes[-1] + 1:])))


def _truth_moments(x, view):
  # In long double (80-bit on x86): float64 kernels need a truth finer than float64.
  x3 = np.asarray(x, np.float64).astype(np.longdouble).reshape(-1, view.features,
                                                                view.inner)
  mean = x3.mean(axis=(0, 2))
  return mean, ((x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2))


def _data(shape, dtype, offset=0.0, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 3 + offset
  dy = rng.standard_normal(shape)
  # Rounded to dtype by numpy and put on the device as is: jnp.asarray compiles a program.
  return jax.device_put(x.astype(dtype)), jax.device_put(dy.astype(dtype))


def test_kernels_build_here():
  # A build failure must fail CI, not fall back silently to the slower path.
  assert kernels.available(), kernels.status().reason
  # A shared cache directory must hold a library every user can load.
  assert kernels.status().library.stat().st_mode & 0o005 == 0o005


@pytest.mark.slow
def test_kernels_run_in_a_fresh_process_without_batch_norm_first():
  code = ("import jax.numpy as jnp; from jaxbn import kernels; "
          "print(kernels.moments(kernels.FeatureView(3, 1), jnp.arange(12.0).reshape(4, 3))[0])")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "[4.5 5.5 6.5]" in result.stdout


def test_kernels_check_their_operands_at_trace_time():
  # Operands built in numpy: jnp.ones, jnp.asarray, astype would each compile one.
  x = jax.device_put(np.ones((4, 3), np.float32))
  view = kernels.FeatureView(3, 1)
  v = jax.device_put(np.ones(3, np.float32))
  with pytest.raises(ValueError, match="hi must be float32"):
    kernels.grad_sums(view, x, x, jax.device_put(np.ones(3, np.float64)), v)
  with pytest.raises(ValueError, match="b must be float32"):
    kernels.normalize(view, x, v, v, v, jax.device_put(np.ones(4, np.float32)))
  with pytest.raises(ValueError, match="does not split"):
    kernels.moments(kernels.FeatureView(5, 1), x)
  with pytest.raises(TypeError, match="float16"):
    kernels.moments(view, jax.device_put(np.ones((4, 3), np.float16)))
  with pytest.raises(ValueError, match="scale must be float32"):
    kernels.forward(view, x, jax.device_put(np.ones(4, np.float32)), v, epsilon=1e-5)
  with pytest.raises(TypeError, match="write float32, bfloat16 or float64"):
    kernels.forward(view, x, v, v, epsilon=1e-5, out_dtype=jnp.int32)
  with pytest.raises(ValueError, match="inv_std must be float32"):
    kernels.backward(view, x, x, v, v, jax.device_put(np.ones(3, jnp.bfloat16)), v)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_moments_match_float64_truth(case, dtype):
  shape, axis = CASES[case]
  view = _view(shape, axis)
  x, _ = _data(shape, dtype, offset=100.0)
  hi, lo, m2 = kernels.moments(view, x)
  mean, m2_true = _truth_moments(x, view)  # of the values x holds, after its rounding
  mean_k = np.asarray(hi, np.longdouble) + np.asarray(lo, np.longdouble)
  eps = np.finfo(hi.dtype).eps
  sigma = np.sqrt(m2_true / (x.size / view.features))
  # μ to a few ulps of σ (not of |μ|, which is 100σ/3 here): float32 statistics carry μ as
  # hi + lo; a float64 μ is one float64 (lo = 0), so there its own rounding, ε·|μ|, counts.
  bar = 8 * eps * (sigma + (np.abs(mean) if dtype == jnp.float64 else 0))
  np.testing.assert_array_less(np.abs(mean_k - mean), bar)
  np.testing.assert_array_less(np.abs(np.asarray(m2, np.longdouble) - m2_true),
                               64 * eps * m2_true)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_channels_last_moments_sweep_again_where_their_shift_is_far_from_the_mean(dtype):
  # Channels-last statistics sweep a part once for Σd, Σd² of d = x − shift, the shift being
  # the mean of 16 rows spread evenly over the part (moments.h, ShiftOfRows): here rows 0, 200,
  # ..., 3000 of the one part (64,000 elements: one thread). There features 3-19 hold
  # 1e4 + N(0, 1), all else is N(0, 1): their shift sits 14σ from the mean, where
  # Σd² − (Σd)²/n cancels ~8 bits, so the kernel must notice and sweep features 3-19 again
  # (17 of them: vectors and a tail in both dtypes) against its estimate of their means, and
  # keep features 0-2 as they are. With that second sweep removed, M2 was off by 37ε
  # (float32) and 2259ε (float64) relative; with it, 0.9ε and 4.4ε.
  rows, features = 3200, 20
  rng = np.random.default_rng(0)
  x = rng.standard_normal((rows, features))
  x[::200, 3:] += 1e4
  x = jax.device_put(x.astype(dtype))
  hi, lo, m2 = kernels.moments(kernels.FeatureView(features, 1), x)
  mean, m2_true = _truth_moments(x, kernels.FeatureView(features, 1))
  eps = np.finfo(dtype).eps
  sigma = np.sqrt(m2_true / rows)
  mean_k = np.asarray(hi, np.longdouble) + np.asarray(lo, np.longdouble)
  np.testing.assert_array_less(np.abs(mean_k - mean), 8 * eps * sigma)
  np.testing.assert_array_less(np.abs(np.asarray(m2, np.longdouble) - m2_true),
                               16 * eps * m2_true)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_channels_first_moments_sweep_a_piece_again_where_the_shift_is_far_from_it(dtype):
  # Channels-first statistics take a part's first piece of each feature as the shift of
  # every later piece of it, swept once against it (moments.h, MomentsPieces). Here example
  # 0's plane of feature 0 (the first piece, one part: 64,000 elements) holds 1e5 + N(0, 1)
  # and the other 31 N(0, 1): each later piece sits 1e5 of its σ from the shift, so it must
  # be swept again against its own mean; feature 1, all N(0, 1), is the control. Accepting
  # every piece put M2 off by 31ε (float32) and 37ε (float64) relative; with the check,
  # 0.2ε and 0.8ε.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((32, 2, 1000))
  x[0, 0] += 1e5
  x = jax.device_put(x.astype(dtype))
  view = kernels.FeatureView(2, 1000)
  hi, lo, m2 = kernels.moments(view, x)
  mean, m2_true = _truth_moments(x, view)
  eps = np.finfo(dtype).eps
  sigma = np.sqrt(m2_true / (x.size / 2))
  mean_k = np.asarray(hi, np.longdouble) + np.asarray(lo, np.longdouble)
  np.testing.assert_array_less(np.abs(mean_k - mean), 8 * eps * sigma)
  np.testing.assert_array_less(np.abs(np.asarray(m2, np.longdouble) - m2_true),
                               8 * eps * m2_true)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_their_twins(case, dtype):
  shape, axis = CASES[case]
  view = _view(shape, axis)
  x, dy = _data(shape, dtype, offset=2.0)
  rng = np.random.default_rng(1)
  a, b, k = (jax.device_put(rng.uniform(0.5, 2, view.features).astype(np.float32))
             for _ in range(3))

  @jax.jit  # one compilation per case for every call below
  def run(x, dy, a, b, k):
    hi, lo, _ = kernels.moments(view, x)
    pairs = {
        "normalize": (kernels.normalize(view, x, hi, lo, a, b),
                      kernels.normalize_xla(view, x, hi, lo, a, b)),
        "normalize to float32": (
            kernels.normalize(view, x, hi, lo, a, b, out_dtype=jnp.float32),
            kernels.normalize_xla(view, x, hi, lo, a, b, out_dtype=jnp.float32)),
        "grad_input": (kernels.grad_input(view, x, dy, hi, lo, a, b, k),
                       kernels.grad_input_xla(view, x, dy, hi, lo, a, b, k)),
        "grad_input, float32 dy": (
            kernels.grad_input(view, x, dy.astype(jnp.float32), hi, lo, a, b, k),
            kernels.grad_input_xla(view, x, dy.astype(jnp.float32), hi, lo, a, b, k)),
    }
    return hi, lo, pairs, kernels.grad_sums(view, x, dy, hi, lo)

  hi, lo, pairs, (sum_g, sum_gc) = run(x, dy, a, b, k)
  assert hi.dtype == jnp.float32  # the statistics of float32 and bfloat16 x
  for name, (got, want) in pairs.items():
    assert got.dtype == want.dtype and got.shape == want.shape, name
    # Elementwise in float32 then rounded: equal up to one rounding of the output.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=float(jnp.finfo(got.dtype).eps), atol=1e-6, err_msg=name)
  # Sums: float32 partial sums over chunks, float64 between them, against float64 truth.
  x3, g3 = (np.asarray(v, np.float64).reshape(-1, view.features, view.inner)
            for v in (x, dy))
  centred = x3 - (np.asarray(hi, np.float64) + np.asarray(lo, np.float64))[None, :, None]
  scale = np.abs(g3).sum(axis=(0, 2))
  np.testing.assert_allclose(sum_g, g3.sum(axis=(0, 2)), rtol=0, atol=1e-6 * scale.max())
  np.testing.assert_allclose(sum_gc, (g3 * centred).sum(axis=(0, 2)), rtol=0,
                             atol=1e-6 * (np.abs(g3 * centred).sum(axis=(0, 2))).max())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_fused_forward_and_backward_match_their_twins(case, dtype):
  shape, axis = CASES[case]
  view = _view(shape, axis)
  x, dy = _data(shape, dtype, offset=100.0)
  cdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
  rng = np.random.default_rng(5)
  scale, bias = (jax.device_put(rng.uniform(0.5, 2, view.features).astype(cdt))
                 for _ in range(2))

  @jax.jit  # one compilation per case for both paths
  def run(x, dy, scale, bias):
    got = kernels.forward(view, x, scale, bias, epsilon=1e-3)
    want = kernels.forward_xla(view, x, scale, bias, epsilon=1e-3)
    hi, lo, inv_std = got[1], got[2], got[4]
    got += kernels.backward(view, x, dy, hi, lo, inv_std, scale)
    want += kernels.backward_xla(view, x, dy, hi, lo, inv_std, scale)
    return got, want

  got, want = run(x, dy, scale, bias)
  hi, lo = got[1], got[2]
  eps = float(jnp.finfo(cdt).eps)
  # μ = hi + lo as a whole, against long-double truth to a few ulps of σ (not of |μ|): lo
  # carries what hi cannot, so an all-zero lo would fail this in float32.
  mean, m2_true = _truth_moments(x, view)
  sigma = np.sqrt(m2_true / (x.size / view.features))
  mean_k = np.asarray(hi, np.longdouble) + np.asarray(lo, np.longdouble)
  np.testing.assert_array_less(
      np.abs(mean_k - mean), 8 * eps * (sigma + (np.abs(mean) if cdt == jnp.float64 else 0)))
  # The variance too, against truth (the bound of test_moments_match_float64_truth): here
  # the twin's own float32 sums are the less exact.
  np.testing.assert_array_less(np.abs(np.asarray(got[3], np.longdouble) - sigma**2),
                               64 * eps * sigma**2)
  names = ("y", "hi", "lo", "var", "inv_std", "count", "dx", "d_scale", "d_bias")
  assert got[5].shape == (0,)  # m is x.size / features: no count without a mask
  for name, g, w in zip(names, got, want):
    assert g.dtype == w.dtype and g.shape == w.shape, name
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if name in ("lo", "var", "count"):  # checked above (lo as part of hi + lo)
      continue
    # Per-element results within a few roundings of their dtype; sums (and what is formed
    # from them) added in another order, so within a few ulps of the largest term. A float64
    # μ is a single float64 (lo = 0), whose rounding ε·|μ| moves x − μ by up to ε·|μ|/σ.
    tol = 8 * float(jnp.finfo(x.dtype).eps if name in ("y", "dx") else eps)
    if cdt == jnp.float64:
      tol *= 1 + float(np.max(np.abs(mean) / sigma))
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * max(np.abs(w).max(), 1.0),
                               err_msg=name)


def _padding_mask(x, view, seed=7):
  """A random mask shared by all features, (outer, 1, inner), with one whole outer slice
  masked; x gets NaN where masked (the kernels must not let it through)."""
  rng = np.random.default_rng(seed)
  outer = x.size // (view.features * view.inner)
  keep = rng.random((outer, 1, view.inner)) > 0.3
  keep[outer // 2] = False
  x3 = np.asarray(x, np.float64).reshape(outer, view.features, view.inner)
  x3 = np.where(keep, x3, np.nan)
  return jax.device_put(x3.reshape(x.shape).astype(x.dtype)), jax.device_put(keep)


@pytest.mark.parametrize("case", CASES)
def test_masked_kernels_match_their_twins_and_zero_the_padding(case):
  shape, axis = CASES[case]
  view = _view(shape, axis)
  x, dy = _data(shape, jnp.float32, offset=3.0)
  x, keep = _padding_mask(x, view)
  rng = np.random.default_rng(8)
  scale, bias, a, b, k = (jax.device_put(rng.uniform(0.5, 2, view.features).astype(np.float32))
                          for _ in range(5))

  @jax.jit  # one compilation per case for every pair
  def run(x, dy, keep, scale, bias, a, b, k):
    fwd = kernels.forward(view, x, scale, bias, keep, epsilon=1e-3)
    hi, lo = fwd[1], fwd[2]
    return fwd, {
        "forward": (fwd, kernels.forward_xla(view, x, scale, bias, keep, epsilon=1e-3)),
        "backward": (kernels.backward(view, x, dy, hi, lo, fwd[4], scale, keep),
                     kernels.backward_xla(view, x, dy, hi, lo, fwd[4], scale, keep)),
        "moments": (kernels.moments(view, x, keep), kernels.moments_xla(view, x, keep)),
        "normalize": ((kernels.normalize(view, x, hi, lo, a, b, keep),),
                      (kernels.normalize_xla(view, x, hi, lo, a, b, keep),)),
        "grad_sums": (kernels.grad_sums(view, x, dy, hi, lo, keep),
                      kernels.grad_sums_xla(view, x, dy, hi, lo, keep)),
        "grad_input": ((kernels.grad_input(view, x, dy, hi, lo, a, b, k, keep),),
                       (kernels.grad_input_xla(view, x, dy, hi, lo, a, b, k, keep),)),
    }

  fwd, pairs = run(x, dy, keep, scale, bias, a, b, k)
  hi, lo = fwd[1], fwd[2]
  padding = ~np.broadcast_to(np.asarray(keep), (keep.shape[0], view.features, view.inner))
  for name, (got, want) in pairs.items():
    for i, (g, w) in enumerate(zip(got, want)):
      g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
      assert np.all(np.isfinite(g)), f"{name}[{i}] let NaN padding through"
      if g.shape == x.shape:  # y or dx: exactly 0 where masked
        assert not np.any(g.reshape(padding.shape)[padding]), f"{name}[{i}] padding not 0"
      if name == "moments" and i == 1:  # lo: checked as part of hi + lo below
        continue
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(np.abs(w).max(), 1.0),
                                 err_msg=f"{name}[{i}]")
  # The statistics are those of the unmasked values alone (μ = var = 0 where there are
  # none: the one-example case masks everything).
  x3 = np.where(padding, 0.0, np.asarray(x, np.float64).reshape(padding.shape))
  n = np.sum(~padding, axis=(0, 2))
  mean = x3.sum(axis=(0, 2)) / np.maximum(n, 1)
  var = np.where(padding, 0.0, (x3 - mean[None, :, None]) ** 2).sum(axis=(0, 2)) / np.maximum(n, 1)
  np.testing.assert_allclose(np.asarray(hi, np.float64) + np.asarray(lo, np.float64), mean,
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(fwd[3], var, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fwd[5], n)


def _bn_outputs(x, scale, bias, dy, axis, use_cpu_kernel, **kwargs):
  def f(x, scale, bias):
    return jaxbn.batch_norm(x, scale, bias, axis=axis, use_cpu_kernel=use_cpu_kernel, **kwargs)
  (y, stats), vjp = jax.vjp(f, x, scale, bias)
  return (y, stats.mean, stats.var, *vjp((dy, jax.tree.map(jnp.zeros_like, stats))))


def _bn_with_and_without_kernels(x, scale, bias, dy, axis, **kwargs):
  """_bn_outputs with the kernels and without, both from one compilation."""
  return jax.jit(lambda *a: tuple(_bn_outputs(*a, axis, use, **kwargs) for use in (True, False)))(
      x, scale, bias, dy)


@pytest.mark.parametrize("case", ["nhwc-tail", "nchw", "two-axes", "dense-wide"])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_batch_norm_with_kernels_equals_pure_jax(case, dtype, rtol):
  shape, axis = CASES[case]
  x, dy = _data(shape, dtype, offset=5.0)
  n = _view(shape, axis).features
  rng = np.random.default_rng(2)
  scale = jax.device_put(rng.uniform(0.5, 2, n).astype(dtype).reshape(
      [shape[a % len(shape)] for a in sorted(a % len(shape) for a in np.atleast_1d(axis))]))
  bias = jax.device_put(rng.standard_normal(scale.shape).astype(dtype))
  got, want = _bn_with_and_without_kernels(x, scale, bias, dy, axis)
  names = ("y", "mean", "var", "dx", "dscale", "dbias")
  for name, g, w in zip(names, got, want):
    scale_of = float(np.max(np.abs(np.asarray(w))))
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale_of, err_msg=name)


@pytest.mark.parametrize("shape,axis,mask_shape", [
    ((6, 5, 4, 33), -1, (6, 5, 4, 1)),   # NHWC, positions masked
    ((6, 5, 4, 33), -1, (6, 1, 1, 1)),   # NHWC, whole examples masked
    ((5, 7, 9, 10), 1, (5, 1, 9, 10)),   # NCHW
    ((40, 20), -1, (40, 1)),             # dense
])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_masked_batch_norm_with_kernels_equals_pure_jax(shape, axis, mask_shape, dtype, rtol):
  x, dy = _data(shape, dtype, offset=5.0)
  mask = np.random.default_rng(9).random(mask_shape) > 0.3
  mask[0] = False  # a whole example of padding
  x = jax.device_put(np.where(mask, np.asarray(x), np.nan).astype(dtype))  # padding: anything
  c = shape[axis]
  scale = jax.device_put(np.linspace(0.5, 2, c).astype(dtype))
  bias = jax.device_put(np.linspace(-1, 1, c).astype(dtype))
  # The default path (use_cpu_kernel=None) and pure JAX from one compilation, whose HLO shows
  # that the default took the kernels (pure JAX adds none); use_cpu_kernel=True with masks is
  # tests/cpu/test_kernels_layout.py's.
  compiled = jax.jit(lambda *a: tuple(_bn_outputs(*a, axis, use, mask=mask)
                                      for use in (None, False))).lower(x, scale, bias, dy).compile()
  assert _kernels_in(compiled.as_text()) == ["jaxbn_backward", "jaxbn_forward"]
  got, want = compiled(x, scale, bias, dy)
  for name, g, w in zip(("y", "mean", "var", "dx", "dscale", "dbias"), got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * float(np.max(np.abs(np.asarray(w)))),
                               err_msg=name)


def test_bfloat16_and_mixed_output_dtype_equal_pure_jax():
  shape, axis = CASES["nhwc-tail"]
  x, dy = _data(shape, jnp.bfloat16, offset=3.0)
  scale = jax.device_put(np.full(33, 1.5, np.float32))
  bias = jax.device_put(np.full(33, 0.25, np.float32))
  for out in (None, jnp.float32):
    g = dy if out is None else jax.device_put(np.asarray(dy).astype(out))  # exact: bf16 ⊂ f32
    got, want = _bn_with_and_without_kernels(x, scale, bias, g, axis, dtype=out)
    for name, a, b in zip(("y", "mean", "var", "dx", "dscale", "dbias"), got, want):
      assert a.dtype == b.dtype, name
      top = float(np.max(np.abs(np.asarray(b, np.float32))))
      # y and dx: elementwise in float32, so within 2 roundings of their dtype; the rest are
      # float32 sums over 105 values, added in a different order.
      atol = (2 * float(jnp.finfo(a.dtype).eps) if name in ("y", "dx") else 1e-5) * top
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=0, atol=atol + 1e-6, err_msg=f"{name}, out={out}")


def test_large_offset_float32_forward_keeps_its_digits():
  # x = 1e4 + N(0, 1): summing x in float32 would move μ by more than σ/100.
  rng = np.random.default_rng(3)
  x32 = (1e4 + rng.standard_normal((4096, 8))).astype(np.float32)
  # Under jit: eager, every op outside the kernels would compile a program of its own.
  y = jax.jit(lambda x: jaxbn.batch_norm(x, use_cpu_kernel=True)[0])(jax.device_put(x32))
  x32 = x32.astype(np.float64)
  truth = (x32 - x32.mean(0)) / np.sqrt(x32.var(0) + 1e-5)
  # The pure-JAX path's error here is 3.4e-7 (a few float32 ulps of |y| ≤ 4).
  assert np.max(np.abs(np.asarray(y, np.float64) - truth)) < 1e-6


@pytest.mark.slow
def test_second_order_derivatives_go_through_the_twins():
  shape, axis = CASES["nchw"]
  x, dy = _data(shape, jnp.float64, offset=1.0)
  scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
  v = jax.device_put(np.random.default_rng(4).standard_normal(shape))

  def hvp(use_cpu_kernel):
    def loss(x):
      y, _ = jaxbn.batch_norm(x, scale, bias, axis=axis, use_cpu_kernel=use_cpu_kernel)
      return jnp.sum(jnp.sin(y) * dy)
    return jax.jvp(jax.grad(loss), (x,), (v,))[1]

  got, want = jax.jit(lambda x: (hvp(True), hvp(False)))(x)  # one compilation for both
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

  def grad_of_grad(use_cpu_kernel):  # reverse over reverse: the twins' JVPs, transposed
    def loss(x):
      y, _ = jaxbn.batch_norm(x, scale, bias, axis=axis, use_cpu_kernel=use_cpu_kernel)
      return jnp.sum(jnp.sin(y) * dy)
    return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)

  got, want = jax.jit(lambda x: (grad_of_grad(True), grad_of_grad(False)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)



@pytest.mark.slow
@pytest.mark.parametrize("loop", ["map", "scan", "remat"])
def test_second_order_derivatives_inside_loops_and_remat(loop):
  # Inside lax.map / lax.scan / checkpoint JAX differentiates the loop body's jaxpr, where
  # the kernel calls are bare `jaxbn.kernel` primitives (their custom_jvp wrappers already
  # traced away): the primitive needs its own JVP rule for a Hessian-vector product there.
  shape, axis = CASES["nchw"]
  x, dy = _data(shape, jnp.float64, offset=1.0)
  xs = jnp.stack([x, 2 * x + 1])
  scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
  v = jax.device_put(np.random.default_rng(5).standard_normal(xs.shape))

  def grad_of_grad(use_cpu_kernel):
    def one(x):
      y, _ = jaxbn.batch_norm(x, scale, bias, axis=axis, use_cpu_kernel=use_cpu_kernel)
      return jnp.sum(jnp.sin(y) * dy)
    def loss(xs):
      if loop == "map":
        return jnp.sum(jax.lax.map(one, xs))
      if loop == "scan":
        return jax.lax.scan(lambda c, x: (c + one(x), None), 0.0, xs)[0]
      return jnp.sum(jax.vmap(jax.checkpoint(one))(xs[:1])) + jax.checkpoint(one)(xs[1])
    return jax.grad(lambda xs: jnp.vdot(jax.grad(loss)(xs), v))(xs)

  got, want = jax.jit(lambda xs: (grad_of_grad(True), grad_of_grad(False)))(xs)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

def test_vmap_runs_each_instance_on_its_own():
  x, _ = _data((3, 20, 5), jnp.float32, offset=1.0)
  per, loop = jax.jit(lambda x: (  # one compilation for both
      jax.vmap(lambda x: jaxbn.batch_norm(x, use_cpu_kernel=True)[0])(x),
      jnp.stack([jaxbn.batch_norm(v, use_cpu_kernel=False)[0] for v in x])))(x)
  np.testing.assert_allclose(per, loop, rtol=0, atol=2e-6)


def _kernels_in(hlo: str) -> list[str]:
  return sorted(t for t in library.TARGETS if f"{t}\"" in hlo)


def test_a_training_step_is_two_kernel_calls_and_gpu_lowering_has_none():
  x = jax.device_put(np.ones((8, 4, 4, 16)))  # float64 (x64 is on), as jnp.ones would be

  def step(x):
    return jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0] ** 3))(x)

  compiled = jax.jit(step).lower(x).compile().as_text()
  # The whole forward and the whole backward, each one call, nothing of XLA's between passes.
  assert _kernels_in(compiled) == ["jaxbn_backward", "jaxbn_forward"]
  assert compiled.count("custom-call(") == 2
  # On other platforms the pure-JAX path is compiled in: no CPU custom call at all.
  traced = jax.jit(step).trace(x)
  assert "jaxbn_" not in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.slow
def test_pooled_statistics_use_the_four_pass_kernels_with_twin_derivatives():
  # Under an axis name the statistics are pooled between the passes, in JAX: vmap over a
  # named axis stands in for devices here.
  x, dy = _data((3, 40, 6), jnp.float64, offset=1.0)
  v = jax.device_put(np.random.default_rng(6).standard_normal(x.shape))

  def loss(x, use_cpu_kernel):
    y = jax.vmap(lambda x: jaxbn.batch_norm(x, axis_name="batch",
                                             use_cpu_kernel=use_cpu_kernel)[0],
                 axis_name="batch")(x)
    return jnp.sum(jnp.sin(y) * dy)

  def hvp(use_cpu_kernel):
    return jax.jvp(lambda x: jax.grad(loss)(x, use_cpu_kernel), (x,), (v,))

  traced = jax.jit(lambda x: jax.grad(loss)(x, True)).trace(x)
  assert _kernels_in(traced.lower().compile().as_text()) == [
      "jaxbn_grad_input", "jaxbn_grad_sums", "jaxbn_moments", "jaxbn_normalize"]
  assert "jaxbn_" not in traced.lower(lowering_platforms=("cuda",)).as_text()
  # Differentiated again, each call is its twin, values and derivatives: XLA fuses the
  # twin's values with its tangents (a kernel call beside them would be work done twice).
  assert _kernels_in(jax.jit(lambda x: hvp(True)[1]).lower(x).compile().as_text()) == []
  for got, want in zip(*jax.jit(lambda x: (hvp(True), hvp(False)))(x)):  # one compilation
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    ({"mask": np.arange(72).reshape(6, 4, 3) % 2 == 0}, "varies across the feature axes"),
    ({"axis": (0, 2)}, "not contiguous"),
    ({"gradient": "autodiff"}, "autodiff"),
    ({"use_fast_variance": True}, "use_fast_variance"),
])
def test_use_cpu_kernel_true_refuses_calls_it_cannot_serve(kwargs, message):
  x = jax.device_put(np.ones((6, 4, 3)))  # float64 (x64 is on), as jnp.ones would be
  with pytest.raises(ValueError, match=message):
    jaxbn.batch_norm(x, use_cpu_kernel=True, **kwargs)
  with pytest.raises(ValueError, match="float16"):
    jaxbn.batch_norm(jax.device_put(np.ones((6, 4, 3), np.float16)), use_cpu_kernel=True)
  with pytest.raises(TypeError, match="use_cpu_kernel"):
    jaxbn.batch_norm(x, use_cpu_kernel="yes")


_FALLBACK = """
import jax, jax.numpy as jnp, numpy as np, jaxbn
from jaxbn import kernels
x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)))
# Before anything asked: the first CPU lowering finds out, and compiles the twins.
first = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0] ** 3)))(x)
status = kernels.status()
assert not status.available
print(status.reason)
auto = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0] ** 3))(x)
pure = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, use_cpu_kernel=False)[0] ** 3))(x)
assert np.array_equal(auto, pure)
# float32 sums in another order: within a few ulps of the largest value.
np.testing.assert_allclose(first, pure, rtol=0, atol=1e-6 * float(np.max(np.abs(pure))))
try:
  jaxbn.batch_norm(x, use_cpu_kernel=True)
except ValueError as e:
  print(e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("env,reason", [
    ({"CXX": "/nonexistent/c++"}, "build or load failed"),
    ({"JAXBN_CPU_KERNEL": "0"}, "disabled by JAXBN_CPU_KERNEL=0"),
])
def test_without_kernels_jaxbn_takes_the_pure_jax_path(tmp_path, env, reason):
  result = subprocess.run(
      [sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAXBN_CACHE_DIR": str(tmp_path), **env})
  assert result.returncode == 0, result.stderr
  assert reason in result.stdout
  assert "use_cpu_kernel=True, but the kernels are unavailable" in result.stdout
  assert not list(tmp_path.glob("*.partial")), "a failed build left a partial file behind"


def test_the_kernels_are_built_only_for_a_cpu_lowering_that_runs_them(monkeypatch):
  def build():
    raise AssertionError("built the CPU kernels")

  monkeypatch.setattr(library, "status", build)
  monkeypatch.setattr(library, "decided", lambda: None)  # as in a fresh process
  x = jax.device_put(np.ones((5, 7, 3), np.float32))  # a shape no other test lowers (uncached)
  step = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0] ** 3)))
  traced = step.trace(x)  # tracing decides only what it can see: no build
  assert "jaxbn_" not in traced.lower(lowering_platforms=("cuda",)).as_text()
  exported = jax.export.export(step)(x)  # an export compiles the twins: no build either
  assert "custom_call" not in exported.mlir_module()
  with pytest.raises(AssertionError, match="built the CPU kernels"):
    traced.lower()


def test_sharded_jit_keeps_the_pure_jax_path_and_shard_map_uses_the_kernels(mesh):
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  # Explicit sharding: x's type says it is split across devices, so the default can see it.
  explicit = jax.make_mesh((len(mesh.devices),), ("data",), axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.asarray(_data((64, 16), jnp.float32)[0]),
                     NamedSharding(explicit, P("data")))

  def grad(axis_name=None):
    return jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, axis_name=axis_name)[0] ** 3))

  # Under jit the (unpartitionable) custom calls would gather a sharded x onto every
  # device, so the default keeps XLA's partitioned pure-JAX path there...
  compiled = jax.jit(grad()).lower(x).compile().as_text()
  assert "jaxbn_" not in compiled and "all-gather" not in compiled
  with pytest.raises(ValueError, match="sharded across devices"):
    jax.jit(lambda x: jaxbn.batch_norm(x, use_cpu_kernel=True)[0]).lower(x)
  # ...while shard_map hands each device its own rows: the kernels run there.
  per_device = jax.jit(jax.shard_map(grad("data"), mesh=explicit, in_specs=P("data"),
                                     out_specs=P("data")))
  assert "jaxbn_" in per_device.lower(x).compile().as_text()


def _vmapped_step(use_cpu_kernel, mask=None):
  """Forward and backward of BN on one example per vmap instance, the batch pooled over the
  vmapped axis (Equinox's way): x of shape (B, C, *spatial), features first per example."""
  def per_example(x):
    return jaxbn.batch_norm(x, axis=0, axis_name="batch", mask=mask,
                            use_cpu_kernel=use_cpu_kernel)[0]

  def step(x, dy):
    y, vjp = jax.vjp(jax.vmap(per_example, axis_name="batch"), x)
    return y, vjp(dy)[0]
  return jax.jit(step)


@pytest.mark.parametrize("shape", [(16, 8, 6, 5), (16, 8, 30)])
def test_vmapped_examples_with_features_first_fold_into_one_kernel_call(shape, host):
  """B instances of view (1, C, inner) are one call of B·C features, not B calls: the
  forward's statistics and normalization and the backward's sums and dx, one call each."""
  x, dy = _data(shape, jnp.float32, offset=3.0)
  args = (x, dy)
  compiled = _vmapped_step(None).lower(*args).compile().as_text()
  assert _kernels_in(compiled) == [
      "jaxbn_grad_input", "jaxbn_grad_sums", "jaxbn_moments", "jaxbn_normalize"]
  assert compiled.count("custom-call(") == 4
  assert " while(" not in compiled  # no loop over the instances
  got, want = host(_vmapped_step(None)(*args)), host(_vmapped_step(False)(*args))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
  one = host(jax.jit(lambda x: jaxbn.batch_norm(x, axis=1, use_cpu_kernel=False)[0])(x))
  np.testing.assert_allclose(got[0], one, rtol=0, atol=2e-5)  # the whole batch's BN


def test_vmapped_dense_examples_run_pure_jax_unless_forced(host):
  """Dense examples (C,) have nothing to reduce in a call (the statistics are the pooling's
  alone) and nothing to fold: the pure path, no kernel call; use_cpu_kernel=True still gets
  a call per instance."""
  x, dy = _data((12, 7), jnp.float32, offset=3.0)
  assert _kernels_in(_vmapped_step(None).lower(x, dy).compile().as_text()) == []
  forced = _vmapped_step(True).lower(x, dy).compile().as_text()
  assert "jaxbn_moments" in _kernels_in(forced)
  for a, b, c in zip(host(_vmapped_step(None)(x, dy)), host(_vmapped_step(True)(x, dy)),
                     host(_vmapped_step(False)(x, dy)), strict=True):
    np.testing.assert_allclose(a, c, rtol=0, atol=2e-5)
    np.testing.assert_allclose(b, c, rtol=0, atol=2e-5)


def test_vmapped_small_batches_that_cannot_fold_run_the_twin(host):
  """An ensemble's small batches (each instance a whole batch of rows, outer > 1) cannot
  fold: below MAX_TWIN_INSTANCE_SIZE values they run the twin, vmapped, not a call each."""
  x, dy = _data((3, 20, 5), jnp.float32, offset=1.0)
  step = jax.jit(lambda x, dy: jax.vmap(lambda x, dy: jax.vjp(
      lambda x: jaxbn.batch_norm(x)[0], x)[1](dy))(x, dy))
  assert _kernels_in(step.lower(x, dy).compile().as_text()) == []
  want = jax.jit(lambda x, dy: jax.vmap(lambda x, dy: jax.vjp(
      lambda x: jaxbn.batch_norm(x, use_cpu_kernel=False)[0], x)[1](dy))(x, dy))
  np.testing.assert_allclose(host(step(x, dy)[0]), host(want(x, dy)[0]), rtol=0, atol=2e-5)


def test_vmapped_examples_with_a_shared_mask_fold_and_stay_masked(host):
  x, dy = _data((10, 4, 6), jnp.float32, offset=3.0)
  mask = np.arange(6) % 3 != 0  # the same positions of every example padded
  x = jnp.where(mask, x, jnp.nan)
  compiled = _vmapped_step(None, mask).lower(x, dy).compile().as_text()
  assert compiled.count("custom-call(") == 4 and " while(" not in compiled
  (y, dx), (y_pure, dx_pure) = (host(_vmapped_step(None, mask)(x, dy)),
                                host(_vmapped_step(False, mask)(x, dy)))
  np.testing.assert_allclose(y, y_pure, rtol=0, atol=2e-5)
  np.testing.assert_allclose(dx, dx_pure, rtol=0, atol=2e-5)
  assert np.all(y[..., ~mask] == 0) and np.all(dx[..., ~mask] == 0)
