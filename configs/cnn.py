"""A small CNN with BN over N·H·W on Fashion-MNIST, the batch sharded over every device."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "fashion_mnist"
  config.model.name = "cnn"
  config.variants = ("bn",)
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_steps = 3000
  config.eval_every = 500
  config.checkpoint_every = 1500
  config.steps_per_call = 5  # unrolled: XLA:CPU convs in a loop are ~10x slower
  config.data_parallel = True
  return config
