"""Derivation checks: the analytic backward against every other way of getting the gradient.

Numeric (`run_checks`): over a grid of layouts, feature axes, dtypes, masks and input
distributions — plain batch norm, batch renormalization with r, d inside and at their clips,
and ghost batches — compare

  - the analytic backward (`jaxbn.batch_norm`, the custom_vjp),
  - the staged backward (`jaxbn.reference.staged_backward`, the seed's eq. (7) term by term),
  - JAX's autodiff of the literal forward (`jaxbn.reference.batch_norm_reference`),
  - central finite differences of that forward in float64 (five-point stencil).

Symbolic (`symbolic_checks`, needs sympy): for every batch size m at once (m a symbol, the
batch an indexed family x_i, g_i under Σ_{i=1}^{m}), derive ∂L/∂x_j, ∂L/∂γ and ∂L/∂β from
eqs. (1)-(4) with sympy and prove each of the seed's intermediate formulas, its eq. (7) and
the closed form equal to them, and the extra term of the seed's ∂L/∂μ identically 0; the
same for batch renormalization's closed form (eq. (7) with γr), and its forward equal to the
inference formula when r, d are unclipped. For given m (e.g. 2, 3, 4) the same identities
can also be proved on m explicit symbols, a cross-check of the general proof's machinery.

Renorm precision (`renorm_precision_case`, in the grid): batch renormalization's r, d and its
unclipped output, in float32, against float64 at |μ| = 1e0 … 1e6 and σ = 1e-2 … 1e1 (one
feature per pair, one call): d = (μ_B − μ)/σ must keep the digits the shifted statistics keep,
and the output must be the inference formula's (x − μ)/σ·γ + β to float32 rounding.

Errors: for each gradient (dx, dγ, dβ) the max abs difference and the *relative* error
max|a − b| / max|b| (normwise, so entries near 0 do not blow it up); a comparison reports the
worst of the three.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxbn import ops, reference
from jaxbn.ops import Renorm, RenormCorrection

__all__ = [
    "Case",
    "Comparison",
    "SymbolicResult",
    "check_case",
    "default_cases",
    "run_checks",
    "symbolic_checks",
]

# Tolerances for float64 (the "must hold"). float32 is judged against autodiff's own
# float32 error instead: the analytic gradient may be at most FLOAT32_FACTOR times as wrong.
TOLERANCES = {
    "forward vs reference": 1e-12,
    "analytic vs autodiff": 1e-10,
    "analytic vs finite differences": 1e-6,
    "staged vs analytic": 1e-12,
}
FLOAT32_FACTOR = 2.0
# The literal reference forms x − μ with μ rounded to one float64, so its own error is about
# ε₆₄·|μ|/σ relative (ε₆₄ = 2.2e-16): 4e-12 at |μ|/σ = 1.7e4, the grid's offset cases. Pairs
# that compare against the literal formulas are held to max(tolerance, LITERAL_ROUNDING·|μ|/σ);
# measured on the grid, their errors stay below 0.75·ε₆₄·|μ|/σ. The analytic side does not
# have this error (see its finite-difference and float32 rows).
LITERAL_ROUNDING = 2 * float(np.finfo(np.float64).eps)
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
# ends), ghost batches, and ghost batches with clipped renorm.
VARIANTS = {
    "renorm-inside": ("dense", "nhwc"),
    "renorm-clipped": ("dense", "nhwc"),
    "ghost": ("dense", "nhwc", "nchw"),
    "ghost-renorm-clipped": ("dense",),
}
# Virtual batch size per layout: dense → 4 virtual batches of 4 examples (the ghost cases use a
# batch of 16 there: with 8, a NaN-padded virtual batch kept 3 values, one feature of which
# was near-constant, |μ|/σ ≈ 14, and float32 rounding put the analytic dx at 2.09× autodiff's
# error, past FLOAT32_FACTOR); NHWC/NCHW (3, ...) → 3 virtual batches of one example (its
# H·W positions).
GHOST_SIZES = {"dense": 4, "nhwc": 1, "nchw": 1}
GHOST_SHAPES = {"dense": (16, 3)}
RENORM_CLIPPING = dict(rmax=3.0, rmin=1 / 3, dmax=5.0)
# The running statistics are placed relative to the batch's: σ = σ_B / r and μ = μ_B − d·σ
# for these target r, d, alternating over features (the clipped targets are far outside so
# every virtual batch of a ghost case is clipped too: a virtual batch's μ_g − μ_B moves d by
# (μ_g − μ_B)/σ, i.e. by 1000·(μ_g − μ_B)/σ_B here, far less than 1000 − dmax).
RENORM_TARGETS = {"inside": ((1.5, 0.7), (0.5, -0.5)),
                  "clipped": ((1000.0, 0.001), (1000.0, -1000.0))}
# The renorm-precision case: one feature per (|μ|, σ), μ of both signs, a batch of 64; its
# float32 r, d and y are held to PRECISION_ULPS float32 epsilons of the float64 truth (per
# feature; d relative to |d| + r, the size of its terms; y relative to the feature's max |y|).
# Measured on these inputs: at most 1.4. Forming μ_B in float32 before subtracting μ puts d
# off by up to 1 (|μ| ≥ 1e5 with σ = 0.01 …).
PRECISION_OFFSETS = tuple(10.0**k for k in range(7))
PRECISION_SIGMAS = tuple(10.0**k for k in range(-2, 2))
PRECISION_ULPS = 4.0


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


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One pair of gradients (or outputs) compared on one case."""

  case: str
  pair: str
  max_abs: float
  max_rel: float
  tolerance: float
  passed: bool


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
  """The grid's renorm-precision case (see the module docstring): float32, dense features."""
  return Case("dense", "offsets-1e0-1e6", False, "float32", "renorm-precision")


def _options(case: Case, x, mask) -> dict:
  """batch_norm's keyword arguments for the case's variant (none for plain BN)."""
  options = {}
  if case.variant.startswith("ghost"):
    options["virtual_batch_size"] = GHOST_SIZES[case.layout]
  if "renorm" in case.variant:
    stats = ops.batch_norm(x, axis=case.axis, epsilon=EPSILON, mask=mask, **options)[1]
    r_targets, d_targets = RENORM_TARGETS["clipped" if "clipped" in case.variant else "inside"]
    alternate = lambda pair: jnp.where(jnp.arange(stats.mean.size).reshape(stats.mean.shape)
                                       % 2 == 0, pair[0], pair[1]).astype(x.dtype)
    running_std = jnp.sqrt(stats.var + EPSILON) / alternate(r_targets)
    options["renorm"] = Renorm(mean=stats.mean - alternate(d_targets) * running_std,
                               var=running_std**2 - EPSILON, **RENORM_CLIPPING)
  return options


def _inputs(case: Case, seed: int = 0):
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


def _grad_analytic(x, scale, bias, dy, mask, axis, options=None):
  f = lambda x, s, b: ops.batch_norm(x, s, b, axis=axis, epsilon=EPSILON, mask=mask,
                                     **(options or {}))[0]
  return jax.vjp(f, x, scale, bias)[1](dy)


def _grad_autodiff(x, scale, bias, dy, mask, axis, options=None):
  f = lambda x, s, b: reference.batch_norm_reference(
      x, s, b, axis=axis, epsilon=EPSILON, mask=mask, **(options or {})
  )
  return jax.vjp(f, x, scale, bias)[1](dy)


def _grad_staged(x, scale, bias, dy, mask, axis, options=None):
  assert not options, "the seed's staged backward is plain BN's"
  staged = reference.staged_backward(x, scale, dy, axis=axis, epsilon=EPSILON, mask=mask)
  return staged.dL_dx, staged.dL_dgamma, staged.dL_dbeta


def _frozen(x, scale, bias, mask, axis, options):
  """Renorm's r, d held at their values here, as the gradient holds them (stop-gradient):
  finite differences then see the same function. Ghost cases keep `Renorm`: they are all
  clipped far outside, where r and d are locally constant anyway."""
  if "renorm" not in options or "virtual_batch_size" in options:
    return options
  stats = ops.batch_norm(x, scale, bias, axis=axis, epsilon=EPSILON, mask=mask, **options)[1]
  return {**options, "renorm": RenormCorrection(stats.r, stats.d)}


def _grad_finite_differences(x, scale, bias, dy, mask, axis, options=None):
  """Five-point central differences of L = Σ dy·y, one direction per input entry.

  The step for an entry of x is 1e-3 of its feature's σ (the scale on which y varies), so
  truncation (∝ step⁴) and cancellation (∝ 1/step) both stay near 1e-10 relative.
  """
  params = (x, scale, bias)
  flat, unravel = ravel_pytree(params)
  frozen = _frozen(x, scale, bias, mask, axis, options or {})

  def loss(theta):
    y = reference.batch_norm_reference(
        *unravel(theta), axis=axis, epsilon=EPSILON, mask=mask, **frozen
    )
    return jnp.sum(jnp.where(jnp.isfinite(y), dy * y, 0.0))

  _, stats = ops.batch_norm(x, axis=axis, epsilon=EPSILON, mask=mask)
  features = tuple(a % x.ndim for a in np.atleast_1d(axis))
  sigma_shape = tuple(n if a in features else 1 for a, n in enumerate(x.shape))
  sigma = jnp.sqrt(stats.var + EPSILON).reshape(sigma_shape)
  x_step = jnp.broadcast_to(1e-3 * sigma, x.shape)
  steps = jnp.concatenate(
      [x_step.ravel(), jnp.full(scale.size + bias.size, 1e-3, flat.dtype)]
  )

  def derivative(i):
    e = jnp.zeros_like(flat).at[i].set(steps[i])
    f = lambda k: loss(flat + k * e)
    return (-f(2) + 8 * f(1) - 8 * f(-1) + f(-2)) / (12 * steps[i])

  grads = jax.vmap(derivative)(jnp.arange(flat.size))
  # Directions through padding: the loss ignores them, so their derivative is 0.
  grads = jnp.where(jnp.isfinite(flat), grads, 0.0)
  return unravel(grads)


def _centring_condition(x, mask, axis) -> float:
  """max over features of |μ|/σ: how many digits forming x − μ costs the literal formulas."""
  _, stats = ops.batch_norm(x, axis=axis, epsilon=EPSILON, mask=mask)
  return float(jnp.max(jnp.abs(stats.mean) / jnp.sqrt(stats.var + EPSILON)))


def _errors(got: Sequence[jax.Array], want: Sequence[jax.Array]) -> tuple[float, float]:
  max_abs = max_rel = 0.0
  for a, b in zip(got, want, strict=True):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    diff = float(np.max(np.abs(a - b)))
    size = float(np.max(np.abs(b)))
    max_abs = max(max_abs, diff)
    max_rel = max(max_rel, diff / size if size > 0 else (0.0 if diff == 0 else np.inf))
  return max_abs, max_rel


def _compare(case: Case, pair: str, got, want, tolerance: float) -> Comparison:
  max_abs, max_rel = _errors(got, want)
  return Comparison(case.name, pair, max_abs, max_rel, tolerance, bool(max_rel <= tolerance))


def _precision_inputs(seed: int = 0, m: int = 64):
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


def _check_renorm_precision(case: Case) -> list[Comparison]:
  """r, d and the unclipped output against float64, on the pure-JAX path and on the default
  one (the CPU kernels where they are available): one compiled call for both."""
  x, mean, var, scale, bias, truth = _precision_inputs()
  renorm = Renorm(mean, var)
  run = jax.jit(lambda x: tuple(
      ops.batch_norm(x, scale, bias, epsilon=EPSILON, renorm=renorm, use_cpu_kernel=kernel)
      for kernel in (False, None)))
  eps = float(np.finfo(np.float32).eps)
  tolerance = PRECISION_ULPS * eps
  results = []
  for path, (y, stats) in zip(("pure JAX", "default path"), run(x), strict=True):
    r, d, y = (np.asarray(v, np.float64) for v in (stats.r, stats.d, y))
    r_err, d_err = np.abs(r - truth["r"]), np.abs(d - truth["d"])
    y_err = np.max(np.abs(y - truth["y"]), axis=0)
    rel = max(float(np.max(r_err / truth["r"])),
              float(np.max(d_err / (np.abs(truth["d"]) + truth["r"]))))
    y_rel = float(np.max(y_err / np.max(np.abs(truth["y"]), axis=0)))
    # NaN compares False: a NaN error fails.
    results += [
        Comparison(case.name, f"renorm r, d vs float64 ({path})",
                   float(max(np.max(r_err), np.max(d_err))), rel, tolerance,
                   bool(rel <= tolerance)),
        Comparison(case.name, f"unclipped renorm y vs float64 inference ({path})",
                   float(np.max(y_err)), y_rel, tolerance, bool(y_rel <= tolerance)),
    ]
  return results


def check_case(case: Case) -> list[Comparison]:
  """All comparisons for one case. Needs float64 enabled (`jax.enable_x64()`)."""
  if case.variant == "renorm-precision":
    return _check_renorm_precision(case)
  x, scale, bias, dy, mask = _inputs(case)
  options = _options(case, x, mask)
  args = (x, scale, bias, dy, mask, case.axis, options)
  if case.dtype == "float64":
    y = ops.batch_norm(x, scale, bias, axis=case.axis, epsilon=EPSILON, mask=mask,
                       **options)[0]
    y_ref = reference.batch_norm_reference(
        x, scale, bias, axis=case.axis, epsilon=EPSILON, mask=mask, **options
    )
    analytic = _grad_analytic(*args)
    literal = lambda pair: max(TOLERANCES[pair], LITERAL_ROUNDING * _centring_condition(x, mask, case.axis))
    staged = [] if options else [
        _compare(case, "staged vs analytic", _grad_staged(*args), analytic,
                 literal("staged vs analytic"))]
    return [
        _compare(case, "forward vs reference", (y,), (y_ref,), literal("forward vs reference")),
        _compare(case, "analytic vs autodiff", analytic, _grad_autodiff(*args),
                 TOLERANCES["analytic vs autodiff"]),
        _compare(case, "analytic vs finite differences", analytic,
                 _grad_finite_differences(*args), TOLERANCES["analytic vs finite differences"]),
        *staged,
    ]
  # Lower precision: both gradients against the float64 truth from the same (rounded) inputs.
  args64 = tuple(v.astype(jnp.float64) for v in args[:4]) + args[4:]  # options: f32 values
  truth = _grad_autodiff(*args64)
  _, autodiff_rel = _errors(_grad_autodiff(*args), truth)
  return [
      _compare(case, f"analytic {case.dtype} vs float64 truth", _grad_analytic(*args), truth,
               FLOAT32_FACTOR * autodiff_rel),
      _compare(case, f"autodiff {case.dtype} vs float64 truth", _grad_autodiff(*args), truth,
               np.inf),
  ]


def run_checks(
    cases: Iterable[Case] | None = None,
    *,
    on_case: Callable[[Case, list[Comparison]], None] | None = None,
) -> list[Comparison]:
  """Runs `check_case` over `cases` (default: the full grid) with float64 enabled."""
  results = []
  with jax.enable_x64(True):
    for case in default_cases() if cases is None else cases:
      found = check_case(case)
      if on_case is not None:
        on_case(case, found)
      results.extend(found)
  return results


# ----------------------------------------------------------------------------------------
# Symbolic checks.


ANY_M = "m"  # `symbolic_checks` batch size: every m at once (a symbolic m)


@dataclasses.dataclass(frozen=True)
class SymbolicResult:
  """One identity, `formula == derivative`, proved (difference simplifies to 0) or not.

  `m` is the batch size it was proved for: an int, or `ANY_M` ("m") for every batch size.
  """

  m: int | str
  identity: str
  passed: bool


def symbolic_checks(batch_sizes: Sequence[int | str] = (ANY_M,)) -> list[SymbolicResult]:
  """Proves the seed's backward (and renorm's) with sympy (see module docstring).

  The seed's partial derivatives are taken on the computational graph x → μ → σ² → x̂ → y → L,
  where ∂ holds the other graph inputs fixed (∂L/∂σ² holds x and μ; ∂L/∂μ holds x but follows
  σ²'s dependence on μ). L = Σ g_i y_i with free symbols g_i is fully general: g_i = ∂L/∂y_i.

  Args:
    batch_sizes: `ANY_M` for the proof over a symbolic m, ints for explicit batches.
  """
  results = []
  for m in batch_sizes:
    if m == ANY_M:
      results += _symbolic_checks_any_m()
    elif isinstance(m, int) and not isinstance(m, bool) and m >= 2:
      results += _symbolic_checks(m)
    else:
      raise ValueError(f"batch sizes are ints >= 2 or {ANY_M!r}, got {m!r}.")
  return results


def _symbolic_checks(m: int) -> list[SymbolicResult]:
  import sympy as sp

  x = sp.symbols(f"x1:{m + 1}", real=True)
  g = sp.symbols(f"g1:{m + 1}", real=True)  # ∂L/∂y_i
  gamma, beta, mu_, s2_ = sp.symbols("gamma beta mu sigma2", real=True)
  eps, s = sp.symbols("epsilon sigma", positive=True)

  # Eqs. (1)-(4) as functions of x alone: sympy's derivatives of this are the truth.
  mu = sum(x) / m  # (1)
  var = sp.expand(sum((xi - mu) ** 2 for xi in x) / m)
  sigma2 = var + eps  # (2)
  sigma = sp.sqrt(sigma2)
  x_hat = [(xi - mu) / sigma for xi in x]  # (3)
  loss = sum(gi * (gamma * hi + beta) for gi, hi in zip(g, x_hat, strict=True))  # (4), L = Σ g_i y_i

  # The same graph with μ and σ² as free nodes, for the seed's partial derivatives.
  h = sp.symbols(f"xhat1:{m + 1}", real=True)
  loss_of_xhat = sum(gi * (gamma * hi + beta) for gi, hi in zip(g, h, strict=True))
  xhat_of = lambda xi, mu_v, s2_v: (xi - mu_v) / sp.sqrt(s2_v)
  sigma2_of = lambda mu_v: sum((xi - mu_v) ** 2 for xi in x) / m + eps
  loss_of = lambda mu_v, s2_v: sum(
      gi * (gamma * xhat_of(xi, mu_v, s2_v) + beta) for gi, xi in zip(g, x, strict=True)
  )
  at_batch = {mu_: mu, s2_: sigma2}
  graph = {
      "dL/dxhat_i": [sp.diff(loss_of_xhat, hi).subs(dict(zip(h, x_hat, strict=True))) for hi in h],
      "dxhat_i/dx_i": [sp.diff(xhat_of(xi, mu_, s2_), xi).subs(at_batch) for xi in x],
      "dL/dsigma2": sp.diff(loss_of(mu_, s2_), s2_).subs(at_batch),
      "dsigma2/dx_i": [sp.diff(sigma2_of(mu_), xi).subs(at_batch) for xi in x],
      "dL/dmu": sp.diff(loss_of(mu_, sigma2_of(mu_)), mu_).subs(at_batch),
      "dmu/dx_i": [sp.diff(mu, xi) for xi in x],
  }

  # The seed's formulas, as printed (with its u_B read as μ).
  dL_dxhat = [gi * gamma for gi in g]
  dL_dsigma2 = sum(d * (-(xi - mu) / (2 * sigma**3)) for d, xi in zip(dL_dxhat, x, strict=True))
  vanishing = dL_dsigma2 * (-sp.Rational(2, m) * sum(xi - mu for xi in x))
  dL_dmu = sum(d * (-1 / sigma) for d in dL_dxhat) + vanishing
  seed = {
      "dL/dxhat_i": dL_dxhat,
      "dxhat_i/dx_i": [1 / sigma] * m,
      "dL/dsigma2": dL_dsigma2,
      "dsigma2/dx_i": [sp.Rational(2, m) * (xi - mu) for xi in x],
      "dL/dmu": dL_dmu,
      "dmu/dx_i": [sp.Rational(1, m)] * m,
  }
  eq7 = [
      dL_dxhat[i] / sigma + dL_dsigma2 * seed["dsigma2/dx_i"][i] + dL_dmu / m for i in range(m)
  ]
  sum_g = sum(g)
  sum_g_xhat = sum(gi * hi for gi, hi in zip(g, x_hat, strict=True))
  closed = [gamma / (m * sigma) * (m * g[i] - sum_g - x_hat[i] * sum_g_xhat) for i in range(m)]

  def is_zero(expr) -> bool:
    # Eliminate ε through σ² = var + ε: the difference becomes rational in x, g, γ, σ.
    expr = sp.sympify(expr).subs(eps, s**2 - var)
    return sp.expand(sp.numer(sp.together(expr))) == 0

  def result(identity, formulas, truths):
    formulas = formulas if isinstance(formulas, list) else [formulas]
    truths = truths if isinstance(truths, list) else [truths]
    ok = all(is_zero(f - t) for f, t in zip(formulas, truths, strict=True))
    return SymbolicResult(m, identity, ok)

  grad_x = [sp.diff(loss, xi) for xi in x]
  results = [result(f"seed {name} == graph derivative", seed[name], graph[name]) for name in seed]
  results += [
      result("seed dL/dmu vanishing term == 0", vanishing, 0),
      result("eq. (7) == dL/dx_i", eq7, grad_x),
      result("closed form == dL/dx_i", closed, grad_x),
      result("eq. (5) sum g_i xhat_i == dL/dgamma", sum_g_xhat, sp.diff(loss, gamma)),
      result("eq. (6) sum g_i == dL/dbeta", sum_g, sp.diff(loss, beta)),
  ]
  return results


# Every batch size at once. The batch is an indexed family x_i, g_i (sympy IndexedBase) and
# every Σ runs over i = 1..m with m a positive integer symbol. sympy differentiates a Σ term by
# term (∂x_i/∂x_j = δ_ij); `_reduce_sums` then rewrites each Σ as a linear combination of the
# power sums Σ_k x_k, Σ_k x_k², Σ_k g_k, Σ_k g_k x_k (the constants pulled out, Σ_i c = m c,
# Σ_i δ_ij h(i) = h(j) for a batch index j), after which an identity is a rational-function
# identity in those sums, m, σ and the other symbols, decided as for explicit batches.


def _reduce_sums(expr, m, k):
  """expr with every Σ_i f(i) over 1..m reduced to power sums Σ_k (monomial in x_k, g_k)."""
  import sympy as sp

  if not expr.args:
    return expr
  if not isinstance(expr, sp.Sum):
    return expr.func(*(_reduce_sums(a, m, k) for a in expr.args))
  ((dummy, low, high),) = expr.limits
  if (low, high) != (1, m):
    raise ValueError(f"unexpected limits in {expr}")
  total = sp.Integer(0)
  for term in sp.Add.make_args(sp.expand(_reduce_sums(expr.function, m, k))):
    inside, outside = [], []
    for factor in sp.Mul.make_args(term):
      (inside if dummy in factor.free_symbols else outside).append(factor)
    coefficient = sp.Mul(*outside)
    deltas = [f for f in inside if isinstance(f, sp.KroneckerDelta)]
    if len(deltas) > 1:
      raise ValueError(f"second derivatives are not reduced: {term}")
    if deltas:  # Σ_i δ_ij h(i) = h(j): j is one of the batch's indices
      (delta,) = deltas
      other = delta.args[0] if delta.args[1] == dummy else delta.args[1]
      rest = sp.Mul(*(f for f in inside if f is not delta))
      total += coefficient * rest.subs(dummy, other)
    elif not inside:
      total += coefficient * m  # Σ_{i=1}^{m} c = m c
    else:
      total += coefficient * sp.Sum(sp.Mul(*inside).subs(dummy, k), (k, 1, m))
  return total


def _any_m_batch():
  """Symbols and eqs. (1)-(4) over a symbolic batch size m."""
  import sympy as sp

  m = sp.Symbol("m", integer=True, positive=True)
  i, j, k = sp.symbols("i j k", integer=True, positive=True)
  x = sp.IndexedBase("x", real=True)
  g = sp.IndexedBase("g", real=True)  # ∂L/∂y_i
  eps, s = sp.symbols("epsilon sigma", positive=True)
  total = lambda f: sp.Sum(f, (i, 1, m))
  mu = total(x[i]) / m  # (1)
  sigma2 = total((x[i] - mu) ** 2) / m + eps  # (2)
  var = _reduce_sums(sigma2 - eps, m, k)

  def is_zero(expr) -> bool:
    # Power sums and ε through σ² = var + ε: the difference becomes rational in the power
    # sums, m, g_j, x_j, γ, σ (square roots of σ² become σ).
    expr = _reduce_sums(sp.sympify(expr), m, k).subs(eps, s**2 - var)
    expr = expr.replace(lambda e: e.is_Pow and e.exp.is_Rational and e.exp.q == 2,
                        lambda e: sp.Pow(sp.expand(e.base), e.exp))
    return sp.expand(sp.numer(sp.together(expr))) == 0

  return sp, m, i, j, x, g, eps, total, mu, sigma2, is_zero


def _symbolic_checks_any_m() -> list[SymbolicResult]:
  sp, m, i, j, x, g, eps, total, mu, sigma2, is_zero = _any_m_batch()
  gamma, beta, mu_, s2_ = sp.symbols("gamma beta mu sigma2", real=True)
  h = sp.IndexedBase("xhat", real=True)
  sigma = sp.sqrt(sigma2)
  x_hat = lambda idx: (x[idx] - mu) / sigma  # (3)
  loss = total(g[i] * (gamma * x_hat(i) + beta))  # (4), L = Σ g_i y_i

  # The graph with μ and σ² as free nodes, for the seed's partial derivatives.
  xhat_of = lambda idx, mu_v, s2_v: (x[idx] - mu_v) / sp.sqrt(s2_v)
  sigma2_of = lambda mu_v: total((x[i] - mu_v) ** 2) / m + eps
  loss_of = lambda mu_v, s2_v: total(g[i] * (gamma * xhat_of(i, mu_v, s2_v) + beta))
  at_batch = {mu_: mu, s2_: sigma2}
  graph = {
      "dL/dxhat_i": sp.diff(total(g[i] * (gamma * h[i] + beta)), h[j]),
      "dxhat_i/dx_i": sp.diff(xhat_of(j, mu_, s2_), x[j]).subs(at_batch),
      "dL/dsigma2": sp.diff(loss_of(mu_, s2_), s2_).subs(at_batch),
      "dsigma2/dx_i": sp.diff(sigma2_of(mu_), x[j]).subs(at_batch),
      "dL/dmu": sp.diff(loss_of(mu_, sigma2_of(mu_)), mu_).subs(at_batch),
      "dmu/dx_i": sp.diff(mu, x[j]),
  }
  # The seed's formulas, as printed (u_B read as μ), for the batch index j.
  dL_dsigma2 = total(g[i] * gamma * (-(x[i] - mu) / (2 * sigma**3)))
  vanishing = dL_dsigma2 * (-2 / m * total(x[i] - mu))
  dL_dmu = total(g[i] * gamma * (-1 / sigma)) + vanishing
  seed = {
      "dL/dxhat_i": g[j] * gamma,
      "dxhat_i/dx_i": 1 / sigma,
      "dL/dsigma2": dL_dsigma2,
      "dsigma2/dx_i": 2 / m * (x[j] - mu),
      "dL/dmu": dL_dmu,
      "dmu/dx_i": 1 / m,
  }
  eq7 = seed["dL/dxhat_i"] / sigma + dL_dsigma2 * seed["dsigma2/dx_i"] + dL_dmu / m
  sum_g, sum_g_xhat = total(g[i]), total(g[i] * x_hat(i))
  closed = gamma / (m * sigma) * (m * g[j] - sum_g - x_hat(j) * sum_g_xhat)
  grad_x = sp.diff(loss, x[j])
  result = lambda identity, formula, truth: SymbolicResult(ANY_M, identity,
                                                           is_zero(formula - truth))
  results = [result(f"seed {name} == graph derivative", seed[name], graph[name])
             for name in seed]
  results += [
      result("seed dL/dmu vanishing term == 0", vanishing, 0),
      result("eq. (7) == dL/dx_i", eq7, grad_x),
      result("closed form == dL/dx_i", closed, grad_x),
      result("eq. (5) sum g_i xhat_i == dL/dgamma", sum_g_xhat, sp.diff(loss, gamma)),
      result("eq. (6) sum g_i == dL/dbeta", sum_g, sp.diff(loss, beta)),
  ]
  return results + _symbolic_renorm_any_m()


def _symbolic_renorm_any_m() -> list[SymbolicResult]:
  """Batch renormalization: y_i = γ (x̂_i r + d) + β with r, d constants to the gradient
  (stop-gradient), so they are plain symbols here; and with r = σ_B/σ, d = (μ_B − μ)/σ
  unclipped, x̂ r + d is the inference normalization (x − μ)/σ."""
  sp, m, i, j, x, g, _, total, mu, sigma2, is_zero = _any_m_batch()
  gamma, beta, d, mu_run = sp.symbols("gamma beta d mu_run", real=True)
  r, sigma_run = sp.symbols("r sigma_run", positive=True)
  sigma = sp.sqrt(sigma2)
  x_hat = lambda idx: (x[idx] - mu) / sigma
  loss = total(g[i] * (gamma * (x_hat(i) * r + d) + beta))
  sum_g, sum_g_xhat = total(g[i]), total(g[i] * x_hat(i))
  closed = gamma * r / (m * sigma) * (m * g[j] - sum_g - x_hat(j) * sum_g_xhat)
  unclipped = x_hat(j) * (sigma / sigma_run) + (mu - mu_run) / sigma_run
  result = lambda identity, formula, truth: SymbolicResult(ANY_M, identity,
                                                           is_zero(formula - truth))
  return [
      result("renorm closed form (eq. (7) with gamma*r) == dL/dx_i", closed,
             sp.diff(loss, x[j])),
      result("renorm r sum g_i xhat_i + d sum g_i == dL/dgamma",
             r * sum_g_xhat + d * sum_g, sp.diff(loss, gamma)),
      result("renorm sum g_i == dL/dbeta", sum_g, sp.diff(loss, beta)),
      result("renorm unclipped xhat*r + d == (x_i - mu)/sigma (inference)", unclipped,
             (x[j] - mu_run) / sigma_run),
  ]
