"""Argument validation, and the shapes and dtypes derived from the arguments: called by `ops`,
`reference` and the Flax modules, and by both paths for the compute dtype.

Every check here runs on static information (shapes, dtypes, Python numbers), so a bad call
fails while JAX traces it, before any computation, with the offending value in the message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]
GRADIENTS = ("analytic", "autodiff")


def floating_input(x: Any) -> jax.Array:
  """Returns `x` as an array, refusing dtypes batch normalization cannot differentiate."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(
        f"x has complex dtype {x.dtype}; jaxbn's batch norm is real-valued. "
        "flax.linen.BatchNorm normalizes complex inputs (|x|^2 variance) if you need that."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must have a floating dtype, got {x.dtype} (shape {x.shape}).")
  return x


def feature_axes(x: jax.Array, axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Splits x's axes into (feature axes, reduction axes), both sorted and non-negative."""
  if isinstance(axis, (int, np.integer)):
    axes = (axis,)
  elif isinstance(axis, Sequence) and not isinstance(axis, str):
    axes = tuple(axis)
  else:
    raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}.")
  for a in axes:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}.")
    if not -x.ndim <= a < x.ndim:
      raise ValueError(f"axis {a} is out of range for x of shape {x.shape} (ndim {x.ndim}).")
  features = tuple(sorted(int(a) % x.ndim for a in axes))
  if len(set(features)) != len(features):
    raise ValueError(f"axis {axis!r} names the same axis twice (x has ndim {x.ndim}).")
  reductions = tuple(a for a in range(x.ndim) if a not in features)
  return features, reductions


def feature_shape(x: jax.Array, features: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(x.shape[a] for a in features)


def broadcast_shape(x: jax.Array, features: tuple[int, ...]) -> tuple[int, ...]:
  """x's shape with every reduction axis set to 1: per-feature vectors in this shape broadcast
  against x without rank promotion."""
  return tuple(n if a in features else 1 for a, n in enumerate(x.shape))


def per_feature(name: str, value: Any, expected: tuple[int, ...]) -> jax.Array:
  """Checks a per-feature array (scale, bias, running mean/var) against the feature shape."""
  value = jnp.asarray(value)
  if value.shape != expected:
    raise ValueError(
        f"{name} has shape {value.shape} but the feature axes of x have shape {expected}; "
        f"{name} must have exactly the feature shape."
    )
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {value.dtype}.")
  return value


def epsilon_value(epsilon: Any) -> float:
  """epsilon must be a static, finite, positive number: it keeps eq. (2)'s σ² away from 0."""
  if isinstance(epsilon, jax.core.Tracer):
    raise TypeError("epsilon must be a static Python number, not a traced array.")
  # float() would also take True (ε = 1.0) and "1e-5": both are mistakes, not numbers.
  is_real_scalar = np.ndim(epsilon) == 0 and (
      isinstance(epsilon, numbers.Real) or isinstance(epsilon, (np.ndarray, jax.Array)))
  if not is_real_scalar or np.asarray(epsilon).dtype.kind not in "fiu":
    raise TypeError(f"epsilon must be a real number, got {epsilon!r} "
                    f"({type(epsilon).__name__}).")
  value = float(epsilon)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}.")
  return value


def batch_mask(mask: Any, x: jax.Array) -> jax.Array | None:
  """A boolean (or integer 0/1) mask, True marking values in the batch, with x's rank.

  The mask keeps its own (broadcastable) sizes: a per-example mask of shape (N, 1, 1, 1) is
  not expanded to x's size, so the backward does not save an activation-sized copy of it.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise TypeError(f"mask must be boolean (True = part of the batch), got dtype {mask.dtype}.")
  try:
    if np.broadcast_shapes(mask.shape, x.shape) != x.shape:
      raise ValueError
  except ValueError:
    raise ValueError(
        f"mask of shape {mask.shape} does not broadcast to x of shape {x.shape}."
    ) from None
  return mask.astype(jnp.bool_).reshape((1,) * (x.ndim - mask.ndim) + mask.shape)


def reduction_size(x: jax.Array, reductions: tuple[int, ...]) -> int:
  """m of eqs. (1)-(2) on this device; an empty batch has no statistics at all.

  A batch of one value per feature is allowed, as Flax allows it: μ = x, σ² = 0, so
  x̂ = 0 and y = β whatever x is (a mask that keeps one value gives the same). The
  modules meet it under `nnx.vmap` ensembles and shape inference; PyTorch refuses it.
  """
  m = math.prod(x.shape[a] for a in reductions)
  if m == 0:
    raise ValueError(f"x of shape {x.shape} has an empty batch over axes {reductions}.")
  return m


def gradient_mode(gradient: Any) -> str:
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}.")
  return gradient


def index_groups(axis_name: Any, groups: Any) -> tuple[tuple[int, ...], ...] | None:
  """axis_index_groups as a hashable tuple of tuples (it travels as a static argument)."""
  if groups is None:
    return None
  if axis_name is None:
    raise ValueError("axis_index_groups was given without axis_name.")
  return tuple(tuple(int(i) for i in group) for group in groups)


def compute_dtype(x: jax.Array) -> np.dtype:
  """Statistics and arithmetic in float32 at least: bf16/f16 sums lose the batch (DESIGN.md)."""
  return np.dtype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else np.dtype(x.dtype)


def output_dtype(x: jax.Array, dtype: Any) -> np.dtype:
  if dtype is None:
    return x.dtype
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {dtype}.")
  return dtype


def renorm_clipping(*, rmax: Any, rmin: Any, dmax: Any, prefix: str = "") -> tuple:
  """Batch renormalization's clipping (rmax, rmin, dmax), checked where they are static.

  r = σ_B/σ is clipped to [rmin, rmax] and d to [−dmax, dmax]; a range that excludes r = 1
  or d = 0 would shift every batch even when its statistics match the running ones. Each is
  a real scalar: a Python or NumPy number or a 0-d real array; a string ("3") or a bool is a
  TypeError, not read through float(). Traced values (a warm-up schedule, clips passed into
  `jit`) cannot be checked here; `jaxbn._per_feature.renorm_correction` turns a traced range
  that excludes r = 1 or d = 0 into NaN.
  """
  values = {"rmax": rmax, "rmin": rmin, "dmax": dmax}
  for name, value in values.items():
    if isinstance(value, jax.core.Tracer):
      continue
    is_real_scalar = np.ndim(value) == 0 and (
        (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)))
        or (isinstance(value, (np.ndarray, jax.Array))
            and np.asarray(value).dtype.kind in "fiu"))
    if not is_real_scalar:
      raise TypeError(f"{prefix}{name} must be a real scalar, got {value!r}.")
    number = float(value)
    if math.isnan(number):
      raise ValueError(f"{prefix}{name} is NaN.")
    if name == "rmax" and number < 1:
      raise ValueError(f"{prefix}rmax={number} must be >= 1: r = 1 (no correction) must be "
                       "inside the clipping range.")
    if name == "rmin" and not 0 <= number <= 1:
      raise ValueError(f"{prefix}rmin={number} must be in [0, 1]: r = 1 (no correction) must "
                       "be inside the clipping range, and r is never negative.")
    if name == "dmax" and number < 0:
      raise ValueError(f"{prefix}dmax={number} must be >= 0 (d is clipped to [-dmax, dmax]).")
  return rmax, rmin, dmax


def blend_weight(weight: Any) -> Any:
  """A blend's weight w, the running statistics' share, checked where it is static: a real
  scalar in [0, 1] (a string or a bool is a TypeError). A traced w is taken as it comes."""
  if isinstance(weight, jax.core.Tracer):
    return weight
  is_real_scalar = np.ndim(weight) == 0 and (
      (isinstance(weight, numbers.Real) and not isinstance(weight, (bool, np.bool_)))
      or (isinstance(weight, (np.ndarray, jax.Array)) and np.asarray(weight).dtype.kind in "fiu"))
  if not is_real_scalar:
    raise TypeError(f"blend.weight must be a real scalar, got {weight!r}.")
  if not 0 <= float(weight) <= 1:  # NaN fails too
    raise ValueError(f"blend.weight={float(weight)} must be in [0, 1].")
  return weight
