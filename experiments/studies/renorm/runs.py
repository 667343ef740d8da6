"""Batch Renormalization, ghost batches and recomputed statistics, measured.

Two studies, the renorm paper's two claims (Ioffe 2017) and PreciseBN's
(Wu & Johnson 2021):

- `renorm_groups`: BN statistics over groups of `config.renorm.group_sizes` examples (ghost
  batches, `virtual_batch_size`, inside each batch of `config.batch_size`): BN vs renorm vs no
  BN. After training, the running (EMA) statistics are replaced by ones recomputed with the
  final weights (`jaxbn.recompute_batch_stats`, the pooled variance) and evaluated again.
- `renorm_noniid`: every training batch holds `config.renorm.classes_per_batch` classes
  (`batches.sample_noniid`): BN vs renorm (vs no BN).

Every run trains one net per seed of `config.renorm.seeds` at once, vmapped: one compile,
the seeds' nets side by side in every matmul. After every chunk a run measures, per seed,
on the same test examples in batches of `batch_size`: accuracy in inference mode (running
statistics) and in training mode (batch statistics over the same groups as in training; for
`renorm_noniid` on non-i.i.d. test batches built as the training ones).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
import jaxbn.linen
from experiments.core import models, train, workdir as workdir_lib
from experiments.studies.renorm import batches as batches_lib

EVAL_SEED = 12345  # the test batches (and recompute batches) are the same for every run


class RenormMLP(nn.Module):
  """Dense → [BN or renorm over groups of `group_size`] → activation per hidden layer.

  With a normalization the hidden Dense layers drop their bias (β takes its place).
  """

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  norm: str = "bn"  # bn | renorm | plain
  group_size: int | None = None  # virtual_batch_size; None: the whole batch
  activation: str = "relu"
  momentum: float = 0.99
  rmax: float = 3.0
  dmax: float = 5.0
  renorm_momentum: float = 0.99
  renorm_warmup_steps: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # pylint: disable=redefined-outer-name
    h = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      z = nn.Dense(width, use_bias=self.norm == "plain")(h)
      if self.norm != "plain":
        z = jaxbn.linen.BatchNorm(use_running_average=not train, **self.bn_fields())(z)
      h = models.ACTIVATIONS[self.activation](z)
    return nn.Dense(self.num_classes)(h)

  def bn_fields(self) -> dict:
    # The pure-JAX path: the C++ kernels' FFI calls are not batched over the seeds' vmap.
    fields = {"momentum": self.momentum, "virtual_batch_size": self.group_size,
              "use_cpu_kernel": False}
    if self.norm == "renorm":  # Ioffe's clipping: r in [1/rmax, rmax], |d| <= dmax
      fields.update(renorm=True, renorm_momentum=self.renorm_momentum,
                    renorm_clipping={"rmax": self.rmax, "rmin": 1.0 / self.rmax,
                                     "dmax": self.dmax},
                    renorm_warmup_steps=self.renorm_warmup_steps)
    return fields


@flax.struct.dataclass
class Seeds:
  """The training states of several seeds, stacked on a leading axis, trained in one vmap."""

  states: train.TrainState

  @property
  def step(self) -> jax.Array:
    return self.states.step[0]


# --------------------------------------------------------------------------------- runs


def run_names(config) -> list[tuple[str, str, int]]:
  """(name, norm, group size) of every run: one per normalization and group size, and one
  `plain` run (no groups to normalize over)."""
  runs = []
  for norm in config.renorm.norms:
    if norm == "plain":
      runs.append(("plain", "plain", config.batch_size))
    else:
      runs += [(f"{norm}_g{g}", norm, g) for g in config.renorm.group_sizes]
  return runs


def create_model(config, norm: str, group_size: int) -> RenormMLP:
  r = config.renorm
  return RenormMLP(hidden=tuple(config.model.hidden), norm=norm,
                   group_size=None if group_size == config.batch_size else group_size,
                   activation=config.model.activation, momentum=config.model.bn_momentum,
                   rmax=r.rmax, dmax=r.dmax, renorm_momentum=r.momentum,
                   renorm_warmup_steps=r.warmup_steps)


class Sampler:
  """The study's training batches (i.i.d. or of few classes), and its evaluation batches."""

  def __init__(self, config, ctx: train.Context):
    self.batch_size = config.batch_size
    self.classes_per_batch = config.renorm.classes_per_batch
    self.num_train = ctx.x_train.shape[0]
    if self.classes_per_batch:
      table, counts = batches_lib.class_table(np.asarray(ctx.y_train), 10)
      batches_lib.check_noniid(counts, batch_size=self.batch_size,
                               classes_per_batch=self.classes_per_batch)
      self.table, self.counts = jnp.asarray(table), jnp.asarray(counts)
      test_table, test_counts = batches_lib.class_table(np.asarray(ctx.y_test), 10)
      self.test_table, self.test_counts = jnp.asarray(test_table), jnp.asarray(test_counts)

  def train_indices(self, key: jax.Array) -> jax.Array:
    if self.classes_per_batch:
      return batches_lib.sample_noniid(key, self.table, self.counts, batch_size=self.batch_size,
                                       classes_per_batch=self.classes_per_batch)
    return batches_lib.sample_iid(key, self.num_train, batch_size=self.batch_size)

  def eval_batches(self, num_test: int) -> dict[str, np.ndarray]:
    """Test-set index batches `(num_batches, batch_size)`: "iid", a permutation of the test
    set (its first `num_test // batch_size * batch_size` examples), and for non-i.i.d.
    studies "noniid", as many batches drawn as the training ones."""
    key = jax.random.key(EVAL_SEED)
    count = num_test // self.batch_size
    order = np.asarray(jax.random.permutation(key, num_test))[:count * self.batch_size]
    found = {"iid": order.reshape(count, self.batch_size)}
    if self.classes_per_batch:
      keys = jax.random.split(jax.random.fold_in(key, 1), count)
      draw = functools.partial(batches_lib.sample_noniid, table=self.test_table,
                               counts=self.test_counts, batch_size=self.batch_size,
                               classes_per_batch=self.classes_per_batch)
      found["noniid"] = np.asarray(jax.vmap(lambda k: draw(k))(keys))
    return found


def make_train_chunk(model, tx, ctx: train.Context, sampler: Sampler, seeds) -> Callable:
  """`eval_every` steps of every seed's net in one lax.scan of a vmapped step, jitted once,
  the states donated. Seed s draws its batches from key(s + 1), as `train.sample_batch`."""
  data_keys = jnp.stack([jax.random.key_data(jax.random.key(s + 1)) for s in seeds])

  def single(state: train.TrainState, key_data):
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    idx = sampler.train_indices(key)
    return train.train_step(model, tx, state, ctx.x_train[idx], ctx.y_train[idx])

  def step(seeds_state: Seeds, _):
    states, loss = jax.vmap(single)(seeds_state.states, data_keys)
    return Seeds(states), {"loss": loss}

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(seeds_state: Seeds):
    return train.scan_steps(step, seeds_state, length=train.steps_per_call(ctx.config))

  return chunk


def make_accuracy(model, ctx: train.Context, eval_batches: dict[str, np.ndarray]) -> Callable:
  """`(params, batch_stats)` of all seeds → per seed, per batch set: inference-mode and
  training-mode accuracy on the same examples, and the inference-mode test loss."""
  sets = {name: (jax.device_put(ctx.x_test[idx], ctx.replicated),
                 jax.device_put(ctx.y_test[idx], ctx.replicated))
          for name, idx in eval_batches.items()}

  def single(params, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}

    def one(batch):
      x, y = batch
      logits = model.apply(variables, x, train=False)
      trained, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return (jnp.sum(jnp.argmax(logits, -1) == y), jnp.sum(jnp.argmax(trained, -1) == y),
              jnp.sum(loss))

    out = {}
    for name, (x, y) in sets.items():
      inference, training, loss = jax.lax.map(one, (x, y))
      n = y.size
      out[name] = {"inference": jnp.sum(inference) / n, "train_mode": jnp.sum(training) / n,
                   "loss": jnp.sum(loss) / n}
    return out

  return jax.jit(jax.vmap(single))


def _evaluation_record(measured: dict, prefix: str = "") -> dict:
  """The metrics a chunk records, per seed (`<metric>_per_seed` lists): test accuracy with
  the running statistics on the i.i.d. test batches, training-mode accuracy on the same
  examples, their gap, and the same pair on the non-i.i.d. test batches where the study has
  them. `test_accuracy` itself is the seeds' mean, a number as in every other study."""
  iid = measured["iid"]
  record = {"test_accuracy": iid["inference"], "test_loss": iid["loss"],
            "train_mode_accuracy": iid["train_mode"],
            "train_minus_inference": iid["train_mode"] - iid["inference"]}
  if "noniid" in measured:
    noniid = measured["noniid"]
    record.update(noniid_inference_accuracy=noniid["inference"],
                  noniid_train_mode_accuracy=noniid["train_mode"],
                  noniid_train_minus_inference=noniid["train_mode"] - noniid["inference"])
  found = {f"{prefix}{key}_per_seed": value for key, value in record.items()}
  if not prefix:
    found["test_accuracy"] = jnp.mean(iid["inference"])
  return found


def recompute_statistics(model, ctx: train.Context, sampler: Sampler, states: train.TrainState,
                         num_batches: int, *, variance: str) -> dict:
  """Each seed's batch statistics recomputed with its final weights as the true average over
  `num_batches` training batches drawn as in training (`jaxbn.recompute_batch_stats` with
  `variance`); returns the stacked batch_stats."""
  keys = jax.random.split(jax.random.key(EVAL_SEED + 1), num_batches)
  idx = np.asarray(jax.vmap(sampler.train_indices)(keys))
  x = np.asarray(ctx.x_train)[idx]
  recomputed = []
  for s in range(states.step.shape[0]):
    variables = {"params": jax.tree.map(lambda a, s=s: a[s], states.params),
                 "batch_stats": jax.tree.map(lambda a, s=s: a[s], states.batch_stats)}
    new = jaxbn.recompute_batch_stats(model, list(x), variables=variables, variance=variance,
                                      train=True)
    recomputed.append(new["batch_stats"])
  return jax.tree.map(lambda *a: jnp.stack(a), *recomputed)


def _seeds_record(first_step, per_step, evaluation) -> list[dict]:
  """One record per chunk: the mean training loss of each seed, then the evaluation."""
  loss = np.asarray(per_step["loss"])
  return [{"step": first_step + loss.shape[0], "train_loss": loss.mean(axis=0).tolist(),
           **evaluation}]


def train_seeds(ctx: train.Context, name: str, norm: str, group_size: int,
                sampler: Sampler, eval_batches: dict) -> dict:
  """One run: the model of (norm, group size) for every seed, evaluated after every chunk,
  and at the end with recomputed statistics (normalized nets)."""
  config = ctx.config
  result_path = ctx.workdir / "runs" / name / "result.json"
  if result_path.exists():  # finished: nothing to compile
    return json.loads(result_path.read_text())
  seeds = tuple(config.renorm.seeds)
  model = create_model(config, norm, group_size)
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  states = [train.init_state(model, tx, ctx.x_grad, seed,
                             learning_rate=config.optimizer.learning_rate) for seed in seeds]
  state = jax.device_put(Seeds(jax.tree.map(lambda *a: jnp.stack(a), *states)), ctx.replicated)
  accuracy = make_accuracy(model, ctx, eval_batches)

  def evaluate(seeds_state: Seeds) -> dict:
    states = seeds_state.states
    record = _evaluation_record(accuracy(states.params, states.batch_stats))
    if norm != "plain" and int(seeds_state.step) == config.num_steps:
      # Pooled: the population statistics that the studies' recorded results hold.
      stats = recompute_statistics(model, ctx, sampler, states, config.renorm.recompute_batches,
                                   variance="pooled")
      record.update(_evaluation_record(accuracy(states.params, stats), prefix="recomputed_"))
    return record

  chunk = make_train_chunk(model, tx, ctx, sampler, seeds)
  result = train.run_loop(name, ctx, state, train.compile_ahead(chunk, state), evaluate,
                          _seeds_record)
  return result


def study(ctx: train.Context) -> dict:
  """Every (norm, group size) run of the config, one net per seed each."""
  config = ctx.config
  sampler = Sampler(config, ctx)
  eval_batches = sampler.eval_batches(ctx.x_test.shape[0])
  results, histories = {}, {}
  for name, norm, group_size in run_names(config):
    result = train_seeds(ctx, name, norm, group_size, sampler, eval_batches)
    results[name] = {**result, "norm": norm, "group_size": group_size}
    histories[name] = workdir_lib.read_metrics(ctx.workdir / "runs" / name)
  return {"results": results, "histories": histories}
