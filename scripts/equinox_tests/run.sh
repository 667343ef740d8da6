#!/usr/bin/env bash
# Equinox's own tests with jaxbn's BatchNorm swapped in, run outside the repository.
#
#   scripts/equinox_tests/run.sh EQUINOX_GIT_DIR [CONFIG ...]     CONFIG: none eqx
#
# EQUINOX_GIT_DIR: a git directory of patrick-kidger/equinox (e.g. the mirror the `fetch` tool
# makes, /work/.mirror/patrick-kidger+equinox/repo). Its tests at EQUINOX_REF (v0.13.8, the
# installed wheel's version) are extracted into a scratch folder, never into this repository;
# this folder holds only jaxbn's harness: conftest.py swaps equinox.nn.BatchNorm for
# jaxbn.equinox.BatchNorm at session start, pytest.ini is Equinox's own pytest config
# (jaxtyping + beartype on equinox, warnings as errors); Equinox's tests/conftest.py sets
# strict dtype promotion, raising rank promotion and 2 CPU devices.
# Configs: none (Equinox itself), eqx (jaxbn's class in place of Equinox's).
# Each test file runs in its own pytest process; the summary counts every test of the files
# and lists the tests that did not pass and those that built a BatchNorm.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
eqx_git=${1:?usage: run.sh EQUINOX_GIT_DIR [none|eqx ...]}; shift
configs=${*:-none eqx}
EQUINOX_REF=${EQUINOX_REF:-v0.13.8}
FILES=${FILES:-test_nn.py test_stateful.py test_serialisation.py}
PY=${PY:-$repo/.venv/bin/python}
scratch=${SCRATCH:-${TMPDIR:-/tmp}/jaxbn-equinox-tests}
installed=$("$PY" -c "import equinox; print(equinox.__version__)")
[ "v$installed" = "$EQUINOX_REF" ] || echo "note: equinox $installed installed, tests from $EQUINOX_REF"
rm -rf "$scratch" && mkdir -p "$scratch/site" && cd "$scratch" || exit 1
git --git-dir="$eqx_git" archive --prefix=tests/ "$EQUINOX_REF:tests" | tar -x || exit 1
cp "$here/conftest.py" "$here/pytest.ini" .
# Equinox's test dependencies (its `tests` group) beside the tests, not into the venv.
"$PY" -c "import beartype" 2>/dev/null || "$PY" -m pip install -q --target site beartype
export PYTHONPATH=$scratch/site
for cfg in $configs; do
  mkdir -p "results/$cfg"
  for f in $FILES; do
    JAXBN_SWAP=$cfg timeout 900 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short \
      "tests/$f" > "results/$cfg/${f%.py}.log" 2>&1
    log="results/$cfg/${f%.py}.log"
    echo "$cfg tests/$f: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran|error' "$log" \
      | tail -1) -- $(grep -o 'equinox.nn.BatchNorm is .*' "$log")"
    grep -E '^(FAILED|ERROR|SKIPPED)' "$log"
  done | tee "results/$cfg.summary"
done
echo "logs: $scratch/results"
