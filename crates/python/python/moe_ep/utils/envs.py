"""Rank setup for DeepEP-style test programs (`deep_ep.utils.envs`'s names): process groups
(gloo where ranks share a GPU), seeds, printing, checks."""
import os
import random

import torch
import torch.distributed as dist

_local_rank = None
_local_seed = 0
_global_seed = 0


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


def init_seed(global_seed: int) -> None:
    """Seeds torch and `random` with `global_seed` + this rank (the local seed)."""
    global _local_seed, _global_seed
    _global_seed, _local_seed = global_seed, global_seed + dist.get_rank()
    torch.manual_seed(_local_seed)
    random.seed(_local_seed)


def get_local_seed() -> int:
    return _local_seed


def get_global_seed() -> int:
    return _global_seed


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Prints `s` on every rank (or on local rank 0 only), then a barrier."""
    if not once_in_node or _local_rank == 0:
        print(s, flush=True)
    dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0):
    """`(rank, world_size, group)` of `WORLD_SIZE` nodes (default 1; this one is `RANK`) of
    `num_local_ranks` processes, joined at `MASTER_ADDR:MASTER_PORT`. With a GPU per local rank
    the group is NCCL's, as DeepEP's; with fewer GPUs (ranks sharing one under MPS: NCCL
    refuses two ranks on a GPU) it is gloo's, and the collectives DeepEP's tests call on CUDA
    tensors are staged through host copies. Sets bfloat16 / CUDA as torch's defaults and
    seeds torch and `random` (`init_seed(seed)`)."""
    global _local_rank
    _local_rank = local_rank
    ip = os.getenv("MASTER_ADDR", "127.0.0.1")
    port = int(os.getenv("MASTER_PORT", "8361"))
    num_nodes, node_rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
    world = num_nodes * num_local_ranks
    own_gpus = torch.cuda.device_count() >= num_local_ranks
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if own_gpus else "gloo", init_method=f"tcp://{ip}:{port}", world_size=world,
                            rank=node_rank * num_local_ranks + local_rank)
    if not own_gpus:
        _stage_collectives_on_host()
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    init_seed(seed)
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(world)))


def _stage_collectives_on_host():
    for name in ("all_reduce", "all_gather", "broadcast"):
        setattr(dist, name, _on_host(getattr(dist, name)))
    all_gather = dist.all_gather

    def all_gather_into_tensor(output, input, group=None, async_op=False):
        # gloo wants the output flat along dim 0; NCCL (what DeepEP uses) any shape.
        parts = list(output.view(-1, *input.shape).unbind(0))
        return all_gather(parts, input, group=group, async_op=async_op)

    dist.all_gather_into_tensor = all_gather_into_tensor


def check_nvlink_connections(group) -> None:
    """Every pair of the group's GPUs on this node can reach each other's memory (moe-ep's
    intranode kernels store into peers' memory). Ranks sharing a GPU pass."""
    devices = [None] * group.size()
    dist.all_gather_object(devices, torch.cuda.current_device(), group)
    for a in set(devices):
        for b in set(devices) - {a}:
            assert torch.cuda.can_device_access_peer(a, b), f"GPU {a} cannot access GPU {b}'s memory (no NVLink/P2P)"


def check_torch_deterministic() -> None:
    """torch's deterministic mode with `fill_uninitialized_memory` makes `torch.empty` launch a
    fill kernel, which can run on the caller's stream while the comm stream writes the tensor."""
    assert not (torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory)
