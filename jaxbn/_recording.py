"""While `jaxbn.recompute_batch_stats` runs a model, the modules hand it their batch statistics.

Through the model's own state, not a side channel: `recompute_batch_stats` adds accumulators
next to each layer's running mean (linen: variables in `batch_stats`; nnx: `BatchStat`
attributes), each shaped like the running mean, and a layer in training mode that finds them
pools its batch's statistics into them. Whatever Flax transform the layer runs under (remat,
scan, vmap, ...) then carries them exactly as it carries the running statistics: per scan step
or ensemble member where those are, with no tracer escaping the transform. Without the
accumulators (any call outside `recompute_batch_stats`) the modules behave exactly as without
this module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# calls: the layer's training-mode calls; count, mean, var: the statistics of every value it
# saw (Chan et al.'s pooling); var_sum: Σ count·(the variance the running average gets);
# unbiased: 1 where the layer keeps an unbiased running variance.
NAMES = ("recompute_calls", "recompute_count", "recompute_mean", "recompute_var",
         "recompute_var_sum", "recompute_unbiased")


def zeros(mean: Any) -> dict[str, jax.Array]:
  """Empty accumulators for a layer whose running mean is `mean` (transform axes included):
  float32 or wider whatever the running statistics' dtype, so that bfloat16 statistics pool
  without loss."""
  dtype = mean.dtype if jnp.finfo(mean.dtype).bits >= 32 else jnp.float32
  return {name: jnp.zeros(mean.shape, dtype) for name in NAMES}


def accumulate(acc: dict[str, jax.Array], stats: Any, unbiased: bool) -> dict[str, jax.Array]:
  """The accumulators with one more call's `BatchStats` pooled in."""
  dtype = acc["recompute_mean"].dtype
  count, mean, var = (jnp.asarray(v, dtype) for v in (stats.count, stats.mean, stats.var))
  total = acc["recompute_count"] + count
  weight = jnp.where(total > 0, count / jnp.where(total > 0, total, 1), 0)
  delta = mean - acc["recompute_mean"]
  seen = count > 0  # a feature with no values (all masked) keeps what it had
  # What the running variance is updated with for this call: c/(c − 1)·var if unbiased.
  batch_var = var * count / jnp.maximum(count - 1, 1) if unbiased else var
  return {
      "recompute_calls": acc["recompute_calls"] + 1,
      "recompute_count": total,
      "recompute_mean": jnp.where(seen, acc["recompute_mean"] + weight * delta,
                                  acc["recompute_mean"]),
      "recompute_var": jnp.where(
          seen, (1 - weight) * acc["recompute_var"] + weight * var
          + weight * (1 - weight) * delta**2, acc["recompute_var"]),
      "recompute_var_sum": acc["recompute_var_sum"] + jnp.where(seen, count * batch_var, 0),
      "recompute_unbiased": jnp.full_like(acc["recompute_unbiased"], float(unbiased)),
  }


def record_linen(module: Any, stats: Any, unbiased: bool) -> None:
  """Called by a linen BatchNorm in training mode: pools `stats` into its accumulators, if
  `recompute_batch_stats` gave it any."""
  if not module.has_variable("batch_stats", NAMES[0]):
    return
  acc = {name: module.get_variable("batch_stats", name) for name in NAMES}
  for name, value in accumulate(acc, stats, unbiased).items():
    module.put_variable("batch_stats", name, value)


def record_nnx(module: Any, stats: Any, unbiased: bool) -> None:
  """Called by an nnx BatchNorm in training mode: pools `stats` into its accumulators, if
  `recompute_batch_stats` gave it any."""
  if not hasattr(module, NAMES[0]):
    return
  acc = {name: getattr(module, name)[...] for name in NAMES}
  for name, value in accumulate(acc, stats, unbiased).items():
    getattr(module, name)[...] = value
