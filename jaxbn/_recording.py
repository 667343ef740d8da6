"""While `jaxbn.recompute_batch_stats` runs a model, the modules hand it their batch statistics.

A context variable, read when a module is traced: outside `recording()` it is None and the
modules behave exactly as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

_RECORDER: contextvars.ContextVar[Callable[[Any, Any, bool], None] | None] = contextvars.ContextVar(
    "jaxbn_batch_stats_recorder", default=None)


def record(key: Any, stats: Any, unbiased: bool) -> None:
  """Called by a module in training mode with its key (linen: its path; nnx: itself), its
  `BatchStats` and whether it keeps an unbiased running variance; does nothing unless a
  recording is under way."""
  recorder = _RECORDER.get()
  if recorder is not None:
    recorder(key, stats, unbiased)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, Any, bool]]]:
  """Collects (key, stats, unbiased) for every module call traced inside the block, in call
  order."""
  records: list[tuple[Any, Any, bool]] = []
  token = _RECORDER.set(lambda *record: records.append(record))
  try:
    yield records
  finally:
    _RECORDER.reset(token)
