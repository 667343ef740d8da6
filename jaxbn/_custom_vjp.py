"""What the analytic backward's `jax.custom_vjp` needs from the JAX around it: forward mode
refused with its fix named, and replicated inputs cast to varying under shard_map, so that
their per-device cotangents are summed. Called by `jaxbn.ops.batch_norm` before the custom_vjp.
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
from jax import lax

try:  # private: only to name the fix when forward mode meets the custom_vjp
  from jax._src.interpreters.ad import JVPTracer as _JVPTracer
except ImportError:  # pragma: no cover - a JAX without it gets JAX's own error
  _JVPTracer = None


def refuse_forward_mode(*arrays: jax.Array) -> None:
  """Forward mode (jax.jvp, jax.jacfwd) cannot pass a custom_vjp; JAX's own error says so
  but not what to do, so a call traced for it fails here, naming the fix.

  Only a top-level JVP tracer is refused: under reverse mode (grad, vjp, and the outer jvp
  of a Hessian, which JAX runs on the linearized program) the inputs are linearize tracers.
  With the legacy `jax_use_direct_linearize=False`, reverse mode itself runs on JVP tracers,
  so nothing is refused there and JAX reports forward mode in its own words.
  """
  if _JVPTracer is None or not jax.config.jax_use_direct_linearize:
    return
  if any(isinstance(a, _JVPTracer) for a in arrays):
    raise TypeError(
        "jaxbn.batch_norm(gradient='analytic') is a jax.custom_vjp, which JAX cannot "
        "differentiate in forward mode (jax.jvp, jax.jacfwd); pass "
        "gradient='autodiff' (the same forward, differentiated by JAX) for forward mode.")


def device_varying(value: jax.Array, axis_name: Hashable | None) -> jax.Array:
  """Marks a replicated input as varying over `axis_name`'s manual (shard_map) axes.

  The analytic backward returns this device's ∂L/∂γ; under shard_map a replicated γ needs a
  replicated cotangent. Casting γ to varying first makes JAX sum the per-device cotangents
  when it transposes the cast — exactly what its autodiff does for the uncast forward.
  """
  if axis_name is None:
    return value
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  varying = jax.typeof(value).manual_axis_type.varying
  missing = tuple(n for n in names if n in manual and n not in varying)
  return lax.pcast(value, missing, to="varying") if missing else value
