"""Train-step throughput benchmark (experiments/benchmark.py): the paper MLP and the CNN."""

import ml_collections

from configs import default


def get_config():
  config = ml_collections.ConfigDict()
  config.nets = ("mlp", "cnn")
  config.model = default.get_config().model
  config.batch_size = {"mlp": 60, "cnn": 128}
  config.steps_per_call = {"mlp": 200, "cnn": 5}
  config.dataset_size = 2048
  config.repeats = 15
  return config
