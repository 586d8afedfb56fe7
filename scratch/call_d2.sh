#!/bin/bash
# Failing native tests (logged) beside a 128K fine-tune of the retrieval model; then a dense check at every depth.
set -x
M=experiments/results/retrieval_training_128k/h200/checkpoint
mkdir -p /tmp/keep
git log --oneline -1
( XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 400 python3 -m pytest -q -p no:cacheprovider -rf --tb=long \
    tests/test_pallas_kernels.py tests/test_query_chunks.py tests/test_budget_calibration.py \
    tests/test_estimate_candidates.py > $OUT/tests.log 2>&1; echo "tests rc $?" >> $OUT/tests.log ) &
TESTS=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 -m experiments.retrieval.train --output_dir=/tmp/run --init_checkpoint=$M \
  --curriculum=131072:800 --replay_fraction=0.2 --placed_fraction=0.75 --learning_rate=2e-4 --warmup_steps=20 \
  --seed=3 --data_workers=8 --time_limit_s=400 > /tmp/keep/train.log 2>&1
echo "train rc $?"; tail -c 400 /tmp/keep/train.log
python3 -m experiments.retrieval.export_checkpoint --checkpoint=/tmp/run --dtype=bfloat16 --output_dir=/tmp/keep/checkpoint > /tmp/keep/export.log 2>&1
echo "export rc $?"
cp /tmp/run/train_state.json /tmp/run/train_log.jsonl /tmp/keep/
tar czf $OUT/d.tgz -C /tmp keep && ls -la $OUT
timeout 110 python3 -m experiments.accuracy.retrieval_eval --checkpoint=/tmp/keep/checkpoint --sequences=16 \
  --lengths=4096,16384,65536,131072 --recipes= --uniform_taus= --output=/tmp/keep/depth_check.json > /tmp/keep/depth.log 2>&1
echo "depth rc $?"; grep -v "^I1\|^W1" /tmp/keep/depth.log | tail -25
tar czf $OUT/d.tgz -C /tmp keep && ls -la $OUT
wait $TESTS
grep -E "passed|failed|^FAILED|^E " $OUT/tests.log | head -40
