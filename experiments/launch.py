"""Starts N local processes of `experiments.main` that train one study data-parallel.

    python -m experiments.launch --num_processes=2 -- \\
        --config=configs/default.py --workdir=runs/two --config.data_parallel=True

Everything after `--` goes to every process's `experiments.main`. The processes find each
other through a coordinator on localhost (a free port), each with `--cpu_devices` CPU
devices, and train every run on disjoint shards of the same global batches: the final
metrics equal one process's on those batches, to float32 rounding. Process 0's output
comes through; another process's only if it fails. When one process fails or is killed, the
others are stopped (they would wait for it forever in a collective), and the launcher exits
with the first failure's status; re-running the same command resumes from the checkpoints.
A `--port` already in use on this machine is refused before any process starts.

On many hosts, run `experiments.main` once per host instead, with `--coordinator_address`
(process 0's host:port), `--num_processes` and that host's `--process_id`, and a workdir on
a filesystem every host sees.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Local processes to start.",
                                      lower_bound=1)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "CPU devices in each process.",
                                    lower_bound=1)
_PORT = flags.DEFINE_integer("port", 0, "The coordinator's port on localhost; 0 = a free one.",
                             lower_bound=0)
POLL_S = 0.2
STOP_GRACE_S = 10.0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def commands(num_processes: int, cpu_devices: int, port: int, args: list[str]) -> list[list[str]]:
  """One `experiments.main` command line per process."""
  return [[sys.executable, "-m", "experiments.main", f"--coordinator_address=localhost:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}",
           f"--cpu_devices={cpu_devices}", *args] for i in range(num_processes)]


def run(num_processes: int, cpu_devices: int, port: int, args: list[str]) -> int:
  """Runs the processes to the end; returns 0, or the first failure's exit status (1 when
  none starts: the port given is in use)."""
  if port:
    # Imported only here: it brings JAX, which the launcher needs for nothing else.
    from experiments.core import distributed  # pylint: disable=import-outside-toplevel
    if distributed.port_in_use(port):
      sys.stderr.write(f"experiments.launch: --port={port} is in use on this machine, so "
                       "process 0 cannot serve jax.distributed's coordinator there; choose "
                       "another port, or leave --port out for a free one. Nothing started.\n")
      return 1
  port = port or _free_port()
  logs = [None] + [tempfile.TemporaryFile("w+") for _ in range(1, num_processes)]
  children = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None)
              for command, log in zip(commands(num_processes, cpu_devices, port, args), logs,
                                      strict=True)]
  try:
    while True:
      codes = [child.poll() for child in children]
      failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
      if failed is not None:
        _report(failed, codes[failed], logs[failed])
        return codes[failed] if codes[failed] > 0 else 128 - codes[failed]
      if all(code == 0 for code in codes):
        return 0
      time.sleep(POLL_S)
  finally:
    _stop(children)
    for log in logs[1:]:
      log.close()


def _report(index: int, code: int, log) -> None:
  how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
  if log is not None:
    log.seek(0)
    tail = log.read()[-5000:]
    sys.stderr.write(f"[process {index}] " + tail.replace("\n", f"\n[process {index}] ")
                     + "\n")
  sys.stderr.write(f"experiments.launch: process {index} {how}; stopping the others.\n")


def _stop(children: list[subprocess.Popen]) -> None:
  """Terminates the processes still running, then kills what outlives the grace period."""
  running = [c for c in children if c.poll() is None]
  for child in running:
    child.terminate()
  deadline = time.monotonic() + STOP_GRACE_S
  for child in running:
    try:
      child.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def main(argv):
  sys.exit(run(_NUM_PROCESSES.value, _CPU_DEVICES.value, _PORT.value, argv[1:]))


def _exit_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)  # through run()'s finally: the processes are stopped too


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  app.run(main)
