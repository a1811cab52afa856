#!/usr/bin/env bash
# Issue 5: HT and LL with one process per GPU (CUDA IPC-shared buffers, peer access over
# NVLink): bin/moe-ep-tests-multiprocess_ep with 2, 4 and 8 processes (those <= the GPU
# count), each process on GPU LOCAL_RANK. Every process checks its rank bit for bit against
# the CPU reference; hashes of 20 reruns / 100 graph replays are compared with the parent's.
# With fewer than 2 GPUs nothing runs: it says so and ends "0 passed, 0 failed".
# MOE_EP_MULTIGPU_DEVICE=cpu dry-runs the script on the emulator (with a stand-in nvidia-smi).
# Last line: "N passed, M failed" (N, M = test cases over all process counts).
set -u
cd "$(dirname "$0")"
export NCCL_NVLS_ENABLE=0 # never NVLink multicast
# One stream per process: the default hardware queues suffice (see multiprocess_mps.sh).
unset CUDA_DEVICE_MAX_CONNECTIONS
bin=bin/moe-ep-tests-multiprocess_ep
[ -x "$bin" ] || { echo "multigpu: $bin missing"; echo "0 passed, 1 failed"; exit 1; }
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
fi
nvidia-smi topo -m 2>/dev/null | head -12
echo "multigpu: $gpus GPU(s) visible"
if [ "$gpus" -lt 2 ]; then
  echo "multigpu: SKIPPED, not run: one process per GPU needs at least 2 GPUs (this is not a pass)"
  echo "0 passed, 0 failed"
  exit 0
fi
pass=0
fail=0
for procs in 2 4 8; do
  [ "$procs" -le "$gpus" ] || continue
  log=/tmp/moe-ep-multigpu-$procs.log
  echo "--- $procs processes, one per GPU"
  MOE_EP_DEVICE=${MOE_EP_MULTIGPU_DEVICE:-cuda} MOE_EP_TEST_PROCS=$procs MOE_EP_TEST_MP_TIMEOUT_S=${MOE_EP_MP_TIMEOUT_S:-240} \
    timeout -k 10 270 "$bin" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # The binary's summary: "test result: ok. P passed; F failed; ..."
  read -r p f < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed;.*/\1 \2/p' "$log" | tail -1)
  p=${p:-0}
  f=${f:-0}
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "multigpu: $procs processes: exit status $rc"; fi
  pass=$((pass + p))
  fail=$((fail + f))
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
