"""Santurkar et al. §2.2 (Definition 2.1, Fig. 5): per-layer ICS — the change of a layer's
gradient when the earlier layers take their step — over 5,000 SGD steps of the paper_fig1
net, plain vs BN."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "ics"
  config.num_steps = 5000
  config.eval_every = 125
  config.checkpoint_every = 2500
  return config
