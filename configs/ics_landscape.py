"""Santurkar et al. §3.1 (Fig. 4): along the gradient from the current point, over steps of
0.25 … 4 × the learning rate: the loss's range, the gradient's change and the effective
β-smoothness, every 125 of 5,000 SGD steps of the paper_fig1 net, plain vs BN — the same
training as ics_definition.

The steps probed are multiples of its constant rate 1.0: there the plain net leaves its
plateau at chance within the run; at paper_fig1's 0.2 it does not, and a net stuck on a
plateau is "smooth" only because it is flat (docs/experiments.md)."""

from configs import ics_definition


def get_config():
  config = ics_definition.get_config()
  config.study = "landscape"
  return config
