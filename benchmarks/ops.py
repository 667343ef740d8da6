"""The BN layer alone: training forward + backward, its floor, and what it saves for the backward.

For each shape and dtype, every implementation computes y, dx, dγ, dβ from x, γ, β and a given
dy. **Each implementation runs in its own process** (a worker, `python -m benchmarks.ops
<implementation>`), so no runtime's thread pool competes with another's; the workers take
turns: in each of `repeats` rounds, each one (in an order rotated every round) first runs
untimed for `settle_s` (what the previous one left behind — PyTorch's OpenMP workers spin for
~3 ms after a call, XLA's pool threads too — lands there), then times back-to-back calls for
about `sample_s`, as in a training loop; a row is the median over rounds of the time per call.

**The floor** of a shape is the time of a BN training step's minimal memory traffic: 8
activation-sized transfers — read x for the statistics; read x, write y; read x and dy for Σdy
and Σdy·x̂; read x and dy, write dx — done by trivial streaming kernels
(`benchmarks/csrc/stream_floor.cc`) through the same path as jaxbn's kernels (two XLA FFI
calls on XLA's pool, the same scheduler and split), in a worker of its own like the others.
Each row's "% of floor" is the floor's time over its time; GB/s is 8·size·itemsize / time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------
# The floor: benchmarks/csrc/stream_floor.cc, built once per source and jaxlib, beside
# jaxbn's own cache.

FLOOR = "floor"
TORCH = "torch"
FLOOR_SOURCE = pathlib.Path(__file__).parent / "csrc" / "stream_floor.cc"
FLOOR_LIBRARY_ENV = "JAXBN_BENCH_FLOOR_LIBRARY"


def build_floor() -> pathlib.Path | None:
  """Compiles the floor's kernels (cached); None, with a warning, where that fails."""
  from jaxbn._cpu import build as _native_build

  headers = _native_build.CSRC
  digest = hashlib.sha256(FLOOR_SOURCE.read_bytes())
  for header in sorted(headers.glob("*.h")):
    digest.update(header.read_bytes())
  digest.update(jax.__version__.encode())
  library = _native_build.cache_dir() / "bench" / f"stream_floor-{digest.hexdigest()[:16]}.so"
  if library.exists():
    return library
  compiler = os.environ.get("CXX") or next(
      (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
  if compiler is None:
    logging.warning("no C++ compiler: the benchmark runs without its floor")
    return None
  library.parent.mkdir(parents=True, exist_ok=True)
  partial = library.with_suffix(f".{os.getpid()}.partial")
  build = subprocess.run(
      [*shlex.split(compiler), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
       f"-I{headers}", f"-I{jax.ffi.include_dir()}", str(FLOOR_SOURCE), "-o", str(partial)],
      capture_output=True, text=True, timeout=600)
  if build.returncode != 0:
    logging.warning("the floor's kernels did not build: %s", build.stderr[-2000:])
    return None
  os.replace(partial, library)
  return library


def _floor_step(shape, dtype) -> Callable | None:
  """The floor at one shape: a runner of its two FFI calls, the second after the first."""
  library = os.environ.get(FLOOR_LIBRARY_ENV)
  if not library:
    return None
  if not getattr(_floor_step, "registered", False):
    handle = ctypes.cdll.LoadLibrary(library)
    for target, symbol in (("bench_floor_forward", "FloorForward"),
                           ("bench_floor_backward", "FloorBackward")):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
                                  platform="cpu")
    _floor_step.registered = True
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  @jax.jit
  def step(x, dy):
    activation = jax.ShapeDtypeStruct(x.shape, x.dtype)
    y, s1 = jax.ffi.ffi_call("bench_floor_forward", (activation, scalar))(x)
    dx, s2 = jax.ffi.ffi_call("bench_floor_backward", (activation, scalar))(x, dy, s1)
    return y, dx, s1 + s2

  x, _, _, dy = _inputs(shape, dtype)
  compiled = step.lower(x, dy).compile()
  return lambda: jax.block_until_ready(compiled(x, dy))


# ---------------------------------------------------------------------------------------
# Workers: one process per implementation, driven over pipes one JSON line at a time.


def _runner(name: str, case: dict) -> tuple[Callable, float] | None:
  """(run, compile seconds) of implementation `name` at `case`, or None where it does not
  run (torch and the naive version take no mask)."""
  shape, dtype = tuple(case["shape"]), case["dtype"]
  channels_first, masked = case["channels_first"], case["masked"]
  start = time.perf_counter()
  if name == FLOOR:
    if masked:  # a masked shape's floor is the unmasked one's: the same x, all of it read
      return None
    run = _floor_step(shape, dtype)
    return None if run is None else (run, time.perf_counter() - start)
  if name == TORCH:
    if masked:
      return None
    run = _torch_step(shape, dtype, channels_first)
    return None if run is None else (run, 0.0)
  if masked and name not in MASKABLE:
    return None
  axis = 1 if channels_first else -1
  args = _inputs(shape, dtype, axis=axis)
  mask = padding_mask(shape) if masked else None
  compiled = training_step(FORWARDS[name], axis, mask).lower(*args).compile()
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def serve(make_runner: Callable[[dict], tuple | None]) -> None:
  """A worker's loop: reads commands from stdin, answers one JSON line each on stdout.

  `make_runner(case)` gives (run, compile seconds) or (run, compile seconds, info), info a
  JSON-able dict of what the worker measured besides time (compiled memory), or None where
  the implementation does not run the case.

    {"op": "prepare", "case": {...}, "sample_s": s}  → {"compile_s": s, "info": {...}}
                                                       or {"skip": true}
    {"op": "sample", "settle_s": s}                  → {"seconds": time per call}
    {"op": "quit"}

  Anything else the process prints goes to stderr, so that it cannot garble the answers.
  """
  answers = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  run, calls = None, 1
  for line in sys.stdin:
    message = json.loads(line)
    try:
      if message["op"] == "quit":
        break
      if message["op"] == "prepare":
        run = None
        gc.collect()
        made = make_runner(message["case"])
        if made is None:
          answer = {"skip": True}
        else:
          run, compile_s, *info = made
          run()  # warm-up
          start = time.perf_counter()
          run()
          once = time.perf_counter() - start
          calls = max(1, math.ceil(message["sample_s"] / max(once, 1e-7)))
          answer = {"compile_s": compile_s, "info": info[0] if info else {}}
      else:  # sample
        settled = time.perf_counter() + message["settle_s"]
        run()
        while time.perf_counter() < settled:
          run()
        start = time.perf_counter()
        for _ in range(calls):
          run()
        answer = {"seconds": (time.perf_counter() - start) / calls}
    except Exception as e:  # reported to the parent, which raises it with the name
      answer = {"error": f"{type(e).__name__}: {e}"}
    answers.write(json.dumps(answer) + "\n")


class Worker:
  """One implementation's process; `module` serves it with `serve`."""

  def __init__(self, module: str, name: str, env: dict[str, str]):
    self.name = name
    self.process = subprocess.Popen([sys.executable, "-m", module, "--worker", name],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    cwd=ROOT, env=env)

  def send(self, **message):
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()

  def receive(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker {self.name!r} exited ({self.process.wait()})")
    answer = json.loads(line)
    if "error" in answer:
      raise RuntimeError(f"benchmark worker {self.name!r}: {answer['error']}")
    return answer

  def close(self):
    if self.process.poll() is None:
      try:
        self.send(op="quit")
        self.process.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()
        self.process.wait()
    for pipe in (self.process.stdin, self.process.stdout):
      with contextlib.suppress(OSError):  # a worker that died leaves a broken pipe
        pipe.close()


def worker_environment() -> dict[str, str]:
  """The parent's environment (allocator included), with this checkout first on the path."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def alternate(module: str, names, cases: list[dict], repeats: int, settle_s: float,
              sample_s: float, env: dict[str, str] | None = None) -> list[dict]:
  """Times every implementation in `names` at every case, each in its own process (a
  `Worker` of `module`), the processes taking turns over `repeats` rounds in an order
  rotated every round. Returns one dict per (case, implementation that runs it):
  case, implementation, median_s, samples, compile_s, info (the runner's, or {})."""
  env = worker_environment() if env is None else env
  workers = [Worker(module, name, env) for name in names]
  results = []
  try:
    for case in cases:
      for worker in workers:  # compiled and warmed up in parallel: untimed
        worker.send(op="prepare", case=case, sample_s=sample_s)
      ready = [(w, w.receive()) for w in workers]
      ready = [(w, answer) for w, answer in ready if not answer.get("skip")]
      samples = {w.name: [] for w, _ in ready}
      for r in range(repeats):
        order = ready[r % len(ready):] + ready[:r % len(ready)]
        for worker, _ in order:
          worker.send(op="sample", settle_s=settle_s)
          samples[worker.name].append(worker.receive()["seconds"])
      for worker, answer in ready:
        results.append({"case": case, "implementation": worker.name,
                        "median_s": statistics.median(samples[worker.name]),
                        "samples": samples[worker.name], "compile_s": answer["compile_s"],
                        "info": answer["info"]})
  finally:
    for worker in workers:
      worker.close()
  return results


def time_ops(shapes, dtypes, repeats: int, settle_s: float = 0.02, sample_s: float = 0.02,
             channels_first_shapes=(), masked_shapes=()) -> list[dict]:
  """Rows for `shapes` (features last), `channels_first_shapes` (features on axis 1) and
  `masked_shapes` (features last, a quarter of the examples masked; only the implementations
  that take a mask), every implementation in its own process, and the floor's row."""
  cases = [{"shape": list(s), "dtype": d, "channels_first": cf, "masked": m}
           for d in dtypes
           for s, cf, m in ([(s, False, False) for s in shapes]
                            + [(s, True, False) for s in channels_first_shapes]
                            + [(s, False, True) for s in masked_shapes])]
  env = worker_environment()
  floor = build_floor()
  if floor is not None:
    env[FLOOR_LIBRARY_ENV] = str(floor)
  names = [*FORWARDS, TORCH, FLOOR]
  results = alternate("benchmarks.ops", names, cases, repeats, settle_s, sample_s, env)
  rows = []
  for result in results:
    case = result["case"]
    shape = tuple(case["shape"])
    nbytes = int(np.prod(shape)) * jnp.dtype(case["dtype"]).itemsize
    label = ("x".join(map(str, shape)) + (CHANNELS_FIRST if case["channels_first"] else "")
             + (MASKED if case["masked"] else ""))
    rows.append({"shape": label, "dtype": case["dtype"], "implementation": result["implementation"],
                 "median_ms": 1e3 * result["median_s"], "compile_s": result["compile_s"],
                 "rounds_ms": [1e3 * s for s in result["samples"]],
                 "gb_per_s": TRANSFERS * nbytes / result["median_s"] / 1e9})
  floors = {(r["shape"], r["dtype"]): r["median_ms"] for r in rows if r["implementation"] == FLOOR}
  for row in rows:
    floor_ms = floors.get((row["shape"], row["dtype"]))
    # The floor of a masked shape is the unmasked one's (all of x is still read).
    floor_ms = floor_ms or floors.get((row["shape"].replace(MASKED, ""), row["dtype"]))
    row["floor_ms"] = floor_ms
    row["pct_of_floor"] = None if floor_ms is None else 100 * floor_ms / row["median_ms"]
  return rows


def streaming_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
  """GB/s of a jitted y = 2x + 1 over a large float32 array (one read, one write), which XLA
  runs on all cores: stated with every run, to compare machines and days (the floor, not
  this, is what the rows are measured against)."""
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
  lines = [f"Machine: {meta['machine']}; JAX {meta['jax']}; allocator {meta['allocator']}; "
           f"{meta.get('date', '')}, load average {meta.get('load', '?')}. Streaming bandwidth "
           f"(jitted 2x+1 on 256 MB, both cores, stated only to compare machines): "
           f"{bandwidth:.1f} GB/s. BN forward + backward, each implementation in its own "
           f"process: median over {meta['repeats']} rounds in which the processes take turns "
           f"(each runs untimed for {meta['op_settle_s'] * 1e3:g} ms, then back-to-back calls "
           f"for about {meta['op_sample_s'] * 1e3:g} ms, timed); GB/s = {TRANSFERS}·size/time; "
           f"% of floor = the floor's time (8 transfers by trivial streaming kernels) / time.", "",
           "| shape | dtype | implementation | ms | GB/s | % of floor | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    floor = "—" if r.get("pct_of_floor") is None else f"{r['pct_of_floor']:.0f}%"
    lines.append(f"| {r['shape']} | {r['dtype']} | {r['implementation']} | "
                 f"{r['median_ms']:.3f} | {r['gb_per_s']:.1f} | {floor} | {r['compile_s']:.2f} |")
  lines += ["", "jaxbn analytic (the C++ kernels) against the others at each shape (> 1: jaxbn "
            "is faster):", "",
            "| shape | dtype | floor ms | jaxbn ms | jaxbn % of floor | vs torch | vs flax.linen "
            "| vs pure JAX |", "|---|---|---|---|---|---|---|---|"]
  by = {(r["shape"], r["dtype"], r["implementation"]): r for r in rows}
  for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
    ours = by.get((shape, dtype, "jaxbn analytic"))
    if ours is None:
      continue

    def ratio(name):
      other = by.get((shape, dtype, name))
      return "—" if other is None else f"{other['median_ms'] / ours['median_ms']:.2f}x"
    floor = ours.get("floor_ms")
    floor_ms = "—" if floor is None else f"{floor:.3f}"
    percent = "—" if floor is None else f"{100 * floor / ours['median_ms']:.0f}%"
    lines.append(f"| {shape} | {dtype} | {floor_ms} | {ours['median_ms']:.3f} | {percent} | "
                 f"{ratio(TORCH)} | {ratio('flax.linen')} | {ratio('jaxbn analytic, pure JAX')} |")
  lines += ["", "| implementation | bytes saved for the backward | activation-sized tensors |",
            "|---|---|---|"]
  for r in residuals:
    lines.append(f"| {r['implementation']} | {r['residual_bytes'] / r['x_bytes']:.2f}× x "
                 f"({r['shape']}, {r['dtype']}) | {r['activation_sized']} |")
  return "\n".join(lines) + "\n"


def _worker_main():
  """`python -m benchmarks.ops --worker NAME`: serves implementation NAME."""
  name = sys.argv[sys.argv.index("--worker") + 1]
  logging.set_verbosity(logging.WARNING)
  serve(lambda case: _runner(name, case))


if __name__ == "__main__":
  _worker_main()
