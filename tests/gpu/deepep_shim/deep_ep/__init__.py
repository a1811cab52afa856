"""A stand-in `deep_ep` package for running DeepEP's own test programs against moe-ep.

DeepEP's tests (`tests/legacy/test_intranode.py`, `test_low_latency.py`) do `import deep_ep`
and use helpers from `deep_ep.utils`. With this folder first on PYTHONPATH, `deep_ep` *is*
`moe_ep` (what a framework gets by `import moe_ep as deep_ep`), and `deep_ep.utils` holds
moe-ep's own versions of those helpers (rank setup over gloo, so that ranks may share a GPU
under MPS; fp8 casts; timing), so the test programs run unchanged.
"""
from moe_ep import *  # noqa: F401,F403
from moe_ep import Buffer, Config, EventOverlap, topk_idx_t  # noqa: F401
from . import utils  # noqa: F401
