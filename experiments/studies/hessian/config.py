"""Checks of the `hessian` config keys and what the Hessian studies need of the rest (run
before anything is written)."""

from __future__ import annotations

from experiments.core import config as config_lib
from experiments.core.config import ConfigError

_AT_LEAST_ONE = ("batches", "lanczos_order", "density_runs", "top_k", "concentration_k",
                 "population_every", "population_batches", "hvp_vectors")


def validate(config) -> None:
  """Raises ConfigError naming the key when the Hessian studies cannot run this config."""
  h = config.hessian
  config_lib.check_seeds("hessian.seeds", h.seeds)
  for key in _AT_LEAST_ONE:
    if not (isinstance(h[key], int) and h[key] >= 1):
      raise ConfigError(f"config.hessian.{key} must be an int >= 1, got {h[key]!r}.")
  steps = tuple(h.probe_steps)
  if not steps or not all(isinstance(s, int) and 0 < s <= config.num_steps
                          and s % config.eval_every == 0 for s in steps):
    raise ConfigError(f"config.hessian.probe_steps must be a non-empty tuple of multiples of "
                      f"config.eval_every ({config.eval_every}) up to config.num_steps "
                      f"({config.num_steps}), got {steps!r}.")
  if not h.concentration_k <= h.top_k <= h.lanczos_order:
    raise ConfigError(f"config.hessian needs concentration_k <= top_k <= lanczos_order, got "
                      f"{h.concentration_k}, {h.top_k}, {h.lanczos_order}.")
  if not h.trace_samples >= 2:
    raise ConfigError(f"config.hessian.trace_samples must be >= 2 (for a standard error), "
                      f"got {h.trace_samples!r}.")
  factors = tuple(h.outlier_factors)
  if not factors or not all(f > 1 for f in factors):
    raise ConfigError(f"config.hessian.outlier_factors must be a non-empty tuple of factors "
                      f"> 1, got {factors!r}.")
  if config.data_parallel:
    raise ConfigError(f"config.data_parallel must be False for study {config.study} (the "
                      "Hessian-vector products run on one device).")
  if config.study == "hessian_population" and config.eval_every % h.population_every:
    raise ConfigError(f"config.hessian.population_every ({h.population_every}) must divide "
                      f"config.eval_every ({config.eval_every}) for study hessian_population.")
