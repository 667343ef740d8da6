"""What a convolutional training step compiles to with each BatchNorm: counts from the optimized
HLO (`jax.jit(step).lower(...).compile().as_text()`) of one SGD step of a CIFAR-style ResNet
stage (NHWC float32, batch 32, 16x16x64: stem conv-BN-ReLU, then two basic blocks
conv-BN-ReLU-conv-BN + residual, ReLU; global average pool, Dense(10), softmax cross-entropy),
for jaxbn.linen.BatchNorm with its C++ kernels (the default), jaxbn's pure-JAX path
(`use_cpu_kernel=False`) and flax.linen.BatchNorm.

Counted: fusions by kind, custom-calls by target, copies and transposes (and their bytes),
convolutions, and the bytes of every array the entry computation materializes (outputs of its
top-level instructions, less parameters, tuples, get-tuple-element and bitcasts), with how many
of those are activation-sized (>= one 32x16x16x64 f32 array); `memory_analysis()` temp bytes.
Each step is then timed (median ms of 15 calls after warm-up), each variant in its own process
so that no thread pools or allocator state are shared.

With `--profile`, each process also traces 20 steps with `jax.profiler` and sums the time of
every executed HLO instruction by what it is (convolution, dot, reduction, elementwise, a C++
BN call): per category, thread-ms (summed over threads) and wall-ms (time in which at least one
thread runs one), and the step's busy and total span. This says where a step's time goes, and
how much of it runs on both cores, far more steadily than the step time itself.

    python -m benchmarks.step_hlo            # table of all three
    python -m benchmarks.step_hlo --dump     # also writes step_<variant>.hlo.txt here and
                                             # names the writers of activation-sized arrays
    python -m benchmarks.step_hlo --profile  # also the time by category
"""
import collections
import os
import re
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn.linen

VARIANTS = ("jaxbn", "jaxbn pure", "flax")
SHAPE = (32, 16, 16, 64)
ACT_BYTES = int(np.prod(SHAPE)) * 4
BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
         "f64": 8, "s64": 8, "u64": 8}


def _norm(variant):
  if variant == "flax":
    return nn.BatchNorm
  return lambda **kw: jaxbn.linen.BatchNorm(use_cpu_kernel=None if variant == "jaxbn" else False, **kw)


class Stage(nn.Module):
  variant: str

  @nn.compact
  def __call__(self, x):
    norm = _norm(self.variant)
    conv = lambda h: nn.Conv(SHAPE[-1], (3, 3), use_bias=False)(h)
    bn = lambda h: norm(use_running_average=False, momentum=0.9)(h)
    x = nn.relu(bn(conv(x)))
    for _ in range(2):
      h = nn.relu(bn(conv(x)))
      x = nn.relu(bn(conv(h)) + x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def build(variant):
  model = Stage(variant)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(SHAPE, np.float32))
  labels = jnp.asarray(rng.integers(0, 10, SHAPE[0]))
  variables = model.init(jax.random.key(0), x)

  def step(params, batch_stats, x, labels):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
    return params, upd["batch_stats"], l

  args = (variables["params"], variables["batch_stats"], x, labels)
  return jax.jit(step).lower(*args).compile(), args


def _nbytes(shape):
  # every array in a (possibly tuple) shape such as (f32[32,64]{1,0}, f32[64]{0})
  return [BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
          for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)]


def _instructions(text):
  """(computation, is_entry, opcode, shape, line) for every instruction."""
  comp, entry = None, False
  for line in text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comp, entry = head.group(2), bool(head.group(1))
      continue
    m = re.match(r"^\s+(?:ROOT\s+)?%?[\w.\-]+ = ", line)
    if not m or comp is None:
      continue
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: up to its matching parenthesis
      depth = 0
      for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
          break
      shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(" ")
    yield comp, entry, rest.split("(", 1)[0], shape, line


def analyse(compiled):
  text = compiled.as_text()
  r = collections.Counter()
  targets, kinds, writers = collections.Counter(), collections.Counter(), collections.Counter()
  targets_of = lambda line: re.search(r'custom_call_target="([^"]+)"', line).group(1)
  for comp, entry, op, shape, line in _instructions(text):
    if op == "fusion":
      kinds[(re.search(r"kind=(\w+)", line) or [None, "?"])[1]] += 1
    elif op == "custom-call":
      targets[re.search(r'custom_call_target="([^"]+)"', line).group(1)] += 1
    elif op in ("copy", "transpose", "convolution"):
      r[op] += 1
      r[op + " MB"] += sum(_nbytes(shape)) / 1e6
    if entry and op not in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
      sizes = _nbytes(shape)
      r["entry MB"] += sum(sizes) / 1e6
      big = sum(s >= ACT_BYTES for s in sizes)
      r["activation-sized"] += big
      # who writes them: the C++ calls, XLA's elementwise (kLoop) fusions, the library (kCustom:
      # convolutions, dots, column reductions)
      kind = "custom-call" if op == "custom-call" else (re.search(r"kind=(\w+)", line) or [None, op])[1]
      r["act " + kind] += big
      if big:
        name = re.match(r"^\s+(?:ROOT\s+)?%?([\w\-]+?)(?:\.\d+)? = ", line).group(1)
        writers[name if op != "custom-call" else "C++ " + targets_of(line)] += big
  mem = compiled.memory_analysis()
  r["temp MB"] = getattr(mem, "temp_size_in_bytes", 0) / 1e6
  r["writers"] = writers
  return r, kinds, targets, text


def _categories(text) -> dict[str, str]:
  """Each instruction's name in the optimized HLO → what it runs: "conv", "dot", "reduce",
  "elementwise" (fusions by what their computations contain), "C++" (jaxbn's calls)."""
  bodies = collections.defaultdict(list)
  for comp, _, op, _, line in _instructions(text):
    bodies[comp].append((op, line))

  def contains(comp, seen=()):
    ops = set()
    for op, line in bodies.get(comp, ()):
      ops.add(op)
      for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        if called not in seen:
          ops |= contains(called, seen + (called,))
    return ops

  kinds = {}
  for comp, _, op, _, line in _instructions(text):
    name = re.match(r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = ", line).group(1)
    if op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
      kinds[name] = "C++" if target.startswith("jaxbn") else target
    elif op in ("fusion", "convolution", "dot", "reduce"):
      called = re.search(r"calls=%?([\w.\-]+)", line)
      ops = contains(called.group(1)) if called else {op}
      kinds[name] = next((k for k, o in (("conv", "convolution"), ("dot", "dot"),
                                         ("reduce", "reduce")) if o in ops), "elementwise")
    elif op in ("copy", "transpose"):
      kinds[name] = "elementwise"
  return kinds


def _union_ns(intervals) -> int:
  total, end = 0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def profile_step(compiled, args, steps=20) -> str:
  """Where `steps` steps' time goes, by category (see the module's docstring)."""
  import glob
  import tempfile
  from jax.profiler import ProfileData

  kinds = _categories(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    trace = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  spans = collections.defaultdict(list)
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:  # an executed instruction (not the executor's own events)
          spans[kinds[event.name]].append((event.start_ns, event.start_ns + event.duration_ns))
  every = [iv for ivs in spans.values() for iv in ivs]
  ms = lambda ns: ns / 1e6 / steps
  parts = ", ".join(f"{k} {ms(sum(b - a for a, b in v)):.1f} / {ms(_union_ns(v)):.1f}"
                    for k, v in sorted(spans.items(), key=lambda kv: -len(kv[1])))
  return (f"thread-ms / wall-ms per step: {parts}; busy {ms(_union_ns(every)):.1f}, span "
          f"{ms(max(b for _, b in every) - min(a for a, _ in every)):.1f}")


def time_step(compiled, args, calls=15):
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(calls):
    t = time.perf_counter(); jax.block_until_ready(compiled(*args)); ts.append(time.perf_counter() - t)
  return 1e3 * statistics.median(ts)


def one(variant, dump=False, profile=False):
  compiled, args = build(variant)
  r, kinds, targets, text = analyse(compiled)
  if dump:
    with open("step_%s.hlo.txt" % variant.replace(" ", "_"), "w") as f:
      f.write(text)
  fus = ", ".join("%s %d" % kv for kv in sorted(kinds.items()))
  cc = ", ".join("%s %d" % kv for kv in sorted(targets.items())) or "none"
  if dump:  # which instructions write the activation-sized arrays, by name less its number
    print(variant, dict(sorted(r["writers"].items())), file=sys.stderr)
  writers = "%d (C++ %d, kLoop %d, kCustom %d)" % (
      r["activation-sized"], r["act custom-call"], r["act kLoop"], r["act kCustom"])
  row = ("| %s | %d (%s) | %s | %d / %.1f | %d / %.1f | %d | %.1f | %s | %.1f | %.1f |" % (
      variant, sum(kinds.values()), fus, cc, r["copy"], r["copy MB"], r["transpose"],
      r["transpose MB"], r["convolution"], r["entry MB"], writers, r["temp MB"],
      time_step(compiled, args)))
  if profile:
    print(variant, profile_step(compiled, args), file=sys.stderr)
  return row


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--one":
    print(one(sys.argv[2], "--dump" in sys.argv, "--profile" in sys.argv))
    sys.exit()
  print("| BN | fusions (by kind) | custom-calls | copies / MB | transposes / MB | convolutions "
        "| ENTRY materializes MB | activation-sized arrays (written by) | temp MB | step ms |")
  print("|---" * 10 + "|")
  for v in VARIANTS:  # one process each: no shared pools or allocator state between the timings
    out = subprocess.run([sys.executable, "-m", "benchmarks.step_hlo", "--one", v, *sys.argv[1:]],
                         capture_output=True, text=True, check=True)
    print(out.stdout.strip(), flush=True)
    sys.stderr.write(out.stderr)
  print("load average", os.getloadavg())
