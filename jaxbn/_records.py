"""The records that batch norm's core hands between its modules, and nothing else.

`jaxbn.ops` builds them for each call; its two paths — pure JAX (`jaxbn._xla_path`) and the
C++ CPU kernels (`jaxbn._cpu.path`) — take them in the same signatures, so `ops` only picks one:

    forward(x, mask, static: Static, affine: Affine) -> (y, Statistics)
    backward(static: Static, residuals: Residuals, dy) -> (∂L/∂x, ∂L/∂γ, ∂L/∂β)

μ travels as an unevaluated pair of floats, μ = hi + lo: hi is near μ and x − μ is formed as
(x − hi) − lo, without cancellation when |μ| ≫ σ (`jaxbn._passes.shifted_moments`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class FeatureView(NamedTuple):
  """An array viewed as (outer, features, inner): C = `features` features, reduced over outer
  and inner (NHWC with axis=-1: (N·H·W, C, 1); NCHW with axis=1: (N, C, H·W)). The C++ kernels
  and their twins see every operand this way. Hashable, so it can be a static argument."""

  features: int
  inner: int

  def count(self, x: jax.Array) -> int:
    """m without a mask: the values behind each feature's statistics."""
    return x.size // self.features

  def vector(self, x: jax.Array) -> jax.ShapeDtypeStruct:
    """A per-feature vector for x: float64 for float64 x, else float32 (the compute dtype)."""
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    return jax.ShapeDtypeStruct((self.features,), dtype)


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything about a call that is not an array; a hashable custom_vjp nondiff argument."""

  reduction_axes: tuple[int, ...]
  broadcast_shape: tuple[int, ...]
  epsilon: float
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  use_fast_variance: bool
  out_dtype: np.dtype
  # The C++ kernels' view of x, or None for the pure-JAX path.
  kernel_view: FeatureView | None = None
  # use_cpu_kernel=True: the C++ in every CPU lowering, even where lowering would pick the twin.
  force_kernel: bool = False

  def pool(self, values):
    """Sums per-device values over `axis_name`, if there is one (one collective)."""
    if self.axis_name is None:
      return values
    return lax.psum(values, self.axis_name, axis_index_groups=self.axis_index_groups)


class Statistics(NamedTuple):
  """Eqs. (1)-(3) per feature, broadcastable against x.

  Attributes:
    count: m, the values behind each feature's statistics (0 for a fully masked feature).
    hi: μ's leading part; μ = hi + lo, so x − μ is (x − hi) − lo, which is formed without
      cancellation when |μ| ≫ σ.
    lo: μ − hi.
    var: the biased variance, eq. (2) without ε.
    inv_std: 1/σ.
  """

  count: jax.Array
  hi: jax.Array
  lo: jax.Array
  var: jax.Array
  inv_std: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
  """Eq. (4)'s per-feature (γ, β), which a path applies after normalizing.

  `affine(stats)` gives them in the compute dtype, broadcastable against x; with batch
  renormalization (γr, γd + β), where `correction(stats)` gives (r, d), constant to the
  gradient; with a blend, the same form with r = σ_B/σ̃ and d = w(μ_B − μ_R)/σ̃, through
  which the gradient flows. A path that has no statistics yet calls `affine(None)`, which it may only do when
  `needs_statistics` is False.

  Attributes:
    gamma: γ in the compute dtype, broadcastable against x.
    beta: β, likewise.
    correction: renorm's or a blend's (r, d) from the statistics, or None.
  """

  gamma: jax.Array
  beta: jax.Array
  correction: Callable[[Statistics], tuple[jax.Array, jax.Array]] | None = None

  @property
  def needs_statistics(self) -> bool:
    """True with renorm or a blend: the path computes the statistics before it normalizes
    (on CPU, two kernel calls instead of the one fused forward)."""
    return self.correction is not None

  def __call__(self, stats: Statistics | None) -> tuple[jax.Array, jax.Array]:
    if self.correction is None:
      return self.gamma, self.beta
    r, d = self.correction(stats)
    return self.gamma * r, self.gamma * d + self.beta


class BlendTerms(NamedTuple):
  """What the backward of a blended normalization needs besides plain BN's residuals, each
  broadcastable against x: x̂ = (x − μ̃)/σ̃ with μ̃ = (1 − w)μ_B + w·μ_R and
  σ̃² = (1 − w)σ_B² + w·σ_R² (`jaxbn.Blend`; derived in docs/derivation.md)."""

  weight: jax.Array  # w, the running statistics' weight
  shift: jax.Array  # μ_B − μ_R, formed from the split mean as (hi − μ_R) + lo
  inv_std: jax.Array  # 1/σ̃


class Residuals(NamedTuple):
  """What the analytic backward keeps: x and per-feature vectors, nothing activation-sized."""

  x: jax.Array
  mask: jax.Array | None
  scale: jax.Array
  bias: jax.Array
  hi: jax.Array  # μ = hi + lo, as in `Statistics` (with a blend, μ̃: the backward's centre)
  lo: jax.Array
  inv_std: jax.Array
  count: jax.Array  # m, at least 1
  renorm: Any = None  # the renorm inputs (their cotangent is 0), or None
  r: jax.Array | None = None  # renorm's r and d, broadcastable against x, or None
  d: jax.Array | None = None
  blend: BlendTerms | None = None  # normalizing with statistics blended with running ones
