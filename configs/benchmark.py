"""The benchmark (benchmarks/main.py): the BN layer alone at five shapes and two dtypes, and
its Hessian-vector product at the same shapes; whole
training steps (time, BN's share, compiled memory) of the paper MLP and CNN, a ResNet stage
and a wide MLP, in float32 and bfloat16."""

import ml_collections

from configs import default


def get_config():
  config = ml_collections.ConfigDict()
  config.sections = ("ops", "hvp", "steps")
  config.op_shapes = ((256, 1024), (4096, 1024), (128, 32, 32, 64), (64, 56, 56, 128),
                      (32, 112, 112, 64))
  # Features on axis 1 (PyTorch's layout), against PyTorch's kernel on contiguous NCHW.
  config.op_channels_first_shapes = ((64, 128, 56, 56),)
  # A quarter of the examples masked out (padding): jaxbn's and Flax's mask argument.
  config.op_masked_shapes = ((64, 56, 56, 128),)
  config.op_dtypes = ("float32", "bfloat16")
  # One Hessian-vector product (benchmarks/hvp.py) beside forward + backward, features last.
  config.hvp_shapes = config.op_shapes
  config.hvp_dtypes = ("float32", "bfloat16")
  config.residual_shape = (64, 56, 56, 128)
  config.nets = ("mlp", "cnn", "resnet_stage", "wide_mlp")  # benchmarks/nets.py
  config.step_dtypes = ("float32", "bfloat16")
  config.model = default.get_config().model  # the paper MLP's and the CNN's
  config.batch_size = {"mlp": 60, "cnn": 128, "resnet_stage": 32, "wide_mlp": 512}
  # Steps per timed call (one jitted chunk): enough that a call is not dominated by dispatch.
  config.steps_per_call = {"mlp": 200, "cnn": 5, "resnet_stage": 2, "wide_mlp": 4}
  config.dataset_size = 2048
  config.repeats = 7  # rounds; each implementation in its own process, taking turns
  # Each round, each implementation first runs untimed for op_settle_s (what the process
  # that ran before left running — PyTorch's OpenMP workers spin for several ms after a
  # call — lands there), then a timed sample of back-to-back calls lasting about op_sample_s
  # (BN layer) or step_sample_s (training steps). 120 ms: a 40-50 ms shape gets more than
  # one call per sample (at 20 ms its rounds spread over 33-53 ms).
  config.op_settle_s = 0.02
  config.op_sample_s = 0.12
  config.step_sample_s = 0.1
  return config
