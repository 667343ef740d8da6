"""Batch renormalization: jaxbn.batch_norm(renorm=...) and the modules' renorm fields.

The analytic backward (the custom_vjp with γr) against JAX's autodiff of the literal
reference (`jaxbn.reference.batch_norm_reference(renorm=...)`, float64), with r and d inside
and at their clips, masks, the CPU kernels and pure JAX, across devices and in bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.checks import cases
from jaxbn import linen as jlinen
from jaxbn import nnx as jnnx
from jaxbn import reference

EPS = 1e-5
SHAPE = (6, 3)


def _inputs(seed=0, shape=SHAPE):
  """x, scale, bias, dy in NumPy float64: the tests fill and cast them in NumPy and hand them
  to jitted functions (outside jit every jnp op compiles a program of its own)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.array([1.0, 2.0, 0.5]) + np.array([0.3, -1.0, 2.0])
  return (x, rng.uniform(0.5, 2.0, shape[-1]), rng.standard_normal(shape[-1]),
          rng.standard_normal(shape))


# Running statistics chosen against the batch's (σ_B ≈ 1, 2, 0.5; μ_B ≈ 0.3, −1, 2):
# "inside" leaves every r, d unclipped; "clipped" pushes r above rmax, below rmin and d past
# ±dmax in different features.
RUNNING = {
    "inside": jaxbn.Renorm(mean=jax.device_put(np.array([0.0, -0.5, 2.2])),
                           var=jax.device_put(np.array([1.5, 3.0, 0.3])),
                           rmax=3.0, rmin=1 / 3, dmax=5.0),
    "clipped": jaxbn.Renorm(mean=jax.device_put(np.array([4.0, -0.5, -3.0])),
                            var=jax.device_put(np.array([0.01, 400.0, 0.3])),
                            rmax=2.0, rmin=0.5, dmax=1.0),
}


def _vjp(fn, x, g, b, dy):
  y, vjp = jax.vjp(fn, x, g, b)
  return y, vjp(dy)


def _padding_mask():
  return (np.arange(SHAPE[0]) < SHAPE[0] - 2)[:, None]


@functools.cache
def _reference_grads(where, masked):
  """The reference's y and VJP for one (running statistics, mask) case, jitted once and shared
  by the kernels and pure-JAX cases (x, NaN-padded or not, is an argument)."""
  fn = functools.partial(reference.batch_norm_reference, renorm=RUNNING[where],
                         mask=_padding_mask() if masked else None, epsilon=EPS)
  return jax.jit(lambda x, g, b, dy: _vjp(fn, x, g, b, dy))


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "nan-padded"])
@pytest.mark.parametrize("where", ["inside", "clipped"])
@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_analytic_matches_autodiff_of_the_reference(where, masked, use_cpu_kernel, host):
  x, g, b, dy = _inputs()
  renorm = RUNNING[where]
  mask = None
  if masked:
    mask = _padding_mask()
    x = np.where(mask, x, np.nan)
  analytic = functools.partial(jaxbn.batch_norm, renorm=renorm, mask=mask, epsilon=EPS,
                               use_cpu_kernel=use_cpu_kernel)

  @jax.jit  # y, the VJP and the statistics in one compilation
  def run(x, g, b, dy):
    y, vjp, stats = jax.vjp(analytic, x, g, b, has_aux=True)
    return y, vjp(dy), stats

  y, grads, stats = host(run(x, g, b, dy))
  y_ref, grads_ref = _reference_grads(where, masked)(x, g, b, dy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  for got, want in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert np.all(np.isfinite(grads[0]))
  if where == "inside":
    assert np.all(stats.r < renorm.rmax) and np.all(stats.r > renorm.rmin)
    assert np.all(np.abs(stats.d) < renorm.dmax)
  else:  # every clip is hit somewhere
    assert np.any(stats.r == renorm.rmax) and np.any(stats.r == renorm.rmin)
    assert np.any(stats.d == renorm.dmax) and np.any(stats.d == -renorm.dmax)


def test_renorm_is_bn_with_scale_gamma_r_and_bias_gamma_d_plus_beta(host):
  """The backward's premise: with r, d constant, renorm is BN with γr, γd + β; ∂L/∂γ then
  follows by the chain rule, r·Σdy·x̂ + d·Σdy."""
  x, g, b, dy = _inputs(1)
  r, d = np.array([0.5, 1.0, 2.0]), np.array([-0.3, 0.0, 0.7])
  (y, (dx, dg, db)), (y_bn, (dx_bn, dg_bn, db_bn)) = host(jax.jit(
      lambda x, g, b, dy, g2, b2: (  # one compilation for both
          _vjp(lambda *a: jaxbn.batch_norm(*a, renorm=jaxbn.RenormCorrection(r, d))[0],
               x, g, b, dy),
          _vjp(lambda x, g2, b2: jaxbn.batch_norm(x, g2, b2)[0], x, g2, b2, dy)))(
              x, g, b, dy, g * r, g * d + b))
  np.testing.assert_allclose(y, y_bn, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(dx, dx_bn, rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(dg, r * dg_bn + d * db_bn, rtol=1e-12)
  np.testing.assert_allclose(db, db_bn, rtol=1e-12)


def test_unclipped_renorm_trains_with_the_inference_normalization():
  """r, d unclipped: x̂ r + d = (x − μ)/σ, so the training output is batch_norm_inference's."""
  x, g, b, _ = _inputs(2)
  renorm = jaxbn.Renorm(mean=jax.device_put(np.array([0.1, 0.2, 0.3])),
                        var=jax.device_put(np.array([0.7, 2.0, 1.5])))

  @jax.jit  # the three calls in one compilation
  def run(x, g, b):
    return (*jaxbn.batch_norm(x, g, b, renorm=renorm),
            jaxbn.batch_norm_inference(x, renorm.mean, renorm.var, g, b),
            jaxbn.batch_norm(x, g, b)[1])

  y, stats, inferred, plain = run(x, g, b)
  np.testing.assert_allclose(y, inferred, rtol=1e-12, atol=1e-12)
  # ... and the statistics that running averages get are the batch's own, not corrected.
  np.testing.assert_allclose(stats.mean, plain.mean, rtol=1e-14)
  np.testing.assert_allclose(stats.var, plain.var, rtol=1e-14)


# Features spanning |μ| = 1e0 … 1e6 (both signs) × σ = 1e-2 … 1e1, one per (offset, σ).
F32_EPS = float(np.finfo(np.float32).eps)


def _offset_grid(seed=10):
  """float32 x over offsets 1e0-1e6 and σ 1e-2-1e1 with float32 running statistics that put
  r and d unclipped and of order 1, γ, β, and the float64 truth (r, d, the inference output)
  from the same float32 values: the inputs `jaxbn check`'s renorm-precision case uses, with
  other seeds."""
  return cases.precision_inputs(seed=seed)


@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_r_and_d_keep_the_digits_at_large_offsets(use_cpu_kernel, host):
  """d = (μ_B − μ)/σ is formed as ((hi − μ) + lo)/σ: μ_B rounded to one float32 first
  would lose |μ_B|/σ's worth of d's digits (d = 0 where the truth is 0.07 at 1e5, σ = 0.01).
  r and d are held to float32 rounding of the float64 truth, feature by feature."""
  x, mean, var, g, b, truth = _offset_grid()
  stats = host(jax.jit(lambda x: jaxbn.batch_norm(
      x, g, b, renorm=jaxbn.Renorm(mean, var), use_cpu_kernel=use_cpu_kernel)[1])(x))
  assert np.all(np.abs(truth["d"]) > 0.05)  # the grid's d are far from 0 and unclipped
  np.testing.assert_array_less(np.abs(stats.r - truth["r"]), 4 * F32_EPS * truth["r"])
  np.testing.assert_array_less(np.abs(stats.d - truth["d"]),
                               2 * F32_EPS * (np.abs(truth["d"]) + truth["r"]))


@pytest.mark.parametrize("use_cpu_kernel", [None, False], ids=["kernels", "pure-jax"])
def test_unclipped_renorm_equals_inference_at_large_offsets(use_cpu_kernel, host):
  """x̂ r + d = (x − μ)/σ holds in float32 too: renorm's output is batch_norm_inference's to
  float32 rounding of the float64 truth, at every offset and σ of the grid."""
  x, mean, var, g, b, truth = _offset_grid(11)
  y, inferred = host(jax.jit(lambda x: (
      jaxbn.batch_norm(x, g, b, renorm=jaxbn.Renorm(mean, var),
                       use_cpu_kernel=use_cpu_kernel)[0],
      jaxbn.batch_norm_inference(x, mean, var, g, b)))(x))
  size = np.max(np.abs(truth["y"]), axis=0)  # per feature
  for got in (y, inferred):
    np.testing.assert_array_less(np.max(np.abs(got - truth["y"]), axis=0), 4 * F32_EPS * size)
  np.testing.assert_array_less(np.max(np.abs(y - inferred), axis=0), 4 * F32_EPS * size)


def test_running_stats_equal_to_the_batch_give_plain_bn():
  x, g, b, _ = _inputs(3)

  @jax.jit  # both calls in one compilation
  def run(x, g, b):
    plain_y, plain = jaxbn.batch_norm(x, g, b)
    return plain_y, *jaxbn.batch_norm(x, g, b, renorm=jaxbn.Renorm(plain.mean, plain.var))

  plain_y, y, stats = run(x, g, b)
  np.testing.assert_allclose(stats.r, 1.0, rtol=1e-12)
  np.testing.assert_allclose(stats.d, 0.0, atol=1e-12)
  np.testing.assert_allclose(y, plain_y, rtol=1e-12, atol=1e-12)


def test_second_order_gradients_match_autodiff():
  x, g, b, dy = _inputs(4)
  renorm = RUNNING["clipped"]

  def hvp(gradient):
    loss = lambda x: jnp.sum(dy * jnp.sin(jaxbn.batch_norm(x, g, b, renorm=renorm,
                                                           gradient=gradient)[0]))
    return jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)

  analytic, autodiff = jax.jit(lambda: (hvp("analytic"), hvp("autodiff")))()  # one compile
  np.testing.assert_allclose(analytic, autodiff, rtol=1e-9, atol=1e-12)


def test_pooled_across_devices_equals_one_batch(mesh):
  """With axis_name, r and d come from the pooled statistics: the same as one big batch."""
  devices, per_device = 8, 2
  x, g, b, dy = _inputs(5, (devices * per_device, 3))
  renorm = RUNNING["clipped"]

  def loss(x, g, b):
    def inner(x, g, b, dy):
      y, stats = jaxbn.batch_norm(x, g, b, renorm=renorm, axis_name="data")
      return jax.lax.psum(jnp.sum(dy * y), "data"), stats
    return jax.shard_map(inner, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                         out_specs=(P(), P()))(x, g, b, dy)

  one = lambda x, g, b: jnp.sum(dy * jaxbn.batch_norm(x, g, b, renorm=renorm)[0])
  ((value, stats), grads), want_value, want_grads, want_stats = jax.jit(lambda x, g, b: (
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, g, b),  # one compilation
      *jax.value_and_grad(one, argnums=(0, 1, 2))(x, g, b),
      jaxbn.batch_norm(x, g, b, renorm=renorm)[1]))(x, g, b)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  for field in ("mean", "var", "r", "d"):
    np.testing.assert_allclose(getattr(stats, field), getattr(want_stats, field), rtol=1e-12)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_bfloat16_within_bfloat16_rounding_of_float64(host):
  x, g, b, dy = _inputs(6)
  renorm = RUNNING["inside"]
  x16 = x.astype(jnp.bfloat16)
  g32, b32 = g.astype(np.float32), b.astype(np.float32)
  (y, (dx, _, _)), (y64, (dx64, _, _)) = jax.jit(lambda low, high: (  # one compilation
      _vjp(lambda *a: jaxbn.batch_norm(*a, renorm=renorm)[0], *low),
      _vjp(functools.partial(reference.batch_norm_reference, renorm=renorm), *high)))(
          (x16, g32, b32, dy.astype(jnp.bfloat16)),
          (x16.astype(np.float64), g32.astype(np.float64), b32.astype(np.float64),
           dy.astype(jnp.bfloat16).astype(np.float64)))
  assert y.dtype == jnp.bfloat16
  y, dx, y64, dx64 = host((y, dx, y64, dx64))
  bf16_eps = 2.0**-8
  assert np.max(np.abs(y.astype(np.float64) - y64)) <= 2 * bf16_eps * np.max(np.abs(y64))
  assert np.max(np.abs(dx.astype(np.float64) - dx64)) <= 4 * bf16_eps * np.max(np.abs(dx64))


@pytest.mark.parametrize("field, value, message", [
    ("rmax", 0.5, "rmax=0.5 must be >= 1"),
    ("rmin", 1.5, "rmin=1.5 must be in"),
    ("dmax", -1.0, "dmax=-1.0 must be >= 0"),
    ("rmax", float("nan"), "rmax is NaN"),
])
def test_bad_clipping_raises_at_trace_time(field, value, message):
  x, g, b, _ = _inputs()
  renorm = RUNNING["inside"]._replace(**{field: value})
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda x: jaxbn.batch_norm(x, g, b, renorm=renorm)[0]).lower(x)


def test_bad_renorm_arguments_name_themselves():
  x, g, b = map(jax.device_put, _inputs()[:3])
  zeros, ones = (jax.device_put(np.full(n, v)) for n, v in ((3, 0.0), (4, 1.0)))
  with pytest.raises(ValueError, match="renorm.var has shape"):
    jaxbn.batch_norm(x, g, b, renorm=jaxbn.Renorm(zeros, ones))
  with pytest.raises(ValueError, match="renorm.r has shape"):
    jaxbn.batch_norm(x, g, b, renorm=jaxbn.RenormCorrection(jax.device_put(np.ones(2)), zeros))
  with pytest.raises(TypeError, match="renorm must be a jaxbn.Renorm"):
    jaxbn.batch_norm(x, g, b, renorm=(zeros, jax.device_put(np.ones(3))))


# ----------------------------------------------------------------------------------------
# Modules.

CLIP = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}


def test_linen_renorm_state_train_and_eval(host):
  x = _inputs(7, (8, 3))[0].astype(np.float32)
  bn = jlinen.BatchNorm(momentum=0.9, renorm=True, renorm_clipping=CLIP, renorm_momentum=0.5)

  @jax.jit  # the module's init, training and eval calls and the functions, in one compilation
  def run(x):
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    new = updates["batch_stats"]
    want = jaxbn.batch_norm(x, renorm=jaxbn.Renorm(jnp.zeros(3, jnp.float32),
                                                   jnp.ones(3, jnp.float32), 3.0, 1 / 3, 5.0))[0]
    y_eval = bn.apply({"params": variables["params"], **updates}, x, use_running_average=True)
    return (variables, y, updates, jaxbn.batch_norm(x)[1], want, y_eval,
            jaxbn.batch_norm_inference(x, new["mean"], new["var"]))

  variables, y, updates, batch, want, y_eval, inferred = host(run(x))
  stats = variables["batch_stats"]
  assert set(stats) == {"mean", "var", "renorm_mean", "renorm_var"}
  # The two running averages: `momentum` for inference, `renorm_momentum` for r and d.
  new = updates["batch_stats"]
  np.testing.assert_allclose(new["mean"], 0.1 * batch.mean, rtol=1e-6)
  np.testing.assert_allclose(new["renorm_mean"], 0.5 * batch.mean, rtol=1e-6)
  np.testing.assert_allclose(new["renorm_var"], 0.5 + 0.5 * batch.var, rtol=1e-6)
  # Training output: γ = 1, β = 0 and r, d from the initial renorm statistics (0, 1).
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y_eval, inferred, rtol=1e-6, atol=1e-6)


def test_warmup_relaxes_the_clipping_linearly(host):
  """Step 0: rmax = rmin = 1, dmax = 0 (plain BN); step T/2: halfway; step ≥ T: as given."""
  steps = 4
  x = jax.device_put(_inputs(8, (8, 3))[0].astype(np.float32) * 3 + 2)  # far from (0, 1)
  bn = jnnx.BatchNorm(3, renorm=True, renorm_clipping=CLIP, renorm_warmup_steps=steps,
                      rngs=nnx.Rngs(0))
  # One compilation each for every step: nnx.jit writes the module's new state back, and the
  # expected clipping goes in as operands.
  call = nnx.jit(lambda bn, x: bn(x))
  batch_norm = jax.jit(lambda x, scale, bias, mean, var, clipping: jaxbn.batch_norm(
      x, scale, bias, renorm=jaxbn.Renorm(mean, var, *clipping)))
  seen = []
  for _ in range(steps + 1):
    clip_at = np.asarray(bn.renorm_steps[...])
    clipping = tuple(np.float32(v) for v in (1 + 2.0 * min(clip_at / steps, 1),
                                             1 - (2 / 3) * min(clip_at / steps, 1),
                                             5.0 * min(clip_at / steps, 1)))
    want = batch_norm(x, bn.scale[...], bn.bias[...], bn.renorm_mean[...], bn.renorm_var[...],
                      clipping)
    np.testing.assert_allclose(call(bn, x), want[0], rtol=1e-6, atol=1e-6)
    seen.append(host(want[1]))
  assert int(bn.renorm_steps[...]) == steps + 1
  np.testing.assert_allclose(seen[0].r, 1.0)
  np.testing.assert_allclose(seen[0].d, 0.0)
  assert np.any(seen[-1].r > 1.5)  # relaxed: the correction now acts


def test_nnx_and_linen_renorm_agree_over_steps():
  x = _inputs(9, (8, 3))[0].astype(np.float32)
  kwargs = dict(momentum=0.8, renorm=True, renorm_clipping=CLIP, renorm_momentum=0.7,
                renorm_warmup_steps=2)
  lin = jlinen.BatchNorm(**kwargs)
  variables = jax.jit(lambda x: lin.init(jax.random.key(0), x, use_running_average=False))(x)
  mod = jnnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))
  # Each call compiled once for every step; nnx.jit writes the module's new state back.
  apply = jax.jit(functools.partial(lin.apply, use_running_average=False,
                                    mutable=["batch_stats"]))
  call = nnx.jit(lambda mod, x: mod(x))
  for step in range(3):
    y_lin, updates = apply(variables, x * (step + 1))
    variables = {"params": variables["params"], **updates}
    np.testing.assert_allclose(call(mod, x * (step + 1)), y_lin, rtol=1e-6, atol=1e-6)
  for name, value in variables["batch_stats"].items():
    np.testing.assert_allclose(getattr(mod, name)[...], value, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(renorm=True, renorm_clipping={"rmax": 0.5}), "rmax=0.5 must be >= 1"),
    (dict(renorm=True, renorm_clipping={"rmin": 2}), "rmin=2.0 must be in"),
    (dict(renorm=True, renorm_clipping={"dmax": -1}), "dmax=-1.0 must be >= 0"),
    (dict(renorm=True, renorm_clipping={"r_max": 3}), "unknown keys \\['r_max'\\]"),
    (dict(renorm_clipping={"rmax": 3}), "renorm_clipping=.* is set but renorm=False"),
    (dict(renorm=True, renorm_warmup_steps=5), "must then be finite"),
    (dict(renorm=True, renorm_momentum=1.5), "renorm_momentum must be"),
    (dict(renorm=True, renorm_clipping=CLIP, renorm_warmup_steps=2**31),
     "renorm_warmup_steps=2147483648 is past what the int32 clock counts"),
])
def test_module_errors_name_the_field(kwargs, message):
  x = jax.device_put(np.ones((4, 3), np.float32))
  with pytest.raises(ValueError, match=message):
    jlinen.BatchNorm(**kwargs).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match=message):
    jnnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(renorm="yes"), "renorm must be a bool, got 'yes'"),
    (dict(renorm=1), "renorm must be a bool, got 1"),
    (dict(renorm=True, renorm_clipping={"rmax": "3"}), "renorm_clipping:rmax must be a real "
                                                        "scalar, got '3'"),
    (dict(renorm=True, renorm_clipping={"dmax": True}), "renorm_clipping:dmax must be a real "
                                                         "scalar, got True"),
    (dict(renorm=True, renorm_momentum="0.9"), "renorm_momentum must be a real number"),
    (dict(renorm=True, renorm_clipping=CLIP, renorm_warmup_steps="5"),
     "renorm_warmup_steps must be an int"),
    (dict(renorm=True, renorm_clipping=CLIP, renorm_warmup_steps=5.0),
     "renorm_warmup_steps must be an int"),
])
def test_module_type_errors_name_the_field(kwargs, message):
  """A string (or another type) where a bool, a real or an int is meant is refused, not
  read by truthiness or float(): renorm="no" would switch renorm on."""
  x = jax.device_put(np.ones((4, 3), np.float32))
  with pytest.raises(TypeError, match=message):
    jlinen.BatchNorm(**kwargs).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(TypeError, match=message):
    jnnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))


def test_string_clips_are_refused_by_the_function():
  x, g, b, _ = _inputs()
  for field, value in (("rmax", "3"), ("rmin", "0.5"), ("dmax", "2")):
    renorm = RUNNING["inside"]._replace(**{field: value})
    with pytest.raises(TypeError, match=f"renorm.{field} must be a real scalar, got '{value}'"):
      jax.jit(lambda x: jaxbn.batch_norm(x, g, b, renorm=renorm)[0]).lower(x)


def test_numpy_scalars_from_a_config_are_accepted(host):
  """NumPy bools, integers and floats (what a config file loaded with NumPy holds) mean what
  the Python ones do."""
  x = jax.device_put(_inputs(12, (8, 3))[0].astype(np.float32))
  plain = dict(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.5, "dmax": 2.0},
               renorm_momentum=0.75, renorm_warmup_steps=4)
  numpy = dict(renorm=np.bool_(True),
               renorm_clipping={"rmax": np.float32(3), "rmin": np.float64(0.5),
                                "dmax": np.int64(2)},
               renorm_momentum=np.float32(0.75), renorm_warmup_steps=np.int64(4))

  @jax.jit
  def linen(x):
    outputs = []
    for kwargs in (plain, numpy):
      bn = jlinen.BatchNorm(**kwargs)
      variables = bn.init(jax.random.key(0), x, use_running_average=False)
      outputs.append(bn.apply(variables, x + 1, use_running_average=False,
                              mutable=["batch_stats"]))
    return outputs

  (y, updates), (y_numpy, updates_numpy) = host(linen(x))
  np.testing.assert_array_equal(y_numpy, y)
  for name, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(updates_numpy["batch_stats"][name], value)
  call = nnx.jit(lambda mod, x: mod(x))
  mods = [jnnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0)) for kwargs in (plain, numpy)]
  np.testing.assert_array_equal(call(mods[1], x), call(mods[0], x))


@pytest.mark.parametrize("rmax, rmin, dmax, nan", [
    (1.5, 2.0, 1.0, "r"),  # rmin > rmax: jnp.clip would give r = rmax
    (0.5, 0.2, 1.0, "r"),  # rmax < 1
    (3.0, -0.5, 1.0, "r"),  # rmin < 0
    (3.0, 0.5, -1.0, "d"),  # dmax < 0: jnp.clip would give d = -dmax
    (3.0, 1 / 3, 5.0, None),
])
def test_traced_clips_outside_their_ranges_give_nan(rmax, rmin, dmax, nan, host):
  """Traced clips cannot be checked when the call is traced: a range that excludes r = 1 or
  d = 0 gives NaN r (or d), and so NaN outputs, instead of a silently clipped correction."""
  x, g, b, _ = _inputs(13)
  running = RUNNING["clipped"]
  run = jax.jit(lambda x, rmax, rmin, dmax: jaxbn.batch_norm(
      x, g, b, renorm=running._replace(rmax=rmax, rmin=rmin, dmax=dmax)))
  y, stats = host(run(x, rmax, rmin, dmax))
  if nan is None:  # valid traced clips clip as static ones do
    want_y, want = host(jax.jit(lambda x: jaxbn.batch_norm(
        x, g, b, renorm=running._replace(rmax=rmax, rmin=rmin, dmax=dmax)))(x))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(stats.r, want.r)
    np.testing.assert_array_equal(stats.d, want.d)
    return
  other = "d" if nan == "r" else "r"
  assert np.all(np.isnan(getattr(stats, nan)))
  assert np.all(np.isfinite(getattr(stats, other)))
  assert np.all(np.isnan(y))


@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_warmup_clock_saturates_instead_of_wrapping(module):
  """The int32 warm-up clock stops at 2**31 − 1: wrapped to −2**31 it would set
  rmax = 1 + (rmax − 1)·(−2**31/T) < 1 and invert the clipping. Saturated, the clipping
  stays the full one."""
  top = np.iinfo(np.int32).max
  x = jax.device_put(_inputs(14, (8, 3))[0].astype(np.float32) * 3 + 2)  # far from (0, 1)
  kwargs = dict(renorm=True, renorm_clipping=CLIP, renorm_warmup_steps=4)
  full = jax.jit(lambda x, scale, bias, mean, var: jaxbn.batch_norm(
      x, scale, bias, renorm=jaxbn.Renorm(mean, var, **CLIP))[0])
  if module == "linen":
    bn = jlinen.BatchNorm(**kwargs)
    variables = jax.jit(lambda x: bn.init(jax.random.key(0), x, use_running_average=False))(x)
    variables["batch_stats"]["renorm_steps"] = jnp.asarray(top - 1, jnp.int32)
    apply = jax.jit(functools.partial(bn.apply, use_running_average=False,
                                      mutable=["batch_stats"]))
    for step in range(3):
      stats = variables["batch_stats"]
      want = full(x, variables["params"]["scale"], variables["params"]["bias"],
                  stats["renorm_mean"], stats["renorm_var"])
      y, updates = apply(variables, x)
      np.testing.assert_array_equal(y, want)
      assert int(updates["batch_stats"]["renorm_steps"]) == top, step
      variables = {"params": variables["params"], **updates}
  else:
    bn = jnnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))
    bn.renorm_steps[...] = jnp.asarray(top - 1, jnp.int32)
    call = nnx.jit(lambda bn, x: bn(x))
    for step in range(3):
      want = full(x, bn.scale[...], bn.bias[...], bn.renorm_mean[...], bn.renorm_var[...])
      np.testing.assert_array_equal(call(bn, x), want)
      assert int(bn.renorm_steps[...]) == top, step
