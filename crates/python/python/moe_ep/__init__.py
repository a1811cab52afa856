"""moe-ep: Mixture-of-Experts expert-parallel dispatch/combine, with a DeepEP-compatible `Buffer`.

    import moe_ep
    buffer = moe_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)   # as deep_ep.Buffer

`moe_ep.utils` has DeepEP's helpers (`deep_ep.utils`) under the same names; the optional
`deep_ep` package (crates/python/deep_ep_alias) makes `import deep_ep` give all of this.
See docs/python.md for what is identical to DeepEP and what differs.
"""
from .buffer import (Buffer, Config, Group, HtHandle, LowLatencyHandle, UniqueId)
from .utils import EventHandle, EventOverlap
from . import _native, utils

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "Group", "UniqueId", "HtHandle", "LowLatencyHandle",
           "topk_idx_t", "utils"]


def _version():
    try:
        from importlib.metadata import version
        return version("moe-ep")
    except Exception:  # noqa: BLE001 (not installed as a distribution, e.g. on PYTHONPATH)
        return "0+unknown"


__version__ = _version()


def __getattr__(name):
    # DeepEP's index dtype: torch.int64 when torch is importable, else numpy's int64.
    if name == "topk_idx_t":
        try:
            import torch
            return torch.int64
        except ImportError:
            import numpy
            return numpy.int64
    raise AttributeError(f"module 'moe_ep' has no attribute {name!r}")
