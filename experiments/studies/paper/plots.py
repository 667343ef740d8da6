"""Figures, summary.json and summary.md of the paper's studies (compare, lr_sweep,
gradient_agreement)."""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.core import figures
from experiments.core.figures import plt

# -------------------------------------------------------------------------------- compare


def plot_fig1(histories: dict, path: pathlib.Path, title: str, results: dict | None = None, *,
              activation: str = "sigmoid") -> None:
  """The BN paper's Figure 1: (a) test accuracy against steps; (b, c) the 15th/50th/85th
  percentiles of one last-hidden-layer unit's activation input (`activation`: the net's
  nonlinearity, which the panels name), without and with BN. A run that diverged before its
  first evaluation has no curves: its panel says so."""
  results = results or {}
  variants = [v for v in ("plain", "bn") if v in histories]
  fig, axes = plt.subplots(1, 1 + len(variants), figsize=(4.2 * (1 + len(variants)), 3.4))
  for variant in variants:
    steps, accuracy = figures.series(histories[variant], "test_accuracy")
    result = results.get(variant, {})
    diverged = f" (diverged at step {result['diverged_at']})" if result.get("diverged") else ""
    axes[0].plot(steps, accuracy, color=figures.COLOURS[variant],
                 label=figures.LABELS[variant] + diverged)
  axes[0].set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy")
  axes[0].legend()
  for ax, variant, letter in zip(axes[1:], variants, "bc"[:len(variants)], strict=True):
    if not figures.evaluations(histories[variant]):
      figures.note(ax, figures.diverged_note(results.get(variant)) or "no evaluation")
    steps, _ = figures.series(histories[variant], "unit_percentiles", 0)
    for q, style in zip(range(3), (":", "-", ":"), strict=True):
      _, values = figures.series(histories[variant], "unit_percentiles", q)
      ax.plot(steps, values, style, color=figures.COLOURS[variant])
    ax.set(xlabel="training steps", ylabel=f"{activation} input",
           title=f"({letter}) {figures.LABELS[variant]}: 15/50/85th pct")
  fig.suptitle(title, y=1.04)
  figures.save(fig, path)


def plot_saturation(histories: dict, path: pathlib.Path, results: dict | None = None) -> None:
  """Per hidden layer: fraction of activation inputs with |x| > threshold, and the gradient
  norm of its kernel, over training, without and with BN. A run that diverged before its
  first evaluation has no curves: its panels say so."""
  results = results or {}
  variants = [v for v in ("plain", "bn") if v in histories]
  fig, axes = plt.subplots(2, len(variants), figsize=(5 * len(variants), 6.5), squeeze=False)
  for column, variant in enumerate(variants):
    history = histories[variant]
    axes[0, column].set(title=f"{figures.LABELS[variant]}: saturated activation inputs",
                        ylabel="fraction |x| > threshold", ylim=(-0.02, 1.02))
    axes[1, column].set(title=f"{figures.LABELS[variant]}: gradient norm per layer",
                        xlabel="training steps", ylabel="‖∂L/∂W‖")
    if not figures.evaluations(history):
      for ax in axes[:, column]:
        figures.note(ax, figures.diverged_note(results.get(variant)) or "no evaluation")
      continue
    for layer in range(len(figures.evaluations(history)[0]["saturated_fraction"])):
      steps, values = figures.series(history, "saturated_fraction", layer)
      axes[0, column].plot(steps, values, label=f"layer {layer + 1}")
    for layer in range(len(figures.evaluations(history)[0]["grad_norm"])):
      steps, values = figures.series(history, "grad_norm", layer)
      axes[1, column].semilogy(steps, values, label=f"layer {layer + 1}")
    axes[0, column].legend(fontsize=7)
    axes[1, column].legend(fontsize=7)
  figures.save(fig, path)


def compare_summary(histories: dict, results: dict) -> dict:
  summary = {"final_test_accuracy": {k: r["final_test_accuracy"] for k, r in results.items()},
             "diverged": {k: r["diverged"] for k, r in results.items()},
             "diverged_at": {k: r["diverged_at"] for k, r in results.items()},
             "steps_per_second": {k: r["steps_per_second"] for k, r in results.items()},
             "compile_seconds": {k: r["compile_seconds"] for k, r in results.items()}}
  drift = {}
  for variant, history in histories.items():
    if figures.evaluations(history) and "unit_percentiles" in figures.evaluations(history)[0]:
      _, median = figures.series(history, "unit_percentiles", 1)
      _, low = figures.series(history, "unit_percentiles", 0)
      _, high = figures.series(history, "unit_percentiles", 2)
      drift[variant] = {"median_range": float(np.ptp(median)),
                        "band_15_85_range": float(np.ptp(high - low))}
  summary["percentile_drift"] = drift
  if {"bn", "plain"} <= set(histories):
    # A run that diverged has no evaluation from its divergence on: there it counts as
    # behind (-inf), so the two runs' evaluations are matched by step, not by position.
    bn = dict(zip(*figures.series(histories["bn"], "test_accuracy"), strict=True))
    plain = dict(zip(*figures.series(histories["plain"], "test_accuracy"), strict=True))
    ahead_from = None  # the earliest step from which BN leads at every evaluation
    for step in sorted(set(bn) | set(plain), reverse=True):
      if not bn.get(step, -np.inf) > plain.get(step, -np.inf):
        break
      ahead_from = int(step)
    if bn or plain:  # neither evaluated: both diverged at once, nothing to compare
      summary["bn_ahead_from_step"] = ahead_from
  return summary


# ------------------------------------------------------------------------------- lr_sweep


def plot_lr_sweep(results: dict, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for variant in ("plain", "bn"):
    rows = sorted((r for r in results.values() if r["variant"] == variant),
                  key=lambda r: r["learning_rate"])
    if not rows:
      continue
    lrs = [r["learning_rate"] for r in rows]
    accuracy = [np.nan if r["diverged"] else r["final_test_accuracy"] for r in rows]
    ax.semilogx(lrs, accuracy, "o-", color=figures.COLOURS[variant],
                label=figures.LABELS[variant])
    diverged = [r["learning_rate"] for r in rows if r["diverged"]]
    ax.semilogx(diverged, [0.0] * len(diverged), "x", color=figures.COLOURS[variant], ms=10,
                label=f"{figures.LABELS[variant]}: diverged" if diverged else None)
  ax.set(xlabel="learning rate", ylabel="final test accuracy", ylim=(-0.03, 1.0))
  ax.legend()
  figures.save(fig, path)


def sweep_summary(results: dict) -> dict:
  table = {}
  for r in results.values():
    table.setdefault(r["learning_rate"], {})[r["variant"]] = {
        "final_test_accuracy": r["final_test_accuracy"], "diverged": r["diverged"]}
  bn_wins = [lr for lr, row in table.items()
             if "bn" in row and "plain" in row and not row["bn"]["diverged"]
             and row["bn"]["final_test_accuracy"] >= 0.80
             and (row["plain"]["diverged"] or row["plain"]["final_test_accuracy"] < 0.5)]
  return {"by_learning_rate": {f"{lr:g}": row for lr, row in sorted(table.items())},
          "bn_at_least_0.80_where_plain_fails": sorted(bn_wins)}


# --------------------------------------------------------------------- gradient agreement


def plot_agreement(history: list, path: pathlib.Path) -> None:
  steps = np.array([r["step"] for r in history])
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  axes[0].semilogy(steps, [max(r["max_rel_grad_diff"], 1e-12) for r in history])
  axes[0].axhline(1e-4, color="k", ls=":", label="1e-4")
  axes[0].set(xlabel="step", ylabel="max relative difference",
              title="(a) analytic vs autodiff gradients, same parameters")
  axes[0].legend()
  axes[1].plot(steps, [r["loss_analytic"] for r in history], label="analytic")
  axes[1].plot(steps, [r["loss_autodiff"] for r in history], "--", label="autodiff")
  axes[1].set(xlabel="step", ylabel="training loss", title="(b) the two trajectories")
  axes[1].legend()
  figures.save(fig, path)


def agreement_summary(history: list, result: dict) -> dict:
  """The differences over the steps before a divergence (non-finite losses or gradients
  compare nothing); None where there is no such step."""
  finite = [r for r in history if np.isfinite(
      [r["max_rel_grad_diff"], r["loss_analytic"], r["loss_autodiff"]]).all()]
  summary = {"steps": len(history), "diverged_at": result["diverged_at"],
             "compared_steps": len(finite), "max_rel_grad_diff": None,
             "median_rel_grad_diff": None, "max_rel_loss_diff": None}
  if finite:
    rel = np.array([r["max_rel_grad_diff"] for r in finite])
    a = np.array([r["loss_analytic"] for r in finite])
    b = np.array([r["loss_autodiff"] for r in finite])
    summary.update(max_rel_grad_diff=float(rel.max()), median_rel_grad_diff=float(np.median(rel)),
                   max_rel_loss_diff=float(np.max(np.abs(a - b) / np.abs(b))))
  return summary


# --------------------------------------------------------------------------------- outputs


def write_compare(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = compare_summary(outcome["histories"], outcome["results"])
  plots = workdir / "plots"
  plot_fig1(outcome["histories"], plots / "fig1.png", f"{config.data.name}, {config.model.name}",
            outcome["results"], activation=config.model.activation)
  plot_saturation(outcome["histories"], plots / "saturation.png", outcome["results"])
  return figures.write_summary(workdir, summary, _compare_markdown(config, summary, outcome))


def write_lr_sweep(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = sweep_summary(outcome["results"])
  plot_lr_sweep(outcome["results"], workdir / "plots" / "lr_sweep.png")
  return figures.write_summary(workdir, summary, _lr_sweep_markdown(config, summary))


def write_agreement(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = agreement_summary(outcome["histories"]["lockstep"], outcome["results"]["lockstep"])
  plot_agreement(outcome["histories"]["lockstep"], workdir / "plots" / "gradient_agreement.png")
  return figures.write_summary(workdir, summary, _agreement_markdown(config, summary))


def _head(config) -> list[str]:
  return [f"# {config.study}: {config.data.name}, {config.model.name}", "",
          f"{config.num_steps} steps, batch {config.batch_size}, {config.optimizer.name} "
          f"lr {config.optimizer.learning_rate}, seed {config.seed}.", ""]


def _compare_markdown(config, summary: dict, outcome: dict) -> str:
  lines = _head(config)
  lines += ["| run | final test accuracy | diverged | steps/s | compile s |",
            "|---|---|---|---|---|"]
  for name, r in outcome["results"].items():
    acc = "—" if r["final_test_accuracy"] is None else f"{r['final_test_accuracy']:.4f}"
    diverged = f"at step {r['diverged_at']}" if r["diverged"] else "no"
    lines.append(f"| {name} | {acc} | {diverged} | {r['steps_per_second']:,.0f} | "
                 f"{r['compile_seconds']:.1f} |")
  for name, r in outcome["results"].items():
    if r["diverged"] and not figures.evaluations(outcome["histories"][name]):
      lines.append(f"\n**{name} diverged at step {r['diverged_at']}** (a non-finite "
                   f"training loss), before its first evaluation at step "
                   f"{config.eval_every}: it has no test accuracy, and its panels in the "
                   "plots are empty.")
  for variant, drift in summary["percentile_drift"].items():
    lines.append(f"\nActivation-input drift (Fig. 1b, c), {figures.LABELS[variant]}: the median "
                 f"moved over a range of {drift['median_range']:.3f}; the 15–85th band "
                 f"width over {drift['band_15_85_range']:.3f}.")
  if summary.get("bn_ahead_from_step") is not None:
    lines.append(f"\nBN's test accuracy is above the plain net's at every evaluation from "
                 f"step {summary['bn_ahead_from_step']} on.")
  elif "bn_ahead_from_step" in summary:
    lines.append("\nBN's test accuracy is not above the plain net's at the last "
                 "evaluation.")
  lines += ["", "![fig1](plots/fig1.png)", "", "![saturation](plots/saturation.png)"]
  return "\n".join(lines) + "\n"


def _lr_sweep_markdown(config, summary: dict) -> str:
  lines = _head(config)
  lines += ["| learning rate | with BN | without BN |", "|---|---|---|"]
  for lr, row in summary["by_learning_rate"].items():
    cell = lambda r: "diverged" if r["diverged"] else f"{r['final_test_accuracy']:.4f}"
    lines.append(f"| {lr} | {cell(row['bn']) if 'bn' in row else '—'} | "
                 f"{cell(row['plain']) if 'plain' in row else '—'} |")
  lines += ["", f"Learning rates where BN reaches ≥ 0.80 and the plain net diverges or stays "
            f"below 0.5: {summary['bn_at_least_0.80_where_plain_fails']}.", "",
            "![lr sweep](plots/lr_sweep.png)"]
  return "\n".join(lines) + "\n"


def _agreement_markdown(config, summary: dict) -> str:
  lines = _head(config)
  if summary["diverged_at"] is not None:
    lines += [f"**The run diverged at step {summary['diverged_at']}** (a non-finite loss): "
              f"the differences below cover only the steps with finite losses and "
              "gradients.", ""]
  if summary["compared_steps"]:
    lines += [f"Over {summary['compared_steps']} steps: max relative gradient difference "
              f"{summary['max_rel_grad_diff']:.2e} (median "
              f"{summary['median_rel_grad_diff']:.2e}), max relative loss difference "
              f"{summary['max_rel_loss_diff']:.2e}."]
  else:
    lines += ["No step had finite losses and gradients: nothing to compare."]
  lines += ["", "![agreement](plots/gradient_agreement.png)"]
  return "\n".join(lines) + "\n"
