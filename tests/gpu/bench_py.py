"""moe-ep timed the way DeepEP times itself: one process per rank (torchrun; on one GPU under
MPS with a gloo group), CUDA events around each call of repeated calls with the L2 flushed
before each (deep_ep.utils.testing.bench semantics), DeepEP's constructor arguments and
DeepEP's byte counts. HT: its intranode test's sizes and tuning loop (cached dispatches of a
handle, bf16 and fp8 with column-major scales, combine of the received rows). LL: its
low-latency test's sizes, each op timed alone and dispatch + combine together.

    torchrun --nproc-per-node 8 bench_py.py [--csv FILE] [--variant default|rings]

Prints a table on rank 0; `--csv` appends its rows.
"""
import argparse
import datetime

import torch
import torch.distributed as dist

import moe_ep
from moe_ep.utils.math import per_token_cast_to_fp8
from moe_ep.utils.testing import bench


def ht_rows(buffer, rank, num_ranks, args):
    T, H, E, K = args.tokens, 7168, 256, 8
    torch.manual_seed(rank)
    x = torch.randn((T, H), dtype=torch.bfloat16, device="cuda")
    fp8, scales = per_token_cast_to_fp8(x)
    x_e4m3 = (fp8, scales.T.contiguous().T)  # column-major, as DeepEP's test passes them
    scores = torch.randn((T, E), dtype=torch.float32, device="cuda").abs() + 1
    topk_idx = torch.topk(scores, K, dim=-1, sorted=False)[1].to(moe_ep.topk_idx_t)
    topk_weights = torch.ones((T, K), dtype=torch.float32, device="cuda")
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk_idx, E)
    config = moe_ep.Config(24, 8, 256)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                 num_tokens_per_expert=ntpe, topk_idx=topk_idx,
                                                 topk_weights=topk_weights, config=config)
    bf16_bytes = recv_x.numel() * 2
    rows = []
    for name, cur, nbytes in (("HT dispatch fp8 (cached)", x_e4m3, bf16_bytes * (1 + 4 / 128) / 2),
                              ("HT dispatch bf16 (cached)", x, bf16_bytes)):
        t = bench(lambda: buffer.dispatch(x=cur, handle=handle, config=config))[0]  # noqa: B023
        rows.append((name, T, t, nbytes))
    t = bench(lambda: buffer.dispatch(x=x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                                      topk_idx=topk_idx, topk_weights=topk_weights, config=config))[0]
    rows.append(("HT dispatch bf16 (layout + top-k)", T, t, bf16_bytes))
    t = bench(lambda: buffer.combine(x=recv_x, handle=handle, config=config))[0]
    rows.append(("HT combine bf16", T, t, bf16_bytes))
    return rows


def ll_rows(buffer, rank, num_ranks, args):
    M, H, E, K = 128, 7168, 288, 8
    torch.manual_seed(rank)
    x = torch.randn((M, H), dtype=torch.bfloat16, device="cuda") * 0.1
    scores = torch.randn((M, E), dtype=torch.float32, device="cuda").abs() + 1
    topk_idx = torch.topk(scores, K, dim=-1, sorted=True)[1].to(moe_ep.topk_idx_t)
    topk_weights = torch.randn((M, K), dtype=torch.float32, device="cuda").abs()
    sel = (topk_idx != -1).sum().item()
    fp8_bytes, bf16_bytes = (H + H / 128 * 4 + 16) * sel, H * 2 * sel
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    expert_out = recv.clone()

    def dispatch(fp8):
        return lambda: buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=fp8)

    def both():
        _, _, h, _, _ = buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)
        buffer.low_latency_combine(expert_out, topk_idx, topk_weights, h)

    def combine():
        _, _, h, _, _ = buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
        return h

    rows = [("LL dispatch bf16", M, bench(dispatch(False))[0], bf16_bytes),
            ("LL dispatch fp8", M, bench(dispatch(True))[0], fp8_bytes)]
    t_pair = bench(both)[0]
    rows.append(("LL dispatch fp8 + combine", M, t_pair, fp8_bytes + bf16_bytes))
    t_d = bench(dispatch(True))[0]
    rows.append(("LL combine (pair - dispatch)", M, t_pair - t_d, bf16_bytes))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--csv")
    p.add_argument("--variant", default="default", choices=("default", "rings"))
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    extra = {"num_heap_bytes": 0} if args.variant == "rings" else {}
    ll_bytes = moe_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, num_ranks, 288)
    buffer = moe_ep.Buffer(dist.group.WORLD, int(2e9), ll_bytes, explicitly_destroy=True, **extra)
    rows = ht_rows(buffer, rank, num_ranks, args) + ll_rows(buffer, rank, num_ranks, args)
    # Every rank's time; report the mean over ranks as DeepEP's rank 0 prints its own.
    t = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    every = [torch.zeros_like(t) for _ in range(num_ranks)]
    dist.all_gather(every, t)
    mean = torch.stack(every).mean(0)
    if rank == 0:
        card = torch.cuda.get_device_name()
        print(f"\nbench py: {num_ranks} processes, {card}, variant {args.variant}, {datetime.date.today()}")
        print(f"{'op':36} {'tokens':>6} {'rank0 us':>10} {'mean us':>10} {'GB/s':>8}")
        for (name, tokens, t0, nbytes), tm in zip(rows, mean.tolist()):
            print(f"{name:36} {tokens:6d} {t0 * 1e6:10.1f} {tm * 1e6:10.1f} {nbytes / 1e9 / t0:8.1f}")
        if args.csv:
            with open(args.csv, "a") as f:
                for (name, tokens, t0, nbytes), tm in zip(rows, mean.tolist()):
                    f.write(f"py,{card},{num_ranks},{args.variant},{name},{tokens},{t0 * 1e6:.1f},{tm * 1e6:.1f}\n")
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
