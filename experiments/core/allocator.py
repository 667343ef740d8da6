"""A faster malloc for the processes jaxbn's commands own (experiments, benchmark).

XLA's CPU runtime allocates fresh output and temporary buffers on every call, and under
glibc's default malloc each large allocation is a fresh mmap whose pages fault in on first
touch. Measured on this project's 2-core machine (docs/performance.md), a jitted elementwise
op streams several times faster with tcmalloc preloaded, and glibc's own hugetlb tunable
(no extra install) recovers most of it. The choice is made once, by re-executing the
process with the environment set, before JAX starts.
"""

from __future__ import annotations

import os
import sys

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
GLIBC_HUGETLB = "glibc.malloc.hugetlb=1"
MARKER = "JAXBN_ALLOCATOR"


def describe(environ=None) -> str:
  """The allocator a process with this environment runs under."""
  environ = os.environ if environ is None else environ
  preload = environ.get("LD_PRELOAD", "")
  for name in ("tcmalloc", "jemalloc"):
    if name in preload:
      return name
  tunables = environ.get("GLIBC_TUNABLES", "")
  return f"glibc ({tunables})" if tunables else "glibc (default)"


def fast_environment(environ=None) -> dict[str, str] | None:
  """The environment to re-execute under, or None to keep this one: the user already chose
  (LD_PRELOAD or GLIBC_TUNABLES set, or JAXBN_ALLOCATOR=keep), or we already re-executed."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(MARKER) or "LD_PRELOAD" in environ or "GLIBC_TUNABLES" in environ:
    return None
  tcmalloc = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
  if tcmalloc:
    environ["LD_PRELOAD"] = tcmalloc
  else:
    environ["GLIBC_TUNABLES"] = GLIBC_HUGETLB  # glibc >= 2.35; older ones ignore it
  environ[MARKER] = describe(environ)
  return environ


def use_fast_allocator() -> None:
  """Re-executes this process (same command line) under the fastest available malloc.

  Call it first thing in a `__main__`; it returns without doing anything when the choice
  is already made. Never fails: if re-executing fails, the process goes on as it is.
  """
  environ = fast_environment()
  if environ is None:
    return
  try:
    os.execve(sys.executable, sys.orig_argv, environ)
  except OSError:
    return
