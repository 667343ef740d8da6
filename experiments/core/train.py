"""Training: the train step, jitted lax.scan chunks with donated state, the run loop, checkpoints.

`train_and_evaluate(config, workdir, study=...)` validates the config, locks and claims the
workdir, then runs the study (a `study.Study`; what a run measures is `evaluation.py`). Every run
resumes from its newest orbax checkpoint that restores (the two newest are kept; a damaged one
is set aside in `checkpoints_damaged/`); runs already finished are read back from their
`result.json`.
"""

from __future__ import annotations

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

from experiments.core import checkpoints as checkpoints_lib
from experiments.core import config as config_lib
from experiments.core import data as data_lib
from experiments.core import distributed, progress, workdir as workdir_lib
from experiments.core import study as study_lib
from experiments.core.study import Study


@flax.struct.dataclass
class TrainState:
  """What a run checkpoints and resumes from."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


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


def init_state(model, tx, sample_x, seed: int, *,
               learning_rate: float | None = None) -> TrainState:
  """Fresh parameters and optimizer state; `learning_rate` sets `make_optimizer`'s injected
  peak rate (None: `tx` has none to set, e.g. the benchmark's plain SGD)."""
  variables = model.init(jax.random.key(seed), sample_x, train=False)
  params = variables["params"]
  opt_state = tx.init(params)
  if learning_rate is not None:
    opt_state[0].hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)


def loss_and_stats(model, params, batch_stats, x, y):
  """Training-mode cross-entropy; returns the updated running statistics too."""
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates.get("batch_stats", {})


def apply_gradients(tx, state: TrainState, grads, batch_stats) -> TrainState:
  """One optimizer update, the step counted and the running statistics replaced."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def train_step(model, tx, state: TrainState, x, y) -> tuple[TrainState, jax.Array]:
  """One SGD step on the batch `(x, y)`, pure: `(state, batch) -> (state, loss)`.

  The runs and the benchmark both scan it, so the benchmark times the step that trains.
  """
  (loss, batch_stats), grads = jax.value_and_grad(
      functools.partial(loss_and_stats, model), has_aux=True)(
          state.params, state.batch_stats, x, y)
  return apply_gradients(tx, state, grads, batch_stats), loss


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


def scan_steps(step, state, *, length: int, xs=None):
  """`lax.scan` of `step` over a chunk; a short chunk is unrolled, no while loop at all
  (see steps_per_call)."""
  return jax.lax.scan(step, state, xs, length=length, unroll=length if length <= 8 else 1)


def make_train_chunk(model, tx, ctx: Context) -> Callable:
  """`steps_per_call` SGD steps in one lax.scan, jitted once, the state donated."""
  config = ctx.config

  def step(state: TrainState, _):
    x, y = sample_batch(ctx, state.step, config.batch_size)
    state, loss = train_step(model, tx, state, x, y)
    return state, {"loss": loss}

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state):
    return scan_steps(step, state, length=steps_per_call(config))

  return chunk


def mean_loss_record(first_step, per_step, evaluation) -> list[dict]:
  """One record per chunk: the mean training loss, then the evaluation (a `run_loop`
  summarize)."""
  return [{"step": first_step + len(per_step["loss"]),
           "train_loss": float(np.mean(per_step["loss"])), **evaluation}]


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
  checkpoints = (run_dir / "checkpoints").resolve()
  # Two kept: a damaged newest one leaves one to resume from.
  manager = ocp.CheckpointManager(
      checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  records: list[dict] = []
  state, latest = checkpoints_lib.restore_newest(name, ctx.reporter, manager, checkpoints, state)
  if latest is not None:
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
      manager.wait_until_finished()  # every process's part written and committed
      if distributed.is_primary():
        checkpoints_lib.write_digest(checkpoints / str(int(state.step)))
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


# ---------------------------------------------------------------------------- entry point


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       study: Study, overwrite: bool = False, reporter=None) -> dict:
  """Runs `study` (the one `config.study` names: `experiments.registry`) into `workdir` and
  writes plots and summary.md there.

  With several processes (`jax.distributed`), every process calls this with the same
  arguments; process 0 writes the files and reports progress, and its summary is returned
  (None elsewhere).

  Returns the study's results (per run: final test accuracy, divergence, speed). Raises
  ConfigError before the first write when the run cannot start, and its WorkdirError when
  another process is using `workdir` or a run has checkpoints of which none restores.
  """
  # Everything that can refuse the run does so before the first write, in every process.
  config_lib.validate(config)
  study_lib.check(study, config)
  workdir_lib.check(workdir, config, overwrite=overwrite)
  try:
    dataset = data_lib.load(config.data, config.seed)
  except data_lib.DataError as error:
    raise config_lib.ConfigError(str(error)) from None
  primary = distributed.is_primary()
  # One lock for all the processes of a run, which share the workdir by design: process 0
  # takes it and tells the others, so a refused launch stops in every process at once
  # instead of leaving them waiting for process 0 in a collective.
  held, refusal = workdir_lib.Lock(None), None
  if primary:
    try:
      held = workdir_lib.lock(workdir)
    except workdir_lib.WorkdirError as error:
      refusal = error
  if not distributed.primary_says(refusal is None):
    raise refusal or workdir_lib.WorkdirError(
        f"{workdir} is in use by another run; process 0 of this one names it.")
  with held:
    # All processes have read the workdir before process 0 changes it, and see it changed.
    distributed.barrier("workdir checked")
    if primary:
      workdir = workdir_lib.prepare(workdir, config, overwrite=overwrite)
    distributed.barrier("workdir prepared")
    workdir = pathlib.Path(workdir)
    reporter = (reporter or progress.make_reporter()) if primary else progress.QuietReporter()
    ctx = Context(config, workdir, dataset, reporter)
    with reporter:
      outcome = study.run(ctx)
    summary = study.write_outputs(config, workdir, outcome) if primary else None
  return {"results": outcome["results"], "summary": summary}
