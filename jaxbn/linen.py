"""`flax.linen.BatchNorm`, drop-in, on jaxbn's analytic core.

The module only declares fields, creates variables and keeps running averages; the maths is
`jaxbn.ops.batch_norm` (training), `batch_norm_inference` (eval) and `update_running_stats`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from flax.typing import Dtype, Initializer

from jaxbn import _args, _recording, _renorm_schedule, ops

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
  """Batch normalization with the analytic backward; same fields and variables as Flax's.

  Replace `flax.linen.BatchNorm` with `jaxbn.linen.BatchNorm`: the variables (`params/scale`,
  `params/bias`, `batch_stats/mean`, `batch_stats/var`) have the same names, shapes and dtypes,
  so checkpoints load either way, and outputs agree to float32 rounding.

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNorm
    >>> bn = BatchNorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (5, 6))
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (6,), 'var': (6,)}, 'params': {'bias': (6,), 'scale': (6,)}}
    >>> # train: batch statistics, and the running averages come back as an update
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> variables = {"params": variables["params"], **updates}
    >>> # eval: the running averages, nothing mutated
    >>> y = bn.apply(variables, x, use_running_average=True)

  Differences from Flax, all deliberate:
    - `use_fast_variance` defaults to False: a shifted two-pass variance, exact where Flax's
      one-pass E[x²] − E[x]² loses every digit (|μ| ≫ σ). Set True for Flax's formula.
    - Statistics are reduced in float32 or wider always; `force_float32_reductions=False`
      only makes the running statistics use `param_dtype`, as in Flax.
    - With `mask`, masked outputs are 0 (Flax normalizes them too), and NaN/inf padding
      reaches no gradient.
    - Bad variables (missing, mis-shaped, or initialised for another feature size) raise a
      `ValueError` naming the variable, where Flax may silently re-create them.

  Attributes:
    use_running_average: use the stored running averages instead of batch statistics.
    axis: the feature axis or axes.
    momentum: decay of the running averages (PyTorch's momentum is 1 − this); None for
      PyTorch's cumulative average, which adds a `batch_stats/count` variable (PyTorch's
      num_batches_tracked; counted whenever present, e.g. imported by `jaxbn.interop`).
    epsilon: ε, added to the variance.
    dtype: the output dtype (default: inferred from input and params, as Flax).
    param_dtype: dtype of scale and bias.
    use_bias: learn β.
    use_scale: learn γ.
    bias_init: β's initializer.
    scale_init: γ's initializer.
    axis_name: pool statistics across this named axis (shard_map, pmap); not needed under
      `jax.jit` with a sharded batch, where XLA inserts the collectives.
    axis_index_groups: groups within `axis_name` that pool separately.
    use_fast_variance: Flax's one-pass variance instead of the shifted two-pass one.
    force_float32_reductions: False stores running statistics in `param_dtype`.
    gradient: "analytic" (the custom_vjp) or "autodiff" (JAX differentiates the forward).
    unbiased_running_var: keep the running variance unbiased, m/(m − 1)·var (the BN paper's
      Algorithm 2 and PyTorch) instead of biased (Flax).
    use_cpu_kernel: jaxbn's fused C++ kernels on CPU: None (default) wherever the call
      allows and the operands are whole (one device, or per device under shard_map;
      a sharded jit gets their pure-JAX twins), True to require them (even under a
      sharded jit), False for pure JAX (see `jaxbn.batch_norm`).
    renorm: batch renormalization (Ioffe 2017; Keras 2's `renorm`): training normalizes
      with x̂ r + d, r and d correcting the batch statistics towards running ones kept in
      `batch_stats/renorm_mean` and `batch_stats/renorm_var` (see `jaxbn.Renorm`).
    renorm_clipping: Keras 2's dict with keys `rmax`, `rmin`, `dmax` (missing: inf, 0, inf;
      the paper uses rmin = 1/rmax, e.g. {"rmax": 3, "rmin": 1/3, "dmax": 5}).
    renorm_momentum: decay of renorm_mean/renorm_var (Keras 2's); `momentum` still decays
      the mean/var that inference uses.
    renorm_warmup_steps: relax the clipping linearly from rmax = rmin = 1, dmax = 0 (plain
      BN) to `renorm_clipping` over this many training steps (Ioffe's schedule), counted in
      `batch_stats/renorm_steps`, an int32 that stops at 2**31 − 1 rather than wrapping (so
      at most that many warm-up steps); 0 (default) clips as given from the first step.
      Fields of the wrong type (renorm="yes", a string clip or momentum) raise a TypeError
      naming the field; NumPy scalars count as the Python numbers they equal.
    virtual_batch_size: ghost batches (Keras 2's `virtual_batch_size`): statistics per
      virtual batch of this many examples; the running averages get the virtual batches'
      average (see `jaxbn.batch_norm` for the split).
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Hashable | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = False
  force_float32_reductions: bool = True
  gradient: Literal["analytic", "autodiff"] = "analytic"
  unbiased_running_var: bool = False
  use_cpu_kernel: bool | None = None
  renorm: bool = False
  renorm_clipping: Mapping[str, float] | None = None
  renorm_momentum: float = 0.99
  renorm_warmup_steps: int = 0
  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes x with batch statistics (training) or the running averages (eval).

    Args:
      x: the input.
      use_running_average: overrides nothing: give it here or as the field, not both.
      mask: boolean, broadcastable to x; False marks padding, left out of the statistics.

    Returns:
      The normalized x, same shape.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = _args.floating_input(x)
    features, _ = _args.feature_axes(x, self.axis)
    feature_shape = _args.feature_shape(x, features)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    initializing = self.is_initializing()
    ra_mean = self._batch_stat("mean", jnp.zeros, feature_shape, stats_dtype, initializing)
    ra_var = self._batch_stat("var", jnp.ones, feature_shape, stats_dtype, initializing)
    # PyTorch's num_batches_tracked: needed by momentum=None, kept if imported from PyTorch.
    num_batches = None
    if self.momentum is None or self.has_variable("batch_stats", "count"):
      num_batches = self._batch_stat("count", jnp.zeros, (), jnp.int32, initializing)
    clip = _renorm_schedule.clipping(self.renorm, self.renorm_clipping, self.renorm_momentum,
                                     self.renorm_warmup_steps, self.name or "BatchNorm")
    if self.renorm:  # the running statistics r and d correct towards, and the warm-up's clock
      rn_mean = self._batch_stat("renorm_mean", jnp.zeros, feature_shape, stats_dtype,
                                 initializing)
      rn_var = self._batch_stat("renorm_var", jnp.ones, feature_shape, stats_dtype,
                                initializing)
      if self.renorm_warmup_steps:
        rn_steps = self._batch_stat("renorm_steps", jnp.zeros, (), _renorm_schedule.CLOCK_DTYPE,
                                    initializing)
    scale = self._param("scale", self.use_scale, self.scale_init, feature_shape)
    bias = self._param("bias", self.use_bias, self.bias_init, feature_shape)
    out_dtype = dtypes.canonicalize_dtype(
        *(v for v in (x, scale, bias) if v is not None), dtype=self.dtype)

    if use_running_average:
      return ops.batch_norm_inference(
          x, ra_mean.value, ra_var.value, scale, bias,
          axis=self.axis, epsilon=self.epsilon, mask=mask, dtype=out_dtype)

    renorm = None
    if self.renorm:
      steps = rn_steps.value if self.renorm_warmup_steps else 0
      renorm = ops.Renorm(rn_mean.value, rn_var.value, *_renorm_schedule.warmed_up(
          clip, steps, self.renorm_warmup_steps))
    y, stats = ops.batch_norm(
        x, scale, bias, axis=self.axis, epsilon=self.epsilon, mask=mask,
        # As in Flax, init runs outside the parallel context, so the axis may not exist.
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        use_fast_variance=self.use_fast_variance, gradient=self.gradient, dtype=out_dtype,
        use_cpu_kernel=self.use_cpu_kernel, renorm=renorm,
        virtual_batch_size=self.virtual_batch_size)
    _recording.record_linen(self, stats, self.unbiased_running_var)
    if not initializing and self.renorm:
      rn_mean.value, rn_var.value = ops.update_running_stats(
          rn_mean.value, rn_var.value, stats, momentum=self.renorm_momentum)
      if self.renorm_warmup_steps:
        rn_steps.value = _renorm_schedule.tick(rn_steps.value)
    if not initializing:
      if num_batches is not None:
        num_batches.value = _renorm_schedule.tick(num_batches.value)
      ra_mean.value, ra_var.value = ops.update_running_stats(
          ra_mean.value, ra_var.value, stats, momentum=self.momentum,
          num_batches=None if num_batches is None else num_batches.value,
          unbiased_var=self.unbiased_running_var)
    return y

  # Helpers, not wrapped as module methods: a wrapped call is intercepted on its own (e.g. by
  # nn.tabulate's method interceptors) outside __call__'s compact scope, where creating a
  # variable fails.
  @nn.nowrap
  def _batch_stat(self, name, init, shape, dtype, initializing):
    """A `batch_stats` variable; outside init it must already exist, with this shape."""
    if not initializing and not self.has_variable("batch_stats", name):
      raise ValueError(
          f"{self.name or 'BatchNorm'}: batch_stats/{name} is missing from the variables; "
          "pass the 'batch_stats' collection returned by init (Flax would silently "
          "re-initialise it).")
    variable = self.variable("batch_stats", name, init, shape, dtype)
    _check_shape(f"batch_stats/{name}", variable.value.shape, shape)
    return variable

  @nn.nowrap
  def _param(self, name, used, init, shape):
    if not used:
      return None
    if self.has_variable("params", name):
      _check_shape(f"params/{name}", self.get_variable("params", name).shape, shape)
    return self.param(name, init, shape, self.param_dtype)


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
  if tuple(got) != tuple(want):
    raise ValueError(
        f"{name} has shape {tuple(got)} but x's feature axes have shape {tuple(want)}: the "
        "variables were initialised for a different feature size (or are mis-shaped).")
