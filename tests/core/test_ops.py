"""jaxbn.ops: forward values, numerics, masks, composition with JAX transforms, errors."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.ad_checkpoint import print_saved_residuals
from hypothesis import strategies as st

import jaxbn
from jaxbn import reference

LAYOUTS = {
    "dense": ((6, 3), -1),
    "nhwc": ((2, 3, 3, 4), -1),
    "nchw": ((2, 4, 3, 3), 1),
    "two-axes": ((5, 2, 3), (1, 2)),
}


def _rng(seed=0):
  return np.random.default_rng(seed)


# Test inputs are built in NumPy and placed with jax.device_put, and results are checked in
# NumPy: outside jit every jnp op (jnp.asarray of a NumPy array included) compiles a program
# of its own, and compiling is most of this suite's time.
def _device(a, dtype=None):
  """NumPy (or a jax array, through NumPy) rounded to dtype by NumPy and put on the device."""
  a = np.asarray(a)
  return jax.device_put(a if dtype is None else a.astype(dtype))


def _params(shape, axis, dtype=jnp.float64, seed=0):
  rng = _rng(seed)
  features = tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(axis)))
  x = rng.standard_normal(shape) * 3 + 2
  return (_device(x, dtype), _device(rng.uniform(0.5, 2, features), dtype),
          _device(rng.standard_normal(features), dtype))


def _numpy_batch_norm(x, scale, bias, axis, epsilon=1e-5):
  """Eqs. (1)-(4) in NumPy float64: the independent truth for the forward."""
  x = np.asarray(x, np.float64)
  features = tuple(a % x.ndim for a in np.atleast_1d(axis))
  reduce = tuple(a for a in range(x.ndim) if a not in features)
  shape = [n if a in features else 1 for a, n in enumerate(x.shape)]
  mu = x.mean(reduce, keepdims=True)
  var = ((x - mu) ** 2).mean(reduce, keepdims=True)
  scale, bias = (np.asarray(v, np.float64).reshape(shape) for v in (scale, bias))
  y = scale * (x - mu) / np.sqrt(var + epsilon) + bias
  features_shape = tuple(x.shape[a] for a in features)
  return y, mu.reshape(features_shape), var.reshape(features_shape)


def _loss(mode, **kwargs):
  def loss(x, scale, bias, dy):
    y, _ = jaxbn.batch_norm(x, scale, bias, gradient=mode, **kwargs)
    return jnp.sum(dy * y)
  return loss


@functools.partial(jax.jit, static_argnames=("mode", "axis", "epsilon"))
def _outputs_and_grads(x, scale, bias, dy, mask=None, *, mode, axis=-1, epsilon=1e-5):
  """y, stats and the gradients wrt (x, scale, bias) of Σ dy·y, from one compilation (shared
  by every test that calls it with the same shapes and options)."""
  kwargs = dict(mask=mask, axis=axis, epsilon=epsilon)
  y, stats = jaxbn.batch_norm(x, scale, bias, gradient=mode, **kwargs)
  grads = jax.grad(_loss(mode, **kwargs), argnums=(0, 1, 2))(x, scale, bias, dy)
  return y, stats, grads


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_stats_match_numpy(layout):
  shape, axis = LAYOUTS[layout]
  x, scale, bias = _params(shape, axis)
  y, stats = jax.jit(lambda *a: jaxbn.batch_norm(*a, axis=axis))(x, scale, bias)
  y_np, mean_np, var_np = _numpy_batch_norm(x, scale, bias, axis)
  np.testing.assert_allclose(y, y_np, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats.mean, mean_np, rtol=1e-12)
  np.testing.assert_allclose(stats.var, var_np, rtol=1e-12)
  assert stats.mean.shape == scale.shape and stats.var.shape == scale.shape


def test_scale_and_bias_default_to_identity():
  x, _, _ = _params((6, 3), -1)
  y, _ = jax.jit(jaxbn.batch_norm)(x)
  y_np, _, _ = _numpy_batch_norm(x, np.ones(3), np.zeros(3), -1)
  np.testing.assert_allclose(y, y_np, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_same_dtype_out_float32_stats(dtype):
  x64, scale, bias = _params((64, 5), -1)
  x = _device(x64, dtype)
  y, stats, dx = jax.jit(lambda x, s, b: (  # one compilation for the outputs and dx
      *jaxbn.batch_norm(x, s, b),
      jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0].astype(jnp.float32) ** 2))(x)))(
          x, _device(scale, np.float32), _device(bias, np.float32))
  assert y.dtype == dtype
  assert stats.mean.dtype == jnp.float32 and stats.var.dtype == jnp.float32
  # Truth from the same rounded inputs: the only errors left are the output's rounding.
  y_true, mean_true, var_true = _numpy_batch_norm(np.asarray(x, np.float64), scale, bias, -1)
  np.testing.assert_allclose(stats.mean, mean_true, rtol=1e-6)
  np.testing.assert_allclose(stats.var, var_true, rtol=1e-5)
  resolution = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(y, np.float64), y_true, rtol=resolution,
                             atol=resolution)
  assert dx.dtype == dtype


def test_output_dtype_override():
  x, scale, bias = _params((8, 3), -1, jnp.bfloat16)
  scale, bias = _device(scale, np.float32), _device(bias, np.float32)
  y, _ = jax.jit(lambda *a: jaxbn.batch_norm(*a, dtype=jnp.float32))(x, scale, bias)
  assert y.dtype == jnp.float32
  y_true, _, _ = _numpy_batch_norm(np.asarray(x, np.float64), scale, bias, -1)
  np.testing.assert_allclose(y, y_true, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [256, 65_536])
def test_float32_large_mean_keeps_its_digits(batch):
  """|μ|/σ = 1e4 in float32: forward within 2e-3 of float64 on the same inputs."""
  x = (1e4 + _rng(1).standard_normal((batch, 4))).astype(np.float32)
  y, stats = jax.jit(jaxbn.batch_norm)(_device(x))
  y_true, mean_true, var_true = _numpy_batch_norm(x, np.ones(4), np.zeros(4), -1)
  error = np.max(np.abs(np.asarray(y, np.float64) - y_true))
  assert error <= 2e-3  # the required bar: about two float32 ulps at 1e4
  assert error <= 1e-5  # what the shifted two-pass statistics actually give (docs: 4e-7)
  np.testing.assert_allclose(stats.mean, mean_true, rtol=1e-7)
  np.testing.assert_allclose(stats.var, var_true, rtol=1e-3)


def test_fast_variance_is_one_pass_formula():
  x = _rng(2).standard_normal((32, 3)) + 1.0
  variances = jax.jit(lambda x: tuple(  # one compilation per dtype for both formulas
      jaxbn.batch_norm(x, use_fast_variance=fast)[1].var for fast in (True, False)))
  np.testing.assert_allclose(variances(_device(x))[0], np.mean(x * x, 0) - np.mean(x, 0) ** 2,
                             rtol=1e-12)
  # ...and it is the numerically fragile one: at |μ|/σ = 1e4 in float32 it loses the variance.
  x32 = (1e4 + _rng(1).standard_normal((4096, 2))).astype(np.float32)
  fast, two_pass = (np.asarray(v, np.float64) for v in variances(_device(x32)))
  true = x32.astype(np.float64).var(0)
  assert np.max(np.abs(two_pass - true)) < 1e-3 < np.max(np.abs(fast - true))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mode", ["analytic", "autodiff"])
def test_constant_feature_gives_bias_and_finite_gradients(dtype, mode, host):
  x, scale, bias = _params((16, 3), -1, dtype)
  x = np.array(x)
  x[:, 1] = 0.1  # 0.1 is not exact in binary: the mean's rounding must not show
  dy = _device(_rng(3).standard_normal(x.shape), dtype)
  y, stats, grads = host(_outputs_and_grads(_device(x), scale, bias, dy, mode=mode))
  assert stats.var[1] == 0
  np.testing.assert_allclose(y[:, 1], np.full(16, np.asarray(bias)[1]),
                             atol=10 * float(jnp.finfo(dtype).eps))
  assert all(bool(np.all(np.isfinite(g))) for g in grads)


# --------------------------------------------------------------------------------- masks


def _padded(seed=4, rows=10, real=7, features=3):
  rng = _rng(seed)
  x = rng.standard_normal((rows, features)) + 5
  dy = rng.standard_normal(x.shape)
  mask = (np.arange(rows) < real)[:, None]
  return x, dy, mask  # NumPy: the tests slice and fill them before they reach the device


@pytest.mark.parametrize("mode", ["analytic", "autodiff"])
def test_mask_equals_batch_of_unmasked_rows(mode, host):
  x, dy, mask = _padded()
  _, scale, bias = _params((10, 3), -1)
  y, stats, grads = host(_outputs_and_grads(*map(_device, (x, scale, bias, dy, mask)),
                                             mode=mode))
  y_real, stats_real, grads_real = host(_outputs_and_grads(
      *map(_device, (x[:7], scale, bias, dy[:7])), mode=mode))
  np.testing.assert_allclose(y[:7], y_real, rtol=1e-12)
  np.testing.assert_array_equal(y[7:], 0)
  np.testing.assert_allclose(stats.mean, stats_real.mean, rtol=1e-12)
  np.testing.assert_allclose(stats.var, stats_real.var, rtol=1e-12)
  np.testing.assert_allclose(grads[0][:7], grads_real[0], rtol=1e-12)
  np.testing.assert_array_equal(grads[0][7:], 0)
  np.testing.assert_allclose(grads[1], grads_real[1], rtol=1e-12)
  np.testing.assert_allclose(grads[2], grads_real[2], rtol=1e-12)


@pytest.mark.parametrize("mode", ["analytic", "autodiff"])
@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, 1e30])
def test_padding_reaches_no_output_or_gradient(mode, fill):
  x, dy, mask = _padded()
  x = np.where(mask, x, fill)
  dy = np.where(mask, dy, fill)  # the cotangent at padding may be garbage too
  _, scale, bias = _params((10, 3), -1)
  clean_x, _, _ = _padded()
  # One compilation per mode, shared by every fill and by the clean run.
  y, stats, grads = _outputs_and_grads(*map(_device, (x, scale, bias, dy, mask)), mode=mode)
  y_clean, _, clean = _outputs_and_grads(
      *map(_device, (clean_x, scale, bias, np.where(mask, dy, 0), mask)), mode=mode)
  np.testing.assert_array_equal(y, y_clean)
  assert np.all(np.isfinite(stats.mean)) and np.all(np.isfinite(stats.var))
  for g, c in zip(grads, clean, strict=True):
    np.testing.assert_array_equal(g, c)


def test_per_feature_mask_counts_each_feature():
  x = _device(_rng(5).standard_normal((8, 2)))
  mask = _device(np.stack([np.arange(8) < 5, np.arange(8) < 3], axis=1))
  _, stats = jax.jit(lambda x, mask: jaxbn.batch_norm(x, mask=mask))(x, mask)
  x = np.asarray(x)
  np.testing.assert_allclose(stats.mean, [x[:5, 0].mean(), x[:3, 1].mean()], rtol=1e-12)
  np.testing.assert_allclose(stats.var, [x[:5, 0].var(), x[:3, 1].var()], rtol=1e-12)


def test_fully_masked_feature_stays_finite(host):
  x = _device(_rng(6).standard_normal((4, 2)))
  mask = _device([[True, False]] * 4)
  y, stats, dx = host(jax.jit(lambda x: (  # one compilation for the outputs and dx
      *jaxbn.batch_norm(x, mask=mask),
      jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, mask=mask)[0] ** 3))(x)))(x))
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(stats.var))
  np.testing.assert_array_equal(y[:, 1], 0)
  np.testing.assert_array_equal(dx[:, 1], 0)


# ------------------------------------------------------------------------- differentiation


@pytest.mark.parametrize("layout", LAYOUTS)
def test_analytic_equals_autodiff_of_same_forward(layout):
  shape, axis = LAYOUTS[layout]
  x, scale, bias = _params(shape, axis)
  dy = _device(_rng(7).standard_normal(shape))
  analytic, autodiff = jax.jit(lambda *a: tuple(  # one compilation for both
      jax.grad(_loss(mode, axis=axis), argnums=(0, 1, 2))(*a)
      for mode in ("analytic", "autodiff")))(x, scale, bias, dy)
  for a, b in zip(analytic, autodiff, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["analytic", "autodiff"])
def test_input_gradient_is_orthogonal_to_shift_and_scale(mode, host):
  """docs/derivation.md: Σ ∂L/∂x_i = 0, and Σ x̂_i ∂L/∂x_i = (γ/σ) Σ dy x̂ · ε/σ²."""
  epsilon = 0.3  # large, so the ε term is far above rounding
  x, scale, bias = _params((9, 3), -1)
  dy = _rng(13).standard_normal(x.shape)
  _, stats, (dx, _, _) = host(_outputs_and_grads(x, scale, bias, _device(dy), mode=mode,
                                                  epsilon=epsilon))
  x, scale = np.asarray(x), np.asarray(scale)  # float64 already: the identities in NumPy
  np.testing.assert_allclose(np.sum(dx, 0), 0, atol=1e-13)
  sigma2 = stats.var + epsilon
  x_hat = (x - stats.mean[None]) / np.sqrt(sigma2)[None]
  want = scale / np.sqrt(sigma2) * np.sum(dy * x_hat, 0) * epsilon / sigma2
  np.testing.assert_allclose(np.sum(x_hat * dx, 0), want, rtol=1e-10)


def test_gradient_does_not_flow_through_stats():
  x, scale, bias = _params((6, 3), -1)
  grads = jax.jit(lambda x: [  # one compilation for both modes
      jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, scale, bias, gradient=mode)[1].mean))(x)
      for mode in ("analytic", "autodiff")])(x)
  for grad in grads:
    np.testing.assert_array_equal(grad, 0)


def test_forward_mode_needs_autodiff():
  x, scale, bias = _params((6, 3), -1)
  v = _device(_rng(8).standard_normal(x.shape))
  u = _device(_rng(9).standard_normal(x.shape))
  f = lambda mode: (lambda x: jaxbn.batch_norm(x, scale, bias, gradient=mode)[0])
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(f("analytic"), (x,), (v,))
  jv, (ju,) = jax.jit(lambda x, v, u: (  # one compilation for both products
      jax.jvp(f("autodiff"), (x,), (v,))[1], jax.vjp(f("analytic"), x)[1](u)))(x, v, u)
  np.testing.assert_allclose(np.vdot(u, jv), np.vdot(ju, v), rtol=1e-12)  # <u, Jv> = <Jᵀu, v>


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_hessian_vector_products_match_autodiff(masked):
  """Reverse-over-reverse: the analytic backward is itself differentiated exactly."""
  x, dy, mask = _padded(real=7 if masked else 10)
  mask = mask if masked else None
  _, scale, bias = _params((10, 3), -1)
  rng = _rng(10)
  tangents = tuple(jnp.asarray(rng.standard_normal(v.shape)) for v in (x, scale, bias))

  def hvp(mode):
    loss = lambda p: jnp.sum(jnp.sin(jaxbn.batch_norm(*p, mask=mask, gradient=mode)[0]) * dy)
    grad_dot_v = lambda p: sum(jnp.vdot(g, t) for g, t in zip(jax.grad(loss)(p), tangents, strict=True))
    return jax.grad(grad_dot_v)((x, scale, bias))

  analytic, autodiff = jax.jit(lambda: (hvp("analytic"), hvp("autodiff")))()  # one compile
  for a, b in zip(analytic, autodiff, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_composes_with_jit_vmap_checkpoint(host):
  ensemble, batch, features = 3, 8, 4
  rng = _rng(11)
  xs = _device(rng.standard_normal((ensemble, batch, features)))
  scales = _device(rng.uniform(0.5, 2, (ensemble, features)))
  biases = _device(rng.standard_normal((ensemble, features)))
  dy = _device(rng.standard_normal((batch, features)))
  loss = lambda x, s, b: jnp.sum(dy * jaxbn.batch_norm(x, s, b)[0])
  grad = jax.grad(loss, argnums=(0, 1, 2))

  # One compilation: the per-member loop next to vmap and vmap of checkpoint, all under jit.
  looped, vmapped, checkpointed = host(jax.jit(lambda *a: (
      [grad(*(v[i] for v in a)) for i in range(ensemble)],
      jax.vmap(grad)(*a),
      jax.vmap(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(*a)))(xs, scales, biases))
  for i in range(ensemble):
    for j in range(3):
      np.testing.assert_allclose(vmapped[j][i], looped[i][j], rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(checkpointed[j][i], looped[i][j], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residuals_are_x_and_per_feature_vectors(dtype):
  x, scale, bias = _params((2, 3, 3, 4), -1, dtype)
  mask = _device(np.array([True, False])[:, None, None, None])  # per example: (2, 1, 1, 1)
  # The vjp functions come out of jit (one compilation for both) with the residuals they
  # close over as their leaves, as an eager jax.vjp would hold them.
  vjps = jax.jit(lambda x, s, b: [
      jax.vjp(lambda x, s, b: jaxbn.batch_norm(x, s, b, mask=m)[0], x, s, b)[1]
      for m in (None, mask)])(x, scale, bias)
  for vjp in vjps:
    leaves = jax.tree.leaves(vjp)
    activation_sized = [r for r in leaves if r.size == x.size]
    assert len(activation_sized) == 1 and activation_sized[0].dtype == dtype
    assert all(r.size <= 4 for r in leaves if r.size != x.size), [r.shape for r in leaves]
  # The same, as JAX reports what the analytic backward saves...
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda x: jaxbn.batch_norm(x, scale, bias)[0], x)
  shapes = out.getvalue()
  assert shapes.count("[2,3,3,4]") == 1, shapes
  # ...and what autodiff of the same forward saves, for contrast.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(
        lambda x: jaxbn.batch_norm(x, scale, bias, gradient="autodiff")[0], x)
  assert out.getvalue().count("[2,3,3,4]") > 1


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)  # same examples in every CI run
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    data=st.data(),
)
def test_property_analytic_equals_autodiff(shape, data):
  ndim = len(shape)
  axis = data.draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim - 1,
                            unique_by=lambda a: a % ndim), label="axis")
  features = [a % ndim for a in axis]
  if np.prod([n for a, n in enumerate(shape) if a not in features]) < 2:
    shape[[a for a in range(ndim) if a not in features][0]] = 2
  x, scale, bias = _params(tuple(shape), tuple(axis), seed=len(shape))
  dy = jnp.asarray(_rng(12).standard_normal(x.shape))
  kwargs = dict(axis=tuple(axis))
  analytic, literal = jax.jit(lambda *a: (  # one compilation for both
      jax.grad(_loss("analytic", **kwargs), argnums=(0, 1, 2))(*a),
      jax.vjp(lambda *p: reference.batch_norm_reference(*p, **kwargs), *a[:3])[1](a[3])))(
          x, scale, bias, dy)
  for a, b in zip(analytic, literal, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ inference


def test_inference_with_batch_stats_reproduces_training_output():
  x, scale, bias = _params((2, 4, 3, 3), 1)
  def train_then_infer(x, scale, bias):  # one compilation for all three
    y, stats = jaxbn.batch_norm(x, scale, bias, axis=1)
    y_inf = jaxbn.batch_norm_inference(x, stats.mean, stats.var, scale, bias, axis=1)
    half = jaxbn.batch_norm_inference(x.astype(jnp.bfloat16), stats.mean, stats.var, scale,
                                      bias, axis=1)
    return y, y_inf, half

  y, y_inf, half = jax.jit(train_then_infer)(x, scale, bias)
  np.testing.assert_allclose(y_inf, y, rtol=1e-12, atol=1e-12)
  assert half.dtype == jnp.bfloat16


def test_inference_mask_zeroes_padding_whatever_it_holds():
  x, scale, bias = _params((4, 3, 2), 1)
  mask = _device(np.array([True, True, False, True])[:, None, None])  # per example, NCHW-like
  x = _device(np.where(mask, x, np.nan))
  mean, var = _device([0.5, -1.0, 2.0]), _device([1.0, 4.0, 0.25])

  def infer(x, mask=None):
    return jaxbn.batch_norm_inference(x, mean, var, scale, bias, axis=1, mask=mask)

  y, y_unmasked, dx = (np.asarray(v) for v in jax.jit(lambda x: (  # one compilation
      infer(x, mask), infer(x), jax.grad(lambda x: jnp.sum(infer(x, mask) ** 2))(x)))(x))
  np.testing.assert_array_equal(y[2], 0)
  np.testing.assert_array_equal(y[[0, 1, 3]], y_unmasked[[0, 1, 3]])
  assert np.all(np.isfinite(dx)) and not np.any(dx[2])
  with pytest.raises(ValueError, match="does not broadcast"):
    infer(x, _device(np.ones((5, 1, 1), bool)))


# ---------------------------------------------------------------------------------- errors

X = _device(np.zeros((4, 3), np.float32))

BAD_CALLS = {
    "scale shape": (lambda: jaxbn.batch_norm(X, jnp.ones(4)), ValueError, r"scale has shape \(4,\)"),
    "bias shape": (lambda: jaxbn.batch_norm(X, None, jnp.ones((1, 3))), ValueError, "bias has shape"),
    "integer x": (lambda: jaxbn.batch_norm(jnp.zeros((4, 3), jnp.int32)), TypeError, "int32"),
    "boolean x": (lambda: jaxbn.batch_norm(jnp.zeros((4, 3), bool)), TypeError, "bool"),
    "complex x": (lambda: jaxbn.batch_norm(jnp.zeros((4, 3), jnp.complex64)), TypeError,
                  "flax.linen.BatchNorm"),
    "axis out of range": (lambda: jaxbn.batch_norm(X, axis=2), ValueError, "axis 2 is out of range"),
    "axis repeated": (lambda: jaxbn.batch_norm(X, axis=(1, -1)), ValueError, "same axis twice"),
    "epsilon zero": (lambda: jaxbn.batch_norm(X, epsilon=0.0), ValueError, "epsilon"),
    "epsilon nan": (lambda: jaxbn.batch_norm(X, epsilon=float("nan")), ValueError, "epsilon"),
    "epsilon traced": (lambda: jax.jit(lambda e: jaxbn.batch_norm(X, epsilon=e))(1e-5),
                       TypeError, "epsilon must be a static"),
    "mask shape": (lambda: jaxbn.batch_norm(X, mask=jnp.ones((3, 1), bool)), ValueError,
                   r"mask of shape \(3, 1\)"),
    "mask dtype": (lambda: jaxbn.batch_norm(X, mask=jnp.ones((4, 1))), TypeError, "mask"),
    "empty batch": (lambda: jaxbn.batch_norm(jnp.zeros((0, 3))), ValueError, "empty batch"),
    "gradient name": (lambda: jaxbn.batch_norm(X, gradient="symbolic"), ValueError, "gradient"),
    "groups without axis": (lambda: jaxbn.batch_norm(X, axis_index_groups=[[0]]), ValueError,
                            "axis_index_groups"),
    "inference var shape": (lambda: jaxbn.batch_norm_inference(X, jnp.zeros(3), jnp.zeros(2)),
                            ValueError, "var has shape"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_is_refused_at_trace_time(name):
  call, error, message = BAD_CALLS[name]
  with pytest.raises(error, match=message):
    jax.jit(call)() if name != "epsilon traced" else call()


@pytest.mark.parametrize("use_cpu_kernel", [None, False])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_batch_of_one_value_per_feature_gives_beta(shape, use_cpu_kernel, host):
  # Flax's rule (the modules meet it under nnx.vmap ensembles): μ = x, σ² = 0, x̂ = 0.
  x = _device(_rng(4).standard_normal(shape) * 5, np.float32)
  scale, bias = _device(np.full(3, 2.0, np.float32)), _device([0.5, -1.0, 3.0], np.float32)
  axis = -1 if len(shape) == 2 else 1
  f = lambda x, s, b: jaxbn.batch_norm(x, s, b, axis=axis, use_cpu_kernel=use_cpu_kernel)
  dy = _device(_rng(5).standard_normal(shape), np.float32)
  y, stats, (dx, dscale, dbias) = host(jax.jit(lambda x, scale, bias, dy: (  # one compilation
      *f(x, scale, bias), jax.vjp(lambda *a: f(*a)[0], x, scale, bias)[1](dy)))(
          x, scale, bias, dy))
  x, dy = np.asarray(x), np.asarray(dy)
  np.testing.assert_array_equal(y.reshape(3), bias)
  np.testing.assert_array_equal(stats.mean, x.reshape(3))
  np.testing.assert_array_equal(stats.var, 0)
  # y does not depend on x. dx = a·dy + b with b = −a·dy: the kernels fuse it into one FMA,
  # which leaves a·dy's rounding (a = γ/σ = 2/√ε here), so 0 up to an ulp of a·dy.
  a_dy = np.abs(np.asarray(dy)) * 2 / np.sqrt(1e-5)
  np.testing.assert_allclose(dx.reshape(3), 0,
                             atol=float(np.max(a_dy)) * np.finfo(np.float32).eps)
  np.testing.assert_array_equal(dscale, 0)
  np.testing.assert_array_equal(dbias, dy.reshape(3))
