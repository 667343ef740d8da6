"""Figure and summary helpers every study shares: the Agg backend, atomic PNG writes, the
series of an evaluation history, the notes a panel shows instead of curves, summary files.

Studies draw their own figures with these; nothing here knows any study.
"""

from __future__ import annotations

import io
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.core import workdir as workdir_lib  # noqa: E402

# The two nets most studies compare.
COLOURS = {"bn": "tab:blue", "plain": "tab:orange"}
LABELS = {"bn": "with BN", "plain": "without BN"}


def save(fig, path: pathlib.Path) -> None:
  """Writes `fig` as a PNG atomically and closes it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  workdir_lib.atomic_write(path, buffer.getvalue())


def evaluations(history: list) -> list:
  """The records of a run's history that hold an evaluation."""
  return [r for r in history if "test_accuracy" in r]


def series(history, key, index=None):
  """(steps, values) of `key` (its `index`-th entry, for a list) over the evaluations."""
  rows = [r for r in evaluations(history) if key in r]
  steps = np.array([r["step"] for r in rows])
  values = np.array([r[key] if index is None else r[key][index] for r in rows], float)
  return steps, values


def diverged_note(result: dict | None) -> str | None:
  """What a panel of a run with no evaluation shows instead of curves."""
  if result and result.get("diverged"):
    return f"diverged at step {result['diverged_at']}\nbefore its first evaluation"
  return None


def note(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="tab:red")


def write_summary(workdir: pathlib.Path, summary: dict, markdown: str) -> dict:
  """summary.json and summary.md, atomically; returns `summary`."""
  workdir_lib.atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
  workdir_lib.atomic_write(workdir / "summary.md", markdown)
  return summary
