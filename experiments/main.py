"""Runs one experiment config into a workdir.

    python -m experiments.main --config=configs/default.py --workdir=runs/default
    python -m experiments.main --config=configs/paper_fig1.py --workdir=runs/fig1 \\
        --config.optimizer.learning_rate=0.5

Re-running the same command resumes (a finished run writes nothing). jaxbn writes only into a
new or empty directory or a workdir it wrote before; one holding another config is replaced
only with --overwrite, which deletes only what jaxbn wrote and refuses, deleting nothing, a
directory holding anything else, the current directory, home, / and a repository's root.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import allocator
from experiments import config as config_lib
from experiments import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, plots, checkpoints.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a jaxbn workdir that holds a different config (deletes only "
    "what jaxbn wrote there; refuses if anything else is there).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except config_lib.ConfigError as error:
    raise app.UsageError(str(error)) from None
  print(f"Summary: {os.path.join(_WORKDIR.value, 'summary.md')}")


if __name__ == "__main__":
  allocator.use_fast_allocator()
  app.run(main)
