"""The BN paper's MLP written in Equinox, with `jaxbn.equinox.BatchNorm`, behind a Flax face.

`config.model.bn_impl = "equinox"` trains this net in the studies that train `models.create`'s
nets: the Equinox model's arrays are the Flax `params` (named as the Flax nets name theirs:
Dense_i/kernel, BatchNorm_i/scale, ...), its `eqx.nn.State` the `batch_stats` (a flat dict of
arrays), so that optimizers, checkpoints and the runs' diagnostics see what they see for the
Flax nets; and `__call__(x, train)` vmaps the Equinox model over the batch with
`axis_name="batch"`, as Equinox runs BN. Imported only for that setting: Equinox is an
optional dependency (`jaxbn[equinox]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.equinox import BatchNorm

AXIS = "batch"
# float32 parameters and statistics, as the Flax nets keep them (Equinox's default follows
# JAX's 64-bit mode).
_DTYPE = jnp.float32
_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "linear": lambda x: x}


class _EquinoxMLP(eqx.Module):
  """784-100-100-100-10 on one example: Linear (no bias with BN) → [BatchNorm] → activation;
  returns the logits, the state and each activation's input."""

  layers: tuple
  norms: tuple
  head: eqx.nn.Linear
  activation: str = eqx.field(static=True)

  def __init__(self, in_features, hidden, num_classes, batch_norm, activation, init_std,
               momentum, key):
    keys = jax.random.split(key, len(hidden) + 1)
    widths = (in_features, *hidden)
    layers = []
    for k, (n_in, n_out) in zip(keys, zip(widths[:-1], widths[1:])):
      layer = eqx.nn.Linear(n_in, n_out, use_bias=not batch_norm, dtype=_DTYPE, key=k)
      if init_std is not None:  # the BN paper's "small random Gaussian values"
        layer = eqx.tree_at(lambda l: l.weight, layer,
                            init_std * jax.random.normal(k, layer.weight.shape, _DTYPE))
      layers.append(layer)
    self.layers = tuple(layers)
    self.norms = tuple(BatchNorm(n, AXIS, momentum=momentum, mode="batch", dtype=_DTYPE)
                       for n in hidden) if batch_norm else ()
    self.head = eqx.nn.Linear(widths[-1], num_classes, dtype=_DTYPE, key=keys[-1])
    self.activation = activation

  def __call__(self, x, state):
    h, inputs = x.reshape(-1), []
    for i, layer in enumerate(self.layers):
      z = layer(h)
      if self.norms:
        z, state = self.norms[i](z, state)
      inputs.append(z)
      h = _ACTIVATIONS[self.activation](z)
    return self.head(h), state, inputs


class EquinoxPaperMLP(nn.Module):
  """The paper MLP in Equinox (see the module docstring); same fields as `models.PaperMLP`
  where they apply. Each activation's input is sown as `intermediates/activation_input_{i}`,
  as the Flax nets sow them."""

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  batch_norm: bool = True
  activation: str = "sigmoid"
  init_std: float | None = None
  bn_momentum: float = 0.99

  def _make(self, in_features, key):
    return eqx.nn.make_with_state(_EquinoxMLP)(
        in_features, tuple(self.hidden), self.num_classes, self.batch_norm, self.activation,
        self.init_std, self.bn_momentum, key)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    # The structure of the Equinox model and its state (the arrays are the parameters'):
    skeleton, skeleton_state = self._make(x.shape[1], jax.random.key(0))
    arrays, static = eqx.partition(skeleton, eqx.is_inexact_array)
    paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    names = [_flax_name(path, len(self.hidden)) for path, _ in paths]
    state_leaves, state_treedef = jax.tree.flatten(skeleton_state)

    # The arrays as Flax parameters named as the Flax nets name theirs (Dense_i/kernel,
    # BatchNorm_i/scale, ...), so that the runs' diagnostics find each layer's kernel. At
    # init all of them come from one model made with the first parameter's key.
    made = {}

    def initial(module):
      def init(rng):
        if "leaves" not in made:
          made["leaves"] = jax.tree.leaves(eqx.filter(self._make(x.shape[1], rng)[0],
                                                      eqx.is_inexact_array))
        return {n: leaf for (m, n), leaf in zip(names, made["leaves"]) if m == module}
      return init

    groups = {m: self.param(m, initial(m)) for m in dict.fromkeys(m for m, _ in names)}
    leaves = [groups[m][n] for m, n in names]
    held = self.variable("batch_stats", "equinox", lambda: _as_dict(state_leaves))
    model = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
    state = jax.tree.unflatten(state_treedef, _as_list(held.value, len(state_leaves)))
    if not train:
      model = eqx.nn.inference_mode(model)
    logits, new_state, inputs = jax.vmap(model, axis_name=AXIS, in_axes=(0, None),
                                         out_axes=(0, None, 0))(x, state)
    if train and not self.is_initializing():
      held.value = _as_dict(jax.tree.leaves(new_state))
    for i, z in enumerate(inputs):
      self.sow("intermediates", f"activation_input_{i}", z)
    return logits


def _flax_name(path, num_hidden: int) -> tuple[str, str]:
  """An array's Equinox path (`.layers[i].weight`, `.norms[i].bias`, `.head.weight`) as the
  Flax nets' (module, parameter) names."""
  keys = [getattr(k, "name", getattr(k, "idx", None)) for k in path]
  field, param = keys[0], keys[-1]
  index = num_hidden if field == "head" else keys[1]
  if field == "norms":
    return f"BatchNorm_{index}", {"weight": "scale", "bias": "bias"}[param]
  return f"Dense_{index}", {"weight": "kernel", "bias": "bias"}[param]


def _as_dict(leaves) -> dict:
  return {str(i): leaf for i, leaf in enumerate(leaves)}


def _as_list(values: dict, n: int) -> list:
  return [values[str(i)] for i in range(n)]
