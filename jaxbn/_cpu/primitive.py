"""The `jaxbn.kernel` primitive: one kernel call, lowered to the C++ or to its pure-JAX twin.

Called by `jaxbn._cpu.calls`, whose every kernel call binds it. The choice between the C++ (an
XLA FFI custom call) and the twin is made at lowering, where JAX knows what it cannot know at
trace time: the platform, whether the computation is partitioned across devices (an auto-mode
mesh is invisible to tracing), whether it is being exported, and whether the kernels could be
built (`jaxbn._cpu.library`, which builds them then, on first use). The C++ runs on CPU when
the computation runs on one device or per device (inside shard_map or pmap) and is not being
exported; the twin everywhere else — other platforms, a batch that XLA partitions across
devices (a custom call cannot be partitioned: XLA would gather x onto every device),
`jax.export` (the artifact then runs anywhere, without jaxbn).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxbn._cpu import library
from jaxbn._records import FeatureView

# Not "jaxbn_…": that prefix names the FFI targets, which tests and users look for in HLO.
_kernel_p = Primitive("jaxbn.kernel")
_kernel_p.multiple_results = True


@dataclasses.dataclass(frozen=True)
class Twin:
  """A kernel's pure-JAX twin, called with the kernel's own operands: the activations (x, or
  x and dy), the mask (empty for none), then the per-feature vectors. Frozen, so that it
  hashes by value as a primitive parameter (equal calls share jaxprs and compilations)."""

  fn: Callable
  view: FeatureView
  activations: int
  options: tuple[tuple[str, Any], ...] = ()

  def __call__(self, *operands):
    mask, *vectors = operands[self.activations:]
    out = self.fn(self.view, *operands[:self.activations], *vectors,
                  None if mask.size == 0 else mask, **dict(self.options))
    return tuple(out) if isinstance(out, tuple) else (out,)


def _attrs(view: FeatureView) -> dict:
  return {"features": np.int64(view.features), "inner": np.int64(view.inner)}


def call(target: str, results, twin: Twin, *operands, force: bool, **attributes):
  """Binds one kernel call: FFI `target` with `results` (ShapeDtypeStructs) on `operands`,
  lowered to the C++ or to `twin`; `force`: the C++ in every CPU lowering."""
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
                        attributes=tuple(sorted({**_attrs(twin.view), **attributes}.items())),
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


def _jvp(primals, tangents, *, twin, **params):
  """The twin's values and derivatives: the rule `calls` gives each call as a custom_jvp,
  here for the bare primitive, which is what JAX differentiates where it differentiates a
  jaxpr already traced (a loop body under lax.map or lax.scan, a checkpointed function): a
  Hessian-vector product through the analytic backward there."""
  del params
  floating = [i for i, p in enumerate(primals) if jnp.issubdtype(p.dtype, jnp.inexact)]

  def on_floating(*values):
    operands = list(primals)
    for i, value in zip(floating, values):
      operands[i] = value
    return twin(*operands)

  out, tangents_out = jax.jvp(on_floating, [primals[i] for i in floating],
                              [ad.instantiate_zeros(tangents[i]) for i in floating])
  return list(out), list(tangents_out)


ad.primitive_jvps[_kernel_p] = _jvp


# Instances above this many values of x, when they cannot be folded into one call, run as one
# kernel call each (lax.map); smaller ones as the twin, vmapped. Under vmap with axis_name (one
# example per instance, pooled by a psum over the vmapped axis, as Equinox calls BN) XLA fuses
# the twin's reductions across instances: measured on a 2-core AMD EPYC, per-instance kernel
# calls were 1.2-4x slower than the vmapped twin at every size up to 8e5 values per instance.
MAX_TWIN_INSTANCE_SIZE = 1 << 20


def _batch(operands, dims, *, twin, results, attributes, **params):
  """vmap of a kernel call. An instance's statistics are its own, so instances cannot share a
  call's reductions as they stand; but where an instance's view has no outer axis (outer = 1:
  one example (C, *spatial) with the features first, as Equinox's layer sees it), the batch
  of B instances is x viewed as (1, B·C, inner): one call with B·C features. Elsewhere the
  twin, vmapped, or for large instances (or `force`: use_cpu_kernel=True) one call per
  instance (lax.map)."""
  first = next(i for i, d in enumerate(dims) if d is not None)
  size = operands[first].shape[dims[first]]
  x_instance_size = (operands[0].size if dims[0] is None
                     else operands[0].size // operands[0].shape[dims[0]])
  mask = operands[twin.activations]
  outer = x_instance_size // (twin.view.features * twin.view.inner)
  mask_shared = mask.size == 0 or dims[twin.activations] is None
  if first < twin.activations and outer == 1 and twin.view.inner > 1 and mask_shared:
    return _batch_as_features(operands, dims, size, twin=twin, results=results,
                              attributes=attributes, **params)
  if x_instance_size <= MAX_TWIN_INSTANCE_SIZE and not params["force"]:
    out = jax.vmap(twin, in_axes=tuple(dims))(*operands)
    return list(out), [0] * len(out)
  params = dict(params, twin=twin, results=results, attributes=attributes)
  batched = [d is not None for d in dims]
  stacked = [jnp.moveaxis(v, d, 0) for v, d in zip(operands, dims) if d is not None]

  def one(instance):
    rows = iter(instance)
    return _kernel_p.bind(*(next(rows) if b else v for v, b in zip(operands, batched)),
                          **params)

  out = jax.lax.map(one, stacked)
  return out, [0] * len(out)


def _batch_as_features(operands, dims, size, *, twin, results, attributes, **params):
  """One call on B instances of view (1, C, inner): activations (B, ...) read as
  (1, B·C, inner), per-feature vectors (B, C) flattened (broadcast first where every instance
  shares one), a shared mask as it is; results back as (B, ...) and (B, C)."""
  features = size * twin.view.features
  view = FeatureView(features=features, inner=twin.view.inner)
  folded = []
  for i, (v, d) in enumerate(zip(operands, dims)):
    if i < twin.activations:  # x, dy: the batch axis first
      folded.append(jnp.broadcast_to(v, (size, *v.shape)) if d is None else jnp.moveaxis(v, d, 0))
    elif i == twin.activations:  # the mask: shared (checked by the caller)
      folded.append(v)
    else:  # per-feature vectors
      v = jnp.broadcast_to(v, (size, *v.shape)) if d is None else jnp.moveaxis(v, d, 0)
      folded.append(v.reshape(features))
  x = folded[0]

  def whole(r):
    if r.shape == x.shape[1:]:
      return r.update(shape=x.shape)
    if r.shape == (twin.view.features,):
      return r.update(shape=(features,))
    return r  # an empty count (no mask)

  new_results = tuple(whole(r) for r in results)
  new_attributes = tuple(sorted({**dict(attributes), **_attrs(view)}.items()))
  out = _kernel_p.bind(*folded, twin=dataclasses.replace(twin, view=view),
                       results=new_results, attributes=new_attributes, **params)
  out = [o.reshape(size, twin.view.features) if r.shape == (twin.view.features,) else o
         for o, r in zip(out, results)]
  return out, [0 if r.shape != (0,) else None for r in results]


batching.primitive_batchers[_kernel_p] = _batch


def _lower_twin(ctx, *operands, twin, **_):
  return mlir.lower_fun(twin, multiple_results=True)(ctx, *operands)


def _lower_cpu(ctx, *operands, target, twin, attributes, force, **_):
  if not (force or _runs_unpartitioned(ctx.module_context)):
    return _lower_twin(ctx, *operands, twin=twin)
  status = library.status()  # builds and registers the targets on first use
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
