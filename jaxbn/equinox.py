"""`equinox.nn.BatchNorm`, drop-in, on jaxbn's analytic core.

Same constructor, public fields and `StateIndex` layout as Equinox 0.13's class, the same call
`(x, state, *, key=None, inference=None) -> (out, state)` on one example `(input_size,
*spatial)` inside `jax.vmap`/`jax.pmap` with `axis_name`. The maths is `jaxbn.ops`; this
module holds state. Importing it needs Equinox (`pip install jaxbn[equinox]`); nothing else in
jaxbn imports Equinox.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _args, ops

__all__ = ["BatchNorm"]


def _default_dtype():
  # Equinox's default: float64 when JAX runs in 64-bit mode, else float32.
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _axis_name(axis_name):
  # A list of names is allowed, as Equinox allows it, and kept as a tuple: a static field must
  # hash, and lax.psum takes a tuple of names.
  if isinstance(axis_name, list):
    return tuple(axis_name)
  return axis_name


class BatchNorm(eqx.nn.StatefulLayer):
  """Batch normalization with the analytic backward; same state and API as `eqx.nn.BatchNorm`.

    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from jaxbn.equinox import BatchNorm
    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(6, "batch", mode="batch")
    >>> x = jax.random.normal(jax.random.key(0), (5, 6))           # 5 examples
    >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> y, state = train(x, state)       # batch statistics; running averages updated
    >>> infer = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch",
    ...                  in_axes=(0, None), out_axes=(0, None))
    >>> y, _ = infer(x, state)           # running averages; state unchanged

  Each call sees one example of shape `(input_size, *spatial)`; the statistics of channel c are
  taken over the spatial axes and over every example of the named axis (or axes) of the
  surrounding `vmap`/`pmap`. Without a matching named axis the call raises `NameError`, as
  Equinox's does.

  **mode="batch"**: plain batch normalization, `jaxbn.batch_norm` with `axis_name`, its
  gradient the analytic `custom_vjp` (eqs. (5)-(7)). The state keeps zero-initialised
  exponential averages of the batch mean and of the *biased* batch variance (1/m)Σ(x − μ)²
  (Equinox's docstring calls its variance unbiased, but its code keeps the biased one too) and
  a step counter c. Inference uses them debiased as Adam debiases its moments:
  hidden / (1 − momentum^c), a weighted average of the batch statistics seen whose weights sum
  to 1; before any training step (c = 0) it uses mean 0 and variance 1, so the layer is then
  y = γx/√(1 + ε) + β. (Equinox starts the hidden variance at ones yet debiases it as if it
  had started at zeros, so its inference variance is too large by momentum^c / (1 −
  momentum^c), about +99 after one step at momentum 0.99.)

  **mode="ema"** (Equinox's default, with a warning when `mode` is not given): training
  normalizes with the blend of the batch and running statistics,

      μ̃ = (1 − momentum)·μ_B + momentum·μ_R,   σ̃² = (1 − momentum)·σ_B² + momentum·σ_R²,

  the batch statistics alone on the first step, and stores (μ̃, σ̃²) as the new running
  statistics; inference uses the running statistics. The running statistics start as mean 0
  and variance 1 (Equinox's start as uninitialised memory), so inference before any training
  step is y = γx/√(1 + ε) + β. It is `jaxbn.batch_norm(blend=jaxbn.Blend(...))`: the
  analytic backward of the blend (eq. (7) with 1/σ̃ and its sums times 1 − momentum, derived
  in docs/derivation.md and proved by `jaxbn check`). Its gradient through the batch
  statistics is damped by (1 − momentum), which is why "batch" usually trains better.

  Gradients do not flow through the returned state (the core's statistics leave through
  `stop_gradient`); the output's gradient is Equinox's.

  Args:
    input_size: the number of channels, x's first axis.
    axis_name: the named axis of the `vmap`/`pmap` to pool statistics over, or a tuple (or
      list) of names. A static field, so `jax.device_put_replicated` and other functions that
      map over a model's leaves leave it alone.
    eps: ε, added to the variance.
    channelwise_affine: learn γ (`weight`) and β (`bias`).
    momentum: decay of the running statistics, in (0, 1).
    inference: use the running statistics; toggled by `eqx.nn.inference_mode` or overridden
      by the call's `inference`.
    dtype: dtype of the running statistics, weight and bias; default float32, or float64 in
      JAX's 64-bit mode.
    mode: "batch" or "ema" (default "ema" with a warning, as Equinox).
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  mode: Literal["ema", "batch"] = eqx.field(static=True)

  def __init__(
      self,
      input_size: int,
      axis_name: Hashable | Sequence[Hashable],
      eps: float = 1e-5,
      channelwise_affine: bool = True,
      momentum: float = 0.99,
      inference: bool = False,
      dtype=None,
      mode: Literal["ema", "batch", "legacy"] = "legacy",
  ):
    if mode == "legacy":
      mode = "ema"
      warnings.warn(
          "jaxbn.equinox.BatchNorm(..., mode=...) unspecified defaults to 'ema', as "
          "eqx.nn.BatchNorm does; 'ema' normalizes with statistics blended with the running "
          "ones, which damps their gradient. For new code pass mode='batch' (plain batch "
          "normalization with the analytic backward).", stacklevel=2)
    if mode not in ("ema", "batch"):
      raise ValueError(f"mode must be 'ema' or 'batch', got {mode!r}.")
    dtype = _default_dtype() if dtype is None else dtype
    shape = (input_size,)
    self.mode = mode
    if channelwise_affine:
      self.weight = jnp.ones(shape, dtype)
      self.bias = jnp.zeros(shape, dtype)
    else:
      self.weight = None
      self.bias = None
    # Both modes start from mean 0 and variance 1 (see the class docstring); "batch" keeps
    # zero-started averages and debiases them, so its variance buffer starts at 0.
    if mode == "ema":
      self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
      self.ema_state_index = eqx.nn.StateIndex((jnp.zeros(shape, dtype), jnp.ones(shape, dtype)))
      self.batch_counter = None
      self.batch_state_index = None
    else:
      self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
      self.batch_state_index = eqx.nn.StateIndex((jnp.zeros(shape, dtype),
                                                   jnp.zeros(shape, dtype)))
      self.ema_first_time_index = None
      self.ema_state_index = None
    self.inference = inference
    self.axis_name = _axis_name(axis_name)
    self.input_size = input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum

  def __call__(self, x, state: eqx.nn.State, *, key=None, inference: bool | None = None):
    """Normalizes one example x of shape `(input_size, *spatial)`.

    Args:
      x: one example; the batch is the named axis of the surrounding `vmap`/`pmap`.
      state: an `eqx.nn.State` holding this layer's running statistics.
      key: ignored, as in Equinox.
      inference: overrides the `inference` field when not None.

    Returns:
      `(out, state)`: out with x's shape, the state with the running statistics updated
      (unchanged in inference).
    """
    del key
    if inference is None:
      inference = self.inference
    x = _args.floating_input(x)
    if x.ndim < 1 or x.shape[0] != self.input_size:
      raise ValueError(
          f"x has shape {x.shape}, but this BatchNorm was built for input_size="
          f"{self.input_size} on the first axis: call it on one example (input_size, "
          f"*spatial) inside jax.vmap(..., axis_name={self.axis_name!r}).")
    with jax.named_scope("jaxbn.equinox.BatchNorm"):
      if self.mode == "batch":
        return self._batch_mode(x, state, inference)
      return self._ema_mode(x, state, inference)

  def _out_dtype(self, x, running_mean):
    # Equinox's output dtype: x promoted with the running statistics and the parameters.
    dtypes = [x.dtype, running_mean.dtype, *([self.weight.dtype] if self.weight is not None
                                             else [])]
    out = dtypes[0]
    for dtype in dtypes[1:]:
      out = jnp.promote_types(out, dtype)
    return out

  def _normalize(self, x, mean, var, running_mean):
    return ops.batch_norm_inference(x, mean, var, self.weight, self.bias, axis=0,
                                    epsilon=self.eps, dtype=self._out_dtype(x, running_mean))

  def _batch_mode(self, x, state, inference):
    counter = state.get(self.batch_counter)
    hidden_mean, hidden_var = state.get(self.batch_state_index)
    if inference:
      steps = counter.astype(hidden_mean.dtype)
      # Zero-started averages debiased: Σ_k (1 − m)m^(c−k)·s_k / (1 − m^c) weighs the batches
      # with weights summing to 1. With no step yet there is nothing to average.
      weight_sum = jnp.where(counter > 0, 1 - jnp.asarray(self.momentum, steps.dtype) ** steps,
                             jnp.ones((), steps.dtype))
      mean = jnp.where(counter > 0, hidden_mean / weight_sum, jnp.zeros_like(hidden_mean))
      var = jnp.where(counter > 0, hidden_var / weight_sum, jnp.ones_like(hidden_var))
      return self._normalize(x, mean, var, hidden_mean), state
    out, stats = ops.batch_norm(x, self.weight, self.bias, axis=0, epsilon=self.eps,
                                axis_name=self.axis_name,
                                dtype=self._out_dtype(x, hidden_mean))
    hidden = ops.update_running_stats(hidden_mean, hidden_var, stats, momentum=self.momentum)
    state = state.set(self.batch_counter, counter + 1)
    state = state.set(self.batch_state_index, hidden)
    return out, state

  def _ema_mode(self, x, state, inference):
    running_mean, running_var = state.get(self.ema_state_index)
    if inference:
      return self._normalize(x, running_mean, running_var, running_mean), state
    first_time = state.get(self.ema_first_time_index)
    # The first step normalizes with the batch's statistics alone: a blend of weight 0.
    weight = jnp.where(first_time, 0.0, self.momentum).astype(_args.compute_dtype(x))
    out, stats = ops.batch_norm(
        x, self.weight, self.bias, axis=0, epsilon=self.eps, axis_name=self.axis_name,
        dtype=self._out_dtype(x, running_mean),
        blend=ops.Blend(running_mean, running_var, weight))
    # The blended statistics are the new running ones, as in Equinox.
    mean, var = ops.update_running_stats(running_mean, running_var, stats, momentum=weight)
    # False with the flag's own type: under pmap a fresh constant's type differs from the
    # flag's, and State.set refuses that (Equinox's own class does, in this mode).
    state = state.set(self.ema_first_time_index, jnp.zeros_like(first_time))
    state = state.set(self.ema_state_index, (mean, var))
    return out, state
