"""The per-feature formulas that sit between batch normalization's passes over the activations.

One definition for every path: `jaxbn._passes` calls these for the pure-JAX path
(`jaxbn._xla_path`), the pooled CPU path and the kernels' pure-JAX twins; the fused C++ kernels
(`jaxbn/csrc/batch_norm_cpu.cc`, Forward and Backward) repeat them in the same order of
operations (with 1/√ where JAX has rsqrt: within an ulp), and the tests hold the two to each
other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def variance(m2: jax.Array, count) -> jax.Array:
  """Eq. (2) without ε: M2/m, where M2 = Σ (x − μ)²; never below 0. The fused kernels' form
  (their statistics come as M2); `shifted_variance` is the same from a shifted pass."""
  return jnp.maximum(m2 / count, 0)


def shifted_variance(mean_square: jax.Array, lo: jax.Array) -> jax.Array:
  """Eq. (2) without ε from a shifted pass: (1/m) Σ d² − lo², where d = x − hi and
  lo = mean(d); never below 0 (round-off). A Σ d² that overflowed the compute dtype stays
  inf, as the kernels' M2/m does, rather than turning into inf − inf = NaN."""
  return jnp.where(jnp.isposinf(mean_square), mean_square,
                   jnp.maximum(mean_square - lo * lo, 0))


def inverse_std(var: jax.Array, epsilon: float) -> jax.Array:
  """1/σ of eqs. (2)-(3): ε sits inside σ², so 1/σ is finite even for a constant feature.

  A variance that overflowed the compute dtype (float32: Σ (x − μ)² beyond 3.4e38, e.g.
  σ ≳ 1.8e19) gives NaN, not rsqrt(inf) = 0: that would set y = β silently.
  """
  return jnp.where(jnp.isposinf(var), jnp.full_like(var, jnp.nan), lax.rsqrt(var + epsilon))


def parameter_gradients(sum_g: jax.Array, sum_g_centred: jax.Array, inv_std: jax.Array):
  """(∂L/∂γ, ∂L/∂β) from Σ dy and Σ dy·(x − μ): eq. (5) is Σ dy x̂ with 1/σ taken out of the
  sum, eq. (6) is Σ dy."""
  return sum_g_centred * inv_std, sum_g


def dx_coefficients(scale: jax.Array, inv_std: jax.Array, count, sum_g: jax.Array,
                    sum_g_centred: jax.Array):
  """Per-feature a, b, k of ∂L/∂x = a·dy + b + k·(x − μ), the closed form of eq. (7).

  With x̂ = (x − μ)/σ, eq. (7) is γ/σ · (dy − (1/m)Σ dy − x̂ (1/m)Σ dy x̂), so a = γ/σ,
  b = −a·(1/m)Σ dy and k = −a·(1/σ²)·(1/m)Σ dy (x − μ). `scale` is in the compute dtype.
  """
  a = scale * inv_std
  b = -a * (sum_g / count)
  k = -a * (inv_std * inv_std) * (sum_g_centred / count)
  return a, b, k


def renorm_correction(hi: jax.Array, lo: jax.Array, inv_std: jax.Array,
                      running_mean: jax.Array, running_var: jax.Array, epsilon: float,
                      rmin, rmax, dmax):
  """Batch renormalization's (r, d) (Ioffe 2017, Algorithm 1), per feature, unclipped inside
  [rmin, rmax] × [−dmax, dmax]:

      r = clip(σ_B / σ, rmin, rmax),   d = clip((μ_B − μ) / σ, −dmax, dmax)

  with σ_B = √(σ²_B + ε) = 1/inv_std (eq. (2)) and the running σ = √(running_var + ε): the
  same ε on both sides, so with r, d unclipped x̂·r + d = (x − μ)/σ, the inference formula.

  μ_B comes as hi + lo (`jaxbn._records.Statistics`) and μ_B − μ is formed as
  (hi − μ) + lo: hi and μ are close when d is small, so their difference is exact,
  where μ_B rounded to the compute dtype first would lose |μ_B|/σ's worth of d's digits
  (all of them in float32 at |μ| = 1e5, σ = 0.01).

  A clipping range that excludes r = 1 or d = 0 (rmax < 1, rmin outside [0, 1] — which
  includes rmin > rmax — or dmax < 0, or a NaN clip) gives NaN r or d, and so NaN outputs,
  rather than a silently wrong correction (jnp.clip would give r = rmax, d = −dmax): static
  clips are refused when the call is traced (`jaxbn._args.renorm_clipping`), traced ones
  (passed into `jit`, or scheduled) can only be judged here, per call.
  """
  inv_running_std = lax.rsqrt(running_var + epsilon)
  r = jnp.clip(inv_running_std / inv_std, rmin, rmax)
  d = jnp.clip(((hi - running_mean) + lo) * inv_running_std, -dmax, dmax)
  nan = jnp.full((), jnp.nan, r.dtype)
  r_clips_valid = (rmax >= 1) & (rmin >= 0) & (rmin <= 1)
  return jnp.where(r_clips_valid, r, nan), jnp.where(dmax >= 0, d, nan)


def blend_terms(hi: jax.Array, lo: jax.Array, var: jax.Array, running_mean: jax.Array,
                running_var: jax.Array, weight: jax.Array, epsilon: float):
  """A blended normalization's μ_B − μ_R and 1/σ̃, σ̃² = (1 − w)σ_B² + w·σ_R² + ε (the
  blend's eqs. (1)-(2); `var` is eq. (2) without ε, so ε enters once, as in eq. (2)).

  μ_B − μ_R is formed as (hi − μ_R) + lo, as renorm's d is (see `renorm_correction`).
  """
  shift = (hi - running_mean) + lo
  return shift, inverse_std((1 - weight) * var + weight * running_var, epsilon)


def blend_correction(inv_std: jax.Array, weight: jax.Array, shift: jax.Array,
                     blend_inv_std: jax.Array):
  """(r, d) that turn the batch's x̂ = (x − μ_B)/σ_B into the blend's (x − μ̃)/σ̃ = x̂ r + d:
  r = σ_B/σ̃ and d = (μ_B − μ̃)/σ̃ = w(μ_B − μ_R)/σ̃."""
  return blend_inv_std / inv_std, weight * shift * blend_inv_std

