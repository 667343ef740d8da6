"""Hessian-vector products through the analytic backward against autodiff's along 1,000
steps of the paper_fig1 BN net, in float32 and float64, one seed."""

from configs import hessian_spectrum


def get_config():
  config = hessian_spectrum.get_config()
  config.study = "hessian_agreement"
  config.num_steps = 1000
  config.hessian.seeds = (0,)
  config.hessian.probe_steps = tuple(range(100, 1001, 100))  # every evaluation
  return config
