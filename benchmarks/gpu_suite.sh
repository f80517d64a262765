#!/usr/bin/env bash
# One prepared run for a GPU machine without network: the GPU tests, then the benchmarks.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]      (default: $OUT when set, else benchmarks/results)
#
# Runs from the repository root with the machine's own torch / triton / pytest; the checkout
# is put on PYTHONPATH, nothing is installed. Wheels for packages the machine lacks may be
# carried in .whl/ (see the README); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export CLO_COMMIT=${CLO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"

status=0
timeout 240 python3 -m pytest tests -q --maxfail=10 -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
timeout 200 python3 benchmarks/bench_head.py --out "$RESULTS" 2>&1 | tee "$RESULTS/bench_head.log" || status=1
exit $status
