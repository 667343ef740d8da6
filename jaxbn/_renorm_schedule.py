"""The modules' batch-renormalization settings: Keras 2's `renorm_clipping` dict checked, and
Ioffe's warm-up, which relaxes the clipping linearly from none (r = 1, d = 0) to the given one.

Shared by `jaxbn.linen` and `jaxbn.nnx`; the maths of r and d is `jaxbn._per_feature`'s.

Every field is checked by type as well as by value: a string or another type where a bool, a
real or an int is meant is a TypeError naming the field (renorm="no" would otherwise switch
renorm on, renorm_clipping={"rmax": "3"} pass through float()). NumPy scalars (a config loaded
with NumPy) count as the Python numbers they equal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn import _args

CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# The warm-up's clock, `batch_stats/renorm_steps`, is an int32 that stops here (`tick`).
CLOCK_DTYPE = jnp.int32
CLOCK_MAX = int(np.iinfo(np.int32).max)
# Keras 2: "Missing rmax, rmin, dmax are set to inf, 0, inf, respectively."
_KERAS_DEFAULTS = {"rmax": math.inf, "rmin": 0.0, "dmax": math.inf}


def clipping(renorm: bool, renorm_clipping: Mapping[str, Any] | None, renorm_momentum: Any,
             warmup_steps: Any, owner: str) -> tuple[float, float, float]:
  """(rmax, rmin, dmax) from the module's fields, every field checked; raises naming it."""
  if not isinstance(renorm, (bool, np.bool_)):
    raise TypeError(f"{owner}: renorm must be a bool, got {renorm!r}.")
  if not renorm:
    for name, value, default in (("renorm_clipping", renorm_clipping, None),
                                 ("renorm_warmup_steps", warmup_steps, 0)):
      if value != default:
        shown = dict(value) if isinstance(value, Mapping) else value
        raise ValueError(f"{owner}: {name}={shown!r} is set but renorm=False.")
    return _KERAS_DEFAULTS["rmax"], _KERAS_DEFAULTS["rmin"], _KERAS_DEFAULTS["dmax"]
  given = dict(renorm_clipping or {})
  unknown = sorted(set(given) - set(CLIPPING_KEYS))
  if unknown:
    raise ValueError(f"{owner}: renorm_clipping has unknown keys {unknown}; the keys are "
                     f"{list(CLIPPING_KEYS)} (Keras 2's).")
  values = {**_KERAS_DEFAULTS, **given}
  rmax, rmin, dmax = _args.renorm_clipping(**values, prefix="renorm_clipping:")
  if (isinstance(renorm_momentum, (bool, np.bool_))
      or not isinstance(renorm_momentum, numbers.Real)):
    raise TypeError(f"{owner}: renorm_momentum must be a real number in [0, 1], got "
                    f"{renorm_momentum!r}.")
  if not 0 <= renorm_momentum <= 1:
    raise ValueError(f"{owner}: renorm_momentum must be a number in [0, 1], got "
                     f"{renorm_momentum!r}.")
  if isinstance(warmup_steps, (bool, np.bool_)) or not isinstance(warmup_steps, numbers.Integral):
    raise TypeError(f"{owner}: renorm_warmup_steps must be an int >= 0, got "
                    f"{warmup_steps!r}.")
  if warmup_steps < 0:
    raise ValueError(f"{owner}: renorm_warmup_steps must be an int >= 0, got "
                     f"{warmup_steps!r}.")
  if warmup_steps > CLOCK_MAX:
    raise ValueError(f"{owner}: renorm_warmup_steps={warmup_steps} is past what the int32 "
                     f"clock counts ({CLOCK_MAX}); the warm-up would never finish.")
  if warmup_steps and not all(math.isfinite(float(v)) for v in (rmax, dmax)):
    raise ValueError(f"{owner}: renorm_warmup_steps={warmup_steps} relaxes the clipping "
                     "linearly up to renorm_clipping's rmax and dmax, which must then be "
                     f"finite; got rmax={rmax}, dmax={dmax}.")
  return float(rmax), float(rmin), float(dmax)


def warmed_up(clip: tuple[float, float, float], steps, warmup_steps: int):
  """The clipping after `steps` training steps of a linear warm-up over `warmup_steps`:
  rmax 1 → rmax, rmin 1 → rmin, dmax 0 → dmax (Ioffe 2017, §4: r and d start as plain BN)."""
  rmax, rmin, dmax = clip
  if not warmup_steps:
    return rmax, rmin, dmax
  done = jnp.minimum(jnp.asarray(steps, jnp.float32) / float(warmup_steps), 1.0)
  return 1 + (rmax - 1) * done, 1 - (1 - rmin) * done, dmax * done


def tick(steps):
  """An int32 step counter one step on, saturating at CLOCK_MAX. The modules count two things
  with it: renorm's warm-up clock (wrapped to −2**31 it would put rmax below 1 and rmin above
  1, the schedule run backwards; stopped at CLOCK_MAX ≥ renorm_warmup_steps it keeps the full
  clipping) and momentum=None's batch count (wrapped negative it would weigh the next batch by
  1/count < 0; stopped, the cumulative average keeps moving by 1/CLOCK_MAX)."""
  return jnp.where(steps < CLOCK_MAX, steps + 1, steps)
