"""Numerics helpers of DeepEP-style tests (`deep_ep.utils.math`'s names and meaning): fp8
per-token casts, a relative difference, integer helpers, byte counts and hashes."""
import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity of `x` and `y` (0 when equal)."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return (1 - 2 * (x * y).sum() / denominator).item()


def safe_div(a, b):
    """`a / b`, and 0 for 0 / 0."""
    if b == 0 and a == 0:
        return 0
    return a / b


def ceil_div(x: int, y: int) -> int:
    return -(-x // y)


def align(x: int, y: int) -> int:
    """`x` rounded up to a multiple of `y`."""
    return ceil_div(x, y) * y


def _padded_groups(x: torch.Tensor) -> torch.Tensor:
    """`[T, ceil(H/128), 128]` float32 of `x`, zero-padded to whole 128-channel groups."""
    t, h = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, align(h, 128) - h))
    return padded.view(t, -1, 128)


def per_token_cast_to_fp8(x: torch.Tensor):
    """`(x_e4m3 [T, H], scales [T, ceil(H/128)] float32)`: each 128-channel group scaled to
    amax 448 (a partial last group as if zero-padded)."""
    assert x.dim() == 2
    t, h = x.shape
    groups = _padded_groups(x)
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    fp8 = (groups * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(t, -1)
    return fp8[:, :h].contiguous(), amax / 448.0


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """bfloat16 rows back from fp8 rows and their per-128-channel scales (float32, or int32
    words of four UE8M0 exponent bytes)."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    if x_scales.dtype == torch.int:
        x_scales = x_scales.view(dtype=torch.uint8).to(torch.int) << 23
        x_scales = x_scales.view(dtype=torch.float)
    t, h = x_fp8.shape
    groups = _padded_groups(x_fp8)
    return (groups * x_scales.reshape(t, -1, 1)).view(t, -1)[:, :h].to(torch.bfloat16).contiguous()


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


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`scores [T, E]` with the experts outside each token's chosen groups (`group_idx [T, G']`
    of `num_groups` equal groups) set to 0."""
    t, e = scores.shape
    keep = torch.zeros((t, num_groups), dtype=torch.bool, device=scores.device).scatter_(1, group_idx, True)
    return (scores.view(t, num_groups, -1) * keep.unsqueeze(-1)).view(t, e)


def hash_tensor(t: torch.Tensor) -> int:
    """A hash of a tensor's bytes, for comparing results within a run."""
    t = t.contiguous()
    if t.numel() == 0:
        return 0
    return t.view(torch.int).sum().item() if t.element_size() == 4 else t.view(torch.uint8).sum().item()


def hash_tensors(*tensors) -> int:
    """`hash_tensor` of every tensor (nested in tuples and lists too), combined; None skipped."""
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value


def count_bytes(*tensors) -> int:
    """Bytes of every tensor (nested in tuples and lists too); None counts 0."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total
