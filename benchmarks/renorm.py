"""Forward + backward time of batch renormalization and ghost batches vs plain BN, on CPU.

    python -m benchmarks.renorm                # every implementation, one process each
    python -m benchmarks.renorm --one NAME     # one implementation (what the above spawns)

Method as docs/performance.md's op benchmark: y, dx, dγ, dβ from x, γ, β, dy, jitted; 15
rounds, each 20 ms untimed then a timed sample of back-to-back calls lasting ≥ 2 ms; a row is
the median time per call over rounds. Each implementation runs in its own process (under
tcmalloc when it is installed, as experiments.main does).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"4096x1024": (4096, 1024), "128x32x32x64": (128, 32, 32, 64)}
IMPLS = {
    # name: (batch_norm kwargs, use_cpu_kernel)
    "bn kernels": ({}, None),
    "bn pure JAX": ({}, False),
    "renorm kernels": ({"renorm": True}, None),
    "renorm pure JAX": ({"renorm": True}, False),
    "ghost v=32 kernels": ({"virtual_batch_size": 32}, None),
    "ghost v=32 pure JAX": ({"virtual_batch_size": 32}, False),
}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def _one(name: str) -> dict:
  import jax
  import jax.numpy as jnp

  import jaxbn

  options, use_cpu_kernel = IMPLS[name]
  rows = {}
  for label, shape in SHAPES.items():
    kwargs = dict(options)
    c = shape[-1]
    if kwargs.pop("renorm", False):
      kwargs["renorm"] = jaxbn.Renorm(jnp.full(c, 0.1), jnp.full(c, 0.8), rmax=3.0,
                                      rmin=1 / 3, dmax=5.0)
    key = jax.random.key(0)
    x = jax.random.normal(key, shape, jnp.float32)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    g, b = jnp.ones(c), jnp.zeros(c)

    @jax.jit
    def step(x, g, b, dy):
      y, vjp = jax.vjp(lambda x, g, b: jaxbn.batch_norm(
          x, g, b, use_cpu_kernel=use_cpu_kernel, **kwargs)[0], x, g, b)
      return y, vjp(dy)

    jax.block_until_ready(step(x, g, b, dy))
    times = []
    for _ in range(15):
      end = time.perf_counter() + 0.02
      while time.perf_counter() < end:
        jax.block_until_ready(step(x, g, b, dy))
      calls, start = 0, time.perf_counter()
      while time.perf_counter() - start < 0.002 or calls == 0:
        jax.block_until_ready(step(x, g, b, dy))
        calls += 1
      times.append((time.perf_counter() - start) / calls)
    rows[label] = statistics.median(times) * 1e3
  return rows


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == "--one":
    print(json.dumps(_one(sys.argv[2])))
    return
  env = dict(os.environ)
  if os.path.exists(TCMALLOC):
    env["LD_PRELOAD"] = TCMALLOC
  results = {}
  for name in IMPLS:
    out = subprocess.run([sys.executable, "-m", "benchmarks.renorm", "--one", name], env=env,
                         check=True,
                         capture_output=True, text=True).stdout
    results[name] = json.loads(out.strip().splitlines()[-1])
  print(f"allocator: {'tcmalloc' if 'LD_PRELOAD' in env else 'glibc'}; ms per fwd+bwd "
        "(median of 15 rounds)")
  print("| implementation | " + " | ".join(SHAPES) + " |")
  print("|---|" + "---|" * len(SHAPES))
  for name, rows in results.items():
    print(f"| {name} | " + " | ".join(f"{rows[s]:.2f}" for s in SHAPES) + " |")


if __name__ == "__main__":
  main()
