"""jaxbn's Equinox module against `equinox.nn.BatchNorm` ("batch" mode), each implementation in
its own process (`benchmarks.ops.alternate`), on the op benchmark's shapes and in a CNN step.

  - the layer: forward + backward of one BatchNorm under `jax.vmap(..., axis_name=...)` over
    the batch, as Equinox runs it: y and the running-average update, then ∂L/∂x, ∂L/∂γ, ∂L/∂β
    for L = Σ dy·y, jitted; Equinox's per-example layout is (C, *spatial), so the (N, C)
    shapes are dense features and the 4-D shapes are taken as N × (C, H, W);
  - the step: an SGD step of an Equinox CNN (Conv2d → BatchNorm → ReLU → max-pool, twice;
    Linear), batch 128 of 1×28×28, with each BatchNorm.

    python -m benchmarks.equinox [--repeats=7]

Prints a markdown table: median ms per call, and jaxbn's speed-up over Equinox's class.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ops

IMPLEMENTATIONS = ("jaxbn.equinox", "equinox.nn")
LAYER_SHAPES = ((256, 1024), (4096, 1024), (128, 64, 32, 32), (64, 128, 56, 56),
                (32, 64, 112, 112))
STEP_BATCH = 128


def _batch_norm_class(name: str):
  if name == "jaxbn.equinox":
    from jaxbn.equinox import BatchNorm
    return BatchNorm
  import equinox as eqx
  return eqx.nn.BatchNorm


def _layer_runner(name: str, shape) -> tuple:
  import equinox as eqx

  bn, state = eqx.nn.make_with_state(_batch_norm_class(name))(shape[1], "batch", mode="batch")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  dy = jnp.asarray(rng.standard_normal(shape, np.float32))

  @eqx.filter_jit
  def step(bn, state, x, dy):
    def loss(bn_and_x):
      bn, x = bn_and_x
      y, new_state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                              out_axes=(0, None))(x, state)
      return jnp.sum(y * dy), new_state
    # ∂L/∂x and ∂L/∂γ, ∂L/∂β (the module's inexact arrays)
    (_, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)((bn, x))
    return grads, new_state

  start = time.perf_counter()
  jax.block_until_ready(step(bn, state, x, dy))  # compiles
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(step(bn, state, x, dy))), compile_s


class _CNN:
  """Built lazily so that importing this module does not need Equinox."""

  @staticmethod
  def make(name: str):
    import equinox as eqx

    BatchNorm = _batch_norm_class(name)

    class CNN(eqx.Module):
      convs: tuple
      norms: tuple
      head: eqx.nn.Linear

      def __init__(self, key):
        keys = jax.random.split(key, 3)
        self.convs = (eqx.nn.Conv2d(1, 16, 3, padding=1, use_bias=False, key=keys[0]),
                      eqx.nn.Conv2d(16, 32, 3, padding=1, use_bias=False, key=keys[1]))
        self.norms = (BatchNorm(16, "batch", mode="batch"), BatchNorm(32, "batch", mode="batch"))
        self.head = eqx.nn.Linear(32 * 7 * 7, 10, key=keys[2])

      def __call__(self, x, state):
        for conv, norm in zip(self.convs, self.norms):
          x, state = norm(conv(x), state)
          x = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(x))
        return self.head(x.reshape(-1)), state

    return eqx.nn.make_with_state(CNN)(jax.random.key(0))


def _step_runner(name: str) -> tuple:
  import equinox as eqx
  import optax

  model, state = _CNN.make(name)
  tx = optax.sgd(0.1)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((STEP_BATCH, 1, 28, 28), np.float32))
  labels = jnp.asarray(rng.integers(0, 10, STEP_BATCH))

  @eqx.filter_jit
  def step(model, state, opt_state, x, labels):
    def loss(model):
      logits, new_state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                                   out_axes=(0, None))(x, state)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state
    (_, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), new_state, opt_state

  held = {"args": (model, state, opt_state)}
  start = time.perf_counter()
  jax.block_until_ready(step(*held["args"], x, labels))  # compiles
  compile_s = time.perf_counter() - start

  def run():
    held["args"] = step(*held["args"], x, labels)
    jax.block_until_ready(held["args"][1])
  return run, compile_s


def runner(name: str, case: dict):
  """A worker's runner (`ops.serve`): the layer at `case["shape"]`, or the CNN step."""
  if case["kind"] == "layer":
    return _layer_runner(name, tuple(case["shape"]))
  return _step_runner(name)


def measure(repeats: int, settle_s: float = 0.02, sample_s: float = 0.12) -> list[dict]:
  cases = [{"kind": "layer", "shape": list(s)} for s in LAYER_SHAPES] + [{"kind": "step"}]
  return ops.alternate("benchmarks.equinox", IMPLEMENTATIONS, cases, repeats, settle_s,
                       sample_s)


def markdown(results: list[dict], repeats: int) -> str:
  by_case: dict = {}
  for r in results:
    case = r["case"]
    label = ("CNN step, batch 128" if case["kind"] == "step"
             else "layer " + "×".join(map(str, case["shape"])))
    by_case.setdefault(label, {})[r["implementation"]] = 1e3 * r["median_s"]
  lines = [f"Each implementation in its own process; median of {repeats} rounds (ms).", "",
           "| case | jaxbn.equinox | equinox.nn | speed-up |", "|---|---|---|---|"]
  for label, ms in by_case.items():
    lines.append(f"| {label} | {ms['jaxbn.equinox']:.3f} | {ms['equinox.nn']:.3f} | "
                 f"{ms['equinox.nn'] / ms['jaxbn.equinox']:.2f}x |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  print(markdown(measure(args.repeats), args.repeats))


if __name__ == "__main__":
  if "--worker" in sys.argv:
    name = sys.argv[sys.argv.index("--worker") + 1]
    ops.serve(functools.partial(runner, name))
  else:
    from experiments.core import allocator
    allocator.use_fast_allocator()
    main()
