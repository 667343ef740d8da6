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

The forward and the backward are each a choice of two paths with the same signatures: pure
JAX (`jaxbn._xla_path`: the passes over the activations of `jaxbn._passes`, the per-feature
formulas of `jaxbn._per_feature`), or on CPU, where the call allows it, the fused C++ kernels
(`jaxbn._cpu.path`), which compute the same. The records both take are `jaxbn._records`'.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _args, _custom_vjp, _ghost, _passes, _per_feature, _xla_path
from jaxbn._cpu import path as _cpu_path
from jaxbn._records import Affine, BlendTerms, Residuals, Static

__all__ = [
    "BatchStats",
    "Blend",
    "Renorm",
    "RenormCorrection",
    "batch_norm",
    "batch_norm_inference",
    "update_running_stats",
]


class BatchStats(NamedTuple):
  """Per-feature batch statistics, for running averages.

  Attributes:
    mean: μ of eq. (1), in float32 or wider, with the feature shape.
    var: the biased variance (1/m) Σ (x_i − μ)², i.e. eq. (2) without ε.
    count: m, the number of values behind each feature's statistics (across devices with
      `axis_name`, unmasked only with a mask), for the unbiased m/(m − 1) correction.
    r: batch renormalization's r, only with `renorm` (else None).
    d: batch renormalization's d, only with `renorm` (else None).

  With `virtual_batch_size`, mean, var and count are the virtual batches' count-weighted
  averages (what Keras 2 feeds its moving averages), with the feature shape; r and d stay per
  virtual batch, with the virtual batches' axis where `batch_norm` documents it.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array
  r: jax.Array | None = None
  d: jax.Array | None = None


class Renorm(NamedTuple):
  """Batch renormalization (Ioffe 2017) from running statistics and clipping.

  x̂ = (x − μ_B)/σ_B · r + d with r = clip(σ_B/σ, rmin, rmax), d = clip((μ_B − μ)/σ, −dmax,
  dmax), both under stop-gradient; σ_B = √(σ²_B + ε) and σ = √(var + ε). μ_B − μ is formed
  from the split mean μ_B = hi + lo as (hi − μ) + lo, so d keeps its digits when |μ| ≫ σ, and
  unclipped renorm equals `batch_norm_inference` with the same running statistics to the
  compute dtype's rounding (float32: both within 4·ε₃₂ of float64, relative to a feature's
  largest |y|, at |μ| up to 1e6 and σ down to 1e-2; `jaxbn check` checks it). The running
  σ is kept as a variance, as Flax keeps it (see docs/derivation.md). Clipping defaults are Keras
  2's: missing rmax, rmin, dmax mean inf, 0, inf (no clipping); the paper's is rmin = 1/rmax.

  The clips are real scalars (Python or NumPy numbers, 0-d real arrays); a string or a bool
  is a TypeError. Static clips are checked when `batch_norm` is traced (rmax ≥ 1,
  0 ≤ rmin ≤ 1, dmax ≥ 0: the range must hold r = 1 and d = 0), raising a ValueError. Traced
  clips (passed into `jit`, or a warm-up schedule) cannot be checked then: a traced range
  outside those bounds (rmin > rmax among them) gives NaN r or d, and so NaN outputs,
  instead of a silently clipped correction.

  Attributes:
    mean: the running μ, with the feature shape.
    var: the running variance (biased, as the modules store it); σ = √(var + ε).
    rmax: r's upper clip, ≥ 1 (a scalar; an array under a warm-up schedule).
    rmin: r's lower clip, in [0, 1].
    dmax: |d|'s clip, ≥ 0.
  """

  mean: jax.Array
  var: jax.Array
  rmax: Any = float("inf")
  rmin: Any = 0.0
  dmax: Any = float("inf")


class RenormCorrection(NamedTuple):
  """Batch renormalization's (r, d) given directly: x̂ = (x − μ_B)/σ_B · r + d.

  Both are per-feature arrays (feature shape), held constant by the gradient (stop-gradient,
  as in the paper). For checks and for callers that compute their own correction.
  """

  r: jax.Array
  d: jax.Array


class Blend(NamedTuple):
  """Normalization with the batch statistics blended with running ones (Equinox's "ema"
  mode): x̂ = (x − μ̃)/σ̃ with

      μ̃ = (1 − w)·μ_B + w·μ_R,    σ̃² = (1 − w)·σ_B² + w·σ_R² + ε

  (σ_B² the batch's biased variance). The gradient flows through the batch's share only: the
  running statistics and w are constants to it, so the backward is eq. (7) with 1/σ̃ for 1/σ
  and its two sums scaled by 1 − w (derived in docs/derivation.md, proved by `jaxbn check`).
  w = 0 is plain batch norm; w = 1 normalizes with the running statistics alone.

  Attributes:
    mean: the running μ_R, with the feature shape.
    var: the running variance σ_R² (biased, without ε), with the feature shape.
    weight: w, a real scalar in [0, 1] (checked when static; a traced w is taken as it
      comes).
  """

  mean: jax.Array
  var: jax.Array
  weight: Any


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
    renorm: Renorm | RenormCorrection | None = None,
    virtual_batch_size: int | None = None,
    blend: Blend | None = None,
) -> tuple[jax.Array, BatchStats]:
  """Training-mode batch normalization, y = γ (x − μ) / σ + β, with batch statistics.

  Statistics are taken per feature over every axis not in `axis` (for NHWC activations and
  `axis=-1`, over N·H·W values), in float32 or wider whatever x's dtype. The variance is
  two-pass and shifted, so a feature with |μ| ≫ σ keeps its digits; `use_fast_variance=True`
  gives Flax's one-pass E[x²] − E[x]² instead. A constant feature gives y = β and finite
  gradients, since σ ≥ √ε.

  `gradient="analytic"` differentiates with the hand-derived backward (a `jax.custom_vjp`:
  reverse mode, saving only x and per-feature vectors; Hessian-vector products too,
  reverse- or forward-over-reverse, which differentiate the backward itself);
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
    renorm: batch renormalization (Ioffe 2017): a `Renorm` (running statistics and clipping)
      or a `RenormCorrection` (r, d given); y = γ (x̂ r + d) + β with r, d constant to the
      gradient, i.e. batch norm with scale γr and bias γd + β, whose backward is eq. (7)
      with γ replaced by γr. With `axis_name`, r and d come from the pooled statistics.
    virtual_batch_size: ghost batches (Hoffer et al. 2017): statistics per virtual batch of
      this many examples along x's batch axis (the first non-feature axis), which it must
      divide; an int (a NumPy integer counts as one; a bool, float or string is a
      TypeError). As Keras 2, the batch axis of size N splits as (v, N/v): virtual batch g
      holds examples g, g + N/v, g + 2N/v, …. With `axis_name`, the g-th virtual batches of
      every device pool. `stats.r`, `stats.d` then carry the virtual batches' axis (size N/v)
      where the batch axis sits among the feature axes (first, for axis=-1).
    blend: a `Blend`: normalize with the batch statistics blended with running ones, weight
      w on the running ones (Equinox's "ema" mode); not with `renorm` or
      `virtual_batch_size`. The returned `stats` stay the batch's own.

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
  renorm = _renorm_input(renorm, shape, cdt)
  blend = _blend_input(blend, shape, cdt, renorm=renorm, virtual_batch_size=virtual_batch_size)
  mask = _args.batch_mask(mask, x)
  ghost = _ghost.virtual_batches(x.shape, features, reductions, virtual_batch_size)
  x_shape = x.shape
  if ghost is not None:  # more features, same maths (jaxbn._ghost)
    x = ghost.split(x)
    mask = None if mask is None else ghost.split(mask)
    scale, bias = ghost.per_group(scale), ghost.per_group(bias)
    renorm = _per_feature_fields(renorm, ghost.per_group)
    features = ghost.features(features)
    reductions = tuple(a for a in range(x.ndim) if a not in features)
  static = Static(
      reduction_axes=reductions,
      broadcast_shape=_args.broadcast_shape(x, features),
      epsilon=_args.epsilon_value(epsilon),
      axis_name=axis_name,
      axis_index_groups=_args.index_groups(axis_name, axis_index_groups),
      use_fast_variance=bool(use_fast_variance),
      out_dtype=_args.output_dtype(x, dtype),
  )
  gradient = _args.gradient_mode(gradient)
  static = dataclasses.replace(
      static, kernel_view=_cpu_path.feature_view(x, features, mask, static, gradient,
                                                 use_cpu_kernel),
      force_kernel=use_cpu_kernel is True)
  renorm = _per_feature_fields(renorm, lambda v: v.reshape(static.broadcast_shape))
  if blend is not None:
    blend = blend._replace(mean=blend.mean.reshape(static.broadcast_shape),
                           var=blend.var.reshape(static.broadcast_shape))
  if gradient == "analytic":
    _custom_vjp.refuse_forward_mode(x, scale, bias)
    x, scale, bias = (_custom_vjp.device_varying(v, axis_name) for v in (x, scale, bias))
    y, stats = _batch_norm_analytic(x, scale, bias, mask, renorm, blend, static)
  else:
    y, stats, _ = _forward(x, scale, bias, mask, renorm, blend, static)
  if ghost is not None:
    y = y.reshape(x_shape)
    stats = ghost.average(stats)
  return y, jax.tree.map(lax.stop_gradient, stats)


def _renorm_input(renorm, shape: tuple[int, ...], cdt):
  """The renorm argument checked (trace time) and converted to compute-dtype arrays."""
  if renorm is None:
    return None
  if isinstance(renorm, RenormCorrection):
    return RenormCorrection(*(_args.per_feature(f"renorm.{name}", v, shape).astype(cdt)
                              for name, v in zip(renorm._fields, renorm, strict=True)))
  if not isinstance(renorm, Renorm):
    raise TypeError(f"renorm must be a jaxbn.Renorm, a jaxbn.RenormCorrection or None, got "
                    f"{type(renorm).__name__}.")
  mean = _args.per_feature("renorm.mean", renorm.mean, shape).astype(cdt)
  var = _args.per_feature("renorm.var", renorm.var, shape).astype(cdt)
  rmax, rmin, dmax = _args.renorm_clipping(rmax=renorm.rmax, rmin=renorm.rmin,
                                           dmax=renorm.dmax, prefix="renorm.")
  return Renorm(mean, var, *(jnp.asarray(v, cdt) for v in (rmax, rmin, dmax)))


def _blend_input(blend, shape: tuple[int, ...], cdt, *, renorm, virtual_batch_size):
  """The blend argument checked (trace time): compute-dtype running statistics, held
  constant to the gradient (as state), and its weight."""
  if blend is None:
    return None
  if not isinstance(blend, Blend):
    raise TypeError(f"blend must be a jaxbn.Blend or None, got {type(blend).__name__}.")
  if renorm is not None:
    raise ValueError("blend and renorm are two corrections of the same statistics; pass one.")
  if virtual_batch_size is not None:
    raise ValueError("blend does not take virtual_batch_size: the running statistics are "
                     "per feature, not per virtual batch.")
  mean = _args.per_feature("blend.mean", blend.mean, shape).astype(cdt)
  var = _args.per_feature("blend.var", blend.var, shape).astype(cdt)
  weight = jnp.asarray(_args.blend_weight(blend.weight), cdt)
  return Blend(*(lax.stop_gradient(v) for v in (mean, var, weight)))


def _per_feature_fields(renorm, fn):
  """Applies fn to renorm's per-feature arrays (not its scalar clips)."""
  if renorm is None:
    return None
  if isinstance(renorm, RenormCorrection):
    return RenormCorrection(fn(renorm.r), fn(renorm.d))
  return renorm._replace(mean=fn(renorm.mean), var=fn(renorm.var))


def batch_norm_inference(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _args.Axes = -1,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    dtype: Any = None,
) -> jax.Array:
  """Inference-mode batch normalization with given (running) statistics.

  y = γ (x − mean) / √(var + ε) + β is affine in x, so JAX's autodiff is already exact here
  and forward mode works. With `mask`, padding's outputs are 0, as in training.

  Args:
    x: activations, any floating dtype.
    mean: running mean, with the feature shape.
    var: running (biased or unbiased, as stored) variance, with the feature shape.
    scale: γ, with the feature shape; None means γ = 1.
    bias: β, with the feature shape; None means β = 0.
    axis: the feature axis or axes.
    epsilon: ε, added to `var`.
    mask: boolean, broadcastable to x; False marks padding, whose outputs are 0 whatever it
      holds (the statistics are given, so the mask changes nothing else).
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
  mask = _args.batch_mask(mask, x)  # checked before any work, as every argument above

  def vector(name, value, default):
    value = default if value is None else _args.per_feature(name, value, shape)
    return value.astype(cdt).reshape(bshape)

  mean = vector("mean", mean, None)
  inv_std = lax.rsqrt(vector("var", var, None) + eps)
  scale = vector("scale", scale, jnp.ones(shape, cdt))
  bias = vector("bias", bias, jnp.zeros(shape, cdt))
  y = (x.astype(cdt) - mean) * (scale * inv_std) + bias
  return _passes.masked(mask, y.astype(out_dtype))


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
# The forward pass, shared by both gradient modes, and the analytic backward: each picks the
# call's path (`static.kernel_view`) and hands it the same records.


def _path(static: Static):
  return _xla_path if static.kernel_view is None else _cpu_path


def _blend_terms(blend: Blend, stats, static: Static) -> BlendTerms:
  shift, inv_std = _per_feature.blend_terms(stats.hi, stats.lo, stats.var, blend.mean,
                                            blend.var, blend.weight, static.epsilon)
  return BlendTerms(blend.weight, shift, inv_std)


def _affine(scale, bias, renorm, blend, static: Static, cdt) -> Affine:
  """Eq. (4)'s (γ, β) in the compute dtype, with renorm's or the blend's (r, d) from the
  statistics."""
  gamma = scale.astype(cdt).reshape(static.broadcast_shape)
  beta = bias.astype(cdt).reshape(static.broadcast_shape)
  if blend is not None:
    # No stop-gradient: the blend's batch share is differentiated (autodiff follows it).
    def correction(stats):
      terms = _blend_terms(blend, stats, static)
      return _per_feature.blend_correction(stats.inv_std, *terms)
    return Affine(gamma, beta, correction)
  if renorm is None:
    return Affine(gamma, beta)
  if isinstance(renorm, RenormCorrection):
    r, d = renorm
    correction = lambda stats: (r, d)
  else:
    correction = lambda stats: _per_feature.renorm_correction(
        stats.hi, stats.lo, stats.inv_std, renorm.mean, renorm.var, static.epsilon,
        renorm.rmin, renorm.rmax, renorm.dmax)
  # r and d are constants to the gradient (Ioffe).
  return Affine(gamma, beta, lambda stats: tuple(map(lax.stop_gradient, correction(stats))))


def _forward(x, scale, bias, mask, renorm, blend, static: Static):
  """Eqs. (1)-(4). Returns (y, stats, residuals for the analytic backward)."""
  affine = _affine(scale, bias, renorm, blend, static, _args.compute_dtype(x))
  y, stats = _path(static).forward(x, mask, static, affine)
  r, d = (None, None) if renorm is None else affine.correction(stats)
  feature_shape = tuple(n for a, n in enumerate(static.broadcast_shape)
                        if a not in static.reduction_axes)
  squeeze = functools.partial(jnp.squeeze, axis=static.reduction_axes)
  batch_stats = BatchStats(
      mean=squeeze(stats.hi + stats.lo),
      var=squeeze(stats.var),
      count=jnp.broadcast_to(squeeze(stats.count), feature_shape),
      r=None if r is None else squeeze(r),
      d=None if d is None else squeeze(d),
  )
  lo, blend_terms = stats.lo, None
  if blend is not None:
    # The blend's backward centres on μ̃ = μ_B − w(μ_B − μ_R) = hi + (lo − w·shift).
    blend_terms = _blend_terms(blend, stats, static)
    lo = lo - blend_terms.weight * blend_terms.shift
  residuals = Residuals(x, mask, scale, bias, stats.hi, lo, stats.inv_std,
                        _passes.at_least_one(stats.count), renorm, r, d, blend_terms)
  return y, batch_stats, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _batch_norm_analytic(x, scale, bias, mask, renorm, blend, static: Static):
  y, stats, _ = _forward(x, scale, bias, mask, renorm, blend, static)
  return y, stats


def _batch_norm_analytic_fwd(x, scale, bias, mask, renorm, blend, static: Static):
  y, stats, residuals = _forward(x, scale, bias, mask, renorm, blend, static)
  return (y, stats), (residuals, blend)


def _batch_norm_analytic_bwd(static: Static, saved, cotangents):
  """Eqs. (5), (6) and the closed form of (7), from x and per-feature vectors only.

  With pooled batches (axis_name) m, Σ dy and Σ dy·x̂ in eq. (7) are global sums, while ∂L/∂γ
  and ∂L/∂β stay this device's sums — what JAX's autodiff of the same forward gives.

  Batch renormalization is batch norm with scale γr and bias γd + β, r and d constant: the
  same backward with γr in place of γ, then by the chain rule ∂L/∂γ = r Σ dy x̂ + d Σ dy.
  A blend's coefficients are the paths' own (`jaxbn._passes.gradient_coefficients`).
  """
  residuals, blend = saved
  dy, _ = cotangents  # stats leave through stop_gradient, so their cotangent is always 0
  scale, bias = residuals.scale, residuals.bias
  core = residuals
  if residuals.r is not None:
    core = residuals._replace(
        scale=scale.astype(residuals.r.dtype).reshape(static.broadcast_shape) * residuals.r)
  dx, d_scale, d_bias = _path(static).backward(static, core, dy)
  if residuals.r is not None:
    d_scale, d_bias = (v.reshape(static.broadcast_shape) for v in (d_scale, d_bias))
    d_scale = residuals.r * d_scale + residuals.d * d_bias
  return (
      dx,
      d_scale.reshape(scale.shape).astype(scale.dtype),
      d_bias.reshape(bias.shape).astype(bias.dtype),
      None,
      jax.tree.map(jnp.zeros_like, residuals.renorm),  # r, d under stop-gradient
      jax.tree.map(jnp.zeros_like, blend),  # running statistics: constants, as state
  )


_batch_norm_analytic.defvjp(_batch_norm_analytic_fwd, _batch_norm_analytic_bwd)
