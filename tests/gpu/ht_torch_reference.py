#!/usr/bin/env python3
"""Pure-torch reference of HT dispatch/combine for `cargo xtask bench ht`, on one GPU.

All R ranks' work as one op, as the bench's ranks share the GPU: dispatch = one
index_select gathering every (receiver, source token) copy, in DeepEP order; combine = one
index_add_ summing the copies back per source token. Same shapes and routing statistics as
the Rust bench (uniform distinct top-k). Prints median microseconds per op.

    python3 ht_torch_reference.py [--ranks 8] [--tokens 4096] [--hidden 7168] [--topk 8] [--experts 256]
"""
import argparse

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"torch reference on {torch.cuda.get_device_name()}: {a.ranks} ranks, hidden {a.hidden}, top-{a.topk} of {a.experts}")
    print(f"{'tokens':>8} {'op':>14} {'time µs':>10} {'copies':>9}")
    for t in a.tokens:
        g = torch.Generator(device=dev).manual_seed(t)
        # [R, T, K] distinct experts per token.
        scores = torch.rand(a.ranks, t, a.experts, device=dev, generator=g)
        topk = scores.topk(a.topk, dim=-1).indices
        rank_of = topk // (a.experts // a.ranks)
        in_rank = torch.zeros(a.ranks, t, a.ranks, dtype=torch.bool, device=dev)
        in_rank.scatter_(2, rank_of, True)
        x = torch.randn(a.ranks * t, a.hidden, device=dev).to(torch.bfloat16)
        # Receiver-major, then source rank, then source token: DeepEP's order.
        src_rank, src_tok, dst = in_rank.nonzero(as_tuple=True)
        order = torch.argsort(dst * a.ranks * t + src_rank * t + src_tok)
        rows = (src_rank * t + src_tok)[order]
        copies = rows.numel()
        out = torch.empty(copies, a.hidden, device=dev, dtype=torch.bfloat16)
        combined = torch.zeros(a.ranks * t, a.hidden, device=dev, dtype=torch.bfloat16)

        def dispatch():
            torch.index_select(x, 0, rows, out=out)

        def combine():
            combined.zero_()
            combined.index_add_(0, rows, out)

        for name, fn in (("dispatch bf16", dispatch), ("combine bf16", combine)):
            for _ in range(3):
                fn()
            times = []
            for _ in range(a.iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e3)
            times.sort()
            print(f"{t:>8} {name:>14} {times[len(times) // 2]:>10.1f} {copies:>9}")


if __name__ == "__main__":
    main()
