"""Calls to the functional core that must be refused or stay well defined: arguments of the
wrong kind (ε, axis), a variance that overflows the compute dtype, forward mode on the
analytic backward. The kernels' build and cache faults are tests/cpu/test_build_and_cache.py's."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn.linen

# Inputs are built in NumPy and placed with jax.device_put, results checked in NumPy: outside
# jit every jnp op (jnp.asarray of a NumPy array included) compiles a program of its own.
X = jax.device_put(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))

# Both paths when the kernels can be built here; the pure-JAX path alone where they cannot
# (test_kernels.py fails, rather than skips, if a compiler exists and the build does not).
PATHS = [False] + ([True] if shutil.which("c++") or shutil.which("g++") else [])


@pytest.mark.parametrize("epsilon", [True, np.bool_(True), "1e-5", b"1", None, [1e-5], 1j])
def test_epsilon_that_is_not_a_real_number_is_refused(epsilon):
  # float() accepted True (ε = 1.0) and "1e-5"; both are mistakes.
  with pytest.raises(TypeError, match="epsilon must be a real number"):
    jaxbn.batch_norm(X, epsilon=epsilon)
  with pytest.raises(TypeError, match="epsilon must be a real number"):
    jaxbn.batch_norm_inference(X, jax.device_put(np.zeros(3)), jax.device_put(np.ones(3)),
                               epsilon=epsilon)


@pytest.mark.parametrize("epsilon", [1e-3, 1, np.float32(1e-3), np.array(1e-3)])
def test_epsilon_numbers_of_every_kind_agree(epsilon):
  expected, got = jax.jit(lambda x: (  # one compilation for both
      jaxbn.batch_norm(x, epsilon=1e-3 if epsilon != 1 else 1.0)[0],
      jaxbn.batch_norm(x, epsilon=epsilon)[0]))(X)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("axis", [1.0, "1", None, {1: 1}])
def test_axis_that_is_not_an_int_or_sequence_names_axis(axis):
  # axis=1.0 failed with "'float' object is not iterable".
  with pytest.raises(TypeError, match="axis must be an int or a sequence of ints"):
    jaxbn.batch_norm(X, axis=axis)


@pytest.mark.parametrize("use_cpu_kernel", PATHS)
def test_overflowing_variance_is_nan_on_both_paths(use_cpu_kernel):
  # Σ (x − μ)² beyond float32's 3.4e38: the variance is inf on both paths. Before, 1/σ was
  # rsqrt(inf) = 0, so y = β silently (σ = 1e19), and at σ = 1e37 the pure path's inf − inf
  # made var NaN where the kernel kept inf. Now y and the feature's gradients are NaN (the
  # loss shows it), var is inf, and the other features are untouched.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 4)) * np.array([1.0, 1e19, 1e37, 1e-3])
  x = x.astype(np.float32)
  scale, bias = np.full(4, 2.0, np.float32), np.full(4, 0.5, np.float32)
  f = lambda x, s, b: jaxbn.batch_norm(x, s, b, use_cpu_kernel=use_cpu_kernel)
  dy = rng.standard_normal(x.shape).astype(np.float32)
  y, stats, fine, (dx, dscale, dbias) = jax.tree.map(np.asarray, jax.jit(
      lambda x, scale, bias, dy: (  # one compile
          *f(x, scale, bias), f(x[:, ::3], scale[::3], bias[::3])[0],
          jax.vjp(lambda *a: f(*a)[0], x, scale, bias)[1](dy)))(x, scale, bias, dy))
  np.testing.assert_array_equal(np.isposinf(stats.var), [False, True, True, False])
  assert np.all(np.isnan(y[:, 1:3]))
  np.testing.assert_array_equal(y[:, ::3], fine)
  assert np.all(np.isnan(dx[:, 1:3])) and np.all(np.isnan(dscale[1:3]))
  assert np.all(np.isfinite(dx[:, ::3])) and np.all(np.isfinite(dscale[::3]))
  # Eq. (6) needs no σ, so ∂L/∂β stays finite (float32 sums against NumPy's float64 ones).
  np.testing.assert_allclose(dbias, np.sum(dy.astype(np.float64), axis=0), rtol=1e-5,
                             atol=1e-5)


def test_overflow_gives_the_same_answer_on_both_paths():
  if len(PATHS) < 2:
    pytest.skip("no C++ compiler, so there is no kernel path to compare")
  x = (np.random.default_rng(2).standard_normal((64, 3)) * [1e18, 3e18, 1e37]).astype(
      np.float32)
  kernel, pure = jax.tree.map(np.asarray, jax.jit(lambda x: tuple(  # one compilation, both paths
      jaxbn.batch_norm(x, use_cpu_kernel=k) for k in (True, False)))(x))
  for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(pure), strict=True):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
  # 1e18 · √64: Σ (x − μ)² ≈ 6e37 still fits; 3e18 does not (6e38), on both paths alike.
  assert np.isfinite(kernel[1].var[0]) and np.isposinf(kernel[1].var[1])


@pytest.mark.parametrize("transform", ["jvp", "jit_jvp", "jacfwd"])
def test_forward_mode_error_names_autodiff(transform):
  # JAX's own message ("can't apply forward-mode autodiff (jvp) to a custom_vjp function")
  # does not say what to do instead.
  f = lambda x: jaxbn.batch_norm(x)[0]
  run = {"jvp": lambda: jax.jvp(f, (X,), (X,)),
         "jit_jvp": lambda: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(X),
         "jacfwd": lambda: jax.jacfwd(f)(X)}[transform]
  with pytest.raises(TypeError, match="gradient='autodiff'"):
    run()


def test_forward_mode_error_reaches_module_users():
  bn = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = jax.jit(lambda x: bn.init(jax.random.key(0), x))(X)
  with pytest.raises(TypeError, match="gradient='autodiff'"):
    jax.jvp(lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0], (X,), (X,))


@pytest.mark.slow
def test_forward_over_reverse_still_works():
  # The check must not catch a Hessian's outer jvp, which JAX runs on the linearized program.
  loss = lambda x: jnp.sum(jnp.tanh(jaxbn.batch_norm(x)[0]))
  hvp = jax.jvp(jax.grad(loss), (X,), (X,))[1]
  expected = jax.jvp(jax.grad(lambda x: jnp.sum(jnp.tanh(
      jaxbn.batch_norm(x, gradient="autodiff")[0]))), (X,), (X,))[1]
  np.testing.assert_allclose(hvp, expected, rtol=1e-4, atol=1e-5)
