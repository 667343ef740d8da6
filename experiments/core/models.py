"""The BN paper's MLP and a small CNN, each with BatchNorm switchable off.

`bn_impl="flax"` swaps in `flax.linen.BatchNorm` (same variables) for benchmarks;
`bn_impl="equinox"` trains the MLP written in Equinox with `jaxbn.equinox.BatchNorm`
(`experiments.core.equinox_models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

import jaxbn.linen

ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu, "linear": lambda x: x}  # linear: a deep linear net


def batch_norm_layer(impl: str, train: bool, momentum: float, gradient: str, dtype=None):
  """jaxbn's module ("jaxbn"; "jaxbn-xla" without the C++ CPU kernels; "jaxbn-fast" with the
  one-pass variance, which is pure JAX too) or Flax's ("flax", whose default is the one-pass
  variance); `dtype`: the output dtype (None: Flax's inference from x and the parameters)."""
  if impl == "flax":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, dtype=dtype)
  return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=momentum,
                               gradient=gradient, use_fast_variance=impl == "jaxbn-fast",
                               use_cpu_kernel=False if impl == "jaxbn-xla" else None,
                               dtype=dtype)


def _kernel_init(init_std: float | None):
  # The BN paper's Figure 1 starts from "small random Gaussian values".
  return nn.initializers.lecun_normal() if init_std is None else nn.initializers.normal(init_std)


class PaperMLP(nn.Module):
  """784-100-100-100-10 (any input size): Dense → [BN] → activation per hidden layer.

  With BN the hidden Dense layers drop their bias: BN normalizes Wu, and its β takes the
  bias's place (the BN paper, section 3.2). Each activation's input is sown as
  `intermediates/activation_input_{i}` for the diagnostics.
  """

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  batch_norm: bool = True
  activation: str = "sigmoid"
  init_std: float | None = None
  bn_momentum: float = 0.99
  bn_impl: str = "jaxbn"
  gradient: str = "analytic"
  residual: bool = False  # h ← h + act(layer(h)) after the first layer (MNIST-1D's MLP)
  dtype: Any = None  # the layers' computation dtype (the benchmark's bfloat16 steps)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      z = nn.Dense(width, use_bias=not self.batch_norm, kernel_init=_kernel_init(self.init_std),
                   dtype=self.dtype)(h)
      if self.batch_norm:
        z = batch_norm_layer(self.bn_impl, train, self.bn_momentum, self.gradient, self.dtype)(z)
      self.sow("intermediates", f"activation_input_{i}", z)
      a = ACTIVATIONS[self.activation](z)
      h = h + a if self.residual and i > 0 and h.shape == a.shape else a
    return nn.Dense(self.num_classes, kernel_init=_kernel_init(self.init_std), dtype=self.dtype)(h)


class SmallCNN(nn.Module):
  """Two conv blocks, conv → [BN over N·H·W] → ReLU → 2×2 max-pool, then a Dense classifier."""

  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  batch_norm: bool = True
  bn_momentum: float = 0.99
  bn_impl: str = "jaxbn"
  gradient: str = "analytic"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, features in enumerate(self.features):
      x = nn.Conv(features, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = batch_norm_layer(self.bn_impl, train, self.bn_momentum, self.gradient, self.dtype)(x)
      self.sow("intermediates", f"activation_input_{i}", x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


def create(model_config, *, batch_norm: bool, gradient: str | None = None,
           dtype=None) -> nn.Module:
  """The model a config describes, with BN on or off (a study's variant).

  A batch sharded by jit needs nothing here: jaxbn compiles its kernels' pure-JAX twins
  wherever the C++ would see only part of the batch, so XLA partitions BN like any op.
  """
  gradient = gradient or model_config.gradient
  if model_config.bn_impl == "equinox":
    # The paper MLP written in Equinox; config.validate refuses what it does not take.
    from experiments.core import equinox_models
    return equinox_models.EquinoxPaperMLP(
        hidden=tuple(model_config.hidden), batch_norm=batch_norm,
        activation=model_config.activation,
        init_std=model_config.init_std if model_config.init_std > 0 else None,
        bn_momentum=model_config.bn_momentum)
  if model_config.name == "cnn":
    return SmallCNN(features=tuple(model_config.cnn_features), batch_norm=batch_norm,
                    bn_momentum=model_config.bn_momentum, bn_impl=model_config.bn_impl,
                    gradient=gradient, dtype=dtype)
  return PaperMLP(hidden=tuple(model_config.hidden), batch_norm=batch_norm,
                  activation=model_config.activation,
                  init_std=model_config.init_std if model_config.init_std > 0 else None,
                  bn_momentum=model_config.bn_momentum, bn_impl=model_config.bn_impl,
                  gradient=gradient, residual=model_config.residual, dtype=dtype)
