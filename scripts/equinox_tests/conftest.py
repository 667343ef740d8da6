"""Equinox's own tests with jaxbn's BatchNorm swapped in (see run.sh).

run.sh copies this file to the root of a scratch folder holding Equinox's `tests/` package
(whose own conftest.py sets strict dtype promotion, rank promotion raising and 2 CPU
devices), outside the repository. The swap happens at session start: after jaxtyping's
pytest plugin has installed its import hook (so Equinox is imported instrumented, as in
Equinox's CI) and before any test module is collected, so every `eqx.nn.BatchNorm` the tests
name is already jaxbn's.

Environment:
  JAXBN_SWAP    eqx | none   (default none = Equinox itself)
  JAXBN_SRC     optional directory put first on sys.path, holding a `jaxbn/` package; default:
                whatever `import jaxbn` finds (the editable install of the repository).
"""

from __future__ import annotations

import os
import sys

import pytest

_SWAP = os.environ.get("JAXBN_SWAP", "none").strip().lower()
if _SWAP not in ("eqx", "none"):
  raise RuntimeError(f"JAXBN_SWAP must be eqx|none, got {_SWAP!r}")

if os.environ.get("JAXBN_SRC"):
  sys.path.insert(0, os.environ["JAXBN_SRC"])

_built = [0]
_hits: list[str] = []


def pytest_sessionstart(session):
  import equinox
  import equinox.nn
  import equinox.nn._batch_norm

  import jaxbn.equinox

  classes = {equinox.nn.BatchNorm, jaxbn.equinox.BatchNorm}
  if _SWAP == "eqx":
    equinox.nn.BatchNorm = jaxbn.equinox.BatchNorm
    equinox.nn._batch_norm.BatchNorm = jaxbn.equinox.BatchNorm
  # Which tests build a BatchNorm (either class): a class-level counter, nothing else changed.
  for cls in classes:
    original = cls.__init__

    def counting(self, *args, __original=original, **kwargs):
      _built[0] += 1
      return __original(self, *args, **kwargs)

    cls.__init__ = counting


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  before = _built[0]
  yield
  if _built[0] != before:
    _hits.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
  import equinox

  cls = equinox.nn.BatchNorm
  terminalreporter.write_line(f"JAXBN_SWAP={_SWAP}: equinox.nn.BatchNorm is "
                              f"{cls.__module__}.{cls.__qualname__}; {len(_hits)} tests "
                              "built a BatchNorm:")
  for nodeid in _hits:
    terminalreporter.write_line(f"  {nodeid}")


def pytest_report_header(config):
  return [f"JAXBN_SWAP={_SWAP}  JAXBN_CPU_KERNEL={os.environ.get('JAXBN_CPU_KERNEL', '(unset)')}"]
