"""moe-ep: Mixture-of-Experts expert-parallel dispatch/combine, with a DeepEP-compatible `Buffer`.

    import moe_ep
    buffer = moe_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)   # as deep_ep.Buffer

See docs/python.md for what is identical to DeepEP and what differs.
"""
from .buffer import (Buffer, Config, EventOverlap, Group, HtHandle, LowLatencyHandle, UniqueId)
from . import _native

__all__ = ["Buffer", "Config", "EventOverlap", "Group", "UniqueId", "HtHandle", "LowLatencyHandle", "topk_idx_t"]


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
