"""jaxbn.interop: PyTorch BatchNorm state in and out, and folding BN into Dense/Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn.linen
from jaxbn import interop


@pytest.fixture(scope="module")
def torch():
  # Imported here, not at module level: importing torch costs every pytest process ~3 s
  # (xdist workers included), and only this file's round-trip test needs it.
  return pytest.importorskip(
      "torch", reason="torch not importable (on this machine: pip install torch==2.13.0)")


def _trained_torch_bn(torch, momentum):
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm2d(4, momentum=momentum, eps=1e-3)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 2.0)
    bn.bias.normal_()
  bn.train()
  for step in range(3):  # move the running statistics away from their init
    bn(torch.randn(5, 4, 3, 3) * (step + 1) + step)
  return bn


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_torch_batchnorm2d_round_trip(torch, layout, momentum):
  bn = _trained_torch_bn(torch, momentum)
  x_nchw = torch.randn(6, 4, 3, 3) * 2 + 1
  with torch.no_grad():
    bn.eval()
    y_eval = bn(x_nchw).numpy()
    bn.train()
    y_train = bn(x_nchw).numpy()  # ...and one more running-statistics update
  torch_after = {k: v.numpy().copy() for k, v in bn.state_dict().items()}

  to_layout = (lambda a: a) if layout == "NCHW" else (lambda a: np.moveaxis(a, 1, -1))
  from_layout = (lambda a: a) if layout == "NCHW" else (lambda a: np.moveaxis(a, -1, 1))
  x = jnp.asarray(to_layout(x_nchw.numpy()))
  module = jaxbn.linen.BatchNorm(**interop.module_kwargs_from_torch(bn, layout=layout))
  bn_before = _trained_torch_bn(torch, momentum)  # same seed: the state before the extra step
  variables = interop.from_torch(bn_before.state_dict())


  @jax.jit  # one compilation: eval, a train step, eval with the updated state
  def run(variables, x):
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return (module.apply(variables, x, use_running_average=True), y, updates,
            module.apply({**variables, **updates}, x, use_running_average=True))

  y_eval_ours, y_train_ours, updates, y_eval_after = run(variables, x)
  np.testing.assert_allclose(from_layout(np.asarray(y_eval_ours)), y_eval, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(from_layout(np.asarray(y_train_ours)), y_train, rtol=1e-5,
                             atol=1e-5)

  # Back to torch: the state after jaxbn's update equals torch's own after the same batch.
  state = interop.to_torch({**variables, **updates})
  for key, value in torch_after.items():
    np.testing.assert_allclose(state[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  fresh = torch.nn.BatchNorm2d(4, momentum=momentum, eps=1e-3)
  fresh.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
  fresh.eval()
  with torch.no_grad():
    np.testing.assert_allclose(
        fresh(x_nchw).numpy(), from_layout(np.asarray(y_eval_after)), rtol=1e-5, atol=1e-5)


def test_from_torch_state_without_torch():
  state = {"weight": np.full(3, 2.0), "bias": np.zeros(3), "running_mean": np.ones(3),
           "running_var": np.full(3, 4.0), "num_batches_tracked": np.array(7)}
  variables = interop.from_torch(state)
  assert set(variables) == {"params", "batch_stats"}
  assert int(variables["batch_stats"]["count"]) == 7
  np.testing.assert_array_equal(interop.to_torch(variables)["running_var"], 4.0)
  with pytest.raises(KeyError, match="running_mean"):
    interop.from_torch({"weight": np.ones(3), "bias": np.ones(3)})
  with pytest.raises(ValueError, match="weight|scale"):
    interop.from_torch({**state, "weight": np.ones(4)})


class _LayerThenBN(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return jaxbn.linen.BatchNorm(use_running_average=True, epsilon=1e-3)(self.layer(x))


@pytest.mark.parametrize("layer, shape", [
    (nn.Dense(5), (4, 3)),
    (nn.Dense(5, use_bias=False), (4, 3)),
    (nn.Conv(5, (3, 3)), (2, 6, 6, 3)),
], ids=["dense", "dense-no-bias", "conv"])
def test_fold_batch_norm_matches_unfolded(layer, shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  model = _LayerThenBN(layer)
  variables = jax.jit(model.init)(jax.random.key(0), x)  # one compilation, not one per op
  stats = {"mean": jnp.asarray(rng.standard_normal(5), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 3, 5), jnp.float32)}
  bn_params = {"scale": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
               "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}
  variables = {"params": {**variables["params"], "BatchNorm_0": bn_params},
               "batch_stats": {"BatchNorm_0": stats}}

  @jax.jit
  def folded_and_unfolded(variables, x):
    layer_params = variables["params"]["layer"]
    kernel, bias = interop.fold_batch_norm(
        layer_params["kernel"], layer_params.get("bias"), mean=stats["mean"], var=stats["var"],
        scale=bn_params["scale"], shift=bn_params["bias"], epsilon=1e-3)
    folded = layer.clone(use_bias=True)
    return folded.apply({"params": {"kernel": kernel, "bias": bias}}, x), model.apply(variables, x)

  np.testing.assert_allclose(*folded_and_unfolded(variables, x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_mismatched_features():
  with pytest.raises(ValueError, match="mean has shape"):
    interop.fold_batch_norm(jnp.ones((3, 5)), None, mean=jnp.zeros(4), var=jnp.ones(5))


def test_fold_bf16_kernel_is_computed_in_float32():
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  stats = dict(mean=jnp.asarray(rng.standard_normal(5) * 300, jnp.float32),
               var=jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32))
  bias = jnp.asarray(rng.standard_normal(5) * 300 + 0.3, jnp.float32)
  want = interop.fold_batch_norm(kernel, bias, **stats)
  got = interop.fold_batch_norm(kernel.astype(jnp.bfloat16), bias, **stats)
  assert got[1].dtype == jnp.bfloat16
  # One bf16 rounding of the float32 result, not the error of folding in bf16.
  np.testing.assert_array_equal(got[1], want[1].astype(jnp.bfloat16))
