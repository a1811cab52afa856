"""Where the host time of a Python LL/HT call goes: one process, one rank (moe_ep.Group.in_process),
DeepEP's LL sizes. Prints the host µs per call (enqueue only, the GPU kept busy) next to the
GPU's µs per call, then cProfile's top functions by own time.

    python3 profile_py.py [--calls 300]
"""
import argparse
import cProfile
import pstats
import time

import torch

import moe_ep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    M, H, E, K = 128, 7168, 288, 8
    group = moe_ep.Group.in_process(1, "cuda:0")[0]
    buffer = moe_ep.Buffer(group, num_nvl_bytes=int(1e9),
                           num_rdma_bytes=moe_ep.Buffer.get_low_latency_rdma_size_hint(M, H, 1, E))
    x = torch.randn((M, H), dtype=torch.bfloat16, device="cuda")
    scores = torch.randn((M, E), device="cuda").abs() + 1
    topk_idx = torch.topk(scores, K, dim=-1)[1].to(moe_ep.topk_idx_t)
    topk_weights = torch.rand((M, K), device="cuda")

    def ll_dispatch():
        return buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)

    def ll_dispatch_combine():
        recv, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
        buffer.low_latency_combine(recv, topk_idx, topk_weights, handle)

    T = 4096
    xt = torch.randn((T, H), dtype=torch.bfloat16, device="cuda")
    st = torch.randn((T, 256), device="cuda").abs() + 1
    ti = torch.topk(st, K, dim=-1)[1].to(moe_ep.topk_idx_t)
    tw = torch.rand((T, K), device="cuda")
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(ti, 256)
    rx, _, _, _, handle, _ = buffer.dispatch(xt, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                             num_tokens_per_expert=ntpe, topk_idx=ti, topk_weights=tw)

    def ht_cached():
        buffer.dispatch(x=xt, handle=handle)

    def ht_combine():
        buffer.combine(x=rx, handle=handle)

    rows = []
    for name, fn in (("LL dispatch bf16", ll_dispatch), ("LL dispatch + combine", ll_dispatch_combine),
                     ("HT cached dispatch", ht_cached), ("HT combine", ht_combine)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        n = args.calls
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n=== {name}: cProfile, {n} calls, by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        rows.append((name, (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6))
    print(f"\n{'op (1 rank, one process)':28} {'host us/call':>13} {'wall us/call':>13}")
    for name, host, wall in rows:
        print(f"{name:28} {host:13.1f} {wall:13.1f}")


if __name__ == "__main__":
    main()
