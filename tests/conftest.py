"""Test-wide JAX settings, applied before anything imports jax.

8 host CPU devices for the shard_map/pmap tests; float64 for the exactness tests (every test
states its dtypes explicitly); rank promotion and implicit dtype promotion raise, so a silent
broadcast or upcast in jaxbn fails loudly (equinox's habit).
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
