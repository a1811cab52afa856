#!/usr/bin/env bash
# `bench_py.py` (the Python Buffer timed DeepEP's way) with one process per rank: 8 processes
# (MOE_EP_PY_PROCS) sharing the GPU under MPS when there are fewer GPUs, else one per GPU;
# both HT memory variants (the default output heap, and rings only). Rows go to OUT/bench.csv.
#   ./bench_py.sh OUT_DIR        (in the GPU bundle; `cargo xtask bench py` elsewhere)
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
out=${1:?usage: bench_py.sh OUT_DIR}
mkdir -p "$out"
if [ -n "${MOE_EP_PYTHON_SITE:-}" ]; then
  site=$MOE_EP_PYTHON_SITE
else
  site=$(mktemp -d /tmp/moe-ep-benchpy.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$PY" -m pip install --quiet --no-deps --no-index --target "$site" python/moe_ep-*.whl 2>/dev/null ||
    for w in python/moe_ep-*.whl; do "$PY" -m zipfile -e "$w" "$site"; done
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
export MOE_EP_TIMEOUT_S=${MOE_EP_TIMEOUT_S:-30} OMP_NUM_THREADS=1
procs=${MOE_EP_PY_PROCS:-8}
started=0
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -lt "$procs" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/moe-ep-mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/moe-ep-mps-log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && started=1
fi
rc=0
for v in default rings; do
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" bench_py.py \
    --variant "$v" --csv "$out/bench.csv" || rc=1
done
[ "$started" = 1 ] && echo quit | nvidia-cuda-mps-control
exit $rc
