"""The CPU kernels' vector helpers (`jaxbn/csrc/simd.h`), outside XLA, by two C++ programs.

`tests/csrc/bf16_rounding.cc` checks the vector store against the scalar rounding and that
against a reference written from the definition (round to nearest, ties to even; overflow to
infinity; NaN kept, quieted), on every top half of a float's bits with the low halves that
decide a rounding; and both vector loads (LoadV, LoadUsedOnce) on every bfloat16 pattern in
every lane, bit for bit. Built twice: with -march=native (the AVX2 intrinsics on this project's
machines) and, on x86, for x86-64-v2 (no AVX2: the generic vector code).

`tests/csrc/streamed_lines.cc` checks that the part of a run the kernels write with streaming
stores is exactly its whole cache lines, for every start within two lines and length up to 300.
"""

import platform
import subprocess
from pathlib import Path

import pytest

from test_team import _compiler  # the same compiler lookup (CXX, else c++, g++, clang++)

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ROOT / "tests" / "csrc"
CSRC = ROOT / "jaxbn" / "csrc"

_X86 = platform.machine().lower() in ("x86_64", "amd64")

pytestmark = pytest.mark.slow  # C++ compiles and subprocesses: about 3 s each on two idle cores


def _build_and_run(program: str, flags: list[str], tmp_path) -> None:
  compiler = _compiler()
  if compiler is None:
    pytest.skip(f"no C++ compiler (set CXX) to build tests/csrc/{program}")
  binary = tmp_path / program.removesuffix(".cc")
  build = subprocess.run([*compiler, "-O2", *flags, "-std=c++17", f"-I{CSRC}",
                          str(PROGRAMS / program), "-o", str(binary)], capture_output=True,
                         text=True, timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert run.stdout.strip() == "ok", run.stdout


@pytest.mark.parametrize("march", [
    "native",
    pytest.param("x86-64-v2", marks=pytest.mark.skipif(
        not _X86, reason="x86-64-v2 (the build without AVX2) is an x86 target")),
])
def test_vector_and_scalar_bf16_rounding_match_the_definition(march, tmp_path):
  _build_and_run("bf16_rounding.cc", [f"-march={march}"], tmp_path)


def test_streaming_stores_write_exactly_the_whole_lines_of_a_run(tmp_path):
  _build_and_run("streamed_lines.cc", ["-march=native"], tmp_path)
