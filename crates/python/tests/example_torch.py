"""The example of docs/python.md (kept identical by test_cpu.py), run on the GPU by
python_torch.sh: torchrun --nproc-per-node 8 example_torch.py."""
import torch, torch.distributed as dist
import moe_ep

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank % torch.cuda.device_count())
T, H, E, K = 4096, 7168, 256, 8
M = 128                                                            # LL tokens per rank at most
buffer = moe_ep.Buffer(dist.group.WORLD, num_nvl_bytes=int(2e9),   # everything is allocated here
                       num_rdma_bytes=moe_ep.Buffer.get_low_latency_rdma_size_hint(M, H, world, E))
x = torch.full((T, H), float(rank), dtype=torch.bfloat16, device="cuda")
scores = torch.randn(T, E, device="cuda")
topk_weights, topk_idx = scores.softmax(-1).topk(K, dim=-1)       # topk_idx: moe_ep.topk_idx_t

num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
    buffer.get_dispatch_layout(topk_idx, E)
recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
    x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
    num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
expert_out = recv_x                                                # your experts here
combined_x, _, _ = buffer.combine(expert_out, handle)
# every token comes back once per rank it visited
assert torch.equal(combined_x.float(), x.float() * is_token_in_rank.sum(1, keepdim=True))

# Low latency (decode): at most M tokens per rank, [L, R*M, H] per local expert
recv, recv_count, ll_handle, _, hook = buffer.low_latency_dispatch(
    x[:M], topk_idx[:M], M, E, use_fp8=False, return_recv_hook=True)
hook()                                                             # receive
out, _, _ = buffer.low_latency_combine(recv, topk_idx[:M], topk_weights[:M], ll_handle)
want = x[:M].float() * topk_weights[:M].sum(1, keepdim=True)
assert (out.float() - want).abs().max() < 0.1 * max(rank, 1)
dist.destroy_process_group()
