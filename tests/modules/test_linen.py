"""jaxbn.linen.BatchNorm: a drop-in for flax.linen.BatchNorm."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import jaxbn.linen


@dataclasses.dataclass(frozen=True)
class Config:
  shape: tuple[int, ...] = (8, 5)
  axis: int | tuple[int, ...] = -1
  masked: bool = False
  use_bias: bool = True
  use_scale: bool = True
  use_fast_variance: bool = True
  x_dtype: str = "float32"
  momentum: float = 0.99


CONFIGS = {
    "dense": Config(),
    "dense-two-pass": Config(use_fast_variance=False),
    "nhwc": Config(shape=(2, 3, 3, 4)),
    "nchw": Config(shape=(2, 4, 3, 3), axis=1),
    "two-axes": Config(shape=(6, 2, 3), axis=(1, 2), use_fast_variance=False),
    "masked": Config(masked=True),
    "masked-nhwc-two-pass": Config(shape=(3, 2, 2, 4), masked=True, use_fast_variance=False),
    "no-bias": Config(use_bias=False),
    "no-scale-no-bias": Config(use_scale=False, use_bias=False),
    "bf16-input": Config(x_dtype="bfloat16"),
    "momentum-0.5": Config(momentum=0.5, use_fast_variance=False),
}


def _modules(config):
  kwargs = dict(axis=config.axis, momentum=config.momentum, use_bias=config.use_bias,
                use_scale=config.use_scale, use_fast_variance=config.use_fast_variance)
  return nn.BatchNorm(**kwargs), jaxbn.linen.BatchNorm(**kwargs)


def _data(config, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(config.shape).astype(np.float32) * 2 + 1
  w = rng.standard_normal(config.shape).astype(np.float32)
  mask = None
  if config.masked:
    mask = (np.arange(config.shape[0]) < config.shape[0] - 2).reshape(
        (-1,) + (1,) * (len(config.shape) - 1))
    w = w * mask  # parity is judged at unmasked positions
  return jnp.asarray(x, config.x_dtype), jnp.asarray(w), None if mask is None else jnp.asarray(mask)


def _init(module, x, key=0, **kwargs):
  """module.init under jit: one compilation, where an eager init compiles every operation of
  the forward pass it runs (most of this file's cost before)."""
  return jax.jit(functools.partial(module.init, **kwargs))(jax.random.key(key), x)


def _random_params(variables, seed=1):
  """Non-trivial γ, β so that parity says something about them."""
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.uniform(0.5, 2, v.shape), v.dtype)
            for k, v in variables.get("params", {}).items()}
  return {**variables, "params": params} if params else variables


def _train_step(module, variables, x, w, mask):
  """Output, updated batch_stats and the gradients wrt params and x of Σ w·y."""
  def loss(params, x):
    y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                              mask=mask, mutable=["batch_stats"])
    return jnp.sum(w * y.astype(jnp.float32)), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables.get("params", {}), x)
  return y, stats, grads


def _tree_allclose(got, want, **tolerance):
  """Leaf by leaf; a bfloat16 leaf (e.g. ∂L/∂x of bf16 x) is judged at two bf16 ulps."""
  def check(a, b):
    tol = dict(rtol=2 ** -7, atol=2 ** -7) if a.dtype == jnp.bfloat16 else tolerance
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **tol)
  jax.tree.map(check, got, want)


def _signature(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_flax(name):
  config = CONFIGS[name]
  flax_bn, jaxbn_bn = _modules(config)
  x, w, mask = _data(config)
  with jax.numpy_dtype_promotion("standard"):  # Flax itself relies on implicit promotion
    flax_vars = _random_params(_init(flax_bn, x, use_running_average=False))
    ours_vars = _init(jaxbn_bn, x, use_running_average=False)
    assert _signature(ours_vars) == _signature(flax_vars)
    ours_vars = _random_params(ours_vars)

    @jax.jit  # one compilation per config: both modules' train steps, then their evals
    def run(flax_vars, ours_vars, x):
      results = []
      for bn, variables in ((flax_bn, flax_vars), (jaxbn_bn, ours_vars)):
        y, stats, grads = _train_step(bn, variables, x, w, mask)
        y_eval = bn.apply({**variables, "batch_stats": stats}, x, use_running_average=True)
        results.append((y, stats, grads, y_eval))
      return results

    ((y_flax, stats_flax, grads_flax, y_eval_flax),
     (y_ours, stats_ours, grads_ours, y_eval_ours)) = run(flax_vars, ours_vars, x)

  assert y_ours.dtype == y_flax.dtype and y_eval_ours.dtype == y_eval_flax.dtype
  keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(y_ours)[keep], np.asarray(y_flax)[keep], **tol)
  _tree_allclose(stats_ours, stats_flax, **tol)
  _tree_allclose(grads_ours[0], grads_flax[0], **tol)
  _tree_allclose(grads_ours[1], grads_flax[1], **tol)
  np.testing.assert_allclose(y_eval_ours, y_eval_flax, **tol)
  assert _signature(stats_ours) == _signature(stats_flax)


@pytest.mark.slow
def test_nan_padding_keeps_jaxbn_finite_where_flax_is_not():
  config = CONFIGS["masked"]
  flax_bn, jaxbn_bn = _modules(config)
  x, w, mask = _data(config)
  x = jnp.where(mask, x, jnp.nan)
  with jax.numpy_dtype_promotion("standard"):
    variables = _random_params(_init(flax_bn, x, use_running_average=False))
    _, _, flax_grads = _train_step(flax_bn, variables, x, w, mask)
    y, stats, grads = _train_step(jaxbn_bn, variables, x, w, mask)
  assert not np.all(np.isfinite(flax_grads[0]["scale"]))  # what this test guards against
  for leaf in jax.tree.leaves((y, stats, grads)):
    assert np.all(np.isfinite(leaf))


def test_flax_checkpoint_restores_into_jaxbn():
  config = CONFIGS["nhwc"]
  flax_bn, jaxbn_bn = _modules(config)
  x, w, _ = _data(config)
  with jax.numpy_dtype_promotion("standard"):
    flax_vars = _random_params(_init(flax_bn, x, use_running_average=False))
    _, stats, _ = jax.jit(lambda v, x: _train_step(flax_bn, v, x, w, None))(flax_vars, x)
    trained = {**flax_vars, "batch_stats": stats}
    template = _init(jaxbn_bn, x, key=1, use_running_average=False)
    restored = serialization.from_bytes(template, serialization.to_bytes(trained))
    ours, theirs = jax.jit(lambda restored, trained, x: (  # one compilation for both evals
        jaxbn_bn.apply(restored, x, use_running_average=True),
        flax_bn.apply(trained, x, use_running_average=True)))(restored, trained, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_no_update_during_init_and_axis_name_ignored():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32) + 3
  bn = jaxbn.linen.BatchNorm(axis_name="batch")  # no "batch" axis exists here
  variables = _init(bn, x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1)


def test_unbiased_running_variance_and_cumulative_average():
  rng = np.random.default_rng(2)
  batches = [jnp.asarray(rng.standard_normal((5, 3)) * (i + 1) + i, jnp.float32)
             for i in range(3)]
  bn = jaxbn.linen.BatchNorm(momentum=None, unbiased_running_var=True, use_fast_variance=False)
  variables = _init(bn, batches[0], use_running_average=False)
  assert variables["batch_stats"]["count"] == 0
  train = jax.jit(functools.partial(bn.apply, use_running_average=False, mutable=["batch_stats"]))
  for x in batches:
    _, updates = train(variables, x)
    variables = {**variables, **updates}
  stats = variables["batch_stats"]
  # PyTorch's momentum=None: the plain average over batches of mean and unbiased variance.
  np.testing.assert_allclose(stats["mean"], np.mean([b.mean(0) for b in batches], 0), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], np.mean([np.var(b, 0, ddof=1) for b in batches], 0),
                             rtol=1e-5)
  assert stats["count"] == 3


def test_gradient_attribute_selects_the_backward():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 3)), jnp.float32)
  with pytest.raises(TypeError, match="custom_vjp"):
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    v = _init(bn, x)
    jax.jvp(lambda x: bn.apply(v, x, mutable=["batch_stats"])[0], (x,), (x,))
  bn = jaxbn.linen.BatchNorm(use_running_average=False, gradient="autodiff")
  v = _init(bn, x)
  jax.jit(lambda x: jax.jvp(lambda x: bn.apply(v, x, mutable=["batch_stats"])[0], (x,), (x,)))(x)


# ---------------------------------------------------------------------------- bad input

X = jnp.ones((4, 3), jnp.float32).at[0].set(2.0)


@pytest.fixture(scope="module")
def trained():
  bn = jaxbn.linen.BatchNorm()
  return bn, _init(bn, X, use_running_average=False)


def test_missing_batch_stats_is_an_error(trained):
  bn, variables = trained
  with pytest.raises(ValueError, match="batch_stats/mean is missing"):
    bn.apply({"params": variables["params"]}, X, use_running_average=False,
             mutable=["batch_stats"])


def test_misshaped_variable_is_an_error(trained):
  bn, variables = trained
  bad = {**variables, "batch_stats": {**variables["batch_stats"], "var": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"batch_stats/var has shape \(4,\)"):
    bn.apply(bad, X, use_running_average=True)


def test_feature_size_change_is_an_error(trained):
  bn, variables = trained
  with pytest.raises(ValueError, match=r"has shape \(3,\) but x's feature axes have shape \(5,\)"):
    bn.apply(variables, jnp.ones((4, 5)), use_running_average=False, mutable=["batch_stats"])


def test_use_running_average_twice_is_an_error(trained):
  _, variables = trained
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn.linen.BatchNorm(use_running_average=True).apply(
        variables, X, use_running_average=False)


def test_complex_input_points_to_flax(trained):
  bn, variables = trained
  with pytest.raises(TypeError, match="flax.linen.BatchNorm"):
    bn.apply(variables, X.astype(jnp.complex64), use_running_average=True)


def test_unseen_features_keep_their_running_statistics():
  bn = jaxbn.linen.BatchNorm(momentum=0.5, unbiased_running_var=True)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 3)), jnp.float32)
  variables = _init(bn, x, use_running_average=False)
  variables = {**variables, "batch_stats": {"mean": jnp.full(3, 5.0, jnp.float32),
                                            "var": jnp.full(3, 2.0, jnp.float32)}}
  # feature 0: all padding; feature 1: one value (no unbiased variance); feature 2: four.
  mask = jnp.asarray([[False, True, True]] + [[False, False, True]] * 3)
  _, updates = jax.jit(lambda variables, x: bn.apply(
      variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]))(variables, x)
  stats = updates["batch_stats"]
  assert stats["mean"][0] == 5.0 and stats["var"][0] == 2.0
  assert stats["mean"][1] == 0.5 * 5.0 + 0.5 * x[0, 1] and stats["var"][1] == 2.0
  np.testing.assert_allclose(stats["var"][2], 0.5 * 2.0 + 0.5 * np.var(x[:, 2], ddof=1),
                             rtol=1e-5)


def test_init_with_one_example_and_masked_eval_outputs():
  bn = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = _init(bn, jnp.ones((1, 6), jnp.float32))  # as Flax allows
  assert variables["params"]["scale"].shape == (6,)
  x = jnp.ones((4, 6), jnp.float32).at[3].set(jnp.nan)
  mask = (jnp.arange(4) < 3)[:, None]
  y = jax.jit(lambda variables, x: jaxbn.linen.BatchNorm().apply(
      variables, x, use_running_average=True, mask=mask))(variables, x)
  np.testing.assert_array_equal(y[3], 0)
  assert np.all(np.isfinite(y))


# ------------------------------------------------------------- Flax's semantics, pinned


def test_batch_of_one_value_per_feature_matches_flax():
  # Flax's own tests init on a (3,) input and train on (1, F) batches (ensembles under
  # nnx.vmap, shape inference): σ² = 0, so y = β, and the running statistics move as Flax's.
  flax_bn, ours = (cls(use_running_average=False, momentum=0.9)
                   for cls in (nn.BatchNorm, jaxbn.linen.BatchNorm))
  x = jnp.array([0.0, 1.0, 2.0], jnp.float32)
  (y_flax, v_flax), (y_ours, v_ours) = (jax.jit(bn.init_with_output)(jax.random.key(0), x)
                                        for bn in (flax_bn, ours))
  np.testing.assert_array_equal(y_ours, y_flax)  # [0, 0, 0], not x
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_flax)
  variables = {**v_ours, "params": {"scale": jnp.full(3, 2.0, jnp.float32),
                                    "bias": jnp.array([0.5, -1.0, 3.0], jnp.float32)}}
  (y_flax, s_flax), (y_ours, s_ours) = (
      jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))(variables, x[None] * 7)
      for bn in (flax_bn, ours))
  np.testing.assert_array_equal(y_ours, y_flax)
  np.testing.assert_array_equal(y_ours[0], variables["params"]["bias"])
  jax.tree.map(np.testing.assert_array_equal, s_ours, s_flax)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply({**variables, "params": p}, x[None],
                                                        mutable=["batch_stats"])[0] ** 2)))(
      variables["params"])
  np.testing.assert_array_equal(grads["scale"], 0)  # Σ dy·x̂ with x̂ = 0
  np.testing.assert_array_equal(grads["bias"], 2 * variables["params"]["bias"])


class _Reused(nn.Module):
  """One BatchNorm applied twice: summaries must list the reuse."""

  cls: type

  @nn.compact
  def __call__(self, x):
    bn = self.cls(use_running_average=False)
    return bn(nn.Dense(3)(bn(x)))


def test_tabulate_with_every_flag_matches_flax():
  # _batch_stat/_param were wrapped as module methods, and nn.tabulate's interceptors then
  # called them outside the compact scope: "Variables must be initialized in setup()...".
  tables = [nn.tabulate(_Reused(cls), jax.random.key(0), show_repeated=True,
                        compute_flops=True, compute_vjp_flops=True,
                        console_kwargs={"width": 240})(jnp.ones((4, 3), jnp.float32))
            for cls in (nn.BatchNorm, jaxbn.linen.BatchNorm)]
  tables = [re.sub(r"\x1b\[[0-9;]*m", "", table) for table in tables]  # rich's styles
  # The same rows: path, module, shapes, variables; only the FLOP columns may differ.
  rows = [[[cell.strip() for i, cell in enumerate(line.split("│")) if i not in (5, 6)]
           for line in table.splitlines() if line.startswith("│")]
          for table in tables]
  assert rows[0] == rows[1]
  assert sum("BatchNorm" in row[2] for row in rows[1]) == 2  # the reuse is listed
  assert any("mean: float32[3]" in cell for row in rows[1] for cell in row)


def test_the_batch_count_saturates_instead_of_wrapping():
  """momentum=None weighs the batch by 1/count: an int32 count that wrapped to −2**31 would
  weigh it by a negative number. Stopped at 2**31 − 1, the average keeps moving by 1/count."""
  top = np.iinfo(np.int32).max
  x = jax.device_put(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
  bn = jaxbn.linen.BatchNorm(momentum=None)
  variables = jax.jit(lambda x: bn.init(jax.random.key(0), x, use_running_average=False))(x)
  variables["batch_stats"]["count"] = jnp.asarray(top - 1, jnp.int32)
  apply = jax.jit(functools.partial(bn.apply, use_running_average=False, mutable=["batch_stats"]))
  for step in range(2):
    _, updates = apply(variables, x)
    stats = updates["batch_stats"]
    assert int(stats["count"]) == top, step
    old = np.asarray(variables["batch_stats"]["mean"], np.float64)
    want = old + (np.asarray(x, np.float64).mean(0) - old) / top
    np.testing.assert_allclose(stats["mean"], want, rtol=1e-6)
    variables = {"params": variables["params"], **updates}
