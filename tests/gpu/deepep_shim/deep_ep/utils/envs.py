"""Rank setup for DeepEP-style test programs: gloo process groups (ranks may share a GPU)."""
import os

import torch
import torch.distributed as dist

_local_rank = None


def _on_host(collective):
    """`collective(tensor_args...)` for gloo, which takes only CPU tensors in some calls:
    CUDA tensors are staged through host copies."""

    def run(*args, **kwargs):
        moved = [(a, a.cpu()) if isinstance(a, torch.Tensor) and a.is_cuda else (a, a) for a in args]
        lists = {}
        host_args = []
        for i, (orig, host) in enumerate(moved):
            if isinstance(orig, list) and orig and isinstance(orig[0], torch.Tensor) and orig[0].is_cuda:
                lists[i] = [t.cpu() for t in orig]
                host_args.append(lists[i])
            else:
                host_args.append(host)
        out = collective(*host_args, **kwargs)
        for (orig, host), i in zip(moved, range(len(moved))):
            if isinstance(orig, torch.Tensor) and orig is not host:
                orig.copy_(host)
            if i in lists:
                for o, h in zip(orig, lists[i]):
                    o.copy_(h)
        return out

    return run


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0):
    """`(rank, world_size, group)` of a gloo group over this node's `num_local_ranks` processes;
    rank `r` uses GPU `r % device_count` (all share GPU 0 on a one-GPU machine: run under MPS).
    Sets bfloat16 / CUDA as torch's defaults and seeds torch with the rank, as DeepEP's does."""
    global _local_rank
    _local_rank = local_rank
    ip = os.getenv("MASTER_ADDR", "127.0.0.1")
    port = int(os.getenv("MASTER_PORT", "8361"))
    dist.init_process_group("gloo", init_method=f"tcp://{ip}:{port}", world_size=num_local_ranks, rank=local_rank)
    for name in ("all_reduce", "all_gather", "broadcast"):
        setattr(dist, name, _on_host(getattr(dist, name)))
    all_gather = dist.all_gather

    def all_gather_into_tensor(output, input, group=None, async_op=False):
        # gloo wants the output flat along dim 0; NCCL (what DeepEP uses) any shape.
        parts = list(output.view(-1, *input.shape).unbind(0))
        return all_gather(parts, input, group=group, async_op=async_op)

    dist.all_gather_into_tensor = all_gather_into_tensor
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    torch.manual_seed(seed + local_rank)
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(num_local_ranks)))
