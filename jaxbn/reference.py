"""The seed's derivation written literally, for teaching and for checking `jaxbn.ops`.

`batch_norm_reference` is eqs. (1)-(4) in plain jnp: JAX's autodiff of it is the baseline the
analytic backward is checked against. `staged_backward` computes eq. (7) the way the seed
derives it, one partial derivative per line, including the term of ∂L/∂μ that vanishes; its
fields are named after the seed's symbols so each maps to an equation.

`batch_norm_reference` also takes batch renormalization (`renorm`, r and d written out from
Ioffe's Algorithm 1), ghost batches (`virtual_batch_size`, one reference call per virtual
batch, picked out by index rather than by `jaxbn.ops`' reshape) and blended statistics
(`blend`, μ̃ and σ̃² written out as blends of eqs. (1)-(2) with the running ones).

Both work in x's own dtype (no float32 promotion, no shifted variance): they are the maths,
not the production kernel. Use float64 when comparing against them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _args
from jaxbn.ops import Blend, RenormCorrection

__all__ = ["StagedBackward", "batch_norm_reference", "staged_backward"]


class _Batch(NamedTuple):
  """x restricted to the batch: padding zeroed, per-feature sums and m."""

  x: jax.Array
  mask: jax.Array | None
  axes: tuple[int, ...]
  m: jax.Array


def _batch(x, mask, axis) -> _Batch:
  x = _args.floating_input(x)
  _, reductions = _args.feature_axes(x, axis)
  size = _args.reduction_size(x, reductions)
  mask = _args.batch_mask(mask, x)
  if mask is None:
    m = jnp.asarray(size, x.dtype)
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    x = jnp.where(mask, x, jnp.zeros((), x.dtype))  # padding is not part of the batch
    m = jnp.maximum(jnp.sum(mask, axis=reductions, keepdims=True, dtype=x.dtype), 1)
  return _Batch(x, mask, reductions, m)


def _sum(batch: _Batch, value: jax.Array) -> jax.Array:
  """Σ_i over the batch (unmasked values only), keeping dims for broadcasting."""
  if batch.mask is not None:
    value = jnp.where(batch.mask, value, jnp.zeros((), value.dtype))
  return jnp.sum(value, axis=batch.axes, keepdims=True)


def _feature_vector(name, value, x, axis):
  features, _ = _args.feature_axes(x, axis)
  value = _args.per_feature(name, value, _args.feature_shape(x, features))
  return value.astype(x.dtype).reshape(_args.broadcast_shape(x, features))


def _normalize(batch: _Batch, epsilon: float):
  mu = _sum(batch, batch.x) / batch.m  # (1)
  sigma2 = _sum(batch, (batch.x - mu) ** 2) / batch.m + epsilon  # (2), ε inside σ²
  x_hat = (batch.x - mu) / jnp.sqrt(sigma2)  # (3)
  return mu, sigma2, x_hat


def batch_norm_reference(x, scale, bias, *, axis=-1, epsilon=1e-5, mask=None, renorm=None,
                         virtual_batch_size=None, blend: Blend | None = None) -> jax.Array:
  """Eqs. (1)-(4) as written, y = γ (x − μ)/σ + β; masked positions give 0.

  Args:
    x: activations.
    scale: γ, with the feature shape.
    bias: β, with the feature shape.
    axis: the feature axis or axes.
    epsilon: ε of eq. (2).
    mask: boolean, broadcastable to x; False marks padding.
    renorm: a `jaxbn.Renorm` or `jaxbn.RenormCorrection`: y = γ (x̂ r + d) + β, r and d
      under stop-gradient.
    virtual_batch_size: ghost batches: virtual batch g holds the examples g, g + G, … of
      the batch axis (the first non-feature axis), G = N / virtual_batch_size.
    blend: a `jaxbn.Blend`: x̂ = (x − μ̃)/√(σ̃² + ε) with μ̃ = (1 − w)μ + w·μ_R and
      σ̃² = (1 − w)(σ² − ε) + w·σ_R², the running statistics and w under stop-gradient.

  Returns:
    y, in x's dtype.
  """
  if virtual_batch_size is not None:
    return _ghost_reference(x, scale, bias, axis=axis, epsilon=epsilon, mask=mask,
                            renorm=renorm, virtual_batch_size=virtual_batch_size)
  batch = _batch(x, mask, axis)
  gamma = _feature_vector("scale", scale, batch.x, axis)
  beta = _feature_vector("bias", bias, batch.x, axis)
  eps = _args.epsilon_value(epsilon)
  mu, sigma2, x_hat = _normalize(batch, eps)
  if blend is not None:
    running_mu, running_var = (lax.stop_gradient(_feature_vector(f"blend.{name}", v, batch.x,
                                                                 axis))
                               for name, v in (("mean", blend.mean), ("var", blend.var)))
    w = lax.stop_gradient(jnp.asarray(blend.weight, batch.x.dtype))
    mu_blend = (1 - w) * mu + w * running_mu
    var_blend = (1 - w) * (sigma2 - eps) + w * running_var
    x_hat = (batch.x - mu_blend) / jnp.sqrt(var_blend + eps)
  if renorm is not None:
    r, d = _renorm_correction(renorm, mu, sigma2, batch.x, axis, eps)
    x_hat = x_hat * r + d
  y = gamma * x_hat + beta  # (4)
  return y if batch.mask is None else jnp.where(batch.mask, y, jnp.zeros((), y.dtype))


def _renorm_correction(renorm, mu, sigma2, x, axis, epsilon):
  """Ioffe 2017, Algorithm 1: r = σ_B/σ and d = (μ_B − μ)/σ, clipped, stop-gradient."""
  if isinstance(renorm, RenormCorrection):
    r = _feature_vector("renorm.r", renorm.r, x, axis)
    d = _feature_vector("renorm.d", renorm.d, x, axis)
  else:
    sigma = jnp.sqrt(_feature_vector("renorm.var", renorm.var, x, axis) + epsilon)
    running_mu = _feature_vector("renorm.mean", renorm.mean, x, axis)
    r = jnp.clip(jnp.sqrt(sigma2) / sigma, renorm.rmin, renorm.rmax)
    d = jnp.clip((mu - running_mu) / sigma, -renorm.dmax, renorm.dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _ghost_reference(x, scale, bias, *, axis, epsilon, mask, renorm, virtual_batch_size):
  """One `batch_norm_reference` per virtual batch, its examples picked out by index."""
  x = _args.floating_input(x)
  _, reductions = _args.feature_axes(x, axis)
  b = reductions[0]
  n = x.shape[b]
  groups = n // virtual_batch_size
  if groups * virtual_batch_size != n:
    raise ValueError(f"virtual_batch_size={virtual_batch_size} does not divide {n}.")
  mask = None if mask is None else jnp.broadcast_to(_args.batch_mask(mask, x), x.shape)
  y = jnp.zeros_like(x)
  for g in range(groups):
    rows = jnp.arange(g, n, groups)
    pick = lambda v: jnp.take(v, rows, axis=b)
    y_g = batch_norm_reference(pick(x), scale, bias, axis=axis, epsilon=epsilon,
                               mask=None if mask is None else pick(mask), renorm=renorm)
    index = (slice(None),) * b + (rows,)
    y = y.at[index].set(y_g)
  return y


class StagedBackward(NamedTuple):
  """Every partial derivative of the seed's backward, named after its symbol.

  Per-example terms have x's shape; per-feature sums keep size-1 reduction axes.
  """

  dL_dxhat: jax.Array  # ∂L/∂x̂_i = ∂L/∂y_i · γ
  dxhat_dx: jax.Array  # ∂x̂_i/∂x_i = 1/σ
  dL_dsigma2: jax.Array  # ∂L/∂σ² = Σ ∂L/∂x̂_i · (−(x_i − μ) / (2σ³))
  dsigma2_dx: jax.Array  # ∂σ²/∂x_i = (2/m)(x_i − μ)
  dL_dmu: jax.Array  # ∂L/∂μ = Σ ∂L/∂x̂_i · (−1/σ) + ∂L/∂σ² · (−(2/m) Σ (x_i − μ))
  dL_dmu_vanishing: jax.Array  # the second term of ∂L/∂μ: Σ (x_i − μ) = 0 makes it 0
  dmu_dx: jax.Array  # ∂μ/∂x_i = 1/m
  dL_dx: jax.Array  # eq. (7): the sum of the three paths
  dL_dgamma: jax.Array  # eq. (5): Σ ∂L/∂y_i · x̂_i, with the feature shape
  dL_dbeta: jax.Array  # eq. (6): Σ ∂L/∂y_i, with the feature shape


def staged_backward(x, scale, dy, *, axis=-1, epsilon=1e-5, mask=None) -> StagedBackward:
  """The backward of eqs. (1)-(4), computed term by term as the seed derives eq. (7).

  Args:
    x: the forward's input.
    scale: γ, with the feature shape.
    dy: ∂L/∂y, with x's shape.
    axis: the feature axis or axes.
    epsilon: ε of eq. (2).
    mask: boolean, broadcastable to x; False marks padding (its gradients are 0).

  Returns:
    A `StagedBackward` holding every intermediate and the three gradients.
  """
  batch = _batch(x, mask, axis)
  gamma = _feature_vector("scale", scale, batch.x, axis)
  dy = jnp.asarray(dy, batch.x.dtype)
  if dy.shape != batch.x.shape:
    raise ValueError(f"dy has shape {dy.shape}, expected x's shape {batch.x.shape}.")
  if batch.mask is not None:
    dy = jnp.where(batch.mask, dy, jnp.zeros((), dy.dtype))
  mu, sigma2, x_hat = _normalize(batch, _args.epsilon_value(epsilon))
  sigma = jnp.sqrt(sigma2)
  m = batch.m
  centred = batch.x - mu

  dL_dxhat = dy * gamma
  dxhat_dx = 1 / sigma
  dL_dsigma2 = _sum(batch, dL_dxhat * (-centred / (2 * sigma**3)))
  dsigma2_dx = (2 / m) * centred
  dL_dmu_vanishing = dL_dsigma2 * (-(2 / m) * _sum(batch, centred))
  dL_dmu = _sum(batch, dL_dxhat * (-1 / sigma)) + dL_dmu_vanishing
  dmu_dx = 1 / m
  dL_dx = dL_dxhat * dxhat_dx + dL_dsigma2 * dsigma2_dx + dL_dmu * dmu_dx  # (7)
  if batch.mask is not None:
    dL_dx = jnp.where(batch.mask, dL_dx, jnp.zeros((), dL_dx.dtype))
  features = tuple(a for a in range(batch.x.ndim) if a not in batch.axes)
  feature_shape = _args.feature_shape(batch.x, features)
  return StagedBackward(
      dL_dxhat=dL_dxhat,
      dxhat_dx=dxhat_dx,
      dL_dsigma2=dL_dsigma2,
      dsigma2_dx=dsigma2_dx,
      dL_dmu=dL_dmu,
      dL_dmu_vanishing=dL_dmu_vanishing,
      dmu_dx=dmu_dx,
      dL_dx=dL_dx,
      dL_dgamma=_sum(batch, dy * x_hat).reshape(feature_shape),  # (5)
      dL_dbeta=_sum(batch, dy).reshape(feature_shape),  # (6)
  )
