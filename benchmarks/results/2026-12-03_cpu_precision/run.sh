#!/usr/bin/env bash
# The figures of issue 27 in NOTES.md: BEFORE (a worktree of the commit before the change) against
# AFTER (this checkout), alone on the machine. Output: precision.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BEFORE=${BEFORE:-/tmp/clo-before}
AFTER=${AFTER:-$(cd "$here/../../.." && pwd)}
for shape in "--tokens 512 --vocab 16384" "--tokens 1024 --vocab 32768"; do
  PYTHONPATH=$BEFORE python "$here/precision.py" errors --hand-cast $shape
  PYTHONPATH=$AFTER python "$here/precision.py" errors $shape
done
for dtype in float32 bfloat16; do
  for pair in 1 2 3 4; do
    echo "before $(PYTHONPATH=$BEFORE python "$here/precision.py" time --dtype $dtype)"
    echo "after  $(PYTHONPATH=$AFTER python "$here/precision.py" time --dtype $dtype)"
  done
done
