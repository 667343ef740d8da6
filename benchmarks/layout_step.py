"""jaxbn's training step (forward + backward, the CPU kernels) on the same bytes in both
layouts, 64x56x56x128 channels-last and 64x128x56x56 channels-first, alternating in one
process (one implementation, so no pools compete): median and min ms of 9 calls each.

    cd <checkout> && LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python benchmarks/layout_step.py [float32|bfloat16]
"""
import sys, time, statistics, os
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, os.getcwd())
from benchmarks import ops as bench_ops
dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
runs = {}
for label, shape, axis in (("NHWC", (64, 56, 56, 128), -1), ("NCHW", (64, 128, 56, 56), 1)):
  args = bench_ops._inputs(shape, dtype, axis=axis)
  step = bench_ops.training_step(bench_ops.FORWARDS["jaxbn analytic"], axis)
  c = step.lower(*args).compile()
  txt = c.as_text()
  print(label, "custom-calls", txt.count("custom-call("), "fusions", txt.count(" fusion("), "copies", txt.count(" copy("), "transposes", txt.count("transpose("))
  jax.block_until_ready(c(*args))
  runs[label] = (c, args)
times = {k: [] for k in runs}
for r in range(9):
  for k, (c, args) in runs.items():
    t = time.perf_counter(); jax.block_until_ready(c(*args)); times[k].append(time.perf_counter() - t)
for k, v in times.items():
  print(k, "median ms %.2f" % (1e3 * statistics.median(v)), "min %.2f" % (1e3 * min(v)))
print("load", os.getloadavg())
