#!/usr/bin/env bash
# Every GPU check and benchmark of the README, in order of value, each under its own time limit,
# for a GPU lease that allows one try. From the repository root:
#   benchmarks/cuda_all.sh OUTDIR
# writes OUTDIR/log.txt and the result files (JSON + markdown) of each step; copy those into
# benchmarks/results/. A step that runs out of time is reported and the next one runs.
set -uo pipefail
out=${1:?usage: benchmarks/cuda_all.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$out/log.txt") 2>&1

step() {
  local limit=$1
  shift
  echo "== $(date -u +%T) (limit ${limit} s) $*"
  timeout "$limit" "$@"
  echo "== $(date -u +%T) exit $?"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step "${TESTS_LIMIT:-110}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step "${PROFILE_LIMIT:-140}" python3 benchmarks/profile_block.py --device cuda --modes compiled --passes fwd,fwdbwd \
  --capacities 1.0,0.5,0.25,0.125 --top 0 --out "$out/cuda-profile-G1-device-time"
step "${MODEL_LIMIT:-170}" python3 benchmarks/model_bench.py --device cuda --no-kernels --out "$out/cuda-model"
step "${BLOCK_LIMIT:-170}" python3 benchmarks/block_bench.py --device cuda --rounds 9 --calls 10 --kernels \
  --out "$out/cuda-block-G1-calls10"
