"""Santurkar et al.'s three probes as studies, each a set of `train.run_loop`
runs whose evaluation after every chunk also runs a probe at the current point of training:

- `noisy_bn` (§2.1, Fig. 2): plain, BN and noisy-BN nets (`noisy_bn.py`); test accuracy, and
  the distribution of one last-hidden-layer unit's input in training mode — with the noise the
  next training step draws — on fixed test examples, plus every unit's batch mean and std.
- `ics` (§2.2, Definition 2.1, Fig. 5): plain and BN; per layer, ‖G − G′‖₂, ‖G − G′‖/‖G‖ and
  cos(G, G′) on the batch of the next step (`probes.internal_covariate_shift`).
- `landscape` (§3.1, Fig. 4): plain and BN; the loss and gradient along −g over step sizes
  `probes.step_multiples` × the learning rate, on the next step's batch (`probes.landscape`).

The probes see exactly what the training step sees: its batch (a pure function of the step), its
optimizer update (the optax state's, so momentum or Adam would be included), BN in training mode
with the batch's statistics.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from experiments.core import evaluation as evaluation_lib
from experiments.core import models, train, workdir as workdir_lib
from experiments.studies.ics import noisy_bn, probes

NOISY = "noisy_bn"
PERCENTILES = (5.0, 15.0, 50.0, 85.0, 95.0)


# ------------------------------------------------------------------ probes on one batch


def layer_groups(params: dict) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
  """Layer i of PaperMLP (or NoisyBNMLP) is Dense_i and, with BN, BatchNorm_i; its weights are
  Dense_i's kernel. Returns (groups, weight paths) in depth order, for
  `probes.internal_covariate_shift`."""
  depth = sum(1 for name in params if name.startswith("Dense_"))
  if set(params) - {f"{kind}_{i}" for kind in ("Dense", "BatchNorm") for i in range(depth)}:
    raise ValueError(f"parameter groups {sorted(params)} are not PaperMLP's Dense_i/BatchNorm_i.")
  groups = [tuple(n for n in (f"Dense_{i}", f"BatchNorm_{i}") if n in params)
            for i in range(depth)]
  return groups, [(f"Dense_{i}", "kernel") for i in range(depth)]


def ics_on_batch(model, tx, params, batch_stats, opt_state, x, y) -> dict:
  """Definition 2.1 at one step: the optimizer's step-t update on the batch (x, y), then G and
  G′ of every layer on that same batch (`probes.internal_covariate_shift`)."""
  grad_fn = jax.grad(lambda p: train.loss_and_stats(model, p, batch_stats, x, y)[0])
  updates, _ = tx.update(grad_fn(params), opt_state, params)
  groups, weights = layer_groups(params)
  return probes.internal_covariate_shift(grad_fn, params, optax.apply_updates(params, updates),
                                         layers=groups, weights=weights)


def landscape_on_batch(model, params, batch_stats, x, y, step_sizes) -> dict:
  """`probes.landscape` of the training-mode loss on the batch (x, y)."""
  return probes.landscape(lambda p: train.loss_and_stats(model, p, batch_stats, x, y)[0],
                          params, step_sizes)


# ------------------------------------------------------------------------------ running


def _loss_and_stats(model, params, batch_stats, x, y, noise_key):
  """`train.loss_and_stats` with the noise RNG stream (nets without noise ignore it)."""
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"noise": noise_key})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates.get("batch_stats", {})


def _noise_key(ctx: train.Context, step) -> jax.Array:
  # A pure function of (seed, step), like the batches: a resumed run draws the same noise.
  return jax.random.fold_in(jax.random.key(ctx.config.seed + 2), step)


def _make_chunk(model, tx, ctx: train.Context) -> Callable:
  config = ctx.config

  def step(state: train.TrainState, _):
    x, y = train.sample_batch(ctx, state.step, config.batch_size)
    (loss, stats), grads = jax.value_and_grad(functools.partial(_loss_and_stats, model),
                                              has_aux=True)(
        state.params, state.batch_stats, x, y, _noise_key(ctx, state.step))
    return train.apply_gradients(tx, state, grads, stats), {"loss": loss}

  return jax.jit(lambda s: train.scan_steps(step, s, length=train.steps_per_call(config)),
                 donate_argnums=0)


def _run(name: str, model, ctx: train.Context, make_probe) -> dict:
  """One run: trains `model`, and after every chunk evaluates it and runs
  `make_probe(model, tx)(state) -> dict` at the current state."""
  config = ctx.config
  result_path = ctx.workdir / "runs" / name / "result.json"
  if result_path.exists():  # finished: nothing to compile
    return json.loads(result_path.read_text())
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  state = jax.device_put(train.init_state(model, tx, ctx.x_grad, config.seed,
                                          learning_rate=config.optimizer.learning_rate),
                         ctx.replicated)
  test = evaluation_lib.make_evaluate(model, ctx)
  probe = jax.jit(make_probe(model, tx))
  chunk = train.compile_ahead(_make_chunk(model, tx, ctx), state)
  return train.run_loop(name, ctx, state, chunk, lambda s: {**test(s), **probe(s)},
                        train.mean_loss_record)


def _outcome(ctx: train.Context, results: dict) -> dict:
  histories = {name: workdir_lib.read_metrics(ctx.workdir / "runs" / name) for name in results}
  return {"results": results, "histories": histories}


def _variant_models(config) -> dict:
  return {variant: models.create(config.model, batch_norm=variant == "bn")
          for variant in config.variants}


# ------------------------------------------------------------------------------ studies


def study_noisy_bn(ctx: train.Context) -> dict:
  """Plain, BN and noisy BN (§2.1): does BN help by fixing its layers' input distributions?"""
  config = ctx.config
  unit = config.diagnostics.unit

  def make_probe(model, tx):
    del tx

    def probe(state):
      # Training mode, with the noise the next step draws: the distribution the next layer
      # actually sees during training (the noise is off at inference).
      _, sown = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            ctx.x_diag, train=True, mutable=["batch_stats", "intermediates"],
                            rngs={"noise": _noise_key(ctx, state.step)})
      inputs = sown["intermediates"]
      last = inputs[max((k for k in inputs if k.startswith("activation_input_")),
                        key=lambda k: int(k.rsplit("_", 1)[1]))][0]
      return {"unit_train_percentiles": jnp.percentile(last[:, unit], jnp.array(PERCENTILES)),
              "layer_means": jnp.mean(last, axis=0), "layer_stds": jnp.std(last, axis=0)}

    return probe

  nets = {**_variant_models(config), NOISY: noisy_bn.create(config.model, config.probes)}
  return _outcome(ctx, {name: _run(name, model, ctx, make_probe) for name, model in nets.items()})


def study_ics(ctx: train.Context) -> dict:
  """Definition 2.1's ICS per layer over training, plain vs BN (§2.2, Fig. 5)."""
  config = ctx.config

  def make_probe(model, tx):
    def probe(state):
      x, y = train.sample_batch(ctx, state.step, config.batch_size)
      found = ics_on_batch(model, tx, state.params, state.batch_stats, state.opt_state, x, y)
      return {f"ics_{k}": v for k, v in found.items()}
    return probe

  return _outcome(ctx, {name: _run(name, model, ctx, make_probe)
                        for name, model in _variant_models(config).items()})


def study_landscape(ctx: train.Context) -> dict:
  """Loss and gradient along the gradient direction over training, plain vs BN (§3.1, Fig. 4)."""
  config = ctx.config
  step_sizes = jnp.asarray(config.probes.step_multiples, jnp.float32) * \
      config.optimizer.learning_rate

  def make_probe(model, tx):
    del tx

    def probe(state):
      x, y = train.sample_batch(ctx, state.step, config.batch_size)
      found = landscape_on_batch(model, state.params, state.batch_stats, x, y, step_sizes)
      return {**{f"landscape_{k}": v for k, v in found.items()},
              **{f"landscape_{k}": v for k, v in probes.summarize_landscape(found).items()}}
    return probe

  return _outcome(ctx, {name: _run(name, model, ctx, make_probe)
                        for name, model in _variant_models(config).items()})
