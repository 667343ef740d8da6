"""Runs one experiment config into a workdir.

    python -m experiments.main --config=configs/default.py --workdir=runs/default
    python -m experiments.main --config=configs/paper_fig1.py --workdir=runs/fig1 \\
        --config.optimizer.learning_rate=0.5

On several processes (one per host, or `python -m experiments.launch` on one machine), give
each the same arguments plus `--coordinator_address`, `--num_processes` and its own
`--process_id`: they train data-parallel on the global batches, and process 0 writes the files.

Re-running the same command resumes (a finished run writes nothing), from each run's newest
checkpoint that restores. A workdir another run is using is refused at once, naming that
process. jaxbn writes only into a new or empty directory or a workdir it wrote before; one
holding another config is replaced only with --overwrite, which deletes only what jaxbn wrote
and refuses, deleting nothing, a directory holding anything else, the current directory,
home, / and a repository's root.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.core import allocator

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, plots, checkpoints.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a jaxbn workdir that holds a different config (deletes only "
    "what jaxbn wrote there; refuses if anything else is there).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's jax.distributed coordinator "
    "(with --num_processes > 1).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes training together.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.", lower_bound=0)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "CPU devices in this process (jax_num_cpu_devices); 0 = JAX's default.",
    lower_bound=0)
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  # Imported here, not at the top: they bring JAX, Flax and orbax (about 5 s), and `__main__`
  # first re-executes the process under the fast malloc — imported at the top they were
  # paid twice, and a refused command line took 11 s instead of 6.
  from experiments import registry
  from experiments.core import config as config_lib
  from experiments.core import distributed
  from experiments.core import workdir as workdir_lib

  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  # What stops a run for a reason other than its command line (a port or workdir in use, no
  # checkpoint that restores) is one short message: the flags' help would bury it.
  try:
    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           cpu_devices=_CPU_DEVICES.value)
  except distributed.PortInUse as error:
    sys.exit(f"experiments.main: {error}")
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  # `--workdir=~/x` reaches us unexpanded (the shell expands ~ only at a word's start).
  workdir = os.path.expanduser(_WORKDIR.value)
  try:
    registry.train_and_evaluate(_CONFIG.value, workdir, overwrite=_OVERWRITE.value)
  except workdir_lib.WorkdirError as error:
    sys.exit(f"experiments.main: {error}")
  except config_lib.ConfigError as error:
    raise app.UsageError(str(error)) from None
  if distributed.is_primary():
    print(f"Summary: {os.path.join(workdir, 'summary.md')}")


if __name__ == "__main__":
  allocator.use_fast_allocator()
  app.run(main)
