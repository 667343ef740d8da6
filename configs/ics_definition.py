"""Santurkar et al. §2.2 (Definition 2.1, Fig. 5): per-layer ICS — the change of a layer's
gradient when the earlier layers take their step — over 5,000 SGD steps of the paper_fig1
net, plain vs BN.

A constant rate: with a decay to 0 the last probe would see a zero update (and no shift). At
1.0 the plain net leaves its plateau at chance within the run (at the paper_fig1 rate of 0.2
it does not within 5,000 steps; docs/experiments.md gives that run too)."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "ics"
  config.optimizer.learning_rate = 1.0
  config.optimizer.schedule = "constant"
  config.num_steps = 5000
  config.eval_every = 125
  config.checkpoint_every = 2500
  return config
