"""The C++ kernels' pure-JAX twins: each computes what its kernel computes, from the same
operands — viewed as (outer, C, inner) and handed to `jaxbn._passes`, the passes every pure-JAX
path runs.

Called by `jaxbn._cpu.calls`: the twins are the kernels' derivatives (a `jax.custom_jvp` takes
the tangent of the twin, so second-order derivatives through jaxbn's analytic backward still
work) and what a kernel call compiles to wherever the C++ must not run
(`jaxbn._cpu.primitive`). `jaxbn.kernels` exports them as the tests' reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbn import _passes, _per_feature
from jaxbn._records import FeatureView

# With features last (inner = 1) the view drops its inner axis: (outer, C), reduced over axis
# 0 alone. XLA:CPU reduces (outer, C, 1) over axes 0 and 2 many times slower where JAX
# differentiates the twins (a Hessian-vector product through the kernels): a (131072, 64, 1)
# float32 sum over axis 0 took 472 ms against 26 ms for the same values as (131072, 64).


def _axes(view: FeatureView) -> tuple[int, ...]:
  """The view's batch axes: outer, and inner where it has one."""
  return (0,) if view.inner == 1 else (0, 2)


def _shaped(view: FeatureView, a: jax.Array, features: int) -> jax.Array:
  return a.reshape(-1, features) if view.inner == 1 else a.reshape(-1, features, view.inner)


def _keep(mask, view: FeatureView):
  """The mask as (outer, 1[, inner]), or None."""
  return None if mask is None else _shaped(view, mask, 1)


def _viewed(view: FeatureView, x, mask, dtype):
  """x as (outer, C[, inner]) in `dtype`, padding zeroed, and the mask as (outer, 1[, inner])."""
  keep = _keep(mask, view)
  return _passes.masked(keep, _shaped(view, x, view.features).astype(dtype)), keep


def _column(view: FeatureView, v: jax.Array) -> jax.Array:
  """A per-feature vector shaped to broadcast against the view: (1, C[, 1])."""
  return v.reshape(1, -1) if view.inner == 1 else v.reshape(1, -1, 1)


def _row(v: jax.Array, view: FeatureView) -> jax.Array:
  """A reduced per-feature value (kept dims, or a scalar count) as a (C,) vector."""
  return jnp.broadcast_to(v, (1, view.features, 1)[:len(_axes(view)) + 1]).reshape(view.features)


def _counts(x, view: FeatureView, mask, dtype):
  """m per feature: unmasked values (all of outer·inner without a mask)."""
  keep = _keep(mask, view)
  shape = (view.count(x) // view.inner, view.features, view.inner)[:len(_axes(view)) + 1]
  return _row(_passes.local_count(shape, keep, _axes(view), dtype), view)


def moments_xla(view: FeatureView, x: jax.Array, mask=None):
  x3, keep = _viewed(view, x, mask, view.vector(x).dtype)
  count, m, hi, sum_d, sum_dd = _passes.shifted_moments(
      x3, keep, _passes.local_count(x3.shape, keep, _axes(view), x3.dtype), _axes(view))
  lo = sum_d / m  # a feature with no values: μ = 0, M2 = 0
  m2 = sum_dd - count * jnp.square(lo)
  return tuple(_row(v, view) for v in (hi, lo, m2))


def normalize_xla(view: FeatureView, x, hi, lo, a, b, mask=None, *, out_dtype=None):
  x3, keep = _viewed(view, x, mask, hi.dtype)
  y = _passes.normalize(x3, *(_column(view, v) for v in (hi, lo, a, b)), keep)
  return y.reshape(x.shape).astype(out_dtype or x.dtype)


def grad_sums_xla(view: FeatureView, x, dy, hi, lo, mask=None):
  (x3, keep), (g, _) = (_viewed(view, v, mask, hi.dtype) for v in (x, dy))
  sums = _passes.grad_sums(
      g, _passes.centred(x3, _column(view, hi), _column(view, lo), keep), _axes(view))
  return tuple(_row(v, view) for v in sums)


def grad_input_xla(view: FeatureView, x, dy, hi, lo, a, b, k, mask=None):
  (x3, keep), (g, _) = (_viewed(view, v, mask, hi.dtype) for v in (x, dy))
  x_centred = _passes.centred(x3, _column(view, hi), _column(view, lo), keep)
  dx = _passes.grad_input(g, x_centred, *(_column(view, v) for v in (a, b, k)), keep)
  return dx.reshape(x.shape).astype(x.dtype)


def forward_xla(view: FeatureView, x, scale, bias, mask=None, *, epsilon: float,
                out_dtype=None):
  hi, lo, m2 = moments_xla(view, x, mask)
  count = _counts(x, view, mask, hi.dtype)
  var = _per_feature.variance(m2, _passes.at_least_one(count))  # the C++'s M2/m
  inv_std = _per_feature.inverse_std(var, epsilon)
  y = normalize_xla(view, x, hi, lo, scale * inv_std, bias, mask, out_dtype=out_dtype)
  return y, hi, lo, var, inv_std, count if mask is not None else count[:0]


def backward_xla(view: FeatureView, x, dy, hi, lo, inv_std, scale, mask=None):
  sum_g, sum_g_centred = grad_sums_xla(view, x, dy, hi, lo, mask)
  count = _passes.at_least_one(_counts(x, view, mask, hi.dtype))
  d_scale, d_bias, a, b, k = _passes.gradient_coefficients(
      scale, inv_std, count, sum_g, sum_g_centred)
  return grad_input_xla(view, x, dy, hi, lo, a, b, k, mask), d_scale, d_bias
