"""The BN paper's studies, each a set of runs of `train.run_loop`:

- `compare`: one run per variant (with and without BN), evaluated after every chunk.
- `lr_sweep`: the same at every learning rate of `config.sweep.learning_rates`.
- `gradient_agreement`: the BN net twice in lockstep, analytic and autodiff backward.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import flax
import jax
import jax.numpy as jnp

from experiments.core import evaluation as evaluation_lib
from experiments.core import models, train, workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a study: which net, which learning rate, which backward."""

  name: str
  batch_norm: bool
  learning_rate: float
  gradient: str


@flax.struct.dataclass
class Lockstep:
  """Two training states advanced together (the gradient_agreement study)."""

  analytic: train.TrainState
  autodiff: train.TrainState

  @property
  def step(self) -> jax.Array:
    return self.analytic.step


def train_run(run: Run, ctx: train.Context) -> dict:
  """A standard run: the config's model with or without BN, evaluated after every chunk.

  Runs that differ only in learning rate share their compiled functions (the rate lives in
  the optimizer state).
  """
  config = ctx.config
  result_path = ctx.workdir / "runs" / run.name / "result.json"
  if result_path.exists():  # finished: nothing to compile
    return json.loads(result_path.read_text())
  key = (run.batch_norm, run.gradient)
  if key not in ctx.compiled:
    model = models.create(config.model, batch_norm=run.batch_norm, gradient=run.gradient)
    tx = train.make_optimizer(config.optimizer, config.num_steps)
    test = evaluation_lib.make_evaluate(model, ctx)
    diagnostics = evaluation_lib.make_diagnostics(model, ctx)
    state = _initial_state(model, tx, ctx, config.optimizer.learning_rate)
    ctx.compiled[key] = (model, tx,
                         train.compile_ahead(train.make_train_chunk(model, tx, ctx), state),
                         lambda s: {**test(s), **diagnostics(s)})
  model, tx, chunk, evaluate = ctx.compiled[key]
  state = _initial_state(model, tx, ctx, run.learning_rate)
  return train.run_loop(run.name, ctx, state, chunk, evaluate, train.mean_loss_record)


def _initial_state(model, tx, ctx: train.Context, learning_rate: float) -> train.TrainState:
  return jax.device_put(train.init_state(model, tx, ctx.x_grad, ctx.config.seed,
                                         learning_rate=learning_rate), ctx.replicated)


def _variant_runs(config, learning_rate=None, suffix="") -> list[Run]:
  lr = config.optimizer.learning_rate if learning_rate is None else learning_rate
  return [Run(f"{variant}{suffix}", variant == "bn", lr, config.model.gradient)
          for variant in config.variants]


def study_compare(ctx: train.Context) -> dict:
  results = {run.name: train_run(run, ctx) for run in _variant_runs(ctx.config)}
  histories = {name: workdir_lib.read_metrics(ctx.workdir / "runs" / name) for name in results}
  return {"results": results, "histories": histories}


def study_lr_sweep(ctx: train.Context) -> dict:
  results = {}
  for lr in ctx.config.sweep.learning_rates:
    for run in _variant_runs(ctx.config, lr, suffix=f"_lr{lr:g}"):
      results[run.name] = {**train_run(run, ctx), "learning_rate": lr,
                           "variant": "bn" if run.batch_norm else "plain"}
  return {"results": results}


def study_gradient_agreement(ctx: train.Context) -> dict:
  """The BN net twice in lockstep: analytic and autodiff backward, same batches.

  Per step: both losses, and the max relative difference between the two backwards'
  gradients at the *same* point (the analytic run's parameters), so the comparison measures
  the backward and not the drift between trajectories.
  """
  config = ctx.config
  analytic = models.create(config.model, batch_norm=True, gradient="analytic")
  autodiff = models.create(config.model, batch_norm=True, gradient="autodiff")
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  init = train.init_state(analytic, tx, ctx.x_grad, config.seed,
                          learning_rate=config.optimizer.learning_rate)
  # Two copies: the chunk donates its input, and one buffer must not be donated twice.
  state = jax.device_put(Lockstep(init, jax.tree.map(jnp.copy, init)), ctx.replicated)
  grad = lambda model: jax.value_and_grad(functools.partial(train.loss_and_stats, model),
                                          has_aux=True)

  def step(states: Lockstep, _):
    a, b = states.analytic, states.autodiff
    x, y = train.sample_batch(ctx, a.step, config.batch_size)
    (loss_a, stats_a), grads_a = grad(analytic)(a.params, a.batch_stats, x, y)
    (loss_b, stats_b), grads_b = grad(autodiff)(b.params, b.batch_stats, x, y)
    _, grads_b_at_a = grad(autodiff)(a.params, a.batch_stats, x, y)
    rel = jnp.max(jnp.stack([
        jnp.max(jnp.abs(g - h)) / jnp.maximum(jnp.max(jnp.abs(h)), 1e-30)
        for g, h in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b_at_a), strict=True)]))
    return Lockstep(train.apply_gradients(tx, a, grads_a, stats_a),
                    train.apply_gradients(tx, b, grads_b, stats_b)), {
        "loss": jnp.stack([loss_a, loss_b]), "max_rel_grad_diff": rel}

  chunk = jax.jit(lambda s: train.scan_steps(step, s, length=train.steps_per_call(config)),
                  donate_argnums=0)
  evaluate_a = evaluation_lib.make_evaluate(analytic, ctx)
  evaluate_b = evaluation_lib.make_evaluate(autodiff, ctx)

  def evaluate(states: Lockstep):
    a, b = evaluate_a(states.analytic), evaluate_b(states.autodiff)
    return {"test_accuracy": a["test_accuracy"], "test_accuracy_autodiff": b["test_accuracy"]}

  def summarize(first_step, per_step, evaluation):
    records = [{"step": first_step + i + 1,
                "loss_analytic": float(per_step["loss"][i, 0]),
                "loss_autodiff": float(per_step["loss"][i, 1]),
                "max_rel_grad_diff": float(per_step["max_rel_grad_diff"][i])}
               for i in range(len(per_step["max_rel_grad_diff"]))]
    records[-1].update(evaluation)
    return records

  result = train.run_loop("lockstep", ctx, state, train.compile_ahead(chunk, state), evaluate,
                          summarize)
  history = workdir_lib.read_metrics(ctx.workdir / "runs" / "lockstep")
  return {"results": {"lockstep": result}, "histories": {"lockstep": history}}
