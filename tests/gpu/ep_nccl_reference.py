#!/usr/bin/env python3
"""The torch + NCCL path (what vLLM falls back to) for `moe-ep-bench-ht/ll --gpus N`.

N processes (torch.multiprocessing, no torchrun), one per GPU, an NCCL process group, and
the same dispatch/combine the benches time, with torch.distributed.all_to_all_single:
  dispatch = permute the copies by destination rank (index_select) + all_to_all_single
             (bf16 rows; fp8: e4m3 bytes + hidden/128 f32 scales per row, moved as bytes);
  combine  = the reverse all_to_all_single + index_add_ of the weighted copies per token.
Copies: --mode ht one per (token, destination rank) (DeepEP normal mode); --mode ll one
per (token, expert) (low-latency mode). Routing: uniform distinct top-k per token. Each op
is timed with CUDA events after a barrier, median of --iters after warm-up; the slowest
rank's median is printed. GB/s per GPU: bytes a rank receives (dispatch) / sends back
(combine), local copies included (DeepEP accounting), mean over ranks, over that time.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

    python3 ep_nccl_reference.py --gpus 8 [--mode ht] [--tokens 4096] [--hidden 7168]
        [--topk 8] [--experts 256] [--iters 20]
Rows: "<tokens> <op> <dtype> <µs> <GB/s per GPU> <copies per rank>".
"""
import argparse
import os
import socket
import sys


def routing(torch, t, a, rank, dev):
    """Copies of this rank's tokens, ordered by destination rank: (token index, destination
    rank, expert weight) per copy, and the number of copies per destination rank."""
    g = torch.Generator(device=dev).manual_seed(1000 * t + rank)
    topk = torch.rand(t, a.experts, device=dev, generator=g).topk(a.topk, dim=-1).indices  # [T, K] distinct
    weights = torch.rand(t, a.topk, device=dev, generator=g)
    dst = topk // (a.experts // a.gpus)  # [T, K] destination rank of every (token, expert)
    if a.mode == "ht":  # one copy per (token, rank); its weight = the sum over the rank's experts
        per_rank = torch.zeros(t, a.gpus, device=dev).scatter_add_(1, dst, weights)
        in_rank = torch.zeros(t, a.gpus, dtype=torch.bool, device=dev).scatter_(1, dst, True)
        rank_of, token = in_rank.t().nonzero(as_tuple=True)  # rank-major, then token
        weight = per_rank[token, rank_of]
    else:  # one copy per (token, expert)
        flat = dst.flatten()
        order = torch.argsort(flat, stable=True)
        token, rank_of, weight = order // a.topk, flat[order], weights.flatten()[order]
    counts = torch.bincount(rank_of, minlength=a.gpus)
    return token, weight, counts


def timed(torch, dist, fn, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    times.sort()
    return times[len(times) // 2]


def worker(rank, a, port):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.gpus)
    h, fp8_row = a.hidden, a.hidden + 4 * (a.hidden // 128)
    if rank == 0:
        print(f"torch {torch.__version__} + NCCL all_to_all_single on {a.gpus} x {torch.cuda.get_device_name()}: "
              f"mode {a.mode}, hidden {h}, top-{a.topk} of {a.experts}, median of {a.iters}")
        print(f"{'tokens':>7} {'op':>9} {'dtype':>5} {'time µs':>10} {'GB/s/GPU':>9} {'copies':>7}")
    for t in a.tokens:
        token, weight, send_counts = routing(torch, t, a, rank, dev)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        copies, received = token.numel(), sum(recv_splits)
        x = torch.randn(t, h, device=dev).to(torch.bfloat16)
        x8 = torch.randint(0, 256, (t, fp8_row), dtype=torch.uint8, device=dev)  # e4m3 bytes + f32 scales
        recv = torch.empty(received, h, dtype=torch.bfloat16, device=dev)
        recv8 = torch.empty(received, fp8_row, dtype=torch.uint8, device=dev)
        back = torch.empty(copies, h, dtype=torch.bfloat16, device=dev)
        out = torch.empty(t, h, dtype=torch.bfloat16, device=dev)
        w = weight.to(torch.bfloat16)[:, None]

        def dispatch(src, dst):
            dist.all_to_all_single(dst, src.index_select(0, token), recv_splits, send_splits)

        def combine():
            dist.all_to_all_single(back, recv, send_splits, recv_splits)
            out.zero_()
            out.index_add_(0, token, back * w)

        results = []
        for op, dtype, fn, row in (
            ("dispatch", "bf16", lambda: dispatch(x, recv), 2 * h),
            ("dispatch", "fp8", lambda: dispatch(x8, recv8), fp8_row),
            ("combine", "bf16", combine, 2 * h),
        ):
            us = timed(torch, dist, fn, a.iters)
            stats = torch.tensor([us, received * row], dtype=torch.float64, device=dev)
            slowest, total = stats.clone(), stats.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            results.append((op, dtype, slowest[0].item(), total[1].item() / a.gpus))
        if rank == 0:
            for op, dtype, us, nbytes in results:
                print(f"{t:>7} {op:>9} {dtype:>5} {us:>10.1f} {nbytes / us / 1e3:>9.1f} {copies:>7}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--mode", choices=["ht", "ll"], default="ht")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    if a.experts % a.gpus or a.hidden % 128:
        sys.exit("ep_nccl_reference.py: --experts must be a multiple of --gpus, --hidden of 128")
    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        sys.exit("ep_nccl_reference.py: needs python3 with torch (CUDA build); torch is not installed, nothing run")
    if torch.cuda.device_count() < a.gpus:
        sys.exit(f"ep_nccl_reference.py: --gpus {a.gpus} but {torch.cuda.device_count()} CUDA GPUs visible; nothing run")
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (inherited by the workers)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.gpus, join=True)


if __name__ == "__main__":
    main()
