#!/bin/bash
# Native suite beside a 128K fine-tune of the retrieval model; then a per-depth dense check at 128K.
set -x
M=experiments/results/retrieval_training_128k/h200/checkpoint
nvidia-smi --query-gpu=name,memory.used --format=csv
git log --oneline -1
mkdir -p $OUT/suite
( SALE_PYTHON=python3 timeout 500 bash scripts/test.sh > $OUT/suite/suite.log 2>&1; echo "suite rc $?" >> $OUT/suite/suite.log ) &
SUITE=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 -m experiments.retrieval.train --output_dir=/tmp/run --init_checkpoint=$M --curriculum=131072:650 \
  --replay_fraction=0.2 --placed_fraction=0.75 --learning_rate=1.5e-4 --warmup_steps=20 --seed=2 --data_workers=8 \
  --time_limit_s=370 --eval_lengths=4096,16384,65536,131072 --eval_sequences=32 > $OUT/train.log 2>&1
echo "train rc $?"; tail -5 $OUT/train.log
python3 -m experiments.retrieval.export_checkpoint --checkpoint=/tmp/run --dtype=bfloat16 --output_dir=/tmp/new/checkpoint > $OUT/export.log 2>&1
echo "export rc $?"
mkdir -p $OUT/new && cp -r /tmp/new/checkpoint $OUT/new/ && cp /tmp/run/train_state.json /tmp/run/train_log.jsonl /tmp/run/eval.json $OUT/new/
python3 -c "
import json;d=json.load(open('/tmp/run/eval.json'))
for k,v in d['results'].items(): print(k, v['exact_match'], v['queries'])"
timeout 100 python3 -m experiments.accuracy.retrieval_eval --checkpoint=/tmp/new/checkpoint --sequences=16 \
  --lengths=131072 --depths=0,0.25,0.5 --recipes= --uniform_taus=1 --output=$OUT/new/depth_check.json > $OUT/depth.log 2>&1
echo "depth rc $?"; grep -v "^I\|^W" $OUT/depth.log | tail -15
wait $SUITE
tail -30 $OUT/suite/suite.log
