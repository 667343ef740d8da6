"""Mini-batch BN against BN with population statistics (pooled over 20 training batches,
recomputed every 50 steps, constant in between) on the paper_fig1 net: the Hessian's spectrum
and the test accuracy over 2,000 steps, three seeds."""

from configs import hessian_spectrum


def get_config():
  config = hessian_spectrum.get_config()
  config.study = "hessian_population"
  return config
