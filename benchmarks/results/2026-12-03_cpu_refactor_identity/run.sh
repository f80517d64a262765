#!/bin/bash
# usage: run.sh OUTROOT  -- 3-step clo/sft/dpo runs and eval on each
set -e
R=$1
for m in clo sft dpo; do
  clo train --method $m --max-steps 3 --output-dir $R/$m --no-progress --seed 0 > $R/$m.train.log 2>&1
  clo eval --output-dir $R/$m --limit 4 --max-new-tokens 24 > $R/$m.eval.log 2>&1
done
echo done > $R/DONE
