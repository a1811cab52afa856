"""The Python layer on the CPU back end (no GPU, no torch): numpy arrays, 4 ranks as threads of
this process, running our port of DeepEP's intranode and low-latency checks (ep_checks.py)
against the reference, plus argument validation."""
import copy
import os
import pickle
import sys
import threading
import types

import numpy as np
import pytest

os.environ.setdefault("MOE_EP_DEVICE", "cpu")
import moe_ep  # noqa: E402
from ep_checks import (HtCase, LlCase, NumpyBackend, bf16_round, ht_body, ll_body, ref_ht_dispatch,  # noqa: E402
                       routing, run_in_process, seed)

R = 4
B = NumpyBackend()


def test_intranode_checks():
    case = HtCase(seed(), R, num_experts=16, num_topk=4, hidden=128, max_tokens=12)
    assert run_in_process(R, "cpu", B, ht_body(case, B, reruns=2)) == [True] * R


def test_intranode_checks_one_pass_with_a_heap():
    # outputs in the heap: senders store into them, combine pulls (recv_x and the
    # get_ht_combine_buffer tensor both live there); every check as without a heap
    case = HtCase(seed(), R, num_experts=16, num_topk=4, hidden=128, max_tokens=12)
    body = ht_body(case, B, reruns=2)
    assert run_in_process(R, "cpu", B, body, num_heap_bytes=4 << 20) == [True] * R


def test_intranode_checks_into_outputs_made_by_buffer():
    # the path a CUDA-graph capture takes (outputs in tensors Buffer makes, the caller's
    # allocator's: layout, padded and cached dispatch, combine), outside a capture; with a
    # heap, so combine pulls from the get_ht_combine_buffer tensor as before
    case = HtCase(seed(), R, num_experts=16, num_topk=4, hidden=128, max_tokens=12)
    body = ht_body(case, B, reruns=2, outputs_made_here=True)
    assert run_in_process(R, "cpu", B, body, num_heap_bytes=4 << 20) == [True] * R


def test_intranode_empty_rank_and_wide_topk():
    # a rank with no tokens, hidden 2880 (gpt-oss), top-16 of 64: beyond DeepEP's limits
    case = HtCase(seed(), R, num_experts=64, num_topk=16, hidden=2944, max_tokens=4, empty_rank=1)
    assert run_in_process(R, "cpu", B, ht_body(case, B, reruns=1)) == [True] * R


def test_low_latency_checks():
    case = LlCase(seed(), R, num_experts=8, num_topk=3, hidden=512, max_tokens=6)
    assert run_in_process(R, "cpu", B, ll_body(case, B, rounds=2)) == [True] * R


def test_module_names():
    assert moe_ep.topk_idx_t in (np.int64,) or str(moe_ep.topk_idx_t) == "torch.int64"
    assert moe_ep.Buffer.is_sm90_compiled()
    cfg = moe_ep.Buffer.get_dispatch_config(8)
    assert isinstance(cfg, moe_ep.Config) and cfg.num_sms == moe_ep.Buffer.num_sms
    assert isinstance(moe_ep.Buffer.get_combine_config(8), moe_ep.Config)
    assert cfg.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
    small = moe_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert small > 0 and moe_ep.Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 256) > small
    moe_ep.Buffer.set_num_sms(24)
    assert moe_ep.Buffer.num_sms == 24 and moe_ep.Buffer.get_dispatch_config(8).num_sms == 24
    moe_ep.Buffer.set_num_sms(20)
    with pytest.raises(ValueError, match="even"):
        moe_ep.Buffer.set_num_sms(7)
    uid = moe_ep.UniqueId()
    assert moe_ep.UniqueId.from_bytes(uid.to_bytes()).to_bytes() == uid.to_bytes()
    with pytest.raises(ValueError):
        moe_ep.UniqueId.from_bytes(b"not an id")


def test_bad_inputs_raise_and_buffer_stays_usable():
    """Wrong dtype/shape/contiguity/kind -> TypeError/ValueError naming what was expected,
    raised before anything collective starts; then a good call works on every rank."""
    T, K, E, H = 6, 2, 8, 64
    idx = np.array([[2 * (t % 4), (2 * (t % 4) + 3) % E] for t in range(T)], np.int64)  # two ranks each
    x = bf16_round(np.ones((T, H), np.float32))
    w = np.ones((T, K), np.float32)

    def body(buf, r, wait):
        with pytest.raises(TypeError, match="expected dtype int64 or int32, got float32"):
            buf.get_dispatch_layout(idx.astype(np.float32), E)
        with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
            buf.get_dispatch_layout(idx.tolist(), E)
        with pytest.raises(ValueError, match="2 dimensions"):
            buf.get_dispatch_layout(idx.reshape(-1), E)
        with pytest.raises(ValueError, match="contiguous"):
            buf.get_dispatch_layout(np.asfortranarray(idx), E)
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
        with pytest.raises(TypeError, match="expected dtype bfloat16 or float16 or float32, got int32"):
            buf.dispatch(x.astype(np.int32), **layout, topk_idx=idx, topk_weights=w)
        with pytest.raises(ValueError, match="expected shape"):
            buf.dispatch(x, **layout, topk_idx=idx[:3], topk_weights=w)
        with pytest.raises(ValueError, match="both or neither"):
            buf.dispatch(x, **layout, topk_idx=idx)
        with pytest.raises(ValueError, match="required"):
            buf.dispatch(x, topk_idx=idx, topk_weights=w)
        with pytest.raises(TypeError, match="EventHandle"):
            buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w,
                         previous_event=types.SimpleNamespace(event="not an event"))
        with pytest.raises(TypeError, match="async_finish: expected a bool"):
            buf.get_dispatch_layout(idx, E, async_finish="yes")
        with pytest.raises(TypeError, match="num_worst_tokens: expected an int"):
            buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=2.5)
        with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
            buf.low_latency_dispatch(x, idx, 2, E)
        with pytest.raises(TypeError, match="handle"):
            buf.combine(x, handle=("a", "tuple"))
        wait()
        rx, ri, rw, counts, handle, _ = buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w)
        with pytest.raises(ValueError, match="expected shape"):
            buf.combine(rx[:1] if rx.shape[0] > 1 else np.zeros((5, H), np.uint16), handle)
        with pytest.raises(ValueError, match="for a cached dispatch"):
            buf.dispatch(x, handle=handle, topk_idx=idx, topk_weights=w)
        wait()
        cx, cw, _ = buf.combine(rx, handle, topk_weights=rw)
        return cx, np.asarray(ntpr)

    results = run_in_process(R, "cpu", B, body)
    for cx, _ in results:
        assert (cx == bf16_round(np.float32(2.0))).all()  # each token went to two ranks, summed


def test_kernel_reported_bad_expert_id_is_a_value_error():
    """An expert id out of range is found by the layout kernel; the call raises ValueError
    naming the row, and the buffer keeps working."""
    E = 8
    bad = np.array([[0, 1], [2, 99]], np.int64)
    good = np.array([[0, 1], [2, 3]], np.int64)

    def body(buf, r, wait):
        with pytest.raises(ValueError, match="row 1 holds 99"):
            buf.get_dispatch_layout(bad, E)
        ntpr, _, _, _, _ = buf.get_dispatch_layout(good, E)
        return np.asarray(ntpr).tolist()

    assert run_in_process(R, "cpu", B, body)[0] == [1, 1, 0, 0]


def test_unique_id_bootstrap_across_threads():
    """Group.from_unique_id (the TCP bootstrap), as separate processes would use it."""
    uid = moe_ep.UniqueId()
    groups = [None] * R

    def join(r):
        groups[r] = moe_ep.Group.from_unique_id(moe_ep.UniqueId.from_bytes(uid.to_bytes()), r, R, "cpu")

    threads = [threading.Thread(target=join, args=(r,)) for r in range(R)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [g.rank() for g in groups] == list(range(R)) and all(g.size() == R for g in groups)


def test_process_group_bootstrap_through_a_python_all_gather():
    """A torch.distributed-like group: Buffer all-gathers our handles through the group's
    all_gather_object (here a fake over threads, since CI has no torch)."""
    import sys
    import types

    gathered, cond = {}, threading.Condition()

    class FakeGroup:
        def __init__(self, r):
            self.r = r

        def rank(self):
            return self.r

        def size(self):
            return R

    calls = [0] * R

    def all_gather_object(out, obj, group=None):
        with cond:
            n = calls[group.r]
            calls[group.r] += 1
            gathered.setdefault(n, {})[group.r] = obj
            cond.wait_for(lambda: len(gathered[n]) == R, timeout=60)
            cond.notify_all()
        for i in range(R):
            out[i] = gathered[n][i]

    fake = types.ModuleType("torch.distributed")
    fake.all_gather_object = all_gather_object
    saved = sys.modules.get("torch.distributed")
    sys.modules["torch.distributed"] = fake
    try:
        bufs = [None] * R

        def make(r):
            bufs[r] = moe_ep.Buffer(FakeGroup(r))

        threads = [threading.Thread(target=make, args=(r,)) for r in range(R)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        if saved is None:
            del sys.modules["torch.distributed"]
        else:
            sys.modules["torch.distributed"] = saved
    assert [b.rank for b in bufs] == list(range(R)) and all(b.group_size == R for b in bufs)


def test_docs_example_is_the_one_the_gpu_bundle_runs():
    """docs/python.md's example is example_torch.py, which python_torch.sh runs on the GPU."""
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    doc = os.path.join(here, "..", "..", "..", "docs", "python.md")
    if not os.path.exists(doc):
        pytest.skip("not in the source tree")
    code = re.search(r"## A complete example\n.*?```python\n(.*?)```", open(doc).read(), re.S).group(1)
    example = open(os.path.join(here, "example_torch.py")).read()
    assert example.endswith(code), "docs/python.md's example and tests/example_torch.py differ"


def test_ht_and_ll_share_a_buffer_and_a_rebuild_refuses_old_handles():
    """Each mode's buffer is made on first use; an LL call leaves HT handles valid; an HT call
    with a larger hidden rebuilds the HT buffer (collectively), after which an older handle is
    refused with ValueError, and fresh ones work."""
    E, K, T = 8, 2, 4
    idx = np.array([[t % E, (t + 3) % E] for t in range(T)], np.int64)
    w = np.ones((T, K), np.float32)

    def body(buf, r, wait):
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
        x64 = bf16_round(np.full((T, 64), r + 1, np.float32))
        rx, _, rw, _, h64, _ = buf.dispatch(x64, **layout, topk_idx=idx, topk_weights=w)
        recv, count, llh, _, _ = buf.low_latency_dispatch(x64, idx, T, E, use_fp8=False)
        cx, _, _ = buf.combine(rx, h64)  # still valid after the LL buffer appeared
        _ = buf.low_latency_combine(recv, idx, w, llh)
        x256 = bf16_round(np.full((T, 256), r + 1, np.float32))
        rx2, _, _, _, h256, _ = buf.dispatch(x256, **layout, topk_idx=idx, topk_weights=w)
        with pytest.raises(ValueError, match="rebuilt"):
            buf.combine(rx, h64)
        cx2, _, _ = buf.combine(rx2, h256)
        return bf16_round(np.float32(2 * (r + 1)))[()], np.unique(cx), np.unique(cx2)

    # The rings may use all of num_nvl_bytes (no heap carved from it): the rebuild always fits.
    for want, a, b in run_in_process(R, "cpu", B, body, num_heap_bytes=0):
        assert list(a) == [want] and list(b) == [want]


def test_memory_is_allocated_at_construction_and_the_heap_gives_way_only_when_free():
    """Buffer(num_nvl_bytes) allocates at construction; the first HT call lays the rings out in
    it and the rest becomes the output heap. A later call that needs larger rings gets them
    only once no rank holds heap blocks (a ValueError that says so, and the buffer stays
    usable); a call too large for the whole buffer names the size to pass."""
    E, K, T = 8, 2, 4
    idx = np.array([[t % E, (t + 3) % E] for t in range(T)], np.int64)
    w = np.ones((T, K), np.float32)

    def body(buf, r, wait):
        rings0, heap0, ll0 = buf.runtime.memory_bytes()
        assert (rings0, heap0) == (6 << 20, 0) and ll0 == 0  # nothing laid out yet, no LL memory
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
        x64 = bf16_round(np.full((T, 64), r + 1, np.float32))
        rx, _, _, _, h64, _ = buf.dispatch(x64, **layout, topk_idx=idx, topk_weights=w)
        rings1, heap1, _ = buf.runtime.memory_bytes()
        assert heap1 > 0 and rings1 == 6 << 20  # (rings can still grow into the heap)
        big = bf16_round(np.full((T, 4096), r + 1, np.float32))
        with pytest.raises(ValueError, match="drop earlier dispatch outputs"):
            buf.dispatch(big, **layout, topk_idx=idx, topk_weights=w)  # rx and h64 hold heap blocks
        cx, _, _ = buf.combine(rx, h64)  # still usable
        del rx, h64
        wait()
        rx2, _, _, _, h2, _ = buf.dispatch(big, **layout, topk_idx=idx, topk_weights=w)
        cx2, _, _ = buf.combine(rx2, h2)
        with pytest.raises(ValueError, match="num_rdma_bytes"):
            buf.low_latency_dispatch(x64, idx, T, E, use_fp8=False)
        huge = bf16_round(np.full((T, 16384), r + 1, np.float32))
        with pytest.raises(ValueError, match=r"pass at least \d+"):
            buf.dispatch(huge, **layout, topk_idx=idx, topk_weights=w)
        return bf16_round(np.float32(2 * (r + 1)))[()], np.unique(cx), np.unique(cx2[:, :8])

    for want, a, b in run_in_process(R, "cpu", B, body, num_nvl_bytes=6 << 20, num_rdma_bytes=0):
        assert list(a) == [want] and list(b) == [want]


def test_a_missing_peer_is_a_timeout_error(monkeypatch):
    """A rank whose peer never joins the collective gets TimeoutError (the kernel gives up after
    MOE_EP_TIMEOUT_S and reports it), not a hang or a crash."""
    monkeypatch.setenv("MOE_EP_TIMEOUT_S", "0.5")
    E, T = 4, 2
    idx = np.array([[0, 3], [1, 2]], np.int64)
    x = bf16_round(np.ones((T, 64), np.float32))

    def body(buf, r, wait):
        buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)  # both ranks: creates the buffer
        wait()
        if r == 0:
            with pytest.raises(TimeoutError, match="timed out waiting for rank 1"):
                buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        return True

    assert run_in_process(2, "cpu", B, body) == [True, True]


def test_deep_ep_alias_package_is_moe_ep():
    """`import deep_ep` (crates/python/deep_ep_alias) gives moe_ep's objects, and `deep_ep.X`
    is the module `moe_ep.X` itself, as DeepEP-written code and frameworks import them."""
    import deep_ep
    from deep_ep.utils import EventHandle, EventOverlap
    import deep_ep.utils.event as event

    assert deep_ep.Buffer is moe_ep.Buffer and deep_ep.Config is moe_ep.Config
    assert (EventHandle, EventOverlap) == (moe_ep.EventHandle, moe_ep.EventOverlap)
    assert deep_ep.EventOverlap is moe_ep.utils.EventOverlap and deep_ep.topk_idx_t == moe_ep.topk_idx_t
    assert event is moe_ep.utils.event and sys.modules["deep_ep.utils"] is moe_ep.utils
    assert moe_ep.utils.event.__spec__.name == "moe_ep.utils.event"  # moe_ep's modules keep their own spec
    assert deep_ep.__version__ == moe_ep.__version__
    assert not hasattr(deep_ep, "ElasticBuffer")  # (vLLM takes DeepEP V2's path when it exists)
    with pytest.raises(ImportError):
        import deep_ep.no_such_module  # noqa: F401


def test_event_overlap_as_deep_ep_has_it():
    """DeepEP's EventOverlap: a hook after the wait and its result, `with ev(release_handle=True)`
    dropping the event, one hook at a time; `EventHandle()` made by the caller (Megatron passes
    `EventOverlap(EventHandle())` as previous_event)."""
    handle = moe_ep.EventHandle()
    ev = moe_ep.EventOverlap(handle, extra_tensors=(np.zeros(1),))
    ev.register_hook_after_wait(lambda: "sorted")
    with pytest.raises(RuntimeError, match="already registered"):
        ev.register_hook_after_wait(lambda: None)
    assert ev.current_stream_wait() == "sorted" and ev.extra_tensors is None and ev.hook_after_wait is None
    with ev(release_handle=True):
        pass
    assert ev.event is None
    assert moe_ep.Buffer.capture().current_stream_wait() is None
    with pytest.raises(TypeError, match="EventHandle"):
        moe_ep.EventOverlap("an event")


def test_handles_and_configs_as_deep_ep_has_them():
    """LL handles are DeepEP's 5-tuples (copy/deepcopy keep them; pickling refuses: device
    state); Config's defaults and the per-rank-count recommended configs are DeepEP's."""
    E, K, T = 8, 2, 4
    idx = np.array([[t % E, (t + 3) % E] for t in range(T)], np.int64)

    def body(buf, r, wait):
        x = bf16_round(np.full((T, 64), r + 1, np.float32))
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        assert isinstance(handle, tuple) and len(handle) == 5 and handle[2:] == (T, 64, E)
        assert copy.copy(handle) is handle and copy.deepcopy(handle) is handle
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(handle)
        return True

    assert run_in_process(R, "cpu", B, body) == [True] * R
    cfg = moe_ep.Config(20)
    assert (cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens,
            cfg.num_max_rdma_chunked_send_tokens, cfg.num_max_rdma_chunked_recv_tokens) == (6, 256, 6, 256)
    sends = [(moe_ep.Buffer.get_dispatch_config(n).num_max_nvl_chunked_send_tokens,
              moe_ep.Buffer.get_combine_config(n).num_max_nvl_chunked_send_tokens) for n in (2, 4, 8)]
    assert sends == [(24, 10), (6, 9), (6, 4)]


def test_arguments_as_deep_ep_binding_takes_them():
    """What DeepEP's C++ binding converts is accepted: numpy integers and bools, None for a
    bool, `use_fabric`, `num_qps_per_rank=None`; previous_event is any object (its `.event`, if
    any, is waited for); a caller-made `EventOverlap(EventHandle())` works."""
    E, K, T = 8, 2, 4
    idx = np.array([[t % E, (t + 3) % E] for t in range(T)], np.int64)
    w = np.ones((T, K), np.float32)

    def body(buf, r, wait):
        x = bf16_round(np.full((T, 64), r + 1, np.float32))
        prev = moe_ep.EventOverlap(moe_ep.EventHandle())
        ntpr, _, ntpe, itir, ev = buf.get_dispatch_layout(idx, np.int64(E), previous_event=prev, async_finish=None,
                                                          allocate_on_comm_stream=np.bool_(True))
        rx, _, rw, _, handle, ev = buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                num_tokens_per_expert=ntpe, topk_idx=idx, topk_weights=w,
                                                num_worst_tokens=np.int32(0), expert_alignment=np.int64(1),
                                                previous_event=object(), async_finish=np.bool_(True))
        ev.current_stream_wait()
        cx, _, _ = buf.combine(rx, handle, previous_event=ev, async_finish=1)
        recv, _, llh, _, _ = buf.low_latency_dispatch(x, idx, np.int64(T), np.int32(E), use_fp8=np.bool_(False),
                                                      return_recv_hook=None)
        out, _, _ = buf.low_latency_combine(recv, idx, w, llh, zero_copy=0)
        return bf16_round(np.float32(2 * (r + 1)))[()], np.unique(cx)

    for want, got in run_in_process(R, "cpu", B, body, use_fabric=False, num_qps_per_rank=None,
                                    explicitly_destroy=np.bool_(False)):
        assert list(got) == [want]


def test_zeroed_ll_memory_as_vllm_clean_buffers_does():
    """vLLM's DeepEP manager zeroes the whole LL memory (`get_local_buffer_tensor(int8,
    use_rdma_buffer=True).zero_()`) between calls, on every rank: all-zero LL memory is a fresh
    buffer's (the epoch counters live in it and restart together), so later calls pass every
    check."""
    case = LlCase(seed(), R, num_experts=8, num_topk=3, hidden=512, max_tokens=6)
    checks = ll_body(case, B, rounds=2)

    def body(buf, r, wait):
        assert checks(buf, r, wait)
        buf.runtime.synchronize()
        wait()
        np.asarray(buf.runtime.local_buffer(0, True))[...] = 0
        wait()
        return checks(buf, r, wait)

    assert run_in_process(R, "cpu", B, body) == [True] * R


def test_ht_dispatch_copies_rows_of_other_dtypes():
    """As DeepEP's, HT dispatch moves rows of any dtype (combine sums bfloat16): float32 and
    float16 rows arrive bit for bit, in a fresh and in a cached dispatch."""
    E, K, H = 8, 2, 64
    rng = np.random.default_rng(seed())
    idxs = routing(rng, R, E, K, [5, 0, 7, 3])
    xs32 = [rng.standard_normal((len(i), H)).astype(np.float32) for i in idxs]

    def body(buf, r, wait):
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idxs[r], E)
        for xs in (xs32, [a.astype(np.float16) for a in xs32]):
            rx, _, _, _, handle, _ = buf.dispatch(xs[r], num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                  num_tokens_per_expert=ntpe)
            again, *_ = buf.dispatch(xs[r] * 2, handle=handle)
            for got, sent in ((rx, xs), (again, [a * 2 for a in xs])):
                want = ref_ht_dispatch(idxs, sent, None, R, E)[0][r]["x"]
                assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), \
                    f"rank {r}: {want.dtype} rows"
            wait()
        return True

    assert run_in_process(R, "cpu", B, body) == [True] * R
