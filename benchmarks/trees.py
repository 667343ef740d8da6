"""The BN-layer benchmark of the tree it runs in, trimmed to jaxbn's kernels, flax.linen and
torch, as JSON on stdout: for comparing two checkouts on one machine, back to back.

    cd <checkout> && LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python <this file> [repeats]

(The same `benchmarks.ops.time_ops` of each checkout, only fewer implementations and
rounds.)
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())

from benchmarks import ops as bench_ops  # noqa: E402  (the checkout's own)

KEEP = ("jaxbn analytic", "flax.linen")


def main():
  repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
  for name in list(bench_ops.FORWARDS):
    if name not in KEEP:
      del bench_ops.FORWARDS[name]
  bandwidth = bench_ops.streaming_bandwidth()
  rows = bench_ops.time_ops([(256, 1024), (4096, 1024), (128, 32, 32, 64), (64, 56, 56, 128),
                             (32, 112, 112, 64)], ("float32", "bfloat16"), repeats,
                            channels_first_shapes=[(64, 128, 56, 56)])
  print(json.dumps({"bandwidth": bandwidth, "load": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
  main()
