"""The GPU bundle's Python suite: torch CUDA tensors, 8 ranks on one GPU as threads of this
process (each with its own torch stream), running our port of DeepEP's intranode and
low-latency checks (ep_checks.py) at DeepEP-like sizes. Skipped without torch + CUDA (CI).
The same checks run as 8 processes under MPS through torch.distributed: ep_torch_mp.py."""
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import numpy as np  # noqa: E402

import moe_ep  # noqa: E402
from ep_checks import HtCase, LlCase, TorchBackend, ht_body, ll_body, run_in_process, seed  # noqa: E402

R = int(os.environ.get("MOE_EP_TEST_RANKS", "8"))
TOKENS = int(os.environ.get("MOE_EP_TEST_TOKENS", "1024"))
DEVICE = "cuda:0"
B = TorchBackend(DEVICE)


def test_torch_names():
    assert moe_ep.topk_idx_t == torch.int64
    assert moe_ep.Buffer.is_sm90_compiled()


def test_intranode_deepseek_shapes():
    # DeepEP test_intranode: H=7168, top-8 of 256 experts (tokens scaled to TOKENS per rank)
    case = HtCase(seed(), R, num_experts=256, num_topk=8, hidden=7168, max_tokens=TOKENS)
    assert run_in_process(R, DEVICE, B, ht_body(case, B, reruns=10)) == [True] * R


def test_intranode_deepseek_shapes_one_pass_with_a_heap():
    # the same with outputs in a heap: senders store into them directly, combine pulls
    case = HtCase(seed(), R, num_experts=256, num_topk=8, hidden=7168, max_tokens=TOKENS)
    body = ht_body(case, B, reruns=3)
    assert run_in_process(R, DEVICE, B, body, num_heap_bytes=1 << 30) == [True] * R


def test_intranode_wide_topk_hidden_2880_empty_rank():
    case = HtCase(seed(), R, num_experts=128, num_topk=16, hidden=2880, max_tokens=TOKENS // 4, empty_rank=1)
    assert run_in_process(R, DEVICE, B, ht_body(case, B, reruns=2)) == [True] * R


def test_low_latency_deepseek_shapes():
    # DeepEP test_low_latency: 128 tokens, H=7168, top-8 of 288 experts
    case = LlCase(seed(), R, num_experts=288, num_topk=8, hidden=7168, max_tokens=128)
    assert run_in_process(R, DEVICE, B, ll_body(case, B, rounds=3)) == [True] * R


def test_outputs_are_torch_tensors_on_the_device_and_validation():
    def body(buf, r, wait):
        idx = torch.stack([torch.randperm(16)[:2] for _ in range(32)]).to(DEVICE)
        with pytest.raises(ValueError, match="expected a tensor on cuda:0, got one on cpu"):
            buf.get_dispatch_layout(idx.cpu(), 16)
        with pytest.raises(TypeError, match="expected dtype int64 or int32"):
            buf.get_dispatch_layout(idx.float(), 16)
        wait()
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(idx, 16)
        assert ntpr.device == idx.device and ntpr.dtype == torch.int32 and itir.dtype == torch.bool
        assert int(ntpe.sum()) == 64
        return True

    assert run_in_process(R, DEVICE, B, body) == [True] * R
