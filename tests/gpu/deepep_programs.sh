#!/usr/bin/env bash
# DeepEP's own test programs run against moe-ep, unchanged: the `deep_ep` alias package
# (crates/python/deep_ep_alias) is on PYTHONPATH, so their `import deep_ep` gets moe_ep and
# `deep_ep.utils` moe-ep's versions of DeepEP's helpers. DeepEP's files are not part of moe-ep: point DEEPEP_TESTS at a folder holding
# test_intranode.py and test_low_latency.py (DeepEP's tests/legacy/). On one GPU the
# processes share it under MPS. MOE_EP_DEEPEP_PROCS (default 8) processes.
# Last line: "N passed, M failed".
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
dir=${DEEPEP_TESTS:-}
if [ -z "$dir" ] || [ ! -f "$dir/test_intranode.py" ]; then
  echo "deepep_programs: NOT RUN: set DEEPEP_TESTS to a folder with DeepEP's tests/legacy/test_intranode.py and test_low_latency.py"
  echo "0 passed, 0 failed"
  exit 0
fi
procs=${MOE_EP_DEEPEP_PROCS:-8}
site=$(mktemp -d /tmp/moe-ep-deepep.XXXXXX)
trap 'rm -rf "$site"' EXIT
"$PY" -m pip install --quiet --no-deps --no-index --target "$site" python/moe_ep-*.whl 2>/dev/null ||
  for w in python/moe_ep-*.whl; do "$PY" -m zipfile -e "$w" "$site"; done
export PYTHONPATH="$site:$PWD/python/deep_ep_alias:$dir" PYTHONUNBUFFERED=1
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER} MOE_EP_TIMEOUT_S=${MOE_EP_TIMEOUT_S:-30}
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/moe-ep-mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/moe-ep-mps-log}
started=0
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -lt "$procs" ]; then
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && started=1 && echo "MPS daemon started"
fi
pass=0
fail=0
for prog in test_intranode.py test_low_latency.py; do
  echo "=== DeepEP's $prog, $procs processes"
  if (cd "$dir" && timeout 600 "$PY" "$prog" --num-processes "$procs" ${DEEPEP_ARGS:-}); then
    pass=$((pass + 1)); echo "$prog: ok"
  else
    fail=$((fail + 1)); echo "$prog: FAILED"
  fi
done
[ "$started" = 1 ] && echo quit | nvidia-cuda-mps-control
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
