"""jaxbn.checks: the derivation checks hold on the whole grid, and can fail."""

import dataclasses

import numpy as np
import pytest

from jaxbn import _per_feature, checks
from jaxbn.checks import numeric, symbolic

# The grid (about two minutes of compiling in all) is one test per case, so that `-n auto`
# spreads it over the workers; each makes every assertion that concerns its own case.
CASES = checks.default_cases()


def test_grid_covers_layouts_dtypes_masks_and_distributions():
  cases = checks.default_cases()
  assert {c.layout for c in cases} >= {"dense", "nhwc", "nchw", "two-axes"}
  assert {c.dtype for c in cases} == {"float64", "float32"}
  assert {c.masked for c in cases} == {False, True}
  assert {c.distribution for c in cases} >= {"offset-1e4", "constant-feature"}


def _assert_every_comparison_passes(case, results):
  failed = [r for r in results if not r.passed]
  assert not failed, failed
  pairs = {r.pair for r in results}
  if case.dtype == "float64" and case.variant == "bn":  # the grid's cases with every pair
    assert {"analytic vs autodiff", "analytic vs finite differences",
            "staged vs analytic"} <= pairs


def _assert_float64_tolerances_are_the_bounds(results):
  for r in results:
    if r.pair == "analytic vs autodiff":
      assert r.tolerance == 1e-10 and r.max_rel <= 1e-10, r
    if r.pair == "analytic vs finite differences":
      assert r.tolerance == 1e-6 and r.max_rel <= 1e-6, r
    if r.pair == "staged vs analytic" and "offset" not in r.case:
      assert r.tolerance == 1e-12 and r.max_rel <= 1e-12, r


def _assert_float32_analytic_within_twice_autodiffs_error(case, results):
  precision = checks.renorm_precision_case().name
  by_case = {}
  for r in results:
    if r.case.endswith("float32") and r.case != precision:
      by_case.setdefault(r.case, {})[r.pair.split()[0]] = r.max_rel
  if case.dtype == "float32" and case != checks.renorm_precision_case():
    assert list(by_case) == [case.name]
  for name, errors in by_case.items():
    assert errors["analytic"] <= 2 * errors["autodiff"], name


def test_half_the_grid_besides_the_precision_case_is_float32():
  precision = checks.renorm_precision_case()
  float32 = [c for c in CASES if c.dtype == "float32" and c != precision]
  assert len(float32) == (len(CASES) - 1) // 2


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_grid_case_passes_at_its_tolerances(case):
  results = checks.run_checks([case])
  assert results and {r.case for r in results} == {case.name}
  _assert_every_comparison_passes(case, results)
  _assert_float64_tolerances_are_the_bounds(results)
  _assert_float32_analytic_within_twice_autodiffs_error(case, results)


@pytest.mark.slow
def test_a_wrong_gradient_fails(monkeypatch):
  right = numeric._grad_analytic
  monkeypatch.setattr(
      numeric, "_grad_analytic",
      lambda *a: tuple(g * (1 + 1e-7) for g in right(*a)))  # 1e-7 relative: just past 1e-10
  case = checks.Case("dense", "normal", False, "float64")
  results = checks.run_checks([case])
  verdict = {r.pair: r.passed for r in results}
  assert verdict["analytic vs autodiff"] is False
  assert verdict["staged vs analytic"] is False
  assert verdict["forward vs reference"] is True


def test_renorm_precision_check_passes_and_fails_on_lost_digits(monkeypatch):
  """The grid's renorm-precision case holds r, d and the unclipped output to float32
  rounding of float64 over |μ| 1e0 … 1e6 and σ 1e-2 … 1e1, and fails on d formed from μ_B
  rounded to float32 before μ is subtracted."""
  case = checks.renorm_precision_case()
  assert case in checks.default_cases()
  assert case.layout == "dense"  # `jaxbn check --quick` keeps it
  results = checks.run_checks([case])
  assert {r.pair for r in results} == {
      f"{what} ({path})" for path in ("pure JAX", "default path")
      for what in ("renorm r, d vs float64", "unclipped renorm y vs float64 inference")}
  assert all(r.passed and r.tolerance == 4 * np.finfo(np.float32).eps for r in results), results
  right = _per_feature.renorm_correction
  monkeypatch.setattr(_per_feature, "renorm_correction",
                      lambda hi, lo, *rest: right(hi + lo, 0 * lo, *rest))
  verdict = {r.pair: r for r in checks.run_checks([case])}
  assert not any(r.passed for r in verdict.values()), verdict
  assert verdict["renorm r, d vs float64 (pure JAX)"].max_abs > 0.05


@pytest.mark.slow
def test_symbolic_identities_are_proved_for_explicit_batches():
  results = checks.symbolic_checks((2, 3, 4))
  assert {r.m for r in results} == {2, 3, 4}
  identities = {r.identity for r in results}
  assert "seed dL/dmu vanishing term == 0" in identities
  assert "closed form == dL/dx_i" in identities
  assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_symbolic_identities_are_proved_for_every_batch_size():
  results = checks.symbolic_checks()
  assert {r.m for r in results} == {checks.ANY_M}
  identities = {r.identity for r in results}
  explicit = {"seed dL/dxhat_i == graph derivative", "seed dxhat_i/dx_i == graph derivative",
              "seed dL/dsigma2 == graph derivative", "seed dsigma2/dx_i == graph derivative",
              "seed dL/dmu == graph derivative", "seed dmu/dx_i == graph derivative",
              "seed dL/dmu vanishing term == 0", "eq. (7) == dL/dx_i", "closed form == dL/dx_i"}
  assert explicit <= identities  # the six partials, the vanishing term, (7), the closed form
  assert {i for i in identities if i.startswith("renorm")} == {
      "renorm closed form (eq. (7) with gamma*r) == dL/dx_i",
      "renorm r sum g_i xhat_i + d sum g_i == dL/dgamma", "renorm sum g_i == dL/dbeta",
      "renorm unclipped xhat*r + d == (x_i - mu)/sigma (inference)"}
  assert {i for i in identities if i.startswith("blend")} == {
      "blend closed form (eq. (7), 1/sigma~, sums times 1 - w) == dL/dx_i",
      "blend sum g_i (x_i - mu~)/sigma~ == dL/dgamma", "blend sum g_i == dL/dbeta"}
  assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_the_any_m_proof_rejects_wrong_formulas():
  """The symbolic-m machinery can fail: a closed form with m − 1 for m, and the seed's
  ∂L/∂σ² with σ² for σ³, are not the derivative."""
  sp, m, i, j, x, g, _, total, mu, sigma2, is_zero = symbolic._any_m_batch()
  gamma = sp.Symbol("gamma", real=True)
  sigma = sp.sqrt(sigma2)
  x_hat = lambda idx: (x[idx] - mu) / sigma
  loss = total(g[i] * gamma * x_hat(i))
  body = lambda n: gamma / (n * sigma) * (
      m * g[j] - total(g[i]) - x_hat(j) * total(g[i] * x_hat(i)))
  grad_x = sp.diff(loss, x[j])
  assert is_zero(body(m) - grad_x)
  assert not is_zero(body(m - 1) - grad_x)
  right = total(g[i] * gamma * (-(x[i] - mu) / (2 * sigma**3)))
  wrong = total(g[i] * gamma * (-(x[i] - mu) / (2 * sigma**2)))
  s2 = sp.Symbol("s2", positive=True)
  truth = sp.diff(total(g[i] * gamma * (x[i] - mu) / sp.sqrt(s2)), s2).subs(s2, sigma2)
  assert is_zero(right - truth)
  assert not is_zero(wrong - truth)


def test_the_blend_proof_rejects_wrong_formulas():
  """The blend's closed form without its 1 − w, or centred on μ̃ instead of the batch's μ, is
  not the derivative; with both right it is."""
  b = symbolic._blend_any_m()
  grad_x = b.sp.diff(b.loss, b.x[b.j])
  assert b.is_zero(symbolic._blend_closed_form(b, 1 - b.w, b.mu) - grad_x)
  assert not b.is_zero(symbolic._blend_closed_form(b, 1, b.mu) - grad_x)
  assert not b.is_zero(symbolic._blend_closed_form(b, 1 - b.w, b.mu_blend) - grad_x)


def test_symbolic_batch_sizes_are_checked():
  with pytest.raises(ValueError, match="batch sizes are ints >= 2"):
    checks.symbolic_checks((1,))


def test_case_names_are_unique():
  names = [c.name for c in checks.default_cases()]
  assert len(names) == len(set(names))
  assert dataclasses.is_dataclass(checks.Comparison)
