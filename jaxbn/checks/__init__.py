"""Derivation checks: the analytic backward against every other way of getting the gradient.

Numeric (`run_checks`): over a grid of layouts, feature axes, dtypes, masks and input
distributions — plain batch norm, batch renormalization with r, d inside and at their clips,
and ghost batches — compare

  - the analytic backward (`jaxbn.batch_norm`, the custom_vjp),
  - the staged backward (`jaxbn.reference.staged_backward`, the seed's eq. (7) term by term),
  - JAX's autodiff of the literal forward (`jaxbn.reference.batch_norm_reference`),
  - central finite differences of that forward in float64 (five-point stencil).

`default_cases()` lists the grid's cases and `run_checks([case])` runs one of them, so a
caller (the tests, one case per test) can spread the grid over processes.

Symbolic (`symbolic_checks`, needs sympy): for every batch size m at once (m a symbol, the
batch an indexed family x_i, g_i under Σ_{i=1}^{m}), derive ∂L/∂x_j, ∂L/∂γ and ∂L/∂β from
eqs. (1)-(4) with sympy and prove each of the seed's intermediate formulas, its eq. (7) and
the closed form equal to them, and the extra term of the seed's ∂L/∂μ identically 0; the
same for batch renormalization's closed form (eq. (7) with γr), and its forward equal to the
inference formula when r, d are unclipped. For given m (e.g. 2, 3, 4) the same identities
can also be proved on m explicit symbols, a cross-check of the general proof's machinery.

Renorm precision (`renorm_precision_case`, in the grid): batch renormalization's r, d and its
unclipped output, in float32, against float64 at |μ| = 1e0 … 1e6 and σ = 1e-2 … 1e1 (one
feature per pair, one call): d = (μ_B − μ)/σ must keep the digits the split mean μ_B = hi + lo
keeps, and the output must be the inference formula's (x − μ)/σ·γ + β to float32 rounding.

Errors: for each gradient (dx, dγ, dβ) the max abs difference and the *relative* error
max|a − b| / max|b| (normwise, so entries near 0 do not blow it up); a comparison reports the
worst of the three.

The grid is `cases.py`, the comparisons `numeric.py`, the proofs `symbolic.py`; this package
re-exports what `jaxbn check` (`jaxbn.cli`) and the tests call.
"""

from jaxbn.checks.cases import Case as Case
from jaxbn.checks.cases import default_cases as default_cases
from jaxbn.checks.cases import renorm_precision_case as renorm_precision_case
from jaxbn.checks.numeric import Comparison as Comparison
from jaxbn.checks.numeric import check_case as check_case
from jaxbn.checks.numeric import run_checks as run_checks
from jaxbn.checks.symbolic import ANY_M as ANY_M
from jaxbn.checks.symbolic import SymbolicResult as SymbolicResult
from jaxbn.checks.symbolic import symbolic_checks as symbolic_checks

__all__ = [
    "ANY_M",
    "Case",
    "Comparison",
    "SymbolicResult",
    "check_case",
    "default_cases",
    "renorm_precision_case",
    "run_checks",
    "symbolic_checks",
]
