"""Training: jitted lax.scan chunks with donated state, evaluation, checkpoints, the studies.

`train_and_evaluate(config, workdir)` validates the config, claims the workdir, then runs the
config's study. Every run resumes from its latest orbax checkpoint; runs already finished are
read back from their `result.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import distributed, models, plots, progress, workdir as workdir_lib

EVAL_BATCH = 500


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class Lockstep:
  """Two training states advanced together (the gradient_agreement study)."""

  analytic: TrainState
  autodiff: TrainState

  @property
  def step(self) -> jax.Array:
    return self.analytic.step


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a study: which net, which learning rate, which backward."""

  name: str
  batch_norm: bool
  learning_rate: float
  gradient: str


class Context:
  """What every run of a study shares: config, data on device, mesh, progress."""

  def __init__(self, config, workdir: pathlib.Path, dataset: data_lib.Dataset, reporter):
    self.config = config
    self.workdir = workdir
    self.reporter = reporter
    # Every process's devices with jax.distributed: data_parallel shards each batch over all.
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(self.mesh, P())
    self.replicated = replicated
    self.batch_sharding = (NamedSharding(self.mesh, P("data")) if config.data_parallel
                           else replicated)
    self.sharded_batch = config.data_parallel and jax.device_count() > 1
    put = lambda a: jax.device_put(a, replicated)
    self.x_train, self.y_train = put(dataset.x_train), put(dataset.y_train)
    self.x_test, self.y_test = dataset.x_test, dataset.y_test
    n = config.diagnostics.num_examples
    self.x_diag = put(dataset.x_test[:n])
    self.x_grad = put(dataset.x_train[:config.batch_size])
    self.y_grad = put(dataset.y_train[:config.batch_size])
    self.data_key = jax.random.key(config.seed + 1)
    self.compiled: dict = {}  # (batch_norm, gradient) -> model, optimizer, jitted functions


# ------------------------------------------------------------------------------- pieces


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """SGD (optionally with momentum) or Adam, then an optional cosine decay to 0.

  The peak learning rate is injected (it lives in the optimizer state), so runs that differ
  only in it share one compiled step: see `init_state`.
  """
  if opt_config.name == "adam":
    base = optax.inject_hyperparams(optax.adam)(learning_rate=opt_config.learning_rate)
  else:
    base = optax.inject_hyperparams(optax.sgd)(
        learning_rate=opt_config.learning_rate, momentum=opt_config.momentum or None)
  decay = (optax.cosine_decay_schedule(1.0, num_steps) if opt_config.schedule == "cosine"
           else optax.constant_schedule(1.0))
  return optax.chain(base, optax.scale_by_schedule(decay))


def init_state(model, tx, sample_x, seed: int, learning_rate: float) -> TrainState:
  variables = model.init(jax.random.key(seed), sample_x, train=False)
  params = variables["params"]
  opt_state = tx.init(params)
  opt_state[0].hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)


def loss_and_stats(model, params, batch_stats, x, y):
  """Training-mode cross-entropy; returns the updated running statistics too."""
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates.get("batch_stats", {})


def sample_batch(ctx: Context, step, batch_size: int):
  """The batch of `step`: drawn with replacement, a pure function of (seed, step), so a
  resumed run sees exactly the batches an uninterrupted one would."""
  n = ctx.x_train.shape[0]
  idx = jax.random.randint(jax.random.fold_in(ctx.data_key, step), (batch_size,), 0, n)
  x = jax.lax.with_sharding_constraint(ctx.x_train[idx], ctx.batch_sharding)
  return x, ctx.y_train[idx]


def steps_per_call(config) -> int:
  """Steps in one jitted call: the whole evaluation interval, unless `config.steps_per_call`.

  XLA:CPU runs convolutions inside a while loop about 10x slower than unrolled (measured:
  the CNN's step took 378 ms in lax.scan, 37 ms unrolled), so the CNN config calls a short,
  fully unrolled chunk repeatedly instead of scanning the whole interval.
  """
  return config.steps_per_call or config.eval_every


def _scan(step, state, length: int):
  # A short chunk is unrolled: no while loop at all (see steps_per_call).
  return jax.lax.scan(step, state, None, length=length, unroll=length if length <= 8 else 1)


def make_train_chunk(model, tx, ctx: Context) -> Callable:
  """`steps_per_call` SGD steps in one lax.scan, jitted once, the state donated."""
  config = ctx.config

  def train_step(state: TrainState, _):
    x, y = sample_batch(ctx, state.step, config.batch_size)
    (loss, batch_stats), grads = jax.value_and_grad(
        functools.partial(loss_and_stats, model), has_aux=True)(
            state.params, state.batch_stats, x, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), {"loss": loss}

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state):
    return _scan(train_step, state, steps_per_call(config))

  return chunk


def make_evaluate(model, ctx: Context) -> Callable:
  """Test accuracy and loss with the running statistics (inference mode)."""
  n = ctx.x_test.shape[0]
  padded = -(-n // EVAL_BATCH) * EVAL_BATCH
  pad = lambda a: np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)])
  batches = lambda a: jax.device_put(pad(a).reshape(-1, EVAL_BATCH, *a.shape[1:]), ctx.replicated)
  x, y = batches(ctx.x_test), batches(ctx.y_test)
  weight = batches(np.ones(n, np.float32))

  @jax.jit
  def evaluate(params, batch_stats):
    def one(batch):
      xb, yb, wb = batch
      logits = model.apply({"params": params, "batch_stats": batch_stats}, xb, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return (jnp.sum(wb * (jnp.argmax(logits, -1) == yb)), jnp.sum(wb * losses))
    correct, loss = jax.lax.map(one, (x, y, weight))
    return {"test_accuracy": jnp.sum(correct) / n, "test_loss": jnp.sum(loss) / n}

  return lambda state: evaluate(state.params, state.batch_stats)


def make_diagnostics(model, ctx: Context) -> Callable:
  """The BN paper's Fig. 1b, c and the seed's saturation argument, at each evaluation:
  percentiles of one unit's activation input in the last hidden layer (inference mode, on
  test examples), the fraction of activation inputs with |x| > saturation per layer, and
  the gradient norm of each layer's kernel on a fixed training batch."""
  diag = ctx.config.diagnostics

  @jax.jit
  def diagnostics(params, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}
    _, sown = model.apply(variables, ctx.x_diag, train=False, mutable=["intermediates"])
    inputs = [v[0] for _, v in sorted(sown["intermediates"].items(),
                                      key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
    unit = inputs[-1][..., diag.unit].ravel()
    grads = jax.grad(lambda p: loss_and_stats(model, p, batch_stats, ctx.x_grad,
                                              ctx.y_grad)[0])(params)
    kernels = [grads[name]["kernel"] for name in sorted(grads, key=_layer_order)
               if "kernel" in grads[name]]  # Dense/Conv layers, not BatchNorm
    return {
        "unit_percentiles": jnp.percentile(unit, jnp.array([15.0, 50.0, 85.0])),
        "saturated_fraction": jnp.stack([jnp.mean(jnp.abs(a) > diag.saturation)
                                         for a in inputs]),
        "grad_norm": jnp.stack([jnp.linalg.norm(k) for k in kernels]),
    }

  return lambda state: diagnostics(state.params, state.batch_stats)


def _layer_order(name: str) -> tuple[str, int]:
  kind, _, index = name.rpartition("_")
  return (kind, int(index)) if index.isdigit() else (name, 0)


def _to_python(tree) -> Any:
  return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


# --------------------------------------------------------------------------- the run loop


def compile_ahead(chunk, state) -> tuple[Callable, float]:
  """Compiles a jitted chunk for `state`'s shapes, timing compilation apart from training."""
  start = time.perf_counter()
  compiled = chunk.lower(state).compile()
  return compiled, time.perf_counter() - start


def run_loop(name: str, ctx: Context, state, chunk, evaluate, summarize) -> dict:
  """Trains one run to `num_steps`, resuming from its checkpoint; returns its result.

  `chunk = (compiled chunk(state) -> (state, per_step arrays), compile seconds)`;
  `evaluate(state) -> dict`; `summarize(first_step, per_step, evaluation) -> records`.
  """
  config = ctx.config
  run_dir = ctx.workdir / "runs" / name
  result_path = run_dir / "result.json"
  if result_path.exists():
    return json.loads(result_path.read_text())
  manager = ocp.CheckpointManager(
      (run_dir / "checkpoints").resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  records: list[dict] = []
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(state))
    records = [r for r in workdir_lib.read_metrics(run_dir) if r["step"] <= latest]
  compiled, compile_seconds = chunk
  diverged_at = None
  ctx.reporter.start(name, config.num_steps, int(state.step))
  while int(state.step) < config.num_steps:
    first_step = int(state.step)
    start = time.perf_counter()
    outputs = []
    for _ in range(config.eval_every // steps_per_call(config)):
      state, out = compiled(state)
      outputs.append(out)
    per_step = jax.tree.map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *outputs)
    seconds = time.perf_counter() - start
    finite = np.isfinite(per_step["loss"]).reshape(len(per_step["loss"]), -1).all(axis=1)
    evaluation = _to_python(evaluate(state)) if finite.all() else {}
    new = summarize(first_step, per_step, evaluation)
    new[-1]["steps_per_second"] = config.eval_every / seconds
    records += new
    if distributed.is_primary():
      workdir_lib.write_metrics(run_dir, records)
    ctx.reporter.update(name, int(state.step), float(np.mean(per_step["loss"])),
                        config.eval_every / seconds)
    _maybe_inject_fault(int(state.step))
    if not finite.all():
      diverged_at = first_step + int(np.argmin(finite)) + 1
      ctx.reporter.log(f"{name}: diverged at step {diverged_at} (non-finite loss); "
                       "recorded as a result, the study goes on.")
      break
    if int(state.step) % config.checkpoint_every == 0 or int(state.step) == config.num_steps:
      manager.save(int(state.step), args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
  manager.close()
  last_eval = next((r for r in reversed(records) if "test_accuracy" in r), {})
  result = {
      "name": name,
      "steps": int(state.step),
      "diverged": diverged_at is not None,
      "diverged_at": diverged_at,
      "final_test_accuracy": None if diverged_at else last_eval.get("test_accuracy"),
      "compile_seconds": compile_seconds,
      "steps_per_second": float(np.median([r["steps_per_second"] for r in records
                                           if "steps_per_second" in r] or [0.0])),
  }
  ctx.reporter.finish(name, result)
  # Every process has decided to train this run before process 0 marks it finished.
  distributed.barrier(f"finished {name}")
  if distributed.is_primary():
    workdir_lib.atomic_write(result_path, json.dumps(result, indent=2))
  return result


def _maybe_inject_fault(step: int) -> None:
  """Fault injection for the kill-and-resume test: JAXBN_FAULT_KILL_AT_STEP=N kills this
  process (SIGKILL, no cleanup) once a chunk reaching step N has written its metrics."""
  kill_at = os.environ.get("JAXBN_FAULT_KILL_AT_STEP")
  if kill_at is not None and step >= int(kill_at):
    os.kill(os.getpid(), signal.SIGKILL)


def _eval_summary(first_step, per_step, evaluation) -> list[dict]:
  """One record per chunk: mean training loss, then the evaluation."""
  steps = len(per_step["loss"])
  return [{"step": first_step + steps, "train_loss": float(np.mean(per_step["loss"])),
           **evaluation}]


def train_run(run: Run, ctx: Context) -> dict:
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
    model = models.create(config.model, batch_norm=run.batch_norm, gradient=run.gradient,
                          sharded_batch=ctx.sharded_batch)
    tx = make_optimizer(config.optimizer, config.num_steps)
    test, diagnostics = make_evaluate(model, ctx), make_diagnostics(model, ctx)
    state = _initial_state(model, tx, ctx, config.optimizer.learning_rate)
    ctx.compiled[key] = (model, tx, compile_ahead(make_train_chunk(model, tx, ctx), state),
                         lambda s: {**test(s), **diagnostics(s)})
  model, tx, chunk, evaluate = ctx.compiled[key]
  state = _initial_state(model, tx, ctx, run.learning_rate)
  return run_loop(run.name, ctx, state, chunk, evaluate, _eval_summary)


def _initial_state(model, tx, ctx: Context, learning_rate: float) -> TrainState:
  return jax.device_put(init_state(model, tx, ctx.x_grad, ctx.config.seed, learning_rate),
                        ctx.replicated)


# ------------------------------------------------------------------------------ studies


def _variant_runs(config, learning_rate=None, suffix="") -> list[Run]:
  lr = config.optimizer.learning_rate if learning_rate is None else learning_rate
  return [Run(f"{variant}{suffix}", variant == "bn", lr, config.model.gradient)
          for variant in config.variants]


def study_compare(ctx: Context) -> dict:
  results = {run.name: train_run(run, ctx) for run in _variant_runs(ctx.config)}
  histories = {name: workdir_lib.read_metrics(ctx.workdir / "runs" / name) for name in results}
  return {"results": results, "histories": histories}


def study_lr_sweep(ctx: Context) -> dict:
  results = {}
  for lr in ctx.config.sweep.learning_rates:
    for run in _variant_runs(ctx.config, lr, suffix=f"_lr{lr:g}"):
      results[run.name] = {**train_run(run, ctx), "learning_rate": lr,
                           "variant": "bn" if run.batch_norm else "plain"}
  return {"results": results}


def study_gradient_agreement(ctx: Context) -> dict:
  """The BN net twice in lockstep: analytic and autodiff backward, same batches.

  Per step: both losses, and the max relative difference between the two backwards'
  gradients at the *same* point (the analytic run's parameters), so the comparison measures
  the backward and not the drift between trajectories.
  """
  config = ctx.config
  analytic = models.create(config.model, batch_norm=True, gradient="analytic",
                           sharded_batch=ctx.sharded_batch)
  autodiff = models.create(config.model, batch_norm=True, gradient="autodiff",
                           sharded_batch=ctx.sharded_batch)
  tx = make_optimizer(config.optimizer, config.num_steps)
  lr = config.optimizer.learning_rate
  init = init_state(analytic, tx, ctx.x_grad, config.seed, lr)
  # Two copies: the chunk donates its input, and one buffer must not be donated twice.
  state = jax.device_put(Lockstep(init, jax.tree.map(jnp.copy, init)), ctx.replicated)
  grad = lambda model: jax.value_and_grad(functools.partial(loss_and_stats, model), has_aux=True)

  def step(states: Lockstep, _):
    a, b = states.analytic, states.autodiff
    x, y = sample_batch(ctx, a.step, config.batch_size)
    (loss_a, stats_a), grads_a = grad(analytic)(a.params, a.batch_stats, x, y)
    (loss_b, stats_b), grads_b = grad(autodiff)(b.params, b.batch_stats, x, y)
    _, grads_b_at_a = grad(autodiff)(a.params, a.batch_stats, x, y)
    rel = jnp.max(jnp.stack([
        jnp.max(jnp.abs(g - h)) / jnp.maximum(jnp.max(jnp.abs(h)), 1e-30)
        for g, h in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b_at_a), strict=True)]))

    def apply(s, grads, stats):
      updates, opt_state = tx.update(grads, s.opt_state, s.params)
      return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates),
                       batch_stats=stats, opt_state=opt_state)

    return Lockstep(apply(a, grads_a, stats_a), apply(b, grads_b, stats_b)), {
        "loss": jnp.stack([loss_a, loss_b]), "max_rel_grad_diff": rel}

  chunk = jax.jit(lambda s: _scan(step, s, steps_per_call(config)), donate_argnums=0)
  evaluate_a, evaluate_b = make_evaluate(analytic, ctx), make_evaluate(autodiff, ctx)

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

  result = run_loop("lockstep", ctx, state, compile_ahead(chunk, state), evaluate, summarize)
  history = workdir_lib.read_metrics(ctx.workdir / "runs" / "lockstep")
  return {"results": {"lockstep": result}, "histories": {"lockstep": history}}


STUDIES = {
    "compare": study_compare,
    "lr_sweep": study_lr_sweep,
    "gradient_agreement": study_gradient_agreement,
}


# ---------------------------------------------------------------------------- entry point


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       overwrite: bool = False, reporter=None) -> dict:
  """Runs `config.study` into `workdir` and writes plots and summary.md there.

  With several processes (`jax.distributed`), every process calls this with the same
  arguments; process 0 writes the files and reports progress, and its summary is returned
  (None elsewhere).

  Returns the study's results (per run: final test accuracy, divergence, speed).
  """
  # Everything that can refuse the run does so before the first write, in every process.
  config_lib.validate(config, default_config.get_config())
  workdir_lib.check(workdir, config, overwrite=overwrite)
  try:
    dataset = data_lib.load(config.data, config.seed)
  except data_lib.DataError as error:
    raise config_lib.ConfigError(str(error)) from None
  primary = distributed.is_primary()
  # All processes have read the workdir before process 0 changes it, and see it changed.
  distributed.barrier("workdir checked")
  if primary:
    workdir = workdir_lib.prepare(workdir, config, overwrite=overwrite)
  distributed.barrier("workdir prepared")
  workdir = pathlib.Path(workdir)
  reporter = (reporter or progress.make_reporter()) if primary else progress.QuietReporter()
  ctx = Context(config, workdir, dataset, reporter)
  with reporter:
    outcome = STUDIES[config.study](ctx)
  summary = plots.write_study_outputs(config, workdir, outcome) if primary else None
  return {"results": outcome["results"], "summary": summary}
