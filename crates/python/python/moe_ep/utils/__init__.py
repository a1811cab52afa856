"""moe-ep's versions of DeepEP's helpers (`deep_ep.utils`), under the same names:

* `EventHandle`, `EventOverlap` (`utils.event`): events between streams;
* `utils.envs` (rank setup: `init_dist`, seeds, `check_nvlink_connections`), `utils.math`
  (`per_token_cast_to_fp8`, `per_token_cast_back`, `calc_diff`, ...) and `utils.testing`
  (`bench`, `bench_kineto`) for DeepEP-style test programs; they need torch and are imported
  when first used.
"""
import importlib

from .event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap", "envs", "math", "testing"]


def __getattr__(name):
    if name in ("envs", "math", "testing"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
