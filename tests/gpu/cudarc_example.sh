#!/usr/bin/env bash
# host/examples/cudarc.rs on the GPU: ranks (threads) dispatch and combine tensors that live
# in cudarc CudaSlices on the program's own CudaStream; it checks the result itself.
set -u
cd "$(dirname "$0")" || exit 1
status=0
for ranks in 2 8; do
  echo "--- moe-ep-cudarc $ranks"
  timeout 300 bin/moe-ep-cudarc "$ranks" || { echo "FAILED: cudarc example, $ranks ranks"; status=1; }
done
exit $status
