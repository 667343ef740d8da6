"""Santurkar et al.'s probes against ground truth: closed forms on a quadratic ½θᵀAθ, zero ICS
when the earlier layers are frozen, the noise layer's draws, analytic vs autodiff backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.studies.ics import runs as ics_studies, noisy_bn, probes
from experiments.core import models, train

# Tests of experiments/ code, not of the library: outside the fast tier (pytest -m 'not slow').
# Flax's layers and optax rely on JAX's default promotion, which users run with.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]



def _quadratic(n=7, seed=0):
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((n, n))
  a = m @ m.T + 0.5 * np.eye(n)  # symmetric positive definite, well away from a multiple of I
  return a, rng.standard_normal(n)


def _split(theta):
  # A pytree of several leaves, so the probes' flattening is exercised.
  return {"l0": {"kernel": jnp.asarray(theta[:2])}, "l1": {"kernel": jnp.asarray(theta[2:4])},
          "l2": {"kernel": jnp.asarray(theta[4:])}}


def _joined(params):
  return jnp.concatenate([params[k]["kernel"] for k in ("l0", "l1", "l2")])


def test_landscape_on_a_quadratic_matches_the_closed_forms():
  a, theta = _quadratic()
  loss = lambda p: 0.5 * _joined(p) @ jnp.asarray(a) @ _joined(p)
  etas = np.array([0.01, 0.05, 0.2])
  found = jax.jit(probes.landscape, static_argnums=0)(loss, _split(theta), jnp.asarray(etas))
  g = a @ theta
  ag = np.linalg.norm(a @ g)
  # ∇L(θ) − ∇L(θ − ηg) = ηAg: predictiveness η‖Ag‖, smoothness ‖Ag‖/‖g‖ at every η.
  np.testing.assert_allclose(found["grad_change"], etas * ag, rtol=1e-12)
  np.testing.assert_allclose(found["smoothness"], np.full(3, ag / np.linalg.norm(g)), rtol=1e-12)
  moved = theta[None] - etas[:, None] * g[None]
  np.testing.assert_allclose(found["loss"], 0.5 * np.einsum("ki,ij,kj->k", moved, a, moved),
                             rtol=1e-12)
  np.testing.assert_allclose(found["grad_norm"], np.linalg.norm(g), rtol=1e-12)
  summary = probes.summarize_landscape(found)
  np.testing.assert_allclose(summary["beta_smoothness"], ag / np.linalg.norm(g), rtol=1e-12)
  np.testing.assert_allclose(summary["grad_change_max"], etas.max() * ag, rtol=1e-12)


def test_landscape_rejects_step_sizes_that_are_not_a_vector():
  with pytest.raises(ValueError, match="step_sizes must be 1-D"):
    probes.landscape(lambda p: jnp.sum(p**2), jnp.ones(3), jnp.ones((2, 2)))


def test_ics_on_a_quadratic_matches_the_closed_form():
  a, theta = _quadratic()
  loss = lambda p: 0.5 * _joined(p) @ jnp.asarray(a) @ _joined(p)
  params = _split(theta)
  grad_fn = jax.grad(loss)
  step = -0.1 * (a @ theta)  # one SGD step of every parameter
  updated = _split(theta + step)
  found = jax.jit(lambda p, u: probes.internal_covariate_shift(
      grad_fn, p, u, layers=[("l0",), ("l1",), ("l2",)],
      weights=[("l0", "kernel"), ("l1", "kernel"), ("l2", "kernel")]))(params, updated)
  blocks = [slice(0, 2), slice(2, 4), slice(4, 7)]
  for i, rows in enumerate(blocks):
    # G′ − G = A[rows, earlier] · Δθ_earlier: only the earlier layers moved.
    earlier = np.zeros_like(step)
    earlier[:rows.start] = step[:rows.start]
    g, g_shifted = (a @ theta)[rows], (a @ (theta + earlier))[rows]
    np.testing.assert_allclose(found["l2"][i], np.linalg.norm(g - g_shifted), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(found["relative"][i],
                               np.linalg.norm(g - g_shifted) / np.linalg.norm(g), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(
        found["cosine"][i], g @ g_shifted / np.linalg.norm(g) / np.linalg.norm(g_shifted),
        rtol=1e-12)
  assert found["l2"][0] == 0 and found["l2"][1] > 1e-3 and found["l2"][2] > 1e-3


def test_ics_names_a_layer_that_is_not_a_parameter_group():
  params = {"l0": {"kernel": jnp.ones(2)}}
  with pytest.raises(ValueError, match="'l9'"):
    probes.internal_covariate_shift(jax.grad(lambda p: jnp.sum(p["l0"]["kernel"] ** 2)),
                                    params, params, layers=[("l9",)], weights=[("l0", "kernel")])


# ----------------------------------------------------------------------------- on nets


def _net(batch_norm, gradient="analytic"):
  return models.PaperMLP(hidden=(6,), num_classes=3, batch_norm=batch_norm,
                         gradient=gradient, bn_impl="jaxbn-xla")


def _batch(n=12, features=4):
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.standard_normal((n, features)), jnp.float64),
          jnp.asarray(rng.integers(0, 3, n), jnp.int32))


def _init(model, x):
  # float64 throughout, so that the comparisons below are at float64's precision.
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           model.init(jax.random.key(0), x, train=False))
  return variables["params"], variables.get("batch_stats", {})


def _ics(model, tx, params, stats, x, y):
  return jax.jit(functools.partial(ics_studies.ics_on_batch, model, tx))(
      params, stats, tx.init(params), x, y)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_ics_is_zero_when_the_earlier_layers_are_frozen(batch_norm):
  model, (x, y) = _net(batch_norm), _batch()
  params, stats = _init(model, x)
  groups, weights = ics_studies.layer_groups(params)
  grad_fn = jax.grad(lambda p: train.loss_and_stats(model, p, stats, x, y)[0])
  ics = lambda p, u: probes.internal_covariate_shift(grad_fn, p, u, layers=groups,
                                                     weights=weights)

  @jax.jit
  def frozen_and_moving(p):
    sgd = optax.apply_updates(p, jax.tree.map(lambda g: -0.5 * g, grad_fn(p)))
    # Only the read-out layer (Dense_1) moves: no layer has an earlier layer that moves.
    return ics(p, {**p, "Dense_1": sgd["Dense_1"]}), ics(p, sgd)

  found, moving = frozen_and_moving(params)
  np.testing.assert_array_equal(found["l2"], np.zeros(2))
  np.testing.assert_allclose(found["cosine"], np.ones(2), rtol=1e-14)
  # The same net with every layer moving does shift: the probe can see it.
  found = moving
  assert found["l2"][0] == 0 and found["l2"][1] > 0 and found["cosine"][1] < 1


def test_analytic_and_autodiff_backward_give_the_same_probe_values():
  (x, y) = _batch()
  analytic, autodiff = _net(True, "analytic"), _net(True, "autodiff")
  params, stats = _init(analytic, x)
  tx = optax.sgd(0.5)
  etas = jnp.asarray([0.1, 0.5, 2.0], jnp.float64)

  def probes_of(model):
    @jax.jit
    def both(params):
      return (ics_studies.ics_on_batch(model, tx, params, stats, tx.init(params), x, y),
              ics_studies.landscape_on_batch(model, params, stats, x, y, etas))
    return both(params)

  (ics_a, land_a), (ics_b, land_b) = probes_of(analytic), probes_of(autodiff)
  ics, land = (ics_a, ics_b), (land_a, land_b)
  for key in ("l2", "relative", "cosine"):
    np.testing.assert_allclose(ics[0][key], ics[1][key], rtol=1e-9, atol=1e-12)
  for key in ("loss", "grad_change", "smoothness"):
    np.testing.assert_allclose(land[0][key], land[1][key], rtol=1e-9)
  assert np.all(np.asarray(ics[0]["l2"][1:]) > 0)  # a comparison of something non-trivial


def test_noise_layer_draws_what_it_reports_each_step():
  layer = noisy_bn.BatchNoise(mean_range=0.5, std_range=(0.5, 1.0))
  n = 40_000
  y = jnp.zeros((n, 3), jnp.float64)
  draws = []
  for step in range(2):
    out, sown = layer.apply({}, y, train=True, rngs={"noise": jax.random.key(step)},
                            mutable=["intermediates"])
    mean = np.asarray(sown["intermediates"]["noise_mean"][0])
    std = np.asarray(sown["intermediates"]["noise_std"][0])
    assert np.all(np.abs(mean) <= 0.5) and np.all((0.5 <= std) & (std <= 1.0))
    # The batch's per-feature mean and std are the drawn ones, up to sampling error.
    np.testing.assert_allclose(np.mean(out, 0), mean, atol=5 * std.max() / np.sqrt(n))
    np.testing.assert_allclose(np.std(out, 0), std, atol=5 * std.max() / np.sqrt(2 * n))
    draws.append(mean)
  assert not np.allclose(draws[0], draws[1])  # redrawn every step
  # With no spread the shift is exactly the drawn mean; in inference mode nothing is added.
  shift_only = noisy_bn.BatchNoise(mean_range=0.5, std_range=(0.0, 0.0))
  out, sown = shift_only.apply({}, y[:4], train=True, rngs={"noise": jax.random.key(3)},
                               mutable=["intermediates"])
  np.testing.assert_array_equal(out, np.broadcast_to(sown["intermediates"]["noise_mean"][0],
                                                     (4, 3)))
  np.testing.assert_array_equal(layer.apply({}, y[:4], train=False), y[:4])


def test_noisy_bn_net_starts_from_the_bn_nets_weights():
  x, _ = _batch()
  plain = _net(True)
  noisy = noisy_bn.NoisyBNMLP(hidden=(6,), num_classes=3, bn_impl="jaxbn-xla")
  a, b = _init(plain, x), _init(noisy, x)
  jax.tree.map(np.testing.assert_array_equal, a, b)
