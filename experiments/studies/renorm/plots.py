"""summary.json, summary.md and plots/ of the renorm studies (`runs.py`).

Every metric is reported per seed and as mean, spread (sample standard deviation over the
seeds, ddof=1) and range. "Beats by more than the seed-to-seed spread" means: the difference
of the means exceeds the larger of the two runs' spreads.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.core import figures
from experiments.core.figures import plt
COLOURS = {"bn": "tab:blue", "renorm": "tab:green", "plain": "tab:orange"}
LABELS = {"bn": "BN", "renorm": "renorm", "plain": "no BN"}
# The final record's per-seed metrics that the summary aggregates, where a run has them.
METRICS = ("test_accuracy", "train_mode_accuracy", "train_minus_inference",
           "recomputed_test_accuracy", "recomputed_train_minus_inference",
           "noniid_inference_accuracy", "noniid_train_mode_accuracy",
           "noniid_train_minus_inference", "recomputed_noniid_train_minus_inference")
WITHIN_AT_FULL_BATCH = 0.005  # the bar: renorm within 0.5 points of BN at full groups


def spread(values) -> dict:
  """Mean, sample standard deviation (ddof=1; 0 for one seed), min, max, and the values."""
  values = np.asarray(values, float)
  return {"per_seed": values.tolist(), "mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
          "min": float(values.min()), "max": float(values.max())}


def beats(a: dict, b: dict) -> dict:
  """Does `a` beat `b` by more than the seed-to-seed spread (the larger of the two)?"""
  difference, noise = a["mean"] - b["mean"], max(a["std"], b["std"])
  return {"difference": difference, "spread": noise, "met": bool(difference > noise)}


def summarize(config, outcome: dict) -> dict:
  runs = {}
  for name, result in outcome["results"].items():
    history = outcome["histories"][name]
    final = next((r for r in reversed(history) if "test_accuracy" in r), {})
    runs[name] = {"norm": result["norm"], "group_size": result["group_size"],
                  "diverged": result["diverged"], "diverged_at": result["diverged_at"],
                  "compile_seconds": result["compile_seconds"],
                  "steps_per_second": result["steps_per_second"],
                  **{key: spread(final[f"{key}_per_seed"]) for key in METRICS
                     if f"{key}_per_seed" in final}}
  return {"study": config.study, "seeds": list(config.renorm.seeds),
          "num_steps": config.num_steps, "batch_size": config.batch_size,
          "classes_per_batch": config.renorm.classes_per_batch, "runs": runs,
          "bars": bars(config, runs)}


def bars(config, runs: dict) -> dict:
  """The studies' bars, each with the numbers it is decided on."""
  found = {}
  for group in config.renorm.group_sizes:
    bn, renorm = runs.get(f"bn_g{group}"), runs.get(f"renorm_g{group}")
    if not (bn and renorm and "test_accuracy" in bn and "test_accuracy" in renorm):
      continue
    if config.study == "renorm_noniid" or group < config.batch_size:
      found[f"renorm_beats_bn_g{group}"] = beats(renorm["test_accuracy"], bn["test_accuracy"])
    else:
      difference = renorm["test_accuracy"]["mean"] - bn["test_accuracy"]["mean"]
      found[f"renorm_within_0.5_points_of_bn_g{group}"] = {
          "difference": difference, "met": bool(abs(difference) <= WITHIN_AT_FULL_BATCH)}
  for name, run in runs.items():
    if "recomputed_test_accuracy" in run:
      verdict = beats(run["recomputed_test_accuracy"], run["test_accuracy"])
      # "never worse beyond the spread": recomputed - EMA >= -spread.
      verdict["met"] = bool(verdict["difference"] >= -verdict["spread"])
      found[f"recomputed_not_worse_than_ema_{name}"] = verdict
  return found


# -------------------------------------------------------------------------------- plots


def _by_norm(runs: dict, norm: str, key: str):
  rows = sorted((r for r in runs.values() if r["norm"] == norm and key in r),
                key=lambda r: r["group_size"])
  return (np.array([r["group_size"] for r in rows]), np.array([r[key]["mean"] for r in rows]),
          np.array([r[key]["std"] for r in rows]))


def plot_groups(summary: dict, path: pathlib.Path, title: str) -> None:
  """(a) test accuracy with the running statistics, (b) training-mode minus inference-mode
  accuracy on the same test examples, (c) recomputed minus running statistics' test
  accuracy; each against the group size, mean ± spread over the seeds."""
  runs = summary["runs"]
  noniid = summary["classes_per_batch"] > 0
  gap_key = "noniid_train_minus_inference" if noniid else "train_minus_inference"
  panels = (("test_accuracy", "test accuracy (running statistics)", "(a) test accuracy"),
            (gap_key, "training − inference accuracy",
             "(b) train-mode gap" + (", non-i.i.d. test batches" if noniid else "")),
            (None, "recomputed − running test accuracy", "(c) recomputed statistics"))
  groups = sorted({r["group_size"] for r in runs.values()})
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  fig.subplots_adjust(wspace=0.32)
  for ax, (key, ylabel, panel_title) in zip(axes, panels, strict=True):
    for norm in ("bn", "renorm", "plain"):
      if key is None:
        g, ema, _ = _by_norm(runs, norm, "test_accuracy")
        g2, rec, rec_std = _by_norm(runs, norm, "recomputed_test_accuracy")
        if not len(g2):
          continue
        ema = ema[np.isin(g, g2)]
        x, mean, std = g2, rec - ema, rec_std
      else:
        x, mean, std = _by_norm(runs, norm, key)
      if not len(x):
        continue
      if norm == "plain":  # no groups: a band across
        ax.axhline(mean[0], color=COLOURS[norm], label=LABELS[norm])
        ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=COLOURS[norm], alpha=0.2)
      else:
        ax.errorbar(x, mean, yerr=std, fmt="o-", capsize=3, color=COLOURS[norm],
                    label=LABELS[norm])
    if key is None:
      ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(groups, [str(g) for g in groups])
    ax.set(xlabel="examples per normalization group", ylabel=ylabel, title=panel_title)
    ax.legend(fontsize=8)
  fig.suptitle(title, y=1.03)
  figures.save(fig, path)


def plot_curves(histories: dict, results: dict, path: pathlib.Path) -> None:
  """Test accuracy (running statistics) against steps, each run's mean over the seeds."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  styles = ("-", "--", "-.", ":", (0, (1, 4)), (0, (5, 1)))
  groups = sorted({r["group_size"] for r in results.values()})
  for name, history in histories.items():
    rows = [r for r in history if "test_accuracy" in r]
    if not rows:
      continue
    norm, group = results[name]["norm"], results[name]["group_size"]
    steps = [r["step"] for r in rows]
    mean = [r["test_accuracy"] for r in rows]  # the seeds' mean
    label = LABELS[norm] if norm == "plain" else f"{LABELS[norm]}, groups of {group}"
    ax.plot(steps, mean, color=COLOURS[norm], ls=styles[groups.index(group) % len(styles)],
            label=label)
  ax.set(xlabel="training steps", ylabel="test accuracy (mean over seeds)")
  ax.legend(fontsize=7)
  figures.save(fig, path)


# ------------------------------------------------------------------------------ outputs


def write_outputs(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = summarize(config, outcome)
  title = (f"{config.data.name}, batches of {config.batch_size}"
           + (f" from {config.renorm.classes_per_batch} classes"
              if config.renorm.classes_per_batch else "")
           + f", {len(config.renorm.seeds)} seeds")
  plot_groups(summary, workdir / "plots" / f"{config.study}.png", title)
  plot_curves(outcome["histories"], outcome["results"], workdir / "plots" / "curves.png")
  return figures.write_summary(workdir, summary, markdown(config, summary))


def _cell(metric: dict | None, scale: float = 100.0) -> str:
  if metric is None:
    return "—"
  return f"{scale * metric['mean']:.2f} ± {scale * metric['std']:.2f}"


def markdown(config, summary: dict) -> str:
  noniid = config.renorm.classes_per_batch > 0
  lines = [f"# {config.study}: {config.data.name}, {config.model.name}", "",
           f"{config.num_steps} steps, batch {config.batch_size}"
           + (f" of {config.renorm.classes_per_batch} classes" if noniid else " (i.i.d.)")
           + f", {config.optimizer.name} lr {config.optimizer.learning_rate} "
           f"({config.optimizer.schedule}), seeds {list(config.renorm.seeds)}; renorm rmax "
           f"{config.renorm.rmax}, dmax {config.renorm.dmax}, warm-up "
           f"{config.renorm.warmup_steps} steps. Accuracies in %, mean ± spread (sample std "
           "over the seeds).", ""]
  gap = "noniid_train_minus_inference" if noniid else "train_minus_inference"
  lines += ["| run | group | test acc. (running stats) | test acc. (recomputed) | "
            "train-mode acc. | train − inference | diverged | compile s | steps/s |",
            "|---|---|---|---|---|---|---|---|---|"]
  for name, run in summary["runs"].items():
    train_mode = run.get("noniid_train_mode_accuracy" if noniid else "train_mode_accuracy")
    lines.append(
        f"| {name} | {run['group_size'] if run['norm'] != 'plain' else '—'} | "
        f"{_cell(run.get('test_accuracy'))} | {_cell(run.get('recomputed_test_accuracy'))} | "
        f"{_cell(train_mode)} | {_cell(run.get(gap))} | "
        f"{'at step ' + str(run['diverged_at']) if run['diverged'] else 'no'} | "
        f"{run['compile_seconds']:.1f} | {run['steps_per_second']:,.0f} |")
  if noniid:
    lines += ["", "Training-mode accuracy and its gap are on non-i.i.d. test batches built "
              "as the training ones; the test accuracies on the whole test set in i.i.d. "
              "batches."]
  lines += ["", "## Bars", ""]
  for bar, verdict in summary["bars"].items():
    spread_text = (f", spread {100 * verdict['spread']:.2f}" if "spread" in verdict else "")
    lines.append(f"- {bar}: difference {100 * verdict['difference']:+.2f} points"
                 f"{spread_text}: **{'met' if verdict['met'] else 'not met'}**")
  lines += ["", f"![{config.study}](plots/{config.study}.png)", "",
            "![curves](plots/curves.png)"]
  return "\n".join(lines) + "\n"
