"""Ghorbani et al.'s spectrum study on the paper_fig1 net: the Hessian of the training loss at
steps 100, 500, 1000 and 2000 of SGD, BN vs no BN, three seeds.

A constant rate of 1.0, as ics_definition: at paper_fig1's 0.2 the plain net would still sit
on its plateau at chance over these steps (docs/experiments.md)."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "hessian_spectrum"
  config.optimizer.learning_rate = 1.0
  config.optimizer.schedule = "constant"
  config.num_steps = 2000
  config.eval_every = 100
  config.checkpoint_every = 1000
  config.hessian.probe_steps = (100, 500, 1000, 2000)
  return config
