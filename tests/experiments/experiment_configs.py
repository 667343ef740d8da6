"""What the experiment tests share: a config shrunk by dotted-key overrides, a silent reporter.

(Not a test module: pytest collects only test_*.py. The tests import it by name, since pytest
puts this folder on sys.path.)
"""

import importlib
import io

from experiments.core import progress


def override(config, settings: dict):
  """`config` with each dotted key of `settings` ("model.hidden", "batch_size") set."""
  for key, value in settings.items():
    *groups, field = key.split(".")
    target = config
    for group in groups:
      target = target[group]
    target[field] = value
  return config


def load(name: str, settings: dict):
  """configs/<name>.py's get_config() with `settings` applied."""
  return override(importlib.import_module(f"configs.{name}").get_config(), settings)


def quiet_reporter():
  """A progress reporter that prints nothing (its lines go to a string)."""
  return progress.LogReporter(stream=io.StringIO())
