"""Our port of DeepEP's intranode and low-latency test checks, for `moe_ep.Buffer`, shared by the
CPU suite (numpy arrays, CPU back end) and the GPU suites (torch tensors, one process with a
thread per rank, or one process per rank under torch.distributed).

Every rank generates every rank's inputs from one seed, so each can compute the reference
(a numpy model of `moe_ep::reference`, operation for operation) and compare its own outputs
bit for bit; DeepEP's own checks (block values, counts, calc_diff bounds) run beside it.
Inputs are fresh random data each run (the seed is printed; MOE_EP_TEST_SEED replays one).

Routing tables: experts `e` live on rank `e // (E / R)`; every token picks K distinct
random experts, and about one entry in 8 is -1 (DeepEP's LL test drops 10 at random).
"""
import contextlib
import hashlib
import os
import threading
import time

import numpy as np

import moe_ep

# --------------------------------------------------------------------------------- numbers


def bf16_round(f32):
    """f32 -> bf16 bits, round to nearest even (CUDA's cvt.rn.bf16.f32)."""
    b = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _e4m3_table():
    t = np.zeros(256, np.float32)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        t[b] = np.nan if (e == 15 and m == 7) else (-v if s else v)
    return t


E4M3 = _e4m3_table()


def calc_diff(x, y):
    """DeepEP's similarity measure: 1 - 2Σ(x+1)(y+1) / Σ((x+1)² + (y+1)²), in float64."""
    x, y = x.astype(np.float64) + 1, y.astype(np.float64) + 1
    denom = (x * x + y * y).sum()
    return 1 - 2 * (x * y).sum() / denom


def seed():
    s = int(os.environ.get("MOE_EP_TEST_SEED", time.time_ns() % (1 << 31)))
    print(f"MOE_EP_TEST_SEED={s}")
    return s


# -------------------------------------------------------------------------------- backends


class NumpyBackend:
    """CPU back end, numpy arrays (bf16 as uint16 bits, fp8 as uint8 bits)."""

    device = "cpu"

    def put(self, a, dtype):
        return np.ascontiguousarray(a)

    def get(self, t):
        return np.asarray(t)

    def sync(self):
        pass

    def dequant_bf16(self, q, scales, ue8m0):
        return bf16_round(dequant(q, scales, ue8m0))

    def stream(self):
        return contextlib.nullcontext()


class TorchBackend:
    """torch tensors on `device` ('cuda:N' or 'cpu')."""

    def __init__(self, device):
        import torch
        self.torch, self.device = torch, device

    def put(self, a, dtype):
        torch = self.torch
        if dtype == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        elif dtype == "float8_e4m3fn":
            t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
        else:
            t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device)

    def get(self, t):
        torch = self.torch
        if t.is_cuda:
            # Drain the stream first. Ranks as threads of one process (H200, 2026-11-30): a
            # pageable `.cpu()` queued behind a collective stalled other rank-threads' CUDA
            # calls (their launches, which the collective needs) until the device timeout.
            torch.cuda.current_stream(t.device).synchronize()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(np.uint16)
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).cpu().numpy()
        return t.cpu().numpy()

    def dequant_bf16(self, q, scales, ue8m0):
        """fp8 rows times their per-128-channel scales, as bf16, on the device; one expert at
        a time (float32 copies of all [L, R*M, H] rows took 1 GiB per rank: 8 ranks on an H100
        ran out of memory)."""
        torch = self.torch
        out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
        for e in range(q.shape[0]):
            s = scales[e]
            if ue8m0:  # four exponent bytes per int32: scale 2^(byte - 127)
                s = torch.exp2(s.contiguous().view(torch.uint8).float() - 127)
            out[e] = (q[e].float() * s.repeat_interleave(128, dim=-1)).to(torch.bfloat16)
        return out

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.current_stream().synchronize()

    def stream(self):
        """Each rank's thread gets its own stream: ranks sharing one stream would serialize
        (rank i's op would wait behind rank j's spinning kernel)."""
        if self.device == "cpu":
            return contextlib.nullcontext()
        return self.torch.cuda.stream(self.torch.cuda.Stream(device=self.device))


# --------------------------------------------------------------------------------- ranks


def run_in_process(num_ranks, device, backend, body, **buffer_kwargs):
    """`body(buffer, rank, barrier)` on one thread per rank of an in-process group (each
    `Buffer` made with `buffer_kwargs`); returns the results in rank order, re-raising the
    first failure."""
    # As DeepEP's tests size them: HT rings plus heap, LL buffer for the largest LL case.
    small = device == "cpu"
    buffer_kwargs.setdefault("num_nvl_bytes", (64 << 20) if small else int(2e9))
    buffer_kwargs.setdefault("num_rdma_bytes", moe_ep.Buffer.get_low_latency_rdma_size_hint(
        32 if small else 128, 1024 if small else 7168, num_ranks, 64 if small else 288))
    groups = moe_ep.Group.in_process(num_ranks, device)
    bar = threading.Barrier(num_ranks, timeout=600)
    results, errors = [None] * num_ranks, [None] * num_ranks

    def main(r):
        try:
            with backend.stream():
                results[r] = body(moe_ep.Buffer(groups[r], **buffer_kwargs), r, bar.wait)
        except BaseException as e:  # noqa: BLE001 (reported below, with the rank)
            errors[r] = e
            bar.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if first or any(errors):
        raise (first or [e for e in errors if e])[0]
    return results


# ------------------------------------------------------------------------------- routing


def routing(rng, num_ranks, num_experts, num_topk, tokens, drop_one_in=8):
    out = []
    for t in tokens:
        idx = np.stack([rng.choice(num_experts, num_topk, replace=False) for _ in range(t)]) if t else \
            np.zeros((0, num_topk), np.int64)
        idx = idx.astype(np.int64)
        if drop_one_in:
            idx[rng.integers(0, drop_one_in, idx.shape) == 0] = -1
        out.append(idx)
    return out


def ref_layout(idx, num_ranks, num_experts):
    per = num_experts // num_ranks
    t = idx.shape[0]
    owner = np.where(idx >= 0, idx // per, -1)
    in_rank = np.zeros((t, num_ranks), bool)
    for r in range(num_ranks):
        in_rank[:, r] = (owner == r).any(axis=1)
    per_expert = np.bincount(idx[idx >= 0], minlength=num_experts).astype(np.int32)
    return in_rank.sum(0).astype(np.int32), per_expert, in_rank


def ref_ht_dispatch(idxs, xs, ws, num_ranks, num_experts, alignment=1):
    """Per destination rank: recv_x, recv_topk_idx, recv_topk_weights, recv_src_idx,
    per-expert counts, and (src, token) of every row (the combine map)."""
    per = num_experts // num_ranks
    layouts = [ref_layout(i, num_ranks, num_experts) for i in idxs]
    out = []
    for dst in range(num_ranks):
        rx, ri, rw, src_idx, rows = [], [], [], [], []
        for src in range(num_ranks):
            toks = np.nonzero(layouts[src][2][:, dst])[0]
            rx.append(xs[src][toks])
            local = np.where((idxs[src][toks] >= 0) & (idxs[src][toks] // per == dst), idxs[src][toks] - dst * per, -1)
            ri.append(local)
            if ws is not None:
                rw.append(np.where(local >= 0, ws[src][toks], 0).astype(np.float32))
            src_idx.append(toks.astype(np.int32))
            rows += [(src, int(t)) for t in toks]
        ri = np.concatenate(ri)
        counts = np.array([(ri == e).sum() for e in range(per)], np.int64)
        counts = (-(-counts // alignment) * alignment).astype(np.int32)
        out.append(dict(x=np.concatenate(rx), topk_idx=ri, topk_weights=np.concatenate(rw) if rw else None,
                        src_idx=np.concatenate(src_idx), counts=counts, rows=rows))
    return out, layouts


def ref_ht_combine(dispatched, ys, yws, num_tokens, src, hidden, bias=(None, None)):
    """moe_ep::reference::ht_combine for source rank `src`: f32 sum of the bias, then each
    copy in ascending receiving-rank order; one bf16 rounding."""
    acc = np.zeros((num_tokens, hidden), np.float32)
    for b in bias:
        if b is not None:
            acc = acc + bf16_to_f32(b)
    wacc = None if yws is None else np.zeros((num_tokens, yws[0].shape[1] if len(yws[0]) else 0), np.float32)
    for dst, d in enumerate(dispatched):
        rows = [i for i, (s, _) in enumerate(d["rows"]) if s == src]
        toks = [t for (s, t) in d["rows"] if s == src]
        if rows:
            acc[toks] = acc[toks] + bf16_to_f32(ys[dst][rows])
            if wacc is not None:
                wacc[toks] = wacc[toks] + yws[dst][rows]
    return bf16_round(acc), wacc


def ref_ll_dispatch(idxs, xs, num_ranks, num_experts, m):
    per = num_experts // num_ranks
    hidden = xs[0].shape[1]
    out = []
    for dst in range(num_ranks):
        px = np.zeros((per, num_ranks * m, hidden), xs[0].dtype)
        info = np.full((per, num_ranks * m), -1, np.int32)
        rng = np.zeros((per, num_ranks), np.int64)
        count = np.zeros(per, np.int32)
        for e in range(per):
            row = 0
            for src in range(num_ranks):
                toks = np.nonzero((idxs[src] == dst * per + e).any(axis=1))[0]
                px[e, row:row + len(toks)] = xs[src][toks]
                info[e, row:row + len(toks)] = toks
                rng[e, src] = (row << 32) | len(toks)
                row += len(toks)
            count[e] = row
        out.append(dict(x=px, src_info=info, layout_range=rng, count=count))
    return out


def ref_ll_combine(idxs, ws, ys, num_ranks, num_experts, m, src):
    """Σ_k w·y in f32, k ascending (exact for the dyadic data the bit-exact checks use)."""
    per = num_experts // num_ranks
    idx, w = idxs[src], ws[src]
    t, k = idx.shape
    hidden = ys[0].shape[2]
    acc = np.zeros((t, hidden), np.float32)
    for tok in range(t):
        for j in range(k):
            e = idx[tok, j]
            if e < 0:
                continue
            dst, local = e // per, e % per
            # the row of (src, tok) in dst's buffer of `local`: rows are (source, token) ordered
            row = sum(int((idxs[s] == e).any(axis=1).sum()) for s in range(src))
            row += int((idx[:tok] == e).any(axis=1).sum())
            acc[tok] = acc[tok] + bf16_to_f32(ys[dst][local, row]) * w[tok, j]
    return bf16_round(acc)


# ------------------------------------------------------------------------------ HT checks


class HtCase:
    """One HT test's inputs for every rank (DeepEP test_intranode's, scaled by the caller)."""

    def __init__(self, seed, num_ranks, num_experts, num_topk, hidden, max_tokens, empty_rank=None):
        rng = np.random.default_rng(seed)
        self.R, self.E, self.K, self.H = num_ranks, num_experts, num_topk, hidden
        tokens = [int(rng.integers(max_tokens // 2, max_tokens + 1)) for _ in range(num_ranks)]
        if empty_rank is not None:
            tokens[empty_rank] = 0  # a rank with nothing to send (DeepEP hangs there, we must not)
        self.tokens = tokens
        self.idx = routing(rng, num_ranks, num_experts, num_topk, tokens)
        self.x = [bf16_round(rng.uniform(-4, 4, (t, hidden)).astype(np.float32)) for t in tokens]
        self.x_rank = [np.full((t, hidden), bf16_round(np.float32(r + 1)), np.uint16) for r, t in enumerate(tokens)]
        self.w = [rng.random((t, num_topk), dtype=np.float32) for t in tokens]
        fp8 = [rng.integers(0, 256, (t, hidden), dtype=np.uint8) for t in tokens]
        for a in fp8:
            a[(a & 0x7F) == 0x7F] = 0x3C  # no NaN codes
        self.x_fp8 = fp8
        self.scales = [rng.random((t, hidden // 128), dtype=np.float32) + 0.5 for t in tokens]
        self.bias = [(bf16_round(rng.uniform(-1, 1, (t, hidden)).astype(np.float32)),
                      bf16_round(rng.uniform(-1, 1, (t, hidden)).astype(np.float32))) for t in tokens]
        self.ref, self.layouts = ref_ht_dispatch(self.idx, self.x, self.w, num_ranks, num_experts)
        self.ref_aligned, _ = ref_ht_dispatch(self.idx, self.x, self.w, num_ranks, num_experts, alignment=4)
        self.ref_rank, _ = ref_ht_dispatch(self.idx, self.x_rank, None, num_ranks, num_experts)
        self.ref_fp8, _ = ref_ht_dispatch(self.idx, self.x_fp8, None, num_ranks, num_experts)
        self.ref_scales, _ = ref_ht_dispatch(self.idx, self.scales, None, num_ranks, num_experts)


def _eq(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} entries differ, first at {tuple(bad[0])}: " \
                          f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]}"


def ht_body(case, backend, reruns=3, outputs_made_here=False):
    """DeepEP test_intranode's checks (see anchors.md), plus bit-exact equality with the
    reference, for one rank. `outputs_made_here`: every output in a tensor made by `Buffer`
    (the path a CUDA-graph capture takes), outside a capture."""
    B, R, E, K, H = backend, case.R, case.E, case.K, case.H
    L = E // R

    def body(buf, r, wait):
        buf._outputs_in_caller_memory = outputs_made_here
        idx, w = B.put(case.idx[r], "int64"), B.put(case.w[r], "float32")
        x, x_rank = B.put(case.x[r], "bfloat16"), B.put(case.x_rank[r], "bfloat16")
        x_fp8, scales = B.put(case.x_fp8[r], "float8_e4m3fn"), B.put(case.scales[r], "float32")
        b0, b1 = (B.put(b, "bfloat16") for b in case.bias[r])
        ref = case.ref[r]
        B.sync()
        wait()

        # 1. layout == the reference from every rank's topk_idx (sync and async + previous event)
        ntpr, ntprr, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
        assert ntprr is None
        want_ntpr, want_ntpe, want_itir = case.layouts[r]
        _eq(B.get(ntpr), want_ntpr, "num_tokens_per_rank")
        _eq(B.get(ntpe), want_ntpe, "num_tokens_per_expert")
        _eq(B.get(itir), want_itir, "is_token_in_rank")
        wait()
        a, _, b, c, ev = buf.get_dispatch_layout(idx, E, previous_event=buf.capture(), async_finish=True)
        ev.current_stream_wait()
        _eq(B.get(a), want_ntpr, "async num_tokens_per_rank")
        _eq(B.get(b), want_ntpe, "async num_tokens_per_expert")
        _eq(B.get(c), want_itir, "async is_token_in_rank")
        layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
        num_recv = len(ref["src_idx"])
        rpm_want = np.cumsum(np.stack([case.layouts[s][0] for s in range(R)]), axis=0).astype(np.int32)

        # 2-5. every input kind, with/without top-k, sync/async/previous event
        variants = [("rand", True, False), ("rank", True, True), ("fp8", True, True), ("rand", False, False),
                    ("fp8", False, False)]
        handle = recv_x = recv_w = None
        for kind, with_topk, asynchronous in variants:
            wait()
            xin = {"rand": x, "rank": x_rank, "fp8": (x_fp8, scales)}[kind]
            prev = buf.capture() if asynchronous else None
            out = buf.dispatch(xin, **layout, topk_idx=idx if with_topk else None,
                               topk_weights=w if with_topk else None, previous_event=prev,
                               async_finish=asynchronous)
            rx, ri, rw, counts, h, ev = out
            if asynchronous:
                ev.current_stream_wait()
            what = f"rank {r} dispatch {kind} topk={with_topk} async={asynchronous}"
            got_x = B.get(rx[0] if kind == "fp8" else rx)
            assert got_x.shape[0] == num_recv, f"{what}: {got_x.shape[0]} rows, want {num_recv}"
            want_x = {"rand": ref["x"], "rank": case.ref_rank[r]["x"], "fp8": case.ref_fp8[r]["x"]}[kind]
            _eq(got_x, want_x, f"{what}: recv_x")
            if kind == "fp8":
                _eq(B.get(rx[1]), case.ref_scales[r]["x"], f"{what}: recv_x_scales")
            if kind == "rank":  # DeepEP: rows from source s (by rank_prefix_matrix) all equal s
                rpm = B.get(h.rank_prefix_matrix)
                _eq(rpm, rpm_want, f"{what}: rank_prefix_matrix")
                vals = bf16_to_f32(got_x)
                for s in range(R):
                    lo = rpm[s - 1, r] if s else 0
                    assert (vals[lo:rpm[s, r]] == s + 1).all(), f"{what}: block of source {s}"
            _eq(B.get(h.recv_src_idx), ref["src_idx"], f"{what}: recv_src_idx")
            _eq(list(counts), ref["counts"], f"{what}: num_recv_tokens_per_expert_list")
            _eq(B.get(h.num_recv_tokens_per_expert), ref["counts"], f"{what}: per-expert counts")
            if with_topk:
                got_i, got_w = B.get(ri), B.get(rw)
                assert ((got_i == -1) | ((got_i >= 0) & (got_i < L))).all(), f"{what}: topk ids out of range"
                _eq([(got_i == e).sum() for e in range(L)], ref["counts"], f"{what}: per-id counts")
                _eq(got_i, ref["topk_idx"], f"{what}: recv_topk_idx")
                _eq(got_w, ref["topk_weights"], f"{what}: recv_topk_weights")
            else:
                assert ri is None and rw is None
            if kind == "rand" and with_topk:
                handle, recv_x, recv_w = h, rx, rw

        # expert_alignment rounds the per-expert counts up
        wait()
        out = buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w, expert_alignment=4)
        _eq(list(out.num_recv_tokens_per_expert_list), case.ref_aligned[r]["counts"], "aligned counts")

        # 6. num_worst_tokens: padded rows, prefix == the exact output, padding idx -1, empty list
        worst = max(len(d["src_idx"]) for d in case.ref) + 3
        wait()
        rx, ri, rw, counts, hw, _ = buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
        got_x, got_i = B.get(rx), B.get(ri)
        assert got_x.shape == (worst, H) and counts == []
        assert hasattr(hw, "_keep") == outputs_made_here, "padded outputs in tensors made by Buffer"
        _eq(got_x[:num_recv], ref["x"], "padded recv_x prefix")
        _eq(got_i[:num_recv], ref["topk_idx"], "padded recv_topk_idx prefix")
        assert (got_i[num_recv:] == -1).all(), "padding rows must have topk_idx -1"
        _eq(B.get(hw.recv_src_idx)[num_recv:], np.full(worst - num_recv, -1, np.int32), "padding src idx")

        # 7. cached dispatch with the handle: the same rows
        wait()
        cached = buf.dispatch(x, handle=handle)
        assert cached.recv_topk_idx is None and cached.handle is None
        _eq(B.get(cached.recv_x), ref["x"], "cached recv_x")
        wait()
        cached = buf.dispatch((x_fp8, scales), handle=handle, async_finish=True)
        cached.event.current_stream_wait()
        _eq(B.get(cached.recv_x[0]), case.ref_fp8[r]["x"], "cached fp8 recv_x")

        # 8. combine: exact vs the reference; DeepEP's calc_diff and weight checks
        ys = [d["x"] for d in case.ref]
        yws = [d["topk_weights"] for d in case.ref]
        for with_bias, asynchronous in ((False, False), (True, True)):
            wait()
            bias = (b0, b1) if with_bias else None
            cx, cw, ev = buf.combine(recv_x, handle, topk_weights=recv_w, bias=bias, async_finish=asynchronous,
                                     previous_event=buf.capture() if asynchronous else None)
            if asynchronous:
                ev.current_stream_wait()
            want_x, want_w = ref_ht_combine(case.ref, ys, yws, case.tokens[r], r, H,
                                            case.bias[r] if with_bias else (None, None))
            got_cx = B.get(cx)
            _eq(got_cx, want_x, f"combined_x bias={with_bias}")
            _eq(B.get(cw), want_w, "combined_topk_weights")
            _eq(B.get(cw), np.where(case.idx[r] >= 0, case.w[r], 0).astype(np.float32), "combined weights == w")
            if not with_bias:
                copies = want_itir.sum(1)
                sent = copies > 0
                if sent.any():
                    d = calc_diff(bf16_to_f32(got_cx[sent]) / copies[sent, None], bf16_to_f32(case.x[r][sent]))
                    assert d < 5e-6, f"combine calc_diff {d}"

        # 8b. with a heap: expert outputs written into get_ht_combine_buffer (pulled by peers
        # when every rank's are there), the same sums
        wait()
        y = buf.get_ht_combine_buffer(handle, H)
        assert tuple(y.shape) == (num_recv, H), f"combine buffer shape {tuple(y.shape)}"
        if hasattr(y, "copy_"):
            y.copy_(recv_x)
        else:
            y[...] = recv_x
        B.sync()
        wait()
        cx, cw, _ = buf.combine(y, handle, topk_weights=recv_w)
        want_x, want_w = ref_ht_combine(case.ref, ys, yws, case.tokens[r], r, H, (None, None))
        _eq(B.get(cx), want_x, "combined_x from get_ht_combine_buffer")
        _eq(B.get(cw), want_w, "combined_topk_weights from get_ht_combine_buffer")

        # 9. pressure: identical results over reruns
        hashes = set()
        for _ in range(reruns):  # (hashlib releases the GIL: ranks are threads)
            wait()
            rx, ri, rw, _, h2, _ = buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w)
            cx, cw, _ = buf.combine(rx, h2, topk_weights=rw)
            digest = hashlib.sha256()
            for a in (rx, ri, rw, cx, cw):
                digest.update(np.ascontiguousarray(B.get(a)).view(np.uint8).data)
            hashes.add(digest.hexdigest())
        assert len(hashes) == 1, "outputs changed between reruns"
        wait()
        return True

    return body


def ht_graph_body(case, backend, replays=100):
    """The HT layer's communication as SGLang/vLLM capture it: `get_dispatch_layout`, a
    padded dispatch (`num_worst_tokens`) with top-k, and a combine, captured by
    `torch.cuda.graph` and replayed `replays` times with new rows in `x` (two variants in
    turn) and every output poisoned before each replay; each replay's outputs equal the
    reference bit for bit. Also: a capture without `num_worst_tokens` is a ValueError."""
    B, R, E, K, H = backend, case.R, case.E, case.K, case.H
    torch = B.torch

    def body(buf, r, wait):
        idx, w = B.put(case.idx[r], "int64"), B.put(case.w[r], "float32")
        xs = [B.put(case.x[r], "bfloat16"), B.put(case.x_rank[r], "bfloat16")]
        x = xs[0].clone()
        worst = max(len(d["src_idx"]) for d in case.ref) + 5
        n = len(case.ref[r]["src_idx"])
        yws = [d["topk_weights"] for d in case.ref]
        wants = []
        for ref in (case.ref, case.ref_rank):
            cx, cw = ref_ht_combine(case.ref, [d["x"] for d in ref], yws, case.tokens[r], r, H)
            wants.append((B.put(ref[r]["x"], "bfloat16"), B.put(cx, "bfloat16"), B.put(cw, "float32")))
        want_idx = B.put(case.ref[r]["topk_idx"], "int64")
        want_w = B.put(case.ref[r]["topk_weights"], "float32")
        want_src = B.put(case.ref[r]["src_idx"], "int32")

        def step():
            ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
            rx, ri, rw, counts, h, _ = buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                    num_tokens_per_expert=ntpe, topk_idx=idx, topk_weights=w,
                                                    num_worst_tokens=worst)
            cx, cw, _ = buf.combine(rx, h, topk_weights=rw)
            return rx, ri, rw, h, cx, cw

        B.sync()
        wait()
        step()  # eager warm-up: the buffer is laid out for these shapes before the capture
        B.sync()
        wait()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rx, ri, rw, h, cx, cw = step()
        assert tuple(rx.shape) == (worst, H) and h.num_recv_tokens == worst
        B.sync()
        wait()
        src = h.recv_src_idx
        for i in range(replays):
            want_x, want_cx, want_cw = wants[i % 2]
            x.copy_(xs[i % 2])
            for t in (rx, cx):
                t.view(torch.int16).fill_(-1)
            for t in (ri, src):
                t.fill_(-7)
            for t in (rw, cw):
                t.fill_(float("nan"))
            graph.replay()
            B.sync()
            what = f"rank {r} replay {i}"
            assert torch.equal(rx[:n].view(torch.int16), want_x.view(torch.int16)), f"{what}: recv_x"
            assert torch.equal(ri[:n], want_idx) and bool((ri[n:] == -1).all()), f"{what}: recv_topk_idx"
            assert torch.equal(rw[:n].view(torch.int32), want_w.view(torch.int32)), f"{what}: recv_topk_weights"
            assert torch.equal(src[:n], want_src) and bool((src[n:] == -1).all()), f"{what}: recv_src_idx"
            assert torch.equal(cx.view(torch.int16), want_cx.view(torch.int16)), f"{what}: combined_x"
            assert torch.equal(cw.view(torch.int32), want_cw.view(torch.int32)), f"{what}: combined_topk_weights"
        wait()
        del graph

        # Exact-size outputs need a host synchronisation: refused up front, capture intact.
        g2 = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g2):
                ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, E)
                try:
                    buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
                    raise AssertionError("a dispatch without num_worst_tokens was captured")
                except ValueError as e:
                    assert "num_worst_tokens" in str(e), str(e)
        finally:
            del g2
        B.sync()
        wait()
        return True

    return body


# ------------------------------------------------------------------------------ LL checks


class LlCase:
    """DeepEP test_low_latency's inputs: x = rank - 128 with the last 128 columns holding the
    token index; -1 entries in topk_idx; weights dyadic (k/256) so combine sums are exact."""

    def __init__(self, seed, num_ranks, num_experts, num_topk, hidden, max_tokens):
        rng = np.random.default_rng(seed)
        self.R, self.E, self.K, self.H, self.M = num_ranks, num_experts, num_topk, hidden, max_tokens
        tokens = [int(rng.integers(max(1, max_tokens // 2), max_tokens + 1)) for _ in range(num_ranks)]
        self.tokens = tokens
        self.idx = routing(rng, num_ranks, num_experts, num_topk, tokens)
        xs = []
        for r, t in enumerate(tokens):
            v = np.full((t, hidden), r - 128, np.float32)
            v[:, -128:] = np.arange(t, dtype=np.float32)[:, None]
            xs.append(bf16_round(v))
        self.x = xs
        self.w = [(rng.integers(1, 257, (t, num_topk)) / 256).astype(np.float32) for t in tokens]
        self.ref = ref_ll_dispatch(self.idx, self.x, num_ranks, num_experts, max_tokens)
        self.combined = [ref_ll_combine(self.idx, self.w, [d["x"] for d in self.ref], num_ranks, num_experts,
                                        max_tokens, s) for s in range(num_ranks)]


def dequant(q, scales, ue8m0):
    """fp8 rows [.., H] with per-128-channel scales -> f32."""
    v = E4M3[q]
    if ue8m0:  # four exponent bytes per int32, scale 2^(byte - 127)
        b = np.ascontiguousarray(scales).view(np.uint8).reshape(scales.shape[:-1] + (-1,))
        s = np.exp2(b.astype(np.float32) - 127)
    else:
        s = scales
    return v * np.repeat(s, 128, axis=-1)


def ll_blocks(got_range, ref, count, what):
    """Per local expert, `(source, begin, reference begin, rows)` of each source's block:
    the same rows as the reference's, the blocks (in arrival order) tiling `0..count`."""
    out = []
    for e in range(got_range.shape[0]):
        blocks, covered = [], np.zeros(int(count[e]), bool)
        for s in range(got_range.shape[1]):
            lg, c = int(got_range[e, s]) >> 32, int(got_range[e, s]) & 0xFFFFFFFF
            lr, cr = int(ref["layout_range"][e, s]) >> 32, int(ref["layout_range"][e, s]) & 0xFFFFFFFF
            assert c == cr, f"{what}: expert {e} got {c} rows from {s}, want {cr}"
            assert lg + c <= count[e] and not covered[lg:lg + c].any(), f"{what}: block of {s} at expert {e}"
            covered[lg:lg + c] = True
            blocks.append((s, lg, lr, c))
        assert covered.all(), f"{what}: expert {e}'s blocks leave rows uncovered"
        out.append(blocks)
    return out


def ll_body(case, backend, rounds=2):
    """DeepEP test_low_latency's checks plus bit-exact equality with the reference, per rank."""
    B, R, E, K, H, M = backend, case.R, case.E, case.K, case.H, case.M
    L = E // R

    def body(buf, r, wait):
        x, idx, w = B.put(case.x[r], "bfloat16"), B.put(case.idx[r], "int64"), B.put(case.w[r], "float32")
        ref, t = case.ref[r], case.tokens[r]
        want_plain = bf16_to_f32(case.x[r]) * np.where(case.idx[r] >= 0, case.w[r], 0).sum(1, keepdims=True)
        B.sync()
        wait()
        variants = [dict(use_fp8=False), dict(use_fp8=False, return_recv_hook=True),
                    dict(use_fp8=True, async_finish=True), dict(use_fp8=True, round_scale=True, return_recv_hook=True)]
        if H % 512 == 0:
            variants.append(dict(use_fp8=True, round_scale=True, use_ue8m0=True))
        stats = B.put(np.zeros(L, np.int32), "int32")
        expected_stats = np.zeros(L, np.int32)
        wait_d, wait_c = B.put(np.zeros(R, np.int64), "int64"), B.put(np.zeros(R, np.int64), "int64")
        for rnd in range(rounds):  # consecutive calls use both buffer sets
            for v in variants:
                what = f"rank {r} round {rnd} {v}"
                wait()
                use_stats = rnd == 0 or not v.get("async_finish", False)  # (added on the device)
                recv, count, handle, ev, hook = buf.low_latency_dispatch(
                    x, idx, M, E, cumulative_local_expert_recv_stats=stats if use_stats else None,
                    dispatch_wait_recv_cost_stats=wait_d, **v)
                assert (hook is not None) == v.get("return_recv_hook", False)
                if hook is not None:
                    hook()
                if v.get("async_finish"):
                    ev.current_stream_wait()
                got_count = B.get(count)
                _eq(got_count, ref["count"], f"{what}: recv_count")
                if use_stats:
                    expected_stats += ref["count"]
                src_info, layout_range, m, hidden, num_experts = handle
                assert (m, hidden, num_experts) == (M, H, E)
                blocks = ll_blocks(B.get(layout_range), ref, got_count, what)
                info = B.get(src_info)
                for e in range(L):
                    for s, lg, lr, c in blocks[e]:
                        _eq(info[e, lg:lg + c], ref["src_info"][e, lr:lr + c], f"{what}: src_info {e} from {s}")
                if v["use_fp8"]:  # dequantized rows ~ x (DeepEP's bound), fed to combine
                    y = B.dequant_bf16(recv[0], recv[1], v.get("use_ue8m0", False))
                    for e in range(L):
                        for s, lg, lr, c in blocks[e]:
                            if c:
                                d = calc_diff(bf16_to_f32(B.get(y[e, lg:lg + c])), bf16_to_f32(ref["x"][e, lr:lr + c]))
                                assert d < 9e-4, f"{what}: fp8 calc_diff {d}"
                else:  # only the valid rows are fetched (the rest of [L, R*M, H] is not defined)
                    for e in range(L):
                        got = B.get(recv[e, :got_count[e]])
                        rows = bf16_to_f32(got)
                        for s, lg, lr, c in blocks[e]:
                            _eq(got[lg:lg + c], ref["x"][e, lr:lr + c], f"{what}: rows of expert {e} from {s}")
                            # DeepEP: each source block holds its rank value and the right token ids
                            assert (rows[lg:lg + c, :-128] == s - 128).all(), f"{what}: block of {s}"
                            _eq(rows[lg:lg + c, -1].astype(np.int32), info[e, lg:lg + c], f"{what}: token ids")
                    y = recv  # DeepEP's simulated expert: the identity
                # combine the (dequantized) rows; weighted sum vs x * Σw, exactly for bf16
                wait()
                zero_copy = rnd == 1
                if zero_copy:  # DeepEP's meaning: the rows are read from the buffer, whatever x holds
                    buf.get_next_low_latency_combine_buffer(handle)[...] = y
                    y[...] = 0xFFFF  # x itself poisoned
                y_in = y
                out = B.put(np.full((t, H), 0xFFFF, np.uint16), "bfloat16") if rnd == 0 else None  # poisoned
                B.sync()
                wait()
                cx, cev, chook = buf.low_latency_combine(y_in, idx, w, handle, zero_copy=zero_copy, out=out,
                                                         combine_wait_recv_cost_stats=wait_c,
                                                         return_recv_hook=v.get("return_recv_hook", False),
                                                         async_finish=v.get("async_finish", False))
                if out is not None:
                    assert cx is out
                if chook is not None:
                    chook()
                if v.get("async_finish"):
                    cev.current_stream_wait()
                got_c = B.get(cx)
                if t:
                    d = calc_diff(bf16_to_f32(got_c), want_plain)
                    assert d < (9e-4 if v["use_fp8"] else 1e-5), f"{what}: combine calc_diff {d}"
                if not v["use_fp8"]:
                    _eq(got_c, case.combined[r], f"{what}: combined_x")
        _eq(B.get(stats), expected_stats, "cumulative_local_expert_recv_stats")
        # clock cycles waited for each source rank: every rank was waited for, none negative
        for name, ws in (("dispatch", wait_d), ("combine", wait_c)):
            got = B.get(ws)
            assert (got > 0).all(), f"rank {r}: {name}_wait_recv_cost_stats {got}"
        wait()
        return True

    return body


def ll_graph_body(case, backend, replays=100):
    """LL dispatch + combine captured by `torch.cuda.graph` (with and without receive hooks)
    and replayed `replays` times: after every replay, with the outputs poisoned before it,
    the counts and the combined rows equal the reference bit for bit (bf16)."""
    B, E, H, M = backend, case.E, case.H, case.M
    torch = B.torch

    def body(buf, r, wait):
        x, idx, w = B.put(case.x[r], "bfloat16"), B.put(case.idx[r], "int64"), B.put(case.w[r], "float32")
        ref_count, want = torch.from_numpy(case.ref[r]["count"]).to(B.device), B.put(case.combined[r], "bfloat16")
        for hooks in (False, True):
            def step():
                recv, count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False,
                                                                        return_recv_hook=hooks)
                if hook is not None:
                    hook()
                out, _, chook = buf.low_latency_combine(recv, idx, w, handle, return_recv_hook=hooks)
                if chook is not None:
                    chook()
                return count, out

            B.sync()
            wait()
            step()  # eager warm-up (torch's advice before a capture)
            B.sync()
            wait()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                count, out = step()
            B.sync()
            wait()
            for i in range(replays):
                count.fill_(-1)
                out.fill_(float("nan"))
                graph.replay()
                if i % 10 == 9 or i == replays - 1:
                    B.sync()
                    assert torch.equal(count, ref_count), f"rank {r} hooks={hooks} replay {i}: recv_count"
                    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), \
                        f"rank {r} hooks={hooks} replay {i}: combined_x"
            B.sync()
            wait()
            del graph
        return True

    return body
