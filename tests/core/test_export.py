"""jax.export of a training step: kernel calls lower to their pure-JAX twins for export, so the
artifact holds no jaxbn custom call, passes export's default checks and runs where jaxbn is
not installed; `use_cpu_kernel=True` exports the custom calls, by the caller's choice."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

SHAPE = (16, 3, 3, 8)
FUSED = ["jaxbn_backward", "jaxbn_forward"]

# A fresh process in which importing jaxbn fails: the artifact must run on JAX alone.
_RUN_ARTIFACT = """
import sys
sys.modules["jaxbn"] = None
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from jax import export
artifact = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
inputs = np.load(sys.argv[2])
outputs = artifact.call(*(inputs[f"arg{i}"] for i in range(len(inputs.files))))
np.savez(sys.argv[3], *jax.tree.leaves(outputs))
"""


def _targets(text: str) -> list[str]:
  return sorted(set(re.findall(r'(?:custom_call_target="|custom_call @)(jaxbn_\w+)', text)))


def _train_step(x, scale, bias, use_cpu_kernel=None):
  def loss(x, scale, bias):
    y, stats = jaxbn.batch_norm(x, scale, bias, use_cpu_kernel=use_cpu_kernel)
    return jnp.sum(jnp.sin(y)), stats
  (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias)
  return value, stats.mean, stats.var, grads


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal(SHAPE) * 3 + 2, rng.uniform(0.5, 2, SHAPE[-1]),
          rng.standard_normal(SHAPE[-1]))


@pytest.mark.slow
def test_exported_step_runs_in_a_fresh_process_without_jaxbn(tmp_path, inputs):
  step = jax.jit(_train_step)
  # In this process the same step runs the kernels...
  assert _targets(step.lower(*inputs).compile().as_text()) == FUSED
  # ...and its export holds none: default checks pass, and the module is plain StableHLO.
  exported = jax.export.export(step)(*inputs)
  assert _targets(exported.mlir_module()) == []
  (tmp_path / "step.bin").write_bytes(exported.serialize())
  np.savez(tmp_path / "inputs.npz", **{f"arg{i}": v for i, v in enumerate(inputs)})
  result = subprocess.run(
      [sys.executable, "-c", _RUN_ARTIFACT, str(tmp_path / "step.bin"),
       str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  saved = np.load(tmp_path / "outputs.npz")
  there = [saved[f"arr_{i}"] for i in range(len(saved.files))]
  here = jax.tree.leaves(exported.call(*inputs))
  kernels = jax.tree.leaves(step(*inputs))
  assert len(there) == len(here) == len(kernels) == 6
  for t, h, k in zip(there, here, kernels, strict=True):
    np.testing.assert_array_equal(t, h)  # the same program, compiled in either process
    np.testing.assert_allclose(t, k, rtol=0, atol=1e-12 * float(np.max(np.abs(k))))


def test_use_cpu_kernel_true_exports_the_custom_calls(inputs):
  step = jax.jit(lambda *a: _train_step(*a, use_cpu_kernel=True))
  with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
    jax.export.export(step)(*inputs)
  allowed = [jax.export.DisabledSafetyCheck.custom_call(t) for t in FUSED]
  exported = jax.export.export(step, disabled_checks=allowed)(*inputs)
  assert _targets(exported.mlir_module()) == FUSED
  # Here jaxbn has registered the targets, so the artifact runs.
  for got, want in zip(jax.tree.leaves(exported.call(*inputs)), jax.tree.leaves(step(*inputs)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
