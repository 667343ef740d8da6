"""The Hessian studies' figures and summaries: the density on a log scale as Ghorbani et al.
draw it, the top eigenvalues, outliers and gradient concentration over training (mean and
range over the seeds), and for hessian_agreement the analytic-vs-autodiff differences.

"Differs" is stated as the paper's claims need: per probe step, each variant's mean over the
seeds with its range; a difference counts when the variants' ranges do not overlap.
"""

from __future__ import annotations

import itertools
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from experiments.core import figures
from experiments.studies.hessian import runs, spectrum

COLOURS = {**figures.COLOURS, runs.POPULATION: "tab:green"}
LABELS = {**figures.LABELS, runs.POPULATION: "BN, population statistics"}
_DTYPES = ("float32", "float64")


def _probes(history: list) -> list[dict]:
  return [r for r in history if "hessian_top_eigenvalues" in r]


def _outlier_key(factor: float) -> str:
  return f"outliers_{factor:g}x"


def _numbers(record: dict, factors) -> dict:
  top = np.asarray(record["hessian_top_eigenvalues"])
  return {"lambda_max": top[0], "edge": top[-1],
          "ratio": top[0] / abs(top[-1]) if top[-1] else float("inf"),
          **{_outlier_key(f): spectrum.outliers(top, factor=f) for f in factors},
          "gradient_concentration": record["hessian_gradient_concentration"],
          "trace": record["hessian_trace"], "test_accuracy": record["test_accuracy"]}


def _variant_of(name: str) -> str:
  return name.rsplit("_seed", 1)[0]


def spectrum_summary(config, outcome: dict) -> dict:
  """Per variant and probe step: each number's mean, min and max over the seeds; per variant
  the final test accuracy's; and per step and number whether the variants' ranges are apart."""
  factors = tuple(config.hessian.outlier_factors)
  table: dict = {}
  accuracy: dict = {}
  for name, history in outcome["histories"].items():
    variant = _variant_of(name)
    for record in _probes(history):
      row = table.setdefault(variant, {}).setdefault(str(record["step"]), {})
      for key, value in _numbers(record, factors).items():
        row.setdefault(key, []).append(value)
    final = outcome["results"][name]["final_test_accuracy"]
    accuracy.setdefault(variant, []).append(final)
  stats = {variant: {step: {key: {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                  "max": float(np.max(v)), "seeds": len(v)}
                            for key, v in row.items()} for step, row in steps.items()}
           for variant, steps in table.items()}
  apart = {}
  variants = list(stats)
  if len(variants) == 2:
    a, b = variants
    for step in stats[a]:
      if step in stats[b]:
        apart[step] = {key: bool(stats[a][step][key]["max"] < stats[b][step][key]["min"] or
                                 stats[b][step][key]["max"] < stats[a][step][key]["min"])
                       for key in stats[a][step]}
  test = {variant: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
          for variant, v in accuracy.items() if None not in v}
  return {"study": config.study, "seeds": list(config.hessian.seeds), "spectrum": stats,
          "ranges_apart": apart, "final_test_accuracy": test,
          "outlier_factors": list(factors),
          "outlier_rule": f"eigenvalues above factor x the {config.hessian.top_k}th largest "
                          f"(the bulk's edge), factors {list(factors)}"}


def plot_density(outcome: dict, path: pathlib.Path, seed: int) -> None:
  """Each variant's SLQ density (seed `seed`) at every probe step, log scale."""
  names = [n for n in outcome["histories"] if n.endswith(f"_seed{seed}")]
  steps = sorted({r["step"] for n in names for r in _probes(outcome["histories"][n])})
  fig, axes = plt.subplots(len(names), max(len(steps), 1), squeeze=False,
                           figsize=(3.2 * max(len(steps), 1), 3.0 * len(names)))
  fig.subplots_adjust(hspace=0.45)
  for row, name in enumerate(names):
    for col, step in enumerate(steps):
      ax = axes[row, col]
      record = next((r for r in _probes(outcome["histories"][name]) if r["step"] == step), None)
      if record is None:
        figures.note(ax, "no probe")
        continue
      measure = spectrum.Quadrature(np.array(record["hessian_slq_nodes"]),
                                    np.array(record["hessian_slq_weights"]))
      low, high = measure.nodes.min(), measure.nodes.max()
      pad = 0.05 * (high - low) + 1e-12
      grid = np.linspace(low - pad, high + pad, 1000)
      density = spectrum.spectral_density(measure, grid, sigma=(high - low + 1e-12) / 200)
      ax.semilogy(grid, np.maximum(density, 1e-12), color=COLOURS[_variant_of(name)])
      ax.set_ylim(1e-6, None)
      ax.set_title(f"{LABELS[_variant_of(name)]}, step {step}", fontsize=9)
      if row == len(names) - 1:
        ax.set_xlabel("eigenvalue")
      if col == 0:
        ax.set_ylabel("density")
  fig.suptitle(f"Hessian eigenvalue density (SLQ), seed {seed}")
  figures.save(fig, path)


def plot_over_training(summary: dict, outcome: dict, path: pathlib.Path) -> None:
  """λ_max, its ratio to the bulk's edge, the outlier count and the gradient's share in the
  top eigenspace at the probe steps, and the test accuracy at every evaluation: each
  variant's mean over the seeds, the band its range."""
  factor = max(summary["outlier_factors"])
  panels = (("lambda_max", "largest eigenvalue"), ("ratio", "λ_max / λ_k (bulk edge)"),
            (_outlier_key(factor), f"outliers (> {factor:g} λ_k)"),
            ("gradient_concentration", "‖P_k g‖² / ‖g‖²"))
  fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
  for variant, steps in summary["spectrum"].items():
    order = sorted(steps, key=int)
    x = [int(s) for s in order]
    for ax, (key, label) in zip(axes, panels):
      mean = [steps[s][key]["mean"] for s in order]
      ax.plot(x, mean, "o-", color=COLOURS[variant], label=LABELS[variant])
      ax.fill_between(x, [steps[s][key]["min"] for s in order],
                      [steps[s][key]["max"] for s in order], color=COLOURS[variant], alpha=0.2)
      ax.set(xlabel="step", title=label)
  accuracy: dict = {}
  for name, history in outcome["histories"].items():
    accuracy.setdefault(_variant_of(name), []).append(figures.series(history, "test_accuracy"))
  for variant, runs_ in accuracy.items():
    steps = runs_[0][0]
    if not all(np.array_equal(s, steps) for s, _ in runs_):
      continue  # a diverged seed: no common steps to average over
    values = np.stack([v for _, v in runs_])
    axes[-1].plot(steps, values.mean(0), color=COLOURS[variant], label=LABELS[variant])
    axes[-1].fill_between(steps, values.min(0), values.max(0), color=COLOURS[variant], alpha=0.2)
  axes[-1].set(xlabel="step", title="test accuracy")
  axes[1].set_yscale("log")
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=8)
  figures.save(fig, path)


def _spectrum_markdown(config, summary: dict, title: str) -> str:
  h = config.hessian
  lines = [f"# {config.study}: {title}", "",
           f"{config.data.name}, {config.model.name} {tuple(config.model.hidden)} "
           f"{config.model.activation}, {config.num_steps} steps, batch {config.batch_size}, "
           f"{config.optimizer.name} lr {config.optimizer.learning_rate} "
           f"({config.optimizer.schedule}), seeds {list(h.seeds)}. The Hessian of the "
           f"training loss on {h.batches * config.batch_size} fixed training examples; "
           f"Lanczos {h.lanczos_order} steps x {h.density_runs} starts; outliers: "
           f"{summary['outlier_rule']}; concentration: the gradient's share in the top "
           f"{h.concentration_k} eigenvectors. Mean over the seeds [min, max].", "",
           "| variant | step | λ_max | λ_k | λ_max/λ_k | "
           + " | ".join(f"outliers > {f:g} λ_k" for f in summary["outlier_factors"])
           + " | ‖P_k g‖²/‖g‖² | trace | test accuracy |",
           "|---|---|---|---|---|" + "---|" * len(summary["outlier_factors"]) + "---|---|---|"]
  for variant, steps in summary["spectrum"].items():
    for step in sorted(steps, key=int):
      row = steps[step]
      cell = lambda k, f: (f"{row[k]['mean']:{f}} [{row[k]['min']:{f}}, "
                           f"{row[k]['max']:{f}}]")
      lines.append(f"| {LABELS[variant]} | {step} | {cell('lambda_max', '.3g')} | "
                   f"{cell('edge', '.3g')} | {cell('ratio', '.3g')} | "
                   + "".join(f"{cell(_outlier_key(f), '.1f')} | "
                             for f in summary["outlier_factors"])
                   + f"{cell('gradient_concentration', '.3f')} | "
                   f"{cell('trace', '.3g')} | {cell('test_accuracy', '.3f')} |")
  lines += ["", "Final test accuracy: " + ", ".join(
      f"{LABELS[v]} {a['mean']:.4f} [{a['min']:.4f}, {a['max']:.4f}]"
      for v, a in summary["final_test_accuracy"].items()), ""]
  for step, apart in summary["ranges_apart"].items():
    differing = [k for k, v in apart.items() if v]
    lines.append(f"- step {step}: the seeds' ranges are apart for "
                 f"{', '.join(differing) if differing else 'none of the numbers'}.")
  lines += ["", "![over training](plots/over_training.png)", "",
            "![density](plots/density.png)"]
  return "\n".join(lines) + "\n"


def _write(config, workdir: pathlib.Path, outcome: dict, title: str) -> dict:
  summary = spectrum_summary(config, outcome)
  plot_over_training(summary, outcome, workdir / "plots" / "over_training.png")
  plot_density(outcome, workdir / "plots" / "density.png", config.hessian.seeds[0])
  return figures.write_summary(workdir, summary, _spectrum_markdown(config, summary, title))


def write_spectrum(config, workdir: pathlib.Path, outcome: dict) -> dict:
  return _write(config, workdir, outcome, "the Hessian's spectrum with and without BN")


def write_population(config, workdir: pathlib.Path, outcome: dict) -> dict:
  return _write(config, workdir, outcome,
                "mini-batch BN against BN with population statistics "
                f"(refreshed every {config.hessian.population_every} steps)")


def agreement_summary(outcome: dict) -> dict:
  """Per dtype and HVP mode, the largest relative difference over every evaluation and seed."""
  worst: dict = {}
  for history in outcome["histories"].values():
    for record in history:
      for dtype, mode in itertools.product(_DTYPES, spectrum.MODES):
        value = record.get(f"hvp_difference_{dtype}_{mode}")
        if value is not None:
          worst.setdefault(dtype, {})[mode] = max(worst.get(dtype, {}).get(mode, 0.0), value)
  return {"study": "hessian_agreement", "max_relative_difference": worst}


def write_agreement(config, workdir: pathlib.Path, outcome: dict) -> dict:
  summary = agreement_summary(outcome)
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for name, history in outcome["histories"].items():
    for (dtype, mode), style in zip(itertools.product(_DTYPES, spectrum.MODES),
                                    ("o-", "^-", "s--", "v--")):
      steps, values = figures.series(history, f"hvp_difference_{dtype}_{mode}")
      ax.semilogy(steps, values, style, label=f"{name}, {dtype}, {mode}")
  ax.set(xlabel="step", ylabel="max |Hv − H′v| / max |H′v|",
         title="analytic vs autodiff HVPs")
  ax.legend(fontsize=7)
  figures.save(fig, workdir / "plots" / "hvp_agreement.png")
  lines = [f"# hessian_agreement: {config.data.name}, {config.model.name}", "",
           f"{config.num_steps} steps, seeds {list(config.hessian.seeds)}, "
           f"{config.hessian.hvp_vectors} random unit vectors per evaluation, the Hessian on "
           f"{config.hessian.batches * config.batch_size} fixed training examples.", "",
           "| dtype | HVP | largest relative difference |", "|---|---|---|"]
  lines += [f"| {dtype} | {mode} | {value:.2e} |"
            for dtype, modes in summary["max_relative_difference"].items()
            for mode, value in modes.items()]
  lines += ["", "![agreement](plots/hvp_agreement.png)"]
  return figures.write_summary(workdir, summary, "\n".join(lines) + "\n")
