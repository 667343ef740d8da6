"""Many processes: `jax.distributed` for the experiments, and which process writes what.

Every process runs the same program: the same jitted steps on the global arrays, each
process's devices computing their shard of every batch (config.data_parallel), XLA
all-reducing the gradients. Process 0 alone writes the workdir's files (config, metrics,
plots, summary); every process takes part in each orbax checkpoint, as orbax requires.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils


def initialize(*, coordinator_address: str | None, num_processes: int, process_id: int,
               cpu_devices: int) -> None:
  """Sets up this process before JAX makes its backend.

  Args:
    coordinator_address: host:port of process 0's coordinator (None with one process).
    num_processes: processes in the computation; 1 starts no distributed runtime.
    process_id: this process's index, 0 … num_processes − 1.
    cpu_devices: CPU devices in this process (jax_num_cpu_devices); 0 keeps JAX's default.
  """
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if num_processes == 1:
    return
  if not coordinator_address:
    raise ValueError("--coordinator_address (host:port of process 0) is required with "
                     f"--num_processes={num_processes}.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
  # CPU collectives across processes (gloo over TCP; JAX's default today, stated so that a
  # changed default cannot silently leave the CPU backend without cross-process collectives).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
  """Whether this process writes the workdir's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process).

  Decisions read from the workdir (resume or start, a run already finished) must be taken
  by every process on the same files, or one process would train while another waits for
  it in a collective that never comes.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
