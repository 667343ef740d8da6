"""Default: the BN paper's net on MNIST-1D, with and without BN, in about a minute on 2 CPUs.

Every other config starts from this one and changes a few fields. The returned ConfigDict is
locked: a misspelled key in a config file or on the command line is an error. Every key, its
type and its default are in `experiments/core/schema.py`.
"""

import ml_collections

from experiments.core import schema


def get_config() -> ml_collections.ConfigDict:
  return schema.default_config()
