#!/usr/bin/env bash
# The Python package (moe_ep) on the GPU with torch: installs the bundled abi3 wheel
# (python/moe_ep-*.whl) into a temporary --target folder, then runs our port of DeepEP's
# intranode and low-latency checks
#   1. as 8 ranks on one GPU, threads of one process (pytest python/tests/test_gpu_torch.py);
#   2. as 8 processes on one GPU under MPS, bootstrapped through a torch.distributed (gloo)
#      process group (torchrun python/tests/ep_torch_mp.py), docs/python.md's example, and a
#      DeepEP-style program run through `import deep_ep` (python/tests/deepep_style_mp.py).
# Needs python3 with torch (CUDA) and numpy; pytest is installed from python/wheels when
# missing. MOE_EP_PY_PROCS (default 8) processes, MOE_EP_TEST_TOKENS (default 1024) HT tokens
# per rank. Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pass=0
fail=0
site=$(mktemp -d /tmp/moe-ep-python.XXXXXX)
trap 'rm -rf "$site"' EXIT
if ! "$PY" -c "import torch, numpy; assert torch.cuda.is_available()"; then
  echo "python_torch: needs $PY with torch (CUDA) and numpy"
  echo "0 passed, 1 failed"
  exit 1
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
install() { # WHEEL...: into $site with pip, else by unpacking (a wheel is a zip; ours has no scripts)
  "$PY" -m pip install --quiet --no-deps --no-index --target "$site" "$@" && return 0
  echo "pip refused $* (platform tag? externally managed?); unpacking instead"
  local w
  for w in "$@"; do "$PY" -m zipfile -e "$w" "$site" || return 1; done
}
install python/moe_ep-*.whl || { echo "0 passed, 1 failed"; exit 1; }
if ! "$PY" -c "import pytest" 2>/dev/null; then
  install python/wheels/*.whl || { echo "no pytest"; echo "0 passed, 1 failed"; exit 1; }
fi
export PYTHONPATH="$site:$PWD/python/tests:$PWD/python/deep_ep_alias" # (deep_ep: moe-ep's alias package)
# Fail fast and say why: device-side waits and the bootstrap give up well inside the
# script's limit, and pytest prints short tracebacks (with a per-test limit when it can).
export MOE_EP_TIMEOUT_S=${MOE_EP_TIMEOUT_S:-20} MOE_EP_BOOTSTRAP_TIMEOUT_S=${MOE_EP_BOOTSTRAP_TIMEOUT_S:-60}
# Ranks share one GPU here: a kernel torch launches for the first time is loaded then (CUDA's
# lazy loading), and that load waits for the kernels running on the GPU — peers' collectives,
# which wait for this rank. moe-ep loads its own kernels up front; torch's must be too.
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
per_test=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout=240); fi

# 8 ranks' streams and 8 torch streams: more than the default 8 hardware queues (a kernel
# queued behind a peer's spinning one would wait for it: timeouts).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
echo "--- 8 ranks as threads of one process (CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS)"
if (cd python/tests && timeout 1200 "$PY" -m pytest -v --tb=short -p no:cacheprovider "${per_test[@]}" test_gpu_torch.py); then
  pass=$((pass + 1)); echo "python in-process: ok"
else
  fail=$((fail + 1)); echo "python in-process: FAILED"
fi

# One stream per process: no more hardware queues than the default (see multiprocess_mps.sh).
unset CUDA_DEVICE_MAX_CONNECTIONS
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/moe-ep-mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/moe-ep-mps-log}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
procs=${MOE_EP_PY_PROCS:-8}
echo "--- $procs processes under MPS, torch.distributed (gloo) bootstrap"
if (cd python/tests && timeout 1200 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" ep_torch_mp.py); then
  pass=$((pass + 1)); echo "python $procs processes under MPS: ok"
else
  fail=$((fail + 1)); echo "python $procs processes under MPS: FAILED"
  tail -20 "$CUDA_MPS_LOG_DIRECTORY"/control.log "$CUDA_MPS_LOG_DIRECTORY"/server.log 2>/dev/null
fi
echo "--- docs/python.md's example, $procs processes under MPS"
if (cd python/tests && timeout 600 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" example_torch.py); then
  pass=$((pass + 1)); echo "python example: ok"
else
  fail=$((fail + 1)); echo "python example: FAILED"
fi
echo "--- a DeepEP-style program (import deep_ep: Megatron's, vLLM's and SGLang's calls), $procs processes under MPS"
if (cd python/tests && timeout 600 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" deepep_style_mp.py); then
  pass=$((pass + 1)); echo "python DeepEP-style program: ok"
else
  fail=$((fail + 1)); echo "python DeepEP-style program: FAILED"
fi
echo quit | nvidia-cuda-mps-control
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
