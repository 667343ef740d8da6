"""Evaluation and diagnostics: what a run measures after each chunk of training.

Both build a jitted function of `(params, batch_stats)` once per model and return a function
of the training state, which `train.run_loop` calls after every chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.core import train

EVAL_BATCH = 500


def make_evaluate(model, ctx: train.Context) -> Callable:
  """Test accuracy and loss with the running statistics (inference mode)."""
  n = ctx.x_test.shape[0]
  padded = -(-n // EVAL_BATCH) * EVAL_BATCH
  pad = lambda a: np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)])
  batches = lambda a: jax.device_put(pad(a).reshape(-1, EVAL_BATCH, *a.shape[1:]), ctx.replicated)
  x, y = batches(ctx.x_test), batches(ctx.y_test)
  weight = batches(np.ones(n, np.float32))

  @jax.jit
  def evaluate(params, batch_stats):
    def one(batch):
      xb, yb, wb = batch
      logits = model.apply({"params": params, "batch_stats": batch_stats}, xb, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return (jnp.sum(wb * (jnp.argmax(logits, -1) == yb)), jnp.sum(wb * losses))
    correct, loss = jax.lax.map(one, (x, y, weight))
    return {"test_accuracy": jnp.sum(correct) / n, "test_loss": jnp.sum(loss) / n}

  return lambda state: evaluate(state.params, state.batch_stats)


def make_diagnostics(model, ctx: train.Context) -> Callable:
  """The BN paper's Fig. 1b, c and the seed's saturation argument, at each evaluation:
  percentiles of one unit's activation input in the last hidden layer (inference mode, on
  test examples), the fraction of activation inputs with |x| > saturation per layer, and
  the gradient norm of each layer's kernel on a fixed training batch."""
  diag = ctx.config.diagnostics

  @jax.jit
  def diagnostics(params, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}
    _, sown = model.apply(variables, ctx.x_diag, train=False, mutable=["intermediates"])
    inputs = [v[0] for _, v in sorted(sown["intermediates"].items(),
                                      key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
    unit = inputs[-1][..., diag.unit].ravel()
    grads = jax.grad(lambda p: train.loss_and_stats(model, p, batch_stats, ctx.x_grad,
                                                    ctx.y_grad)[0])(params)
    kernels = [grads[name]["kernel"] for name in sorted(grads, key=_layer_order)
               if "kernel" in grads[name]]  # Dense/Conv layers, not BatchNorm
    return {
        "unit_percentiles": jnp.percentile(unit, jnp.array([15.0, 50.0, 85.0])),
        "saturated_fraction": jnp.stack([jnp.mean(jnp.abs(a) > diag.saturation)
                                         for a in inputs]),
        "grad_norm": jnp.stack([jnp.linalg.norm(k) for k in kernels]),
    }

  return lambda state: diagnostics(state.params, state.batch_stats)


def _layer_order(name: str) -> tuple[str, int]:
  kind, _, index = name.rpartition("_")
  return (kind, int(index)) if index.isdigit() else (name, 0)
