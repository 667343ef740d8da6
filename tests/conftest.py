"""Test-wide JAX settings, applied before anything imports jax, and the fixtures that several
test files share.

8 host CPU devices for the shard_map/pmap tests; float64 for the exactness tests (every test
states its dtypes explicitly); rank promotion and implicit dtype promotion raise, so a silent
broadcast or upcast in jaxbn fails loudly (equinox's habit). The library's tests sit in
folders that mirror the package: core/ (jaxbn.ops, reference, checks, the CLI), cpu/ (the C++
kernels), modules/ (Flax modules, interop), variants/ (renorm, ghost batches).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


DEVICES = 8


@pytest.fixture(scope="session")
def mesh():
  """A 1-D mesh of 8 host CPU devices, axis "data" (the XLA_FLAGS above make them)."""
  if jax.device_count() < DEVICES:
    pytest.skip(f"needs {DEVICES} devices; XLA_FLAGS was set after jax started")
  return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


@pytest.fixture
def standard_promotion():
  """JAX's default (standard) dtype and rank promotion for one test, as users run: Flax's
  layers and optax rely on it."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


@pytest.fixture(scope="session")
def host():
  """A function that turns every array of a pytree into NumPy: outside jit, indexing a jax
  array or jnp arithmetic on it compiles a program per operation."""
  return lambda tree: jax.tree.map(np.asarray, tree)
