"""The nets the step benchmark trains besides the runs' own (`experiments.core.models`): a
CIFAR-style ResNet stage and a wide MLP, written as a user would write them, with the
BatchNorm layer the only thing that changes between implementations.

Both take the runs' model signature, `model(x, train)`, and `models.batch_norm_layer`'s
implementation names, so `benchmarks.steps` trains them exactly as it trains the paper's nets.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.core import models


class _StepNet(nn.Module):
  """What both nets share: the classes, BN on or off and which BN, the activations' dtype."""

  num_classes: int = 10
  batch_norm: bool = True
  bn_impl: str = "jaxbn"
  gradient: str = "analytic"
  dtype: Any = None

  def norm(self, train: bool):
    return models.batch_norm_layer(self.bn_impl, train, 0.9, self.gradient, self.dtype)


class ResNetStage(_StepNet):
  """A stem conv-BN-ReLU, then `blocks` basic blocks (conv-BN-ReLU-conv-BN, + the block's
  input, ReLU), global average pool, Dense. NHWC; without BN the convolutions keep a bias."""

  width: int = 64
  blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    def conv_bn(h):
      h = nn.Conv(self.width, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(h)
      return self.norm(train)(h) if self.batch_norm else h

    x = nn.relu(conv_bn(x))
    for _ in range(self.blocks):
      x = nn.relu(conv_bn(nn.relu(conv_bn(x))) + x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class WideMLP(_StepNet):
  """`depth` layers of Dense (no bias with BN) → BN → ReLU, then Dense."""

  width: int = 1024
  depth: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for _ in range(self.depth):
      h = nn.Dense(self.width, use_bias=not self.batch_norm, dtype=self.dtype)(h)
      h = nn.relu(self.norm(train)(h) if self.batch_norm else h)
    return nn.Dense(self.num_classes, dtype=self.dtype)(h)


# Each net's input (one example's shape).
INPUT_SHAPES = {"mlp": (784,), "cnn": (28, 28, 1), "resnet_stage": (16, 16, 64),
                "wide_mlp": (1024,)}


def create(net: str, model_config, *, batch_norm: bool, bn_impl: str, gradient: str,
           dtype=None) -> nn.Module:
  """`net` ("mlp" and "cnn": the runs' models as `model_config` describes them; or
  "resnet_stage", "wide_mlp") with BN on or off, activations in `dtype` (None: float32)."""
  common = dict(batch_norm=batch_norm, bn_impl=bn_impl, gradient=gradient, dtype=dtype)
  if net == "resnet_stage":
    return ResNetStage(**common)
  if net == "wide_mlp":
    return WideMLP(**common)
  if net not in ("mlp", "cnn"):
    raise ValueError(f"unknown net {net!r}: one of {sorted(INPUT_SHAPES)}")
  config = model_config.copy_and_resolve_references()
  config.name, config.bn_impl = net, bn_impl
  return models.create(config, batch_norm=batch_norm, gradient=gradient, dtype=dtype)
