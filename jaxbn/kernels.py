"""Batch normalization's passes over the activations, as fused C++ CPU kernels.

Each array is viewed as (outer, C, inner) — C features, reduced over outer and inner — with
C and inner given as a static `FeatureView` (NHWC with axis=-1: (N·H·W, C, 1); NCHW with
axis=1: (N, C, H·W)). Per-feature vectors are in the compute dtype (float32 for
float32/bfloat16 activations, float64 for float64). μ travels as a pair hi + lo, so that x − μ
is formed as (x − hi) − lo without cancellation (see `jaxbn._passes.shifted_moments`).

    moments(x)                          → hi, lo, M2 = Σ (x − μ)²      eqs. (1)-(2), one read of x
    normalize(x, hi, lo, a, b)          → ((x − hi) − lo)·a + b        eqs. (3)-(4)
    grad_sums(x, dy, hi, lo)            → Σ dy, Σ dy·(x − μ)           eqs. (5)-(6)
    grad_input(x, dy, hi, lo, a, b, k)  → a·dy + b + k·(x − μ)         closed form of (7)

and each direction whole, for a batch on one device (no pooling across devices), in one call:

    forward(x, γ, β)                    → y, hi, lo, var, 1/σ, m       eqs. (1)-(4)
    backward(x, dy, hi, lo, 1/σ, γ)     → dx, ∂L/∂γ, ∂L/∂β             eqs. (5)-(7)

The per-feature formulas between the passes are `jaxbn._per_feature`'s; the C++ repeats them.
Every kernel takes an optional mask shared by all features (padding: masked values take no
part in the statistics or sums, and their outputs are 0 whatever x holds).

Every kernel has a pure-JAX twin (`*_xla`) that computes the same thing: the operands viewed
as (outer, C, inner), handed to `jaxbn._passes`, the passes every pure-JAX path runs. The
twins are the kernels' derivatives (a `jax.custom_jvp` takes the tangent of the twin, so
second-order derivatives through jaxbn's analytic backward still work), the tests' reference,
and what a call compiles to wherever the C++ must not run.

Where that is, only lowering knows, so each call is one `jaxbn.kernel` primitive whose
lowering decides: the C++ (an XLA FFI custom call) on CPU when the computation runs on one
device or per device (inside shard_map or pmap) and is not being exported, and the kernels
could be built (they are built then, on first use); the twin everywhere else — other
platforms, a batch that XLA partitions across devices (a custom call cannot be partitioned:
XLA would gather x onto every device), `jax.export` (the artifact then runs anywhere, without
jaxbn). `jaxbn.batch_norm` decides which of its calls are kernel calls at all.

This module is the public face of `jaxbn._cpu` (the calls in `calls.py`, the twins in
`twins.py`); it defines nothing of its own.
"""

from jaxbn._cpu.calls import DTYPES as DTYPES
from jaxbn._cpu.calls import available as available
from jaxbn._cpu.calls import backward as backward
from jaxbn._cpu.calls import forward as forward
from jaxbn._cpu.calls import grad_input as grad_input
from jaxbn._cpu.calls import grad_sums as grad_sums
from jaxbn._cpu.calls import known_status as known_status
from jaxbn._cpu.calls import moments as moments
from jaxbn._cpu.calls import normalize as normalize
from jaxbn._cpu.calls import status as status
from jaxbn._cpu.calls import supports as supports
from jaxbn._cpu.twins import backward_xla as backward_xla
from jaxbn._cpu.twins import forward_xla as forward_xla
from jaxbn._cpu.twins import grad_input_xla as grad_input_xla
from jaxbn._cpu.twins import grad_sums_xla as grad_sums_xla
from jaxbn._cpu.twins import moments_xla as moments_xla
from jaxbn._cpu.twins import normalize_xla as normalize_xla
from jaxbn._records import FeatureView as FeatureView

__all__ = [
    "DTYPES",
    "FeatureView",
    "available",
    "backward",
    "backward_xla",
    "forward",
    "forward_xla",
    "grad_input",
    "grad_input_xla",
    "grad_sums",
    "grad_sums_xla",
    "known_status",
    "moments",
    "moments_xla",
    "normalize",
    "normalize_xla",
    "status",
    "supports",
]
