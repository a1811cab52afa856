#!/usr/bin/env bash
# The C tests (crates/capi/tests/c, built by gpu-bundle against the bundle's c/ install) on
# the GPU:
#   1. every C test with ranks as threads of one process sharing the GPU (moe-ep's bootstrap id);
#   2. roundtrip with one process per rank under MPS (2 and 4 processes, moe-ep's bootstrap id);
#   3. roundtrip with groups from real NCCL communicators (ncclEpCreateGroup): one rank; one
#      rank per GPU when there are several; two ranks on GPU 0, which NCCL refuses ("Duplicate
#      GPU detected": reported, not counted); then 2 and 4 ranks on GPU 0 with a different
#      NCCL_HOSTID per rank (NCCL's duplicate check is per host), which NCCL accepts.
# MOE_EP_C_TIMEOUT: seconds per program (300). Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")" || exit 1
export LD_LIBRARY_PATH="$PWD/c/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOE_EP_DEVICE=${MOE_EP_DEVICE:-cuda}
# Rank threads: a comm stream and a caller stream each, more than the default 8 hardware
# queues (a kernel queued behind a peer's spinning one would wait for it).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
pass=0; fail=0
record() { # NAME STATUS
  if [ "$2" -eq 0 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAILED: $1 (exit status $2)"; fi
}

for t in c/bin/*; do
  for ranks in 4 8; do
    name=$(basename "$t")
    # abi_sizes uses no ranks; the docs' example is a CPU-emulator program (host memory).
    case "$name" in abi_sizes | example) [ "$ranks" = 8 ] && continue ;; esac
    device=$MOE_EP_DEVICE
    [ "$name" = example ] && device=cpu
    echo "--- $name (threads, MOE_EP_TEST_RANKS=$ranks, MOE_EP_DEVICE=$device)"
    MOE_EP_DEVICE=$device MOE_EP_TEST_RANKS=$ranks timeout "${MOE_EP_C_TIMEOUT:-300}" "$t"
    record "$name ($ranks ranks)" $?
  done
done

# One process per rank: MPS, or the processes time-slice the GPU.
unset CUDA_DEVICE_MAX_CONNECTIONS
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/moe-ep-mps}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/moe-ep-mps-log}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
for procs in 2 4; do
  echo "--- roundtrip (processes under MPS, MOE_EP_TEST_RANKS=$procs)"
  MOE_EP_TEST_PROCS=1 MOE_EP_TEST_RANKS=$procs timeout "${MOE_EP_C_TIMEOUT:-300}" c/bin/roundtrip
  record "roundtrip ($procs processes)" $?
done

# Real NCCL communicators. NCCL: MOE_EP_NCCL_LIBRARY, else the system's, else torch's wheel.
if [ -z "${MOE_EP_NCCL_LIBRARY:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2 '; then
  MOE_EP_NCCL_LIBRARY=$(python3 -c 'import glob, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print(next(iter(sorted(p for d in dirs for p in glob.glob(d + "/nvidia/nccl*/lib/libnccl.so.2"))), ""))' 2>/dev/null)
  export MOE_EP_NCCL_LIBRARY
fi
echo "NCCL: ${MOE_EP_NCCL_LIBRARY:-libnccl.so.2 (system)}"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "--- roundtrip (NCCL communicator, 1 rank)"
MOE_EP_TEST_NCCL=1 MOE_EP_TEST_RANKS=1 timeout "${MOE_EP_C_TIMEOUT:-300}" c/bin/roundtrip
record "roundtrip (NCCL, 1 rank)" $?
if [ "$gpus" -ge 2 ]; then
  n=$gpus; while [ $((8 % n)) -ne 0 ]; do n=$((n - 1)); done
  echo "--- roundtrip (NCCL communicator, $n ranks, one per GPU)"
  MOE_EP_TEST_NCCL=1 MOE_EP_TEST_RANKS=$n timeout "${MOE_EP_C_TIMEOUT:-300}" c/bin/roundtrip
  record "roundtrip (NCCL, $n GPUs)" $?
fi
echo "--- roundtrip (NCCL communicator, 2 ranks on GPU 0)"
MOE_EP_DEVICE=cuda:0 MOE_EP_TEST_NCCL=1 MOE_EP_TEST_RANKS=2 timeout "${MOE_EP_C_TIMEOUT:-300}" c/bin/roundtrip
status=$?
if [ "$status" -eq 3 ]; then
  echo "NCCL refuses two ranks on one GPU (its message is above): not counted; again with NCCL_HOSTID per rank"
else
  record "roundtrip (NCCL, 2 ranks on GPU 0)" $status
fi
# NCCL's duplicate-GPU check is per host: a different NCCL_HOSTID per rank lets ranks share a GPU.
for ranks in 2 4; do
  echo "--- roundtrip (NCCL communicator, $ranks ranks on GPU 0, NCCL_HOSTID per rank)"
  MOE_EP_DEVICE=cuda:0 MOE_EP_TEST_NCCL=1 MOE_EP_TEST_NCCL_HOSTID=1 MOE_EP_TEST_RANKS=$ranks timeout "${MOE_EP_C_TIMEOUT:-300}" c/bin/roundtrip
  record "roundtrip (NCCL, $ranks ranks on GPU 0, NCCL_HOSTID)" $?
done
echo quit | nvidia-cuda-mps-control

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
