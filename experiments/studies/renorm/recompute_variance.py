"""renorm_noniid's final checkpoints: statistics recomputed with the pooled (population)
variance, as `jaxbn.recompute_batch_stats` keeps, or with the mean of per-batch variances (as
PyTorch's `update_bn` with momentum=None), against the running averages. After the study,
from the repository root:

    python -m experiments.studies.renorm.recompute_variance runs/renorm_noniid

Prints, per net, each seed's test accuracy (%) with the three statistics, and the first
layer's variance averaged over features and seeds.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxbn
from configs import renorm_noniid
from experiments.core import data as data_lib
from experiments.core import train
from experiments.studies.renorm import runs as renorm_studies

NUM_BATCHES = 100  # as config.renorm.recompute_batches, the same key


def stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def seed_variables(states, s):
  return {"params": jax.tree.map(lambda a: a[s], states.params),
          "batch_stats": jax.tree.map(lambda a: a[s], states.batch_stats)}


def main(workdir: pathlib.Path) -> None:
  config = renorm_noniid.get_config()
  ctx = train.Context(config, workdir, data_lib.load(config.data, config.seed), reporter=None)
  sampler = renorm_studies.Sampler(config, ctx)
  keys = jax.random.split(jax.random.key(renorm_studies.EVAL_SEED + 1), NUM_BATCHES)
  x = np.asarray(ctx.x_train)[np.asarray(jax.vmap(sampler.train_indices)(keys))]
  for norm in ("bn", "renorm"):
    model = renorm_studies.create_model(config, norm, config.batch_size)
    tx = train.make_optimizer(config.optimizer, config.num_steps)
    target = renorm_studies.Seeds(stack([
        train.init_state(model, tx, ctx.x_grad, s, learning_rate=config.optimizer.learning_rate)
        for s in config.renorm.seeds]))
    manager = ocp.CheckpointManager(workdir / "runs" / f"{norm}_g{config.batch_size}" /
                                    "checkpoints")
    states = manager.restore(manager.latest_step(),
                             args=ocp.args.StandardRestore(target)).states
    accuracy = renorm_studies.make_accuracy(model, ctx, sampler.eval_batches(ctx.x_test.shape[0]))
    pooled = renorm_studies.recompute_statistics(model, ctx, sampler, states, NUM_BATCHES)
    per_batch = stack([
        jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *[
            jaxbn.recompute_batch_stats(model, [xb], variables=seed_variables(states, s),
                                        train=True)["batch_stats"] for xb in x])
        for s in range(len(config.renorm.seeds))])
    for label, stats in (("running (EMA)", states.batch_stats), ("pooled", pooled),
                         ("mean of per-batch", per_batch)):
      scores = np.asarray(accuracy(states.params, stats)["iid"]["inference"])
      print(f"{norm}: {label}: test accuracy {np.round(100 * scores, 2)}, first layer's "
            f"variance {float(stats['BatchNorm_0']['var'].mean()):.2f}")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/renorm_noniid").resolve())
