"""Noisy BN (Santurkar et al. §2.1, Fig. 2): BN's output shifted by noise whose own mean and
variance are random and redrawn at every training step, so that the next layer's input
distribution moves from step to step, however well BN had fixed it.

At each step, for every activation (feature) j of the layer:

    m_j ~ U(−mean_range, mean_range)        the noise's mean this step
    s_j ~ U(std_low, std_high)               the noise's standard deviation this step
    y′_ij = y_ij + m_j + s_j·z_ij,  z_ij ~ N(0, 1) i.i.d. over examples i

so the noise is i.i.d. over the batch's examples within a step, with a non-zero mean and a
non-unit variance that change every step. The draws come from the `noise` RNG stream: the
training step passes `rngs={"noise": fold_in(key, step)}`, so a resumed run draws what an
uninterrupted one would. In inference mode the layer is the identity (the net is evaluated
clean, with BN's running statistics).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from experiments.core import models


class BatchNoise(nn.Module):
  """Adds this step's noise (see the module docstring) in training mode.

  The step's drawn per-feature mean and standard deviation are sown as
  `intermediates/noise_mean` and `intermediates/noise_std`, for the tests and diagnostics.
  """

  mean_range: float
  std_range: tuple[float, float]

  @nn.compact
  def __call__(self, y: jax.Array, train: bool) -> jax.Array:
    if not train:
      return y
    low, high = self.std_range
    key_mean, key_std, key_z = jax.random.split(self.make_rng("noise"), 3)
    features = y.shape[-1:]
    mean = jax.random.uniform(key_mean, features, y.dtype, -self.mean_range, self.mean_range)
    std = jax.random.uniform(key_std, features, y.dtype, low, high)
    self.sow("intermediates", "noise_mean", mean)
    self.sow("intermediates", "noise_std", std)
    return y + mean + std * jax.random.normal(key_z, y.shape, y.dtype)


class NoisyBNMLP(nn.Module):
  """`models.PaperMLP` with BN followed by `BatchNoise` in every hidden layer.

  The layers' names (Dense_i, BatchNorm_i) are PaperMLP's, so both nets start from the same
  weights for the same seed. The activation's input (after the noise) is sown as
  `intermediates/activation_input_{i}`, as in PaperMLP.
  """

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  activation: str = "sigmoid"
  init_std: float | None = None
  bn_momentum: float = 0.99
  bn_impl: str = "jaxbn"
  gradient: str = "analytic"
  noise_mean_range: float = 0.5
  noise_std_range: tuple[float, float] = (0.5, 1.0)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      z = nn.Dense(width, use_bias=False, kernel_init=models._kernel_init(self.init_std))(h)
      z = models.batch_norm_layer(self.bn_impl, train, self.bn_momentum, self.gradient)(z)
      z = BatchNoise(self.noise_mean_range, tuple(self.noise_std_range),
                     name=f"BatchNoise_{i}")(z, train)
      self.sow("intermediates", f"activation_input_{i}", z)
      h = models.ACTIVATIONS[self.activation](z)
    return nn.Dense(self.num_classes, kernel_init=models._kernel_init(self.init_std))(h)


def create(model_config, probes_config, *, gradient: str | None = None) -> NoisyBNMLP:
  """The config's MLP with noisy BN (the MLP only: the noise follows PaperMLP's layers)."""
  return NoisyBNMLP(hidden=tuple(model_config.hidden), activation=model_config.activation,
                    init_std=model_config.init_std if model_config.init_std > 0 else None,
                    bn_momentum=model_config.bn_momentum, bn_impl=model_config.bn_impl,
                    gradient=gradient or model_config.gradient,
                    noise_mean_range=probes_config.noise_mean_range,
                    noise_std_range=tuple(probes_config.noise_std_range))

