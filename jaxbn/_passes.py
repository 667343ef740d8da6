"""Batch normalization's passes over the activations, in pure JAX, over any reduction axes.

Written once for every pure-JAX caller: `jaxbn._xla_path` runs them over the call's own axes
(with the sums pooled over `axis_name`), the kernels' twins (`jaxbn._cpu.twins`) over the
(outer, C, inner) view, and the pooled CPU path (`jaxbn._cpu.path`) pools the kernels'
per-device moments with `pooled_statistics`. Per-feature values keep their reduced axes
(keepdims), so they broadcast against x; the formulas between the passes are
`jaxbn._per_feature`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxbn import _per_feature
from jaxbn._records import BlendTerms, Statistics

Pool = Callable  # sums per-device values over the devices (a psum), or the identity


def _local(values):
  return values


def masked(mask: jax.Array | None, value: jax.Array) -> jax.Array:
  # `where`, not multiplication: 0 · NaN is NaN, and padding may hold anything.
  return value if mask is None else jnp.where(mask, value, jnp.zeros((), value.dtype))


def sums(axes: tuple[int, ...], *terms: jax.Array) -> tuple[jax.Array, ...]:
  """Per-feature Σ over the batch axes, keeping them (as size 1)."""
  return tuple(jnp.sum(t, axis=axes, keepdims=True) for t in terms)


def at_least_one(count: jax.Array) -> jax.Array:
  # A feature with every value masked has no statistics; m = 1 keeps it finite (its outputs
  # and gradients are all masked to 0 anyway).
  return jnp.maximum(count, 1)


def local_count(shape: tuple[int, ...], mask: jax.Array | None, axes: tuple[int, ...],
                dtype) -> jax.Array:
  """m of eqs. (1)-(2) before any pooling, per feature (broadcastable against x)."""
  if mask is None:
    m = 1
    for a in axes:
      m *= shape[a]
    return jnp.full((1,) * len(shape), float(m), dtype)
  return jnp.sum(jnp.broadcast_to(mask, shape), axis=axes, dtype=dtype, keepdims=True)


def _from_deviations(count, m, hi, sum_d, sum_dd, epsilon: float) -> Statistics:
  """The statistics from Σ d and Σ d² about hi, d = x − hi (eq. (2) shifted): μ = hi + lo
  with lo = mean(d)."""
  lo = sum_d / m
  var = _per_feature.shifted_variance(sum_dd / m, lo)
  return Statistics(count, hi, lo, var, _per_feature.inverse_std(var, epsilon))


def shifted_moments(x_c: jax.Array, mask: jax.Array | None, count: jax.Array,
                    axes: tuple[int, ...], pool: Pool = _local):
  """Eqs. (1)-(2) as (count, m, hi, Σ d, Σ d²), d = x − hi, m = max(count, 1), by the
  corrected two-pass algorithm: μ = hi + mean(d).

  x_c is in the compute dtype with padding already zeroed; `count` is this device's m. Summing
  x directly in float32 loses |μ|/σ's worth of digits: at x = 1e4 + N(0, 1) the sum's rounding
  alone moves μ by more than σ/100. So the first pass only finds hi, a shift near μ; the
  second sums d = x − hi, which is small and exact to form (Chan, Golub & LeVeque).
  """
  count, sum_x = pool(sums(axes, count, x_c))
  m = at_least_one(count)
  hi = sum_x / m
  d = masked(mask, x_c - hi)
  sum_d, sum_dd = pool(sums(axes, d, d * d))
  return count, m, hi, sum_d, sum_dd


def statistics(x_c: jax.Array, mask: jax.Array | None, count: jax.Array,
               axes: tuple[int, ...], *, epsilon: float, pool: Pool = _local,
               fast_variance: bool = False) -> Statistics:
  """Eqs. (1)-(3) of x_c (compute dtype, padding zeroed), pooled by `pool`.

  `fast_variance`: Flax's one-pass E[x²] − E[x]², which is the shifted formula with hi = 0
  (one pass, and no digits kept when |μ| ≫ σ).
  """
  if fast_variance:
    count, sum_x, sum_xx = pool(sums(axes, count, x_c, x_c * x_c))
    return _from_deviations(count, at_least_one(count), jnp.zeros_like(sum_x), sum_x, sum_xx,
                            epsilon)
  return _from_deviations(*shifted_moments(x_c, mask, count, axes, pool), epsilon)


def pooled_statistics(count, hi, lo, m2, *, epsilon: float, pool: Pool) -> Statistics:
  """Eqs. (1)-(3) pooled across devices from each device's m, μ = hi + lo and M2 = Σ (x − μ)².

  The same two passes, over the devices: a common hi near the global μ, then each device's
  Σ (x − hi) and Σ (x − hi)² from its own mean and M2 — no sum of x itself, so |μ| ≫ σ
  keeps its digits here too.
  """
  total = pool(count)
  m = at_least_one(total)
  global_hi = pool(count * hi) / m
  offset = (hi - global_hi) + lo  # this device's mean − global_hi
  sum_d, sum_dd = pool((count * offset, m2 + count * offset * offset))
  return _from_deviations(total, m, global_hi, sum_d, sum_dd, epsilon)


def centred(x: jax.Array, hi: jax.Array, lo: jax.Array, mask: jax.Array | None) -> jax.Array:
  """x − μ in the compute dtype, formed as (x − hi) − lo; 0 at padding."""
  return masked(mask, (x.astype(hi.dtype) - hi) - lo)


def normalize(x_c, hi, lo, a, b, mask):
  """Eqs. (3)-(4) as ((x − hi) − lo)·a + b, with a = γ/σ and b = β; 0 at padding."""
  return masked(mask, ((x_c - hi) - lo) * a + b)


def grad_sums(g: jax.Array, x_centred: jax.Array, axes: tuple[int, ...]):
  """Σ dy and Σ dy·(x − μ), eqs. (5)-(6) before the 1/σ (g and x_centred 0 at padding)."""
  return sums(axes, g, g * x_centred)


def gradient_coefficients(scale, inv_std, count, sum_g, sum_g_centred, pool: Pool = _local,
                          blend: BlendTerms | None = None):
  """∂L/∂γ, ∂L/∂β and the per-feature a, b, k of ∂L/∂x = a·dy + b + k·(x − μ), from this
  device's Σ dy and Σ dy·(x − μ); `scale` is γ in the compute dtype, shaped as inv_std.

  ∂L/∂γ and ∂L/∂β stay this device's sums (what JAX's autodiff of the same forward gives);
  eq. (7)'s sums and m are global.

  With a `blend`, x̂ = (x − μ̃)/σ̃ and only the batch's share 1 − w of μ̃ and σ̃² depends on
  x: eq. (7) with 1/σ̃ for 1/σ and its two sums times 1 − w, with x − μ_B in its last term
  (the blend's eq. (7), docs/derivation.md). The passes then centre on μ̃ (the residuals'
  hi + lo is μ̃: Σ dy·(x − μ̃) is summed directly, not from two sums that can cancel), so
  dx's last term, k·(x − μ_B) = k·(x − μ̃) − k·w(μ_B − μ_R), moves its constant into b.
  """
  if blend is not None:
    inv_std = blend.inv_std
  d_scale, d_bias = _per_feature.parameter_gradients(sum_g, sum_g_centred, inv_std)
  sum_g, sum_g_centred = pool((sum_g, sum_g_centred))
  if blend is not None:
    sum_g, sum_g_centred = ((1 - blend.weight) * v for v in (sum_g, sum_g_centred))
  a, b, k = _per_feature.dx_coefficients(scale, inv_std, count, sum_g, sum_g_centred)
  if blend is not None:
    b = b - k * (blend.weight * blend.shift)
  return d_scale, d_bias, a, b, k


def grad_input(g, x_centred, a, b, k, mask):
  """The closed form of eq. (7): a·dy + b + k·(x − μ); 0 at padding."""
  return masked(mask, a * g + b + k * x_centred)
