"""Figures, summary.json and summary.md of the probes' studies (`runs.py`)."""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.core import figures
from experiments.core.figures import plt

COLOURS = {**figures.COLOURS, "noisy_bn": "tab:green"}
LABELS = {**figures.LABELS, "noisy_bn": "with noisy BN"}
ORDER = ("plain", "bn", "noisy_bn")
MAX_LAYER_PANELS = 5


def _column(history: list, key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [r for r in figures.evaluations(history) if key in r]
  return (np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], float))


def _names(outcome: dict) -> list[str]:
  return [n for n in ORDER if n in outcome["histories"]]


def _accuracy_summary(outcome: dict) -> dict:
  results = outcome["results"]
  return {"final_test_accuracy": {k: r["final_test_accuracy"] for k, r in results.items()},
          "diverged_at": {k: r["diverged_at"] for k, r in results.items()},
          "steps_per_second": {k: r["steps_per_second"] for k, r in results.items()}}


def _write(config, workdir: pathlib.Path, summary: dict, lines: list[str]) -> dict:
  head = [f"# {config.study}: {config.data.name}, {config.model.activation} MLP "
          f"{tuple(config.model.hidden)}", "",
          f"{config.num_steps} steps, batch {config.batch_size}, {config.optimizer.name} "
          f"lr {config.optimizer.learning_rate} ({config.optimizer.schedule}), seed "
          f"{config.seed}; probes after every {config.eval_every} steps.", "",
          "| net | final test accuracy |", "|---|---|"]
  for name, accuracy in summary["final_test_accuracy"].items():
    at = summary["diverged_at"][name]
    head.append(f"| {LABELS.get(name, name)} | "
                f"{'diverged at step %d' % at if at else f'{accuracy:.4f}'} |")
  return figures.write_summary(workdir, summary, "\n".join(head + [""] + lines) + "\n")


# ------------------------------------------------------------------------------ noisy BN


def noisy_summary(outcome: dict) -> dict:
  """Accuracy, and how far the last hidden layer's inputs move between evaluations: the mean
  over units and consecutive evaluations of |Δ batch mean| and |Δ batch std| (training mode,
  with the noise), and the range of one unit's median."""
  summary = _accuracy_summary(outcome)
  shift = {}
  for name in _names(outcome):
    evals = figures.evaluations(outcome["histories"][name])
    if len(evals) < 2:
      continue
    means = np.array([r["layer_means"] for r in evals])
    stds = np.array([r["layer_stds"] for r in evals])
    median = np.array([r["unit_train_percentiles"][2] for r in evals])
    shift[name] = {"mean_abs_change_of_unit_means": float(np.mean(np.abs(np.diff(means, axis=0)))),
                   "mean_abs_change_of_unit_stds": float(np.mean(np.abs(np.diff(stds, axis=0)))),
                   "unit_median_range": float(np.ptp(median))}
  summary["distribution_shift"] = shift
  summary["final_train_loss"] = {n: outcome["histories"][n][-1]["train_loss"]
                                 for n in _names(outcome) if outcome["histories"][n]}
  return summary


def plot_noisy(outcome: dict, path: pathlib.Path, unit: int) -> None:
  names = _names(outcome)
  fig, axes = plt.subplots(1, 2 + len(names), figsize=(4.2 * (2 + len(names)), 3.4))
  for name in names:
    steps, accuracy = _column(outcome["histories"][name], "test_accuracy")
    axes[0].plot(steps, accuracy, color=COLOURS[name], label=LABELS[name])
    steps, loss = _column(outcome["histories"][name], "train_loss")
    axes[1].plot(steps, loss, color=COLOURS[name], label=LABELS[name])
  axes[0].set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy")
  axes[1].set(xlabel="training steps", ylabel="training loss",
              title="(b) training loss (noisy BN: with its noise)")
  axes[0].legend()
  limits = []
  for ax, name in zip(axes[2:], names, strict=True):
    evals = figures.evaluations(outcome["histories"][name])
    steps = np.array([r["step"] for r in evals])
    pct = np.array([r["unit_train_percentiles"] for r in evals]).reshape(len(evals), -1)
    if len(evals):
      ax.fill_between(steps, pct[:, 0], pct[:, 4], color=COLOURS[name], alpha=0.2, lw=0)
      ax.fill_between(steps, pct[:, 1], pct[:, 3], color=COLOURS[name], alpha=0.35, lw=0)
      ax.plot(steps, pct[:, 2], color=COLOURS[name])
      limits += [pct.min(), pct.max()]
    ax.set(xlabel="training steps", ylabel="activation input (training mode)",
           title=f"{LABELS[name]}: unit {unit}, last hidden layer")
  if limits:
    for ax in axes[2:]:
      ax.set_ylim(min(limits), max(limits))
  fig.text(0.5, -0.06, "shaded: 5–95th and 15–85th percentiles over 1,000 test examples; "
           "line: median", ha="center", fontsize=8)
  figures.save(fig, path)


def write_noisy(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = noisy_summary(outcome)
  plot_noisy(outcome, workdir / "plots" / "noisy_bn.png", config.diagnostics.unit)
  lines = ["Shift of the last hidden layer's inputs between consecutive evaluations (training "
           "mode, with the noise), averaged over units and evaluations:", "",
           "| net | mean \\|Δ unit mean\\| | mean \\|Δ unit std\\| | range of a unit's median |",
           "|---|---|---|---|"]
  for name, row in summary["distribution_shift"].items():
    lines.append(f"| {LABELS[name]} | {row['mean_abs_change_of_unit_means']:.4f} | "
                 f"{row['mean_abs_change_of_unit_stds']:.4f} | {row['unit_median_range']:.3f} |")
  lines += ["", "![noisy BN](plots/noisy_bn.png)"]
  return _write(config, workdir, summary, lines)


# ------------------------------------------------------------------------------------ ICS


def ics_summary(outcome: dict) -> dict:
  """Per net and layer (from layer 1: layer 0 has no earlier layers), the median over the
  probes of ‖G − G′‖₂, ‖G − G′‖/‖G‖ and cos(G, G′)."""
  summary = _accuracy_summary(outcome)
  for key in ("l2", "relative", "cosine"):
    summary[f"median_ics_{key}"] = {}
    for name in _names(outcome):
      evals = figures.evaluations(outcome["histories"][name])
      if evals:
        values = np.array([r[f"ics_{key}"] for r in evals])
        summary[f"median_ics_{key}"][name] = np.median(values, axis=0)[1:].tolist()
  return summary


def plot_ics(outcome: dict, path: pathlib.Path) -> None:
  names = _names(outcome)
  first = next((figures.evaluations(outcome["histories"][n]) for n in names if figures.evaluations(outcome["histories"][n])),
               [])
  depth = len(first[0]["ics_l2"]) if first else 1
  # At most MAX_LAYER_PANELS layers, evenly spread from the second to the last.
  layers = (sorted({int(round(i)) for i in np.linspace(1, depth - 1, MAX_LAYER_PANELS)})
            if depth > 1 else [0])
  fig, axes = plt.subplots(3, len(layers), figsize=(3.6 * len(layers), 8.4), squeeze=False)
  for column, layer in enumerate(layers):
    for name in names:
      evals = figures.evaluations(outcome["histories"][name])
      steps = [r["step"] for r in evals]
      for row, key in enumerate(("l2", "relative", "cosine")):
        values = [r[f"ics_{key}"][layer] for r in evals]
        plot = axes[row, column].semilogy if key != "cosine" else axes[row, column].plot
        plot(steps, values, color=COLOURS[name], label=LABELS[name])
    axes[0, column].set(title=f"layer {layer + 1}", ylabel="‖G − G′‖₂" if not column else None)
    axes[1, column].set(ylabel="‖G − G′‖ / ‖G‖" if not column else None)
    axes[2, column].set(xlabel="training steps", ylabel="cos(G, G′)" if not column else None)
  axes[0, 0].legend(fontsize=7)
  figures.save(fig, path)


def write_ics(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = ics_summary(outcome)
  plot_ics(outcome, workdir / "plots" / "ics.png")
  lines = ["Internal covariate shift (Santurkar et al., Definition 2.1), median over training, "
           "per layer from the second (the first has no earlier layers):", ""]
  for key, title in (("l2", "‖G − G′‖₂"), ("relative", "‖G − G′‖ / ‖G‖"),
                     ("cosine", "cos(G, G′)")):
    rows = summary[f"median_ics_{key}"]
    if not rows:
      continue
    depth = len(next(iter(rows.values())))
    lines += [f"{title}:", "", "| net | " + " | ".join(f"layer {i + 2}" for i in range(depth))
              + " |", "|---|" + "---|" * depth]
    lines += [f"| {LABELS[n]} | " + " | ".join(f"{v:.3g}" for v in values) + " |"
              for n, values in rows.items()]
    lines.append("")
  lines += ["![ICS](plots/ics.png)"]
  return _write(config, workdir, summary, lines)


# ------------------------------------------------------------------------------ landscape


def landscape_summary(outcome: dict, step_multiples) -> dict:
  """Per net, the median over training of: the loss's range along the gradient (variation),
  the largest gradient change (predictiveness) and the effective β-smoothness; and the
  plain/BN ratios of those medians."""
  summary = _accuracy_summary(outcome)
  summary["step_multiples"] = list(step_multiples)
  medians = {}
  for name in _names(outcome):
    evals = figures.evaluations(outcome["histories"][name])
    if not evals:
      continue
    column = lambda key: np.array([r[f"landscape_{key}"] for r in evals])
    medians[name] = {
        "loss_variation": float(np.median(column("loss_max") - column("loss_min"))),
        "grad_change_max": float(np.median(column("grad_change_max"))),
        "beta_smoothness": float(np.median(column("beta_smoothness"))),
        "grad_norm": float(np.median(column("grad_norm")))}
  summary["median_over_training"] = medians
  if {"plain", "bn"} <= set(medians):
    summary["plain_over_bn"] = {k: medians["plain"][k] / medians["bn"][k]
                                for k in medians["bn"] if medians["bn"][k] > 0}
  return summary


def plot_landscape(outcome: dict, path: pathlib.Path) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
  for name in _names(outcome):
    evals = figures.evaluations(outcome["histories"][name])
    steps = np.array([r["step"] for r in evals])
    column = lambda key: np.array([r[f"landscape_{key}"] for r in evals], float)
    for ax, low, high in ((axes[0], "loss_min", "loss_max"),
                          (axes[1], "grad_change_min", "grad_change_max")):
      ax.fill_between(steps, column(low), column(high), color=COLOURS[name], alpha=0.35,
                      label=LABELS[name])
    axes[2].plot(steps, column("beta_smoothness"), color=COLOURS[name], label=LABELS[name])
  axes[0].set(xlabel="training steps", ylabel="loss L(θ − ηg)", yscale="log",
              title="(a) loss landscape: range over η")
  axes[1].set(xlabel="training steps", ylabel="‖∇L(θ) − ∇L(θ − ηg)‖", yscale="log",
              title="(b) gradient predictiveness: range over η")
  axes[2].set(xlabel="training steps", ylabel="max over η of change / ‖ηg‖", yscale="log",
              title='(c) "effective" β-smoothness')
  for ax in axes:
    ax.legend(fontsize=7)
  figures.save(fig, path)


def write_landscape(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = landscape_summary(outcome, config.probes.step_multiples)
  plot_landscape(outcome, workdir / "plots" / "landscape.png")
  multiples = ", ".join(f"{m:g}" for m in config.probes.step_multiples)
  lines = [f"Along −g from θ by η = ({multiples}) × lr, on the next step's batch; medians over "
           "training:", "",
           "| net | loss variation (max − min over η) | max ‖∇L(θ) − ∇L(θ − ηg)‖ | "
           "effective β-smoothness | ‖g‖ |", "|---|---|---|---|---|"]
  for name, row in summary["median_over_training"].items():
    lines.append(f"| {LABELS[name]} | {row['loss_variation']:.4g} | "
                 f"{row['grad_change_max']:.4g} | {row['beta_smoothness']:.4g} | "
                 f"{row['grad_norm']:.4g} |")
  if "plain_over_bn" in summary:
    ratios = summary["plain_over_bn"]
    lines += ["", "plain / BN: " + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items())]
  lines += ["", "![landscape](plots/landscape.png)"]
  return _write(config, workdir, summary, lines)
