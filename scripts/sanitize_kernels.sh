#!/usr/bin/env bash
# Builds jaxbn's C++ CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer, runs the
# kernel tests against that build, and exits non-zero on any sanitizer report or test failure.
# Takes minutes (16 measured on 2 cores shared with other jobs: 7 for the instrumented
# compile, 8 for the tests). CI does not run it: run it whenever jaxbn/csrc changes.
#
#   scripts/sanitize_kernels.sh                 # tests/cpu/test_kernels.py, test_kernels_streaming.py
#   scripts/sanitize_kernels.sh -k masked       # extra arguments go to pytest
#
# Environment: PYTHON (default .venv/bin/python), CXX (default g++; must be GCC or Clang).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
cxx=${CXX:-g++}
work=$(mktemp -d "${TMPDIR:-/tmp}/jaxbn-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The runtimes the instrumented library needs, preloaded into Python (which is not built with
# them). libasan must come first; libstdc++ with it, or jaxlib throws at start.
runtimes=()
for lib in libasan.so libubsan.so libstdc++.so; do
  path=$(readlink -f "$($cxx -print-file-name=$lib)")
  [[ -f $path ]] || { echo "sanitize_kernels: $cxx has no $lib" >&2; exit 2; }
  runtimes+=("$path")
done

# Its own cache: the instrumented build never replaces the normal one (the flags are part of
# the cache key anyway).
mkdir -m 755 "$work/cache"
export JAXBN_CACHE_DIR=$work/cache
export JAXBN_CXXFLAGS_EXTRA="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
export JAXBN_COMPILE_TIMEOUT=1200  # instrumented builds are several times slower
export CXX=$cxx
unset JAXBN_CPU_KERNEL

echo "sanitize_kernels: compiling with $JAXBN_CXXFLAGS_EXTRA"
# Compile without the preload (the compiler need not run instrumented); loading waits for pytest.
library=$("$python" -c 'import os, shlex
from jaxbn._cpu import build
print(build.verified_library(shlex.split(os.environ["CXX"]))[0])')
# grep -q exits at the first match; with pipefail a piped nm killed by SIGPIPE would fail the test.
grep -q __asan_init <(nm -D "$library") || { echo "sanitize_kernels: $library is not instrumented" >&2; exit 2; }

# Any report aborts the process that hit it (pytest, or a test's subprocess) and is written to
# report.<pid>, so that one in a subprocess whose output a test swallowed still counts.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$work/report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/report"
status=0
LD_PRELOAD="${runtimes[*]}" "$python" -m pytest -q -p no:cacheprovider tests/cpu/test_kernels.py tests/cpu/test_kernels_streaming.py "$@" \
  || status=$?

if compgen -G "$work/report.*" > /dev/null; then
  cat "$work"/report.* >&2
  echo "sanitize_kernels: sanitizer reports above" >&2
  status=1
fi
echo "sanitize_kernels: exit status $status after $((SECONDS - start)) s"
exit $status
