"""A renorm study's final checkpoints: statistics recomputed with each of
`jaxbn.recompute_batch_stats`' variances, "pooled" (the biased variance of all the values, the
population statistics) and "average" (the mean of the per-batch variances, what training-mode
normalization divided by; PyTorch's `update_bn` with momentum=None), against the running
averages. After `renorm_noniid` or `renorm_groups` (any group sizes and norms), from the
repository root:

    python -m experiments.studies.renorm.recompute_variance runs/renorm_noniid

The study's config is read from the workdir's config.json, and every normalized run with a
checkpoint there is evaluated. Prints, per run, each seed's test accuracy (%) and test loss
on the i.i.d. test batches with the three statistics, and the first layer's variance averaged
over features and seeds.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from experiments.core import data as data_lib
from experiments.core import train
from experiments.studies.renorm import runs as renorm_studies


def main(workdir: pathlib.Path) -> None:
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  ctx = train.Context(config, workdir, data_lib.load(config.data, config.seed), reporter=None)
  sampler = renorm_studies.Sampler(config, ctx)
  accuracy_sets = sampler.eval_batches(ctx.x_test.shape[0])
  for name, norm, group_size in renorm_studies.run_names(config):
    directory = workdir / "runs" / name / "checkpoints"
    if norm == "plain" or not directory.is_dir():
      continue
    model = renorm_studies.create_model(config, norm, group_size)
    tx = train.make_optimizer(config.optimizer, config.num_steps)
    target = renorm_studies.Seeds(jax.tree.map(lambda *a: jnp.stack(a), *[
        train.init_state(model, tx, ctx.x_grad, s, learning_rate=config.optimizer.learning_rate)
        for s in config.renorm.seeds]))
    manager = ocp.CheckpointManager(directory)
    states = manager.restore(manager.latest_step(),
                             args=ocp.args.StandardRestore(target)).states
    accuracy = renorm_studies.make_accuracy(model, ctx, accuracy_sets)
    statistics = {"running (EMA)": states.batch_stats}
    for variance in ("pooled", "average"):
      statistics[variance] = renorm_studies.recompute_statistics(
          model, ctx, sampler, states, config.renorm.recompute_batches, variance=variance)
    for label, stats in statistics.items():
      iid = accuracy(states.params, stats)["iid"]
      print(f"{name}: {label}: test accuracy {np.round(100 * np.asarray(iid['inference']), 2)}"
            f", test loss {np.round(np.asarray(iid['loss']), 4)}, first layer's variance "
            f"{float(stats['BatchNorm_0']['var'].mean()):.4f}")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/renorm_noniid").resolve())
