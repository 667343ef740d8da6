"""The benchmark's training-step section: whole SGD steps of four nets with each BatchNorm.

Nets (`benchmarks.nets`): the runs' paper MLP and small CNN, a CIFAR-style ResNet stage (NHWC,
BN followed by ReLU and by residual add + ReLU) and a wide MLP (Dense → BN → ReLU), each in
every dtype of `config.step_dtypes` (bfloat16: the layers compute in bfloat16, parameters and
BN's statistics stay float32). For each: a jitted chunk of `steps_per_call` SGD steps, each on
a batch drawn on device, with jaxbn's module (its default, its pure-JAX path, autodiff),
`flax.linen.BatchNorm`, the same net without BN, and (the paper nets in float32) PyTorch with
and without BN. Each implementation runs in its own process and the processes take turns
(`ops.alternate`); each row is the median over `repeats` rounds.

Reported per row: ms per step, examples/s, the step's speed relative to Flax's and to jaxbn's
pure-JAX path, BN's share of the step (1 − the net without BN / this step, in the same
framework), the compiled temporary memory of one step (XLA's `memory_analysis`) and compile
seconds; then the targets (`targets`), each met or not.

    python -m benchmarks.main --config=configs/benchmark.py --workdir=runs/benchmark
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from benchmarks import nets, ops
from experiments.core import train

IMPLEMENTATIONS = {
    "jaxbn analytic": {"bn_impl": "jaxbn", "gradient": "analytic"},  # jaxbn's default
    "jaxbn analytic, pure JAX": {"bn_impl": "jaxbn-xla", "gradient": "analytic"},
    "jaxbn autodiff": {"bn_impl": "jaxbn", "gradient": "autodiff"},
    "flax.linen": {"bn_impl": "flax", "gradient": "analytic"},
}
DEFAULT, PURE, FLAX = "jaxbn analytic", "jaxbn analytic, pure JAX", "flax.linen"
NO_BN = "no BN"  # the same net without its BN layers (convolutions/dense keep a bias)
TORCH = "torch"
TORCH_NO_BN = "torch, no BN"
NAMES = (*IMPLEMENTATIONS, NO_BN, TORCH, TORCH_NO_BN)
NETS = tuple(nets.INPUT_SHAPES)

# The targets the default is held to, per (net, dtype): (what, value's formula, least value).
STEP_TARGETS = (
    ("jaxbn's default not slower than its pure-JAX path (within 3%)",
     lambda ms: ms[PURE] / ms[DEFAULT], 1 / 1.03),
    ("jaxbn's default not slower than flax.linen", lambda ms: ms[FLAX] / ms[DEFAULT], 1.0),
)
RESNET_TARGET = ("jaxbn's default >= 1.15x flax.linen's step on the ResNet stage",
                 lambda ms: ms[FLAX] / ms[DEFAULT], 1.15)


def make_step_chunk(model, x_all, y_all, batch_size: int, steps: int):
  """`steps` of the runs' own `train.train_step` (plain SGD) in one jitted scan, each on a
  batch drawn on device; returns chunk(state, key, data), the data and a function making
  the initial state.

  The data are the jitted function's arguments, not constants closed over: XLA:CPU ran the
  ResNet stage's step 40x slower with its 128 MB of data embedded as a constant."""
  tx = optax.sgd(0.1)

  def step(data, state, key):
    x, y = data
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    return train.train_step(model, tx, state, x[idx], y[idx])

  @jax.jit
  def chunk(state, key, data):
    return train.scan_steps(functools.partial(step, data), state, length=steps,
                            xs=jax.random.split(key, steps))

  return chunk, (x_all, y_all), lambda: train.init_state(model, tx, x_all[:batch_size], seed=0)


def _data(net: str, dataset_size: int):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.random((dataset_size, *nets.INPUT_SHAPES[net]), np.float32)),
          jnp.asarray(rng.integers(0, 10, dataset_size), jnp.int32))


def _model(name: str, case: dict):
  batch_norm = name != NO_BN
  impl = IMPLEMENTATIONS.get(name, {"bn_impl": "jaxbn", "gradient": "analytic"})
  dtype = None if case["dtype"] == "float32" else jnp.dtype(case["dtype"])
  return nets.create(case["net"], ml_collections.ConfigDict(case["model"]),
                     batch_norm=batch_norm, bn_impl=impl["bn_impl"],
                     gradient=impl["gradient"], dtype=dtype)


def step_runner(name: str, case: dict):
  """(run, compile seconds, {"temp_bytes"}) of `steps` training steps of implementation `name`
  at `case` (a worker's runner, `ops.serve`), or None where it does not run the case."""
  net, batch, steps = case["net"], case["batch"], case["steps"]
  if name in (TORCH, TORCH_NO_BN):
    run = torch_steps(case, batch_norm=name == TORCH)
    return None if run is None else (run, 0.0)
  model = _model(name, case)
  x_all, y_all = _data(net, case["dataset_size"])
  chunk, data, init = make_step_chunk(model, x_all, y_all, batch, steps)
  held = {"state": init(), "calls": 0}
  start = time.perf_counter()
  compiled = chunk.lower(held["state"], jax.random.key(0), data).compile()
  compile_s = time.perf_counter() - start
  one_step, _, _ = make_step_chunk(model, x_all, y_all, batch, 1)
  memory = one_step.lower(held["state"], jax.random.key(0), data).compile().memory_analysis()

  def run():
    held["calls"] += 1
    held["state"], loss = compiled(held["state"], jax.random.key(held["calls"]), data)
    jax.block_until_ready(loss)
  return run, compile_s, {"temp_bytes": int(memory.temp_size_in_bytes)}


def torch_steps(case: dict, *, batch_norm: bool = True):
  """`steps` of the paper MLP's or CNN's SGD step in PyTorch (BatchNorm1d/2d, channels-last
  convolutions; without BN, biases instead); None without torch, or for the other nets and
  dtypes (no PyTorch twin is timed for them)."""
  net, batch, steps = case["net"], case["batch"], case["steps"]
  if net not in ("mlp", "cnn") or case["dtype"] != "float32":
    return None
  try:
    import torch
  except ImportError:
    return None
  from torch import nn as tnn

  model_config = ml_collections.ConfigDict(case["model"])
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


def cases(config) -> list[dict]:
  return [{"net": net, "dtype": dtype, "batch": config.batch_size[net],
           "steps": config.steps_per_call[net], "dataset_size": config.dataset_size,
           "model": config.model.to_dict()}
          for net in config.nets for dtype in config.step_dtypes]


def throughput(config) -> list[dict]:
  """One row per (net, dtype, implementation that runs it)."""
  results = ops.alternate("benchmarks.steps", NAMES, cases(config), config.repeats,
                          config.op_settle_s, config.step_sample_s)
  rows = []
  for result in results:
    case = result["case"]
    per_step = result["median_s"] / case["steps"]
    rows.append({"net": case["net"], "dtype": case["dtype"],
                 "implementation": result["implementation"], "batch": case["batch"],
                 "median_ms_per_step": 1e3 * per_step,
                 "examples_per_second": case["batch"] / per_step,
                 "compile_seconds": result["compile_s"], **result["info"]})
  for key in {(r["net"], r["dtype"]) for r in rows}:
    ours = [r for r in rows if (r["net"], r["dtype"]) == key]
    by = {r["implementation"]: r["median_ms_per_step"] for r in ours}
    for row in ours:
      ms = row["median_ms_per_step"]
      row["vs_flax"] = by[FLAX] / ms
      row["vs_pure"] = by[PURE] / ms
      base = by.get(TORCH_NO_BN if row["implementation"] == TORCH else NO_BN)
      if row["implementation"] not in (NO_BN, TORCH_NO_BN) and base is not None:
        row["bn_share"] = 1 - base / ms
  return rows


def targets(rows: list[dict]) -> list[dict]:
  """Each target at each (net, dtype): its value and whether it is met."""
  out = []
  for net, dtype in dict.fromkeys((r["net"], r["dtype"]) for r in rows):
    ms = {r["implementation"]: r["median_ms_per_step"] for r in rows
          if (r["net"], r["dtype"]) == (net, dtype)}
    for what, value, least in STEP_TARGETS + ((RESNET_TARGET,) if net == "resnet_stage" else ()):
      v = value(ms)
      out.append({"net": net, "dtype": dtype, "target": what, "value": v, "least": least,
                  "met": bool(v >= least)})
  return out


def markdown(rows: list[dict], met: list[dict], meta: dict) -> str:
  lines = [f"Machine: {meta['machine']}; JAX {meta['jax']} on {meta['device']}; allocator "
           f"{meta['allocator']}. Each implementation in its own process; median of "
           f"{meta['repeats']} rounds in which the processes take turns. BN share = 1 − (the "
           "same net without BN) / (this step), in the same framework; temp MB: XLA's "
           "compiled temporary memory of one step.", "",
           "| net | dtype | implementation | batch | ms/step | examples/s | vs flax.linen "
           "| vs jaxbn pure | BN share | temp MB | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    share = f"{100 * r['bn_share']:.0f}%" if "bn_share" in r else "—"
    temp = f"{r['temp_bytes'] / 2**20:.2f}" if "temp_bytes" in r else "—"
    lines.append(f"| {r['net']} | {r['dtype']} | {r['implementation']} | {r['batch']} | "
                 f"{r['median_ms_per_step']:.3f} | {r['examples_per_second']:,.0f} | "
                 f"{r['vs_flax']:.2f}x | {r['vs_pure']:.2f}x | {share} | {temp} | "
                 f"{r['compile_seconds']:.1f} |")
  lines += ["", "| net | dtype | target | value | least | met |", "|---|---|---|---|---|---|"]
  lines += [f"| {t['net']} | {t['dtype']} | {t['target']} | {t['value']:.3f} | "
            f"{t['least']:.3f} | {'yes' if t['met'] else 'NO'} |" for t in met]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if "--worker" not in sys.argv:
    sys.exit("benchmarks.steps runs as a worker of `python -m benchmarks.main`.")
  logging.set_verbosity(logging.WARNING)
  worker = sys.argv[sys.argv.index("--worker") + 1]
  ops.serve(lambda case: step_runner(worker, case))
