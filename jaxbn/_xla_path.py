"""The pure-JAX path of `jaxbn.ops.batch_norm`: eqs. (1)-(4) and their analytic backward as
`jaxbn._passes`' passes over the call's own reduction axes, pooled over `axis_name`.

`jaxbn.ops` calls it for every call the C++ kernels do not take (`static.kernel_view` is None),
on every platform; `jaxbn._cpu.path` has the same two functions with the same arguments.
"""

from __future__ import annotations

import jax

from jaxbn import _args, _passes
from jaxbn._records import Affine, Residuals, Static, Statistics


def forward(x, mask, static: Static, affine: Affine) -> tuple[jax.Array, Statistics]:
  """Eqs. (1)-(4): y in `static.out_dtype` and the statistics, broadcastable against x."""
  cdt = _args.compute_dtype(x)
  # Padding is zeroed before any arithmetic: where-masking only the result would still let
  # autodiff multiply a zero cotangent by a NaN partial (0 · NaN = NaN).
  x_c = _passes.masked(mask, x.astype(cdt))
  stats = _passes.statistics(
      x_c, mask, _passes.local_count(x.shape, mask, static.reduction_axes, cdt),
      static.reduction_axes, epsilon=static.epsilon, pool=static.pool,
      fast_variance=static.use_fast_variance)
  gamma, beta = affine(stats)
  y = _passes.normalize(x_c, stats.hi, stats.lo, gamma * stats.inv_std, beta, mask)
  return y.astype(static.out_dtype), stats


def backward(static: Static, residuals: Residuals,
             dy) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eqs. (5)-(7): (∂L/∂x in x's dtype, ∂L/∂γ, ∂L/∂β), the last two broadcastable against x."""
  r = residuals
  x_centred = _passes.centred(r.x, r.hi, r.lo, r.mask)  # x − μ recomputed; x̂ = it·1/σ
  g = _passes.masked(r.mask, dy.astype(r.hi.dtype))
  sum_g, sum_g_centred = _passes.grad_sums(g, x_centred, static.reduction_axes)
  gamma = r.scale.astype(r.inv_std.dtype).reshape(static.broadcast_shape)
  d_scale, d_bias, a, b, k = _passes.gradient_coefficients(
      gamma, r.inv_std, r.count, sum_g, sum_g_centred, static.pool, r.blend)
  dx = _passes.grad_input(g, x_centred, a, b, k, r.mask)
  return dx.astype(r.x.dtype), d_scale, d_bias
