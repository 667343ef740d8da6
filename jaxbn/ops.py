"""Batch normalization: the training-mode forward, eqs. (1)-(4), and its analytic backward.

This module is jaxbn's one core. Every formula the Flax modules use lives here:

    μ   = (1/m) Σ x_i                               (1)
    σ²  = (1/m) Σ (x_i − μ)² + ε                    (2)
    x̂_i = (x_i − μ) / σ                             (3)
    y_i = γ x̂_i + β                                 (4)

and, given dy = ∂L/∂y, the backward the seed derives term by term and leaves unfinished:

    ∂L/∂β   = Σ dy_i                                (6)
    ∂L/∂γ   = Σ dy_i x̂_i                            (5)
    ∂L/∂x_i = γ/σ · (dy_i − (1/m) Σ dy_j − x̂_i (1/m) Σ dy_j x̂_j)   closed form of (7)

`docs/derivation.md` derives the closed form; `jaxbn.reference` computes it the seed's way.

On CPU the passes over the activations (statistics, normalize, the two backward sums, dx)
run as fused C++ kernels (`jaxbn.kernels`) when the call allows it — one call for the
forward and one for the backward, or one per pass when statistics are pooled across devices.
The per-feature formulas between the passes are `jaxbn._per_feature`'s, for both paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _args, _per_feature, kernels

try:  # private: only to name the fix when forward mode meets the custom_vjp
  from jax._src.interpreters.ad import JVPTracer as _JVPTracer
except ImportError:  # pragma: no cover - a JAX without it gets JAX's own error
  _JVPTracer = None

__all__ = ["BatchStats", "batch_norm", "batch_norm_inference", "update_running_stats"]


class BatchStats(NamedTuple):
  """Per-feature batch statistics, for running averages.

  Attributes:
    mean: μ of eq. (1), in float32 or wider, with the feature shape.
    var: the biased variance (1/m) Σ (x_i − μ)², i.e. eq. (2) without ε.
    count: m, the number of values behind each feature's statistics (across devices with
      `axis_name`, unmasked only with a mask), for the unbiased m/(m − 1) correction.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that is not an array; a hashable custom_vjp nondiff argument."""

  reduction_axes: tuple[int, ...]
  broadcast_shape: tuple[int, ...]
  epsilon: float
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  use_fast_variance: bool
  out_dtype: np.dtype
  # (features, inner) view for the C++ CPU kernels, or None for the pure-JAX path everywhere.
  kernel_layout: kernels.Layout | None = None
  # use_cpu_kernel=True: the C++ in every CPU lowering, even where lowering would pick the twin.
  force_kernel: bool = False


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _args.Axes = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = False,
    gradient: Literal["analytic", "autodiff"] = "analytic",
    dtype: Any = None,
    use_cpu_kernel: bool | None = None,
) -> tuple[jax.Array, BatchStats]:
  """Training-mode batch normalization, y = γ (x − μ) / σ + β, with batch statistics.

  Statistics are taken per feature over every axis not in `axis` (for NHWC activations and
  `axis=-1`, over N·H·W values), in float32 or wider whatever x's dtype. The variance is
  two-pass and shifted, so a feature with |μ| ≫ σ keeps its digits; `use_fast_variance=True`
  gives Flax's one-pass E[x²] − E[x]² instead. A constant feature gives y = β and finite
  gradients, since σ ≥ √ε.

  `gradient="analytic"` differentiates with the hand-derived backward (a `jax.custom_vjp`:
  reverse mode, reverse-over-reverse included, saving only x and per-feature vectors);
  `gradient="autodiff"` lets JAX differentiate the same forward, which also allows forward
  mode (`jax.jvp`, `jax.jacfwd`), which JAX refuses for a custom_vjp.

  Args:
    x: activations, any floating dtype.
    scale: γ, with the feature shape: x's sizes at the feature axes in increasing axis
      order (Flax's convention); None means γ = 1.
    bias: β, with the feature shape; None means β = 0.
    axis: the feature axis or axes; statistics reduce over all the others.
    epsilon: ε of eq. (2), added to the variance inside the square root.
    mask: boolean, broadcastable to x; False marks padding. Statistics use only unmasked
      values; a masked position's output and gradient are 0 whatever it holds, NaN included.
    axis_name: a named axis (shard_map, pmap, vmap) over which devices pool their batches:
      statistics are exact global ones, count-weighted when masks differ per device.
    axis_index_groups: groups of indices within `axis_name` that pool separately (pmap).
    use_fast_variance: one-pass E[x²] − E[x]² (clamped at 0), as Flax's default.
    gradient: "analytic" or "autodiff".
    dtype: the output dtype; default x's dtype.
    use_cpu_kernel: run the passes over x and dy as jaxbn's fused C++ kernels when on CPU.
      None (default): wherever the call allows — analytic gradient, no mask or one that
      does not vary across the feature axes (padding positions or examples), two-pass
      variance, contiguous feature axes, float32/bfloat16/float64, x not explicitly
      sharded — and, decided when the computation is lowered, where they cannot make XLA
      gather a sharded batch (one device in the computation, or per device inside
      shard_map/pmap), not under `jax.export`, and the kernels could be built
      (`jaxbn.kernels.status()`); elsewhere their pure-JAX twins are compiled in, as on
      every other platform. True: raise if this call cannot use them, and use them in every
      CPU lowering, even under a multi-device jit or an export (you assert x is not split
      across devices; an exported artifact then needs jaxbn's kernels registered where it
      runs). False: pure JAX.

  Returns:
    `(y, stats)`: y with x's shape and `dtype`, and the batch `BatchStats` (gradients do not
    flow through them: they feed running averages, not the loss).
  """
  x = _args.floating_input(x)
  features, reductions = _args.feature_axes(x, axis)
  shape = _args.feature_shape(x, features)
  cdt = _args.compute_dtype(x)
  scale = jnp.ones(shape, cdt) if scale is None else _args.per_feature("scale", scale, shape)
  bias = jnp.zeros(shape, cdt) if bias is None else _args.per_feature("bias", bias, shape)
  _args.reduction_size(x, reductions)
  static = _Static(
      reduction_axes=reductions,
      broadcast_shape=_args.broadcast_shape(x, features),
      epsilon=_args.epsilon_value(epsilon),
      axis_name=axis_name,
      axis_index_groups=_args.index_groups(axis_name, axis_index_groups),
      use_fast_variance=bool(use_fast_variance),
      out_dtype=_args.output_dtype(x, dtype),
  )
  mask = _args.batch_mask(mask, x)
  gradient = _args.gradient_mode(gradient)
  static = dataclasses.replace(
      static, kernel_layout=_kernel_layout(x, features, mask, static, gradient, use_cpu_kernel),
      force_kernel=use_cpu_kernel is True)
  if gradient == "analytic":
    _refuse_forward_mode(x, scale, bias)
    x, scale, bias = (_device_varying(v, axis_name) for v in (x, scale, bias))
    y, stats = _batch_norm_analytic(x, scale, bias, mask, static)
  else:
    y, stats, _ = _forward(x, scale, bias, mask, static)
  return y, jax.tree.map(lax.stop_gradient, stats)


def batch_norm_inference(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _args.Axes = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> jax.Array:
  """Inference-mode batch normalization with given (running) statistics.

  y = γ (x − mean) / √(var + ε) + β is affine in x, so JAX's autodiff is already exact here
  and forward mode works.

  Args:
    x: activations, any floating dtype.
    mean: running mean, with the feature shape.
    var: running (biased or unbiased, as stored) variance, with the feature shape.
    scale: γ, with the feature shape; None means γ = 1.
    bias: β, with the feature shape; None means β = 0.
    axis: the feature axis or axes.
    epsilon: ε, added to `var`.
    dtype: the output dtype; default x's dtype.

  Returns:
    y, with x's shape and `dtype`.
  """
  x = _args.floating_input(x)
  features, _ = _args.feature_axes(x, axis)
  shape = _args.feature_shape(x, features)
  bshape = _args.broadcast_shape(x, features)
  cdt = _args.compute_dtype(x)
  eps = _args.epsilon_value(epsilon)
  out_dtype = _args.output_dtype(x, dtype)

  def vector(name, value, default):
    value = default if value is None else _args.per_feature(name, value, shape)
    return value.astype(cdt).reshape(bshape)

  mean = vector("mean", mean, None)
  inv_std = lax.rsqrt(vector("var", var, None) + eps)
  scale = vector("scale", scale, jnp.ones(shape, cdt))
  bias = vector("bias", bias, jnp.zeros(shape, cdt))
  y = (x.astype(cdt) - mean) * (scale * inv_std) + bias
  return y.astype(out_dtype)


def update_running_stats(
    mean: jax.Array,
    var: jax.Array,
    batch: BatchStats,
    *,
    momentum: float | None,
    num_batches: jax.Array | None = None,
    unbiased_var: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The running averages that inference uses in place of the batch statistics.

  With a float `momentum` (Flax's convention, the weight of the *old* value):

      running ← momentum · running + (1 − momentum) · batch

  PyTorch's `momentum` is the weight of the *new* value: PyTorch 0.1 is Flax 0.9. With
  `momentum=None` (PyTorch's cumulative average) every batch weighs the same: the weight of
  the new value is 1/num_batches, where `num_batches` counts this batch too.

  Args:
    mean: the running mean; the result keeps its dtype.
    var: the running variance; the result keeps its dtype.
    batch: this batch's `BatchStats`.
    momentum: decay of the old value, or None for the cumulative average.
    num_batches: batches seen including this one; required when `momentum` is None.
    unbiased_var: average the unbiased m/(m − 1)·var (the BN paper's Algorithm 2 and PyTorch)
      instead of the biased variance (Flax).

  Returns:
    `(mean, var)`, updated; a feature with no values in the batch keeps its old mean and
    variance, and with `unbiased_var` one value is not enough to update the variance.
  """
  batch_var = batch.var
  if unbiased_var:
    batch_var = batch_var * (batch.count / jnp.maximum(batch.count - 1, 1))
  if momentum is None:
    if num_batches is None:
      raise ValueError("momentum=None (cumulative average) needs num_batches.")
    new_weight = 1 / jnp.asarray(num_batches, mean.dtype)
    old_weight = 1 - new_weight
  else:
    old_weight, new_weight = momentum, 1 - momentum
  new_mean = (old_weight * mean + new_weight * batch.mean.astype(mean.dtype)).astype(mean.dtype)
  new_var = (old_weight * var + new_weight * batch_var.astype(var.dtype)).astype(var.dtype)
  # A feature the batch did not see (every value masked) has no statistics to average in;
  # with the unbiased convention one value is not enough either (PyTorch raises there).
  return (jnp.where(batch.count > 0, new_mean, mean),
          jnp.where(batch.count > (1 if unbiased_var else 0), new_var, var))


# ----------------------------------------------------------------------------------------
# Which path a call takes.


def _kernel_layout(x, features, mask, static: _Static, gradient: str,
                   use_cpu_kernel: bool | None) -> kernels.Layout | None:
  """The kernels' (features, inner) view of x if this call can use them, else None.

  Only what tracing can see is decided here; whether a kernel call runs the C++ or its
  pure-JAX twin is decided when it is lowered (`jaxbn.kernels`).
  """
  if use_cpu_kernel is not None and not isinstance(use_cpu_kernel, bool):
    raise TypeError(f"use_cpu_kernel must be None, True or False, got {use_cpu_kernel!r}.")
  if use_cpu_kernel is False:
    return None
  refusal = _kernel_refusal(x, features, mask, static, gradient, build=use_cpu_kernel is True)
  if refusal is not None:
    if use_cpu_kernel:
      raise ValueError(f"use_cpu_kernel=True, but {refusal}.")
    return None
  first, last = features[0], features[-1]
  return kernels.Layout(features=math.prod(x.shape[first:last + 1]),
                        inner=math.prod(x.shape[last + 1:]))


def _kernel_refusal(x, features, mask, static: _Static, gradient: str, *,
                    build: bool) -> str | None:
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
  if not kernels.supports(x.dtype, static.out_dtype):
    return f"dtypes {x.dtype} -> {static.out_dtype} are not float32/bfloat16/float64"
  if x.size == 0:
    return f"x of shape {x.shape} is empty: there is nothing to compute"
  # Before `kernels.available()`, which builds them: a GPU/TPU host would compile a CPU library
  # it never calls. Computations sent to CPU there (jax.default_device) take the pure path.
  if jax.default_backend() != "cpu":
    return f"JAX's default backend is {jax.default_backend()}, and the kernels run on CPU only"
  status = kernels.status() if build else kernels.known_status()
  if status is not None and not status.available:
    # Known unavailable: the pure-JAX path itself, not kernel calls that lower to their twins.
    return f"the kernels are unavailable: {status.reason}"
  return None


# ----------------------------------------------------------------------------------------
# The forward pass, shared by both gradient modes.


def _psum(static: _Static, values):
  """Sums per-device values over `axis_name`, if there is one (one collective)."""
  if static.axis_name is None:
    return values
  return lax.psum(values, static.axis_name, axis_index_groups=static.axis_index_groups)


def _batch_sums(static: _Static, *terms: jax.Array) -> tuple[jax.Array, ...]:
  """Per-feature Σ over the batch axes and, with an axis name, over devices (one collective)."""
  return _psum(static, tuple(jnp.sum(t, axis=static.reduction_axes, keepdims=True)
                             for t in terms))


def _local_count(x: jax.Array, mask: jax.Array | None, static: _Static, cdt) -> jax.Array:
  """m of eqs. (1)-(2) on this device, per feature (broadcastable against x)."""
  if mask is None:
    local = np.prod([x.shape[a] for a in static.reduction_axes], dtype=np.float64)
    return jnp.full((1,) * x.ndim, local, cdt)
  return jnp.sum(
      jnp.broadcast_to(mask, x.shape), axis=static.reduction_axes, dtype=cdt, keepdims=True
  )


def _masked(mask: jax.Array | None, value: jax.Array) -> jax.Array:
  # `where`, not multiplication: 0 · NaN is NaN, and padding may hold anything.
  return value if mask is None else jnp.where(mask, value, jnp.zeros((), value.dtype))


def _statistics(x_c: jax.Array, local_count: jax.Array, mask: jax.Array | None,
                static: _Static):
  """Eqs. (1)-(2): m (0 for a fully masked feature), the mean as shift + delta, and the
  biased variance (without ε).

  x_c is in the compute dtype with padding already zeroed. Summing x directly in float32 loses
  |μ|/σ's worth of digits: at x = 1e4 + N(0, 1) the sum's rounding alone moves μ by more than
  σ/100. So the first pass only finds a shift near μ; the second sums d = x − shift, which is
  small and exact to form, for the correction delta = mean(d) and the variance
  mean(d²) − delta² (Chan, Golub & LeVeque's corrected two-pass algorithm). The backward
  re-forms x − μ as (x − shift) − delta for the same reason.
  """
  if static.use_fast_variance:
    count, s1, s2 = _batch_sums(static, local_count, x_c, x_c * x_c)
    m = _at_least_one(count)
    mean = s1 / m
    return count, mean, jnp.zeros_like(mean), _per_feature.shifted_variance(s2 / m, mean)
  count, s1 = _batch_sums(static, local_count, x_c)
  m = _at_least_one(count)
  shift = s1 / m
  d = _masked(mask, x_c - shift)
  sd, sdd = _batch_sums(static, d, d * d)
  delta = sd / m
  return count, shift, delta, _per_feature.shifted_variance(sdd / m, delta)


def _at_least_one(count: jax.Array) -> jax.Array:
  # A feature with every value masked has no statistics; m = 1 keeps it finite (its outputs
  # and gradients are all masked to 0 anyway).
  return jnp.maximum(count, 1)


def _pooled_kernel_moments(hi, lo, m2, local_count, static: _Static):
  """The kernels' per-device (μ = hi + lo, M2) as _statistics' (m, shift, delta, variance).

  Across devices the pairwise update of the kernels' chunks is done once more: a common
  shift near the global μ, then each device's Σ(x − shift) and Σ(x − shift)² from its own
  mean and M2 — no sum of x itself, so |μ| ≫ σ keeps its digits here too.
  """
  count = _psum(static, local_count)
  m = _at_least_one(count)
  shift = _psum(static, local_count * hi) / m
  offset = (hi - shift) + lo  # this device's mean − shift
  sum_d, sum_dd = _psum(static, (local_count * offset, m2 + local_count * offset * offset))
  delta = sum_d / m
  return count, shift, delta, _per_feature.shifted_variance(sum_dd / m, delta)


def _kernel_mask(mask: jax.Array | None, x: jax.Array, static: _Static) -> jax.Array | None:
  """The mask as the kernels take it: one bool per (outer, inner) position, i.e. x's shape
  with the feature axes set to 1 (`_kernel_refusal` ensured it does not vary along them)."""
  if mask is None:
    return None
  return jnp.broadcast_to(mask, tuple(n if a in static.reduction_axes else 1
                                      for a, n in enumerate(x.shape)))


# A kernel call compiles to the C++ on CPU where it runs on whole operands, and to its pure-JAX
# twin elsewhere (other platforms, a batch partitioned across devices, jax.export): the
# lowering of `jaxbn.kernels`' primitive decides. Pooled statistics (axis_name) run one kernel
# call per pass, with the psums between passes in plain JAX.


def _forward(x, scale, bias, mask, static: _Static):
  """Eqs. (1)-(4). Returns (y, stats, residuals for the analytic backward)."""
  if static.kernel_layout is None:
    return _forward_xla(x, scale, bias, mask, static)
  if static.axis_name is not None:
    return _forward_pooled(x, scale, bias, mask, static)
  return _forward_fused(x, scale, bias, mask, static)


def _forward_xla(x, scale, bias, mask, static: _Static):
  cdt = _args.compute_dtype(x)
  # Padding is zeroed before any arithmetic: where-masking only the result would still let
  # autodiff multiply a zero cotangent by a NaN partial (0 · NaN = NaN).
  x_c = _masked(mask, x.astype(cdt))
  count, shift, delta, var = _statistics(x_c, _local_count(x, mask, static, cdt), mask, static)
  inv_std = _per_feature.inverse_std(var, static.epsilon)
  gamma = scale.astype(cdt).reshape(static.broadcast_shape)
  beta = bias.astype(cdt).reshape(static.broadcast_shape)
  centred = (x_c - shift) - delta  # x − μ, formed without cancellation
  y = _masked(mask, centred * (gamma * inv_std) + beta)  # eqs. (3)-(4): γ x̂ + β
  return _outputs(y.astype(static.out_dtype), x, mask, scale, bias, count, shift, delta, var,
                  inv_std, static)


def _forward_fused(x, scale, bias, mask, static: _Static):
  """The whole forward in one kernel call: XLA runs nothing between the passes over x."""
  layout, cdt = static.kernel_layout, _args.compute_dtype(x)
  y, *vectors, count = kernels.forward(
      layout, x, scale.astype(cdt).ravel(), bias.astype(cdt).ravel(),
      _kernel_mask(mask, x, static), epsilon=static.epsilon, out_dtype=static.out_dtype,
      force=static.force_kernel)
  shift, delta, var, inv_std = (v.reshape(static.broadcast_shape) for v in vectors)
  # Without a mask m is known at trace time (and the kernel returns no count).
  count = (_local_count(x, None, static, cdt) if mask is None
           else count.reshape(static.broadcast_shape))
  return _outputs(y, x, mask, scale, bias, count, shift, delta, var, inv_std, static)


def _forward_pooled(x, scale, bias, mask, static: _Static):
  """Statistics pooled over `axis_name`: this device's moments, pooled in JAX, then y."""
  layout, cdt = static.kernel_layout, _args.compute_dtype(x)
  kernel_mask = _kernel_mask(mask, x, static)
  hi, lo, m2 = (v.reshape(static.broadcast_shape)  # eqs. (1)-(2), one read of x
                for v in kernels.moments(layout, x, kernel_mask, force=static.force_kernel))
  count, shift, delta, var = _pooled_kernel_moments(
      hi, lo, m2, _local_count(x, mask, static, cdt), static)
  inv_std = _per_feature.inverse_std(var, static.epsilon)
  a = scale.astype(cdt).reshape(static.broadcast_shape) * inv_std
  y = kernels.normalize(layout, x, shift.ravel(), delta.ravel(), a.ravel(),
                        bias.astype(cdt).ravel(), kernel_mask, out_dtype=static.out_dtype,
                        force=static.force_kernel)  # eqs. (3)-(4)
  return _outputs(y, x, mask, scale, bias, count, shift, delta, var, inv_std, static)


def _outputs(y, x, mask, scale, bias, count, shift, delta, var, inv_std, static: _Static):
  """(y, stats, residuals): the same structure from both paths."""
  feature_shape = tuple(n for a, n in enumerate(static.broadcast_shape)
                        if a not in static.reduction_axes)
  stats = BatchStats(
      mean=_squeeze(shift + delta, static),
      var=_squeeze(var, static),
      count=jnp.broadcast_to(_squeeze(count, static), feature_shape),
  )
  residuals = (x, mask, scale, bias, shift, delta, inv_std, _at_least_one(count))
  return y, stats, residuals


def _squeeze(v: jax.Array, static: _Static) -> jax.Array:
  return jnp.squeeze(v, axis=static.reduction_axes)


# ----------------------------------------------------------------------------------------
# The analytic backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm_analytic(x, scale, bias, mask, static: _Static):
  y, stats, _ = _forward(x, scale, bias, mask, static)
  return y, stats


def _batch_norm_analytic_fwd(x, scale, bias, mask, static: _Static):
  y, stats, residuals = _forward(x, scale, bias, mask, static)
  return (y, stats), residuals


def _batch_norm_analytic_bwd(static: _Static, residuals, cotangents):
  """Eqs. (5), (6) and the closed form of (7), from x and per-feature vectors only.

  With pooled batches (axis_name) m, Σ dy and Σ dy·x̂ in eq. (7) are global sums, while ∂L/∂γ
  and ∂L/∂β stay this device's sums — what JAX's autodiff of the same forward gives.
  """
  dy, _ = cotangents  # stats leave through stop_gradient, so their cotangent is always 0
  if static.kernel_layout is None:
    return _backward_xla(static, residuals, dy)
  if static.axis_name is not None:
    return _backward_pooled(static, residuals, dy)
  return _backward_fused(static, residuals, dy)


def _backward_xla(static: _Static, residuals, dy):
  x, mask, scale, bias, shift, delta, inv_std, count = residuals
  cdt = shift.dtype
  centred = _masked(mask, (x.astype(cdt) - shift) - delta)  # x − μ, recomputed; x̂ = centred/σ
  g = _masked(mask, dy.astype(cdt))
  sum_g, sum_g_centred = (
      jnp.sum(t, axis=static.reduction_axes, keepdims=True) for t in (g, g * centred)
  )
  d_scale, d_bias, a, b, k = _gradient_coefficients(
      static, scale, inv_std, count, sum_g, sum_g_centred)
  dx = _masked(mask, a * g + b + k * centred)
  return _cotangents(scale, bias, dx.astype(x.dtype), d_scale, d_bias)


def _backward_fused(static: _Static, residuals, dy):
  """The whole backward in one kernel call; eq. (7)'s sums are this batch's own."""
  x, mask, scale, bias, shift, delta, inv_std, _ = residuals
  dx, d_scale, d_bias = kernels.backward(
      static.kernel_layout, x, dy, shift.ravel(), delta.ravel(), inv_std.ravel(),
      scale.astype(inv_std.dtype).ravel(), _kernel_mask(mask, x, static),
      force=static.force_kernel)
  return _cotangents(scale, bias, dx, d_scale, d_bias)


def _backward_pooled(static: _Static, residuals, dy):
  """Eq. (7) with sums pooled over `axis_name`: this device's sums, pooled in JAX, then dx."""
  x, mask, scale, bias, shift, delta, inv_std, count = residuals
  layout, kernel_mask = static.kernel_layout, _kernel_mask(mask, x, static)
  sum_g, sum_g_centred = (
      v.reshape(static.broadcast_shape)
      for v in kernels.grad_sums(layout, x, dy, shift.ravel(), delta.ravel(), kernel_mask,
                                 force=static.force_kernel))
  d_scale, d_bias, a, b, k = _gradient_coefficients(
      static, scale, inv_std, count, sum_g, sum_g_centred)
  dx = kernels.grad_input(layout, x, dy, shift.ravel(), delta.ravel(), a.ravel(), b.ravel(),
                          k.ravel(), kernel_mask, force=static.force_kernel)
  return _cotangents(scale, bias, dx, d_scale, d_bias)


def _gradient_coefficients(static: _Static, scale, inv_std, count, sum_g, sum_g_centred):
  """∂L/∂γ, ∂L/∂β and the per-feature a, b, k of ∂L/∂x = a·dy + b + k·(x − μ), from this
  device's Σ dy and Σ dy·(x − μ)."""
  d_scale, d_bias = _per_feature.parameter_gradients(sum_g, sum_g_centred, inv_std)
  sum_g, sum_g_centred = _psum(static, (sum_g, sum_g_centred))  # eq. (7)'s sums are global
  gamma = scale.astype(inv_std.dtype).reshape(static.broadcast_shape)
  a, b, k = _per_feature.dx_coefficients(gamma, inv_std, count, sum_g, sum_g_centred)
  return d_scale, d_bias, a, b, k


def _cotangents(scale, bias, dx, d_scale, d_bias):
  return (
      dx,
      d_scale.reshape(scale.shape).astype(scale.dtype),
      d_bias.reshape(bias.shape).astype(bias.dtype),
      None,
  )


_batch_norm_analytic.defvjp(_batch_norm_analytic_fwd, _batch_norm_analytic_bwd)


def _refuse_forward_mode(*arrays: jax.Array) -> None:
  """Forward mode (jax.jvp, jax.jacfwd) cannot pass a custom_vjp; JAX's own error says so
  but not what to do, so a call traced for it fails here, naming the fix.

  Only a top-level JVP tracer is refused: under reverse mode (grad, vjp, and the outer jvp
  of a Hessian, which JAX runs on the linearized program) the inputs are linearize tracers.
  With the legacy `jax_use_direct_linearize=False`, reverse mode itself runs on JVP tracers,
  so nothing is refused there and JAX reports forward mode in its own words.
  """
  if _JVPTracer is None or not jax.config.jax_use_direct_linearize:
    return
  if any(isinstance(a, _JVPTracer) for a in arrays):
    raise TypeError(
        "jaxbn.batch_norm(gradient='analytic') is a jax.custom_vjp, which JAX cannot "
        "differentiate in forward mode (jax.jvp, jax.jacfwd); pass "
        "gradient='autodiff' (the same forward, differentiated by JAX) for forward mode.")


def _device_varying(value: jax.Array, axis_name: Hashable | None) -> jax.Array:
  """Marks a replicated input as varying over `axis_name`'s manual (shard_map) axes.

  The analytic backward returns this device's ∂L/∂γ; under shard_map a replicated γ needs a
  replicated cotangent. Casting γ to varying first makes JAX sum the per-device cotangents
  when it transposes the cast — exactly what its autodiff does for the uncast forward.
  """
  if axis_name is None:
    return value
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  varying = jax.typeof(value).manual_axis_type.varying
  missing = tuple(n for n in names if n in manual and n not in varying)
  return lax.pcast(value, missing, to="varying") if missing else value
