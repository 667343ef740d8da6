"""renorm_noniid's final checkpoints: recomputed statistics with the pooled (population)
variance, as `jaxbn.recompute_batch_stats` keeps, vs the mean of per-batch variances (PyTorch's
`update_bn`), against the running averages. Run after the study, from the repository root:

    PYTHONPATH=$PWD python scripts/renorm_recompute_variance.py runs/renorm_noniid

Prints, per net, each seed's test accuracy (%) with the three statistics, and the first
layer's variance averaged over features and seeds.
"""
import pathlib, sys, jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
import jaxbn
from configs import renorm_noniid
from experiments import data as data_lib, renorm_studies as rs, train
config = renorm_noniid.get_config()
workdir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/renorm_noniid").resolve()
ctx = train.Context(config, workdir, data_lib.load(config.data, config.seed), reporter=None)
sampler = rs.Sampler(config, ctx)
acc = None
for norm in ("bn", "renorm"):
  model = rs.create_model(config, norm, 60)
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  states = [train.init_state(model, tx, ctx.x_grad, s, learning_rate=0.1) for s in config.renorm.seeds]
  target = rs.Seeds(jax.tree.map(lambda *a: jnp.stack(a), *states))
  mgr = ocp.CheckpointManager(workdir / "runs" / f"{norm}_g60" / "checkpoints")
  st = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(target)).states
  accuracy = rs.make_accuracy(model, ctx, sampler.eval_batches(ctx.x_test.shape[0]))
  ema = accuracy(st.params, st.batch_stats)["iid"]["inference"]
  pooled = rs.recompute_statistics(model, ctx, sampler, st, 100)
  keys = jax.random.split(jax.random.key(rs.EVAL_SEED + 1), 100)
  idx = np.asarray(jax.vmap(sampler.train_indices)(keys)); x = np.asarray(ctx.x_train)[idx]
  per_batch = []
  for s in range(3):
    v = {"params": jax.tree.map(lambda a: a[s], st.params), "batch_stats": jax.tree.map(lambda a: a[s], st.batch_stats)}
    singles = [jaxbn.recompute_batch_stats(model, [xb], variables=v, train=True)["batch_stats"] for xb in x]
    per_batch.append(jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *singles))
  per_batch = jax.tree.map(lambda *a: jnp.stack(a), *per_batch)
  print(norm, "EMA", np.round(100*np.asarray(ema), 2),
        "pooled", np.round(100*np.asarray(accuracy(st.params, pooled)["iid"]["inference"]), 2),
        "mean-of-batch-var", np.round(100*np.asarray(accuracy(st.params, per_batch)["iid"]["inference"]), 2))
  l0 = "BatchNorm_0"
  print("  layer0 var mean: EMA", float(st.batch_stats[l0]["var"].mean()), "pooled", float(pooled[l0]["var"].mean()), "per-batch", float(per_batch[l0]["var"].mean()))
