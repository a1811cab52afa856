#!/usr/bin/env bash
# The C tests (crates/capi/tests/c, built by gpu-bundle against the bundle's c/ install) on
# the GPU: ranks as threads of one process sharing the GPU, through moe-ep's bootstrap id.
set -u
cd "$(dirname "$0")" || exit 1
export LD_LIBRARY_PATH="$PWD/c/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOE_EP_DEVICE=${MOE_EP_DEVICE:-cuda}
status=0
for t in c/bin/*; do
  for ranks in 4 8; do
    name=$(basename "$t")
    # abi_sizes uses no ranks; the docs' example is a CPU-emulator program (host memory).
    case "$name" in abi_sizes | example) [ "$ranks" = 8 ] && continue ;; esac
    device=$MOE_EP_DEVICE
    [ "$name" = example ] && device=cpu
    echo "--- $name (MOE_EP_TEST_RANKS=$ranks, MOE_EP_DEVICE=$device)"
    MOE_EP_DEVICE=$device MOE_EP_TEST_RANKS=$ranks timeout 300 "$t" || { echo "FAILED: $name ($ranks ranks)"; status=1; }
  done
done
exit $status
