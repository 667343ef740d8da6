"""Ghorbani et al.'s Hessian studies: each run trains one net and, at the probe steps, measures
the spectrum of the Hessian of its training loss (`spectrum.py`).

- `hessian_spectrum`: BN vs no BN (config.variants), several seeds: the top eigenvalues,
  the outliers, the gradient's concentration in the top eigenspace, the density (SLQ).
- `hessian_population`: mini-batch BN against BN whose statistics are the population's,
  recomputed every `hessian.population_every` steps over `hessian.population_batches`
  training batches (pooled: `jaxbn.recompute_batch_stats(variance="pooled")`) and held
  constant in between — the net normalizes in inference mode, so no gradient flows through
  the statistics, as with the fixed statistics the paper trains with.
- `hessian_agreement`: the BN net; at every evaluation, Hessian-vector products through the
  analytic backward against autodiff's, on random vectors, both ways (forward- and
  reverse-over-reverse), in float32 (the training dtype) and in float64: the largest
  relative difference.

Which Hessian: that of the loss the optimizer descends, on a fixed sample of
`hessian.batches` × `batch_size` training examples (the paper takes the whole training set):
the mean over the sample's batches of each batch's training-mode loss, BN normalizing each
batch with its own statistics; with population statistics, the inference-mode loss with the
statistics of that moment.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
from experiments.core import evaluation as evaluation_lib
from experiments.core import models, train, workdir as workdir_lib
from experiments.studies.hessian import spectrum

POPULATION = "population"


# ------------------------------------------------------------------------------ the losses


def cross_entropy(model, params, batch_stats, x, y, *, train_mode: bool) -> jax.Array:
  """The mean cross-entropy of one batch; BN with batch statistics in training mode, else
  with `batch_stats` (the running or population statistics)."""
  variables = {"params": params, "batch_stats": batch_stats}
  if train_mode:
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  else:
    logits = model.apply(variables, x, train=False)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.cache
def sample_loss(model, *, train_mode: bool):
  """`loss(params, batch_stats, xs, ys)`: the mean over the batches (xs, ys: (batches,
  batch_size, ...)) of each batch's loss — the Hessian's loss. One function object per
  (model, mode), so `spectrum.hvp` compiles it once."""
  def loss(params, batch_stats, xs, ys):
    one = lambda xy: cross_entropy(model, params, batch_stats, *xy, train_mode=train_mode)
    return jnp.mean(jax.lax.map(one, (xs, ys)))
  return loss


def probe_sample(ctx: train.Context, batches: int):
  """The fixed sample the Hessians are taken over: `batches` batches of distinct training
  examples, the same for every run and probe of a study."""
  config = ctx.config
  n = batches * config.batch_size
  index = jax.random.permutation(jax.random.key(config.seed + 3), ctx.x_train.shape[0])[:n]
  shape = (batches, config.batch_size)
  return (ctx.x_train[index].reshape(*shape, *ctx.x_train.shape[1:]),
          ctx.y_train[index].reshape(shape))


# ------------------------------------------------------------------------------ the probes


def measure_spectrum(loss_fn, params, args, settings, seed: int) -> dict:
  """Everything `hessian_spectrum` records at one point of training (see spectrum.py):
  `density_runs` Lanczos runs of `lanczos_order` steps from random starts, the top-k Ritz
  pairs of the first, the SLQ measure of all, the Hutchinson trace, the gradient's share in
  the top eigenspace."""
  matvec, n = spectrum.hvp(loss_fn, params, *args)
  runs = [spectrum.lanczos(matvec, spectrum.random_unit_vector(n, seed * 1000 + i),
                           settings.lanczos_order) for i in range(settings.density_runs)]
  top, vectors = spectrum.eigenpairs(runs[0], settings.top_k)
  measure = spectrum.quadrature(runs)
  trace, trace_error = spectrum.hutchinson_trace(matvec, n, settings.trace_samples, seed)
  concentration = spectrum.gradient_concentration(spectrum.gradient(loss_fn, params, *args),
                                                 vectors)
  k = min(settings.concentration_k, concentration.size)
  return {"top_eigenvalues": top.tolist(),
          "gradient_concentration": float(concentration[k - 1]),
          "concentration_curve": concentration.tolist(),
          "trace": trace, "trace_stderr": trace_error, "parameters": n,
          "slq_nodes": measure.nodes.tolist(), "slq_weights": measure.weights.tolist()}


def hvp_agreement(analytic_loss, autodiff_loss, params, args, vectors: int, seed: int,
                  mode: str = "forward-over-reverse") -> float:
  """The largest relative difference ‖Hv − H′v‖∞ / ‖H′v‖∞ over `vectors` random unit v,
  H through the analytic backward and H′ through autodiff (both by `mode`), in the
  parameters' dtype."""
  analytic, n = spectrum.hvp(analytic_loss, params, *args, mode=mode)
  autodiff, _ = spectrum.hvp(autodiff_loss, params, *args, mode=mode)
  worst = 0.0
  for i in range(vectors):
    v = spectrum.random_unit_vector(n, seed * 1000 + i)
    got, want = analytic(v), autodiff(v)
    worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
  return worst


# ------------------------------------------------------------------------------- training


def _seeded(ctx: train.Context, seed: int) -> train.Context:
  """ctx for one seed: its own initialization and its own batch order."""
  seeded = copy.copy(ctx)
  seeded.data_key = jax.random.key(seed + 1)
  return seeded


def refresh_population(model, ctx: train.Context, state, batches: int):
  """state with its BN statistics replaced by the population's: pooled over `batches`
  training batches drawn afresh."""
  config = ctx.config
  # A stream of its own beside the training batches' (fold_in(data_key, step)), a pure
  # function of the run's seed and the step: a resumed run refreshes with the same batches.
  key = jax.random.fold_in(jax.random.split(ctx.data_key)[1], state.step)
  index = jax.random.randint(key, (batches, config.batch_size), 0, ctx.x_train.shape[0])
  variables = jaxbn.recompute_batch_stats(
      model, list(ctx.x_train[index]), variables={"params": state.params,
                                                  "batch_stats": state.batch_stats},
      variance="pooled", train=True)
  return state.replace(batch_stats=variables["batch_stats"])


def _population_chunk(model, tx, ctx: train.Context, every: int, batches: int):
  """`every` SGD steps normalizing with the state's statistics (inference mode), jitted,
  each call first refreshing the statistics on the host: the chunk `run_loop` calls."""
  config = ctx.config

  def step(state, _):
    x, y = train.sample_batch(ctx, state.step, config.batch_size)
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model, p, state.batch_stats, x, y, train_mode=False))(
            state.params)
    return train.apply_gradients(tx, state, grads, state.batch_stats), {"loss": loss}

  steps = jax.jit(lambda s: train.scan_steps(step, s, length=every), donate_argnums=0)

  def chunk(state):
    return steps(refresh_population(model, ctx, state, batches))

  return chunk


def run_one(name: str, variant: str, seed: int, ctx: train.Context, probe) -> dict:
  """Trains one net (`variant`: "bn", "plain" or POPULATION) from `seed` and after every
  evaluation interval evaluates it and, at the probe steps, calls
  `probe(model, state, variant, seed) -> dict`."""
  config, settings = ctx.config, ctx.config.hessian
  ctx = _seeded(ctx, seed)
  model = models.create(config.model, batch_norm=variant != "plain")
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  state = jax.device_put(train.init_state(model, tx, ctx.x_grad, seed,
                                          learning_rate=config.optimizer.learning_rate),
                         ctx.replicated)
  test = evaluation_lib.make_evaluate(model, ctx)
  if variant == POPULATION:
    chunk = _population_chunk(model, tx, ctx, settings.population_every,
                              settings.population_batches)
    chunks = (chunk, 0.0)  # compiled on its first call
  else:
    chunks = train.compile_ahead(train.make_train_chunk(model, tx, ctx), state)
  probe_steps = set(settings.probe_steps)

  def evaluate(state):
    found = test(state)
    if int(state.step) in probe_steps:
      found.update(probe(model, state, variant, seed))
    return found

  run_config = (_per_call(config, settings.population_every) if variant == POPULATION
                else config)
  return train.run_loop(name, _with_config(ctx, run_config), state, chunks, evaluate,
                        train.mean_loss_record)


def _per_call(config, steps: int):
  # The population chunk runs `steps` steps per call; run_loop reads that from the config.
  config = copy.deepcopy(config)
  with config.unlocked():
    config.steps_per_call = steps
  return config


def _with_config(ctx: train.Context, config) -> train.Context:
  if config is ctx.config:
    return ctx
  ctx = copy.copy(ctx)
  ctx.config = config
  return ctx


def _outcome(ctx: train.Context, results: dict) -> dict:
  histories = {name: workdir_lib.read_metrics(ctx.workdir / "runs" / name) for name in results}
  return {"results": results, "histories": histories}


def run_name(variant: str, seed: int) -> str:
  return f"{variant}_seed{seed}"


def _spectrum_probe(ctx: train.Context):
  settings = ctx.config.hessian
  xs, ys = probe_sample(ctx, settings.batches)

  def probe(model, state, variant, seed):
    if variant == POPULATION:  # the statistics the next step will normalize with
      state = refresh_population(model, ctx, state, settings.population_batches)
    loss = sample_loss(model, train_mode=variant != POPULATION)
    found = measure_spectrum(loss, state.params, (state.batch_stats, xs, ys), settings, seed)
    return {f"hessian_{k}": v for k, v in found.items()}

  return probe


def _train_variants(ctx: train.Context, variants, probe) -> dict:
  return _outcome(ctx, {run_name(v, s): run_one(run_name(v, s), v, s, ctx, probe)
                        for v in variants for s in ctx.config.hessian.seeds})


# -------------------------------------------------------------------------------- studies


def study_spectrum(ctx: train.Context) -> dict:
  """The Hessian's spectrum over training, BN vs no BN."""
  return _train_variants(ctx, ctx.config.variants, _spectrum_probe(ctx))


def study_population(ctx: train.Context) -> dict:
  """Mini-batch BN against population-statistics BN: do the outliers return?"""
  return _train_variants(ctx, ("bn", POPULATION), _spectrum_probe(ctx))


def study_agreement(ctx: train.Context) -> dict:
  """Analytic against autodiff Hessian-vector products along the BN net's training."""
  config, settings = ctx.config, ctx.config.hessian
  xs, ys = probe_sample(ctx, settings.batches)
  autodiff = models.create(config.model, batch_norm=True, gradient="autodiff")

  def probe(model, state, variant, seed):
    del variant
    found = {}
    for dtype in ("float32", "float64"):
      with jax.enable_x64(dtype == "float64"):
        cast = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, dtype))
        params, stats, x = cast(state.params), cast(state.batch_stats), cast(xs)
        for mode in spectrum.MODES:
          found[f"hvp_difference_{dtype}_{mode}"] = hvp_agreement(
              sample_loss(model, train_mode=True), sample_loss(autodiff, train_mode=True),
              params, (stats, x, ys), settings.hvp_vectors, seed, mode)
    return found

  return _train_variants(ctx, ("bn",), probe)
