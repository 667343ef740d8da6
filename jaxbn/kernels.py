"""Batch normalization's passes over the activations, as fused C++ CPU kernels.

Each array is viewed as (outer, C, inner) — C features, reduced over outer and inner — with
C and inner given as static `Layout` (NHWC with axis=-1: (N·H·W, C, 1); NCHW with axis=1:
(N, C, H·W)). Per-feature vectors are in the compute dtype (float32 for float32/bfloat16
activations, float64 for float64). μ travels as a pair hi + lo, so that x − μ is formed as
(x − hi) − lo without cancellation (see `jaxbn._passes.shifted_moments`).

    moments(x)                          → hi, lo, M2 = Σ (x − μ)²      eqs. (1)-(2), one read of x
    normalize(x, hi, lo, a, b)          → ((x − hi) − lo)·a + b        eqs. (3)-(4)
    grad_sums(x, dy, hi, lo)            → Σ dy, Σ dy·(x − μ)           eqs. (5)-(6)
    grad_input(x, dy, hi, lo, a, b, k)  → a·dy + b + k·(x − μ)         closed form of (7)

and each direction whole, for a batch on one device (no pooling across devices), in one call:

    forward(x, γ, β)                    → y, hi, lo, var, 1/σ, m       eqs. (1)-(4)
    backward(x, dy, hi, lo, 1/σ, γ)     → dx, ∂L/∂γ, ∂L/∂β             eqs. (5)-(7)

The per-feature formulas between the passes are `jaxbn._per_feature`'s; the C++ repeats them.
Every kernel takes an optional mask shared by all features (padding: masked values take no
part in the statistics or sums, and their outputs are 0 whatever x holds).

Every kernel has a pure-JAX twin here (`*_xla`) that computes the same thing: the operands
viewed as (outer, C, inner), handed to `jaxbn._passes`, the passes every pure-JAX path runs.
The twins are the kernels' derivatives (a `jax.custom_jvp` takes the tangent of the twin, so
second-order derivatives through jaxbn's analytic backward still work), the tests' reference,
and what a call compiles to wherever the C++ must not run.

Where that is, only lowering knows, so each call is one `jaxbn.kernel` primitive whose
lowering decides: the C++ (an XLA FFI custom call) on CPU when the computation runs on one
device or per device (inside shard_map or pmap) and is not being exported, and the kernels
could be built (they are built then, on first use); the twin everywhere else — other
platforms, a batch that XLA partitions across devices (a custom call cannot be partitioned:
XLA would gather x onto every device), `jax.export` (the artifact then runs anywhere, without
jaxbn). `jaxbn._cpu_path` decides which calls are kernel calls at all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxbn import _native_build, _passes, _per_feature

__all__ = ["Layout", "available", "backward", "forward", "grad_input", "grad_sums",
           "known_status", "moments", "normalize", "status", "supports"]

# The dtypes the kernels are compiled for, as activations, dy and outputs.
DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float64))


class Layout(NamedTuple):
  """x viewed as (outer, features, inner); hashable, so it can be a static argument."""

  features: int
  inner: int


def status() -> _native_build.Status:
  """Whether the kernels can run in this process (building them on first use), and why not.

  Decided once per process; never raises (a failed build is an unavailable status, logged
  once as a WARNING with its fix, and every later call takes the pure-JAX path).
  """
  return _native_build.status()


def available() -> bool:
  return status().available


def known_status() -> _native_build.Status | None:
  """`status()` if this process knows it without a build (decided already, or the kernels are
  switched off by JAXBN_CPU_KERNEL), else None: the first CPU lowering of a kernel call will
  build them."""
  return _native_build.decided()


def supports(*dtypes) -> bool:
  return all(np.dtype(d) in DTYPES for d in dtypes)


def _attrs(layout: Layout) -> dict:
  return {"features": np.int64(layout.features), "inner": np.int64(layout.inner)}


def _count(x: jax.Array, layout: Layout) -> int:
  """m: the values behind each feature's statistics."""
  return x.size // layout.features


def _vector(x: jax.Array, layout: Layout) -> jax.ShapeDtypeStruct:
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  return jax.ShapeDtypeStruct((layout.features,), dtype)


# ---------------------------------------------------------------------------------------
# One primitive for every kernel call, so that the choice between the C++ and the twin is
# made at lowering, where JAX knows what it cannot know at trace time: the platform, whether
# the computation is partitioned across devices (an auto-mode mesh is invisible to tracing),
# whether it is being exported, and whether the kernels could be built.

# Not "jaxbn_…": that prefix names the FFI targets, which tests and users look for in HLO.
_kernel_p = Primitive("jaxbn.kernel")
_kernel_p.multiple_results = True


@dataclasses.dataclass(frozen=True)
class _Twin:
  """A kernel's pure-JAX twin, called with the kernel's own operands: the activations (x, or
  x and dy), the mask (empty for none), then the per-feature vectors. Frozen, so that it
  hashes by value as a primitive parameter (equal calls share jaxprs and compilations)."""

  fn: Callable
  layout: Layout
  activations: int
  options: tuple[tuple[str, Any], ...] = ()

  def __call__(self, *operands):
    mask, *vectors = operands[self.activations:]
    out = self.fn(self.layout, *operands[:self.activations], *vectors,
                  None if mask.size == 0 else mask, **dict(self.options))
    return tuple(out) if isinstance(out, tuple) else (out,)


def _call(target: str, results, twin: _Twin, *operands, force: bool, **attributes):
  # Under shard_map every operand and result must vary over the same manual mesh axes: x
  # varies, per-feature vectors that came out of a psum do not, so they are cast first.
  varying = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in operands))
  if varying:
    operands = tuple(_varying(a, varying) for a in operands)
  aval = jax.typeof(operands[0])
  sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())
  results = tuple(jax.typeof(jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=sharding,
                                                  manual_axis_type=aval.manual_axis_type))
                  for r in results)
  return _kernel_p.bind(*operands, target=target, results=results, twin=twin,
                        attributes=tuple(sorted({**_attrs(twin.layout), **attributes}.items())),
                        force=force)


_kernel_p.def_abstract_eval(lambda *avals, results, **_: results)


@functools.partial(jax.jit, static_argnames=("target", "results", "twin", "attributes",
                                             "force"))
def _run(*operands, target, results, twin, attributes, force):
  return _kernel_p.bind(*operands, target=target, results=results, twin=twin,
                        attributes=attributes, force=force)


def _impl(*operands, **params):
  # An eager call compiles its one primitive, as JAX's own primitives do; disable_jit(False)
  # because under jax.disable_jit() the jit would run _run eagerly, binding here again.
  with jax.disable_jit(False):
    return _run(*operands, **params)


_kernel_p.def_impl(_impl)


def _batch(operands, dims, **params):
  """vmap: one kernel call per instance (lax.map), each on its own (outer, C, inner) view —
  an instance's statistics are its own, so instances cannot share a call's reductions."""
  batched = [d is not None for d in dims]
  stacked = [jnp.moveaxis(v, d, 0) for v, d in zip(operands, dims) if d is not None]

  def one(instance):
    rows = iter(instance)
    return _kernel_p.bind(*(next(rows) if b else v for v, b in zip(operands, batched)),
                          **params)

  results = jax.lax.map(one, stacked)
  return results, [0] * len(results)


batching.primitive_batchers[_kernel_p] = _batch


def _lower_twin(ctx, *operands, twin, **_):
  return mlir.lower_fun(twin, multiple_results=True)(ctx, *operands)


def _lower_cpu(ctx, *operands, target, twin, attributes, force, **_):
  if not (force or _runs_unpartitioned(ctx.module_context)):
    return _lower_twin(ctx, *operands, twin=twin)
  status = _native_build.status()  # builds and registers the targets on first use
  if not status.available:
    if force:
      raise RuntimeError(f"jaxbn's CPU kernels are unavailable: {status.reason}")
    return _lower_twin(ctx, *operands, twin=twin)
  return jax.ffi.ffi_lowering(target)(ctx, *operands, **dict(attributes))


def _runs_unpartitioned(module_context) -> bool:
  """Whether a custom call lowered here sees whole operands, never a shard that XLA would
  first gather onto every device (it cannot partition a custom call), and is not bound for
  an exported artifact (which would need jaxbn's FFI targets wherever it runs).

  The axis context is duck-typed (jax._src.sharding_impls has no public API for it): an
  SPMDAxisContext (inside shard_map, and pmap, which JAX runs as shard_map) has a mesh and
  its manual axes — the operands are per-device there unless an axis of size > 1 is still
  automatic; a ShardingContext (jit) has only its device count. Anything else: the twin.
  """
  if getattr(module_context.lowering_parameters, "for_export", False):
    return False
  context = module_context.axis_context
  mesh = getattr(context, "mesh", None)
  if mesh is not None:
    manual = getattr(context, "manual_axes", frozenset())
    return all(name in manual or size == 1 for name, size in mesh.shape.items())
  return getattr(context, "num_devices", None) == 1


# Every platform but CPU compiles the twin; CPU decides per call site.
mlir.register_lowering(_kernel_p, _lower_twin)
mlir.register_lowering(_kernel_p, _lower_cpu, platform="cpu")


def _varying(value: jax.Array, axes: frozenset) -> jax.Array:
  missing = tuple(sorted(axes - jax.typeof(value).manual_axis_type.varying))
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def _with_twin_derivatives(kernel, twin, num_static: int = 2):
  """kernel's values, twin's derivatives: jvp (and so vjp) rules for a kernel call. The first
  `num_static` arguments (the layout, `force`, ...) are static for both."""
  fn = jax.custom_jvp(kernel, nondiff_argnums=tuple(range(num_static)))

  @fn.defjvp
  def _jvp(*args):
    *static, primals, tangents = args
    _, tangent_out = jax.jvp(functools.partial(twin, *static), primals, tangents)
    return kernel(*static, *primals), tangent_out

  return fn


def _without_force(twin):
  """twin as `_with_twin_derivatives` calls it: (layout, force, *arrays), force unused."""
  return lambda layout, force, *arrays: twin(layout, *arrays)


# ---------------------------------------------------------------------------------------
# Pure-JAX twins: the kernels' view of the operands, then `jaxbn._passes`' passes over it.

_AXES = (0, 2)  # outer and inner: the (outer, C, inner) view's batch axes


def _keep(mask, layout: Layout):
  """The mask as (outer, 1, inner), or None."""
  return None if mask is None else mask.reshape(-1, 1, layout.inner)


def _view(layout: Layout, x, mask, dtype):
  """x as (outer, C, inner) in `dtype`, padding zeroed, and the mask as (outer, 1, inner)."""
  keep = _keep(mask, layout)
  return _passes.masked(keep, x.reshape(-1, layout.features, layout.inner).astype(dtype)), keep


def _column(v: jax.Array) -> jax.Array:
  return v.reshape(1, -1, 1)


def _row(v: jax.Array, layout: Layout) -> jax.Array:
  return jnp.broadcast_to(v, (1, layout.features, 1)).reshape(layout.features)


def _counts(x, layout: Layout, mask, dtype):
  """m per feature: unmasked values (all of outer·inner without a mask)."""
  keep = _keep(mask, layout)
  shape = (_count(x, layout) // layout.inner, layout.features, layout.inner)
  return _row(_passes.local_count(shape, keep, _AXES, dtype), layout)


def moments_xla(layout: Layout, x: jax.Array, mask=None):
  x3, keep = _view(layout, x, mask, _vector(x, layout).dtype)
  count, m, hi, sum_d, sum_dd = _passes.shifted_moments(
      x3, keep, _passes.local_count(x3.shape, keep, _AXES, x3.dtype), _AXES)
  lo = sum_d / m  # a feature with no values: μ = 0, M2 = 0
  m2 = sum_dd - count * jnp.square(lo)
  return tuple(_row(v, layout) for v in (hi, lo, m2))


def normalize_xla(layout: Layout, x, hi, lo, a, b, mask=None, *, out_dtype=None):
  x3, keep = _view(layout, x, mask, hi.dtype)
  y = _passes.normalize(x3, *map(_column, (hi, lo, a, b)), keep)
  return y.reshape(x.shape).astype(out_dtype or x.dtype)


def grad_sums_xla(layout: Layout, x, dy, hi, lo, mask=None):
  (x3, keep), (g, _) = (_view(layout, v, mask, hi.dtype) for v in (x, dy))
  sums = _passes.grad_sums(g, _passes.centred(x3, _column(hi), _column(lo), keep), _AXES)
  return tuple(_row(v, layout) for v in sums)


def grad_input_xla(layout: Layout, x, dy, hi, lo, a, b, k, mask=None):
  (x3, keep), (g, _) = (_view(layout, v, mask, hi.dtype) for v in (x, dy))
  x_centred = _passes.centred(x3, _column(hi), _column(lo), keep)
  dx = _passes.grad_input(g, x_centred, *map(_column, (a, b, k)), keep)
  return dx.reshape(x.shape).astype(x.dtype)


def forward_xla(layout: Layout, x, scale, bias, mask=None, *, epsilon: float, out_dtype=None):
  hi, lo, m2 = moments_xla(layout, x, mask)
  count = _counts(x, layout, mask, hi.dtype)
  var = _per_feature.variance(m2, _passes.at_least_one(count))  # the C++'s M2/m
  inv_std = _per_feature.inverse_std(var, epsilon)
  y = normalize_xla(layout, x, hi, lo, scale * inv_std, bias, mask, out_dtype=out_dtype)
  return y, hi, lo, var, inv_std, count if mask is not None else count[:0]


def backward_xla(layout: Layout, x, dy, hi, lo, inv_std, scale, mask=None):
  sum_g, sum_g_centred = grad_sums_xla(layout, x, dy, hi, lo, mask)
  count = _passes.at_least_one(_counts(x, layout, mask, hi.dtype))
  d_scale, d_bias, a, b, k = _passes.gradient_coefficients(
      scale, inv_std, count, sum_g, sum_g_centred)
  return grad_input_xla(layout, x, dy, hi, lo, a, b, k, mask), d_scale, d_bias


# ---------------------------------------------------------------------------------------
# The kernels.


def _check(layout: Layout, x, dy=None, mask=None, **vectors):
  """The C++ trusts its operands' sizes and dtypes: check them here, at trace time."""
  if x.size % (layout.features * layout.inner):
    raise ValueError(f"x of shape {x.shape} does not split into (outer, {layout.features}, "
                     f"{layout.inner}).")
  if not supports(x.dtype) or (dy is not None and not supports(dy.dtype)):
    raise TypeError(f"the kernels take float32, bfloat16 or float64, got {x.dtype}"
                    + ("" if dy is None else f" and dy {dy.dtype}") + ".")
  if dy is not None and dy.shape != x.shape:
    raise ValueError(f"dy has shape {dy.shape}, x {x.shape}.")
  if mask is not None and (mask.dtype != jnp.bool_ or mask.size != _count(x, layout)):
    raise ValueError(f"mask must be boolean with one value per (outer, inner) position "
                     f"({_count(x, layout)}), got {mask.dtype}{list(mask.shape)}.")
  want = _vector(x, layout)
  for name, v in vectors.items():
    if v.shape != want.shape or v.dtype != want.dtype:
      raise ValueError(f"{name} must be {want.dtype}{list(want.shape)} for x of dtype "
                       f"{x.dtype}, got {v.dtype}{list(v.shape)}.")


def _check_out_dtype(out_dtype):
  if not supports(out_dtype):
    raise TypeError(f"the kernels write float32, bfloat16 or float64, got {out_dtype}.")


def _mask_operand(mask):
  # The FFI handlers take an empty mask for "no mask".
  return jnp.zeros((0,), jnp.bool_) if mask is None else mask.ravel()


_MASK_DOC = ("`mask` (optional): one bool per (outer, inner) position — x's shape with the "
             "feature axes set to 1 — shared by every feature; masked values take no part in "
             "the sums and their outputs are 0. ")
_FORCE_DOC = ("The C++ runs where the call is lowered for CPU on whole operands (one device, or "
              "per device under shard_map/pmap) and not for jax.export; elsewhere the twin "
              "is compiled in. `force=True`: the C++ in every CPU lowering (the caller "
              "asserts that x is not split across devices; an export then needs jaxbn's "
              "targets registered where it runs).")


def _moments_kernel(layout: Layout, force: bool, x, mask=None):
  _check(layout, x, mask=mask)
  v = _vector(x, layout)
  return tuple(_call("jaxbn_moments", (v, v, v), _Twin(moments_xla, layout, 1),
                     x, _mask_operand(mask), force=force))


_moments = _with_twin_derivatives(_moments_kernel, _without_force(moments_xla))


def moments(layout: Layout, x, mask=None, *, force: bool = False):
  """Per-feature (hi, lo, M2) of x: μ = hi + lo and M2 = Σ (x − μ)², eqs. (1)-(2)."""
  return _moments(layout, bool(force), x, mask)


def _grad_sums_kernel(layout: Layout, force: bool, x, dy, hi, lo, mask=None):
  _check(layout, x, dy, mask, hi=hi, lo=lo)
  v = _vector(x, layout)
  return tuple(_call("jaxbn_grad_sums", (v, v), _Twin(grad_sums_xla, layout, 2),
                     x, dy, _mask_operand(mask), hi, lo, force=force))


_grad_sums = _with_twin_derivatives(_grad_sums_kernel, _without_force(grad_sums_xla))


def grad_sums(layout: Layout, x, dy, hi, lo, mask=None, *, force: bool = False):
  """Per-feature Σ dy and Σ dy·(x − μ), eqs. (5)-(6) before the 1/σ."""
  return _grad_sums(layout, bool(force), x, dy, hi, lo, mask)


def _grad_input_kernel(layout: Layout, force: bool, x, dy, hi, lo, a, b, k, mask=None):
  _check(layout, x, dy, mask, hi=hi, lo=lo, a=a, b=b, k=k)
  return _call("jaxbn_grad_input", (jax.ShapeDtypeStruct(x.shape, x.dtype),),
               _Twin(grad_input_xla, layout, 2),
               x, dy, _mask_operand(mask), hi, lo, a, b, k, force=force)[0]


_grad_input = _with_twin_derivatives(_grad_input_kernel, _without_force(grad_input_xla))


def grad_input(layout: Layout, x, dy, hi, lo, a, b, k, mask=None, *, force: bool = False):
  """dx = a·dy + b + k·(x − μ), the closed form of eq. (7)."""
  return _grad_input(layout, bool(force), x, dy, hi, lo, a, b, k, mask)


def _normalize_kernel(layout: Layout, force: bool, out_dtype, x, hi, lo, a, b, mask=None):
  _check(layout, x, mask=mask, hi=hi, lo=lo, a=a, b=b)
  _check_out_dtype(out_dtype)
  twin = _Twin(normalize_xla, layout, 1, (("out_dtype", out_dtype),))
  return _call("jaxbn_normalize", (jax.ShapeDtypeStruct(x.shape, out_dtype),), twin,
               x, _mask_operand(mask), hi, lo, a, b, force=force)[0]


_normalize = _with_twin_derivatives(
    _normalize_kernel, lambda layout, force, out_dtype, *arrays: normalize_xla(
        layout, *arrays, out_dtype=out_dtype), num_static=3)


def normalize(layout: Layout, x, hi, lo, a, b, mask=None, *, out_dtype=None,
              force: bool = False):
  """y = ((x − hi) − lo)·a + b in `out_dtype` (default x's), eqs. (3)-(4)."""
  return _normalize(layout, bool(force), np.dtype(out_dtype or x.dtype), x, hi, lo, a, b, mask)


def _forward_kernel(layout: Layout, force: bool, epsilon: float, out_dtype, x, scale, bias,
                    mask=None):
  _check(layout, x, mask=mask, scale=scale, bias=bias)
  _check_out_dtype(out_dtype)
  v = _vector(x, layout)
  count = v if mask is not None else jax.ShapeDtypeStruct((0,), v.dtype)
  twin = _Twin(forward_xla, layout, 1, (("epsilon", epsilon), ("out_dtype", out_dtype)))
  return tuple(_call("jaxbn_forward",
                     (jax.ShapeDtypeStruct(x.shape, out_dtype), v, v, v, v, count), twin,
                     x, _mask_operand(mask), scale, bias, force=force,
                     epsilon=np.float64(epsilon)))


_forward = _with_twin_derivatives(
    _forward_kernel, lambda layout, force, epsilon, out_dtype, *arrays: forward_xla(
        layout, *arrays, epsilon=epsilon, out_dtype=out_dtype), num_static=4)


def forward(layout: Layout, x, scale, bias, mask=None, *, epsilon: float, out_dtype=None,
            force: bool = False):
  """The training forward of a batch on one device, eqs. (1)-(4), in one call.

  Returns (y, hi, lo, var, inv_std, count): y = γ(x − μ)/σ + β in `out_dtype` (default x's),
  μ as hi + lo, the biased variance without ε, 1/σ, and with a mask m, the values behind each
  feature's statistics (empty without one: m is then x.size / features). `scale` (γ) and
  `bias` (β) are per-feature vectors in the compute dtype.
  """
  return _forward(layout, bool(force), float(epsilon), np.dtype(out_dtype or x.dtype),
                  x, scale, bias, mask)


def _backward_kernel(layout: Layout, force: bool, x, dy, hi, lo, inv_std, scale, mask=None):
  _check(layout, x, dy, mask, hi=hi, lo=lo, inv_std=inv_std, scale=scale)
  v = _vector(x, layout)
  return tuple(_call("jaxbn_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), v, v),
                     _Twin(backward_xla, layout, 2),
                     x, dy, _mask_operand(mask), hi, lo, inv_std, scale, force=force))


_backward = _with_twin_derivatives(_backward_kernel, _without_force(backward_xla))


def backward(layout: Layout, x, dy, hi, lo, inv_std, scale, mask=None, *, force: bool = False):
  """(dx, ∂L/∂γ, ∂L/∂β) of a batch on one device from x, dy, μ = hi + lo, 1/σ and γ,
  eqs. (5)-(7), in one call; dx has x's dtype."""
  return _backward(layout, bool(force), x, dy, hi, lo, inv_std, scale, mask)


for _function in (moments, grad_sums, grad_input, normalize, forward, backward):
  _function.__doc__ = _function.__doc__.rstrip() + "\n\n" + _MASK_DOC + _FORCE_DOC
