"""The paper nets over learning rates 0.01 … 5: final accuracy and divergence, BN vs plain."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "lr_sweep"
  config.num_steps = 5000
  config.eval_every = 500
  config.checkpoint_every = 5000
  config.sweep.learning_rates = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
  return config
