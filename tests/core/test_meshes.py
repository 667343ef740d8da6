"""The CPU kernels on a mesh: never where XLA would gather a sharded batch onto every device.

XLA cannot partition a custom call, so a kernel call under jit with x sharded on an
auto-mode mesh (invisible at trace time) must compile to its pure-JAX twin, which XLA
partitions; inside shard_map each device runs the kernels on its own rows; on one device the
kernels run. Each test compiles once, at the 8 host devices of conftest.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

DEVICES = 8
SHAPE = (64, 4, 4, 16)  # NHWC, 8 examples per device
FUSED = ["jaxbn_backward", "jaxbn_forward"]
PASSES = ["jaxbn_grad_input", "jaxbn_grad_sums", "jaxbn_moments", "jaxbn_normalize"]


def _targets(text: str) -> list[str]:
  """The jaxbn custom-call targets in compiled HLO or lowered StableHLO text."""
  return sorted(set(re.findall(r'(?:custom_call_target="|custom_call @)(jaxbn_\w+)', text)))


def _gathered_sizes(hlo: str) -> list[int]:
  """Element counts of every all-gather's result in compiled HLO."""
  sizes = []
  for line in hlo.splitlines():
    match = re.search(r"= \(?\w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
    if match:
      sizes.append(int(np.prod([int(n) for n in match[1].split(",") if n])))
  return sizes


@pytest.fixture(scope="module")
def batch():
  """x, scale, bias, dy in NumPy float32: jax.device_put places them (on one device or
  sharded) without compiling, where jnp.asarray or slicing a device array would."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(SHAPE) * 2 + 1).astype(np.float32)
  dy = rng.standard_normal(SHAPE).astype(np.float32)
  scale = rng.uniform(0.5, 2, SHAPE[-1]).astype(np.float32)
  bias = rng.standard_normal(SHAPE[-1]).astype(np.float32)
  return x, scale, bias, dy


def _train_step(x, scale, bias, dy, use_cpu_kernel=None):
  """Forward and gradient of a BN layer: (loss, statistics, (dx, dγ, dβ))."""
  def loss(x, scale, bias):
    y, stats = jaxbn.batch_norm(x, scale, bias, use_cpu_kernel=use_cpu_kernel)
    return jnp.sum(y * dy), stats
  (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias)
  return value, stats, grads


def test_sharded_jit_partitions_the_twins_and_one_device_runs_the_kernels(mesh, batch):
  x, scale, bias, dy = batch
  single = jax.jit(_train_step).lower(x, scale, bias, dy).compile()
  assert _targets(single.as_text()) == FUSED

  shard, replicate = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = (jax.device_put(x, shard), jax.device_put(scale, replicate),
          jax.device_put(bias, replicate), jax.device_put(dy, shard))
  sharded = jax.jit(_train_step).lower(*args).compile()
  hlo = sharded.as_text()
  assert _targets(hlo) == []
  # Statistics and Σdy, Σdy·x̂ are all-reduced; nothing of x's size moves between devices.
  assert not [n for n in _gathered_sizes(hlo) if n >= x.size // DEVICES], _gathered_sizes(hlo)
  assert "all-reduce" in hlo

  got, want = sharded(*args), single(x, scale, bias, dy)
  assert len(got[2][0].sharding.device_set) == DEVICES  # dx stays sharded
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * float(np.max(np.abs(np.asarray(w)))))


def test_sharded_jit_of_masked_nchw_gathers_nothing(mesh, batch):
  # The twins view x as (outer, C, inner) and the mask flat: XLA still partitions them.
  x = np.transpose(batch[0], (0, 3, 1, 2))
  mask = np.random.default_rng(1).random((x.shape[0], 1) + x.shape[2:]) > 0.3

  def step(x, mask):
    return jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, axis=1, mask=mask)[0] ** 3))(x)

  shard = NamedSharding(mesh, P("data"))
  hlo = jax.jit(step).lower(jax.device_put(x, shard), jax.device_put(mask, shard)).compile()
  hlo = hlo.as_text()
  assert _targets(hlo) == []
  assert not [n for n in _gathered_sizes(hlo) if n >= x.size // DEVICES], _gathered_sizes(hlo)


def test_shard_map_runs_the_kernels_per_device(mesh, batch):
  x, scale, bias, dy = batch

  def per_device(x, scale, bias, dy):
    y, vjp = jax.vjp(lambda *a: jaxbn.batch_norm(*a, axis_name="data")[0], x, scale, bias)
    return y, vjp(dy)

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                               out_specs=(P("data"), (P("data"), P(), P()))))
  assert _targets(step.lower(x, scale, bias, dy).compile().as_text()) == PASSES


def test_shard_map_over_part_of_the_mesh_keeps_the_twins(batch):
  # Manual over "data" only: "model" is still XLA's to partition, so x may be split there.
  mesh = Mesh(np.array(jax.devices()[:DEVICES]).reshape(4, 2), ("data", "model"))
  x, scale, bias, dy = batch

  def per_device(x, scale, bias):
    return jaxbn.batch_norm(x, scale, bias, axis_name="data")[0]

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P()),
                               out_specs=P("data"), axis_names={"data"}))
  assert _targets(step.lower(x, scale, bias).as_text()) == []


def test_use_cpu_kernel_true_forces_the_kernels_under_a_sharded_jit(mesh, batch):
  # The caller asserts x is not split: the custom calls are emitted (and XLA gathers x).
  x, scale, bias, dy = batch
  shard = NamedSharding(mesh, P("data"))
  lowered = jax.jit(_train_step, static_argnums=4).lower(
      jax.device_put(x, shard), scale, bias, jax.device_put(dy, shard), True)
  assert _targets(lowered.as_text()) == FUSED
