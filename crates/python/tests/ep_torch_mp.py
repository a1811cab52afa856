"""One rank per process (torchrun --nproc-per-node N), all on one GPU (MPS), bootstrapped
through a torch.distributed gloo process group (NCCL refuses two ranks on one GPU): our port
of DeepEP's intranode and low-latency checks, ep_checks.py. Exit status 0 when every check
passed on this rank."""
import datetime
import os
import sys

import torch
import torch.distributed as dist

import moe_ep
from ep_checks import HtCase, LlCase, TorchBackend, ht_body, ht_graph_body, ll_body, ll_graph_body, seed


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(0)
    box = [seed() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank builds every rank's inputs from it
    s = box[0]
    tokens = int(os.environ.get("MOE_EP_TEST_TOKENS", "1024"))
    backend = TorchBackend("cuda:0")
    buf = moe_ep.Buffer(dist.group.WORLD, int(2e9), moe_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, world, 288))

    def wait():
        torch.cuda.current_stream().synchronize()
        dist.barrier()

    failures = 0
    checks = [
        ("intranode", lambda: ht_body(HtCase(s, world, 256, 8, 7168, tokens), backend, reruns=5)),
        ("intranode-2880-top16", lambda: ht_body(HtCase(s + 1, world, 128, 16, 2880, tokens // 4, empty_rank=1),
                                                 backend, reruns=1)),
        ("intranode torch.cuda.graph x100", lambda: ht_graph_body(HtCase(s + 4, world, 256, 8, 7168, tokens // 2),
                                                                  backend)),
        ("low-latency", lambda: ll_body(LlCase(s + 2, world, 288, 8, 7168, 128), backend, rounds=3)),
        ("low-latency torch.cuda.graph x100", lambda: ll_graph_body(LlCase(s + 3, world, 288, 8, 7168, 128), backend)),
    ]
    for name, make in checks:
        try:
            assert make()(buf, rank, wait) is True
            print(f"rank {rank}: {name}: ok", flush=True)
        except Exception as e:  # noqa: BLE001 (count it, keep going; peers may then time out)
            failures += 1
            print(f"rank {rank}: {name}: FAILED: {type(e).__name__}: {e}", flush=True)
    buf.runtime.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
