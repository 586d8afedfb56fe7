#!/bin/bash
# Native check of the key-chunked estimate and query chunks; streaming heads' speed at 128K; SALE at 256K-1M.
set -x
mkdir -p $OUT/bench
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 110 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
  tests/test_query_chunks.py tests/test_mosaic_estimate.py > $OUT/tests.log 2>&1; echo "tests rc $?"
grep -E "passed|failed|^FAILED" $OUT/tests.log | head
timeout 80 python3 -m experiments.benchmarks.attention --backend=mosaic_gpu --lengths=131072 --taus= \
  --densities=0.1 --streaming_fractions=0.5,0.75 --baselines=false --repeats=5 \
  --output=$OUT/bench/attention.json 2>&1 | grep -v "^I1\|^W1" | tail -6
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 290 python3 -m experiments.benchmarks.long_context \
  --lengths=262144,524288,1048576 --output=$OUT/bench/long_context.json 2>&1 | grep -v "^I1\|^W1" | tail -12
nvidia-smi --query-gpu=memory.used --format=csv
