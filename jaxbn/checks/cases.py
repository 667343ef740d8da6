"""The derivation checks' grid: which cases there are, and each case's inputs.

A case is a layout (dense, NHWC, NCHW, two feature axes), an input distribution (normal, an
offset of 1e4, a constant feature), masking (none, or NaN padding) and a dtype (float64,
float32), for plain batch norm and for its variants: batch renormalization with r, d inside
and at their clips, ghost batches, ghost batches with clipped renorm, and statistics blended
with running ones (`jaxbn.Blend`); and the renorm-precision case (|μ| = 1e0 … 1e6, σ = 1e-2 … 1e1, float32 against float64).

Called by `jaxbn.checks.numeric`, which compares the gradients on each case, and by
`jaxbn check` and the tests, which list the cases (`default_cases`) and run them one at a time.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from jaxbn import ops
from jaxbn.ops import Renorm

EPSILON = 1e-5

LAYOUTS = {
    "dense": ((8, 3), -1),
    "nhwc": ((3, 2, 2, 4), -1),
    "nchw": ((3, 4, 2, 2), 1),
    "two-axes": ((5, 2, 3), (1, 2)),
}
DISTRIBUTIONS = ("normal", "offset-1e4", "constant-feature")
# Variants of the core beyond plain BN, each on a few layouts with normal inputs:
# renorm with every r, d strictly inside the clips, renorm with every r, d at a clip (both
# ends), ghost batches, ghost batches with clipped renorm, and a blend with running statistics
# unlike the batch's (BLEND_WEIGHT on them).
VARIANTS = {
    "renorm-inside": ("dense", "nhwc"),
    "renorm-clipped": ("dense", "nhwc"),
    "ghost": ("dense", "nhwc", "nchw"),
    "ghost-renorm-clipped": ("dense",),
    "blend": ("dense", "nhwc", "nchw"),
}
# Virtual batch size per layout: dense → 4 virtual batches of 4 examples (the ghost cases use a
# batch of 16 there: with 8, a NaN-padded virtual batch kept 3 values, one feature of which
# was near-constant, |μ|/σ ≈ 14, and float32 rounding put the analytic dx at 2.09× autodiff's
# error, past `jaxbn.checks.numeric.FLOAT32_FACTOR`); NHWC/NCHW (3, ...) → 3 virtual batches
# of one example (its H·W positions).
GHOST_SIZES = {"dense": 4, "nhwc": 1, "nchw": 1}
GHOST_SHAPES = {"dense": (16, 3)}
RENORM_CLIPPING = dict(rmax=3.0, rmin=1 / 3, dmax=5.0)
# The running statistics are placed relative to the batch's: σ = σ_B / r and μ = μ_B − d·σ
# for these target r, d, alternating over features (the clipped targets are far outside so
# every virtual batch of a ghost case is clipped too: a virtual batch's μ_g − μ_B moves d by
# (μ_g − μ_B)/σ, i.e. by 1000·(μ_g − μ_B)/σ_B here, far less than 1000 − dmax).
RENORM_TARGETS = {"inside": ((1.5, 0.7), (0.5, -0.5)),
                  "clipped": ((1000.0, 0.001), (1000.0, -1000.0))}
# The renorm-precision case: one feature per (|μ|, σ), μ of both signs, a batch of 64 (held to
# `jaxbn.checks.numeric.PRECISION_ULPS`).
PRECISION_OFFSETS = tuple(10.0**k for k in range(7))
PRECISION_SIGMAS = tuple(10.0**k for k in range(-2, 2))
# The blend case's weight on the running statistics, and how they sit against the batch's:
# μ_R = μ_B + 0.8·σ_B, σ_R² = 2.5·σ_B² (far enough that a wrong share of either shows).
BLEND_WEIGHT = 0.3


@dataclasses.dataclass(frozen=True)
class Case:
  """One point of the grid: a layout, an input distribution, masking and a dtype."""

  layout: str
  distribution: str
  masked: bool
  dtype: str
  variant: str = "bn"  # or a key of VARIANTS, or "renorm-precision"

  @property
  def name(self) -> str:
    mask = "nan-padded" if self.masked else "unmasked"
    layout = self.layout if self.variant == "bn" else f"{self.layout}/{self.variant}"
    return f"{layout}/{self.distribution}/{mask}/{self.dtype}"

  @property
  def shape(self) -> tuple[int, ...]:
    if self.variant.startswith("ghost") and self.layout in GHOST_SHAPES:
      return GHOST_SHAPES[self.layout]
    return LAYOUTS[self.layout][0]

  @property
  def axis(self) -> int | tuple[int, ...]:
    return LAYOUTS[self.layout][1]


def default_cases() -> list[Case]:
  """The full grid: every layout × distribution × (unmasked, NaN-padded) × (f64, f32), each
  variant on its layouts × (unmasked, NaN-padded) × (f64, f32), and the renorm-precision
  case."""
  plain = [
      Case(layout, dist, masked, dtype)
      for layout, dist, masked, dtype in itertools.product(
          LAYOUTS, DISTRIBUTIONS, (False, True), ("float64", "float32")
      )
  ]
  variants = [
      Case(layout, "normal", masked, dtype, variant)
      for variant, layouts in VARIANTS.items()
      for layout, masked, dtype in itertools.product(layouts, (False, True),
                                                     ("float64", "float32"))
  ]
  return plain + variants + [renorm_precision_case()]


def renorm_precision_case() -> Case:
  """The grid's renorm-precision case: float32, dense features, one per (|μ|, σ)."""
  return Case("dense", "offsets-1e0-1e6", False, "float32", "renorm-precision")


def variant_options(case: Case, x, mask) -> dict:
  """batch_norm's keyword arguments for the case's variant (none for plain BN)."""
  options = {}
  if case.variant.startswith("ghost"):
    options["virtual_batch_size"] = GHOST_SIZES[case.layout]
  if case.variant == "blend":
    stats = ops.batch_norm(x, axis=case.axis, epsilon=EPSILON, mask=mask)[1]
    options["blend"] = ops.Blend(mean=stats.mean + 0.8 * jnp.sqrt(stats.var),
                                 var=2.5 * stats.var, weight=BLEND_WEIGHT)
  if "renorm" in case.variant:
    stats = ops.batch_norm(x, axis=case.axis, epsilon=EPSILON, mask=mask, **options)[1]
    r_targets, d_targets = RENORM_TARGETS["clipped" if "clipped" in case.variant else "inside"]
    alternate = lambda pair: jnp.where(jnp.arange(stats.mean.size).reshape(stats.mean.shape)
                                       % 2 == 0, pair[0], pair[1]).astype(x.dtype)
    running_std = jnp.sqrt(stats.var + EPSILON) / alternate(r_targets)
    options["renorm"] = Renorm(mean=stats.mean - alternate(d_targets) * running_std,
                               var=running_std**2 - EPSILON, **RENORM_CLIPPING)
  return options


def inputs(case: Case, seed: int = 0):
  """x, γ, β, dy and the mask for a case, drawn in float64 then cast to the case's dtype."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(case.shape)
  if case.distribution == "offset-1e4":
    x = x + 1e4  # |μ|/σ = 1e4
  elif case.distribution == "constant-feature":
    index = [slice(None)] * x.ndim
    for a in np.atleast_1d(case.axis):
      index[a] = 0
    x[tuple(index)] = 0.7  # one feature with zero variance
  feature_shape = tuple(case.shape[a] for a in np.atleast_1d(case.axis))
  scale = rng.uniform(0.5, 2.0, feature_shape)
  bias = rng.standard_normal(feature_shape)
  dy = rng.standard_normal(case.shape)
  mask = None
  if case.masked:
    # The last example of the batch is padding, filled with NaN: it must reach nothing.
    rows = np.arange(case.shape[0]) < case.shape[0] - 1
    mask = rows.reshape((-1,) + (1,) * (len(case.shape) - 1))
    x = np.where(mask, x, np.nan)
  dtype = jnp.dtype(case.dtype)
  return (*(jnp.asarray(v, dtype) for v in (x, scale, bias, dy)), mask)


def precision_inputs(seed: int = 0, m: int = 64):
  """float32 x over (offset, σ) features, float32 running statistics with r, d unclipped and
  of order 1, γ, β, and the float64 truth (r, d, y) computed from those float32 values."""
  rng = np.random.default_rng(seed)
  offsets, sigmas = (a.ravel() for a in np.meshgrid(PRECISION_OFFSETS, PRECISION_SIGMAS))
  signs = np.where(np.arange(offsets.size) % 3 == 0, -1.0, 1.0)
  x = (signs * offsets + sigmas * rng.standard_normal((m, offsets.size))).astype(np.float32)
  x64 = x.astype(np.float64)
  even = np.arange(offsets.size) % 2 == 0
  var = (x64.var(0) * np.where(even, 0.5, 2.0)).astype(np.float32)
  running_std = np.sqrt(var.astype(np.float64) + EPSILON)
  mean = (x64.mean(0) - np.where(even, 0.6, -0.9) * running_std).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, offsets.size).astype(np.float32)
  bias = rng.standard_normal(offsets.size).astype(np.float32)
  truth = {"r": np.sqrt(x64.var(0) + EPSILON) / running_std,
           "d": (x64.mean(0) - mean.astype(np.float64)) / running_std,
           "y": ((x64 - mean.astype(np.float64)) / running_std * scale.astype(np.float64)
                 + bias.astype(np.float64))}
  return x, mean, var, scale, bias, truth
