"""The benchmark: BN layer alone (`benchmarks/ops.py`), training-step throughput, memory.

    python -m benchmarks.main --config=configs/benchmark.py --workdir=runs/benchmark

For the paper MLP and the CNN: a jitted lax.scan of `steps_per_call` SGD steps (batches drawn
on device) with jaxbn's module (analytic and autodiff backward), `flax.linen.BatchNorm`, the
same net without BN, and the same nets in PyTorch with and without BN. Each implementation
runs in its own process and the processes take turns (ops.alternate); compile time is
reported apart, and each row gives the median over `repeats` rounds. The allocator the
processes run under is reported, since it moves these numbers (see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import ops, plots
from experiments.core import allocator, models, train, workdir as workdir_lib
from experiments.core import config as config_lib

IMPLEMENTATIONS = {
    "jaxbn analytic": {"bn_impl": "jaxbn", "gradient": "analytic"},
    "jaxbn analytic, pure JAX": {"bn_impl": "jaxbn-xla", "gradient": "analytic"},
    "jaxbn autodiff": {"bn_impl": "jaxbn", "gradient": "autodiff"},
    "flax.linen": {"bn_impl": "flax", "gradient": "analytic"},
}


def _model(name: str, impl: dict, model_config) -> tuple:
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.name = name
  config.bn_impl = impl["bn_impl"]
  return models.create(config, batch_norm=True, gradient=impl["gradient"])


def make_step_chunk(model, x_all, y_all, batch_size: int, steps: int):
  """`steps` of the runs' own `train.train_step` (plain SGD) in one jitted scan, each on a
  batch drawn on device; returns the chunk and a function making its initial state."""
  tx = optax.sgd(0.1)

  def step(state, key):
    idx = jax.random.randint(key, (batch_size,), 0, x_all.shape[0])
    return train.train_step(model, tx, state, x_all[idx], y_all[idx])

  @jax.jit
  def chunk(state, key):
    return train.scan_steps(step, state, length=steps, xs=jax.random.split(key, steps))

  return chunk, lambda: train.init_state(model, tx, x_all[:batch_size], seed=0)


NO_BN = "no BN"  # the same net without its BN layers (convolutions/dense keep a bias)
TORCH = "torch"
TORCH_NO_BN = "torch, no BN"


def _data(net: str, dataset_size: int):
  rng = np.random.default_rng(0)
  shape = (784,) if net == "mlp" else (28, 28, 1)
  return (jnp.asarray(rng.random((dataset_size, *shape), np.float32)),
          jnp.asarray(rng.integers(0, 10, dataset_size), jnp.int32))


def _step_runner(name: str, case: dict):
  """(run, compile seconds) of `steps` training steps of implementation `name` (a worker's
  runner, ops.serve)."""
  net, batch, steps = case["net"], case["batch"], case["steps"]
  model_config = ml_collections.ConfigDict(case["model"])
  if name in (TORCH, TORCH_NO_BN):
    run = torch_steps(net, model_config, batch, steps, batch_norm=name == TORCH)
    return None if run is None else (run, 0.0)
  x_all, y_all = _data(net, case["dataset_size"])
  if name == NO_BN:
    config = ml_collections.ConfigDict(model_config.to_dict())
    config.name = net
    model = models.create(config, batch_norm=False)
  else:
    model = _model(net, IMPLEMENTATIONS[name], model_config)
  chunk, init = make_step_chunk(model, x_all, y_all, batch, steps)
  held = {"state": init(), "calls": 0}
  start = time.perf_counter()
  compiled = chunk.lower(held["state"], jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start

  def run():
    held["calls"] += 1
    held["state"], loss = compiled(held["state"], jax.random.key(held["calls"]))
    jax.block_until_ready(loss)
  return run, compile_s


def throughput(config) -> list[dict]:
  """ms per training step of each implementation (and of the net without BN, in JAX and in
  PyTorch), each in its own process, the processes taking turns (ops.alternate)."""
  cases = [{"net": net, "batch": config.batch_size[net], "steps": config.steps_per_call[net],
            "dataset_size": config.dataset_size, "model": config.model.to_dict()}
           for net in config.nets]
  names = [*IMPLEMENTATIONS, NO_BN, TORCH, TORCH_NO_BN]
  results = ops.alternate("benchmarks.main", names, cases, config.repeats,
                                config.op_settle_s, config.step_sample_s)
  rows = []
  for result in results:
    case = result["case"]
    per_step = result["median_s"] / case["steps"]
    rows.append({"net": case["net"], "implementation": result["implementation"],
                 "batch": case["batch"], "median_ms_per_step": 1e3 * per_step,
                 "examples_per_second": case["batch"] / per_step,
                 "compile_seconds": result["compile_s"]})
  for net in config.nets:
    ours = [r for r in rows if r["net"] == net]
    by = {r["implementation"]: r for r in ours}
    for row in ours:
      row["vs_flax"] = row["examples_per_second"] / by["flax.linen"]["examples_per_second"]
      # BN's share of the step: what the step costs over the same net without BN.
      base = by.get(TORCH_NO_BN if row["implementation"] == TORCH else NO_BN)
      if row["implementation"] not in (NO_BN, TORCH_NO_BN) and base is not None:
        row["bn_share"] = 1 - base["median_ms_per_step"] / row["median_ms_per_step"]
  return rows


def torch_steps(net: str, model_config, batch: int, steps: int, *, batch_norm: bool = True):
  """`steps` of the same net's SGD step in PyTorch (BatchNorm1d/2d, channels-last
  convolutions; without BN, biases instead), or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  from torch import nn as tnn

  torch.manual_seed(0)
  if net == "mlp":
    layers, width = [], 784
    for hidden in model_config.hidden:
      layers.append(tnn.Linear(width, hidden, bias=not batch_norm))
      layers += [tnn.BatchNorm1d(hidden)] if batch_norm else []
      layers.append(tnn.Sigmoid())
      width = hidden
    model = tnn.Sequential(*layers, tnn.Linear(width, 10))
    x = torch.rand(batch, 784)
  else:
    layers, channels, size = [], 1, 28
    for features in model_config.cnn_features:
      layers.append(tnn.Conv2d(channels, features, 3, padding=1, bias=not batch_norm))
      layers += [tnn.BatchNorm2d(features)] if batch_norm else []
      layers += [tnn.ReLU(), tnn.MaxPool2d(2)]
      channels, size = features, size // 2
    model = tnn.Sequential(*layers, tnn.Flatten(), tnn.Linear(channels * size * size, 10))
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

  def call():
    for _ in range(steps):
      optimizer.zero_grad(set_to_none=True)
      tnn.functional.cross_entropy(model(x), y).backward()
      optimizer.step()
  return call


def peak_memory(config) -> list[dict]:
  """Compiled memory of one training step (XLA's memory_analysis), jaxbn vs Flax."""
  rng = np.random.default_rng(0)
  rows = []
  for net in config.nets:
    shape = (784,) if net == "mlp" else (28, 28, 1)
    batch = config.batch_size[net]
    x_all = jnp.asarray(rng.random((batch, *shape), np.float32))
    y_all = jnp.zeros((batch,), jnp.int32)
    for name, impl in IMPLEMENTATIONS.items():
      chunk, init = make_step_chunk(_model(net, impl, config.model), x_all, y_all, batch, 1)
      stats = chunk.lower(init(), jax.random.key(0)).compile().memory_analysis()
      rows.append({"net": net, "implementation": name,
                   "temp_bytes": int(stats.temp_size_in_bytes),
                   "peak_bytes": int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                     + stats.output_size_in_bytes - stats.alias_size_in_bytes)})
  return rows


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"Machine: {meta['machine']}; JAX {meta['jax']} on {meta['device']}; allocator "
           f"{meta['allocator']}. Each implementation in its own process; median of "
           f"{meta['repeats']} rounds in which the processes take turns. BN share = 1 − (the "
           f"same net without BN) / (this step), in the same framework.", "",
           "| net | implementation | batch | ms/step | examples/s | vs flax.linen | BN share "
           "| compile s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    share = f"{100 * r['bn_share']:.0f}%" if "bn_share" in r else "—"
    lines.append(f"| {r['net']} | {r['implementation']} | {r['batch']} | "
                 f"{r['median_ms_per_step']:.3f} | {r['examples_per_second']:,.0f} | "
                 f"{r['vs_flax']:.2f}x | {share} | {r['compile_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


OUTPUTS = ("benchmark.json", "benchmark.md", "op_benchmark.png")


def run(config, workdir: pathlib.Path) -> str:
  """Measures every section of `config.sections`, writes benchmark.json and benchmark.md
  into `workdir`, returns the markdown.

  `workdir` follows the experiments' rules (`workdir.claim_outputs`): new, empty, or one the
  benchmark wrote before; it is locked while the benchmark runs.
  """
  workdir = workdir_lib.claim_outputs(workdir, OUTPUTS, tool="python -m benchmarks.main")
  with workdir_lib.lock(workdir):
    return _measure(config, workdir)


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
  if "throughput" in config.sections:
    results["throughput"] = throughput(config)
    workdir_lib.atomic_write(workdir / "benchmark.json", json.dumps(results, indent=2))
    parts.append(markdown(results["throughput"], meta))
  if "memory" in config.sections:
    results["memory"] = peak_memory(config)
    parts.append("| net | implementation | compiled temp MB | compiled peak MB |\n|---|---|---|---|\n"
                 + "".join(f"| {r['net']} | {r['implementation']} | {r['temp_bytes'] / 2**20:.2f} | "
                           f"{r['peak_bytes'] / 2**20:.2f} |\n" for r in results["memory"]))
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
  if "--worker" in sys.argv:  # one implementation's process (ops.alternate)
    logging.set_verbosity(logging.WARNING)
    worker = sys.argv[sys.argv.index("--worker") + 1]
    ops.serve(lambda case: _step_runner(worker, case))
  else:
    allocator.use_fast_allocator()
    main()
