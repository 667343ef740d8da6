"""Config validation of the keys every study shares: each error names the key and is raised
before any work or write. A study checks its own section (`Study.validate`)."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.core import data, schema

CHOICES = {
    "data.name": data.NAMES,
    "model.name": ("mlp", "cnn"),
    "model.activation": ("sigmoid", "relu", "linear"),
    "model.bn_impl": ("jaxbn", "jaxbn-xla", "jaxbn-fast", "flax", "equinox"),
    "model.gradient": ("analytic", "autodiff"),
    "optimizer.name": ("sgd", "adam"),
    "optimizer.schedule": ("constant", "cosine"),
}
POSITIVE = ("batch_size", "num_steps", "eval_every", "checkpoint_every",
            "optimizer.learning_rate", "data.num_samples", "diagnostics.num_examples",
            "model.bn_momentum")
NON_NEGATIVE = ("optimizer.momentum", "model.init_std", "seed", "steps_per_call")
# mnist1d seeds NumPy's global generator with 42 + seed, which must stay below 2**32 (JAX's
# keys would take up to 2**63 - 2: the data key is seed + 1). One limit for every dataset,
# so a seed that runs with one dataset runs with all.
MAX_SEED = 2**32 - 1 - 42
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConfigError(ValueError):
  """A config that cannot run; the message names the key."""


def check_seeds(key: str, seeds) -> None:
  """Refuses `seeds` (a study's several seeds, at config `key`) unless distinct ints in
  [0, MAX_SEED]."""
  if not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds):
    raise ConfigError(f"config.{key} must be distinct ints in [0, {MAX_SEED}], got {seeds!r}.")


def _get(config, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _check_equinox(config: ml_collections.ConfigDict) -> None:
  """The Equinox net (`experiments.core.equinox_models`) is the paper MLP with jaxbn's
  analytic backward, on one device."""
  refused = {"model.name": (config.model.name, "mlp"),
             "model.gradient": (config.model.gradient, "analytic"),
             "model.residual": (config.model.residual, False),
             "data_parallel": (config.data_parallel, False)}
  for key, (value, wanted) in refused.items():
    if value != wanted:
      raise ConfigError(f"config.model.bn_impl 'equinox' trains the paper MLP ({key}={wanted!r}),"
                        f" got config.{key}={value!r}.")
  if importlib.util.find_spec("equinox") is None:
    raise ConfigError("config.model.bn_impl 'equinox' needs Equinox: pip install "
                      "'jaxbn[equinox]'.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks keys and types against the schema (`schema.default_config`) and values against
  ranges."""
  keys = schema.default_config().to_dict()
  _check_keys(config.to_dict(), keys, "")
  _check_finite(config.to_dict(), keys, "")
  if not isinstance(config.study, str):
    raise ConfigError(f"config.study must be a study's name, got {config.study!r}.")
  for key, choices in CHOICES.items():
    if _get(config, key) not in choices:
      raise ConfigError(f"config.{key} must be one of {choices}, got {_get(config, key)!r}.")
  for key in POSITIVE:
    if not _get(config, key) > 0:
      raise ConfigError(f"config.{key} must be > 0, got {_get(config, key)!r}.")
  for key in NON_NEGATIVE:
    if not _get(config, key) >= 0:
      raise ConfigError(f"config.{key} must be >= 0, got {_get(config, key)!r}.")
  if config.seed > MAX_SEED:
    raise ConfigError(f"config.seed must be at most {MAX_SEED} (mnist1d seeds NumPy with "
                      f"42 + seed, below 2**32), got {config.seed}.")
  if (not set(config.variants) <= {"bn", "plain"} or not config.variants
      or len(set(config.variants)) != len(config.variants)):
    raise ConfigError(f"config.variants must be a non-empty subset of ('bn', 'plain') "
                      f"without repeats, got {config.variants!r}.")
  if config.model.bn_impl == "equinox":
    _check_equinox(config)
  if not 0 < config.model.bn_momentum < 1:
    raise ConfigError(f"config.model.bn_momentum must be in (0, 1) (the old value's weight), "
                      f"got {config.model.bn_momentum!r}.")
  widths_key = "model.cnn_features" if config.model.name == "cnn" else "model.hidden"
  widths = _get(config, widths_key)
  if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                           for w in widths):
    raise ConfigError(f"config.{widths_key} must be a non-empty tuple of positive ints, "
                      f"got {widths!r}.")
  if not config.diagnostics.unit < widths[-1]:
    raise ConfigError(f"config.diagnostics.unit ({config.diagnostics.unit}) must be below the "
                      f"last layer's width ({widths[-1]}, config.{widths_key}).")
  if "bn" in config.variants and config.batch_size < 2:
    raise ConfigError(f"config.batch_size must be >= 2 with BatchNorm (one value per feature "
                      f"has no batch statistics), got {config.batch_size}.")
  if jax.process_count() > 1 and not config.data_parallel:
    raise ConfigError(f"config.data_parallel must be True with {jax.process_count()} "
                      "processes (--config.data_parallel=True): each trains on its shard of "
                      "every batch; False would have every process compute the whole batch.")
  if config.data_parallel and config.batch_size % jax.device_count():
    raise ConfigError(f"config.batch_size ({config.batch_size}) must divide evenly over the "
                      f"{jax.device_count()} devices for config.data_parallel.")
  if config.num_steps % config.eval_every:
    raise ConfigError(f"config.num_steps ({config.num_steps}) must be a multiple of "
                      f"config.eval_every ({config.eval_every}): one compiled chunk.")
  if config.steps_per_call and config.eval_every % config.steps_per_call:
    raise ConfigError(f"config.steps_per_call ({config.steps_per_call}) must divide "
                      f"config.eval_every ({config.eval_every}).")
  if config.checkpoint_every % config.eval_every:
    raise ConfigError(f"config.checkpoint_every ({config.checkpoint_every}) must be a multiple "
                      f"of config.eval_every ({config.eval_every}).")
  _check_data(config)


def _check_data(config) -> None:
  """The data must fill a training batch and a test set and fit the model: configs that
  pass every check above can still fail only once training starts, after the workdir is
  written."""
  shape = config.data.synthetic_shape
  if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
    raise ConfigError(f"config.data.synthetic_shape must be a tuple of positive ints, "
                      f"got {tuple(shape)!r}.")
  try:
    found = data.shape_of(config.data)
  except (FileNotFoundError, ValueError) as error:
    raise ConfigError(str(error)) from None
  source = (f"config.data.num_samples ({config.data.num_samples})"
            if config.data.name in ("mnist1d", "synthetic") else
            f"the IDX files in {data.idx_directory(config.data)}")
  if found.num_train < config.batch_size:
    # The diagnostics' fixed batch is the first batch_size training examples; fewer also
    # means every sampled batch repeats examples.
    raise ConfigError(f"{source} gives a training split of {found.num_train}, fewer than "
                      f"config.batch_size ({config.batch_size}).")
  if found.num_test < 1:
    raise ConfigError(f"{source} gives no test examples.")
  if config.model.name == "cnn":
    # Each conv block ends in a 2x2 max-pool with stride 2: k blocks need 2**k pixels a side.
    side = 2 ** len(config.model.cnn_features)
    if len(found.example_shape) != 3 or min(found.example_shape[:2]) < side:
      raise ConfigError(f"config.model.name 'cnn' needs images (height, width, channels) at "
                        f"least {side} pixels a side (config.model.cnn_features has "
                        f"{len(config.model.cnn_features)} blocks, each halving them); "
                        f"config.data.name {config.data.name!r} gives examples of shape "
                        f"{found.example_shape}.")


def _check_finite(config: dict, schema: dict, prefix: str) -> None:
  """Every float field (and every item of a tuple of floats) must be a finite number.

  Training runs in float32: a value finite in Python's float64 but not in float32 (1e39)
  would start the run at inf just the same.
  """
  for key, value in config.items():
    name, expected = f"{prefix}{key}", schema[key]
    if isinstance(expected, dict):
      _check_finite(value, expected, f"{name}.")
      continue
    if isinstance(expected, float):
      items = [(name, value)]
    elif isinstance(expected, (tuple, list)) and expected and isinstance(expected[0], float):
      items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
    else:
      continue
    for where, item in items:
      if isinstance(item, bool) or not isinstance(item, (int, float)):
        raise ConfigError(f"config.{where} must be a number, got {item!r}.")
      if not abs(item) <= FLOAT32_MAX:  # False for nan too
        raise ConfigError(f"config.{where} must be finite (in float32, the precision training "
                          f"runs in), got {item!r}.")


def _check_keys(config: dict, schema: dict, prefix: str) -> None:
  for key, value in config.items():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"config.{name} is not a known key (known here: "
                        f"{', '.join(sorted(schema))}).")
    expected = schema[key]
    if isinstance(expected, dict):
      if not isinstance(value, dict):
        raise ConfigError(f"config.{name} must be a group of keys, got {value!r}.")
      _check_keys(value, expected, f"{name}.")
    elif not _same_type(value, expected):
      raise ConfigError(f"config.{name} must be of type {type(expected).__name__}, got "
                        f"{type(value).__name__} ({value!r}).")


def _same_type(value, expected) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return type(value) is type(expected)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  if isinstance(expected, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(expected))


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def differences(saved: dict, config: dict, prefix: str = "") -> list[str]:
  """Keys whose values differ between a saved config (from JSON) and this one."""
  keys = sorted(set(saved) | set(config))
  found = []
  for key in keys:
    a, b = saved.get(key), config.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      found += differences(a, b, f"{prefix}{key}.")
    elif json.loads(json.dumps(a, default=list)) != json.loads(json.dumps(b, default=list)):
      found.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return found
