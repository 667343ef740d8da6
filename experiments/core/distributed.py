"""Many processes: `jax.distributed` for the experiments, and which process writes what.

Every process runs the same program: the same jitted steps on the global arrays, each
process's devices computing their shard of every batch (config.data_parallel), XLA
all-reducing the gradients. Process 0 alone writes the workdir's files (config, metrics,
plots, summary); every process takes part in each orbax checkpoint, as orbax requires.
What one process finds out for all (process 0: the workdir's lock) reaches the others through
`primary_says`; what each finds out alone (whether a checkpoint restores) is decided alike
through `all_agree`.
"""

from __future__ import annotations

import errno
import socket

import jax
import numpy as np
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
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError("--coordinator_address must be host:port (process 0's host, a port "
                     f"from 1 to 65535), got {coordinator_address!r}.")
  # Process 0 serves the coordinator on that port; with the port taken, JAX crashes (a
  # segmentation fault) instead of saying so.
  if process_id == 0 and port_in_use(int(port)):
    raise PortInUse(
        f"--coordinator_address={coordinator_address}: port {port} is in use on this machine, "
        "so process 0 cannot serve jax.distributed's coordinator there. Choose a free port "
        "(experiments.launch picks one when --port is not given).")
  # CPU collectives across processes (gloo over TCP; JAX's default today, stated so that a
  # changed default cannot silently leave the CPU backend without cross-process collectives).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


class PortInUse(ValueError):
  """The coordinator's port is taken on process 0's machine."""


def port_in_use(port: int) -> bool:
  """Whether a socket on this machine holds `port` (TCP, any address), so a server cannot
  bind it: checked by binding it, as the coordinator does, on IPv6 and IPv4."""
  for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        # As a server binds: connections of an earlier run still closing (TIME_WAIT) do not
        # stop it, a socket listening there does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
    except OSError as error:
      if error.errno == errno.EADDRINUSE:
        return True
      # Any other error: no such address family here; the other one decides.
  return False


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


def all_agree(flag: bool) -> bool:
  """Whether `flag` holds in every process (itself with one process): for a decision that
  every process must take alike although each finds it out alone."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def primary_says(flag: bool) -> bool:
  """Process 0's `flag`, in every process: for what process 0 alone finds out."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
