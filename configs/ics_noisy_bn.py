"""Santurkar et al. §2.1 (Fig. 2): the paper_fig1 net plain, with BN and with noisy BN — BN
followed by noise whose mean and variance are redrawn every step (experiments/noisy_bn.py) —
10,000 SGD steps on Fashion-MNIST."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "noisy_bn"
  config.num_steps = 10_000
  config.eval_every = 250
  config.checkpoint_every = 5000
  return config
