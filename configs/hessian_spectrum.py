"""Ghorbani et al.'s spectrum study on the paper_fig1 net: the Hessian of the training loss at
steps 100, 500, 1000 and 2000 of SGD, BN vs no BN, three seeds.

ics_definition's training (a constant rate of 1.0: at paper_fig1's 0.2 the plain net would
still sit on its plateau at chance over these steps), shortened to 2,000 steps."""

from configs import ics_definition


def get_config():
  config = ics_definition.get_config()
  config.study = "hessian_spectrum"
  config.num_steps = 2000
  config.eval_every = 100
  config.checkpoint_every = 1000
  config.hessian.probe_steps = (100, 500, 1000, 2000)
  return config
