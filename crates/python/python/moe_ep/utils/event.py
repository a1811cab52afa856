"""Events between streams, as DeepEP's `deep_ep.utils` has them: `EventHandle` (a CUDA event)
and `EventOverlap` (an op's event plus the tensors to keep alive until it is waited for).

    handle = EventHandle()                        # recorded on torch's current stream, now
    buffer.dispatch(..., previous_event=EventOverlap(handle), async_finish=True)

On the CPU back end every op is finished when it returns: events are empty and waits return
at once. No torch is needed to import this module.
"""
import sys

from .. import _native
from .. import _tensors as tz


class EventHandle:
    """A CUDA event. `EventHandle()` records one on torch's current stream (DeepEP's
    constructor); ops return ones recorded on the buffer's comm stream.
    `current_stream_wait()` makes torch's current stream wait for it."""

    def __init__(self):
        self._native, self._device = None, "cpu"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            self._device = f"cuda:{torch.cuda.current_device()}"
            self._native = _native.record_event(self._device, tz.current_stream(self._device))

    @classmethod
    def _of(cls, native, device):
        """The event an op recorded (None when the op is already complete)."""
        if native is None:
            return None
        handle = cls.__new__(cls)
        handle._native, handle._device = native, device
        return handle

    def current_stream_wait(self):
        if self._native is not None:
            self._native.wait(tz.current_stream(self._device))


class EventOverlap:
    """An op's event (`async_finish=True`), or none. `current_stream_wait()` makes torch's
    current stream wait for it and returns what a hook registered with
    `register_hook_after_wait` returns; `with event:` waits on exit (`with event(release_handle=True):`
    also drops the event). `extra_tensors` (the op's inputs) are kept alive until then, as
    DeepEP's are."""

    def __init__(self, event=None, extra_tensors=None):
        if event is not None and not isinstance(event, EventHandle):
            raise TypeError(f"event: expected a moe_ep EventHandle or None, got {type(event).__name__}")
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait = None
        self._release_handle_by_call = False

    def current_stream_wait(self, release_handle=False):
        if self.event is not None:
            self.event.current_stream_wait()
        self.extra_tensors = None
        result = None
        if self.hook_after_wait is not None:
            result, self.hook_after_wait = self.hook_after_wait(), None
        if release_handle:
            self.event = None
        return result

    def wait(self):
        return self.current_stream_wait()

    def register_hook_after_wait(self, hook_after_wait):
        if self.hook_after_wait is not None:
            raise RuntimeError("a hook is already registered on this EventOverlap")
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle=False):
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False
