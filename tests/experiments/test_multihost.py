"""Many hosts: processes on localhost joined by jax.distributed (gloo CPU collectives).

BN: two copies of this file run as processes, 2 CPU devices each; each holds its own padded
batch with a row mask (process 0: 5 of 8 rows real, process 1: 8 of 8) and runs `batch_norm`
under `shard_map` over the global mesh of 4 devices. The parent checks every process's mean,
variance, count, output and gradients against the seed's literal equations on the
concatenated real rows, in float64 in one process.

Training: `python -m experiments.launch` trains a tiny config on 2 processes; its metrics
equal one process's on the same global batches. Both processes resume from the same
checkpoint when the newest restores in one only; a workdir in use and a coordinator port in
use are refused in every process, with a message.

A child never sees conftest.py's 8 forced host devices: it gets a clean XLA_FLAGS and sets
`jax_num_cpu_devices` itself, before JAX makes a backend.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Starts processes that import and compile everything: outside the fast tier.
pytestmark = pytest.mark.slow

PROCESSES = 2
LOCAL_DEVICES = 2
ROWS = 8  # per process, padding included
REAL_ROWS = (5, 8)  # per process: different batch sizes, as with the tail of an epoch
TIME = 2  # a second batch axis: statistics reduce over rows × TIME values per feature
FEATURES = 3
# (gradient, use_cpu_kernel): the pure path, the default, and the kernels required.
MODES = (("analytic", False), ("analytic", None), ("analytic", True), ("autodiff", False))
TIMEOUT_S = 120  # per child; both are killed after it (a lost peer blocks the other forever)
LAUNCH_TIMEOUT_S = 300  # the training launch: two processes each import and compile it all


def _batches():
  """Every process's padded batch, the same in the parent and the children (seeded)."""
  rng = np.random.default_rng(0)
  shape = (PROCESSES, ROWS, TIME, FEATURES)
  # Per-process means differ, so unpooled statistics would be visibly wrong.
  x = rng.standard_normal(shape) + 3.0 * np.arange(PROCESSES)[:, None, None, None]
  dy = rng.standard_normal(shape)
  mask = np.arange(ROWS)[None, :] < np.array(REAL_ROWS)[:, None]
  x = np.where(mask[..., None, None], x, np.nan)  # padding must reach no output or gradient
  scale = rng.uniform(0.5, 2.0, FEATURES)
  bias = rng.standard_normal(FEATURES)
  return x, dy, mask[..., None, None], scale, bias


def _child(process_id: int, port: int, out: str, modes: list) -> None:
  """One process: its rows in, every process's results (gathered) out to `out`."""
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=PROCESSES, process_id=process_id,
                             initialization_timeout=TIMEOUT_S // 2)
  # Imported only now: nothing may make a backend before jax.distributed.initialize.
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxbn

  assert jax.device_count() == PROCESSES * LOCAL_DEVICES, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))
  x, dy, mask, scale, bias = _batches()
  # This process's rows only: the global arrays exist nowhere whole.
  local = lambda a: jax.make_array_from_process_local_data(rows, a[process_id])
  x_g, dy_g, mask_g = local(x), local(dy), local(mask)

  results = {}
  for gradient, use_cpu_kernel in modes:
    def loss(x, scale, bias, dy, mask, gradient=gradient, use_cpu_kernel=use_cpu_kernel):
      def per_device(x, scale, bias, dy, mask):
        y, stats = jaxbn.batch_norm(x, scale, bias, mask=mask, axis_name="data",
                                    gradient=gradient, use_cpu_kernel=use_cpu_kernel)
        return jax.lax.psum(jnp.sum(dy * y), "data"), (y, stats)
      return jax.shard_map(per_device, mesh=mesh,
                           in_specs=(P("data"), P(), P(), P("data"), P("data")),
                           out_specs=(P(), (P("data"), P())))(x, scale, bias, dy, mask)

    # The replicated γ, β get the global Σ over all 4 devices, as in data-parallel training.
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    args = (x_g, jnp.asarray(scale), jnp.asarray(bias), dy_g, mask_g)
    compiled = step.lower(*args).compile()
    (value, (y, stats)), (dx, dscale, dbias) = compiled(*args)
    name = f"{gradient}-{use_cpu_kernel}"
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    results.update({
        f"{name}/loss": np.asarray(value), f"{name}/y": gather(y), f"{name}/dx": gather(dx),
        f"{name}/mean": np.asarray(stats.mean), f"{name}/var": np.asarray(stats.var),
        f"{name}/count": np.asarray(stats.count), f"{name}/dscale": np.asarray(dscale),
        f"{name}/dbias": np.asarray(dbias),
        f"{name}/kernel_calls": np.asarray(
            compiled.as_text().count('custom_call_target="jaxbn_')),
    })
  np.savez(os.path.join(out, f"process{process_id}.npz"), **results)
  jax.distributed.shutdown()


# ---------------------------------------------------------------------------- the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _child_env() -> dict:
  """The parent's environment without conftest's forced device count."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def _launch(tmp_path: pathlib.Path, modes: list) -> list[dict]:
  port = _free_port()
  children = [
      subprocess.Popen(
          [sys.executable, __file__, str(i), str(port), str(tmp_path), repr(modes)],
          env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(PROCESSES)]
  logs = []
  try:
    for child in children:
      logs.append(child.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for child in children:
      child.kill()
    raise AssertionError(f"processes still running after {TIMEOUT_S} s: killed. Output "
                         f"so far:\n{''.join(c.communicate()[0][-3000:] for c in children)}")
  for i, (child, log) in enumerate(zip(children, logs, strict=True)):
    assert child.returncode == 0, f"process {i} exited {child.returncode}:\n{log[-5000:]}"
  return [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(PROCESSES)]


def _one_process_reference():
  """The seed's eqs. (1)-(4) (jaxbn.reference) on the concatenated real rows, float64, and
  JAX's autodiff of them: what one process holding the whole global batch computes."""
  import jax.numpy as jnp

  from jaxbn.reference import batch_norm_reference

  # The 1e-12 tolerances below are float64's: conftest.py enables it for the parent.
  assert jax.config.jax_enable_x64, "the reference needs float64"
  x, dy, mask, scale, bias = _batches()
  keep = mask[..., 0, 0]
  x_real, dy_real = x[keep], dy[keep]  # (13, TIME, FEATURES): every real row, in order
  loss = lambda x, s, b: jnp.sum(jnp.asarray(dy_real) * batch_norm_reference(x, s, b))
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
      jnp.asarray(x_real), jnp.asarray(scale), jnp.asarray(bias))
  y = batch_norm_reference(jnp.asarray(x_real), jnp.asarray(scale), jnp.asarray(bias))
  values = x_real.reshape(-1, FEATURES)
  return keep, {
      "loss": float(value), "y": np.asarray(y), "dx": np.asarray(grads[0]),
      "dscale": np.asarray(grads[1]), "dbias": np.asarray(grads[2]),
      "mean": values.mean(0), "var": values.var(0), "count": np.full(FEATURES, len(values)),
  }


def _require_gloo() -> None:
  """Skips unless this jaxlib has gloo, JAX's CPU collectives across processes."""
  from jax._src.lib import _jax

  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    pytest.skip("this jaxlib has no gloo CPU collectives (_jax.make_gloo_tcp_collectives)")


def test_two_processes_pool_exact_statistics_and_gradients(tmp_path):
  import jaxbn

  _require_gloo()
  # Built here once, so the children load the cached library instead of both compiling it.
  kernels = jaxbn.kernels.status().available
  modes = [m for m in MODES if kernels or m[1] is not True]
  keep, want = _one_process_reference()
  flat = lambda a: a.reshape(PROCESSES, ROWS, TIME, FEATURES)
  for process, got in enumerate(_launch(tmp_path, modes)):
    for gradient, use_cpu_kernel in modes:
      name = f"{gradient}-{use_cpu_kernel}"
      where = f"process {process}, gradient={gradient}, use_cpu_kernel={use_cpu_kernel}"
      np.testing.assert_array_equal(got[f"{name}/count"], want["count"], err_msg=where)
      for key in ("mean", "var", "dscale", "dbias"):
        np.testing.assert_allclose(got[f"{name}/{key}"], want[key], rtol=1e-12,
                                   err_msg=f"{key}, {where}")
      np.testing.assert_allclose(got[f"{name}/loss"], want["loss"], rtol=1e-12, err_msg=where)
      for key in ("y", "dx"):
        value = flat(got[f"{name}/{key}"])
        np.testing.assert_allclose(value[keep], want[key], rtol=1e-12, atol=1e-13,
                                   err_msg=f"{key}, {where}")
        # Padding (NaN in x) holds exact zeros: it reached nothing.
        np.testing.assert_array_equal(value[~keep], 0.0, err_msg=f"{key} padding, {where}")
      kernel_calls = int(got[f"{name}/kernel_calls"])
      if use_cpu_kernel is False:
        assert kernel_calls == 0, f"pure path compiled {kernel_calls} kernel calls, {where}"
      elif kernels:
        # Inside shard_map each device runs the kernels on its own rows.
        assert kernel_calls > 0, f"no jaxbn kernel in the compiled step, {where}"


# A tiny config (one net, two evaluations, a checkpoint each): the same overrides on the
# command line and in the one-process reference.
TINY = {
    "data.name": "synthetic", "data.num_samples": 128, "batch_size": 16, "num_steps": 20,
    "eval_every": 10, "checkpoint_every": 10, "diagnostics.num_examples": 16,
    "model.hidden": (16, 16), "variants": ("bn",), "data_parallel": True,
}


def _records(workdir: pathlib.Path) -> list[dict]:
  lines = (workdir / "runs" / "bn" / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "steps_per_second"}
          for line in lines]


def _overrides() -> list[str]:
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in TINY.items()]


def _launch_training(workdir: pathlib.Path, log_path: pathlib.Path, **env) -> int:
  """`experiments.launch` of the TINY config on 2 processes; its exit status."""
  with open(log_path, "w") as log:
    # Its own session: on timeout the launcher and both processes are killed together.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--",
         "--config=configs/default.py", f"--workdir={workdir}", *_overrides()],
        cwd=ROOT, env={**_child_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
  try:
    return launcher.wait(timeout=LAUNCH_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    raise AssertionError(f"experiments.launch still running after {LAUNCH_TIMEOUT_S} s: "
                         f"killed.\n{log_path.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> pathlib.Path:
  """A workdir the TINY config was trained into by 2 processes; copy before changing."""
  _require_gloo()
  two = tmp_path_factory.mktemp("launched") / "two"
  log_path = two.parent / "launch.log"
  assert _launch_training(two, log_path) == 0, log_path.read_text()[-5000:]
  return two


# Both use the launched workdir: under `-n`, one worker computes it once.
@pytest.mark.xdist_group(name="launched")
def test_experiments_train_data_parallel_across_processes(launched, tmp_path):
  from configs import default
  from experiments import registry
  from experiments.core import progress

  two, one = launched, tmp_path / "one"
  config = default.get_config()
  for key, value in TINY.items():
    *groups, field = key.split(".")
    target = config
    for group in groups:
      target = target[group]
    target[field] = value
  # One process (this one, its devices sharing each batch) on the same global batches, in
  # the settings `experiments.main` runs with: conftest.py's float64 would draw other batch
  # indices (int64), its strict promotion would refuse Flax's and optax's code. (Run after
  # the launch, not beside it: a busy core delays every cross-process all-reduce.)
  with (jax.enable_x64(False), jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow")):
    registry.train_and_evaluate(config, one, reporter=progress.QuietReporter())

  assert (two / "config.json").read_text() == (one / "config.json").read_text()
  got, want = _records(two), _records(one)
  assert [r["step"] for r in got] == [r["step"] for r in want] == [10, 20]
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      # Float32 training; the gradient all-reduce sums in another order than one process.
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert json.loads((two / "summary.json").read_text())["final_test_accuracy"] == \
      json.loads((one / "summary.json").read_text())["final_test_accuracy"]
  # The workdir holds what a one-process run's holds, and both processes wrote their part
  # of each checkpoint.
  files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*")
                           if "checkpoints" not in p.parts)
  assert files(two) == files(one)
  assert list(two.glob("runs/bn/checkpoints/20/*/ocdbt.process_1"))
  assert not list(two.rglob("*.tmp"))


@pytest.mark.xdist_group(name="launched")
def test_processes_resume_alike_when_the_newest_checkpoint_restores_in_one_only(launched,
                                                                               tmp_path):
  # Step 20 restores in process 0 and fails in process 1: both must skip it, or process 0
  # would find the run finished while process 1 trains on and waits for it forever.
  workdir = pathlib.Path(shutil.copytree(launched, tmp_path / "two"))
  (workdir / "runs" / "bn" / "result.json").unlink()  # as a kill after the last checkpoint
  log_path = tmp_path / "launch.log"
  status = _launch_training(workdir, log_path, JAXBN_FAULT_RESTORE_FAILS="1:20")
  log = log_path.read_text()
  assert status == 0, log[-5000:]
  aside = workdir / "runs" / "bn" / "checkpoints_damaged" / "20-other-process"
  assert (f"bn: skipped checkpoint step 20: it did not restore in another process; moved it "
          f"to {aside.resolve()}, resuming from step 10.") in log.splitlines()
  assert "bn: resuming at step 10 (20 steps)" in log.splitlines()
  assert list(aside.glob("*/ocdbt.process_1"))  # moved whole
  # Both trained from step 10 again, to what the uninterrupted launch recorded, exactly.
  assert _records(workdir) == _records(launched)
  assert list(workdir.glob("runs/bn/checkpoints/20/*/ocdbt.process_1"))


def _two_processes(tmp_path: pathlib.Path, port: int, *args: str) -> list[subprocess.Popen]:
  return [subprocess.Popen(
      [sys.executable, "-m", "experiments.main", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}", "--config=configs/default.py", *args],
      cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def test_a_workdir_in_use_is_refused_in_every_process_of_a_launch(tmp_path):
  from experiments.core import workdir as workdir_lib

  _require_gloo()
  workdir = tmp_path / "w"
  with workdir_lib.lock(workdir):  # as a run in this process holds it
    children = _two_processes(tmp_path, _free_port(), f"--workdir={workdir}", *_overrides())
    try:
      outputs = [child.communicate(timeout=TIMEOUT_S) for child in children]
    except subprocess.TimeoutExpired:
      for child in children:
        child.kill()
        child.communicate()
      raise AssertionError("a process refused the workdir still ran after "
                           f"{TIMEOUT_S} s: killed") from None
  for child, (_, err) in zip(children, outputs, strict=True):
    assert child.returncode == 1 and "Traceback" not in err, err[-3000:]
  # Process 0 holds the lock for its launch, so it names the holder; process 1 points to it.
  assert f"{workdir} is in use by pid {os.getpid()} (" in outputs[0][1]
  assert f"{workdir} is in use by another run; process 0 of this one names it." in outputs[1][1]
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK]


def test_a_coordinator_port_in_use_is_refused_before_jax_starts(tmp_path):
  with socket.socket() as taken:
    taken.bind(("localhost", 0))
    taken.listen()
    port = taken.getsockname()[1]
    main = subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", "--process_id=0", "--config=configs/default.py",
         f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    launch = subprocess.run(
        [sys.executable, "-m", "experiments.launch", "--num_processes=2", f"--port={port}",
         "--", "--config=configs/default.py", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
  # A message naming the port, not a segmentation fault inside JAX.
  assert main.returncode == 1, main.stderr[-3000:]
  assert (f"--coordinator_address=localhost:{port}: port {port} is in use on this machine"
          in main.stderr) and "Traceback" not in main.stderr
  assert launch.returncode == 1, launch.stderr[-3000:]
  assert launch.stderr.startswith(f"experiments.launch: --port={port} is in use on this "
                                  "machine") and "Nothing started" in launch.stderr
  assert not (tmp_path / "w").exists()


if __name__ == "__main__":
  import ast

  _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], ast.literal_eval(sys.argv[4]))
