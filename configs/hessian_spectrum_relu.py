"""`hessian_spectrum` on the ReLU variant of the paper_fig1 net (LeCun-normal weights, SGD 0.1,
as ics_landscape_relu)."""

from configs import hessian_spectrum


def get_config():
  config = hessian_spectrum.get_config()
  config.model.activation = "relu"
  config.model.init_std = 0.0
  config.optimizer.learning_rate = 0.1
  return config
