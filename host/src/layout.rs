//! Where one rank's tokens go: the layout DeepEP's `get_dispatch_layout` returns, computed
//! on the device by the `get_dispatch_layout` kernel of `moe-ep-kernels`.
use crate::device::LaunchConfig;
use crate::limits::MAX_LAYOUT_RANKS;
pub use crate::limits::{MAX_EXPERTS, MAX_TOPK};
use crate::{DeviceBuffer, Error, Group, Result};
use moe_ep_abi::{DropOverflowParams, GlobalIdsParams, LayoutParams};
use moe_ep_kernels::layout::{GET_DISPATCH_LAYOUT, GLOBAL_EXPERT_IDS, HT_DROP_OVERFLOW};

/// Element type of `topk_idx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexType {
    /// `int32`.
    I32,
    /// `int64` (DeepEP's `topk_idx_t`).
    I64,
}

impl IndexType {
    /// Bytes per entry.
    pub fn bytes(self) -> usize {
        match self {
            IndexType::I32 => 4,
            IndexType::I64 => 8,
        }
    }
}

/// The routing layout of one rank's tokens, on its device.
pub struct DispatchLayout {
    /// `[num_ranks]` i32: tokens with at least one expert on each rank.
    pub num_tokens_per_rank: DeviceBuffer,
    /// `[num_experts]` i32: tokens that selected each expert.
    pub num_tokens_per_expert: DeviceBuffer,
    /// `[num_tokens, num_ranks]` bool (one byte each).
    pub is_token_in_rank: DeviceBuffer,
}

/// Computes the layout of `topk_idx` (`[num_tokens, num_topk]`, -1 = no expert) on the
/// group's stream. Asynchronous: the buffers are ready once the stream is; an expert id
/// outside `-1..num_experts` is reported by [`Group::take_device_error`] as
/// [`Error::InvalidArgument`] naming the row.
pub fn get_dispatch_layout(
    group: &Group,
    topk_idx: &DeviceBuffer,
    idx: IndexType,
    num_tokens: usize,
    num_topk: usize,
    num_experts: usize,
) -> Result<DispatchLayout> {
    check_layout_args(group, topk_idx, idx, num_tokens, num_topk, num_experts)?;
    let num_ranks = group.num_ranks();
    let stream = group.stream();
    let layout = DispatchLayout {
        num_tokens_per_rank: stream.alloc_uninit(4 * num_ranks)?,
        num_tokens_per_expert: stream.alloc_uninit(4 * num_experts)?,
        is_token_in_rank: stream.alloc_uninit(num_tokens * num_ranks)?,
    };
    get_dispatch_layout_into(group, topk_idx, idx, num_tokens, num_topk, num_experts, layout)
}

/// [`get_dispatch_layout`] into the caller's memory (`[R]` i32, `[E]` i32, `[T, R]` bytes):
/// nothing is allocated, so a CUDA-graph capture of the call owns all of it.
pub fn get_dispatch_layout_into(
    group: &Group,
    topk_idx: &DeviceBuffer,
    idx: IndexType,
    num_tokens: usize,
    num_topk: usize,
    num_experts: usize,
    layout: DispatchLayout,
) -> Result<DispatchLayout> {
    check_layout_args(group, topk_idx, idx, num_tokens, num_topk, num_experts)?;
    let num_ranks = group.num_ranks();
    let sizes = [
        (&layout.num_tokens_per_rank, 4 * num_ranks, 4, "num_tokens_per_rank"),
        (&layout.num_tokens_per_expert, 4 * num_experts, 4, "num_tokens_per_expert"),
        (&layout.is_token_in_rank, num_tokens * num_ranks, 1, "is_token_in_rank"),
    ];
    for (b, bytes, align, name) in sizes {
        if b.len() < bytes || !b.ptr().is_multiple_of(align) || !b.device().same_as(group.device()) {
            return Err(Error::invalid(name, format!("{bytes} bytes ({align}-aligned) on the group's device needed")));
        }
    }
    let dev = group.device();
    let stream = group.stream();
    // The kernel counts with atomics and leaves rows of tokens without experts as they are.
    for (b, _, _, _) in sizes {
        b.fill_async(stream, 0)?;
    }
    if num_tokens == 0 {
        return Ok(layout);
    }
    let params = LayoutParams {
        topk_idx: topk_idx.ptr(),
        num_tokens_per_rank: layout.num_tokens_per_rank.ptr(),
        num_tokens_per_expert: layout.num_tokens_per_expert.ptr(),
        is_token_in_rank: layout.is_token_in_rank.ptr(),
        error: group.error_ptr(),
        num_tokens: num_tokens as u32,
        num_topk: num_topk as u32,
        num_experts: num_experts as u32,
        num_ranks: num_ranks as u32,
        idx_bytes: idx.bytes() as u32,
        rank: group.rank() as u32,
    };
    let block_dim = dev.block_dim(256);
    let max_blocks = if dev.is_cpu() { 4 } else { 2 * dev.num_sms()? };
    let grid_dim = (num_tokens as u32).div_ceil(block_dim).clamp(1, max_blocks);
    let shared_mem_bytes = 4 * (num_experts + num_ranks) as u32;
    // SAFETY: the outputs hold the sizes the kernel writes (checked above; zeroed on this
    // stream, as its atomics need); `topk_idx` was checked to hold [num_tokens, num_topk] entries.
    unsafe { stream.launch(&GET_DISPATCH_LAYOUT, LaunchConfig { grid_dim, block_dim, shared_mem_bytes }, params)? };
    Ok(layout)
}

fn check_layout_args(
    group: &Group,
    topk_idx: &DeviceBuffer,
    idx: IndexType,
    num_tokens: usize,
    num_topk: usize,
    num_experts: usize,
) -> Result<()> {
    let num_ranks = group.num_ranks();
    if !(1..=MAX_TOPK).contains(&num_topk) {
        return Err(Error::invalid("num_topk", format!("{num_topk} is not in 1..={MAX_TOPK}")));
    }
    if num_experts == 0 || num_experts > MAX_EXPERTS || !num_experts.is_multiple_of(num_ranks) {
        return Err(Error::invalid(
            "num_experts",
            format!("{num_experts} must be in 1..={MAX_EXPERTS} and a multiple of {num_ranks} ranks"),
        ));
    }
    if num_ranks > MAX_LAYOUT_RANKS {
        return Err(Error::Unsupported(format!(
            "{num_ranks} ranks (the layout kernel takes up to {MAX_LAYOUT_RANKS})"
        )));
    }
    if num_tokens > i32::MAX as usize / num_topk {
        return Err(Error::invalid("num_tokens", format!("{num_tokens} tokens is too many")));
    }
    let need = num_tokens * num_topk * idx.bytes();
    if topk_idx.len() < need {
        return Err(Error::invalid(
            "topk_idx",
            format!("{} bytes, [{num_tokens}, {num_topk}] needs {need}", topk_idx.len()),
        ));
    }
    if !topk_idx.ptr().is_multiple_of(idx.bytes() as u64) {
        return Err(Error::invalid("topk_idx", "misaligned"));
    }
    if !topk_idx.device().same_as(group.device()) {
        return Err(Error::invalid("topk_idx", "must live on the group's device"));
    }
    Ok(())
}

/// Turns the local expert ids a dispatch wrote (`ids`: `[blocks, rows, K]` integers of
/// `width` bytes, -1 for experts elsewhere) into global ones (NCCL EP's `GLOBAL`): adds
/// `rank * num_local_experts` to each id `>= 0`, on the group's stream. With `counts`
/// (`[blocks]` i32), only the first `counts[b]` rows of block `b` are valid and changed.
#[allow(clippy::too_many_arguments)]
pub fn global_expert_ids(
    group: &Group,
    ids: &DeviceBuffer,
    counts: Option<&DeviceBuffer>,
    blocks: usize,
    rows: usize,
    num_topk: usize,
    width: usize,
    num_local_experts: usize,
) -> Result<()> {
    let n = blocks * rows * num_topk;
    if (width != 4 && width != 8) || ids.len() < n * width || !ids.ptr().is_multiple_of(width as u64) {
        return Err(Error::invalid("ids", format!("[{blocks}, {rows}, {num_topk}] {width}-byte ids needed")));
    }
    if counts.is_some_and(|c| c.len() < 4 * blocks) {
        return Err(Error::invalid("counts", format!("[{blocks}] i32 needed")));
    }
    let p = GlobalIdsParams {
        ids: ids.ptr(),
        counts: counts.map_or(0, |c| c.ptr()),
        blocks: blocks as u32,
        rows: rows as u32,
        num_topk: num_topk as u32,
        width: width as u32,
        offset: (group.rank() * num_local_experts) as u32,
        reserved: 0,
    };
    let block_dim = group.device().block_dim(256);
    let grid_dim = (n as u32).div_ceil(block_dim).clamp(1, 264);
    // SAFETY: `ids` and `counts` hold what the parameters describe (checked).
    unsafe { group.stream().launch(&GLOBAL_EXPERT_IDS, LaunchConfig { grid_dim, block_dim, shared_mem_bytes: 0 }, p) }
}

/// NCCL EP's overflow policy DROP, on the sending side: removes from `topk_idx` (in place,
/// on the group's stream) the experts of every (token, destination) pair that would land at
/// row `budget` or later of the destination, given the routing's `is_token_in_rank` and the
/// `rank_prefix_matrix` its count exchange returned (the same on every rank, so all ranks
/// agree on what is dropped without another exchange). Rows arrive source-rank-major, each
/// source's in token order: the lowest ranks' first tokens are kept. With `routed_total`
/// (`[1]` i32), writes the rows this rank would have received without the drop. A new
/// layout and count exchange of the changed `topk_idx` then give the dispatch's.
#[allow(clippy::too_many_arguments)]
pub fn drop_overflow(
    group: &Group,
    topk_idx: &DeviceBuffer,
    idx: IndexType,
    num_tokens: usize,
    num_topk: usize,
    num_experts: usize,
    is_token_in_rank: &DeviceBuffer,
    rank_prefix_matrix: &DeviceBuffer,
    budget: usize,
    routed_total: Option<&DeviceBuffer>,
) -> Result<()> {
    check_layout_args(group, topk_idx, idx, num_tokens, num_topk, num_experts)?;
    let r = group.num_ranks();
    if is_token_in_rank.len() < num_tokens * r || rank_prefix_matrix.len() < 4 * r * r {
        return Err(Error::invalid("is_token_in_rank", format!("[{num_tokens}, {r}] u8 and [{r}, {r}] i32 needed")));
    }
    if routed_total.is_some_and(|b| b.len() < 4 || !b.ptr().is_multiple_of(4)) {
        return Err(Error::invalid("routed_total", "[1] i32 needed"));
    }
    let p = DropOverflowParams {
        topk_idx: topk_idx.ptr(),
        is_token_in_rank: is_token_in_rank.ptr(),
        rank_prefix_matrix: rank_prefix_matrix.ptr(),
        routed_total: routed_total.map_or(0, |b| b.ptr()),
        num_tokens: num_tokens as u32,
        num_topk: num_topk as u32,
        num_experts: num_experts as u32,
        num_ranks: r as u32,
        rank: group.rank() as u32,
        idx_bytes: idx.bytes() as u32,
        budget: budget.min(u32::MAX as usize) as u32,
        reserved: 0,
    };
    let block_dim = group.device().block_dim(32 * r.min(8) as u32);
    // SAFETY: the arrays hold what the parameters describe (checked).
    unsafe { group.stream().launch(&HT_DROP_OVERFLOW, LaunchConfig { grid_dim: 1, block_dim, shared_mem_bytes: 0 }, p) }
}
