"""A program written for DeepEP, as frameworks call it, run on moe-ep through the `deep_ep`
alias package (crates/python/deep_ep_alias) without changing an import: Megatron-LM's
fused all-to-all (async events made by the caller, `allocate_on_comm_stream`, combine as
the backward of dispatch and a cached dispatch as the backward of combine), vLLM's HT and LL
calls (`get_dispatch_config`, the receive hook, `out=`), SGLang's `num_worst_tokens`, and
DeepEP's helpers from `deep_ep.utils`. One process per rank under torchrun (ranks sharing a
GPU: MPS and a gloo group); exit status 0 when every check passed.

    torchrun --nproc-per-node 8 deepep_style_mp.py
"""
import datetime
import sys

import torch
import torch.distributed as dist

import deep_ep
from deep_ep import Buffer, Config
from deep_ep.utils import EventHandle, EventOverlap
from deep_ep.utils.math import calc_diff, per_token_cast_to_fp8

T, H, E, K, M = 1024, 7168, 64, 6, 128


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def megatron_fused_a2a(buffer, x, topk_idx, topk_weights, rank):
    """megatron/core/transformer/moe/fused_a2a.py's call pattern, forward and backward."""
    Buffer.set_num_sms(24)
    previous_event = EventOverlap(EventHandle())
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, E, previous_event=previous_event, async_finish=True,
                                   allocate_on_comm_stream=True)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, after = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=True,
        allocate_on_comm_stream=True)
    after.current_stream_wait()
    check(isinstance(handle, tuple) and len(handle) == 6 and handle[0].shape == (dist.get_world_size(),) * 2,
          "handle is DeepEP's 6-tuple")
    check(sum(num_recv_tokens_per_expert_list) == int((recv_topk_idx >= 0).sum()), "per-expert counts")
    # combine forward (every token back once per rank it visited)
    combined, _, event = buffer.combine(recv_x, handle=handle, async_finish=False, previous_event=None,
                                        allocate_on_comm_stream=False)
    visits = is_token_in_rank.sum(1, keepdim=True)
    want = times(x, visits)
    check(torch.equal(combined, want), f"rank {rank}: combine(dispatch(x))")
    # dispatch backward = combine of the gradient with the handle (and the top-k weights' grads)
    grad_x, grad_w, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights,
                                           previous_event=EventOverlap(EventHandle()), async_finish=True,
                                           allocate_on_comm_stream=True)
    event.current_stream_wait()
    check(torch.equal(grad_x, want), f"rank {rank}: dispatch backward")
    check(torch.equal(grad_w, topk_weights * (topk_idx >= 0)), f"rank {rank}: top-k weights' backward")
    # combine backward = cached dispatch of the gradient
    grad, _, _, _, _, event = buffer.dispatch(combined.contiguous(), handle=handle,
                                              previous_event=EventOverlap(EventHandle()), async_finish=True,
                                              allocate_on_comm_stream=True)
    event.current_stream_wait()
    check(torch.equal(grad, times(recv_x, visits_of_rows(handle, visits))), f"rank {rank}: combine backward")


def times(x, counts):
    """bf16 `x` times small integer `counts`: what summing that many copies in f32 and rounding
    once gives (exact in f32)."""
    return (x.float() * counts).to(torch.bfloat16)


def visits_of_rows(handle, visits):
    """The visit count of each received row's token, from its source rank (rows come by source
    rank, `rank_prefix_matrix[s][me]` ending source s's block, as DeepEP's)."""
    every = [torch.empty_like(visits.cpu()) for _ in range(dist.get_world_size())]
    dist.all_gather(every, visits.cpu())  # (gloo: host tensors)
    rank_prefix_matrix, _, _, recv_src_idx, _, _ = handle
    me = dist.get_rank()
    out = torch.empty((recv_src_idx.numel(), 1), dtype=visits.dtype)
    begin = 0
    for src in range(dist.get_world_size()):
        end = int(rank_prefix_matrix[src, me])
        out[begin:end] = every[src][recv_src_idx[begin:end].long().cpu()]
        begin = end
    return out.to(visits.device)


def vllm_and_sglang_ht(buffer, x, topk_idx, topk_weights, rank):
    """vLLM's HT prepare/finalize (fp8 with column-major scales, the recommended config) and
    SGLang's padded dispatch (`num_worst_tokens`)."""
    config = Buffer.get_dispatch_config(dist.get_world_size())
    check(isinstance(config, Config), "get_dispatch_config gives a Config")
    ntpr, ntprr, ntpe, itir, event = buffer.get_dispatch_layout(topk_idx=topk_idx, num_experts=E, previous_event=None,
                                                                async_finish=False, allocate_on_comm_stream=False)
    fp8, scales = per_token_cast_to_fp8(x)
    (rx, rs), ri, rw, counts, handle, event = buffer.dispatch(
        x=(fp8, scales.T.contiguous().T), handle=None, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprr,
        is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk_idx, topk_weights=topk_weights,
        expert_alignment=1, config=config, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    ry = (rx.float() * rs.repeat_interleave(128, dim=1)).to(torch.bfloat16)
    combined, _, _ = buffer.combine(x=ry, handle=handle, topk_weights=None,
                                    config=Buffer.get_combine_config(dist.get_world_size()),
                                    previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    visits = itir.sum(1, keepdim=True)
    d = calc_diff(combined.float(), x.float() * visits)
    check(d < 3e-3, f"rank {rank}: fp8 dispatch + combine calc_diff {d}")
    worst = T * dist.get_world_size()
    px, pi, pw, plist, phandle, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                    num_tokens_per_expert=ntpe, topk_idx=topk_idx,
                                                    topk_weights=topk_weights, num_worst_tokens=worst)
    n = int(rx.shape[0])
    check(px.shape[0] == worst and plist == [] and bool((pi[n:] == -1).all()), f"rank {rank}: padded dispatch")
    combined, _, _ = buffer.combine(px, phandle)
    check(torch.equal(combined, times(x, visits)), f"rank {rank}: padded combine")


def vllm_ll(buffer, x, topk_idx, topk_weights, rank):
    """vLLM's LL prepare/finalize: receive hook, bf16 and fp8 (UE8M0), combine into `out`."""
    tokens = x[:M]
    idx, w = topk_idx[:M], topk_weights[:M]
    want = tokens.float() * (w * (idx >= 0)).sum(1, keepdim=True)
    for use_fp8 in (False, True):
        recv, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            tokens, idx, M, E, use_fp8=use_fp8, async_finish=False, return_recv_hook=True,
            round_scale=use_fp8, use_ue8m0=use_fp8)
        hook()
        if use_fp8:
            q, s = recv
            s = torch.exp2(s.contiguous().view(torch.uint8).float() - 127).repeat_interleave(128, dim=-1)
            expert_out = (q.float() * s).to(torch.bfloat16)
        else:
            expert_out = recv
        out = torch.empty_like(tokens)
        combined, event, hook = buffer.low_latency_combine(expert_out, idx, w, handle, async_finish=False,
                                                           zero_copy=False, return_recv_hook=True, out=out)
        hook()
        check(combined is out, "combine wrote into out")
        d = calc_diff(out.float(), want)
        check(d < (3e-3 if use_fp8 else 1e-5), f"rank {rank}: LL use_fp8={use_fp8} calc_diff {d}")


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(rank)
    x = torch.randn((T, H), dtype=torch.bfloat16, device="cuda")
    scores = torch.randn((T, E), device="cuda").softmax(-1)
    topk_weights, topk_idx = scores.topk(K, dim=-1)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    topk_idx[::7, -1] = -1  # some tokens use fewer experts
    num_nvl_bytes = Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes, Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                    low_latency_mode=True, num_qps_per_rank=None, explicitly_destroy=True)
    failures = 0
    for name, fn in (("Megatron fused_a2a", megatron_fused_a2a), ("vLLM/SGLang HT", vllm_and_sglang_ht),
                     ("vLLM LL", vllm_ll)):
        try:
            fn(buffer, x, topk_idx, topk_weights, rank)
            torch.cuda.synchronize()
            print(f"rank {rank}: {name}: ok", flush=True)
        except Exception as e:  # noqa: BLE001 (count it, keep going; peers may then time out)
            failures += 1
            print(f"rank {rank}: {name}: FAILED: {type(e).__name__}: {e}", flush=True)
        dist.barrier()
    buffer.destroy()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
