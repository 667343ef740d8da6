"""The BN layer alone: training forward + backward, and what it saves for the backward.

For each shape and dtype, every implementation computes y, dx, dγ, dβ from x, γ, β and a
given dy, jitted. Implementations are interleaved: each round, each one first runs untimed
for `settle_s` (what the previous one left behind — PyTorch's OpenMP workers spin for ~3 ms
after a call, XLA's pool threads too — lands there), then a timed sample of back-to-back
calls lasting about `sample_s`, as in a training loop; a row is the median over `repeats`
rounds of the time per call. Bytes-moved model (stated in docs/performance.md): 8 activation-sized transfers
per call — read x for the statistics; read x, write y; read x and dy for Σdy and Σdy·x̂;
read x and dy, write dx — so the attained bandwidth is 8·size·itemsize / time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

TRANSFERS = 8  # activation-sized reads and writes of a fused BN training step (see above)


def naive_batch_norm(x, scale, bias, axis=-1, epsilon=1e-5):
  """Eqs. (1)-(4) written directly, statistics in x's dtype promoted to f32: the baseline a
  user writes before reaching for a library."""
  axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, axes, keepdims=True)  # (1)
  var = jnp.mean((xf - mu) ** 2, axes, keepdims=True)  # (2)
  shape = [1] * x.ndim
  shape[axis] = -1
  y = scale.reshape(shape) * (xf - mu) / jnp.sqrt(var + epsilon) + bias.reshape(shape)  # (3)-(4)
  return y.astype(x.dtype)


def _flax_batch_norm(x, scale, bias, axis=-1, mask=None):
  y, _ = nn.BatchNorm(use_running_average=False, axis=axis).apply(
      {"params": {"scale": scale, "bias": bias},
       "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}},
      x, mask=mask, mutable=["batch_stats"])
  return y


# Each takes (x, γ, β, axis): the feature axis is -1 (NHWC, dense) or 1 (NCHW); those in
# MASKABLE also take a padding mask.
FORWARDS: dict[str, Callable] = {
    "jaxbn analytic": lambda x, s, b, axis, mask=None: jaxbn.batch_norm(
        x, s, b, axis=axis, mask=mask)[0],
    "jaxbn analytic, pure JAX": lambda x, s, b, axis, mask=None: jaxbn.batch_norm(
        x, s, b, axis=axis, mask=mask, use_cpu_kernel=False)[0],
    "jaxbn autodiff": lambda x, s, b, axis, mask=None: jaxbn.batch_norm(
        x, s, b, axis=axis, mask=mask, gradient="autodiff")[0],
    "naive autodiff": naive_batch_norm,
    "flax.linen": _flax_batch_norm,
}
MASKABLE = ("jaxbn analytic", "jaxbn analytic, pure JAX", "jaxbn autodiff", "flax.linen")

# Shapes given channels-first or masked in a config are labelled so in every table and plot.
CHANNELS_FIRST = " NCHW"
MASKED = " masked"


def training_step(forward: Callable, axis: int = -1, mask=None) -> Callable:
  """(x, γ, β, dy) -> (y, dx, dγ, dβ), jitted."""
  extra = {} if mask is None else {"mask": mask}

  @jax.jit
  def step(x, scale, bias, dy):
    y, vjp = jax.vjp(lambda *a: forward(*a, axis, **extra), x, scale, bias)
    return (y, *vjp(dy.astype(y.dtype)))  # Flax returns float32 for bf16 x, f32 params
  return step


def padding_mask(shape, seed=0):
  """A quarter of the examples masked out, as padding in a variable-size batch."""
  keep = np.random.default_rng(seed).random((shape[0],) + (1,) * (len(shape) - 1)) > 0.25
  return jnp.asarray(keep)


def _inputs(shape, dtype, seed=0, axis=-1):
  rng = np.random.default_rng(seed)
  c = shape[axis]
  x = jnp.asarray(rng.standard_normal(shape, np.float32) * 2 + 1, dtype)
  dy = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return x, jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32), dy


def _torch_step(shape, dtype, channels_first=False):
  """torch.nn.functional.batch_norm — on NHWC data through a channels-last tensor, on NCHW
  data as is — or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  rng = np.random.default_rng(0)
  c = shape[1] if channels_first else shape[-1]
  data = rng.standard_normal(shape, np.float32) * 2 + 1
  if len(shape) == 4 and not channels_first:  # NHWC data, NCHW tensor, channels_last memory
    x = torch.from_numpy(data).permute(0, 3, 1, 2).to(torch_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
  else:
    x = torch.from_numpy(data).to(torch_dtype)
  dy = torch.randn_like(x)
  weight = torch.ones(c, requires_grad=True)
  bias = torch.zeros(c, requires_grad=True)
  x.requires_grad_(True)

  def step():
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), dy)
    return y, dx, dw, db

  return step


def _calls_per_sample(run: Callable, sample_s: float) -> int:
  start = time.perf_counter()
  run()
  return max(1, math.ceil(sample_s / max(time.perf_counter() - start, 1e-7)))


def time_ops(shapes, dtypes, repeats: int, settle_s: float = 0.02,
             sample_s: float = 2e-3, channels_first_shapes=(), masked_shapes=()) -> list[dict]:
  """Rows for `shapes` (features last), `channels_first_shapes` (features on axis 1) and
  `masked_shapes` (features last, a quarter of the examples masked; only the implementations
  that take a mask)."""
  rows = []
  cases = ([(s, False, False) for s in shapes] + [(s, True, False) for s in channels_first_shapes]
           + [(s, False, True) for s in masked_shapes])
  for dtype in dtypes:
    for shape, channels_first, masked in cases:
      axis = 1 if channels_first else -1
      args = _inputs(shape, dtype, axis=axis)
      mask = padding_mask(shape) if masked else None
      runners, compile_s = {}, {}
      for name, forward in FORWARDS.items():
        if masked and name not in MASKABLE:
          continue
        start = time.perf_counter()
        compiled = training_step(forward, axis, mask).lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))  # warm-up
        runners[name] = lambda c=compiled: jax.block_until_ready(c(*args))
      torch_step = None if masked else _torch_step(shape, dtype, channels_first)
      if torch_step is not None:
        torch_step()
        runners["torch"] = torch_step
        compile_s["torch"] = 0.0
      calls = {name: _calls_per_sample(run, sample_s) for name, run in runners.items()}
      times = {name: [] for name in runners}
      for _ in range(repeats):
        for name, run in runners.items():
          settled = time.perf_counter() + settle_s
          run()
          while time.perf_counter() < settled:
            run()
          start = time.perf_counter()
          for _ in range(calls[name]):
            run()
          times[name].append((time.perf_counter() - start) / calls[name])
      nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
      for name, samples in times.items():
        median = statistics.median(samples)
        label = ("x".join(map(str, shape)) + (CHANNELS_FIRST if channels_first else "")
                 + (MASKED if masked else ""))
        rows.append({"shape": label, "dtype": dtype, "implementation": name,
                     "median_ms": 1e3 * median, "compile_s": compile_s[name],
                     "gb_per_s": TRANSFERS * nbytes / median / 1e9})
  return rows


def streaming_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
  """GB/s of a jitted y = 2x + 1 over a large float32 array (one read, one write), which XLA
  runs on all cores: the roofline the BN rows are measured against."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: 2 * x + 1)
  jax.block_until_ready(f(x))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(x))
    samples.append(time.perf_counter() - start)
  return 2 * x.nbytes / statistics.median(samples) / 1e9


def residual_bytes(shape=(64, 56, 56, 128), dtype="float32") -> list[dict]:
  """Bytes each JAX implementation saves for its backward (the vjp's residuals)."""
  x, scale, bias, _ = _inputs(shape, dtype)
  rows = []
  for name, forward in FORWARDS.items():
    _, vjp = jax.vjp(lambda *a, f=forward: f(*a, -1), x, scale, bias)
    leaves = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "nbytes")]
    activation = [leaf for leaf in leaves if leaf.size == x.size]
    rows.append({"implementation": name, "shape": "x".join(map(str, shape)), "dtype": dtype,
                 "residual_bytes": int(sum(leaf.nbytes for leaf in leaves)),
                 "activation_sized": len(activation),
                 "x_bytes": int(x.nbytes)})
  return rows


def markdown(rows: list[dict], residuals: list[dict], bandwidth: float, meta: dict) -> str:
  lines = [f"Machine: {meta['machine']}; JAX {meta['jax']}; allocator {meta['allocator']}. "
           f"Streaming bandwidth (jitted 2x+1, both cores): {bandwidth:.1f} GB/s. BN forward + "
           f"backward: median over {meta['repeats']} interleaved rounds of the time per call "
           f"(each round, each implementation runs untimed for {meta['op_settle_s'] * 1e3:g} "
           f"ms, then back-to-back calls for about {meta['op_sample_s'] * 1e3:g} ms, timed); "
           f"GB/s = {TRANSFERS}·size/time.", "",
           "| shape | dtype | implementation | ms | GB/s | % of bandwidth | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['dtype']} | {r['implementation']} | "
                 f"{r['median_ms']:.3f} | {r['gb_per_s']:.1f} | "
                 f"{100 * r['gb_per_s'] / bandwidth:.0f}% | {r['compile_s']:.2f} |")
  lines += ["", "| implementation | bytes saved for the backward | activation-sized tensors |",
            "|---|---|---|"]
  for r in residuals:
    lines.append(f"| {r['implementation']} | {r['residual_bytes'] / r['x_bytes']:.2f}× x "
                 f"({r['shape']}, {r['dtype']}) | {r['activation_sized']} |")
  return "\n".join(lines) + "\n"
