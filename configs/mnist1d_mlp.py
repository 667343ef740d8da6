"""The MNIST-1D paper's MLP (40-100-100-10 ReLU, Adam 1e-2, batch 100, 6,000 steps; published
68 ± 2% test accuracy), and the same net with BN before each ReLU beside it."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.hidden = (100, 100)
  config.model.activation = "relu"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.optimizer.schedule = "constant"
  config.batch_size = 100
  config.num_steps = 6000
  config.eval_every = 250
  config.checkpoint_every = 3000
  return config
