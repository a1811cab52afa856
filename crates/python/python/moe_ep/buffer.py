"""`moe_ep.Buffer`: DeepEP V1's `deep_ep.Buffer` API (intranode HT and LL) over moe-ep's kernels.

Method names, arguments, defaults and return tuples are DeepEP's; docs/python.md lists what
differs. Shapes below: T tokens of this rank, H hidden, K top-k, E experts, R ranks,
L = E / R local experts, M = `num_max_dispatch_tokens_per_rank`.
"""
import operator
import os
import sys

import numpy as np
from typing import NamedTuple, Optional

from . import _native
from . import _tensors as tz
from .utils.event import EventHandle, EventOverlap

_INDEX = ("int64", "int32")
# HT dispatch payloads besides fp8 (the kernels copy rows of bytes; combine sums bfloat16).
_HT_PAYLOAD = ("bfloat16", "float16", "float32")


class Config:
    """DeepEP's performance config. moe-ep uses `num_sms` (HT channels = `num_sms // 2`); the
    chunk sizes are accepted and kept but not used (our rings have fixed slots)."""

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        num_sms = _int(num_sms, "num_sms")
        if num_sms <= 0 or num_sms % 2:
            raise ValueError(f"num_sms: expected a positive even number, got {num_sms}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """`num_nvl_bytes` for rows of `hidden_bytes` (bf16) with up to 256 experts and any
        top-k: the rings, plus a heap for the outputs of a dispatch of 4096 tokens per rank
        (the one-pass path; a smaller heap only means calls that don't fit take the rings)."""
        experts = -(-256 // num_ranks) * num_ranks
        hidden = max(hidden_bytes // 2, 8)
        rings = _native.ht_size_hint(num_ranks, experts, hidden, 32, self.num_sms // 2, 0)
        heap = 4096 * num_ranks * (2 * hidden + 4 * (hidden // 128) + 4 + 12 * 8)
        return rings + heap

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: no inter-node HT yet."""
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, nvl_chunk=({self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}))")


class UniqueId:
    """Bootstrap without torch.distributed: rank 0 makes one, every rank gets its bytes
    (`to_bytes()` / `UniqueId.from_bytes`) and calls `Group.from_unique_id`."""

    def __init__(self, native=None):
        self._id = native if native is not None else _native.UniqueId()

    def to_bytes(self):
        return self._id.to_bytes()

    @staticmethod
    def from_bytes(data):
        return UniqueId(_native.UniqueId.from_bytes(bytes(data)))

    def __repr__(self):
        return repr(self._id)


class Group:
    """A rank of moe-ep's own groups (pass it as `Buffer(group, ...)` instead of a torch
    process group)."""

    def __init__(self, native):
        self._native = native

    @staticmethod
    def in_process(num_ranks, device="cpu"):
        """`num_ranks` ranks in this process on `device` ('cpu', 'cuda', 'cuda:N'); drive each
        Buffer from its own thread (calls are collective)."""
        return [Group(r) for r in _native.Rank.in_process([device] * num_ranks)]

    @staticmethod
    def from_unique_id(unique_id, rank, num_ranks, device=None):
        """Rank `rank` of `num_ranks` processes (collective), joined over TCP."""
        return Group(_native.Rank.with_unique_id(device or _default_device(), unique_id._id, rank, num_ranks))

    def rank(self):
        return self._native.rank

    def size(self):
        return self._native.num_ranks


# Room for this many HT channels in maps made before the call (`Buffer._dispatch_into`).
_MAX_CHANNELS = 128


def _capturing(device):
    """Whether torch's current stream on `device` captures a CUDA graph."""
    torch = sys.modules.get("torch")
    return device != "cpu" and torch is not None and torch.cuda.is_current_stream_capturing()


def _default_device():
    """`MOE_EP_DEVICE`, else torch's current CUDA device, else the CPU emulator."""
    name = os.environ.get("MOE_EP_DEVICE")
    torch = sys.modules.get("torch")
    if name in (None, "cuda", "gpu") and torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    if name in (None, "cuda", "gpu"):
        return "cuda" if name else ("cuda" if _native.cuda_device_count() > 0 else "cpu")
    return name


def _native_rank(group, comm):
    if isinstance(group, Group):
        return group._native
    if group is not None:  # a torch.distributed process group
        dist = sys.modules.get("torch.distributed")
        if dist is None:
            import torch.distributed as dist

        def all_gather(blob):
            out = [None] * group.size()
            dist.all_gather_object(out, bytes(blob), group=group)
            return out

        return _native.Rank.with_all_gather(_default_device(), group.rank(), group.size(), all_gather)
    if comm is not None:  # mpi4py
        return _native.Rank.with_all_gather(_default_device(), comm.Get_rank(), comm.Get_size(),
                                            lambda blob: [bytes(b) for b in comm.allgather(bytes(blob))])
    raise ValueError("Either 'group' or 'comm' must be provided.")


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: object
    num_tokens_per_rdma_rank: object
    num_tokens_per_expert: object
    is_token_in_rank: object
    event: EventOverlap


class DispatchOutput(NamedTuple):
    recv_x: object
    recv_topk_idx: object
    recv_topk_weights: object
    num_recv_tokens_per_expert_list: object
    handle: object
    event: EventOverlap


class CombineOutput(NamedTuple):
    combined_x: object
    combined_topk_weights: object
    event: EventOverlap


class LowLatencyDispatchOutput(NamedTuple):
    recv_x: object
    recv_count: object
    handle: object
    event: EventOverlap
    hook: object


class LowLatencyCombineOutput(NamedTuple):
    combined_x: object
    event: EventOverlap
    hook: object


class _Handle(tuple):
    """A dispatch's handle: DeepEP's tuple, carrying moe-ep's state of the dispatch. Copies are
    the handle itself (the state is the buffer's, not copied); pickling is refused."""

    def __reduce__(self):
        raise TypeError(f"a moe_ep {type(self).__name__} refers to device state and cannot be pickled")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class HtHandle(_Handle):
    """The handle of an HT dispatch: DeepEP's tuple `(rank_prefix_matrix [R, R],
    channel_prefix_matrix [R, C], recv_channel_prefix_matrix [R, C + 1], recv_src_idx [N],
    is_token_in_rank [T, R], send_head [T, R])`, all int32 but `is_token_in_rank` (bool), so
    `handle[0]` and unpacking work as with DeepEP. Pass it to `combine` or to a cached
    `dispatch`. C is moe-ep's channel (ring) count, not DeepEP's; `channel_prefix_matrix`
    (what this rank sends per channel, inclusive prefix) is computed when first read."""

    def __new__(cls, native, like, device, recv_src_idx, num_recv_tokens_per_expert, maps=None):
        # `maps`: `(rank_prefix_matrix, recv_channel_prefix_matrix, is_token_in_rank,
        # send_head)` when the dispatch wrote the caller's tensors; else views of native memory.
        if maps is None:
            r, t = native.num_ranks, native.num_tokens
            c = native.num_channels
            out = lambda a, dt, shape: tz.out(a, like, device, dt, shape)  # noqa: E731
            maps = (out(native.rank_prefix_matrix(), "int32", (r, r)),
                    out(native.channel_prefix_matrix(), "int32", (r, c + 1)),
                    out(native.is_token_in_rank(), "bool", (t, r)), out(native.send_head(), "int32", (t, r)))
        rpm, rcpm, is_in, send_head = maps
        self = super().__new__(cls, (rpm, None, rcpm, recv_src_idx, is_in, send_head))
        self._native, self._like, self._device = native, like, device
        self.num_recv_tokens_per_expert = num_recv_tokens_per_expert  # [L] int32
        self.num_recv_tokens = native.num_rows
        self._channel_prefix_matrix = None
        return self

    def _sender_channel_prefix_matrix(self):
        # Tokens of channel c are [T*c/C, T*(c+1)/C) (as the kernels split them).
        if self._channel_prefix_matrix is None:
            t, c = self._native.num_tokens, self._native.num_channels
            is_in = tuple.__getitem__(self, 4)
            ends = [t * (i + 1) // c for i in range(c)]
            if tz.is_torch(is_in):
                import torch
                cum = torch.cat([torch.zeros_like(is_in[:1], dtype=torch.int32), is_in.int().cumsum(0, dtype=torch.int32)])
                self._channel_prefix_matrix = cum[ends].T.contiguous()
            else:
                cum = np.concatenate([np.zeros((1, is_in.shape[1]), np.int32), np.cumsum(is_in, 0, dtype=np.int32)])
                self._channel_prefix_matrix = np.ascontiguousarray(cum[ends].T)
        return self._channel_prefix_matrix

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(6)))
        if i in (1, -5):
            return self._sender_channel_prefix_matrix()
        return tuple.__getitem__(self, i)

    def __iter__(self):
        return (self[i] for i in range(6))

    @property
    def rank_prefix_matrix(self):
        return self[0]

    @property
    def channel_prefix_matrix(self):
        return self[1]

    @property
    def recv_channel_prefix_matrix(self):
        return self[2]

    @property
    def recv_src_idx(self):
        return self[3]  # [N] int32: source token of each row, -1 on padding

    @property
    def is_token_in_rank(self):
        return self[4]

    @property
    def send_head(self):
        return self[5]


class LowLatencyHandle(_Handle):
    """The handle of an LL dispatch: DeepEP's tuple `(src_info [L, R*M] int32, layout_range
    [L, R] int64, num_max_dispatch_tokens_per_rank, hidden, num_experts)`, carrying our state.
    Pass it to `low_latency_combine` or `get_next_low_latency_combine_buffer`."""

    def __new__(cls, native, src_info, layout_range, m, hidden, num_experts):
        self = super().__new__(cls, (src_info, layout_range, m, hidden, num_experts))
        self._native = native
        return self

    src_info = property(lambda self: self[0])
    layout_range = property(lambda self: self[1])
    num_max_dispatch_tokens_per_rank = property(lambda self: self[2])
    hidden = property(lambda self: self[3])
    num_experts = property(lambda self: self[4])


def _bool(v, name):
    """`v` as a bool, accepting what DeepEP's C++ binding takes: None (False), bools, numpy
    bools and integers."""
    if v is None or isinstance(v, (bool, np.bool_)):
        return bool(v)
    try:
        return bool(operator.index(v))
    except TypeError:
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}") from None


def _int(v, name, lo=None):
    """`v` as an int (anything with `__index__`: numpy integers too, not floats)."""
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected at least {lo}, got {v}")
    return v


def _native_event(previous_event):
    """The native event to wait for, by DeepEP's rule: `previous_event.event` if there is one."""
    event = getattr(previous_event, "event", None)
    if event is None:
        return None
    if not isinstance(event, EventHandle):
        raise TypeError(f"previous_event.event: expected a moe_ep EventHandle, got {type(event).__name__}")
    return event._native


class Buffer:
    """The expert-parallel communication buffer of one rank (DeepEP's `Buffer`): HT
    (intranode, NVLink) and LL dispatch/combine.

    `group`: a `torch.distributed` process group (our handles are all-gathered over it;
    use the gloo backend when ranks share a GPU), or a `moe_ep.Group`. Memory is allocated
    here, collectively, as DeepEP does: `num_nvl_bytes` for HT, `num_rdma_bytes` for LL
    (`get_low_latency_rdma_size_hint`). Each mode's memory is laid out at its first call for
    that call's shapes (no allocation; also inside a CUDA-graph capture), and again —
    collectively, with a stream synchronisation — if a later call needs larger shapes. A
    call that does not fit raises `ValueError` naming the byte count to pass.

    HT's memory holds the rings, and what they leave is an output heap: dispatch outputs
    that fit are stored into by the senders directly (one pass over the data instead of two);
    a combine whose `x` and `topk_weights` lie in every rank's heap (a dispatch's
    `recv_x`/`recv_topk_weights`, or `get_ht_combine_buffer`) pulls the copies straight from
    there. `num_heap_bytes` (moe-ep only; default `$MOE_EP_HT_HEAP_BYTES`) instead gives the
    rings all of `num_nvl_bytes` and allocates a heap of that size beside (0: none).

    `low_latency_mode`, `num_qps_per_rank`, `allow_nvlink_for_low_latency_mode`,
    `allow_mnnvl` are accepted: intranode, every path is NVLink (no NVSHMEM, no QPs).
    """

    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
                 num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                 use_fabric=False, explicitly_destroy=False, enable_shrink=False, comm=None, num_heap_bytes=None):
        num_nvl_bytes = _int(num_nvl_bytes, "num_nvl_bytes", 0)
        num_rdma_bytes = _int(num_rdma_bytes, "num_rdma_bytes", 0)
        if num_heap_bytes is None and "MOE_EP_HT_HEAP_BYTES" in os.environ:
            env = os.environ["MOE_EP_HT_HEAP_BYTES"]
            try:
                num_heap_bytes = int(env)
            except ValueError:
                raise ValueError(f"MOE_EP_HT_HEAP_BYTES: expected a byte count, got {env!r}") from None
        if num_heap_bytes is not None:
            num_heap_bytes = _int(num_heap_bytes, "num_heap_bytes", 0)
        low_latency_mode = _bool(low_latency_mode, "low_latency_mode")
        explicitly_destroy = _bool(explicitly_destroy, "explicitly_destroy")
        enable_shrink = _bool(enable_shrink, "enable_shrink")
        for v, name in ((allow_mnnvl, "allow_mnnvl"), (use_fabric, "use_fabric"),
                        (allow_nvlink_for_low_latency_mode, "allow_nvlink_for_low_latency_mode")):
            _bool(v, name)
        if num_qps_per_rank is not None:  # DeepEP passes it to NVSHMEM only
            _int(num_qps_per_rank, "num_qps_per_rank", 0)
        self.runtime = _native_rank(group, comm)
        self.group = group if group is not None else comm
        self.rank = self.runtime.rank
        self.group_size = self.runtime.num_ranks
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.device = self.runtime.device
        # Everything is allocated here (collectively), as DeepEP does: no call allocates
        # collectively later, so the first call may be inside a CUDA-graph capture.
        self.runtime.allocate(num_nvl_bytes, num_heap_bytes, num_rdma_bytes)
        self.num_heap_bytes = num_heap_bytes
        self._masked = [False] * self.group_size
        self._ll_views = {}
        # HT outputs in tensors made here (see `_outputs_made_here`) even outside a capture:
        # lets tests run that path on the CPU.
        self._outputs_in_caller_memory = False

    # ----------------------------------------------------------------------------------- misc

    def destroy(self):
        """Frees the buffers (collective); only with `explicitly_destroy=True`, as in DeepEP."""
        if not self.explicitly_destroy:
            raise ValueError("`explicitly_destroy` flag must be set")
        self.runtime.destroy()

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        """This rank's raw buffer from element `offset` as a 1-D tensor of `dtype` (or `size`
        elements viewed as that shape): the HT memory (`num_nvl_bytes`), or the LL memory
        with `use_rdma_buffer`. Writing into it while ops run corrupts them, as with DeepEP."""
        import torch
        offset = _int(offset, "offset", 0)
        use_rdma_buffer = _bool(use_rdma_buffer, "use_rdma_buffer")
        itemsize = torch.empty((), dtype=dtype).element_size()
        arr = self.runtime.local_buffer(offset * itemsize, use_rdma_buffer)
        if arr is None:
            which = "num_rdma_bytes" if use_rdma_buffer else "num_nvl_bytes"
            raise ValueError(f"use_rdma_buffer={use_rdma_buffer}: this Buffer has no such memory ({which}=0)")
        raw = torch.as_tensor(arr, device=self.device) if self.device != "cpu" else torch.from_numpy(np.asarray(arr))
        tensor = raw[: arr.nbytes // itemsize * itemsize].view(dtype)
        if size is None:
            return tensor
        n = 1
        for d in size:
            n *= d
        if tensor.numel() < n:
            raise ValueError(f"size: {tuple(size)} needs {n} elements, the buffer has {tensor.numel()}")
        return tensor[:n].view(size)

    # ------------------------------------------------------------------------ rank masking

    def _check_shrink(self):
        if not self.enable_shrink:
            raise RuntimeError("rank masking needs Buffer(..., enable_shrink=True)")

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Marks `rank_to_mask` as masked (`mask=True`) or alive again. Until moe-ep masks dead
        ranks in its kernels (fault tolerance), an LL call while any rank is masked raises
        `NotImplementedError` instead of giving results that would differ from DeepEP's."""
        self._check_shrink()
        rank_to_mask = _int(rank_to_mask, "rank_to_mask", 0)
        mask = _bool(mask, "mask")
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask: {rank_to_mask} is not below {self.group_size} ranks")
        self._masked[rank_to_mask] = mask

    def low_latency_query_mask_buffer(self, mask_status):
        """Writes each rank's mask (1 = masked) into `mask_status` (`[R]` int32)."""
        self._check_shrink()
        tz.check(mask_status, "mask_status", self.device, ("int32",), 1, (self.group_size,))
        status = [1 if m else 0 for m in self._masked]
        if tz.is_torch(mask_status):
            import torch
            mask_status.copy_(torch.tensor(status, dtype=torch.int32))
        else:
            mask_status[:] = status

    def low_latency_clean_mask_buffer(self):
        """Marks every rank alive."""
        self._check_shrink()
        self._masked = [False] * self.group_size

    def _check_unmasked(self):
        if any(self._masked):
            dead = [r for r, m in enumerate(self._masked) if m]
            raise NotImplementedError(f"ranks {dead} are masked: moe-ep cannot leave ranks out of LL ops yet")

    @staticmethod
    def is_sm90_compiled():
        """True: the shipped kernels are PTX for sm_90."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms):
        """SMs for HT kernels (two per channel)."""
        new_num_sms = _int(new_num_sms, "new_num_sms", 2)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms: the SM count must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture():
        """An event on torch's current CUDA stream (an empty EventOverlap without CUDA)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """Bytes of the LL buffer (both buffer sets) for these sizes."""
        return _native.ll_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks):
        """DeepEP's recommended config for `num_ranks` (any count here: only `num_sms` is used)."""
        send_tokens = {2: 24}.get(_int(num_ranks, "num_ranks", 1), 6)
        return Config(Buffer.num_sms, send_tokens, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks):
        """DeepEP's recommended config for `num_ranks` (any count here: only `num_sms` is used)."""
        send_tokens = {2: 10, 4: 9}.get(_int(num_ranks, "num_ranks", 1), 4)
        return Config(Buffer.num_sms, send_tokens, 256, 6, 128)

    def get_comm_stream(self):
        """The rank's own stream (DeepEP's comm stream) as a `torch.cuda.ExternalStream`."""
        if getattr(self, "_comm_stream", None) is None:
            import torch
            self._comm_stream = torch.cuda.ExternalStream(self.runtime.comm_stream, device=torch.device(self.device))
        return self._comm_stream

    # ------------------------------------------------------------------------------ internals

    def _ctx(self, previous_event, async_finish, allocate_on_comm_stream):
        async_finish = _bool(async_finish, "async_finish")
        _bool(allocate_on_comm_stream, "allocate_on_comm_stream")
        # allocate_on_comm_stream: outputs always come from the comm stream's pool and are
        # released after the caller's stream is done with them, so the flag changes nothing.
        return (tz.current_stream(self.device), _native_event(previous_event), async_finish)

    def _keep_for_comm(self, tensors):
        """Tensors of torch's current stream that the comm stream writes: their memory is not
        reused before the comm stream is done (DeepEP's `record_stream`)."""
        torch = sys.modules.get("torch")
        if self.device == "cpu" or torch is None or torch.cuda.is_current_stream_capturing():
            return
        comm = self.get_comm_stream()
        for t in tensors:
            t.record_stream(comm)

    def _outputs_made_here(self, like):
        """Whether HT ops write tensors made here (torch's allocator) instead of returning
        native memory: inside a CUDA-graph capture, whose graph must own all it writes."""
        if like != "torch" and not self._outputs_in_caller_memory:
            return False
        return self._outputs_in_caller_memory or _capturing(self.device)

    def _event(self, ev, inputs):
        return EventOverlap(EventHandle._of(ev, self.device), inputs if ev is not None else None)

    def _num_channels(self, config):
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config: expected a moe_ep.Config, got {type(config).__name__}")
        if self.device == "cpu":
            return 0  # the emulator's default (2): one OS thread per emulated GPU thread
        return (config.num_sms if config is not None else Buffer.num_sms) // 2

    # -------------------------------------------------------------------------------------- HT

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Where each token goes. `topk_idx`: `[T, K]` int64 (or int32), -1 = none.

        Returns `(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, event)`."""
        like = tz.kind(topk_idx, "topk_idx")
        tz.check(topk_idx, "topk_idx", self.device, _INDEX, 2)
        num_experts = _int(num_experts, "num_experts", 1)
        t, k = topk_idx.shape
        r = self.group_size
        idx_bytes = 8 if tz.dtype_name(topk_idx) == "int64" else 4
        ctx = self._ctx(previous_event, async_finish, allocate_on_comm_stream)
        if self._outputs_made_here(like):
            outs = (tz.empty(like, self.device, "int32", (r,)), tz.empty(like, self.device, "int32", (num_experts,)),
                    tz.empty(like, self.device, "bool", (t, r)))
            self._keep_for_comm(outs)
            *_, ev = self.runtime.layout(tz.mem(topk_idx), idx_bytes, t, k, num_experts,
                                         tuple(tz.mem(o) for o in outs), *ctx)
            return DispatchLayout(outs[0], None, outs[1], outs[2], self._event(ev, (topk_idx,)))
        a, b, c, ev = self.runtime.layout(tz.mem(topk_idx), idx_bytes, t, k, num_experts, None, *ctx)
        return DispatchLayout(tz.out(a, like, self.device, "int32", (r,)), None,
                              tz.out(b, like, self.device, "int32", (num_experts,)),
                              tz.out(c, like, self.device, "bool", (t, r)), self._event(ev, (topk_idx,)))

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """HT dispatch. `x`: `[T, H]` bfloat16 (or float16 / float32: rows are copied as bytes), or
        `(x [T, H] float8_e4m3fn, scales [T, S] float32)`.
        With `handle` (from an earlier dispatch): cached mode, the same routes, no count exchange.

        Returns `(recv_x (a tuple with scales for fp8), recv_topk_idx [N, K] int64,
        recv_topk_weights [N, K] float32, num_recv_tokens_per_expert_list, handle, event)`;
        N = rows received, or `num_worst_tokens` (padding rows: topk_idx -1, the list empty)."""
        fp8 = isinstance(x, tuple)
        if fp8:
            if len(x) != 2:
                raise ValueError("x: expected a tensor or a (float8 tensor, scales) pair")
            x, x_scales = x
        else:
            x_scales = None
        like = tz.kind(x, "x")
        tz.check(x, "x", self.device, ("float8_e4m3fn",) if fp8 else _HT_PAYLOAD, 2)
        t, hidden = x.shape
        x_dtype = tz.dtype_name(x)
        hidden_bytes = hidden * tz.itemsize(x_dtype)
        if hidden_bytes % 16:
            raise ValueError(f"x: rows of {hidden_bytes} bytes; expected a multiple of 16")
        # The buffer is sized in bf16 elements per row (combine's rows); fp8 rows fit in that.
        hidden_elems = hidden if fp8 else hidden_bytes // 2
        scales = None
        if fp8:
            # Either layout DeepEP takes: row-major, or column-major (`s.T.contiguous().T`,
            # what per-token casts for TMA give); the kernels read rows, so copy the latter.
            tz.check(x_scales, "x_scales", self.device, ("float32", "int32"), 2, (t, None), strided=True)
            if not tz.is_contiguous(x_scales):
                if _native_event(previous_event) is not None:
                    previous_event.event.current_stream_wait()
                x_scales = tz.contiguous(x_scales)
                previous_event = None  # the op now follows the current stream (the copy)
            scales = (tz.mem(x_scales), x_scales.shape[1])
        expert_alignment = _int(expert_alignment, "expert_alignment", 1)
        num_worst_tokens = _int(num_worst_tokens, "num_worst_tokens", 0)
        ctx = self._ctx(previous_event, async_finish, allocate_on_comm_stream)
        channels = self._num_channels(config)
        xs = (x,) if x_scales is None else (x, x_scales)

        if handle is not None:
            if not isinstance(handle, HtHandle):
                raise TypeError(f"handle: expected the handle of a moe_ep dispatch, got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx / topk_weights: must be None for a cached dispatch (with handle)")
            if t != handle._native.num_tokens:
                raise ValueError(f"x: {t} tokens, the handle's dispatch had {handle._native.num_tokens}")
            n = handle._native.num_rows
            if self._outputs_made_here(like):
                rx = tz.empty(like, self.device, x_dtype, (n, hidden))
                rs = tz.empty(like, self.device, tz.dtype_name(x_scales), (n, x_scales.shape[1])) if fp8 else None
                self._keep_for_comm((rx,) + ((rs,) if fp8 else ()))
                *_, ev = self.runtime.ht_dispatch_cached(handle._native, tz.mem(x), hidden_bytes, scales,
                                                         (tz.mem(rx), tz.mem(rs)), *ctx)
                return DispatchOutput((rx, rs) if fp8 else rx, None, None, None, None, self._event(ev, xs))
            rx, rs, ev = self.runtime.ht_dispatch_cached(handle._native, tz.mem(x), hidden_bytes, scales, None, *ctx)
            recv_x = tz.out(rx, like, self.device, x_dtype, (n, hidden))
            if fp8:
                recv_x = (recv_x, tz.out(rs, like, self.device, tz.dtype_name(x_scales), (n, x_scales.shape[1])))
            return DispatchOutput(recv_x, None, None, None, None, self._event(ev, xs))

        r = self.group_size
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError("num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert are required "
                             "without a handle (from get_dispatch_layout)")
        tz.check(num_tokens_per_rank, "num_tokens_per_rank", self.device, ("int32",), 1, (r,))
        tz.check(is_token_in_rank, "is_token_in_rank", self.device, ("bool",), 2, (t, r))
        tz.check(num_tokens_per_expert, "num_tokens_per_expert", self.device, ("int32",), 1)
        num_experts = num_tokens_per_expert.shape[0]
        if num_experts % r:
            raise ValueError(f"num_tokens_per_expert: {num_experts} experts is not a multiple of {r} ranks")
        topk = None
        k = 0
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights: give both or neither")
        if topk_idx is not None:
            tz.check(topk_idx, "topk_idx", self.device, _INDEX, 2, (t, None))
            k = topk_idx.shape[1]
            tz.check(topk_weights, "topk_weights", self.device, ("float32",), 2, (t, k))
            idx_bytes = 8 if tz.dtype_name(topk_idx) == "int64" else 4
            topk = (tz.mem(topk_idx), idx_bytes, tz.mem(topk_weights), k)
        layout = (tz.mem(num_tokens_per_rank), tz.mem(num_tokens_per_expert), tz.mem(is_token_in_rank))
        inputs = xs + tuple(v for v in (topk_idx, topk_weights, is_token_in_rank) if v is not None)
        if _capturing(self.device) and not num_worst_tokens:
            raise ValueError("num_worst_tokens: needed inside a CUDA-graph capture (exact-size outputs need a "
                             "host synchronisation); pass the most rows a rank may receive")
        if num_worst_tokens and self._outputs_made_here(like):
            return self._dispatch_into(x, x_scales, hidden, hidden_elems, hidden_bytes, scales, topk_idx, topk, k,
                                       layout, num_experts, expert_alignment, num_worst_tokens, channels, ctx, inputs)
        (rx, rs, ri, rw, src, per_expert, per_list, h, ev) = self.runtime.ht_dispatch(
            tz.mem(x), hidden_elems, hidden_bytes, t, scales, topk, layout, num_experts, expert_alignment,
            num_worst_tokens or None, channels, *ctx)
        n = h.num_rows
        out = lambda a, dt, shape: tz.out(a, like, self.device, dt, shape)  # noqa: E731
        recv_x = out(rx, x_dtype, (n, hidden))
        if fp8:
            recv_x = (recv_x, out(rs, tz.dtype_name(x_scales), (n, x_scales.shape[1])))
        handle = HtHandle(h, like, self.device, out(src, "int32", (n,)),
                          out(per_expert, "int32", (num_experts // r,)))
        return DispatchOutput(recv_x,
                              out(ri, "int64", (n, k)) if ri is not None else None,
                              out(rw, "float32", (n, k)) if rw is not None else None,
                              list(per_list) if per_list is not None else [],
                              handle, self._event(ev, inputs))

    def _dispatch_into(self, x, x_scales, hidden, hidden_elems, hidden_bytes, scales, topk_idx, topk, k, layout,
                       num_experts, expert_alignment, n, channels, ctx, inputs):
        """A padded dispatch into tensors made here (`_outputs_made_here`)."""
        like, dev, r = tz.kind(x, "x"), self.device, self.group_size
        t = x.shape[0]
        fp8 = x_scales is not None
        empty = lambda dt, shape: tz.empty(like, dev, dt, shape)  # noqa: E731
        recv_x = empty(tz.dtype_name(x), (n, hidden))
        recv_scales = empty(tz.dtype_name(x_scales), (n, x_scales.shape[1])) if fp8 else None
        recv_topk_idx = empty("int64", (n, k)) if topk else None
        recv_topk_weights = empty("float32", (n, k)) if topk else None
        recv_src_idx = empty("int32", (n,))
        # The channel count is the buffer's (known after the call): room for any.
        cmax = max(_MAX_CHANNELS, channels)
        maps = (empty("int32", (num_experts // r,)), empty("int32", (r, r)), empty("int32", (r * (cmax + 1),)),
                empty("int32", (1,)), tz.zeros(like, dev, "int32", (r * cmax,)), empty("int32", (t, r)),
                empty("bool", (t, r)))
        rows = tuple(a if a is not None else recv_x
                     for a in (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx))
        self._keep_for_comm(rows + maps)
        h, ev = self.runtime.ht_dispatch_into(tz.mem(x), hidden_elems, hidden_bytes, t, scales, topk, layout,
                                              num_experts, expert_alignment, n, channels,
                                              tuple(tz.mem(a) for a in rows), tuple(tz.mem(m) for m in maps), *ctx)
        c = h.num_channels
        per_expert, rpm, cpm, _, row0, send_head, is_in = maps
        handle = HtHandle(h, like, dev, recv_src_idx, per_expert, (rpm, cpm[: r * (c + 1)].reshape(r, c + 1), is_in,
                                                                   send_head))
        handle._keep = maps  # the native handle refers to all of them
        return DispatchOutput((recv_x, recv_scales) if fp8 else recv_x, recv_topk_idx, recv_topk_weights, [],
                              handle, self._event(ev, inputs))

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """HT combine: sums each token's copies (no weights) in a fixed order, plus `bias`
        (`[T, H]` bfloat16, or a pair). `x`: `[N, H]` bfloat16 rows as dispatched.

        Returns `(combined_x [T, H] bfloat16, combined_topk_weights [T, K] float32 or None, event)`."""
        if not isinstance(handle, HtHandle):
            raise TypeError(f"handle: expected the handle of a moe_ep dispatch, got {type(handle).__name__}")
        like = tz.kind(x, "x")
        n, t = handle._native.num_rows, handle._native.num_tokens
        tz.check(x, "x", self.device, ("bfloat16",), 2, (n, None))
        hidden = x.shape[1]
        weights = None
        if topk_weights is not None:
            tz.check(topk_weights, "topk_weights", self.device, ("float32",), 2, (n, None))
            weights = (tz.mem(topk_weights), topk_weights.shape[1])
        if bias is None:
            b0 = b1 = None
        elif isinstance(bias, tuple):
            if len(bias) != 2:
                raise ValueError("bias: expected a tensor or a pair of tensors")
            b0, b1 = bias
        else:
            b0, b1 = bias, None
        for b, name in ((b0, "bias[0]"), (b1, "bias[1]")):
            if b is not None:
                tz.check(b, name, self.device, ("bfloat16",), 2, (t, hidden))
        self._num_channels(config)
        ctx = self._ctx(previous_event, async_finish, allocate_on_comm_stream)
        inputs = tuple(v for v in (x, topk_weights, b0, b1) if v is not None)
        if self._outputs_made_here(like):
            cx = tz.empty(like, self.device, "bfloat16", (t, hidden))
            cw = tz.empty(like, self.device, "float32", (t, weights[1])) if weights else None
            self._keep_for_comm((cx,) + ((cw,) if weights else ()))
            *_, ev = self.runtime.ht_combine(handle._native, tz.mem(x), hidden, weights, (tz.mem(b0), tz.mem(b1)),
                                             (tz.mem(cx), tz.mem(cw)), *ctx)
            return CombineOutput(cx, cw, self._event(ev, inputs))
        cx, cw, ev = self.runtime.ht_combine(handle._native, tz.mem(x), hidden, weights, (tz.mem(b0), tz.mem(b1)),
                                             None, *ctx)
        return CombineOutput(tz.out(cx, like, self.device, "bfloat16", (t, hidden)),
                             tz.out(cw, like, self.device, "float32", (t, weights[1])) if cw is not None else None,
                             self._event(ev, inputs))

    # -------------------------------------------------------------------------------------- LL

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """A no-op: LL slots and flags carry epochs, so the buffer never needs cleaning."""
        _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        _int(hidden, "hidden", 1)
        _int(num_experts, "num_experts", 1)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """LL dispatch, expert-major. `x`: `[T, H]` bfloat16 (T <= M); `topk_idx`: `[T, K]`
        int64/int32, -1 = none.

        Returns `(recv_x, recv_count [L] int32, handle, event, hook)`: `recv_x` is `[L, R*M, H]`
        bfloat16, or with `use_fp8` a pair (`[L, R*M, H]` float8_e4m3fn, scales `[L, R*M, H/128]`
        float32, or `[L, R*M, H/512]` int32 with `use_ue8m0`; column-major views as DeepEP's).
        `hook` (with `return_recv_hook`) receives; call it before using the outputs."""
        self._check_unmasked()
        like = tz.kind(x, "x")
        tz.check(x, "x", self.device, ("bfloat16",), 2)
        t, hidden = x.shape
        tz.check(topk_idx, "topk_idx", self.device, _INDEX, 2, (t, None))
        m = _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        num_experts = _int(num_experts, "num_experts", 1)
        use_fp8, round_scale = _bool(use_fp8, "use_fp8"), _bool(round_scale, "round_scale")
        use_ue8m0, return_recv_hook = _bool(use_ue8m0, "use_ue8m0"), _bool(return_recv_hook, "return_recv_hook")
        r = self.group_size
        if num_experts % r:
            raise ValueError(f"num_experts: {num_experts} is not a multiple of {r} ranks")
        if t > m:
            raise ValueError(f"x: {t} tokens > num_max_dispatch_tokens_per_rank {m}")
        l = num_experts // r
        # Statistics are added on the device by the receive (in stream order: with
        # async_finish, hooks and graph replays alike).
        if cumulative_local_expert_recv_stats is not None:
            tz.check(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", self.device,
                     ("int32",), 1, (l,))
        if dispatch_wait_recv_cost_stats is not None:
            tz.check(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", self.device, ("int64",), 1, (r,))
        stats = (tz.mem(cumulative_local_expert_recv_stats), tz.mem(dispatch_wait_recv_cost_stats))
        k = topk_idx.shape[1]
        idx_bytes = 8 if tz.dtype_name(topk_idx) == "int64" else 4
        # torch tensors hold the counts, ranges and epoch (so a torch.cuda.graph capture owns
        # their memory and replays write the same tensors); numpy callers get native memory.
        small = None
        if like == "torch":  # one allocation: [L*R] ranges, [1] epoch, [L] counts (as int64 halves)
            words = tz.empty(like, self.device, "int64", (l * r + 1 + (l + 1) // 2,))
            small = (words[l * r + 1:].view(dtype_torch("int32"))[:l], words[:l * r].view(l, r), words[l * r:l * r + 1])
            self._keep_for_comm((words,))
        d, ev = self.runtime.ll_dispatch(tz.mem(x), t, hidden, tz.mem(topk_idx), idx_bytes, k, m, num_experts,
                                         use_fp8, round_scale, use_ue8m0, return_recv_hook,
                                         tuple(tz.mem(a) for a in small) if small else None, stats,
                                         *self._ctx(None, async_finish, False))
        rx, rs, count, src_info, layout_range = d.arrays()
        views = self._ll_views
        gen = d.generation

        def out(a, dt, shape):
            # The rows, scales and source indices are views into the buffer's two sets: made
            # once per address and shape (making a tensor costs more than the kernel at 1 token).
            if tz.is_torch(a):
                return a
            key = (gen, a.ptr, dt, shape)
            v = views.get(key)
            if v is None:
                v = tz.out(a, like, self.device, dt, shape)
                if len(views) > 64:
                    views.clear()
                views[key] = v
            return v

        if small:
            count, layout_range = small[0], small[1]
        rows = r * m
        recv_x = out(rx, "float8_e4m3fn" if use_fp8 else "bfloat16", (l, rows, hidden))
        if use_fp8:
            # Stored [L, G, R*M]: returned as DeepEP's column-major [L, R*M, G] view.
            scales = (out(rs, "int32", (l, hidden // 512, rows)) if use_ue8m0
                      else out(rs, "float32", (l, hidden // 128, rows)))
            recv_x = (recv_x, tz.swap_last_two(scales))
        recv_count = out(count, "int32", (l,))
        handle = LowLatencyHandle(d, out(src_info, "int32", (l, rows)), out(layout_range, "int64", (l, r)),
                                  m, hidden, num_experts)
        handle._epoch = small[2] if small else None
        hook = None
        if return_recv_hook:
            def hook():
                self.runtime.ll_complete_dispatch(d)
        return LowLatencyDispatchOutput(recv_x, recv_count, handle, self._event(ev, (x, topk_idx)), hook)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None,
                            combine_wait_recv_cost_stats=None):
        """LL combine: each token's expert outputs summed with its weights. `x`: `[L, R*M, H]`
        bfloat16 as dispatched; `topk_idx`/`topk_weights`: the dispatch's `[T, K]`.

        Returns `(combined_x [T, H] bfloat16 (= out when given), event, hook)`."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle of a moe_ep low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        _bool(use_logfmt, "use_logfmt")
        zero_copy, return_recv_hook = _bool(zero_copy, "zero_copy"), _bool(return_recv_hook, "return_recv_hook")
        self._check_unmasked()
        like = tz.kind(x, "x")
        r, m, hidden = self.group_size, handle.num_max_dispatch_tokens_per_rank, handle.hidden
        l = handle.num_experts // r
        tz.check(x, "x", self.device, ("bfloat16",), 3, (l, r * m, hidden))
        if zero_copy:
            # DeepEP's meaning: the expert outputs are in the buffer's combine view (written
            # there by the caller), whatever `x` holds; the source ranks read them in place.
            x = self.get_next_low_latency_combine_buffer(handle)
        tz.check(topk_idx, "topk_idx", self.device, _INDEX, 2)
        t, k = topk_idx.shape
        tz.check(topk_weights, "topk_weights", self.device, ("float32",), 2, (t, k))
        if combine_wait_recv_cost_stats is not None:
            tz.check(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", self.device, ("int64",), 1, (r,))
        if out is not None:
            tz.check(out, "out", self.device, ("bfloat16",), 2, (t, hidden))
        elif like == "torch":
            out = tz.empty(like, self.device, "bfloat16", (t, hidden))  # (graph-capturable: torch's memory)
            self._keep_for_comm((out,))
        idx_bytes = 8 if tz.dtype_name(topk_idx) == "int64" else 4
        cx, pending, ev = self.runtime.ll_combine(handle._native, tz.mem(x), t, tz.mem(topk_idx), idx_bytes,
                                                  tz.mem(topk_weights), k, tz.mem(out), return_recv_hook,
                                                  tz.mem(combine_wait_recv_cost_stats),
                                                  *self._ctx(None, async_finish, False))
        combined = out if out is not None else tz.out(cx, like, self.device, "bfloat16", (t, hidden))
        hook = None
        if pending is not None:
            def hook():
                self.runtime.ll_complete_combine(pending)
        return LowLatencyCombineOutput(combined, self._event(ev, (x, topk_idx, topk_weights)), hook)

    def get_ht_combine_buffer(self, handle, hidden):
        """moe-ep extension: a `[handle.num_recv_tokens, hidden]` bfloat16 tensor in the HT
        buffer's heap (`num_heap_bytes`) to write expert outputs into; when every rank combines
        such a tensor, each rank pulls its tokens' copies straight from the peers' (one pass).
        A plain tensor when there is no heap or no room (the combine then takes the rings)."""
        if not isinstance(handle, HtHandle):
            raise TypeError(f"handle: expected the handle of a moe_ep dispatch, got {type(handle).__name__}")
        _int(hidden, "hidden", 1)
        shape = (handle.num_recv_tokens, hidden)
        nbytes = 2 * shape[0] * shape[1]
        arr = self.runtime.ht_alloc_output(nbytes, tz.current_stream(self.device)) if nbytes else None
        if arr is None:
            return tz.empty(handle._like, self.device, "bfloat16", shape)
        return tz.out(arr, handle._like, self.device, "bfloat16", shape)

    def get_next_low_latency_combine_buffer(self, handle):
        """A `[L, R*M, H]` bfloat16 view into the LL buffer (the set of `handle`'s dispatch):
        write the expert outputs there and pass it to `low_latency_combine(..., zero_copy=True)`;
        the source ranks then read the rows in place (nothing is sent). Like DeepEP's, it is
        reused two dispatches later."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError("handle: expected the handle of a moe_ep low_latency_dispatch")
        like = "torch" if tz.is_torch(handle.src_info) else "numpy"
        r = self.group_size
        shape = (handle.num_experts // r, r * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        arr = self.runtime.ll_combine_buffer(handle._native, tz.current_stream(self.device))
        return tz.out(arr, like, self.device, "bfloat16", shape)


def dtype_torch(name):
    import torch
    return getattr(torch, name)


