#!/bin/bash
. /work/main/.venv/bin/activate
cd /tmp/ident
for code in old new; do
  if [ $code = old ]; then export PYTHONPATH=/tmp/exp/code; else export PYTHONPATH=/work/main; fi
  for m in clo sft dpo; do
    python -m clo train --method $m --max-steps 3 --max-length 128 --max-quads 8 --no-progress --output-dir /tmp/ident/$code-$m > $code-$m.log 2>&1
  done
  python -m clo eval --output-dir /tmp/ident/$code-clo --limit 4 --baseline none > $code-eval.log 2>&1
done
echo done > finished
