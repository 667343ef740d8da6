"""`ics_landscape` on the ReLU variant of the paper_fig1 net (LeCun-normal weights: ReLU units
from N(0, 0.01²) weights would pass almost no signal), SGD 0.1."""

from configs import ics_landscape


def get_config():
  config = ics_landscape.get_config()
  config.model.activation = "relu"
  config.model.init_std = 0.0
  config.optimizer.learning_rate = 0.1
  return config
