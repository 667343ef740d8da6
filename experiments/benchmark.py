"""Training-step throughput of the experiments' nets with each BatchNorm implementation.

    python -m experiments.benchmark --config=configs/benchmark.py --workdir=runs/benchmark

For the paper MLP and the CNN: a jitted lax.scan of `steps_per_call` SGD steps (state
donated, batches drawn on device) with jaxbn's module (analytic and autodiff backward) and
`flax.linen.BatchNorm`. Implementations are interleaved, compile time is reported apart,
and each row gives the median of `repeats` timed calls after a warm-up call. The allocator
the process runs under is reported, since it moves these numbers (see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import allocator, bench_ops, models, plots, train, workdir as workdir_lib

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


def throughput(config) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for net in config.nets:
    shape = (784,) if net == "mlp" else (28, 28, 1)
    x_all = jnp.asarray(rng.random((config.dataset_size, *shape), np.float32))
    y_all = jnp.asarray(rng.integers(0, 10, config.dataset_size), jnp.int32)
    batch = config.batch_size[net]
    steps = config.steps_per_call[net]
    chunks = {}
    for name, impl in IMPLEMENTATIONS.items():
      chunk, init = make_step_chunk(_model(net, impl, config.model), x_all, y_all, batch, steps)
      state = init()
      start = time.perf_counter()
      compiled = chunk.lower(state, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - start
      state, loss = compiled(state, jax.random.key(1))  # warm-up
      jax.block_until_ready(loss)
      chunks[name] = {"run": compiled, "state": state, "times": [], "compile_s": compile_s}
    for repeat in range(config.repeats):  # interleaved: every implementation each round
      for entry in chunks.values():
        start = time.perf_counter()
        entry["state"], loss = entry["run"](entry["state"], jax.random.key(2 + repeat))
        jax.block_until_ready(loss)
        entry["times"].append(time.perf_counter() - start)
    for name, entry in chunks.items():
      median = statistics.median(entry["times"])
      rows.append({"net": net, "implementation": name, "batch": batch,
                   "median_ms_per_step": 1e3 * median / steps,
                   "examples_per_second": batch * steps / median,
                   "compile_seconds": entry["compile_s"]})
    torch_row = torch_throughput(net, config, batch, steps)
    if torch_row is not None:
      rows.append(torch_row)
    flax_rate = next(r for r in rows if r["net"] == net and r["implementation"] == "flax.linen")
    for row in rows:
      if row["net"] == net:
        row["vs_flax"] = row["examples_per_second"] / flax_rate["examples_per_second"]
  return rows


def torch_throughput(net: str, config, batch: int, steps: int) -> dict | None:
  """The same net and SGD step in PyTorch (BatchNorm1d/2d, channels-last convolutions), or
  None without torch."""
  try:
    import torch
  except ImportError:
    return None
  from torch import nn as tnn

  torch.manual_seed(0)
  if net == "mlp":
    layers, width = [], 784
    for hidden in config.model.hidden:
      layers += [tnn.Linear(width, hidden, bias=False), tnn.BatchNorm1d(hidden), tnn.Sigmoid()]
      width = hidden
    model = tnn.Sequential(*layers, tnn.Linear(width, 10))
    x = torch.rand(batch, 784)
  else:
    layers, channels, size = [], 1, 28
    for features in config.model.cnn_features:
      layers += [tnn.Conv2d(channels, features, 3, padding=1, bias=False),
                 tnn.BatchNorm2d(features), tnn.ReLU(), tnn.MaxPool2d(2)]
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

  call()  # warm-up
  times = []
  for _ in range(config.repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {"net": net, "implementation": "torch", "batch": batch,
          "median_ms_per_step": 1e3 * median / steps,
          "examples_per_second": batch * steps / median, "compile_seconds": 0.0}


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
           f"{meta['allocator']}. Median of {meta['repeats']} calls, interleaved.", "",
           "| net | implementation | batch | ms/step | examples/s | vs flax.linen | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['net']} | {r['implementation']} | {r['batch']} | "
                 f"{r['median_ms_per_step']:.3f} | {r['examples_per_second']:,.0f} | "
                 f"{r['vs_flax']:.2f}x | {r['compile_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def run(config, workdir: pathlib.Path) -> str:
  """Measures every section of `config.sections`, writes benchmark.json and benchmark.md
  into `workdir`, returns the markdown."""
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
          "device": jax.devices()[0].device_kind, "allocator": allocator.describe(),
          "repeats": config.repeats, "op_settle_s": config.op_settle_s,
          "op_sample_s": config.op_sample_s}
  results: dict = {"meta": meta}
  parts = []
  if "ops" in config.sections:
    results["bandwidth_gb_per_s"] = bench_ops.streaming_bandwidth()
    results["ops"] = bench_ops.time_ops([tuple(s) for s in config.op_shapes],
                                        tuple(config.op_dtypes), config.repeats,
                                        settle_s=config.op_settle_s,
                                        sample_s=config.op_sample_s,
                                        channels_first_shapes=[
                                            tuple(s) for s in config.op_channels_first_shapes],
                                        masked_shapes=[
                                            tuple(s) for s in config.op_masked_shapes])
    results["residuals"] = bench_ops.residual_bytes(tuple(config.residual_shape))
    parts.append(bench_ops.markdown(results["ops"], results["residuals"],
                                    results["bandwidth_gb_per_s"], meta))
    plots.plot_op_benchmark(results["ops"], results["bandwidth_gb_per_s"],
                            workdir / "op_benchmark.png")
  if "throughput" in config.sections:
    results["throughput"] = throughput(config)
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
    print(run(config.value, pathlib.Path(workdir.value)))

  app.run(_main)


if __name__ == "__main__":
  allocator.use_fast_allocator()
  main()
