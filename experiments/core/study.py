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
  """

  name: str
  run: Callable[..., dict]
  write_outputs: Callable[[ml_collections.ConfigDict, pathlib.Path, dict], dict]
  validate: Callable[[ml_collections.ConfigDict], None] = _accept
