"""Batch samplers for the renorm studies: i.i.d. batches, and non-i.i.d. ones of few classes.

Both are pure functions of a key, so they run inside a jitted `lax.scan` and a resumed run
sees the batches an uninterrupted one would (as `train.sample_batch`).

A non-i.i.d. batch (the renorm paper's second claim, Ioffe 2017 §4.3) holds
`classes_per_batch` distinct classes, `batch_size // classes_per_batch` examples of each:
BN's batch statistics then carry the batch's classes, which training mode can exploit and
inference (population statistics) cannot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def class_table(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """The examples of each class: `(table, counts)`, `table[c, :counts[c]]` the indices of
  class c's examples in order (the rest of its row repeats its first index, never read by
  `sample_noniid`, which draws below `counts[c]`)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()} to "
                     f"{labels.max()}.")
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  table = np.zeros((num_classes, max(int(counts.max(initial=0)), 1)), np.int32)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size:
      table[c] = members[0]
      table[c, :members.size] = members
  return table, counts


def check_noniid(counts: np.ndarray, *, batch_size: int, classes_per_batch: int) -> None:
  """Raises, naming the arguments, unless the batches `sample_noniid` would draw exist."""
  present = int(np.count_nonzero(counts))
  if not 1 <= classes_per_batch <= present:
    raise ValueError(f"classes_per_batch must be in [1, {present}] (the classes with "
                     f"examples), got {classes_per_batch}.")
  if batch_size % classes_per_batch:
    raise ValueError(f"classes_per_batch ({classes_per_batch}) must divide batch_size "
                     f"({batch_size}): each class gets the same share of a batch.")


def sample_noniid(key: jax.Array, table: jax.Array, counts: jax.Array, *, batch_size: int,
                  classes_per_batch: int) -> jax.Array:
  """Indices of one non-i.i.d. batch: `classes_per_batch` distinct classes (uniform among the
  classes with examples), `batch_size // classes_per_batch` examples of each drawn with
  replacement, in a random order (so a ghost batch is a random subset of the batch, not one
  class)."""
  class_key, example_key, order_key = jax.random.split(key, 3)
  present = (counts > 0).astype(jnp.float32)
  classes = jax.random.choice(class_key, counts.shape[0], (classes_per_batch,), replace=False,
                              p=present / present.sum())
  per_class = batch_size // classes_per_batch
  within = jax.random.randint(example_key, (classes_per_batch, per_class), 0,
                              counts[classes][:, None])
  return jax.random.permutation(order_key, table[classes[:, None], within].reshape(-1))


def sample_iid(key: jax.Array, num_examples: int, *, batch_size: int) -> jax.Array:
  """Indices of one i.i.d. batch, drawn with replacement (as `train.sample_batch`)."""
  return jax.random.randint(key, (batch_size,), 0, num_examples)
