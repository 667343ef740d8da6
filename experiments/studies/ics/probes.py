"""Santurkar et al.'s probes (NeurIPS 2018, "How Does Batch Normalization Help Optimization?"),
as pure functions of a loss or gradient function and parameters.

Nothing here knows about nets, BN or training: each probe takes `loss_fn(params) -> scalar` or
`grad_fn(params) -> grads` over any pytree, so the tests check them on a quadratic ½θᵀAθ whose
answers are known in closed form, and the studies (`ics_studies.py`) call them on nets.

- `internal_covariate_shift`: their Definition 2.1 (§2.2). For layer i, G is the gradient of the
  loss with respect to layer i's weights at θ_t, and G′ the same gradient after the layers
  before i (not i itself, nor those after) took their step-t update, on the same batch.
- `landscape`: their §3.1, Fig. 4. Moving from θ along −g (g = ∇L(θ)) by steps η: the loss at
  each step (its spread is the "variation of the loss"), ‖∇L(θ) − ∇L(θ − ηg)‖ ("gradient
  predictiveness") and that difference over the distance moved, ‖ηg‖, whose largest value over
  the steps is the "effective" β-smoothness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _flat(tree: PyTree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _at(tree: PyTree, path: Sequence[str]) -> PyTree:
  for key in path:
    tree = tree[key]
  return tree


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  # A zero gradient has no direction: its cosine with anything is taken as 1 when both are
  # zero (nothing moved) and 0 otherwise, never NaN.
  norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  both_zero = (jnp.linalg.norm(a) == 0) & (jnp.linalg.norm(b) == 0)
  return jnp.where(both_zero, 1.0, jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0))


def internal_covariate_shift(grad_fn: Callable[[PyTree], PyTree], params: dict,
                             updated: dict, *, layers: Sequence[Sequence[str]],
                             weights: Sequence[Sequence[str]]) -> dict[str, jax.Array]:
  """ICS of every layer as Santurkar et al. define it (Definition 2.1).

  Args:
    grad_fn: params -> gradients of the loss on one fixed batch (same structure as params).
    params: θ_t, a dict of top-level parameter groups (Flax's `params`).
    updated: θ_{t+1}, the same dict after the step-t update of every parameter.
    layers: for each layer in depth order, the top-level keys of `params` that belong to it
      (e.g. ("Dense_1", "BatchNorm_1")): layer i's G′ is taken at θ with the groups of layers
      0 … i−1 taken from `updated` and all others from `params`.
    weights: for each layer, the path to its weights in the gradient tree
      (e.g. ("Dense_1", "kernel")): G and G′ are the gradients there.

  Returns:
    {"l2": ‖G − G′‖₂, "relative": ‖G − G′‖₂ / ‖G‖₂, "cosine": cos(G, G′)}, each of shape
    (len(layers),); layer 0 has no earlier layers, so its G′ is G.
  """
  if len(layers) != len(weights):
    raise ValueError(f"layers ({len(layers)} groups) and weights ({len(weights)} paths) must "
                     "name the same layers.")
  known = set(params)
  for group in layers:
    for name in group:
      if name not in known:
        raise ValueError(f"layers names {name!r}, which is not a parameter group "
                         f"(params has {sorted(known)}).")
  grads = grad_fn(params)
  l2, relative, cosine = [], [], []
  for i, path in enumerate(weights):
    earlier = {name for group in layers[:i] for name in group}
    mixed = {name: updated[name] if name in earlier else value for name, value in params.items()}
    g = jnp.ravel(_at(grads, path))
    # Nothing before the first layer moves: its G′ is G, with no second backward.
    g_shifted = jnp.ravel(_at(grad_fn(mixed), path)) if earlier else g
    difference = jnp.linalg.norm(g - g_shifted)
    norm = jnp.linalg.norm(g)
    l2.append(difference)
    relative.append(difference / jnp.where(norm > 0, norm, 1.0))
    cosine.append(_cosine(g, g_shifted))
  return {"l2": jnp.stack(l2), "relative": jnp.stack(relative), "cosine": jnp.stack(cosine)}


def landscape(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
              step_sizes: jax.Array) -> dict[str, jax.Array]:
  """The loss and gradient along the gradient direction, at each step size η (Fig. 4).

  Args:
    loss_fn: params -> scalar loss on one fixed batch.
    params: θ.
    step_sizes: (K,) positive step sizes η.

  Returns:
    "loss": (K,) L(θ − ηg); "grad_change": (K,) ‖∇L(θ) − ∇L(θ − ηg)‖ (gradient
    predictiveness: small is predictive); "smoothness": (K,) that change over the distance
    moved, ‖ηg‖ (its max over η is the effective β-smoothness); "loss_at_start": L(θ);
    "grad_norm": ‖g‖.
  """
  step_sizes = jnp.asarray(step_sizes)
  if step_sizes.ndim != 1:
    raise ValueError(f"step_sizes must be 1-D (one η per point), got shape {step_sizes.shape}.")
  loss, grads = jax.value_and_grad(loss_fn)(params)
  g = _flat(grads)
  g_norm = jnp.linalg.norm(g)

  def along(eta):
    moved = jax.tree.map(lambda p, d: p - eta.astype(p.dtype) * d, params, grads)
    loss_moved, grads_moved = jax.value_and_grad(loss_fn)(moved)
    change = jnp.linalg.norm(g - _flat(grads_moved))
    distance = eta * g_norm
    return loss_moved, change, change / jnp.where(distance > 0, distance, 1.0)

  losses, changes, smoothness = jax.lax.map(along, step_sizes)
  return {"loss": losses, "grad_change": changes, "smoothness": smoothness,
          "loss_at_start": loss, "grad_norm": g_norm}


def summarize_landscape(probe: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One training point's numbers as the paper plots them: the range of the loss over the
  steps (min, max), the range of the gradient change (min, max) and the effective
  β-smoothness (the largest change per distance moved)."""
  return {"loss_min": jnp.min(probe["loss"]), "loss_max": jnp.max(probe["loss"]),
          "grad_change_min": jnp.min(probe["grad_change"]),
          "grad_change_max": jnp.max(probe["grad_change"]),
          "beta_smoothness": jnp.max(probe["smoothness"])}
