#!/bin/bash
# The payoff study on the committed 128K model (end-scored thresholds first), then the demo at 128K.
set -x
M=experiments/results/retrieval_training_128k/h200/checkpoint
S=$OUT/study
mkdir -p $S $OUT/demo
git log --oneline -1
python3 -m experiments.tools.calibrate --checkpoint=$M --prompts=retrieval --seq_len=32768 --num_samples=4 \
  --recipe=kl_budget --kl_budget=0.01 --scored=end --output=$S/end_scored.json > $S/end_scored.log 2>&1
echo "end rc $?"; tail -3 $S/end_scored.log
timeout 420 python3 -m experiments.accuracy.retrieval_eval --checkpoint=$M --sequences=16 \
  --lengths=4096,16384,65536,131072 --recipes=paper,kl_budget --costs=first_order,l1 \
  --thresholds=$S/end_scored.json --calibration_samples=4 --calibration_length=32768 --uniform_taus=0.1,1,16.384 \
  --prefill_repeats=10 --output=$S/retrieval_eval.json > $S/study.log 2>&1
echo "study rc $?"; grep -v "^I1\|^W1" $S/study.log | tail -40
timeout 90 python3 -m experiments.demo --thresholds=$S/thresholds_kl_budget_0.01.json --output=$OUT/demo/demo.json > $OUT/demo/demo.log 2>&1
echo "demo rc $?"; tail -25 $OUT/demo/demo.log
