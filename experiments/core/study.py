"""What a study is: one record that `experiments.registry` lists and the training core runs.

The core knows studies only through this record: it validates the config with `validate`,
trains with `run`, and hands what `run` returned to `write_outputs`. A study's code lives in
its own package under `experiments/studies/`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import ml_collections

from experiments.core.config import ConfigError


def _accept(config: ml_collections.ConfigDict) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Study:
  """One study (`config.study`).

  Attributes:
    name: the value of `config.study` that selects it.
    run: `run(ctx: train.Context) -> outcome`, a dict with at least "results" (per run:
      final accuracy, divergence, speed); trains every run of the study, resuming each.
    write_outputs: `write_outputs(config, workdir, outcome) -> summary`: plots/, summary.json
      and summary.md, written by process 0 only.
    validate: `validate(config)` raises `config.ConfigError` naming the key when the study
      cannot run this config; called before anything is written.
    trains_equinox: whether its nets are `models.create`'s for every `model.bn_impl`, the
      Equinox net included (studies with nets of their own are not).
  """

  name: str
  run: Callable[..., dict]
  write_outputs: Callable[[ml_collections.ConfigDict, pathlib.Path, dict], dict]
  validate: Callable[[ml_collections.ConfigDict], None] = _accept
  trains_equinox: bool = False


def check(study: Study, config: ml_collections.ConfigDict) -> None:
  """The study's own checks of `config`, and whether it trains the config's kind of net."""
  if config.model.bn_impl == "equinox" and not study.trains_equinox:
    raise ConfigError(f"config.model.bn_impl 'equinox' is not for study {study.name!r}: it "
                      "trains nets of its own, not the config's model.")
  study.validate(config)
