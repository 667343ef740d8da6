"""Ghost (virtual) batches as a reshape: each virtual batch becomes one more feature index.

Keras 2's layout (`tf.keras.layers.BatchNormalization(virtual_batch_size=v)`): the batch axis
of size N becomes (v, N/v), and the new axis of size G = N/v is a feature axis. So virtual
batch g holds the examples g, g + G, g + 2G, …; for a shuffled batch that is as random a split
as contiguous chunks, and for a dense (N, C) input the feature axes (G, C) stay contiguous,
so the C++ CPU kernels serve it unchanged. Eqs. (1)-(7) hold per (virtual batch, feature).
Called by `jaxbn.ops.batch_norm`: the reshape before the core, the averaging after it.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VirtualBatches:
  """Where the virtual batches go: x's batch axis `batch_axis` (size v·groups) splits into
  (v, groups); the groups axis is batch_axis + 1 in the reshaped x, and sits at position
  `position` among the reshaped feature axes."""

  batch_axis: int
  size: int  # v
  groups: int  # G = N / v
  position: int

  def split_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    b = self.batch_axis
    if shape[b] == 1:  # a mask that does not vary along the batch
      return shape[:b] + (1, 1) + shape[b + 1:]
    return shape[:b] + (self.size, self.groups) + shape[b + 1:]

  def split(self, value: jax.Array) -> jax.Array:
    return value.reshape(self.split_shape(value.shape))

  def features(self, features: tuple[int, ...]) -> tuple[int, ...]:
    """The reshaped x's feature axes: the groups axis and the original ones, shifted."""
    shifted = tuple(a if a < self.batch_axis else a + 1 for a in features)
    return tuple(sorted(shifted + (self.batch_axis + 1,)))

  def per_group(self, value: jax.Array) -> jax.Array:
    """A per-feature vector (feature shape) repeated for every virtual batch; its cotangent
    is the sum over them (JAX transposes the broadcast)."""
    value = jnp.expand_dims(value, self.position)
    shape = value.shape[:self.position] + (self.groups,) + value.shape[self.position + 1:]
    return jnp.broadcast_to(value, shape)

  def average(self, stats):
    """`BatchStats` per virtual batch → the virtual batches' count-weighted mean of μ and of
    the biased variance (Keras 2 feeds its moving averages the plain mean; they agree without
    a mask), and their mean count; r and d keep the virtual batches' axis."""
    p = self.position
    weights = stats.count / jnp.maximum(jnp.sum(stats.count, axis=p, keepdims=True), 1)
    average = lambda v: jnp.sum(weights * v, axis=p)
    return stats._replace(mean=average(stats.mean), var=average(stats.var),
                          count=jnp.mean(stats.count, axis=p))


def virtual_batches(shape: tuple[int, ...], features: tuple[int, ...],
                    reductions: tuple[int, ...], virtual_batch_size) -> VirtualBatches | None:
  """The virtual batches of `virtual_batch_size` examples, checked against x's batch axis (the first
  reduction axis), or None for ordinary batch statistics.

  Any integer counts, a NumPy one (a config loaded with NumPy) as the Python int it equals;
  a bool (Python's or NumPy's), a float or a string is a TypeError, a size below 1 a
  ValueError.
  """
  if virtual_batch_size is None:
    return None
  if (isinstance(virtual_batch_size, (bool, np.bool_))
      or not isinstance(virtual_batch_size, numbers.Integral)):
    raise TypeError(
        f"virtual_batch_size must be an int or None, got {virtual_batch_size!r}.")
  virtual_batch_size = int(virtual_batch_size)
  if virtual_batch_size < 1:
    raise ValueError(
        f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}.")
  if not reductions:
    raise ValueError(f"virtual_batch_size={virtual_batch_size} needs a batch axis, but every "
                     f"axis of x (shape {shape}) is a feature axis.")
  b = reductions[0]
  n = shape[b]
  if n % virtual_batch_size:
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} does not divide the batch: x has shape "
        f"{shape} and its batch axis {b} has size {n}.")
  return VirtualBatches(batch_axis=b, size=virtual_batch_size, groups=n // virtual_batch_size,
                        position=sum(a < b for a in features))
