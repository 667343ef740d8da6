"""Santurkar et al. §3.1 (Fig. 4): along the gradient from the current point, over steps of
0.25 … 4 × the learning rate: the loss's range, the gradient's change and the effective
β-smoothness, every 125 of 5,000 SGD steps (constant rate 0.2) of the paper_fig1 net, plain
vs BN."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "landscape"
  config.optimizer.schedule = "constant"  # the steps probed are multiples of this rate
  config.num_steps = 5000
  config.eval_every = 125
  config.checkpoint_every = 2500
  return config
