"""While `jaxbn.recompute_batch_stats` runs a model, the modules hand it their batch statistics.

A context variable, read when a module is traced: outside `recording()` it is None and the
modules behave exactly as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

_RECORDER: contextvars.ContextVar[Callable[[Any, Any], None] | None] = contextvars.ContextVar(
    "jaxbn_batch_stats_recorder", default=None)


def record(key: Any, stats: Any) -> None:
  """Called by a module in training mode with its key (linen: its path; nnx: itself) and its
  `BatchStats`; does nothing unless a recording is under way."""
  recorder = _RECORDER.get()
  if recorder is not None:
    recorder(key, stats)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, Any]]]:
  """Collects (key, stats) for every module call traced inside the block, in call order."""
  records: list[tuple[Any, Any]] = []
  token = _RECORDER.set(lambda key, stats: records.append((key, stats)))
  try:
    yield records
  finally:
    _RECORDER.reset(token)
