"""Second order: one Hessian-vector product through the BN layer against Flax's BatchNorm under
autodiff, beside the same run's forward + backward, so the two ratios to Flax compare.

The loss is ½ Σ (c ⊙ y)², c a fixed random array: not linear in y, so its Hessian holds BN's
own second derivative. The product with v = (v_x, v_γ) is taken in (x, γ) two ways:
reverse-over-reverse, ∇⟨∇L, v⟩, and forward-over-reverse, the jvp of ∇L along v. JAX refuses
forward mode on jaxbn's analytic `batch_norm` itself (a custom_vjp), but not over its
gradient: reverse mode applies the custom rule first, and the outer jvp then runs through the
backward's ordinary operations. Before any timing, the parent process compares every product
with Flax's reverse-over-reverse one at every shape and dtype, and stops where they differ in
float32. Each
implementation then runs in its own process (`python -m benchmarks.hvp --worker NAME`), timed
as the op benchmark times its rows (`benchmarks.ops.alternate`). benchmarks/main.py runs it as
the "hvp" section.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from benchmarks import ops
from experiments.core import config as config_lib

IMPLEMENTATIONS = ("jaxbn analytic", "jaxbn analytic, pure JAX", "flax.linen")  # ops.FORWARDS
METHODS = ("rev-over-rev", "fwd-over-rev")
KINDS = ("fwd+bwd", *METHODS)
DTYPES = ("float32", "bfloat16")
# Largest |difference| over largest |value| of each product against Flax's, refused above this
# in float32. bfloat16's is reported only: jaxbn's y is bfloat16 there and Flax's float32.
FLOAT32_TOLERANCE = 1e-3


def validate(config) -> None:
  """Refuses, before any work, a dtype or shape the section cannot run."""
  for dtype in config.hvp_dtypes:
    if dtype not in DTYPES:
      raise config_lib.ConfigError(f"config.hvp_dtypes: {dtype!r} is not one of {DTYPES}")
  for shape in config.hvp_shapes:
    if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
      raise config_lib.ConfigError(
          f"config.hvp_shapes: {tuple(shape)!r} is not a batch of features (two or more "
          "positive sizes, features last)")


def loss(forward: Callable, x, scale, bias, c):
  """½ Σ (c ⊙ y)² in float32 or wider, y the layer's output (features last)."""
  y = forward(x, scale, bias, -1)
  y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
  return 0.5 * jnp.sum(jnp.square(c * y))


def hvp_step(forward: Callable, method: str = "rev-over-rev") -> Callable:
  """(x, γ, β, c, v_x, v_γ) -> (H v)_x, (H v)_γ for the Hessian of `loss` in (x, γ), jitted,
  by `method` (one of METHODS)."""

  @jax.jit
  def step(x, scale, bias, c, vx, vs):
    gradient = jax.grad(lambda x, s: loss(forward, x, s, bias, c), (0, 1))
    if method == "fwd-over-rev":
      return jax.jvp(gradient, (x, scale), (vx, vs))[1]

    def directional(x, scale):  # ⟨∇L, v⟩, in float32 whatever x's dtype
      gx, gs = gradient(x, scale)
      return (jnp.vdot(gx.astype(jnp.float32), vx.astype(jnp.float32))
              + jnp.vdot(gs.astype(jnp.float32), vs))
    return jax.grad(directional, (0, 1))(x, scale)
  return step


def inputs(shape, dtype, seed=0):
  """x, γ, β, c, v_x, v_γ. γ and β are not 1 and 0, so that the check sees them."""
  rng = np.random.default_rng(seed)
  c = shape[-1]

  def normal(size, loc=0.0, spread=1.0, dt=jnp.float32):
    return jnp.asarray(rng.standard_normal(size, np.float32) * spread + loc, dt)
  return (normal(shape, 1.0, 2.0, dtype), normal((c,), 1.0, 0.2), normal((c,), 0.0, 0.2),
          normal(shape), normal(shape, dt=dtype), normal((c,)))


def disagreement(shape, dtype) -> float:
  """The largest relative difference of every product (each implementation, each method) from
  Flax's reverse-over-reverse one."""
  args = inputs(shape, dtype)
  products = {(name, method): hvp_step(ops.FORWARDS[name], method)(*args)
              for name in IMPLEMENTATIONS for method in METHODS}
  flax_product = products.pop(("flax.linen", "rev-over-rev"))
  worst = 0.0
  for product in products.values():
    for ours, theirs in zip(product, flax_product):
      ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
      worst = max(worst, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))
  return worst


def _runner(name: str, case: dict) -> tuple[Callable, float]:
  shape, dtype = tuple(case["shape"]), case["dtype"]
  start = time.perf_counter()
  x, scale, bias, c, vx, vs = inputs(shape, dtype)
  if case["kind"] == "fwd+bwd":  # the op benchmark's row: y, dx, dγ, dβ from a given dy
    args = (x, scale, bias, c.astype(x.dtype))
    compiled = ops.training_step(ops.FORWARDS[name]).lower(*args).compile()
  else:
    args = (x, scale, bias, c, vx, vs)
    compiled = hvp_step(ops.FORWARDS[name], case["kind"]).lower(*args).compile()
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def time_hvp(shapes, dtypes, repeats: int, settle_s: float = 0.02,
             sample_s: float = 0.02) -> list[dict]:
  """Checks the products agree, then times fwd+bwd and both HVPs of every implementation at
  every shape and dtype. One row per (shape, dtype, implementation): the times in ms (keys
  "<kind>_ms"), and the case's disagreement (the same in each of its rows)."""
  differences = {}
  for dtype in dtypes:
    for shape in shapes:
      differences[shape, dtype] = disagreement(shape, dtype)
      gc.collect()
      if dtype == "float32" and differences[shape, dtype] > FLOAT32_TOLERANCE:
        raise RuntimeError(f"Hessian-vector products at {shape} float32 differ from Flax's by "
                           f"{differences[shape, dtype]:.2g} relative (> {FLOAT32_TOLERANCE})")
  cases = [{"shape": list(s), "dtype": d, "kind": k} for d in dtypes for s in shapes
           for k in KINDS]
  results = ops.alternate("benchmarks.hvp", IMPLEMENTATIONS, cases, repeats, settle_s, sample_s)
  rows = {}
  for result in results:
    case = result["case"]
    shape = tuple(case["shape"])
    row = rows.setdefault((shape, case["dtype"], result["implementation"]), {
        "shape": "x".join(map(str, shape)), "dtype": case["dtype"],
        "implementation": result["implementation"],
        "max_rel_diff": differences[shape, case["dtype"]]})
    row[f"{case['kind']}_ms"] = 1e3 * result["median_s"]
    row[f"{case['kind']}_rounds_ms"] = [1e3 * s for s in result["samples"]]
    row[f"{case['kind']}_compile_s"] = result["compile_s"]
  return list(rows.values())


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"Hessian-vector products in (x, γ) of L = ½ Σ (c ⊙ y)², reverse-over-reverse "
           f"(∇⟨∇L, v⟩) and forward-over-reverse (jvp of ∇L), beside forward + backward (y, "
           f"dx, dγ, dβ) timed in the same run; medians over {meta['repeats']} rounds, each "
           "implementation in its own process. Max rel. diff: every product against Flax's "
           "reverse-over-reverse one, checked before timing.", "",
           "| shape | dtype | implementation | fwd+bwd ms | rev-over-rev ms | fwd-over-rev ms "
           "| rev-over-rev / fwd+bwd | compile s (rev-over-rev) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['dtype']} | {r['implementation']} | "
                 f"{r['fwd+bwd_ms']:.3f} | {r['rev-over-rev_ms']:.3f} | "
                 f"{r['fwd-over-rev_ms']:.3f} | {r['rev-over-rev_ms'] / r['fwd+bwd_ms']:.2f} | "
                 f"{r['rev-over-rev_compile_s']:.2f} |")
  lines += ["", "jaxbn analytic (the C++ kernels) against the others (> 1: jaxbn is faster):",
            "", "| shape | dtype | fwd+bwd vs flax.linen | HVP vs flax.linen, rev-over-rev "
            "| fwd-over-rev | fwd+bwd vs pure JAX | HVP vs pure JAX, rev-over-rev "
            "| fwd-over-rev | max rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
  by = {(r["shape"], r["dtype"], r["implementation"]): r for r in rows}
  for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
    ours = by[shape, dtype, "jaxbn analytic"]
    ratios = [f"{by[shape, dtype, name][kind + '_ms'] / ours[kind + '_ms']:.2f}x"
              for name in ("flax.linen", "jaxbn analytic, pure JAX") for kind in KINDS]
    lines.append(f"| {shape} | {dtype} | {' | '.join(ratios)} | {ours['max_rel_diff']:.1e} |")
  return "\n".join(lines) + "\n"


def _worker_main():
  """`python -m benchmarks.hvp --worker NAME`: serves implementation NAME."""
  name = sys.argv[sys.argv.index("--worker") + 1]
  logging.set_verbosity(logging.WARNING)
  ops.serve(lambda case: _runner(name, case))


if __name__ == "__main__":
  _worker_main()
