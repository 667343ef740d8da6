"""The symbolic half of the derivation checks: sympy proves the seed's backward, renorm's and
a blend's.

For every batch size m at once (m a symbol, the batch an indexed family x_i, g_i under
Σ_{i=1}^{m}), sympy derives ∂L/∂x_j, ∂L/∂γ and ∂L/∂β from eqs. (1)-(4) and proves each of the
seed's intermediate formulas, its eq. (7) and the closed form equal to them, and the extra term
of the seed's ∂L/∂μ identically 0; the same for batch renormalization's closed form (eq. (7)
with γr), and its forward equal to the inference formula when r, d are unclipped; and the
blend's closed form (statistics blended with running ones, `jaxbn.Blend`). For given m
(e.g. 2, 3, 4) the same identities can also be proved on m explicit symbols, a cross-check of
the general proof's machinery. Needs sympy (`jaxbn[check]`), imported only when a proof runs.

Called through `jaxbn.checks.symbolic_checks` by `jaxbn check` and the tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


ANY_M = "m"  # `symbolic_checks` batch size: every m at once (a symbolic m)


@dataclasses.dataclass(frozen=True)
class SymbolicResult:
  """One identity, `formula == derivative`, proved (difference simplifies to 0) or not.

  `m` is the batch size it was proved for: an int, or `ANY_M` ("m") for every batch size.
  """

  m: int | str
  identity: str
  passed: bool


def _identities(result, seed, graph, vanishing, eq7, closed, grad_x, sum_g_xhat, dL_dgamma,
                sum_g, dL_dbeta) -> list[SymbolicResult]:
  """The identities both proofs hold, each checked by `result(identity, formula, truth)`: the
  seed's six partial derivatives against the graph's, the vanishing term, eq. (7) and the
  closed form against ∂L/∂x, and eqs. (5), (6) against ∂L/∂γ, ∂L/∂β."""
  results = [result(f"seed {name} == graph derivative", seed[name], graph[name])
             for name in seed]
  return results + [
      result("seed dL/dmu vanishing term == 0", vanishing, 0),
      result("eq. (7) == dL/dx_i", eq7, grad_x),
      result("closed form == dL/dx_i", closed, grad_x),
      result("eq. (5) sum g_i xhat_i == dL/dgamma", sum_g_xhat, dL_dgamma),
      result("eq. (6) sum g_i == dL/dbeta", sum_g, dL_dbeta),
  ]


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
  return _identities(result, seed, graph, vanishing, eq7, closed, grad_x,
                     sum_g_xhat, sp.diff(loss, gamma), sum_g, sp.diff(loss, beta))


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
  return _identities(result, seed, graph, vanishing, eq7, closed, grad_x, sum_g_xhat,
                     sp.diff(loss, gamma), sum_g, sp.diff(loss, beta)) + (
                         _symbolic_renorm_any_m() + _symbolic_blend_any_m())


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



def _blend_any_m():
  """A blend over a symbolic m: y_i = γ (x_i − μ̃)/σ̃ + β with μ̃ = (1 − w)μ + w μ_R and
  σ̃² = (1 − w)(σ² − ε) + w σ_R² + ε, the running μ_R, σ_R² and w constants; the loss, its
  sums, and `is_zero` that also takes σ̃'s square root."""
  import types

  sp, m, i, j, x, g, eps, total, mu, sigma2, is_zero = _any_m_batch()
  gamma, beta, mu_run, w = sp.symbols("gamma beta mu_run w", real=True)
  var_run = sp.Symbol("sigma2_run", positive=True)
  mu_blend = (1 - w) * mu + w * mu_run
  sigma_blend = sp.sqrt((1 - w) * (sigma2 - eps) + w * var_run + eps)
  s_blend = sp.Symbol("sigma_blend", positive=True)

  def blend_is_zero(expr) -> bool:
    # σ̃ named, the expression put over one denominator, σ̃² written out again: what is left
    # is rational in σ̃ and decided as before.
    expr = sp.numer(sp.together(sp.sympify(expr).subs(sigma_blend, s_blend)))
    return is_zero(sp.expand(expr).subs(s_blend**2, sigma_blend**2))

  return types.SimpleNamespace(
      sp=sp, m=m, j=j, x=x, g=g, w=w, gamma=gamma, beta=beta, mu=mu, mu_blend=mu_blend,
      sigma_blend=sigma_blend, loss=total(g[i] * (gamma * (x[i] - mu_blend) / sigma_blend + beta)),
      sum_g=total(g[i]), sum_g_centred=total(g[i] * (x[i] - mu_blend)), is_zero=blend_is_zero)


def _blend_closed_form(b, share, centre):
  """γ/σ̃ (g_j − share/m Σ g_i − share/m (x_j − centre)/σ̃² Σ g_i (x_i − μ̃)): the blend's
  closed form with share = 1 − w and centre = μ (the batch's)."""
  return b.gamma / b.sigma_blend * (
      b.g[b.j] - share / b.m * b.sum_g
      - share / b.m * (b.x[b.j] - centre) / b.sigma_blend**2 * b.sum_g_centred)


def _symbolic_blend_any_m() -> list[SymbolicResult]:
  """The blend's closed form jaxbn computes (`jaxbn._passes.gradient_coefficients` with a
  blend): eq. (7) with 1/σ̃ for 1/σ and its sums times 1 − w, x − μ the batch's; and
  ∂L/∂γ = Σ g_i (x_i − μ̃)/σ̃, ∂L/∂β = Σ g_i."""
  b = _blend_any_m()
  sp = b.sp
  result = lambda identity, formula, truth: SymbolicResult(ANY_M, identity,
                                                           b.is_zero(formula - truth))
  return [
      result("blend closed form (eq. (7), 1/sigma~, sums times 1 - w) == dL/dx_i",
             _blend_closed_form(b, 1 - b.w, b.mu), sp.diff(b.loss, b.x[b.j])),
      result("blend sum g_i (x_i - mu~)/sigma~ == dL/dgamma", b.sum_g_centred / b.sigma_blend,
             sp.diff(b.loss, b.gamma)),
      result("blend sum g_i == dL/dbeta", b.sum_g, sp.diff(b.loss, b.beta)),
  ]
