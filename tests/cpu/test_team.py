"""The CPU kernels' scheduler (`jaxbn/csrc/team.h`) under stress, outside XLA.

`tests/csrc/team_stress.cc` runs a Team on a plain pool of 16 threads (more than this
machine's cores) through 20,000 kernel-like calls of one to three loops each, loops longer
than a ticket counts, more loops on one Team than the ticket's 16-bit loop field holds, tasks
that throw, and a pool whose Schedule runs inline; it checks that every index runs exactly
once and every exception reaches Run's caller. A hang is ended by its own alarm and by the
timeout here. (Under ThreadSanitizer: build it with `-fsanitize=thread`, see the source.)
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "tests" / "csrc" / "team_stress.cc"
CSRC = ROOT / "jaxbn" / "csrc"

pytestmark = pytest.mark.slow  # a compile and a subprocess: about 10 s on two idle cores


def _compiler() -> list[str] | None:
  return shlex.split(os.environ.get("CXX", "")) or next(
      ([c] for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def test_every_index_runs_once_at_16_threads(tmp_path):
  compiler = _compiler()
  if compiler is None:
    pytest.skip("no C++ compiler (set CXX) to build the scheduler's stress test")
  binary = tmp_path / "team_stress"
  build = subprocess.run([*compiler, "-O2", "-std=c++17", "-pthread", f"-I{CSRC}", str(PROGRAM),
                          "-o", str(binary)], capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(binary), "16", "20000", "240"], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
  assert run.stdout.strip().endswith("ok"), run.stdout
