"""Flax's own tests with jaxbn's BatchNorm classes swapped in (see run.sh).

run.sh copies this file beside Flax's tests in a scratch folder, outside the repository.
pytest loads it before any test module is imported, so `nn.BatchNorm` / `nnx.BatchNorm`
references evaluated at import time (e.g. in parameterized decorators) already see the
swapped classes.

Environment:
  JAXBN_SWAP    both | linen | nnx | none   (default: none = Flax itself)
  JAXBN_SRC     optional directory put first on sys.path, holding a `jaxbn/` package
                (e.g. a snapshot); default: whatever `import jaxbn` finds (the editable
                install of /work/main).
  JAXBN_RECORD  optional path: write a JSON list of the test IDs during which a BatchNorm
                (Flax's or jaxbn's, linen or nnx) was constructed (discovery mode; wraps
                the four classes' __init__ to count, nothing else).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import pytest

_SWAP = os.environ.get("JAXBN_SWAP", "none").strip().lower()
if _SWAP not in ("both", "linen", "nnx", "none"):
  raise RuntimeError(f"JAXBN_SWAP must be both|linen|nnx|none, got {_SWAP!r}")

if os.environ.get("JAXBN_SRC"):
  sys.path.insert(0, os.environ["JAXBN_SRC"])

import flax  # noqa: E402
import flax.linen  # noqa: E402
import flax.linen.normalization  # noqa: E402
import flax.nnx  # noqa: E402
import flax.nnx.nn  # noqa: E402
import flax.nnx.nn.normalization  # noqa: E402

import jaxbn  # noqa: E402
import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

FLAX_LINEN_BN = flax.linen.normalization.BatchNorm
FLAX_NNX_BN = flax.nnx.nn.normalization.BatchNorm


def _swap_linen():
  new = jaxbn.linen.BatchNorm
  flax.linen.BatchNorm = new
  flax.linen.normalization.BatchNorm = new


def _swap_nnx():
  new = jaxbn.nnx.BatchNorm
  flax.nnx.BatchNorm = new
  flax.nnx.nn.normalization.BatchNorm = new
  if hasattr(flax.nnx.nn, "BatchNorm"):
    flax.nnx.nn.BatchNorm = new


if _SWAP in ("both", "linen"):
  _swap_linen()
if _SWAP in ("both", "nnx"):
  _swap_nnx()

# --- discovery: which tests construct a BatchNorm -------------------------------------
_RECORD = os.environ.get("JAXBN_RECORD")
_built = [0]
_hits: list[str] = []

if _RECORD:
  for cls in {FLAX_LINEN_BN, FLAX_NNX_BN, jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm}:
    orig = cls.__init__

    def _make(orig):
      @functools.wraps(orig)
      def __init__(self, *a, **k):
        _built[0] += 1
        return orig(self, *a, **k)
      return __init__

    cls.__init__ = _make(orig)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  before = _built[0]
  yield
  if _RECORD and _built[0] != before:
    _hits.append(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
  if _RECORD:
    with open(_RECORD, "w") as f:
      json.dump(_hits, f, indent=0)


def pytest_report_header(config):
  return [
      f"JAXBN_SWAP={_SWAP}  flax={flax.__version__} ({os.path.dirname(flax.__file__)})",
      f"jaxbn from {os.path.dirname(jaxbn.__file__)}",
      f"flax.linen.BatchNorm = {flax.linen.BatchNorm.__module__}.BatchNorm, "
      f"flax.nnx.BatchNorm = {flax.nnx.BatchNorm.__module__}.BatchNorm",
      f"JAXBN_CPU_KERNEL={os.environ.get('JAXBN_CPU_KERNEL', '(unset)')}",
  ]
