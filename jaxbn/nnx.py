"""`flax.nnx.BatchNorm`, drop-in, on jaxbn's analytic core.

Same constructor, same state (`scale`, `bias` as `nnx.Param`; `mean`, `var` as
`nnx.BatchStat`), `.train()` / `.eval()` and the call-time `use_running_average` override.
The maths is `jaxbn.ops`; this module holds state.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxbn import _args, _recording, _renorm_schedule, ops

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
  """Batch normalization with the analytic backward; same state and API as `nnx.BatchNorm`.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNorm
    >>> bn = BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (5, 6))
    >>> bn.train(); y = bn(x)    # batch statistics; bn.mean, bn.var updated in place
    >>> bn.eval(); y = bn(x)     # running averages; nothing updated

  See `jaxbn.linen.BatchNorm` for the deliberate differences from Flax (two-pass variance by
  default, masked outputs 0, checked state) and for `gradient`, `unbiased_running_var` and
  `momentum=None` (PyTorch's cumulative average, which adds a `count` BatchStat).

  Args:
    num_features: size of the feature axis.
    use_running_average: use the running averages (eval) instead of batch statistics.
    axis: the feature axis.
    momentum: decay of the running averages (PyTorch's is 1 − this), or None.
    epsilon: ε, added to the variance.
    dtype: the computation and output dtype (default: promoted from input and state).
    param_dtype: dtype of scale and bias.
    use_bias: learn β.
    use_scale: learn γ.
    bias_init: β's initializer.
    scale_init: γ's initializer.
    axis_name: pool statistics across this named axis (shard_map, pmap).
    axis_index_groups: groups within `axis_name` that pool separately.
    use_fast_variance: Flax's one-pass variance instead of the shifted two-pass one.
    promote_dtype: as Flax's: promotes (x, mean, var, scale, bias) to one dtype.
    rngs: for the initializers.
    bias_metadata: metadata for the bias Param.
    scale_metadata: metadata for the scale Param.
    gradient: "analytic" (the custom_vjp) or "autodiff".
    unbiased_running_var: keep the running variance unbiased, m/(m − 1)·var.
    use_cpu_kernel: jaxbn's fused C++ kernels on CPU: None (default) wherever the call
      allows and the operands are whole (one device, or per device under shard_map;
      a sharded jit gets their pure-JAX twins), True to require them (even under a
      sharded jit), False for pure JAX (see `jaxbn.batch_norm`).
    renorm: batch renormalization (Keras 2's `renorm`), with `renorm_mean`, `renorm_var`
      BatchStats (see `jaxbn.linen.BatchNorm` for this and the next four).
    renorm_clipping: Keras 2's dict with keys `rmax`, `rmin`, `dmax`.
    renorm_momentum: decay of renorm_mean/renorm_var.
    renorm_warmup_steps: linear warm-up of the clipping, counted in a `renorm_steps`
      BatchStat; 0 (default) for none.
    virtual_batch_size: ghost batches of this many examples.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float | None = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Hashable | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = False,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      gradient: Literal["analytic", "autodiff"] = "analytic",
      unbiased_running_var: bool = False,
      use_cpu_kernel: bool | None = None,
      renorm: bool = False,
      renorm_clipping: Mapping[str, float] | None = None,
      renorm_momentum: float = 0.99,
      renorm_warmup_steps: int = 0,
      virtual_batch_size: int | None = None,
  ):
    feature_shape = (num_features,)
    self._renorm_clip = _renorm_schedule.clipping(
        renorm, renorm_clipping, renorm_momentum, renorm_warmup_steps, "jaxbn.nnx.BatchNorm")
    if renorm:
      self.renorm_mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
      self.renorm_var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
      if renorm_warmup_steps:
        self.renorm_steps = nnx.BatchStat(jnp.zeros((), _renorm_schedule.CLOCK_DTYPE))
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if momentum is None:
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.scale = (nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                            **scale_metadata) if use_scale else nnx.data(None))
    self.bias = (nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                           **bias_metadata) if use_bias else nnx.data(None))
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.gradient = gradient
    self.unbiased_running_var = unbiased_running_var
    self.use_cpu_kernel = use_cpu_kernel
    self.renorm = renorm
    self.renorm_momentum = renorm_momentum
    self.renorm_warmup_steps = renorm_warmup_steps
    self.virtual_batch_size = virtual_batch_size

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes x; the call's `use_running_average` takes precedence over the attribute."""
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg="No use_running_average given to jaxbn.nnx.BatchNorm: pass it to the "
                  "constructor or the call, or use .train() / .eval().")
    x = _args.floating_input(x)
    features, _ = _args.feature_axes(x, self.axis)
    if _args.feature_shape(x, features) != (self.num_features,):
      raise ValueError(
          f"x has shape {x.shape}, but this BatchNorm was built for num_features="
          f"{self.num_features} on axis {self.axis}.")
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    # Flax's output dtype: `dtype` if given, else promoted from x and the parameters.
    out_dtype = dtypes.canonicalize_dtype(
        *(v for v in (x, scale, bias) if v is not None), dtype=self.dtype)
    if use_running_average:
      # Masked outputs are 0 in eval too, as in training (whatever the padding held).
      return ops.batch_norm_inference(x, mean, var, scale, bias, axis=self.axis,
                                      epsilon=self.epsilon, mask=mask, dtype=out_dtype)
    renorm = None
    if self.renorm:
      steps = self.renorm_steps[...] if self.renorm_warmup_steps else 0
      renorm = ops.Renorm(self.renorm_mean[...], self.renorm_var[...],
                          *_renorm_schedule.warmed_up(self._renorm_clip, steps,
                                                      self.renorm_warmup_steps))
    y, stats = ops.batch_norm(
        x, scale, bias, axis=self.axis, epsilon=self.epsilon, mask=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        use_fast_variance=self.use_fast_variance, gradient=self.gradient, dtype=out_dtype,
        use_cpu_kernel=self.use_cpu_kernel, renorm=renorm,
        virtual_batch_size=self.virtual_batch_size)
    _recording.record_nnx(self, stats, self.unbiased_running_var)
    if self.renorm:
      self.renorm_mean[...], self.renorm_var[...] = ops.update_running_stats(
          self.renorm_mean[...], self.renorm_var[...], stats, momentum=self.renorm_momentum)
      if self.renorm_warmup_steps:
        self.renorm_steps[...] = _renorm_schedule.tick(self.renorm_steps[...])
    num_batches = None
    if hasattr(self, "count"):  # PyTorch's num_batches_tracked: momentum=None adds it
      self.count[...] = _renorm_schedule.tick(self.count[...])
      num_batches = self.count[...]
    self.mean[...], self.var[...] = ops.update_running_stats(
        self.mean[...], self.var[...], stats, momentum=self.momentum,
        num_batches=num_batches, unbiased_var=self.unbiased_running_var)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by `nnx.view` (and `.train()` / `.eval()`).

    Args:
      use_running_average: if True, use the running averages instead of batch statistics.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
