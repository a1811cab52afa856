"""`deep_ep`, served by moe-ep.

With this package installed (`pip install ./crates/python/deep_ep_alias`, or its folder on
PYTHONPATH), `import deep_ep` gives moe-ep: `deep_ep.Buffer` is `moe_ep.Buffer`, and every
submodule `deep_ep.X` is the module `moe_ep.X` itself (`deep_ep.utils`, `deep_ep.utils.event`,
`deep_ep.utils.math`, ...), so code written for DeepEP runs unchanged. docs/python.md says what
differs from DeepEP.
"""
import importlib
import importlib.abc
import importlib.util
import sys

import moe_ep
from moe_ep import *  # noqa: F401,F403
from moe_ep import Buffer, Config, EventHandle, EventOverlap, utils  # noqa: F401

__version__ = moe_ep.__version__


class _MoeEpModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `deep_ep.X` as the already-importable `moe_ep.X` (the same module object, so
    nothing runs twice and classes compare equal)."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith(__name__ + "."):
            return None
        if importlib.util.find_spec("moe_ep" + name[len(__name__):]) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module = importlib.import_module("moe_ep" + spec.name[len(__name__):])
        spec.loader_state = module.__spec__  # the import system replaces the module's spec next
        return module

    def exec_module(self, module):
        # Already executed as moe_ep's: only give it its own spec back.
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _MoeEpModules())


def __getattr__(name):
    return getattr(moe_ep, name)  # topk_idx_t and anything moe_ep resolves lazily
