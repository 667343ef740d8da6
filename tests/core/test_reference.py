"""jaxbn.reference: the literal forward and the staged backward of the seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbn import reference


@pytest.fixture(scope="module")
def nchw():
  # Placed with jax.device_put: jnp.asarray of a NumPy array compiles a program of its own.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 2, 2)) * 2 - 1
  return tuple(map(jax.device_put, (x, rng.uniform(0.5, 2.0, 4), rng.standard_normal(4),
                                    rng.standard_normal(x.shape))))


@pytest.fixture(scope="module")
def staged(nchw):
  """The staged backward on nchw, run once (eagerly, as written) for the tests that read it."""
  x, scale, _, dy = nchw
  return reference.staged_backward(x, scale, dy, axis=1)


def test_forward_is_equations_1_to_4(nchw):
  x, scale, bias, _ = nchw
  y = jax.jit(lambda *a: reference.batch_norm_reference(*a, axis=1))(x, scale, bias)
  xn = np.asarray(x)
  mu = xn.mean((0, 2, 3), keepdims=True)  # (1)
  sigma2 = ((xn - mu) ** 2).mean((0, 2, 3), keepdims=True) + 1e-5  # (2)
  want = np.asarray(scale)[:, None, None] * (xn - mu) / np.sqrt(sigma2) \
      + np.asarray(bias)[:, None, None]  # (3), (4)
  np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)


def test_staged_backward_equals_autodiff_of_forward(nchw, staged):
  x, scale, bias, dy = nchw
  dx, dscale, dbias = jax.jit(lambda x, scale, bias, dy: jax.vjp(
      lambda *p: reference.batch_norm_reference(*p, axis=1), x, scale, bias)[1](dy))(
          x, scale, bias, dy)
  np.testing.assert_allclose(staged.dL_dx, dx, rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(staged.dL_dgamma, dscale, rtol=1e-12)
  np.testing.assert_allclose(staged.dL_dbeta, dbias, rtol=1e-12)


def test_staged_terms_are_the_seeds_formulas(nchw, staged, host):
  _, scale, _, dy = host(nchw)
  s = host(staged)  # the checks below in NumPy float64
  m = 3 * 2 * 2
  sigma = 1 / s.dxhat_dx
  np.testing.assert_allclose(s.dmu_dx, 1 / m)
  np.testing.assert_allclose(s.dL_dxhat, dy * scale[None, :, None, None], rtol=1e-15)
  # ∂L/∂μ's second term multiplies Σ(x_i − μ), which is 0: only rounding is left of it.
  assert float(np.max(np.abs(s.dL_dmu_vanishing))) < 1e-13
  np.testing.assert_allclose(
      s.dL_dmu, np.sum(-s.dL_dxhat / sigma, axis=(0, 2, 3), keepdims=True), rtol=1e-12)
  # The three paths of eq. (7) add up to the result.
  paths = s.dL_dxhat * s.dxhat_dx + s.dL_dsigma2 * s.dsigma2_dx + s.dL_dmu * s.dmu_dx
  np.testing.assert_array_equal(paths, s.dL_dx)


def test_staged_backward_masks_padding(host):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 2))
  dy = rng.standard_normal((6, 2))
  mask = np.arange(6)[:, None] < 4
  padded = np.where(mask, x, np.nan)
  s, full = host(jax.jit(lambda padded, x, dy: (  # one compilation for both
      reference.staged_backward(padded, jnp.ones(2), dy, mask=mask),
      reference.staged_backward(x[:4], jnp.ones(2), dy[:4])))(padded, x, dy))
  np.testing.assert_allclose(s.dL_dx[:4], full.dL_dx, rtol=1e-12)
  np.testing.assert_array_equal(s.dL_dx[4:], 0)
  np.testing.assert_allclose(s.dL_dgamma, full.dL_dgamma, rtol=1e-12)


def test_reference_refuses_bad_input():
  zeros, ones = (lambda *shape: jax.device_put(np.zeros(shape)),
                 lambda *shape: jax.device_put(np.ones(shape)))
  with pytest.raises(ValueError, match="dy has shape"):
    reference.staged_backward(zeros(4, 3), ones(3), zeros(4, 2))
  with pytest.raises(ValueError, match="scale has shape"):
    reference.batch_norm_reference(zeros(4, 3), ones(2), zeros(3))
