"""The Hessian's spectrum from Hessian-vector products, as pure functions of a loss and a
parameter tree (Ghorbani, Krishnan and Xiao, ICML 2019, "An Investigation into Neural Net
Optimization via Hessian Eigenvalue Density").

Nothing here knows about nets or BN: `hvp` takes any `loss_fn(params) -> scalar` over any
pytree; everything else takes `matvec(v) -> Hv` on flat float64 NumPy vectors, so the tests
check each probe on a matrix whose spectrum is known and on a small net whose Hessian is
formed exactly.

- `hvp`: Hv, forward-over-reverse (the jvp of ∇L along v, JAX's usual choice; the default)
  or reverse-over-reverse (∇(∇L · v)). Both go through a `jax.custom_vjp` such as jaxbn's
  analytic backward: JAX refuses forward mode on the custom_vjp function itself, but not
  over its gradient, where reverse mode has applied the custom rule and the outer
  derivative runs through the hand-derived backward's ordinary operations. Forward-over-
  reverse was 25-35% faster on the paper MLP (jaxbn with and without its kernels, Flax).
- `lanczos`: m steps with full re-orthogonalization (the paper's choice): each new vector
  is orthogonalized against all earlier ones, twice, in float64 on the host. It costs
  O(m²·n) flops and m·n floats of memory beside the m HVPs — for the paper MLP's 89,610
  parameters and m = 80, 57 MB and a few hundred ms, small against the HVPs.
- `eigenpairs`: the top-k Ritz pairs of one Lanczos run.
- `spectral_density`: stochastic Lanczos quadrature (SLQ): each run from a random unit
  vector v gives nodes θ_j (the Ritz values) and weights τ_j (the squared first components
  of the tridiagonal's eigenvectors), a Gauss quadrature for vᵀf(H)v that is exact for
  polynomials f of degree < 2m; averaged over runs, Σ τ_j f(θ_j) estimates tr f(H)/n. The
  density is that measure convolved with a Gaussian of width `sigma`.
- `hutchinson_trace`: tr H ≈ mean of zᵀHz over Rademacher z.
- `gradient_concentration`: ‖P_k g‖² / ‖g‖², the share of the gradient's squared norm in
  the span of the top-k eigenvectors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
MatVec = Callable[[np.ndarray], np.ndarray]


MODES = ("forward-over-reverse", "reverse-over-reverse")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hessian_product(loss_fn, mode, params, vector, args):
  flat, unravel = ravel_pytree(params)
  tangent = unravel(vector.astype(flat.dtype))
  gradient = lambda p: jax.grad(loss_fn)(p, *args)
  if mode == "forward-over-reverse":
    return ravel_pytree(jax.jvp(gradient, (params,), (tangent,))[1])[0]

  def directional(p):  # ∇L(p) · v, whose gradient is Hv
    return sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(gradient(p)),
                                               jax.tree.leaves(tangent)))

  return ravel_pytree(jax.grad(directional)(params))[0]


@functools.partial(jax.jit, static_argnums=0)
def _flat_gradient(loss_fn, params, args):
  return ravel_pytree(jax.grad(loss_fn)(params, *args))[0]


def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, *args,
        mode: str = "forward-over-reverse") -> tuple[MatVec, int]:
  """v ↦ H·v at `params`, H the Hessian of `loss_fn(params, *args)` in `params`, as a function
  of a flat float64 vector; and the parameter count n.

  The product runs jitted in the parameters' own dtype (`mode`: see the module docstring),
  `args` (data) passed as arguments, not baked in as constants; v arrives and Hv leaves as
  float64 NumPy, for `lanczos`. `loss_fn` is a static argument of the jit: pass the same
  function object again to reuse the compilation.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  n = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))

  def matvec(v: np.ndarray) -> np.ndarray:
    return np.asarray(_hessian_product(loss_fn, mode, params, jnp.asarray(v), args),
                      np.float64)

  return matvec, n


def gradient(loss_fn: Callable[..., jax.Array], params: PyTree, *args) -> np.ndarray:
  """∇L at `params`, flat, as float64 NumPy (in `ravel_pytree`'s order, as `hvp`'s vectors)."""
  return np.asarray(_flat_gradient(loss_fn, params, args), np.float64)


class Tridiagonal(NamedTuple):
  """What m steps of Lanczos leave: T's diagonal (m,), off-diagonal (m − 1,), and the
  orthonormal Lanczos vectors as rows (m, n), V H Vᵀ = T."""

  alpha: np.ndarray
  beta: np.ndarray
  vectors: np.ndarray


def random_unit_vector(n: int, seed: int) -> np.ndarray:
  """A Gaussian vector scaled to unit length (SLQ's starting vectors)."""
  v = np.random.default_rng(seed).standard_normal(n)
  return v / np.linalg.norm(v)


def lanczos(matvec: MatVec, start: np.ndarray, order: int) -> Tridiagonal:
  """`order` steps of Lanczos from `start`, fully re-orthogonalized, in float64.

  Stops early when the Krylov space is exhausted (the new vector's norm falls to rounding
  relative to ‖H‖'s estimate so far): then T is exact for H on that space, and shorter.
  """
  if order < 1:
    raise ValueError(f"order must be >= 1, got {order}.")
  v = np.asarray(start, np.float64)
  if v.ndim != 1 or not np.all(np.isfinite(v)) or np.linalg.norm(v) == 0:
    raise ValueError(f"start must be a finite, non-zero vector, got shape {v.shape}.")
  order = min(order, v.size)
  vectors = np.zeros((order, v.size))
  vectors[0] = v / np.linalg.norm(v)
  alpha, beta = [], []
  scale = 0.0
  for j in range(order):
    w = np.array(matvec(vectors[j]), np.float64)  # a copy: orthogonalized in place
    alpha.append(float(vectors[j] @ w))
    # Classical Gram-Schmidt against every earlier vector, twice ("twice is enough"):
    # without it the vectors lose orthogonality once a Ritz value converges, and copies of
    # the top eigenvalues ("ghosts") appear in T.
    for _ in range(2):
      w -= vectors[:j + 1].T @ (vectors[:j + 1] @ w)
    norm = float(np.linalg.norm(w))
    scale = max(scale, abs(alpha[-1]), norm)
    if j + 1 == order or norm <= 1e-12 * scale:
      break
    beta.append(norm)
    vectors[j + 1] = w / norm
  m = len(alpha)
  return Tridiagonal(np.array(alpha), np.array(beta[:m - 1]), vectors[:m])


def _ritz(tri: Tridiagonal) -> tuple[np.ndarray, np.ndarray]:
  # T's eigendecomposition, eigenvalues descending.
  t = np.diag(tri.alpha) + np.diag(tri.beta, 1) + np.diag(tri.beta, -1)
  values, vectors = np.linalg.eigh(t)
  return values[::-1], vectors[:, ::-1]


def eigenpairs(tri: Tridiagonal, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The top-k Ritz values (descending) and Ritz vectors (rows, unit norm, in parameter
  space) of one Lanczos run; fewer when the run was shorter than k."""
  values, vectors = _ritz(tri)
  k = min(k, values.size)
  return values[:k], vectors[:, :k].T @ tri.vectors


class Quadrature(NamedTuple):
  """SLQ's measure: per run, the Ritz values (nodes) and their weights, which sum to 1."""

  nodes: np.ndarray  # (runs, m)
  weights: np.ndarray  # (runs, m)


def quadrature(runs: list[Tridiagonal]) -> Quadrature:
  """The Gauss quadrature of each Lanczos run, padded with zero weights to one length."""
  if not runs:
    raise ValueError("quadrature needs at least one Lanczos run.")
  m = max(tri.alpha.size for tri in runs)
  nodes, weights = np.zeros((len(runs), m)), np.zeros((len(runs), m))
  for i, tri in enumerate(runs):
    values, vectors = _ritz(tri)
    nodes[i, :values.size] = values
    weights[i, :values.size] = vectors[0] ** 2
  return Quadrature(nodes, weights)


def moments(measure: Quadrature, powers: int) -> np.ndarray:
  """SLQ's estimates of tr(Hᵖ)/n for p = 0 … powers − 1 (each exact per run up to p = 2m − 1)."""
  return np.array([np.mean(np.sum(measure.weights * measure.nodes ** p, axis=1))
                   for p in range(powers)])


def spectral_density(measure: Quadrature, grid: np.ndarray, sigma: float) -> np.ndarray:
  """The eigenvalue density on `grid`: SLQ's measure averaged over runs, each node a
  Gaussian of standard deviation `sigma` (it integrates to 1 over the real line)."""
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma!r}.")
  grid = np.asarray(grid, np.float64)
  z = (grid[:, None, None] - measure.nodes[None]) / sigma
  bumps = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
  return np.mean(np.sum(measure.weights[None] * bumps, axis=2), axis=1)


def hutchinson_trace(matvec: MatVec, n: int, samples: int, seed: int) -> tuple[float, float]:
  """tr H estimated as the mean of zᵀHz over `samples` Rademacher vectors z; returns the
  estimate and its standard error."""
  if samples < 2:
    raise ValueError(f"samples must be >= 2 (for the standard error), got {samples}.")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(samples):
    z = rng.choice((-1.0, 1.0), size=n)
    values.append(float(z @ matvec(z)))
  return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(samples))


def gradient_concentration(gradient: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
  """For k = 1 … len(eigenvectors): ‖P_k g‖² / ‖g‖², P_k the projection onto the span of
  the first k (orthonormal) eigenvectors. 0 for a zero gradient."""
  g = np.asarray(gradient, np.float64)
  norm2 = float(g @ g)
  if norm2 == 0:
    return np.zeros(len(eigenvectors))
  return np.cumsum((np.asarray(eigenvectors) @ g) ** 2) / norm2


def outliers(top: np.ndarray, *, factor: float) -> int:
  """How many of the top eigenvalues (descending) lie more than `factor` times beyond the
  last of them, which stands for the bulk's edge: the count of isolated eigenvalues."""
  top = np.asarray(top)
  return int(np.sum(top > factor * abs(top[-1])))
