"""Precise population statistics: the running mean and variance recomputed after training.

The exponential moving averages that training keeps mix statistics from many sets of
weights, the early ones stale; PyTorch's `torch.optim.swa_utils.update_bn` and "PreciseBN"
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") recompute them with the final weights
over N batches as a true average. `recompute_batch_stats` does that for jaxbn's linen and nnx
`BatchNorm`s: it runs the model in training mode over the batches, collects each layer's
batch statistics (`jaxbn.BatchStats`), and pools them in float64.

Which variance (`variance=`). "pooled", the default: the biased variance of all the values
the layer saw, pooled over the batches (Chan, Golub & LeVeque's parallel combination: each
batch's variance plus the spread of its mean about the running mean, count-weighted). For
equal-size batches this is exactly the mean and biased variance of the concatenated data: the
population statistics, those Ghorbani, Krishnan & Xiao's Hessian study normalizes with. With
`unbiased_running_var` it is scaled by T/(T − 1), T the number of values. With ghost batches
(`virtual_batch_size`) each batch contributes what the layer's running averages get: its
virtual batches' average.

"average": the count-weighted average of the per-batch variances, as PyTorch's `update_bn`
and fvcore's PreciseBN keep: the true average of what the running variance averages, and the
variance training-mode normalization divides by (each batch is centred on its own mean, so
the spread of batch means never reaches it). It falls short of the pooled one by the variance
of the batch means (for i.i.d. batches of m values, by a factor of about (m − 1)/m); with
`unbiased_running_var` each batch's variance is scaled by c/(c − 1) first, as in training.

Why "pooled" stays the default, measured on the renorm studies' nets, three seeds each
(`experiments/studies/renorm/recompute_variance.py`, docs/guide/variants.md): on i.i.d.
batches of 60, normalized whole or in groups of 10, the two give the same test accuracy
(means within 0.04 points, the seeds' standard deviation up to 0.24) and "pooled" the lower
test loss on every seed, slightly (by 0.0003-0.0005 for BN, 0.0011-0.0017 for renorm); on
batches of two classes "average" scores better for Batch Renormalization (73.8% against
71.7%) and worse for BN (26.9% against 30.4%). "average" is the choice for a renormalized
net trained on batches far from i.i.d., or to match PyTorch.

The layers hand over their statistics through the model's own state (see `jaxbn._recording`):
accumulators next to each running mean, which Flax's transforms carry as they carry the running
statistics. So layers under `nn.remat`, `nn.scan`, `nn.vmap`, `nnx.remat`, `nnx.vmap` get the
statistics the untransformed layers would: per scan step and per ensemble member where the
variables hold one of each.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
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
  sees are pooled over all batches (by default the mean and biased variance of all values,
  exactly, for equal-size batches; see the module docstring for `variance` and why). One jit
  compilation per batch shape.

    >>> variables = jaxbn.recompute_batch_stats(model, batches, variables=variables,
    ...                                         train=True)          # linen
    >>> jaxbn.recompute_batch_stats(model, batches)                  # nnx, in place

  Layers under Flax's transforms (`nn.remat`, `nn.scan`, `nn.vmap`, `nnx.remat`,
  `nnx.vmap`) get the statistics the untransformed layers would: where the variables hold one
  set per scan step or ensemble member, each gets its own. Flax's own BatchNorm layers are
  left as they are, with a warning naming each. It runs on concrete values, outside `jax.jit`.

  Args:
    model: a `flax.linen.Module` (with `variables`) or a `flax.nnx.Module` (updated in place).
    batches: an iterable of the model's positional input: an array, or a tuple of
      positional arguments.
    variables: linen only: the variable dict (`params`, `batch_stats`, ...).
    variance: "pooled" (default): the biased variance of all values seen, exact population
      statistics for equal-size batches; "average": the count-weighted average of the
      per-batch variances, what training-mode normalization divided by (PyTorch's
      `update_bn`, fvcore's PreciseBN). Which to choose, measured: the guide's "Precise
      statistics after training" (docs/guide/variants.md).
    **call_kwargs: passed to every call (linen: to `apply`, e.g. `train=True` or
      `use_running_average=False`, `rngs=`; they must put jaxbn's BatchNorms in training
      mode). nnx: jaxbn's BatchNorms are put in training mode on a copy of the model.

  Returns:
    linen: new variables, `batch_stats` mean/var replaced (other collections untouched).
    nnx: `model`, its BatchNorms' `mean` and `var` replaced.
    Either way a layer that did not run in training mode keeps its statistics, and so does
    a feature that saw no values (all masked) or, with `unbiased_running_var`, one value.

  Raises:
    ValueError: no batches, no jaxbn BatchNorm ran in training mode, or an unknown
      `variance`.
    TypeError: called under `jax.jit` / `nnx.jit` (or another JAX transformation), where
      the statistics cannot reach the host.

  Warns:
    UserWarning: for each `flax.linen.BatchNorm` / `flax.nnx.BatchNorm` in the model, whose
      running statistics are left as they are.
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
  """Per-layer statistics over the batches, in float64, elementwise (a layer's variables may
  hold a leading scan or ensemble axis): count, mean and biased variance pooled (Chan et al.),
  and the count-weighted sum of the per-batch variances (for "average")."""

  def __init__(self):
    self.layers: dict[str, dict[str, np.ndarray]] = {}

  def add(self, name: str, acc: Mapping[str, Any]) -> None:
    """Pools one batch's accumulators (`jaxbn._recording`) into the layer's totals."""
    new = {key.removeprefix("recompute_"): np.asarray(acc[key], np.float64)
           for key in _recording.NAMES}
    if name not in self.layers:
      self.layers[name] = new
      return
    old = self.layers[name]
    total = old["count"] + new["count"]
    weight = np.divide(new["count"], total, out=np.zeros_like(total), where=total > 0)
    delta = new["mean"] - old["mean"]
    # T'·V' = T·V + c·v + δ²·T·c/T'
    self.layers[name] = {
        "calls": old["calls"] + new["calls"],
        "count": total,
        "mean": old["mean"] + weight * delta,
        "var": (1 - weight) * old["var"] + weight * new["var"]
               + weight * (1 - weight) * delta**2,
        "var_sum": old["var_sum"] + new["var_sum"],
        "unbiased": np.maximum(old["unbiased"], new["unbiased"]),
    }

  def ran(self, name: str) -> bool:
    return name in self.layers and bool(np.any(self.layers[name]["calls"] > 0))

  def result(self, name: str, variance: str, old_mean: Any, old_var: Any
             ) -> tuple[np.ndarray, np.ndarray]:
    """The recomputed mean and variance; where a feature saw no values (or, unbiased, one),
    the old ones, as a training step would keep them."""
    layer = self.layers[name]
    total, var, unbiased = layer["count"], layer["var"], layer["unbiased"] > 0
    if variance == "average":
      var = np.divide(layer["var_sum"], total, out=np.zeros_like(var), where=total > 0)
    else:
      var = np.where(unbiased, var * total / np.maximum(total - 1, 1), var)
    return (np.where(total > 0, layer["mean"], np.asarray(old_mean, np.float64)),
            np.where(total > unbiased, var, np.asarray(old_var, np.float64)))


def _batch_args(batch) -> tuple:
  return batch if isinstance(batch, tuple) else (batch,)


def _pool_batches(run, batches, owner: str) -> _Pool:
  """Runs every batch (`run` returns each layer's accumulators by name) and pools them."""
  pool = _Pool()
  seen = 0
  for batch in batches:
    accumulators = run(_batch_args(batch))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(accumulators)):
      # Under an outer jit the statistics are traced values: they cannot be pooled on the host.
      raise TypeError(
          "recompute_batch_stats was called under jax.jit (or nnx.jit, or another JAX "
          "transformation): it pools the statistics on the host, in float64, and so needs "
          "concrete values; call it outside jit, with concrete variables (nnx: a model "
          "outside the transformation) and batches.")
    for name, acc in jax.device_get(accumulators).items():
      pool.add(name, acc)
    seen += 1
  if not seen:
    raise ValueError("recompute_batch_stats: batches is empty.")
  if not any(pool.ran(name) for name in pool.layers):
    raise ValueError(
        f"recompute_batch_stats: no jaxbn BatchNorm ran in training mode in {owner}; "
        "pass what puts them in training mode (linen: e.g. train=True or "
        "use_running_average=False), and use jaxbn.linen / jaxbn.nnx BatchNorm layers.")
  return pool


def _running_stats_layers(tree: Mapping, path: tuple[str, ...] = ()
                          ) -> dict[str, tuple[str, ...]]:
  """The paths, by name, of the dicts in a batch_stats tree that hold a running `mean` and
  `var` (any BatchNorm's: which of them are jaxbn's only the run tells)."""
  found = {}
  if hasattr(tree.get("mean"), "shape") and hasattr(tree.get("var"), "shape"):
    found["/".join(path)] = path
  for key, value in tree.items():
    if isinstance(value, Mapping):
      found.update(_running_stats_layers(value, (*path, key)))
  return found


def _at(tree: Mapping, path: tuple[str, ...]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def _replaced(tree: Mapping, path: tuple[str, ...], values: Mapping) -> dict:
  """A copy of `tree` with the dict at `path` updated by `values` (the dicts along the path
  copied, the rest shared)."""
  tree = dict(tree)
  if not path:
    return {**tree, **values}
  tree[path[0]] = _replaced(tree[path[0]], path[1:], values)
  return tree


def _recompute_linen(model, variables, batches, variance, call_kwargs):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  batch_stats = variables.get("batch_stats", {})
  layers = _running_stats_layers(batch_stats)
  with_accumulators = batch_stats
  for path in layers.values():
    with_accumulators = _replaced(with_accumulators, path,
                                  _recording.zeros(_at(batch_stats, path)["mean"]))
  flax_layers: set[str] = set()

  def spot_flax(next_fun, args, kwargs, context):
    # At trace time: the path is static, so nothing traced leaves the transforms.
    if isinstance(context.module, nn.BatchNorm):
      flax_layers.add("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  @jax.jit
  def run(variables, args):
    with nn.intercept_methods(spot_flax):
      _, updates = model.apply(variables, *args, mutable=["batch_stats"], **call_kwargs)
    return {name: {key: _at(updates["batch_stats"], path)[key] for key in _recording.NAMES}
            for name, path in layers.items()}

  variables_in = {**variables, "batch_stats": with_accumulators}
  pool = _pool_batches(lambda args: run(variables_in, args), batches, type(model).__name__)
  for name in sorted(flax_layers):
    warnings.warn(_flax_warning("flax.linen.BatchNorm", name), stacklevel=3)
  for name, path in layers.items():
    if pool.ran(name):
      layer = _at(batch_stats, path)
      mean, var = pool.result(name, variance, layer["mean"], layer["var"])
      batch_stats = _replaced(batch_stats, path, {
          "mean": jnp.asarray(mean, layer["mean"].dtype),
          "var": jnp.asarray(var, layer["var"].dtype)})
  return {**variables, "batch_stats": batch_stats}


def _flax_warning(kind: str, name: str) -> str:
  return (f"recompute_batch_stats: the {kind} at '{name}' is Flax's, not jaxbn's: its running "
          "statistics are left as they are (only jaxbn BatchNorm layers report their batch "
          "statistics; replace it with jaxbn's to have them recomputed).")


def _recompute_nnx(model, batches, variance, call_kwargs):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxbn import nnx as jaxbn_nnx  # pylint: disable=import-outside-toplevel

  def layers(root, kind=jaxbn_nnx.BatchNorm):
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(root)
            if isinstance(node, kind)}

  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, args):
    copy = nnx.merge(graphdef, state)  # its updates (EMA, rng counters) are dropped
    ours = layers(copy)
    for layer in ours.values():
      layer.use_running_average = False
      # BatchStats shaped like the running mean: nnx transforms split and carry them as
      # they do the running statistics.
      for key, zeros in _recording.zeros(layer.mean[...]).items():
        setattr(layer, key, nnx.BatchStat(zeros))
    copy(*args, **call_kwargs)
    return {name: {key: getattr(layer, key)[...] for key in _recording.NAMES}
            for name, layer in ours.items()}

  pool = _pool_batches(lambda args: run(state, args), batches, type(model).__name__)
  for name in sorted(layers(model, nnx.BatchNorm)):
    warnings.warn(_flax_warning("flax.nnx.BatchNorm", name), stacklevel=3)
  for name, layer in layers(model).items():
    if pool.ran(name):
      mean, var = pool.result(name, variance, layer.mean[...], layer.var[...])
      layer.mean[...] = jnp.asarray(mean, layer.mean[...].dtype)
      layer.var[...] = jnp.asarray(var, layer.var[...].dtype)
  return model
