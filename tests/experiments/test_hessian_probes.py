"""The Hessian probes against ground truth: a quadratic whose spectrum is chosen, and a small BN
net whose Hessian is formed exactly (autodiff's forward-over-reverse, `jax.hessian`) and
eigendecomposed in float64; the analytic and autodiff HVPs on the same nets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments.core import models
from experiments.studies.hessian import runs, spectrum

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]


def _quadratic(eigenvalues, seed=0):
  """A symmetric matrix with the given eigenvalues in a random orthonormal basis, and
  L(θ) = ½ θᵀAθ over a pytree of three leaves (the flattening is exercised)."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  a = q @ np.diag(eigenvalues) @ q.T
  cut = (n // 3, 2 * n // 3)

  def loss(params):
    theta = jnp.concatenate([params["a"], params["b"]["c"], params["d"]])
    return 0.5 * theta @ jnp.asarray(a) @ theta

  theta = np.random.default_rng(seed + 1).standard_normal(n)
  params = {"a": jnp.asarray(theta[:cut[0]]), "b": {"c": jnp.asarray(theta[cut[0]:cut[1]])},
            "d": jnp.asarray(theta[cut[1]:])}
  return a, theta, loss, params


def _with_outliers(n=60, seed=0):
  # Three isolated eigenvalues above a bulk in [-0.2, 1]: the shape the studies look for.
  bulk = np.random.default_rng(seed).uniform(-0.2, 1.0, n - 3)
  return np.concatenate([[40.0, 25.0, 10.0], bulk])


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hvp_is_the_matrix_product(mode):
  a, _, loss, params = _quadratic(_with_outliers())
  matvec, n = spectrum.hvp(loss, params, mode=mode)
  v = np.random.default_rng(2).standard_normal(n)
  np.testing.assert_allclose(matvec(v), a @ v, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="mode must be one of"):
    spectrum.hvp(loss, params, mode="forward")


def test_lanczos_top_eigenpairs_and_gradient_concentration_on_a_quadratic():
  eigenvalues = _with_outliers()
  a, theta, loss, params = _quadratic(eigenvalues)
  matvec, n = spectrum.hvp(loss, params)
  tri = spectrum.lanczos(matvec, spectrum.random_unit_vector(n, 0), 40)
  # The Lanczos vectors stay orthonormal (full re-orthogonalization) and V A Vᵀ = T.
  np.testing.assert_allclose(tri.vectors @ tri.vectors.T, np.eye(40), atol=1e-12)
  t = np.diag(tri.alpha) + np.diag(tri.beta, 1) + np.diag(tri.beta, -1)
  np.testing.assert_allclose(tri.vectors @ a @ tri.vectors.T, t, atol=1e-10)
  top, vectors = spectrum.eigenpairs(tri, 5)
  exact = np.sort(eigenvalues)[::-1]
  np.testing.assert_allclose(top[:3], exact[:3], rtol=1e-10)
  # Each Ritz vector is an eigenvector: ‖Au − λu‖ small.
  for value, u in zip(top[:3], vectors[:3]):
    assert np.linalg.norm(a @ u - value * u) < 1e-8
  # The gradient Aθ's share in the top-3 eigenspace, against the exact eigenvectors.
  w, u = np.linalg.eigh(a)
  g = a @ theta
  share = np.sum((u[:, -3:].T @ g) ** 2) / (g @ g)
  found = spectrum.gradient_concentration(spectrum.gradient(loss, params), vectors[:3])
  np.testing.assert_allclose(found[-1], share, rtol=1e-8)
  assert np.all(np.diff(found) >= 0) and found[-1] <= 1 + 1e-12
  # Three isolated eigenvalues, counted against the 5th (in the bulk).
  assert spectrum.outliers(top, factor=2.0) == 3


def test_lanczos_stops_when_the_krylov_space_is_exhausted():
  # Three distinct eigenvalues: the Krylov space of any start has dimension 3.
  eigenvalues = np.repeat([3.0, 1.0, -2.0], 10)
  _, _, loss, params = _quadratic(eigenvalues)
  matvec, n = spectrum.hvp(loss, params)
  tri = spectrum.lanczos(matvec, spectrum.random_unit_vector(n, 1), 20)
  assert tri.alpha.size == 3
  np.testing.assert_allclose(spectrum.eigenpairs(tri, 3)[0], [3.0, 1.0, -2.0], atol=1e-10)


def test_slq_moments_density_and_trace_on_a_quadratic():
  eigenvalues = _with_outliers(n=50)
  a, _, loss, params = _quadratic(eigenvalues)
  matvec, n = spectrum.hvp(loss, params)
  starts = [spectrum.random_unit_vector(n, s) for s in range(40)]
  runs_ = [spectrum.lanczos(matvec, v, 8) for v in starts]
  measure = spectrum.quadrature(runs_)
  np.testing.assert_allclose(measure.weights.sum(axis=1), 1.0, rtol=1e-12)
  # Gauss quadrature with 8 nodes is exact for vᵀAᵖv up to p = 15, run by run.
  for v, nodes, weights in zip(starts, measure.nodes, measure.weights):
    for p in (1, 2, 5, 15):
      np.testing.assert_allclose(np.sum(weights * nodes**p),
                                 v @ np.linalg.matrix_power(a, p) @ v, rtol=1e-8)
  # Averaged over starts: tr(Aᵖ)/n, within 5 standard errors of the starts' spread.
  per_run = lambda p: np.sum(measure.weights * measure.nodes**p, axis=1)
  for p in (1, 2):
    estimate, error = per_run(p).mean(), per_run(p).std(ddof=1) / np.sqrt(len(starts))
    assert abs(estimate - np.sum(eigenvalues**p) / n) < 5 * error
    np.testing.assert_allclose(spectrum.moments(measure, p + 1)[p], estimate, rtol=1e-12)
  # The smoothed density is a probability density whose mean is the first moment.
  grid = np.linspace(-5, 50, 20001)
  density = spectrum.spectral_density(measure, grid, sigma=0.3)
  np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.trapezoid(grid * density, grid), per_run(1).mean(), rtol=1e-6)
  trace, error = spectrum.hutchinson_trace(matvec, n, 64, seed=3)
  assert abs(trace - eigenvalues.sum()) < 5 * error


def _tiny_bn_net(activation, gradient):
  return models.PaperMLP(hidden=(4, 3), num_classes=3, batch_norm=True, activation=activation,
                         gradient=gradient)


def _tiny_problem(activation):
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((2, 8, 5)))  # two batches of 8 examples
  ys = jnp.asarray(rng.integers(0, 3, (2, 8)))
  variables = _tiny_bn_net(activation, "analytic").init(jax.random.key(0), xs[0], train=False)
  params = jax.tree.map(lambda p: p + 0.3 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        variables["params"])  # off the initialization's symmetric γ=1, β=0
  return params, variables["batch_stats"], xs, ys


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_probes_match_the_exact_hessian_of_a_small_bn_net(activation):
  params, stats, xs, ys = _tiny_problem(activation)
  autodiff = runs.sample_loss(_tiny_bn_net(activation, "autodiff"), train_mode=True)
  analytic = runs.sample_loss(_tiny_bn_net(activation, "analytic"), train_mode=True)
  flat, unravel = ravel_pytree(params)
  exact = np.asarray(jax.hessian(lambda f: autodiff(unravel(f), stats, xs, ys))(flat))
  np.testing.assert_allclose(exact, exact.T, atol=1e-12)
  eigenvalues = np.linalg.eigvalsh(exact)[::-1]
  # Column by column the analytic HVPs (both ways) are the exact Hessian, to float64 rounding.
  for mode in spectrum.MODES:
    matvec, n = spectrum.hvp(analytic, params, stats, xs, ys, mode=mode)
    assert n == flat.size
    columns = np.stack([matvec(e) for e in np.eye(n)], axis=1)
    np.testing.assert_allclose(columns, exact, rtol=0, atol=1e-11 * np.abs(exact).max())
  tri = spectrum.lanczos(matvec, spectrum.random_unit_vector(n, 0), n)
  top, _ = spectrum.eigenpairs(tri, 5)
  np.testing.assert_allclose(top, eigenvalues[:5], rtol=1e-8, atol=1e-10)
  # SLQ with a few short runs: each run's moments exact, their mean near tr(Hᵖ)/n.
  starts = [spectrum.random_unit_vector(n, s) for s in range(30)]
  measure = spectrum.quadrature([spectrum.lanczos(matvec, v, 6) for v in starts])
  for v, nodes, weights in zip(starts[:3], measure.nodes, measure.weights):
    np.testing.assert_allclose(np.sum(weights * nodes**2), v @ exact @ exact @ v, rtol=1e-8)
  per_run = np.sum(measure.weights * measure.nodes**2, axis=1)
  assert abs(per_run.mean() - np.sum(eigenvalues**2) / n) < 5 * per_run.std(ddof=1) / np.sqrt(30)
  trace, error = spectrum.hutchinson_trace(matvec, n, 200, seed=1)
  assert abs(trace - np.trace(exact)) < 5 * error


# The kernels' HVPs both ways are held against the exact Hessian above; here each path once.
@pytest.mark.parametrize("use_kernels, mode", [(True, "reverse-over-reverse"),
                                              (False, "forward-over-reverse")])
def test_analytic_and_autodiff_hvps_agree_to_float64_rounding(use_kernels, mode):
  params, stats, xs, ys = _tiny_problem("sigmoid")
  impl = "jaxbn" if use_kernels else "jaxbn-xla"
  make = lambda gradient: models.PaperMLP(hidden=(4, 3), num_classes=3, activation="sigmoid",
                                          gradient=gradient, bn_impl=impl)
  worst = runs.hvp_agreement(runs.sample_loss(make("analytic"), train_mode=True),
                             runs.sample_loss(make("autodiff"), train_mode=True),
                             params, (stats, xs, ys), vectors=4, seed=0, mode=mode)
  assert worst < 1e-12


def test_lanczos_and_density_refuse_bad_arguments():
  matvec = lambda v: v
  with pytest.raises(ValueError, match="order must be >= 1"):
    spectrum.lanczos(matvec, np.ones(3), 0)
  with pytest.raises(ValueError, match="start must be a finite, non-zero vector"):
    spectrum.lanczos(matvec, np.zeros(3), 2)
  with pytest.raises(ValueError, match="sigma must be > 0"):
    spectrum.spectral_density(spectrum.quadrature([spectrum.lanczos(matvec, np.ones(3), 2)]),
                              np.zeros(3), 0.0)
  with pytest.raises(ValueError, match="samples must be >= 2"):
    spectrum.hutchinson_trace(matvec, 3, 1, seed=0)
