"""Santurkar et al. §3.1 (Fig. 4): along the gradient from the current point, over steps of
0.25 … 4 × the learning rate: the loss's range, the gradient's change and the effective
β-smoothness, every 125 of 5,000 SGD steps (constant rate 1.0) of the paper_fig1 net, plain
vs BN."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "landscape"
  # The steps probed are multiples of this rate, constant. At 1.0 (as in ics_definition) the
  # plain net leaves its plateau at chance within the run; at paper_fig1's 0.2 it does not, and
  # a net stuck on a plateau is "smooth" only because it is flat (docs/experiments.md).
  config.optimizer.learning_rate = 1.0
  config.optimizer.schedule = "constant"
  config.num_steps = 5000
  config.eval_every = 125
  config.checkpoint_every = 2500
  return config
