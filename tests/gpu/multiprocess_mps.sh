#!/usr/bin/env bash
# Ranks as separate processes sharing one GPU under MPS (without MPS they time-slice and a
# flag hand-off takes hundreds of ms). Starts the MPS daemon, runs the multi-process tests
# with 2 and 4 processes, stops the daemon. Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")"
bin=$(ls bin/*multiprocess* 2>/dev/null | head -1)
[ -n "$bin" ] || { echo "no multiprocess test binary"; echo "0 passed, 1 failed"; exit 1; }
# Each MPS client asks for CUDA_DEVICE_MAX_CONNECTIONS hardware channels; 4 clients x 32
# exhausted them (cuDevicePrimaryCtxRetain: out of memory, H100, 2026-11-25). One stream
# per process needs no more than the default.
unset CUDA_DEVICE_MAX_CONNECTIONS
export CUDA_MPS_PIPE_DIRECTORY=/tmp/moe-ep-mps CUDA_MPS_LOG_DIRECTORY=/tmp/moe-ep-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
pass=0; fail=0
for procs in 2 4; do
  if MOE_EP_DEVICE=cuda MOE_EP_TEST_PROCS=$procs timeout 300 "$bin" --test-threads=1 2>&1 | tee /tmp/moe-ep-mps-$procs.log | grep -q "test result: ok"; then
    pass=$((pass + 1)); echo "multiprocess under MPS, $procs processes: ok"
  else
    fail=$((fail + 1)); echo "multiprocess under MPS, $procs processes: FAILED"; tail -40 /tmp/moe-ep-mps-$procs.log
    tail -20 "$CUDA_MPS_LOG_DIRECTORY"/control.log "$CUDA_MPS_LOG_DIRECTORY"/server.log 2>/dev/null
  fi
done
echo quit | nvidia-cuda-mps-control
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
