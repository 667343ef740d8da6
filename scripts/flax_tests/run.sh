#!/usr/bin/env bash
# Flax's own BatchNorm tests with jaxbn's classes swapped in, run outside the repository.
#
#   scripts/flax_tests/run.sh FLAX_GIT_DIR [CONFIG ...]     CONFIG: both linen nnx none
#
# FLAX_GIT_DIR: a git directory of google/flax (e.g. the mirror the `fetch` tool makes,
# /work/.mirror/google+flax/...). Its tests at FLAX_COMMIT (the code of the flax 0.12.8 wheel;
# the mirror has no v0.12.8 tag) are extracted into a scratch folder, never into this
# repository; this folder holds only jaxbn's harness: conftest.py swaps flax.linen.BatchNorm
# and/or flax.nnx.BatchNorm for jaxbn's before any test module imports them, test_ids.txt
# lists the 128 tests that build a BatchNorm, pytest.ini is Flax's own pytest config.
# Configs: both swapped; linen only / nnx only (jaxbn against real Flax); none (Flax itself).
# One pytest process per test file: an exception inside nnx.tabulate leaves Flax's method
# wrappers installed for the rest of a process, and one failure would cascade.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
flax_git=${1:?usage: run.sh FLAX_GIT_DIR [both|linen|nnx|none ...]}; shift
configs=${*:-both linen nnx none}
FLAX_COMMIT=${FLAX_COMMIT:-18f8f311c275d57f46d95e41b15aa97b454754c0}
PY=${PY:-$repo/.venv/bin/python}
scratch=${SCRATCH:-${TMPDIR:-/tmp}/jaxbn-flax-tests}
rm -rf "$scratch" && mkdir -p "$scratch/site" && cd "$scratch" || exit 1
# The subtree alone: a mirror may lack blobs elsewhere in the tree (large notebooks).
git --git-dir="$flax_git" archive --prefix=tests/ "$FLAX_COMMIT:tests" | tar -x || exit 1
cp "$here/conftest.py" "$here/pytest.ini" "$here/test_ids.txt" "$here/summarize.py" .
# tests/nnx/module_test.py imports cloudpickle; installed beside the tests, not into the venv.
"$PY" -c "import cloudpickle" 2>/dev/null || "$PY" -m pip install -q --target site cloudpickle
# Flax's CI environment (tests/run_all_tests.sh): rank promotion raises, 4 host devices.
export JAX_NUMPY_RANK_PROMOTION=raise FLAX_PROFILE=1 PYTHONPATH=$scratch/site
export XLA_FLAGS=--xla_force_host_platform_device_count=4
for cfg in $configs; do
  mkdir -p "results/$cfg"
  for f in $(cut -d: -f1 test_ids.txt | uniq); do
    name=$(echo "$f" | sed 's#^tests/##; s#/#_#g; s#\.py$##')
    JAXBN_SWAP=$cfg timeout 900 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short \
      --junitxml="results/$cfg/$name.xml" $(grep "^$f::" test_ids.txt) \
      > "results/$cfg/$name.log" 2>&1
  done
  "$PY" summarize.py "$cfg" | tee "results/$cfg.summary"
done
echo "logs: $scratch/results"
