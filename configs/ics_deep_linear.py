"""Santurkar et al. §2.2 (Fig. 5's deep linear network), sized for 2 CPU cores: 10 linear
layers of 100 units (LeCun-normal weights) and a linear read-out on Fashion-MNIST, plain vs
BN, per-layer ICS over 3,000 SGD steps."""

from configs import ics_definition


def get_config():
  config = ics_definition.get_config()
  config.model.activation = "linear"
  config.model.hidden = (100,) * 10
  config.model.init_std = 0.0
  config.optimizer.learning_rate = 0.02
  config.optimizer.schedule = "constant"
  config.num_steps = 3000
  config.eval_every = 100
  config.checkpoint_every = 1500
  return config
