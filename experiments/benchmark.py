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

from experiments import models, workdir as workdir_lib

IMPLEMENTATIONS = {
    "jaxbn analytic": {"bn_impl": "jaxbn", "gradient": "analytic"},
    "jaxbn analytic, one-pass var": {"bn_impl": "jaxbn-fast", "gradient": "analytic"},
    "jaxbn autodiff": {"bn_impl": "jaxbn", "gradient": "autodiff"},
    "flax.linen": {"bn_impl": "flax", "gradient": "analytic"},
}


def allocator() -> str:
  """Which malloc this process runs under, as far as the environment says."""
  preload = os.environ.get("LD_PRELOAD", "")
  for name in ("tcmalloc", "jemalloc"):
    if name in preload:
      return name
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return f"glibc ({tunables})" if tunables else "glibc (default)"


def _model(name: str, impl: dict, model_config) -> tuple:
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.name = name
  config.bn_impl = impl["bn_impl"]
  return models.create(config, batch_norm=True, gradient=impl["gradient"])


def make_step_chunk(model, x_all, y_all, batch_size: int, steps: int):
  tx = optax.sgd(0.1)

  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  def step(carry, key):
    params, batch_stats, opt_state = carry
    idx = jax.random.randint(key, (batch_size,), 0, x_all.shape[0])
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x_all[idx], y_all[idx])
    changes, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, changes), updates["batch_stats"], opt_state), loss

  @jax.jit
  def chunk(carry, key):
    # Unrolled when short: XLA:CPU convolutions inside a while loop are ~10x slower.
    return jax.lax.scan(step, carry, jax.random.split(key, steps),
                        unroll=steps if steps <= 8 else 1)

  def init():
    variables = model.init(jax.random.key(0), x_all[:batch_size], train=False)
    return (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  return chunk, init, tx


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
      chunk, init, _ = make_step_chunk(_model(net, impl, config.model), x_all, y_all, batch,
                                       steps)
      carry = init()
      start = time.perf_counter()
      compiled = chunk.lower(carry, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - start
      carry, loss = compiled(carry, jax.random.key(1))  # warm-up
      jax.block_until_ready(loss)
      chunks[name] = {"run": compiled, "carry": carry, "times": [], "compile_s": compile_s}
    for repeat in range(config.repeats):  # interleaved: every implementation each round
      for name, entry in chunks.items():
        start = time.perf_counter()
        entry["carry"], loss = entry["run"](entry["carry"], jax.random.key(2 + repeat))
        jax.block_until_ready(loss)
        entry["times"].append(time.perf_counter() - start)
    for name, entry in chunks.items():
      median = statistics.median(entry["times"])
      rows.append({"net": net, "implementation": name, "batch": batch,
                   "median_ms_per_step": 1e3 * median / steps,
                   "examples_per_second": batch * steps / median,
                   "compile_seconds": entry["compile_s"]})
    flax_rate = next(r for r in rows if r["net"] == net and r["implementation"] == "flax.linen")
    for row in rows:
      if row["net"] == net:
        row["vs_flax"] = row["examples_per_second"] / flax_rate["examples_per_second"]
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
  """Measures, writes throughput.json and throughput.md into `workdir`, returns the table."""
  rows = throughput(config)
  meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
          "device": jax.devices()[0].device_kind, "allocator": allocator(),
          "repeats": config.repeats}
  workdir_lib.atomic_write(workdir / "throughput.json",
                           json.dumps({"meta": meta, "rows": rows}, indent=2))
  text = markdown(rows, meta)
  workdir_lib.atomic_write(workdir / "throughput.md", text)
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
  main()
