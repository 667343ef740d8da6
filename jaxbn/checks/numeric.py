"""The numeric half of the derivation checks: on each case of the grid (`jaxbn.checks.cases`),
the analytic backward against every other way of getting the gradient.

  - the analytic backward (`jaxbn.batch_norm`, the custom_vjp),
  - the staged backward (`jaxbn.reference.staged_backward`, the seed's eq. (7) term by term),
  - JAX's autodiff of the literal forward (`jaxbn.reference.batch_norm_reference`),
  - central finite differences of that forward in float64 (five-point stencil).

Renorm precision: batch renormalization's r, d and its unclipped output, in float32, against
float64 at |μ| = 1e0 … 1e6 and σ = 1e-2 … 1e1 (one feature per pair, one call): d = (μ_B − μ)/σ
must keep the digits the split mean keeps, and the output must be the inference formula's
(x − μ)/σ·γ + β to float32 rounding.

Errors: for each gradient (dx, dγ, dβ) the max abs difference and the *relative* error
max|a − b| / max|b| (normwise, so entries near 0 do not blow it up); a comparison reports the
worst of the three.

Called through `jaxbn.checks` (`run_checks`, `check_case`) by `jaxbn check` and the tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxbn import ops, reference
from jaxbn.checks.cases import (EPSILON, Case, default_cases, inputs, precision_inputs,
                                variant_options)
from jaxbn.ops import Renorm, RenormCorrection

# Tolerances for float64, the bounds the derivation must meet. float32 is judged against
# autodiff's own float32 error instead: the analytic gradient may be at most FLOAT32_FACTOR
# times as wrong.
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
# The renorm-precision case's float32 r, d and y are held to PRECISION_ULPS float32 epsilons
# of the float64 truth (per feature; d relative to |d| + r, the size of its terms; y relative
# to the feature's max |y|). Measured on its inputs: at most 1.4. Forming μ_B in float32
# before subtracting μ puts d off by up to 1 (|μ| ≥ 1e5 with σ = 0.01 …).
PRECISION_ULPS = 4.0


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One pair of gradients (or outputs) compared on one case."""

  case: str
  pair: str
  max_abs: float
  max_rel: float
  tolerance: float
  passed: bool


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


def _check_renorm_precision(case: Case) -> list[Comparison]:
  """r, d and the unclipped output against float64, on the pure-JAX path and on the default
  one (the CPU kernels where they are available): one compiled call for both."""
  x, mean, var, scale, bias, truth = precision_inputs()
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
  x, scale, bias, dy, mask = inputs(case)
  options = variant_options(case, x, mask)
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
