#!/usr/bin/env bash
# The GPU tests and benchmarks of the README, each under its own time limit, for GPU leases that
# allow few tries. From the repository root:
#   benchmarks/cuda_all.sh OUTDIR [STEP...]      STEP: tests select profile model block compile (default: all six)
# writes OUTDIR/log.txt and each step's result files (JSON + markdown); copy those into
# benchmarks/results/. A step that runs out of time is reported (exit 124) and the next one runs.
# Durations seen on an H200 (torch 2.11, cold caches, 2026-11-27), compile included: profile 118-124 s
# (two capacities, fwd and fwd+bwd, with the generic-forms A/B), tests 108-120 s, model 178 s (it
# completes; an earlier 170-s limit cut it off), block not reached. Machine start took ~30 s.
# Later the same day, with the selection kernel: select 76 s, tests 174 s (13 tests), profile with --top 30 ~130 s,
# model 164 s. "select tests profile" (~6 min in practice) fits a 10-minute call; so do "model" and "block".
# 2026-11-28 on an H100: select (B=2, two --against kernels) 63 s, tests 139 s (15 tests), profile 113 s; compile cut
# off at its old 420-s limit after 6 of 8 samples (~65 s a sample, of which 16-34 s compile), so it gets a call of its own.
# 2026-12-04 on an H200: tests on four workers 115-127 s (20-31 tests), profile with --without (two switch sets) 159 s,
# model 174 s; the machine started in about 30 s. "tests model" (~5 min) fits one call.
set -uo pipefail
out=${1:?usage: benchmarks/cuda_all.sh OUTDIR [tests|select|profile|model|block|compile ...]}
shift
steps=${*:-tests select profile model block compile}
for name in $steps; do
  case "$name" in tests | select | profile | model | block | compile) ;;
    *) echo "unknown step $name (tests, select, profile, model, block, compile)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1

step() {
  local limit=$1
  shift
  echo "== $(date -u +%T) (limit ${limit} s) $*"
  timeout "$limit" "$@"
  local status=$?
  echo "== $(date -u +%T) exit ${status}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for name in $steps; do
  case "$name" in
    # Four workers: the machine has 16 cores, and compiling, not the GPU, sets the tests' time.
    tests) step 270 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_backend.py -k cuda ;;
    select) step 150 python3 benchmarks/select_bench.py --batches 2 --out "$out/cuda-select" ;;
    profile) step 300 python3 benchmarks/profile_block.py --device cuda --modes compiled --passes fwd,fwdbwd \
      --capacities 0.5,0.125 --generic-forms --without ONE_GRADIENT_BUFFER --top 0 --out "$out/cuda-profile-G1-device-time" ;;
    model) step 330 python3 benchmarks/model_bench.py --device cuda --no-kernels --out "$out/cuda-model" ;;
    block) step 270 python3 benchmarks/block_bench.py --device cuda --rounds 9 --calls 10 --kernels \
      --out "$out/cuda-block-G1-calls10" ;;
    compile) step 560 python3 benchmarks/compile_bench.py --device cuda --rounds 2 --out "$out/cuda-compile" ;;
  esac
done
