"""A/B of two checkouts' BN kernels and floors by the benchmark's method: each implementation
in its own process (benchmarks/ops.py's workers, each run from its checkout, with
its own jaxbn and its own floor library), the processes taking turns over rounds in an order
rotated every round, medians; tcmalloc when installed. Fewer processes than the full
benchmark (no pure-JAX, autodiff or Flax rows), so more rounds fit in the same time.

    python benchmarks/ab_checkouts.py /work/main /work/wt-nt --rounds=11 --out=/tmp/ab.json

Prints one markdown row per (shape, dtype): ms of each (implementation, checkout), the
ratio B/A of jaxbn's times, and each jaxbn as % of its own checkout's floor.
"""

import argparse
import hashlib
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
SHAPES = [(256, 1024), (4096, 1024), (128, 32, 32, 64), (64, 56, 56, 128), (32, 112, 112, 64)]
CHANNELS_FIRST = [(64, 128, 56, 56)]


def build_floor(root: pathlib.Path) -> str:
  """The checkout's stream_floor.cc, compiled against its jaxbn/csrc."""
  import jax
  source = root / "benchmarks" / "csrc" / "stream_floor.cc"
  if not source.exists():  # a checkout from before benchmarks/ had its own folder
    source = root / "experiments" / "csrc" / "stream_floor.cc"
  digest = hashlib.sha256(source.read_bytes())
  for header in sorted((root / "jaxbn" / "csrc").glob("*.h")):
    digest.update(header.read_bytes())
  library = pathlib.Path("/tmp") / f"ab-floor-{digest.hexdigest()[:16]}.so"
  if not library.exists():
    subprocess.run([*shlex.split(os.environ.get("CXX", "g++")), "-O3", "-march=native",
                    "-std=c++17", "-shared", "-fPIC", f"-I{root / 'jaxbn' / 'csrc'}",
                    f"-I{jax.ffi.include_dir()}", str(source), "-o", str(library)], check=True)
  return str(library)


class Worker:
  """One implementation's process, run from `root` with `root` first on the path."""

  def __init__(self, root: pathlib.Path, name: str, label: str, floor: str):
    self.label = label
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["JAXBN_BENCH_FLOOR_LIBRARY"] = floor
    if os.path.exists(TCMALLOC) and "LD_PRELOAD" not in env:
      env["LD_PRELOAD"] = TCMALLOC
    # A checkout from before benchmarks/ had its own folder keeps the workers in experiments/.
    module = ("benchmarks.ops" if (root / "benchmarks" / "ops.py").exists()
              else "experiments.bench_ops")
    self.process = subprocess.Popen(
        [sys.executable, "-m", module, "--worker", name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)

  def ask(self, **message) -> dict:
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()
    answer = json.loads(self.process.stdout.readline())
    if "error" in answer:
      raise RuntimeError(f"{self.label}: {answer['error']}")
    return answer

  def close(self):
    self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
    self.process.stdin.flush()
    self.process.wait(timeout=30)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("a", type=pathlib.Path)
  parser.add_argument("b", type=pathlib.Path)
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--out", default="/tmp/ab.json")
  args = parser.parse_args()
  checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
  floors = {k: build_floor(root) for k, root in checkouts.items()}
  workers = [Worker(root, name, f"{name} {k}", floors[k])
             for k, root in checkouts.items() for name in ("jaxbn analytic", "floor")]
  workers.append(Worker(checkouts["A"], "torch", "torch", floors["A"]))
  cases = [{"shape": list(s), "dtype": d, "channels_first": cf, "masked": False}
           for d in args.dtypes.split(",")
           for s, cf in [(s, False) for s in SHAPES] + [(s, True) for s in CHANNELS_FIRST]]
  started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  load = open("/proc/loadavg").read().split()[:3]
  results = []
  try:
    for case in cases:
      for w in workers:
        w.process.stdin.write(json.dumps({"op": "prepare", "case": case, "sample_s": 0.02}) + "\n")
        w.process.stdin.flush()
      for w in workers:
        answer = json.loads(w.process.stdout.readline())
        if "error" in answer:
          raise RuntimeError(f"{w.label}: {answer['error']}")
      samples = {w.label: [] for w in workers}
      for r in range(args.rounds):
        for w in workers[r % len(workers):] + workers[:r % len(workers)]:
          samples[w.label].append(w.ask(op="sample", settle_s=0.02)["seconds"])
      ms = {label: 1e3 * statistics.median(s) for label, s in samples.items()}
      results.append({"case": case, "ms": ms, "rounds_ms": {
          label: [1e3 * x for x in s] for label, s in samples.items()}})
      shape = "x".join(map(str, case["shape"])) + (" NCHW" if case["channels_first"] else "")
      a, b = ms["jaxbn analytic A"], ms["jaxbn analytic B"]
      print(f"| {shape} | {case['dtype']} | {ms['floor A']:.3g} | {ms['floor B']:.3g} | "
            f"{a:.3g} | {b:.3g} | {ms['torch']:.3g} | {a / b:.2f}x | "
            f"{100 * ms['floor A'] / a:.0f}% | {100 * ms['floor B'] / b:.0f}% | "
            f"{ms['torch'] / a:.2f}x | {ms['torch'] / b:.2f}x |", flush=True)
  finally:
    for w in workers:
      w.close()
  end_load = open("/proc/loadavg").read().split()[:3]
  json.dump({"started": started, "load_start": load, "load_end": end_load,
             "checkouts": {k: str(v) for k, v in checkouts.items()}, "rounds": args.rounds,
             "results": results}, open(args.out, "w"), indent=1)
  print(f"started {started}, load {' '.join(load)} -> {' '.join(end_load)}")


if __name__ == "__main__":
  main()
