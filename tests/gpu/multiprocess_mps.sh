#!/usr/bin/env bash
# Ranks as separate processes sharing one GPU under MPS (without MPS they time-slice and a
# flag hand-off takes hundreds of ms). Starts the MPS daemon, runs the multi-process tests
# (bin/moe-ep-tests-multiprocess, and bin/moe-ep-tests-multiprocess_ep: issue 5's HT + LL
# cases over CUDA IPC, here every process on GPU 0) with 2 and 4 processes, stops the
# daemon. Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")"
bins=(bin/moe-ep-tests-multiprocess bin/moe-ep-tests-multiprocess_ep)
for bin in "${bins[@]}"; do
  [ -x "$bin" ] || { echo "$bin missing"; echo "0 passed, 1 failed"; exit 1; }
done
# Each MPS client asks for CUDA_DEVICE_MAX_CONNECTIONS hardware channels; 4 clients x 32
# exhausted them (cuDevicePrimaryCtxRetain: out of memory, H100, 2026-11-25). One stream
# per process needs no more than the default.
unset CUDA_DEVICE_MAX_CONNECTIONS
export CUDA_MPS_PIPE_DIRECTORY=/tmp/moe-ep-mps CUDA_MPS_LOG_DIRECTORY=/tmp/moe-ep-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
pass=0; fail=0
for bin in "${bins[@]}"; do
  for procs in 2 4; do
    log=/tmp/moe-ep-mps-$(basename "$bin")-$procs.log
    if MOE_EP_DEVICE=cuda MOE_EP_TEST_PROCS=$procs timeout 300 "$bin" --test-threads=1 2>&1 | tee "$log" | grep -q "test result: ok"; then
      pass=$((pass + 1)); echo "$(basename "$bin") under MPS, $procs processes: ok ($(grep "test result" "$log" | tail -1))"
    else
      fail=$((fail + 1)); echo "$(basename "$bin") under MPS, $procs processes: FAILED"; tail -40 "$log"
      tail -20 "$CUDA_MPS_LOG_DIRECTORY"/control.log "$CUDA_MPS_LOG_DIRECTORY"/server.log 2>/dev/null
    fi
  done
done
echo quit | nvidia-cuda-mps-control
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
