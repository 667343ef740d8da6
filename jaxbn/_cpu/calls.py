"""The C++ CPU kernels as JAX functions: operands checked at trace time, one `jaxbn.kernel`
primitive bound per call (`jaxbn._cpu.primitive`), derivatives from the pure-JAX twins
(`jaxbn._cpu.twins`); and whether the kernels can run here.

Called by `jaxbn._cpu.path`; `jaxbn.kernels` is their public face, and its docstring says what
each kernel computes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._cpu import library, twins
from jaxbn._cpu.primitive import Twin, call
from jaxbn._records import FeatureView

# The dtypes the kernels are compiled for, as activations, dy and outputs.
DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float64))


def status() -> library.Status:
  """Whether the kernels can run in this process (building them on first use), and why not.

  Decided once per process; never raises (a failed build is an unavailable status, logged
  once as a WARNING with its fix, and every later call takes the pure-JAX path).
  """
  return library.status()


def available() -> bool:
  return status().available


def known_status() -> library.Status | None:
  """`status()` if this process knows it without a build (decided already, or the kernels are
  switched off by JAXBN_CPU_KERNEL), else None: the first CPU lowering of a kernel call will
  build them."""
  return library.decided()


def supports(*dtypes) -> bool:
  return all(np.dtype(d) in DTYPES for d in dtypes)


def _with_twin_derivatives(kernel, twin, num_static: int = 2):
  """The kernel where the call is not differentiated, its twin where it is: jvp (and so vjp)
  rules for a kernel call. The first `num_static` arguments (the view, `force`, ...) are
  static for both.

  A differentiated call (second order through the analytic backward) takes its values from
  the twin too: XLA fuses them with the twin's tangents, where a kernel call beside them
  would be work done twice."""
  fn = jax.custom_jvp(kernel, nondiff_argnums=tuple(range(num_static)))

  @fn.defjvp
  def _jvp(*args):
    *static, primals, tangents = args
    return jax.jvp(functools.partial(twin, *static), primals, tangents)

  return fn


def _without_force(twin):
  """twin as `_with_twin_derivatives` calls it: (view, force, *arrays), force unused."""
  return lambda view, force, *arrays: twin(view, *arrays)


def _check(view: FeatureView, x, dy=None, mask=None, **vectors):
  """The C++ trusts its operands' sizes and dtypes: check them here, at trace time."""
  if x.size % (view.features * view.inner):
    raise ValueError(f"x of shape {x.shape} does not split into (outer, {view.features}, "
                     f"{view.inner}).")
  if not supports(x.dtype) or (dy is not None and not supports(dy.dtype)):
    raise TypeError(f"the kernels take float32, bfloat16 or float64, got {x.dtype}"
                    + ("" if dy is None else f" and dy {dy.dtype}") + ".")
  if dy is not None and dy.shape != x.shape:
    raise ValueError(f"dy has shape {dy.shape}, x {x.shape}.")
  if mask is not None and (mask.dtype != jnp.bool_ or mask.size != view.count(x)):
    raise ValueError(f"mask must be boolean with one value per (outer, inner) position "
                     f"({view.count(x)}), got {mask.dtype}{list(mask.shape)}.")
  want = view.vector(x)
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


def _moments_kernel(view: FeatureView, force: bool, x, mask=None):
  _check(view, x, mask=mask)
  v = view.vector(x)
  return tuple(call("jaxbn_moments", (v, v, v), Twin(twins.moments_xla, view, 1),
                    x, _mask_operand(mask), force=force))


_moments = _with_twin_derivatives(_moments_kernel, _without_force(twins.moments_xla))


def moments(view: FeatureView, x, mask=None, *, force: bool = False):
  """Per-feature (hi, lo, M2) of x: μ = hi + lo and M2 = Σ (x − μ)², eqs. (1)-(2)."""
  return _moments(view, bool(force), x, mask)


def _grad_sums_kernel(view: FeatureView, force: bool, x, dy, hi, lo, mask=None):
  _check(view, x, dy, mask, hi=hi, lo=lo)
  v = view.vector(x)
  return tuple(call("jaxbn_grad_sums", (v, v), Twin(twins.grad_sums_xla, view, 2),
                    x, dy, _mask_operand(mask), hi, lo, force=force))


_grad_sums = _with_twin_derivatives(_grad_sums_kernel, _without_force(twins.grad_sums_xla))


def grad_sums(view: FeatureView, x, dy, hi, lo, mask=None, *, force: bool = False):
  """Per-feature Σ dy and Σ dy·(x − μ), eqs. (5)-(6) before the 1/σ."""
  return _grad_sums(view, bool(force), x, dy, hi, lo, mask)


def _grad_input_kernel(view: FeatureView, force: bool, x, dy, hi, lo, a, b, k, mask=None):
  _check(view, x, dy, mask, hi=hi, lo=lo, a=a, b=b, k=k)
  return call("jaxbn_grad_input", (jax.ShapeDtypeStruct(x.shape, x.dtype),),
              Twin(twins.grad_input_xla, view, 2),
              x, dy, _mask_operand(mask), hi, lo, a, b, k, force=force)[0]


_grad_input = _with_twin_derivatives(_grad_input_kernel, _without_force(twins.grad_input_xla))


def grad_input(view: FeatureView, x, dy, hi, lo, a, b, k, mask=None, *, force: bool = False):
  """dx = a·dy + b + k·(x − μ), the closed form of eq. (7)."""
  return _grad_input(view, bool(force), x, dy, hi, lo, a, b, k, mask)


def _normalize_kernel(view: FeatureView, force: bool, out_dtype, x, hi, lo, a, b, mask=None):
  _check(view, x, mask=mask, hi=hi, lo=lo, a=a, b=b)
  _check_out_dtype(out_dtype)
  twin = Twin(twins.normalize_xla, view, 1, (("out_dtype", out_dtype),))
  return call("jaxbn_normalize", (jax.ShapeDtypeStruct(x.shape, out_dtype),), twin,
              x, _mask_operand(mask), hi, lo, a, b, force=force)[0]


_normalize = _with_twin_derivatives(
    _normalize_kernel, lambda view, force, out_dtype, *arrays: twins.normalize_xla(
        view, *arrays, out_dtype=out_dtype), num_static=3)


def normalize(view: FeatureView, x, hi, lo, a, b, mask=None, *, out_dtype=None,
              force: bool = False):
  """y = ((x − hi) − lo)·a + b in `out_dtype` (default x's), eqs. (3)-(4)."""
  return _normalize(view, bool(force), np.dtype(out_dtype or x.dtype), x, hi, lo, a, b, mask)


def _forward_kernel(view: FeatureView, force: bool, epsilon: float, out_dtype, x, scale, bias,
                    mask=None):
  _check(view, x, mask=mask, scale=scale, bias=bias)
  _check_out_dtype(out_dtype)
  v = view.vector(x)
  count = v if mask is not None else jax.ShapeDtypeStruct((0,), v.dtype)
  twin = Twin(twins.forward_xla, view, 1, (("epsilon", epsilon), ("out_dtype", out_dtype)))
  return tuple(call("jaxbn_forward",
                    (jax.ShapeDtypeStruct(x.shape, out_dtype), v, v, v, v, count), twin,
                    x, _mask_operand(mask), scale, bias, force=force,
                    epsilon=np.float64(epsilon)))


_forward = _with_twin_derivatives(
    _forward_kernel, lambda view, force, epsilon, out_dtype, *arrays: twins.forward_xla(
        view, *arrays, epsilon=epsilon, out_dtype=out_dtype), num_static=4)


def forward(view: FeatureView, x, scale, bias, mask=None, *, epsilon: float, out_dtype=None,
            force: bool = False):
  """The training forward of a batch on one device, eqs. (1)-(4), in one call.

  Returns (y, hi, lo, var, inv_std, count): y = γ(x − μ)/σ + β in `out_dtype` (default x's),
  μ as hi + lo, the biased variance without ε, 1/σ, and with a mask m, the values behind each
  feature's statistics (empty without one: m is then x.size / features). `scale` (γ) and
  `bias` (β) are per-feature vectors in the compute dtype.
  """
  return _forward(view, bool(force), float(epsilon), np.dtype(out_dtype or x.dtype),
                  x, scale, bias, mask)


def _backward_kernel(view: FeatureView, force: bool, x, dy, hi, lo, inv_std, scale, mask=None):
  _check(view, x, dy, mask, hi=hi, lo=lo, inv_std=inv_std, scale=scale)
  v = view.vector(x)
  return tuple(call("jaxbn_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), v, v),
                    Twin(twins.backward_xla, view, 2),
                    x, dy, _mask_operand(mask), hi, lo, inv_std, scale, force=force))


_backward = _with_twin_derivatives(_backward_kernel, _without_force(twins.backward_xla))


def backward(view: FeatureView, x, dy, hi, lo, inv_std, scale, mask=None, *,
             force: bool = False):
  """(dx, ∂L/∂γ, ∂L/∂β) of a batch on one device from x, dy, μ = hi + lo, 1/σ and γ,
  eqs. (5)-(7), in one call; dx has x's dtype."""
  return _backward(view, bool(force), x, dy, hi, lo, inv_std, scale, mask)


for _function in (moments, grad_sums, grad_input, normalize, forward, backward):
  _function.__doc__ = _function.__doc__.rstrip() + "\n\n" + _MASK_DOC + _FORCE_DOC
