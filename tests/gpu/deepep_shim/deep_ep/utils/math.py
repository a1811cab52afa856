"""Numerics helpers of DeepEP-style tests: fp8 per-token casts and a relative difference."""
import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity of `x` and `y` (0 when equal)."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return (1 - 2 * (x * y).sum() / denominator).item()


def per_token_cast_to_fp8(x: torch.Tensor):
    """`(x_e4m3 [T, H], scales [T, H/128] float32)`: each 128-channel group scaled to amax 448."""
    t, h = x.shape
    assert h % 128 == 0
    groups = x.float().view(t, h // 128, 128)
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    fp8 = (groups * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(t, h)
    return fp8, amax / 448.0


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """bfloat16 rows back from fp8 rows and their per-128-channel scales (float32, or int32
    words of four UE8M0 exponent bytes)."""
    if x_scales.dtype == torch.int:
        x_scales = x_scales.view(dtype=torch.uint8).to(torch.int) << 23
        x_scales = x_scales.view(dtype=torch.float)
    t, h = x_fp8.shape
    groups = x_fp8.float().view(t, -1, 128)
    return (groups * x_scales.view(t, -1, 1)).view(t, h).to(torch.bfloat16)


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Each row's distinct non-negative values, in descending order, padded with -1."""
    assert x.dim() == 2
    mask = x < 0
    x_padded = x.masked_fill(mask, num_slots)
    bins = torch.zeros((x.size(0), num_slots + 1), dtype=x.dtype, device=x.device)
    bins.scatter_add_(1, x_padded, torch.ones_like(x_padded))
    bins[:, num_slots] = 0
    _, sorted_idx = torch.sort(bins, dim=1, descending=True)
    sorted_idx.masked_fill_(torch.gather(bins, 1, sorted_idx) == 0, -1)
    sorted_idx = torch.sort(sorted_idx, descending=True, dim=1).values
    x.fill_(-1)
    valid = min(x.size(1), sorted_idx.size(1))
    x[:, :valid] = sorted_idx[:, :valid]


def hash_tensor(t: torch.Tensor) -> int:
    """An order-sensitive hash of a tensor's bytes."""
    return t.contiguous().view(torch.int8).view(-1).to(torch.int64).cumsum(0)[-1:].sum().item() if t.numel() else 0
