"""Checks of the `probes` config keys, for the studies of `ics_studies.py` (called from
`config.validate`, so a bad value is refused before the workdir is written)."""

from __future__ import annotations

PROBE_STUDIES = ("noisy_bn", "ics", "landscape")


def validate(config, error: type[Exception]) -> None:
  """Raises `error` naming the key when the probes' settings cannot run."""
  if config.study not in PROBE_STUDIES:
    return
  probes = config.probes
  if config.model.name != "mlp":
    raise error(f"config.model.name must be 'mlp' for study {config.study!r} (the probes "
                f"group parameters by Dense_i/BatchNorm_i layers), got {config.model.name!r}.")
  if config.model.residual:
    raise error(f"config.model.residual must be False for study {config.study!r} (Definition "
                "2.1's 'earlier layers' assume a plain chain of layers).")
  if not probes.noise_mean_range >= 0:
    raise error(f"config.probes.noise_mean_range must be >= 0, got {probes.noise_mean_range!r}.")
  std = tuple(probes.noise_std_range)
  if len(std) != 2 or not 0 <= std[0] <= std[1]:
    raise error(f"config.probes.noise_std_range must be (low, high) with 0 <= low <= high, "
                f"got {std!r}.")
  multiples = tuple(probes.step_multiples)
  if not multiples or not all(m > 0 for m in multiples):
    raise error(f"config.probes.step_multiples must be a non-empty tuple of positive "
                f"multiples of the learning rate, got {multiples!r}.")
