"""The CPU path of `jaxbn.ops.batch_norm`: when its passes run as the C++ kernels, and the calls.

Called by `jaxbn.ops`: `feature_view` decides, at trace time, whether a call can use the
kernels; `forward` and `backward` run it, with the same arguments as `jaxbn._xla_path`'s. A
batch on one device takes one fused call each way (`calls.forward`, `calls.backward`);
statistics pooled across devices (`axis_name`), or needed before (γ, β) are (renorm, a blend), take one
call per pass, with the pooling in JAX between them (`jaxbn._passes`); so does the backward
of a blend, whose coefficients differ from eq. (7)'s. Whether each call then
compiles to the C++ or to its pure-JAX twin is decided when it is lowered
(`jaxbn._cpu.primitive`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxbn import _args, _passes
from jaxbn._cpu import calls
from jaxbn._records import Affine, FeatureView, Residuals, Static, Statistics


def feature_view(x, features, mask, static: Static, gradient: str,
                 use_cpu_kernel: bool | None) -> FeatureView | None:
  """The kernels' (outer, C, inner) view of x if this call can use them, else None.

  Only what tracing can see is decided here; whether a kernel call runs the C++ or its
  pure-JAX twin is decided when it is lowered (`jaxbn._cpu.primitive`).
  """
  if use_cpu_kernel is not None and not isinstance(use_cpu_kernel, bool):
    raise TypeError(f"use_cpu_kernel must be None, True or False, got {use_cpu_kernel!r}.")
  if use_cpu_kernel is False:
    return None
  if use_cpu_kernel is None and static.axis_name is not None and not static.reduction_axes:
    # One value per feature in this call: the statistics come from pooling over axis_name
    # alone (one dense example per vmap instance, as Equinox's layer sees it). XLA fuses the
    # pure path's sums with that psum; kernel calls, or their vmapped twins, only add passes
    # (an Equinox-style 4096x1024 layer: 4.1 ms pure, 7.9 ms as twins).
    return None
  refusal = _refusal(x, features, mask, static, gradient, build=use_cpu_kernel is True)
  if refusal is not None:
    if use_cpu_kernel:
      raise ValueError(f"use_cpu_kernel=True, but {refusal}.")
    return None
  first, last = features[0], features[-1]
  return FeatureView(features=math.prod(x.shape[first:last + 1]),
                     inner=math.prod(x.shape[last + 1:]))


def _refusal(x, features, mask, static: Static, gradient: str, *, build: bool) -> str | None:
  """Why this call cannot use the kernels, or None if it can (as far as tracing knows).

  `build`: find out now whether the kernels can be built (building them); otherwise only a
  status this process already knows refuses, and lowering decides the rest.
  """
  if gradient != "analytic":
    return "gradient='autodiff' differentiates the pure-JAX forward"
  if mask is not None and any(mask.shape[a] != 1 for a in features):
    return "a mask that varies across the feature axes needs the pure-JAX path"
  if static.use_fast_variance:
    return "use_fast_variance=True is the pure-JAX one-pass formula"
  if features != tuple(range(features[0], features[-1] + 1)):
    return f"feature axes {features} are not contiguous"
  spec = getattr(jax.typeof(x).sharding, "spec", ())
  if any(axes is not None for axes in spec):
    # XLA cannot partition a custom call: it would gather x onto every device.
    return (f"x is sharded across devices ({spec}); use shard_map with axis_name for "
            "data-parallel kernels")
  if not calls.supports(x.dtype, static.out_dtype):
    return f"dtypes {x.dtype} -> {static.out_dtype} are not float32/bfloat16/float64"
  if x.size == 0:
    return f"x of shape {x.shape} is empty: there is nothing to compute"
  # Before `calls.status()`, which builds them: a GPU/TPU host would compile a CPU library
  # it never calls. Computations sent to CPU there (jax.default_device) take the pure path.
  if jax.default_backend() != "cpu":
    return f"JAX's default backend is {jax.default_backend()}, and the kernels run on CPU only"
  status = calls.status() if build else calls.known_status()
  if status is not None and not status.available:
    # Known unavailable: the pure-JAX path itself, not kernel calls that lower to their twins.
    return f"the kernels are unavailable: {status.reason}"
  return None


def forward(x, mask, static: Static, affine: Affine) -> tuple[jax.Array, Statistics]:
  """Eqs. (1)-(4) through the kernels: (y, the statistics, broadcastable against x).

  Where `affine` needs the statistics (batch renormalization's γr, γd + β), they come first
  (one kernel call), and eqs. (3)-(4) run as a second.
  """
  cdt = _args.compute_dtype(x)
  if static.axis_name is None and not affine.needs_statistics:
    return _forward_fused(x, affine, mask, static, cdt)
  return _forward_pooled(x, affine, mask, static, cdt)


def backward(static: Static, residuals: Residuals,
             dy) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eqs. (5)-(7) through the kernels: (∂L/∂x, ∂L/∂γ, ∂L/∂β), the last two flat."""
  if static.axis_name is None and residuals.blend is None:
    return _backward_fused(static, residuals, dy)
  return _backward_pooled(static, residuals, dy)


def _mask(mask, x, static):
  """The mask as the kernels take it: one bool per (outer, inner) position, i.e. x's shape
  with the feature axes set to 1 (`_refusal` ensured it does not vary along them)."""
  if mask is None:
    return None
  return jnp.broadcast_to(mask, tuple(n if a in static.reduction_axes else 1
                                      for a, n in enumerate(x.shape)))


def _forward_fused(x, affine, mask, static, cdt):
  """The whole forward in one kernel call: XLA runs nothing between the passes over x."""
  scale, bias = affine(None)  # (γ, β): they do not depend on the statistics here
  y, *vectors, count = calls.forward(
      static.kernel_view, x, scale.ravel(), bias.ravel(),
      _mask(mask, x, static), epsilon=static.epsilon, out_dtype=static.out_dtype,
      force=static.force_kernel)
  hi, lo, var, inv_std = (v.reshape(static.broadcast_shape) for v in vectors)
  # Without a mask m is known at trace time (and the kernel returns no count).
  count = (_passes.local_count(x.shape, None, static.reduction_axes, cdt) if mask is None
           else count.reshape(static.broadcast_shape))
  return y, Statistics(count, hi, lo, var, inv_std)


def _forward_pooled(x, affine, mask, static, cdt):
  """Statistics pooled over `axis_name` (if any): this device's moments, pooled in JAX, then
  y; also the route of a forward whose (γ, β) depend on the statistics."""
  view, kernel_mask = static.kernel_view, _mask(mask, x, static)
  hi, lo, m2 = (v.reshape(static.broadcast_shape)  # eqs. (1)-(2), one read of x
                for v in calls.moments(view, x, kernel_mask, force=static.force_kernel))
  stats = _passes.pooled_statistics(
      _passes.local_count(x.shape, mask, static.reduction_axes, cdt), hi, lo, m2,
      epsilon=static.epsilon, pool=static.pool)
  gamma, beta = affine(stats)
  y = calls.normalize(view, x, stats.hi.ravel(), stats.lo.ravel(),
                      (gamma * stats.inv_std).ravel(), beta.ravel(), kernel_mask,
                      out_dtype=static.out_dtype, force=static.force_kernel)  # eqs. (3)-(4)
  return y, stats


def _backward_fused(static, residuals, dy):
  """The whole backward in one kernel call; eq. (7)'s sums are this batch's own."""
  r = residuals
  return calls.backward(
      static.kernel_view, r.x, dy, r.hi.ravel(), r.lo.ravel(), r.inv_std.ravel(),
      r.scale.astype(r.inv_std.dtype).ravel(), _mask(r.mask, r.x, static),
      force=static.force_kernel)


def _backward_pooled(static, residuals, dy):
  """Eq. (7) with sums pooled over `axis_name` (if any): this device's sums, pooled in JAX,
  then dx; also the route of a blend's backward."""
  r = residuals
  view, kernel_mask = static.kernel_view, _mask(r.mask, r.x, static)
  hi, lo = r.hi.ravel(), r.lo.ravel()
  sum_g, sum_g_centred = (
      v.reshape(static.broadcast_shape)
      for v in calls.grad_sums(view, r.x, dy, hi, lo, kernel_mask, force=static.force_kernel))
  gamma = r.scale.astype(r.inv_std.dtype).reshape(static.broadcast_shape)
  d_scale, d_bias, a, b, k = _passes.gradient_coefficients(
      gamma, r.inv_std, r.count, sum_g, sum_g_centred, static.pool, r.blend)
  dx = calls.grad_input(view, r.x, dy, hi, lo, a.ravel(), b.ravel(), k.ravel(),
                        kernel_mask, force=static.force_kernel)
  return dx, d_scale, d_bias
