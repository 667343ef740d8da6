"""The seed's motivation: sigmoid saturation and per-layer gradient norms, BN vs plain.

A deeper sigmoid net with N(0, 1) weights starts saturated (|Wu| ≫ 4 for 784 inputs); the diagnostics
record the fraction of sigmoid inputs with |x| > 4 and each layer's gradient norm.
"""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.model.hidden = (100, 100, 100, 100, 100)
  config.model.init_std = 1.0
  config.optimizer.learning_rate = 0.1
  config.num_steps = 10_000
  config.eval_every = 250
  config.checkpoint_every = 2500
  return config
