"""The BN net trained twice in lockstep, analytic and autodiff backward, float32, 1,000 steps."""

from configs import paper_fig1


def get_config():
  config = paper_fig1.get_config()
  config.study = "gradient_agreement"
  config.variants = ("bn",)
  config.num_steps = 1000
  config.eval_every = 100
  config.checkpoint_every = 500
  return config
