"""The MNIST-1D paper's MLP and the same net with BN before each ReLU beside it.

As in the MNIST-1D repository (notebooks/models.py and train.py): h = relu(W1 x),
h = h + relu(W2 h), logits = W3 h, hidden 256, Adam 1e-2, batch 100, 8,000 steps; the
published test accuracy of the MLP is 68 ± 2%.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.hidden = (256, 256)
  config.model.activation = "relu"
  config.model.residual = True
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.optimizer.schedule = "constant"
  config.batch_size = 100
  config.num_steps = 8000
  config.eval_every = 250
  config.checkpoint_every = 4000
  return config
