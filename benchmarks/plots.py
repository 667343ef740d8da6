"""The op benchmark's figure: per shape, each implementation's time and its bandwidth as a fraction
of the streaming probe's."""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.core import figures
from experiments.core.figures import plt


def plot_op_benchmark(rows: list[dict], bandwidth: float, path: pathlib.Path) -> None:
  """Time and fraction of streaming bandwidth per shape and implementation (float32 and
  bfloat16 side by side)."""
  dtypes = sorted({r["dtype"] for r in rows})
  fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 7), squeeze=False)
  for column, dtype in enumerate(dtypes):
    subset = [r for r in rows if r["dtype"] == dtype]
    shapes = list(dict.fromkeys(r["shape"] for r in subset))
    names = list(dict.fromkeys(r["implementation"] for r in subset))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
      by_shape = {r["shape"]: r for r in subset if r["implementation"] == name}
      xs = np.arange(len(shapes)) + i * width
      # Not every implementation runs every row (torch and the naive one take no mask).
      axes[0, column].bar(xs, [by_shape[s]["median_ms"] if s in by_shape else np.nan
                               for s in shapes], width, label=name)
      axes[1, column].bar(xs, [by_shape[s]["gb_per_s"] / bandwidth if s in by_shape else np.nan
                               for s in shapes], width, label=name)
    for row in range(2):
      axes[row, column].set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, shapes,
                                   rotation=20, fontsize=7)
    axes[0, column].set(title=f"{dtype}: forward + backward", ylabel="ms", yscale="log")
    axes[1, column].set(title=f"{dtype}: fraction of streaming bandwidth", ylabel="fraction")
    axes[1, column].axhline(0.7, color="grey", linestyle=":", linewidth=1)  # the 70% target
    axes[0, column].legend(fontsize=7)
  fig.subplots_adjust(hspace=0.45)
  figures.save(fig, path)
