"""Small normalization groups: BN vs Batch Renormalization vs no BN (ghost batches).

Each batch of 60 Fashion-MNIST images is normalized in groups (ghost batches,
`virtual_batch_size`) of 2, 4, 10 and 60 examples; three seeds per net, vmapped. After
training the running (EMA) statistics are also replaced by recomputed ones
(`jaxbn.recompute_batch_stats` over 100 training batches) and evaluated again.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.study = "renorm_groups"
  config.data.name = "fashion_mnist"
  config.model.activation = "relu"
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "cosine"
  config.batch_size = 60
  config.num_steps = 4000
  config.eval_every = 2000
  config.checkpoint_every = 4000
  # The issue asks for 2, 4, 8 and 60; 8 does not divide 60 (ghost batches split the batch
  # evenly), so 10 stands in for it.
  config.renorm.group_sizes = (2, 4, 10, 60)
  # Ioffe's schedule, scaled to this run: plain BN at first, the clipping relaxed linearly
  # to rmax = 3, dmax = 5 over the first quarter of training.
  config.renorm.warmup_steps = 1000
  return config
