"""PyTorch BatchNorm state in and out, and folding an eval-mode BN into the layer before it.

Conventions (the part users trip over):

| | running variance stored | momentum means | default |
|---|---|---|---|
| jaxbn / Flax | biased (1/m) | weight of the *old* value | 0.99 |
| PyTorch | unbiased (1/(m − 1)) | weight of the *new* value | 0.1 (= 0.9 here) |

So PyTorch's `momentum=0.1` is `momentum=0.9` here, PyTorch's `momentum=None` (cumulative
average) is `momentum=None` here, and PyTorch's variance convention is
`unbiased_running_var=True`. In eval mode both use whatever variance is stored, so a
converted state gives the same outputs in either convention; the convention only decides
how later training updates it. Nothing here imports torch: tensors are read with
`.detach().cpu().numpy()` when they have it, and written as NumPy arrays for
`torch.as_tensor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fold_batch_norm", "from_torch", "module_kwargs_from_torch", "to_torch"]

Layout = Literal["NCHW", "NHWC"]


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def from_torch(state: Mapping[str, Any], *, dtype: Any = np.float32) -> dict[str, Any]:
  """A `torch.nn.BatchNorm*d` state_dict as jaxbn (and Flax) linen variables.

  Args:
    state: with `running_mean`, `running_var` and, for an affine BN, `weight` and `bias`;
      `num_batches_tracked`, when present, becomes `batch_stats/count` (used by
      `momentum=None`).
    dtype: dtype of the returned arrays.

  Returns:
    `{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"[, "count"]}}`.
  """
  missing = [k for k in ("running_mean", "running_var") if k not in state]
  if missing:
    raise KeyError(f"torch BatchNorm state lacks {missing} (track_running_stats=False?).")
  batch_stats = {
      "mean": jnp.asarray(_numpy(state["running_mean"]), dtype),
      "var": jnp.asarray(_numpy(state["running_var"]), dtype),
  }
  if "num_batches_tracked" in state:
    batch_stats["count"] = jnp.asarray(_numpy(state["num_batches_tracked"]), jnp.int32)
  variables: dict[str, Any] = {"batch_stats": batch_stats}
  if "weight" in state:
    variables["params"] = {
        "scale": jnp.asarray(_numpy(state["weight"]), dtype),
        "bias": jnp.asarray(_numpy(state["bias"]), dtype),
    }
  features = batch_stats["mean"].shape
  for collection in variables.values():
    for name, value in collection.items():
      if name != "count" and value.shape != features:
        raise ValueError(f"torch state {name} has shape {value.shape}, expected {features}.")
  return variables


def to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """jaxbn/Flax linen variables as a `torch.nn.BatchNorm*d` state_dict of NumPy arrays.

  Load it with `bn.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})`.
  """
  stats = variables["batch_stats"]
  # np.array copies: torch.as_tensor wants writable memory, and jax arrays are read-only.
  state = {
      "running_mean": np.array(stats["mean"], np.float32),
      "running_var": np.array(stats["var"], np.float32),
      "num_batches_tracked": np.array(stats.get("count", 0), np.int64),
  }
  params = variables.get("params", {})
  if "scale" in params or "bias" in params:
    ones, zeros = np.ones_like(state["running_mean"]), np.zeros_like(state["running_mean"])
    state["weight"] = np.array(params.get("scale", ones), np.float32)
    state["bias"] = np.array(params.get("bias", zeros), np.float32)
  return state


def module_kwargs_from_torch(bn: Any, *, layout: Layout) -> dict[str, Any]:
  """Constructor arguments that make `jaxbn.linen.BatchNorm` behave like a torch BN module.

  Args:
    bn: a `torch.nn.BatchNorm1d/2d/3d` (read through its `eps`, `momentum` and `affine`).
    layout: "NCHW" to feed jaxbn the same channels-first tensors as torch (`axis=1`), or
      "NHWC" for channels-last, Flax's usual layout (`axis=-1`).
  """
  if layout not in ("NCHW", "NHWC"):
    raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}.")
  return {
      "axis": 1 if layout == "NCHW" else -1,
      "epsilon": float(bn.eps),
      "momentum": None if bn.momentum is None else 1.0 - float(bn.momentum),
      "use_scale": bool(bn.affine),
      "use_bias": bool(bn.affine),
      "unbiased_running_var": True,
  }


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  """Folds an eval-mode BN into the `Dense`/`Conv` before it: BN(x·W + b) = x·W' + b'.

  With s = γ / √(var + ε) per output feature, W' = W·s and b' = (b − mean)·s + β. The
  kernel's last axis must be the output features (Flax's Dense (in, out) and Conv
  (..., in, out) layouts).

  Args:
    kernel: the layer's kernel.
    bias: the layer's bias, or None.
    mean: BN's running mean.
    var: BN's running variance.
    scale: γ, or None for 1.
    shift: β, or None for 0.
    epsilon: BN's ε.

  Returns:
    `(kernel, bias)` of the folded layer (it now needs a bias).
  """
  features = kernel.shape[-1]
  for name, value in (("mean", mean), ("var", var), ("scale", scale), ("shift", shift),
                      ("bias", bias)):
    if value is not None and jnp.shape(value) != (features,):
      raise ValueError(
          f"{name} has shape {jnp.shape(value)}; the kernel's last axis has {features} "
          "output features, and folding needs one value per output feature.")
  # Fold in float32 or wider, then cast: a bf16 kernel must not round var, mean or b first.
  dtype = kernel.dtype
  cdt = jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype
  s = jax.lax.rsqrt(jnp.asarray(var, cdt) + epsilon)
  if scale is not None:
    s = s * jnp.asarray(scale, cdt)
  b = jnp.zeros((features,), cdt) if bias is None else jnp.asarray(bias, cdt)
  new_bias = (b - jnp.asarray(mean, cdt)) * s
  if shift is not None:
    new_bias = new_bias + jnp.asarray(shift, cdt)
  new_kernel = kernel.astype(cdt) * s.reshape((1,) * (kernel.ndim - 1) + (features,))
  return new_kernel.astype(dtype), new_bias.astype(dtype)
