"""Non-i.i.d. batches: BN vs Batch Renormalization (batches of few classes).

Every training batch of 60 Fashion-MNIST images holds 2 classes, 30 examples of each
(`experiments/batches.py`), normalized over the whole batch; three seeds per net, vmapped.
"""

from configs import renorm_groups


def get_config():
  config = renorm_groups.get_config()
  config.study = "renorm_noniid"
  config.renorm.group_sizes = (60,)
  config.renorm.classes_per_batch = 2
  return config
