"""Checks of the `probes` config keys and the model the probes need, for the probe studies
(run before anything is written)."""

from __future__ import annotations

from experiments.core.config import ConfigError


def validate(config) -> None:
  """Raises ConfigError naming the key when the probes' settings cannot run."""
  probes = config.probes
  if config.model.name != "mlp":
    raise ConfigError(f"config.model.name must be 'mlp' for study {config.study!r} (the "
                      "probes group parameters by Dense_i/BatchNorm_i layers), got "
                      f"{config.model.name!r}.")
  if config.model.residual:
    raise ConfigError(f"config.model.residual must be False for study {config.study!r} "
                      "(Definition 2.1's 'earlier layers' assume a plain chain of layers).")
  if not probes.noise_mean_range >= 0:
    raise ConfigError(f"config.probes.noise_mean_range must be >= 0, got "
                      f"{probes.noise_mean_range!r}.")
  std = tuple(probes.noise_std_range)
  if len(std) != 2 or not 0 <= std[0] <= std[1]:
    raise ConfigError(f"config.probes.noise_std_range must be (low, high) with 0 <= low <= high, "
                      f"got {std!r}.")
  multiples = tuple(probes.step_multiples)
  if not multiples or not all(m > 0 for m in multiples):
    raise ConfigError(f"config.probes.step_multiples must be a non-empty tuple of positive "
                      f"multiples of the learning rate, got {multiples!r}.")
