#!/usr/bin/env bash
# Runs the test suite; extra arguments go to pytest.
#
# Python: $SALE_PYTHON when set, used as it is (a machine whose Python already holds jax and pytest, such as a GPU
# machine without a package index); otherwise .venv, made or refreshed by scripts/setup.sh.
# Without a GPU: one pytest run, with the Pallas kernels in interpret mode.
# When JAX sees a GPU and no arguments are given: the kernels run natively, in parallel groups of test files, each
# its own pytest process sharing the GPU (memory allocated on demand, not preallocated); each group's summary is
# printed, and the run fails if any group does.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SALE_PYTHON:-}" ]; then
  python=$SALE_PYTHON
else
  bash scripts/setup.sh
  python=.venv/bin/python
fi

backend=$("$python" -c 'import jax; print(jax.default_backend())')
if [ "$backend" != gpu ] || [ $# -gt 0 ]; then
  exec "$python" -m pytest -q "$@"
fi

# One group per kernel family, one for the models, one for the experiment scripts (the longest runs), and the rest.
groups=(mosaic_estimate mosaic_attention triton_kernels models scripts rest)
declare -A files=(
  [mosaic_estimate]=tests/test_mosaic_estimate.py
  [mosaic_attention]=tests/test_mosaic_sparse_attention.py
  [triton_kernels]=tests/test_pallas_kernels.py
  [models]="tests/test_llama.py tests/test_retrieval_model.py tests/test_retrieval_task.py"
  [scripts]=tests/test_experiments.py
)
rest_args=(tests)
# shellcheck disable=SC2086  # a group's file list splits into one --ignore per file
for file in ${files[*]}; do rest_args+=(--ignore="$file"); done
files[rest]="${rest_args[*]}"

logs=$(mktemp -d)
declare -A pids
echo "test: JAX sees a GPU; ${#groups[@]} pytest groups in parallel: ${groups[*]}"
for group in "${groups[@]}"; do
  # shellcheck disable=SC2086  # a group's file list splits into pytest arguments
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$python" -m pytest -q -p no:cacheprovider ${files[$group]} \
    >"$logs/$group.log" 2>&1 &
  pids[$group]=$!
done

failed=()
for group in "${groups[@]}"; do
  status=0
  wait "${pids[$group]}" || status=$?
  echo "=== $group: ${files[$group]} (exit $status)"
  cat "$logs/$group.log"
  [ "$status" -eq 0 ] || failed+=("$group")
done
echo "=== summary"
for group in "${groups[@]}"; do
  printf '%-19s %s\n' "$group" "$(tail -n 1 "$logs/$group.log")"
done
rm -rf "$logs"
if [ ${#failed[@]} -gt 0 ]; then
  echo "test: failed groups (exit 5 means no tests collected): ${failed[*]}" >&2
  exit 1
fi
