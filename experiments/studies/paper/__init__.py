"""The BN paper's studies: compare (Figure 1 and saturation), lr_sweep, gradient_agreement."""

from experiments.core.config import ConfigError
from experiments.core.study import Study
from experiments.studies.paper import plots, runs


def _validate_lr_sweep(config) -> None:
  if not config.sweep.learning_rates or min(config.sweep.learning_rates) <= 0:
    raise ConfigError(f"config.sweep.learning_rates must be positive, got "
                      f"{config.sweep.learning_rates!r}.")


def _validate_agreement(config) -> None:
  if "bn" not in config.variants:
    raise ConfigError("config.variants must include 'bn' for study gradient_agreement.")


STUDIES = (
    Study("compare", run=runs.study_compare, write_outputs=plots.write_compare,
          trains_equinox=True),
    Study("lr_sweep", run=runs.study_lr_sweep, write_outputs=plots.write_lr_sweep,
          validate=_validate_lr_sweep, trains_equinox=True),
    Study("gradient_agreement", run=runs.study_gradient_agreement,
          write_outputs=plots.write_agreement, validate=_validate_agreement),
)
