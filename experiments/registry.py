"""Every study by name: the one list `main.py` reads.

A study is a `Study` record (`experiments/core/study.py`) in a package under
`experiments/studies/`; a family's package lists its studies in `STUDIES`. Adding a study to a
family touches that package only; adding a family, its package and one line here.
"""

from __future__ import annotations

import pathlib

import ml_collections

from experiments.core import config as config_lib
from experiments.core import train
from experiments.core.config import ConfigError
from experiments.core import study as study_lib
from experiments.core.study import Study
from experiments.studies import hessian, ics, paper, renorm

STUDIES: dict[str, Study] = {study.name: study for study in (
    *paper.STUDIES,  # compare, lr_sweep, gradient_agreement
    *ics.STUDIES,  # noisy_bn, ics, landscape
    *renorm.STUDIES,  # renorm_groups, renorm_noniid
    *hessian.STUDIES,  # hessian_spectrum, hessian_population, hessian_agreement
)}


def get(name: str) -> Study:
  """The study called `name`; a ConfigError naming `config.study` and the choices if none."""
  if name not in STUDIES:
    raise ConfigError(f"config.study must be one of {tuple(STUDIES)}, got {name!r}.")
  return STUDIES[name]


def validate(config: ml_collections.ConfigDict) -> None:
  """Everything `train_and_evaluate` checks of a config before any work: the keys every study
  shares, then the study's own (ConfigError naming the key)."""
  config_lib.validate(config)
  study_lib.check(get(config.study), config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       **kwargs) -> dict:
  """Runs `config.study` into `workdir` (`train.train_and_evaluate`, which takes the same
  keyword arguments)."""
  return train.train_and_evaluate(config, workdir, study=get(config.study), **kwargs)
