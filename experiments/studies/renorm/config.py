"""Checks of the `renorm` config keys and what the renorm studies need of the rest."""

from __future__ import annotations

from experiments.core import config as config_lib

NORMS = ("bn", "renorm", "plain")


def validate(config) -> None:
  """Refuses, naming the key, what the renorm studies cannot run (before anything is
  written)."""
  r = config.renorm
  config_lib.check_seeds("renorm.seeds", r.seeds)
  if not r.norms or not set(r.norms) <= set(NORMS) or len(set(r.norms)) != len(r.norms):
    raise config_lib.ConfigError(f"config.renorm.norms must be a non-empty subset of {NORMS} "
                                 f"without repeats, got {r.norms!r}.")
  if not r.group_sizes or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 2
                                  and config.batch_size % g == 0 for g in r.group_sizes):
    raise config_lib.ConfigError(f"config.renorm.group_sizes must be ints >= 2 that divide "
                                 f"config.batch_size ({config.batch_size}), got "
                                 f"{r.group_sizes!r}.")
  if not r.rmax >= 1:
    raise config_lib.ConfigError(f"config.renorm.rmax must be >= 1, got {r.rmax!r}.")
  if not r.dmax >= 0:
    raise config_lib.ConfigError(f"config.renorm.dmax must be >= 0, got {r.dmax!r}.")
  if not 0 < r.momentum < 1:
    raise config_lib.ConfigError(f"config.renorm.momentum must be in (0, 1), got "
                                 f"{r.momentum!r}.")
  for key in ("warmup_steps", "classes_per_batch"):
    if not r[key] >= 0:
      raise config_lib.ConfigError(f"config.renorm.{key} must be >= 0, got {r[key]!r}.")
  if not r.recompute_batches >= 1:
    raise config_lib.ConfigError(f"config.renorm.recompute_batches must be >= 1, got "
                                 f"{r.recompute_batches!r}.")
  if config.model.name != "mlp":
    raise config_lib.ConfigError(f"config.model.name must be 'mlp' for study {config.study}, "
                                 f"got {config.model.name!r}.")
  if config.data_parallel:
    raise config_lib.ConfigError(f"config.data_parallel must be False for study "
                                 f"{config.study} (the seeds are vmapped on one device).")
  if config.study == "renorm_noniid":
    if not r.classes_per_batch:
      raise config_lib.ConfigError("config.renorm.classes_per_batch must be > 0 for study "
                                   "renorm_noniid.")
    if config.batch_size % r.classes_per_batch or r.classes_per_batch > 10:
      raise config_lib.ConfigError(f"config.renorm.classes_per_batch ({r.classes_per_batch}) "
                                   f"must divide config.batch_size ({config.batch_size}) and "
                                   "be at most the 10 classes.")
  elif r.classes_per_batch:
    raise config_lib.ConfigError(f"config.renorm.classes_per_batch must be 0 (i.i.d. batches) "
                                 f"for study {config.study}, got {r.classes_per_batch}.")
