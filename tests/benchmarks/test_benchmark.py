"""The benchmark in miniature: every implementation, section and column of the op benchmark
and the training step, the CNN step in JAX and PyTorch, and the rules for its workdir."""

import json

import pytest

from experiments.core import config as config_lib

# Starts a process per implementation: outside the fast tier (pytest -m 'not slow').
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("standard_promotion")]


def test_benchmark_runs_tiny_and_reports_every_column(tmp_path):
  from configs import benchmark as benchmark_config
  from benchmarks import main as benchmark, ops as bench_ops

  config = benchmark_config.get_config()
  config.op_shapes = ((8, 4), (2, 3, 3, 4))
  config.op_channels_first_shapes = ((2, 4, 3, 3),)
  config.op_masked_shapes = ((4, 3, 3, 4),)
  config.residual_shape = (4, 2, 2, 3)
  config.model.hidden = (8, 8)
  config.model.cnn_features = (4,)
  # The MLP only: each runner process compiling the CNN's step as well was a third of this
  # test's four minutes; the CNN's own code (its data, model and PyTorch twin) is the next
  # test's, in this process.
  config.nets = ("mlp",)
  config.batch_size = {"mlp": 8, "cnn": 8}
  config.steps_per_call = {"mlp": 2, "cnn": 1}
  config.dataset_size = 16
  config.repeats = 2
  config.op_settle_s = 1e-3
  config.op_sample_s = 5e-3  # the full benchmark's 120 ms samples would add ~10 s here
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
  assert {(r["net"], r["implementation"]) for r in results["throughput"]} >= {
      ("mlp", impl) for impl in benchmark.IMPLEMENTATIONS}
  assert all(r["peak_bytes"] > 0 for r in results["memory"])
  analytic = next(r for r in results["residuals"] if r["implementation"] == "jaxbn analytic")
  assert analytic["activation_sized"] == 1
  for column in ("GB/s", "% of floor", "examples/s", "vs flax.linen", "compiled peak MB",
                 "bytes saved for the backward"):
    assert column in text
  assert (tmp_path / "op_benchmark.png").exists()


def test_benchmark_runs_the_cnn_step_in_jax_and_in_pytorch():
  from configs import benchmark as benchmark_config
  from benchmarks import main as benchmark

  model = benchmark_config.get_config().model
  model.cnn_features = (4,)
  case = {"net": "cnn", "batch": 4, "steps": 1, "model": model.to_dict(), "dataset_size": 8}
  run, compile_s = benchmark._step_runner("jaxbn analytic", case)
  run()
  assert compile_s > 0
  torch_run = benchmark._step_runner(benchmark.TORCH, case)
  if torch_run is not None:  # None: torch not importable, its rows are left out
    torch_run[0]()


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
