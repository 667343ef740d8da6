"""The CPU kernels' float32 → bfloat16 rounding (`jaxbn/csrc/simd.h`), outside XLA.

`tests/csrc/bf16_rounding.cc` checks the vector store against the scalar rounding and that
against a reference written from the definition (round to nearest, ties to even; overflow to
infinity; NaN kept, quieted), on every top half of a float's bits with the low halves that
decide a rounding. Built twice: with -march=native (the AVX2 intrinsics on this project's
machines) and, on x86, for x86-64-v2 (no AVX2: the generic vector code).
"""

import platform
import subprocess
from pathlib import Path

import pytest

from test_team import _compiler  # the same compiler lookup (CXX, else c++, g++, clang++)

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "tests" / "csrc" / "bf16_rounding.cc"
CSRC = ROOT / "jaxbn" / "csrc"

_X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("march", [
    "native",
    pytest.param("x86-64-v2", marks=pytest.mark.skipif(
        not _X86, reason="x86-64-v2 (the build without AVX2) is an x86 target")),
])
def test_vector_and_scalar_rounding_match_the_definition(march, tmp_path):
  compiler = _compiler()
  if compiler is None:
    pytest.skip("no C++ compiler (set CXX) to build the rounding check")
  binary = tmp_path / "bf16_rounding"
  build = subprocess.run([*compiler, "-O2", f"-march={march}", "-std=c++17", f"-I{CSRC}",
                          str(PROGRAM), "-o", str(binary)], capture_output=True, text=True,
                         timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert run.stdout.strip() == "ok", run.stdout
