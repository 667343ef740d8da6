"""The benchmark: the BN layer alone (`benchmarks.ops`), its Hessian-vector product
(`benchmarks.hvp`) and whole training steps (`benchmarks.steps`), each implementation in its
own process.

    python -m benchmarks.main --config=configs/benchmark.py --workdir=runs/benchmark

Writes benchmark.json (every number), benchmark.md (the tables, the step targets met or not)
and op_benchmark.png into the workdir. The allocator the processes run under is reported,
since it moves these numbers (see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import hvp, ops, plots, steps
from experiments.core import allocator, workdir as workdir_lib
from experiments.core import config as config_lib

OUTPUTS = ("benchmark.json", "benchmark.md", "op_benchmark.png")


def run(config, workdir: pathlib.Path) -> str:
  """Measures every section of `config.sections`, writes benchmark.json and benchmark.md
  into `workdir`, returns the markdown.

  `workdir` follows the experiments' rules (`workdir.claim_outputs`): new, empty, or one the
  benchmark wrote before; it is locked while the benchmark runs.
  """
  _validate(config)
  workdir = workdir_lib.claim_outputs(workdir, OUTPUTS, tool="python -m benchmarks.main")
  with workdir_lib.lock(workdir):
    return _measure(config, workdir)


SECTIONS = ("ops", "hvp", "steps")


def _validate(config) -> None:
  """Refuses, before any work, a section or net the benchmark does not know, a net without
  its batch size or steps per call, or a dtype or shape the HVP section cannot run."""
  unknown = [s for s in config.sections if s not in SECTIONS]
  if unknown:
    raise config_lib.ConfigError(f"config.sections: unknown {unknown}; choose from {SECTIONS}")
  if "hvp" in config.sections:
    hvp.validate(config)
  if "steps" not in config.sections:
    return
  for net in config.nets:
    if net not in steps.NETS:
      raise config_lib.ConfigError(f"config.nets: unknown net {net!r}; choose from {steps.NETS}")
    for key in ("batch_size", "steps_per_call"):
      if net not in config[key]:
        raise config_lib.ConfigError(f"config.{key} has no entry for net {net!r}")
  for dtype in config.step_dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise config_lib.ConfigError(f"config.step_dtypes: {dtype!r} is not float32 or bfloat16")


def _measure(config, workdir: pathlib.Path) -> str:
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
          "device": jax.devices()[0].device_kind, "allocator": allocator.describe(),
          "repeats": config.repeats, "op_settle_s": config.op_settle_s,
          "op_sample_s": config.op_sample_s}
  results: dict = {"meta": meta}
  parts = []
  if "ops" in config.sections:
    results["bandwidth_gb_per_s"] = ops.streaming_bandwidth()
    results["ops"] = ops.time_ops([tuple(s) for s in config.op_shapes],
                                        tuple(config.op_dtypes), config.repeats,
                                        settle_s=config.op_settle_s,
                                        sample_s=config.op_sample_s,
                                        channels_first_shapes=[
                                            tuple(s) for s in config.op_channels_first_shapes],
                                        masked_shapes=[
                                            tuple(s) for s in config.op_masked_shapes])
    results["residuals"] = ops.residual_bytes(tuple(config.residual_shape))
    parts.append(ops.markdown(results["ops"], results["residuals"],
                                    results["bandwidth_gb_per_s"], meta))
    plots.plot_op_benchmark(results["ops"], results["bandwidth_gb_per_s"],
                            workdir / "op_benchmark.png")
  # What is measured so far is written after each section: a run cut short keeps it.
  workdir_lib.atomic_write(workdir / "benchmark.json", json.dumps(results, indent=2))
  if "hvp" in config.sections:
    results["hvp"] = hvp.time_hvp([tuple(s) for s in config.hvp_shapes],
                                  tuple(config.hvp_dtypes), config.repeats,
                                  settle_s=config.op_settle_s, sample_s=config.op_sample_s)
    parts.append(hvp.markdown(results["hvp"], meta))
    workdir_lib.atomic_write(workdir / "benchmark.json", json.dumps(results, indent=2))
  if "steps" in config.sections:
    results["steps"] = steps.throughput(config)
    results["step_targets"] = steps.targets(results["steps"])
    parts.append(steps.markdown(results["steps"], results["step_targets"], meta))
  workdir_lib.atomic_write(workdir / "benchmark.json", json.dumps(results, indent=2))
  text = "\n\n".join(parts)
  workdir_lib.atomic_write(workdir / "benchmark.md", text)
  return text


def main():
  # Flags are defined here, not at import, so importing this module (tests) defines none.
  config = config_flags.DEFINE_config_file("config", "configs/benchmark.py", "Benchmark config.")
  workdir = flags.DEFINE_string("workdir", "runs/benchmark", "Where results are written.")

  def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
      print(run(config.value, pathlib.Path(workdir.value)))
    except config_lib.ConfigError as error:  # a workdir refused, or in use: one line
      sys.exit(f"benchmarks.main: {error}")

  app.run(_main)


if __name__ == "__main__":
  allocator.use_fast_allocator()
  main()
