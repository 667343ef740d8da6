"""The benchmark in miniature: every implementation, section and column of the op benchmark,
the Hessian-vector products and the training steps, each net's step (the CNN's in PyTorch too), the config checks and the
rules for its workdir."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.core import config as config_lib

# Starts a process per implementation: outside the fast tier (pytest -m 'not slow').
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]


def test_benchmark_runs_tiny_and_reports_every_column(tmp_path):
  from configs import benchmark as benchmark_config
  from benchmarks import hvp as bench_hvp, main as benchmark, ops as bench_ops, steps

  config = benchmark_config.get_config()
  config.op_shapes = ((8, 4), (2, 3, 3, 4))
  config.op_channels_first_shapes = ((2, 4, 3, 3),)
  config.op_masked_shapes = ((4, 3, 3, 4),)
  config.residual_shape = (4, 2, 2, 3)
  config.hvp_shapes = ((8, 4),)
  config.hvp_dtypes = ("float32",)  # bfloat16's products: checked in the test below
  config.model.hidden = (8, 8)
  config.model.cnn_features = (4,)
  # The MLP only: each runner process compiling the CNN's step as well was a third of this
  # test's four minutes; the other nets' own code (data, models, PyTorch twin) is the next
  # tests', in this process.
  config.nets = ("mlp",)
  config.batch_size = {"mlp": 8}
  config.steps_per_call = {"mlp": 2}
  config.dataset_size = 16
  config.repeats = 2
  config.op_settle_s = 1e-3
  config.op_sample_s = 5e-3  # the full benchmark's 120 ms samples would add ~10 s here
  config.step_sample_s = 5e-3
  text = benchmark.run(config, tmp_path)
  results = json.loads((tmp_path / "benchmark.json").read_text())
  implementations = set(bench_ops.FORWARDS)
  for dtype in config.op_dtypes:
    for shape in ("8x4", "2x3x3x4", "2x4x3x3 NCHW"):
      found = {r["implementation"] for r in results["ops"]
               if r["dtype"] == dtype and r["shape"] == shape}
      assert implementations <= found
    masked = {r["implementation"] for r in results["ops"]
              if r["dtype"] == dtype and r["shape"] == "4x3x3x4 masked"}
    assert masked == set(bench_ops.MASKABLE)
  for dtype in config.hvp_dtypes:
    found = {r["implementation"]: r for r in results["hvp"] if (r["shape"], r["dtype"]) ==
             ("8x4", dtype)}
    assert set(found) == set(bench_hvp.IMPLEMENTATIONS)
    assert all(r[f"{kind}_ms"] > 0 for r in found.values() for kind in bench_hvp.KINDS)
  for dtype in config.step_dtypes:
    found = {r["implementation"] for r in results["steps"]
             if (r["net"], r["dtype"]) == ("mlp", dtype)}
    assert set(steps.IMPLEMENTATIONS) | {steps.NO_BN} <= found
  assert all(r["temp_bytes"] > 0 for r in results["steps"] if "temp_bytes" in r)
  assert {(t["dtype"], t["target"]) for t in results["step_targets"]} == {
      (dtype, target) for dtype in config.step_dtypes for target, _, _ in steps.STEP_TARGETS}
  analytic = next(r for r in results["residuals"] if r["implementation"] == "jaxbn analytic")
  assert analytic["activation_sized"] == 1
  for column in ("GB/s", "% of floor", "HVP vs flax.linen", "examples/s", "vs flax.linen", "vs jaxbn pure",
                 "BN share", "temp MB", "bytes saved for the backward", "| met |"):
    assert column in text
  assert (tmp_path / "op_benchmark.png").exists()


@pytest.mark.parametrize("net,dtype", [("cnn", "float32"), ("resnet_stage", "bfloat16"),
                                       ("wide_mlp", "float32")])
def test_benchmark_runs_each_net_step_and_reports_its_memory(net, dtype):
  from configs import benchmark as benchmark_config
  from benchmarks import nets, steps

  model = benchmark_config.get_config().model
  model.cnn_features = (4,)
  case = {"net": net, "dtype": dtype, "batch": 4, "steps": 1, "model": model.to_dict(),
          "dataset_size": 8}
  for name in (steps.DEFAULT, steps.NO_BN):
    run, compile_s, info = steps.step_runner(name, case)
    run()
    assert compile_s > 0 and info["temp_bytes"] > 0
  # the bfloat16 net computes in bfloat16 (BN's output included), its parameters float32
  model_ = steps._model(steps.DEFAULT, case)
  x = np.zeros((2, *nets.INPUT_SHAPES[net]), np.float32)
  variables = model_.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(variables["params"]))
  logits, _ = model_.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == np.dtype(dtype)
  torch_run = steps.step_runner(steps.TORCH, case)
  if net == "cnn" and torch_run is not None:  # None: torch not importable
    torch_run[0]()
  elif net != "cnn":
    assert torch_run is None  # no PyTorch twin of the benchmark's own nets


def test_a_bad_benchmark_config_is_refused_before_any_work(tmp_path):
  from configs import benchmark as benchmark_config
  from benchmarks import main as benchmark

  for key, value, named in (("sections", ("ops", "memory"), "memory"),
                            ("nets", ("mlp", "resnet50"), "resnet50"),
                            ("step_dtypes", ("float16",), "float16"),
                            ("hvp_dtypes", ("float16",), "float16"),
                            ("hvp_shapes", ((8,),), "hvp_shapes")):
    config = benchmark_config.get_config()
    config[key] = value
    with pytest.raises(config_lib.ConfigError, match=named):
      benchmark.run(config, tmp_path / key)
    assert not (tmp_path / key).exists()


def test_the_hvp_rows_time_products_that_match_a_float64_reference():
  """Each implementation's timed products, both methods, against forward-over-reverse of eqs.
  (1)-(4) in float64; forward mode on jaxbn's analytic layer itself is refused."""
  from benchmarks import hvp as bench_hvp, ops as bench_ops

  def batch_norm(x, scale, bias, axis):
    mu = jnp.mean(x, (0, 1, 2))  # (1)
    var = jnp.mean(jnp.square(x - mu), (0, 1, 2)) + 1e-5  # (2)
    return scale * (x - mu) / jnp.sqrt(var) + bias  # (3)-(4)

  shape = (5, 3, 2, 4)
  x, scale, bias, c, vx, vs = bench_hvp.inputs(shape, "float32")
  wide = [np.asarray(a, np.float64) for a in (x, scale, bias, c, vx, vs)]
  gradient = jax.grad(lambda x, s: bench_hvp.loss(batch_norm, x, s, wide[2], wide[3]), (0, 1))
  _, expected = jax.jvp(gradient, tuple(wide[:2]), tuple(wide[4:]))
  for name in bench_hvp.IMPLEMENTATIONS:
    for method in bench_hvp.METHODS:
      product = bench_hvp.hvp_step(bench_ops.FORWARDS[name], method)(x, scale, bias, c, vx, vs)
      for ours, want in zip(product, expected):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))
  assert bench_hvp.disagreement(shape, "float32") < 1e-5
  # bfloat16: jaxbn's y is rounded to bfloat16 (8 bits) where Flax's stays float32.
  assert bench_hvp.disagreement(shape, "bfloat16") < 3e-2
  analytic = bench_ops.FORWARDS["jaxbn analytic"]
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda x: analytic(x, scale, bias, -1), (x,), (vx,))


def test_the_benchmark_writes_only_where_the_workdir_rules_allow(tmp_path):
  from experiments.core import workdir as workdir_lib
  outputs = ("benchmark.json", "benchmark.md")
  mine = workdir_lib.claim_outputs(tmp_path / "new", outputs, tool="the benchmark")
  (mine / "benchmark.json").write_text("{}")
  assert workdir_lib.claim_outputs(mine, outputs, tool="the benchmark") == mine  # rerun
  (mine / "notes.txt").write_text("mine")
  with pytest.raises(config_lib.ConfigError, match="notes.txt"):
    workdir_lib.claim_outputs(mine, outputs, tool="the benchmark")
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / "benchmark.json").write_text("someone else's")  # no marker: not claimed before
  with pytest.raises(config_lib.ConfigError, match="not a workdir of this tool's"):
    workdir_lib.claim_outputs(theirs, outputs, tool="the benchmark")
  assert (theirs / "benchmark.json").read_text() == "someone else's"
  with pytest.raises(config_lib.ConfigError, match="--workdir is empty"):
    workdir_lib.claim_outputs("", outputs, tool="the benchmark")


def test_the_equinox_benchmark_runs_both_classes_and_reports_the_speed_up():
  pytest.importorskip("equinox", reason="jaxbn[equinox] is not installed")
  from benchmarks import equinox as bench

  results = []
  # As the benchmark's processes run: float32 (the tests enable 64-bit mode, in which
  # Equinox's layers default to float64 parameters).
  with jax.enable_x64(False):
    for name in bench.IMPLEMENTATIONS:
      for case in ({"kind": "layer", "shape": [4, 3, 2, 2]}, {"kind": "layer", "shape": [4, 3]},
                   {"kind": "step"}):
        run, compile_s = bench.runner(name, case)
        run()
        assert compile_s > 0
        results.append({"case": case, "implementation": name, "median_s": 1e-3})
  text = bench.markdown(results, repeats=1)
  assert "| layer 4×3×2×2 | 1.000 | 1.000 | 1.00x |" in text
  assert "| CNN step, batch 128 |" in text
