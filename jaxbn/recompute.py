"""Precise population statistics: the running mean and variance recomputed after training.

The exponential moving averages that training keeps mix statistics from many sets of
weights, the early ones stale; PyTorch's `torch.optim.swa_utils.update_bn` and "PreciseBN"
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") recompute them with the final weights
over N batches as a true average. `recompute_batch_stats` does that for jaxbn's linen and nnx
`BatchNorm`s: it runs the model in training mode over the batches, collects each layer's
batch statistics (`jaxbn.BatchStats`), and pools them in float64.

Which variance: the biased variance of all the values the layer saw, pooled over the batches
(Chan, Golub & LeVeque's parallel combination: each batch's variance plus the spread of its
mean about the running mean, count-weighted). For equal-size batches this is exactly the mean
and biased variance of the concatenated data — the population statistics — whereas the mean
of per-batch variances falls short of it by the variance of the batch means (for i.i.d.
batches of m values, by a factor (m − 1)/m). With `unbiased_running_var` the pooled variance
is scaled by T/(T − 1), T the number of values. With ghost batches (`virtual_batch_size`) each
batch contributes what the layer's running averages get: its virtual batches' average.

`variance="average"` keeps instead the count-weighted average of the per-batch variances, as
PyTorch's `update_bn` and fvcore's PreciseBN do: the true average of what the running
variance averages, and the variance training-mode normalization divides by (each batch is
centred on its own mean, so the spread of batch means never reaches it). The two differ most
where batches differ most (non-i.i.d. batches: docs/experiments.md, renorm_noniid); with
`unbiased_running_var` each batch's variance is scaled by c/(c − 1) first, as in training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _recording

__all__ = ["recompute_batch_stats"]

_VARIANCES = ("pooled", "average")


def recompute_batch_stats(model: Any, batches: Iterable[Any], *, variables: Any = None,
                          variance: str = "pooled", **call_kwargs: Any) -> Any:
  """Replaces every jaxbn `BatchNorm`'s running mean and variance by population statistics.

  Each batch runs through the model in training mode (the layers normalize with batch
  statistics, as during training; nothing else is updated), and the statistics each layer
  sees are pooled over all batches (see the module docstring: the mean and biased variance
  of all values, exactly, for equal-size batches). One jit compilation per batch shape.

    >>> variables = jaxbn.recompute_batch_stats(model, batches, variables=variables,
    ...                                         train=True)          # linen
    >>> jaxbn.recompute_batch_stats(model, batches)                  # nnx, in place

  Args:
    model: a `flax.linen.Module` (with `variables`) or a `flax.nnx.Module` (updated in place).
    batches: an iterable of the model's positional input: an array, or a tuple of
      positional arguments.
    variables: linen only: the variable dict (`params`, `batch_stats`, ...).
    variance: "pooled" (default): the biased variance of all values seen, exact population
      statistics for equal-size batches; "average": the count-weighted average of the
      per-batch variances (PyTorch's `update_bn`; see the module docstring).
    **call_kwargs: passed to every call (linen: to `apply`, e.g. `train=True` or
      `use_running_average=False`, `rngs=`; they must put jaxbn's BatchNorms in training
      mode). nnx: jaxbn's BatchNorms are put in training mode on a copy of the model.

  Returns:
    linen: new variables, `batch_stats` mean/var replaced (other collections untouched).
    nnx: `model`, its BatchNorms' `mean` and `var` replaced.

  Raises:
    ValueError: no batches, no jaxbn BatchNorm ran in training mode, or an unknown
      `variance`.
  """
  if variance not in _VARIANCES:
    raise ValueError(f"variance must be one of {_VARIANCES}, got {variance!r}.")
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("variables= is for linen modules; an nnx module holds its own state.")
    return _recompute_nnx(model, batches, variance, call_kwargs)
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("recompute_batch_stats(linen_module, ...) needs variables=.")
    return _recompute_linen(model, variables, batches, variance, call_kwargs)
  raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}.")


class _Pool:
  """Per-layer statistics over the batches, in float64: count, mean and biased variance pooled
  (Chan et al.), and the count-weighted sum of the per-batch variances (for "average")."""

  def __init__(self):
    self.layers: dict[str, list] = {}

  def add(self, key: str, record: dict) -> None:
    count, mean, var = (np.asarray(record[k], np.float64) for k in ("count", "mean", "var"))
    unbiased = bool(record["unbiased"])
    # What the running variance is updated with for this batch: c/(c − 1)·var if unbiased.
    batch_var = var * count / np.maximum(count - 1, 1) if unbiased else var
    if key not in self.layers:
      self.layers[key] = [count, mean, var, count * batch_var, unbiased]
      return
    total, pooled_mean, pooled_var, weighted_var_sum, _ = self.layers[key]
    new_total = total + count
    weight = np.divide(count, new_total, out=np.zeros_like(count), where=new_total > 0)
    delta = mean - pooled_mean
    pooled_mean = pooled_mean + weight * delta
    # T'·V' = T·V + c·v + δ²·T·c/T'
    pooled_var = (1 - weight) * pooled_var + weight * var + weight * (1 - weight) * delta**2
    self.layers[key] = [new_total, pooled_mean, pooled_var,
                        weighted_var_sum + count * batch_var, unbiased]

  def result(self, key: str, variance: str) -> tuple[np.ndarray, np.ndarray]:
    total, mean, var, weighted_var_sum, unbiased = self.layers[key]
    if variance == "average":
      return mean, np.divide(weighted_var_sum, total, out=np.zeros_like(var), where=total > 0)
    if unbiased:
      var = var * total / np.maximum(total - 1, 1)
    return mean, var


def _batch_args(batch) -> tuple:
  return batch if isinstance(batch, tuple) else (batch,)


def _pool_batches(run, batches, owner: str) -> _Pool:
  pool = _Pool()
  seen = 0
  for batch in batches:
    for key, records in run(_batch_args(batch)).items():
      for record in records:
        pool.add(key, record)
    seen += 1
  if not seen:
    raise ValueError("recompute_batch_stats: batches is empty.")
  if not pool.layers:
    raise ValueError(
        f"recompute_batch_stats: no jaxbn BatchNorm ran in training mode in {owner}; "
        "pass what puts them in training mode (linen: e.g. train=True or "
        "use_running_average=False), and use jaxbn.linen / jaxbn.nnx BatchNorm layers.")
  return pool


def _collect(records, name_of) -> dict[str, list[dict]]:
  """The recorded statistics by layer name, as a jit output (a layer called twice per batch
  contributes twice)."""
  out: dict[str, list[dict]] = {}
  for key, stats, unbiased in records:
    out.setdefault(name_of(key), []).append(
        {"count": stats.count, "mean": stats.mean, "var": stats.var,
         "unbiased": jnp.asarray(unbiased)})
  return out


def _recompute_linen(model, variables, batches, variance, call_kwargs):
  paths: dict[str, tuple[str, ...]] = {}

  def name_of(path):
    name = "/".join(path)
    paths[name] = tuple(path)
    return name

  @jax.jit
  def run(variables, args):
    with _recording.recording() as records:
      model.apply(variables, *args, mutable=["batch_stats"], **call_kwargs)
    return _collect(records, name_of)

  pool = _pool_batches(lambda args: run(variables, args), batches,
                       type(model).__name__)
  batch_stats = jax.tree.map(lambda v: v, dict(variables["batch_stats"]))  # copied dicts
  for name, path in paths.items():
    layer = batch_stats
    for part in path:
      layer[part] = dict(layer[part])
      layer = layer[part]
    mean, var = pool.result(name, variance)
    layer["mean"] = jnp.asarray(mean, layer["mean"].dtype)
    layer["var"] = jnp.asarray(var, layer["var"].dtype)
  return {**variables, "batch_stats": batch_stats}


def _recompute_nnx(model, batches, variance, call_kwargs):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxbn import nnx as jaxbn_nnx  # pylint: disable=import-outside-toplevel

  def layers(root):
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(root)
            if isinstance(node, jaxbn_nnx.BatchNorm)}

  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, args):
    copy = nnx.merge(graphdef, state)  # its updates (EMA, rng counters) are dropped
    names = {}
    for name, layer in layers(copy).items():
      layer.use_running_average = False
      names[id(layer)] = name
    with _recording.recording() as records:
      copy(*args, **call_kwargs)
    return _collect(records, lambda layer: names[id(layer)])

  pool = _pool_batches(lambda args: run(state, args), batches, type(model).__name__)
  for name, layer in layers(model).items():
    if name in pool.layers:
      mean, var = pool.result(name, variance)
      layer.mean[...] = jnp.asarray(mean, layer.mean[...].dtype)
      layer.var[...] = jnp.asarray(var, layer.var[...].dtype)
  return model
