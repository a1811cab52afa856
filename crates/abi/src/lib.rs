//! The one ABI shared by moe-ep's kernels (`moe-ep-kernels`, compiled to PTX) and its host
//! crate (`moe-ep`).
//!
//! Every kernel takes exactly one `#[repr(C)]` parameter struct from this crate, passed by
//! value. Device addresses are plain `u64` (the same width on the GPU and on the host), so
//! the structs are [`bytemuck::Pod`] and the host can hand them to the driver as bytes.
//! Layout changes here change both sides at once: the host embeds PTX built from the same
//! source, and `cargo xtask ptx --check` fails when that PTX is stale.
#![no_std]
#![deny(missing_docs)]

use bytemuck::{Pod, Zeroable};

pub mod net;

/// Threads per warp.
pub const WARP_SIZE: u32 = 32;

/// Default bound for every device-side wait loop (100 s), as DeepEP and NCCL EP use.
pub const DEFAULT_TIMEOUT_NS: u64 = 100_000_000_000;

/// Bytes of padding that keep independently written flags on separate cache lines.
pub const FLAG_STRIDE_BYTES: u64 = 128;

/// Codes a kernel writes into [`DeviceError::code`]. Zero means "no error".
pub mod error_code {
    /// No error recorded.
    pub const NONE: u32 = 0;
    /// A wait loop ran past its timeout (`DeviceError::peer` is the rank waited for).
    pub const TIMEOUT: u32 = 1;
    /// The kernel found its launch shape or parameters inconsistent.
    pub const BAD_LAUNCH: u32 = 2;
    /// An input value is out of range (e.g. an expert id `>= num_experts`);
    /// `DeviceError::site` is the offending row, `observed` the value.
    pub const BAD_INPUT: u32 = 3;
    /// A fixed-size output is too small: `observed` rows arrive, `expected` fit.
    pub const OVERFLOW: u32 = 4;
}

/// What a kernel reports when it gives up, in page-locked host memory that the host reads
/// after the launch (or polls while it runs). Written with plain stores, `code` last with a
/// release store: GPUs on PCIe hosts can't do atomics on host memory, so the first-writer
/// claim lives in device memory ([`ErrorSlot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DeviceError {
    /// One of [`error_code`]; published last, with release semantics.
    pub code: u32,
    /// Rank that recorded the error.
    pub rank: u32,
    /// Rank it was waiting for, or `u32::MAX`.
    pub peer: u32,
    /// Block (channel) that recorded it.
    pub block: u32,
    /// Kernel-specific tag saying which wait gave up (see each kernel's docs).
    pub site: u32,
    /// Zero.
    pub reserved: u32,
    /// Value the wait expected.
    pub expected: u64,
    /// Value it last observed.
    pub observed: u64,
}

/// Where kernels report errors (every kernel's `error` parameter points to one, in device
/// memory). The thread that wins the CAS on `claimed` fills the host-visible
/// [`DeviceError`] at `record`; every other thread sees `claimed != 0` and may stop early.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ErrorSlot {
    /// 0 until an error is claimed.
    pub claimed: u32,
    /// Zero.
    pub reserved: u32,
    /// Device address of the host-visible [`DeviceError`].
    pub record: u64,
}

/// Parameters of `all_gather`, the first peer kernel: every rank stores its
/// `block_bytes` block into every peer's symmetric buffer and raises a flag there.
///
/// Symmetric buffer layout (the same on every rank), see [`AllGatherLayout`]:
/// `ready[num_ranks * num_blocks]` u64 flags, `arrived[num_ranks * num_blocks]` u64 flags
/// (each on its own [`FLAG_STRIDE_BYTES`] line), then `data[num_ranks][block_bytes]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AllGatherParams {
    // INPUT
    /// Device pointer to `num_ranks` u64 base addresses of the symmetric buffer, as seen
    /// from this rank (entry `rank` is the local buffer).
    pub peer_bases: u64,
    /// This rank's block, `block_bytes` long, 16-byte aligned.
    pub send: u64,
    // OUTPUT
    /// `num_ranks * block_bytes` bytes, rank-ordered.
    pub recv: u64,
    /// The [`ErrorSlot`] (device memory).
    pub error: u64,
    // CONFIG
    /// Bytes each rank contributes; a multiple of 16.
    pub block_bytes: u64,
    /// Flag value of this call; strictly increasing per symmetric buffer.
    pub epoch: u64,
    /// Bound for every wait, in nanoseconds of `%globaltimer`.
    pub timeout_ns: u64,
    /// This rank.
    pub rank: u32,
    /// Ranks in the group.
    pub num_ranks: u32,
}

/// Where each region of the all-gather symmetric buffer lives. Used by the host to size
/// the allocation and by the kernel to carve it, so the two cannot drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllGatherLayout {
    /// Offset of `ready` flags: one per (source rank, block).
    pub ready_offset: u64,
    /// Offset of `arrived` flags: one per (source rank, block).
    pub arrived_offset: u64,
    /// Offset of the gathered data, `num_ranks * block_bytes`.
    pub data_offset: u64,
    /// Total bytes.
    pub total_bytes: u64,
}

impl AllGatherLayout {
    /// Layout for `num_ranks` ranks, `num_blocks` blocks per launch, `block_bytes` per rank.
    #[inline(always)]
    pub const fn new(num_ranks: u32, num_blocks: u32, block_bytes: u64) -> Self {
        let flags = num_ranks as u64 * num_blocks as u64 * FLAG_STRIDE_BYTES;
        let ready_offset = 0;
        let arrived_offset = ready_offset + flags;
        let data_offset = arrived_offset + flags;
        let total_bytes = data_offset + num_ranks as u64 * block_bytes;
        Self { ready_offset, arrived_offset, data_offset, total_bytes }
    }

    /// Byte offset of the flag that `src_rank`'s block `block` writes.
    #[inline(always)]
    pub const fn flag_offset(&self, base: u64, src_rank: u32, block: u32, num_blocks: u32) -> u64 {
        base + (src_rank as u64 * num_blocks as u64 + block as u64) * FLAG_STRIDE_BYTES
    }
}

/// Largest rank count of the layout kernel (ranks are bits of a `u64` per token).
pub const LAYOUT_MAX_RANKS: u32 = 64;

/// Parameters of `get_dispatch_layout`: where one rank's tokens go.
///
/// One thread per token; per-expert and per-rank counts gather in shared memory
/// (`(num_experts + num_ranks) * 4` bytes of dynamic shared memory) and are added to the
/// outputs with atomics, so the host zeroes `num_tokens_per_rank` and
/// `num_tokens_per_expert` before the launch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LayoutParams {
    // INPUT
    /// `[num_tokens, num_topk]` expert ids, `idx_bytes` wide (4: i32, 8: i64); -1 = none.
    pub topk_idx: u64,
    // OUTPUT
    /// `[num_ranks]` i32: tokens with at least one expert on each rank (zeroed by the host).
    pub num_tokens_per_rank: u64,
    /// `[num_experts]` i32: tokens per expert (zeroed by the host).
    pub num_tokens_per_expert: u64,
    /// `[num_tokens, num_ranks]` bool (one byte each).
    pub is_token_in_rank: u64,
    /// The [`ErrorSlot`]: `BAD_INPUT` for an expert id `>= num_experts` or `< -1`.
    pub error: u64,
    // CONFIG
    /// Tokens.
    pub num_tokens: u32,
    /// Experts per token.
    pub num_topk: u32,
    /// Experts in all (a multiple of `num_ranks`).
    pub num_experts: u32,
    /// Ranks (at most [`LAYOUT_MAX_RANKS`]).
    pub num_ranks: u32,
    /// Bytes per `topk_idx` entry: 4 or 8.
    pub idx_bytes: u32,
    /// This rank (for error reports).
    pub rank: u32,
}

/// Parameters of the HT expert-major kernels (NCCL EP's HT `EXPERT_MAJOR` layout over the
/// rows of a FLAT dispatch): `ht_expert_major_counts` (zone counts, offsets and total),
/// `ht_expert_major_permute` (flat rows to per-expert zones) and `ht_expert_major_reduce`
/// (zones back to one row per flat row). `L` local experts, `K` top-k, zones in local
/// expert order, each `expert_counts[e]` slots long (already rounded up to the alignment).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HtExpertMajorParams {
    // FLAT SIDE (permute: input; reduce: output)
    /// `[max_rows, row_bytes]` rows in dispatch order.
    pub flat_x: u64,
    /// `[max_rows, K]` i64: the local expert of each (row, k), -1 elsewhere.
    pub flat_topk_idx: u64,
    /// `[max_rows, K]` f32 (0: none).
    pub flat_topk_weights: u64,
    /// `[1]` i32: rows of this dispatch.
    pub num_rows: u64,
    /// `[L]` i32: slots of each zone.
    pub expert_counts: u64,
    // EXPERT-MAJOR SIDE (permute: output; reduce: input)
    /// `[num_slots, row_bytes]`: zone `e` starts at the sum of the counts before it.
    pub em_x: u64,
    /// `[num_slots]` f32: the weight of each slot's (row, expert) (0: none).
    pub em_weights: u64,
    /// `[max_rows, K]` i32: the slot of each (row, k) whose expert is local (permute writes,
    /// reduce reads; other entries untouched).
    pub slot_map: u64,
    // COUNTS (ht_expert_major_counts' outputs, each optional: 0 = none)
    /// `[L]` zone sizes, i32 (i64 when `out_i64`).
    pub counts_out: u64,
    /// `[L]` zone offsets (exclusive prefix sums), i32 or i64.
    pub offsets_out: u64,
    /// `[1]` slots in all, i32 or i64.
    pub total_out: u64,
    /// The [`ErrorSlot`]: `OVERFLOW` when the zones need more than `num_slots`.
    pub error: u64,
    // CONFIG
    /// Bytes per row, a multiple of 16 (reduce: bf16 rows).
    pub row_bytes: u64,
    /// Capacity of the flat arrays in rows.
    pub max_rows: u32,
    /// Capacity of the expert-major arrays in slots.
    pub num_slots: u32,
    /// K.
    pub num_topk: u32,
    /// L.
    pub num_local_experts: u32,
    /// This rank (error reports).
    pub rank: u32,
    /// 1: the counts outputs are i64.
    pub out_i64: u32,
    /// 1: NCCL EP's overflow policy DROP: zones are cut at `num_slots` (the slots past it,
    /// and their rows' copies, are dropped; `slot_map` -1) instead of an `OVERFLOW` error;
    /// the counts kernel reports the cut sizes and starts, and the uncut total.
    pub drop_overflow: u32,
    /// Zero.
    pub reserved: u32,
}

/// Most ranks of one NVLink domain in the HT intranode kernels (a warp per peer).
pub const HT_MAX_RANKS: u32 = 8;
/// Most warps in an HT dispatch/combine block (`warps_per_peer * num_ranks`): the kernels are
/// compiled for at most 32 * this many threads (`.maxntid`, see xtask's ptx step).
pub const HT_MAX_BLOCK_WARPS: u32 = 16;

/// Where each region of an HT (intranode) symmetric buffer lives; computed by the host to
/// size the buffer and by the kernels to carve it. `R` ranks, `C` channels, `L` local
/// experts, rings of `num_slots` slots. Ring `[src][c]` lives in the *receiver's* buffer:
/// the sender owns its `tail`, the receiver its `head` (each on its own 128-byte line).
///
/// | region | size |
/// |---|---|
/// | barrier flags | `2 * R * 128` (entry, counts) |
/// | epoch words, block counters | `128`, see [`HtLayout::epochs`] |
/// | `count_matrix[src][dst]` i32 | `R * R * 4` (every rank gets every row) |
/// | `expert_counts[src][L]` i32 | `R * L * 4` |
/// | `channel_counts[src][C]` i32 | `R * C * 4` |
/// | dispatch mailbox (one-pass path) | `64 + R * (C + 1) * 4`, see [`HtMailbox`] |
/// | `mode_notes[dst][c]` u64 (one-pass path) | `R * C * 8` |
/// | dispatch ring control `[src][c]` | `R * C * 256` (tail line, head line) |
/// | dispatch ring slots `[src][c][num_slots]` | `R * C * num_slots * dispatch_slot_bytes` |
/// | combine ring control / slots | the same with `combine_slot_bytes` |
/// | combine mailboxes (pull path) | `2 * 128`: `[epoch, x offset, weights offset]` u64, slot `epoch % 2` |
/// | `combine_done[src][block]` | `R * 2C * 128`: the end-of-combine flags |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtLayout {
    /// Ranks.
    pub num_ranks: u64,
    /// Channels (one sender and one receiver block each).
    pub num_channels: u64,
    /// Slots per ring.
    pub num_slots: u64,
    /// Bytes per dispatch slot.
    pub dispatch_slot_bytes: u64,
    /// Bytes per combine slot.
    pub combine_slot_bytes: u64,
    /// Offset of the barrier flags.
    pub flags: u64,
    /// Offset of this rank's epoch words (u64 at [`HT_EPOCH_NOTIFY`], [`HT_EPOCH_DISPATCH`],
    /// [`HT_EPOCH_COMBINE`]: the epoch of the kernel's last call) and the dispatch/combine
    /// finished-block counters (u32 at [`HT_DISPATCH_BLOCKS`], [`HT_COMBINE_BLOCKS`]). Each
    /// kernel takes `word + 1` as its call's epoch at entry and its grid's last block stores
    /// it back, so epochs live on the device: a CUDA-graph replay takes a new one.
    pub epochs: u64,
    /// Offset of `count_matrix`.
    pub count_matrix: u64,
    /// Offset of `expert_counts`.
    pub expert_counts: u64,
    /// Offset of `channel_counts`.
    pub channel_counts: u64,
    /// Offset of this rank's dispatch mailbox ([`HtMailbox`]).
    pub mailbox: u64,
    /// Offset of `mode_notes[dst][c]`: `epoch << 2 | mode` of `dst`'s mailbox as this rank's
    /// sender warp of channel `c` read it, for the receiver block's warp of the same pair.
    pub mode_notes: u64,
    /// Offset of the dispatch rings' control lines.
    pub dispatch_ctrl: u64,
    /// Offset of the dispatch rings' slots.
    pub dispatch_slots: u64,
    /// Offset of the combine rings' control lines.
    pub combine_ctrl: u64,
    /// Offset of the combine rings' slots.
    pub combine_slots: u64,
    /// Offset of the two combine mailboxes (pull path).
    pub combine_mailbox: u64,
    /// Offset of `combine_done[src][block]`.
    pub combine_done: u64,
    /// Total bytes.
    pub total_bytes: u64,
}

const fn align128(x: u64) -> u64 {
    (x + 127) & !127
}

impl HtLayout {
    /// The layout for these sizes.
    #[inline(always)]
    pub const fn new(
        num_ranks: u32,
        num_channels: u32,
        num_slots: u32,
        num_local_experts: u32,
        dispatch_slot_bytes: u64,
        combine_slot_bytes: u64,
    ) -> Self {
        let (r, c, n) = (num_ranks as u64, num_channels as u64, num_slots as u64);
        let flags = 0;
        let epochs = align128(flags + 2 * r * FLAG_STRIDE_BYTES);
        let count_matrix = epochs + FLAG_STRIDE_BYTES;
        let expert_counts = align128(count_matrix + r * r * 4);
        let channel_counts = align128(expert_counts + r * num_local_experts as u64 * 4);
        let mailbox = align128(channel_counts + r * c * 4);
        let mode_notes = align128(mailbox + HtMailbox::BYTES + r * (c + 1) * 4);
        let dispatch_ctrl = align128(mode_notes + r * c * 8);
        let dispatch_slots = align128(dispatch_ctrl + r * c * 2 * FLAG_STRIDE_BYTES);
        let combine_ctrl = align128(dispatch_slots + r * c * n * dispatch_slot_bytes);
        let combine_slots = align128(combine_ctrl + r * c * 2 * FLAG_STRIDE_BYTES);
        let combine_mailbox = align128(combine_slots + r * c * n * combine_slot_bytes);
        let combine_done = combine_mailbox + 2 * FLAG_STRIDE_BYTES;
        let total_bytes = combine_done + r * 2 * c * FLAG_STRIDE_BYTES;
        HtLayout {
            num_ranks: r,
            num_channels: c,
            num_slots: n,
            dispatch_slot_bytes,
            combine_slot_bytes,
            flags,
            epochs,
            count_matrix,
            expert_counts,
            channel_counts,
            mailbox,
            mode_notes,
            dispatch_ctrl,
            dispatch_slots,
            combine_ctrl,
            combine_slots,
            combine_mailbox,
            combine_done,
            total_bytes,
        }
    }

    /// Barrier flag `which` (0 entry, 1 counts) written by `src`.
    #[inline(always)]
    pub const fn flag(&self, which: u64, src: u64) -> u64 {
        self.flags + (which * self.num_ranks + src) * FLAG_STRIDE_BYTES
    }

    /// `tail` of ring `[src][c]` in the control region at `ctrl` (add 128 for its `head`).
    #[inline(always)]
    pub const fn ring_tail(&self, ctrl: u64, src: u64, c: u64) -> u64 {
        ctrl + (src * self.num_channels + c) * 2 * FLAG_STRIDE_BYTES
    }

    /// Slot `slot` (already reduced modulo `num_slots`) of ring `[src][c]` in the slot region
    /// at `slots`, slots of `slot_bytes`.
    #[inline(always)]
    pub const fn ring_slot(&self, slots: u64, slot_bytes: u64, src: u64, c: u64, slot: u64) -> u64 {
        slots + ((src * self.num_channels + c) * self.num_slots + slot) * slot_bytes
    }

    /// Bytes of a dispatch slot: token, scales, source index, `K` expert ids (i32) and `K`
    /// weights, rounded up to 16.
    #[inline(always)]
    pub const fn dispatch_slot_bytes(hidden_bytes: u64, num_scales: u64, num_topk: u64) -> u64 {
        (hidden_bytes + 4 * num_scales + 4 + 8 * num_topk).div_ceil(16) * 16
    }

    /// Bytes of a combine slot: a bf16 row and `K` weights, rounded up to 16.
    #[inline(always)]
    pub const fn combine_slot_bytes(hidden: u64, num_topk: u64) -> u64 {
        (2 * hidden + 4 * num_topk).div_ceil(16) * 16
    }

    /// Tokens `[begin, end)` of channel `c` when `num_tokens` are split over the channels.
    #[inline(always)]
    pub const fn channel_range(&self, num_tokens: u64, c: u64) -> (u64, u64) {
        (num_tokens * c / self.num_channels, num_tokens * (c + 1) / self.num_channels)
    }
}

/// [`HtLayout::epochs`] + this: the epoch of the rank's last `ht_notify` (u64).
pub const HT_EPOCH_NOTIFY: u64 = 0;
/// [`HtLayout::epochs`] + this: the epoch of the rank's last `ht_dispatch` (u64).
pub const HT_EPOCH_DISPATCH: u64 = 8;
/// [`HtLayout::epochs`] + this: the epoch of the rank's last `ht_combine` (u64).
pub const HT_EPOCH_COMBINE: u64 = 16;
/// [`HtLayout::epochs`] + this: `ht_dispatch` blocks finished, over all calls (u32).
pub const HT_DISPATCH_BLOCKS: u64 = 24;
/// [`HtLayout::epochs`] + this: `ht_combine` blocks finished, over all calls (u32).
pub const HT_COMBINE_BLOCKS: u64 = 28;

/// A rank's dispatch mailbox, at [`HtLayout::mailbox`] of its own buffer: what a sender needs
/// to store tokens straight into this rank's outputs (the one-pass path). Written by the
/// rank's dispatch at entry, `epoch` released last; a sender reads it (after acquiring
/// `epoch >= its call's`) only while the rank still waits for one of its tokens, so the
/// rank cannot have moved on to a later call (or freed its buffer). `u64` fields, then the receiver's `channel_prefix_matrix`
/// (`[R][C + 1]` i32) at byte [`HtMailbox::BYTES`].
pub struct HtMailbox;

impl HtMailbox {
    /// Bytes before the prefix matrix.
    pub const BYTES: u64 = 64;
    /// Field: the call's epoch (released last).
    pub const EPOCH: u64 = 0;
    /// Field: one of the `MODE_*` values.
    pub const MODE: u64 = 1;
    /// Field: offset of `recv_x` in the rank's heap ([`HtMailbox::NONE`] when absent; the
    /// next four fields likewise).
    pub const RECV_X: u64 = 2;
    /// Field: offset of `recv_x_scales`.
    pub const RECV_X_SCALES: u64 = 3;
    /// Field: offset of `recv_src_idx`.
    pub const RECV_SRC_IDX: u64 = 4;
    /// Field: offset of `recv_topk_idx`.
    pub const RECV_TOPK_IDX: u64 = 5;
    /// Field: offset of `recv_topk_weights`.
    pub const RECV_TOPK_WEIGHTS: u64 = 6;
    /// An absent output.
    pub const NONE: u64 = u64::MAX;
    /// Send through the ring (outputs outside the heap).
    pub const MODE_RING: u64 = 0;
    /// Store straight into the outputs, then add the count to the ring's `tail`.
    pub const MODE_DIRECT: u64 = 1;
    /// Send nothing: the receiver refused the call (its padded outputs are too small).
    pub const MODE_REFUSE: u64 = 2;
}

/// Parameters of `ht_notify`: the count exchange before an HT dispatch. One block.
/// Every rank writes its `num_tokens_per_rank` row to every peer, its per-expert counts
/// and per-channel counts to each destination, behind two barriers; then each rank derives
/// what it will receive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HtNotifyParams {
    /// Device table of the `R` symmetric buffer addresses.
    pub peer_bases: u64,
    // INPUT
    /// `[R]` i32.
    pub num_tokens_per_rank: u64,
    /// `[E]` i32.
    pub num_tokens_per_expert: u64,
    /// `[T, R]` bool bytes.
    pub is_token_in_rank: u64,
    // OUTPUT
    /// `[R, R]` i32: `[i][j]` = tokens rank `j` receives from ranks `0..=i`.
    pub rank_prefix_matrix: u64,
    /// `[R, C + 1]` i32: first output row of the tokens from `src` in channel `c`
    /// (`[src][C]` = end of `src`'s rows).
    pub channel_prefix_matrix: u64,
    /// `[L]` i32: received entries per local expert, rounded up to `expert_alignment`.
    pub num_recv_tokens_per_expert: u64,
    /// `[1]` i32: rows this rank receives.
    pub num_recv_tokens: u64,
    /// Optional mapped host `[1 + L]` i32 copy of the two above (0 = none).
    pub host_counts: u64,
    /// The [`ErrorSlot`].
    pub error: u64,
    // CONFIG
    /// Flag value of this call: the kernel sets it at entry ([`HtLayout::epochs`]); the host
    /// passes 0.
    pub epoch: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// Tokens of this rank.
    pub num_tokens: u32,
    /// Experts in all.
    pub num_experts: u32,
    /// Channels.
    pub num_channels: u32,
    /// Per-expert count alignment (>= 1).
    pub expert_alignment: u32,
    /// This rank.
    pub rank: u32,
    /// Ranks.
    pub num_ranks: u32,
}

/// Parameters of `ht_dispatch`. Grid: `2 * C` blocks (even: sender of channel `b/2`, odd:
/// receiver), `32 * R` threads or more (warp `w < R` serves peer `w`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HtDispatchParams {
    /// Device table of the `R` symmetric buffer addresses.
    pub peer_bases: u64,
    // INPUT
    /// `[T, hidden_bytes]` tokens.
    pub x: u64,
    /// `[T, num_scales]` f32 (0 when `num_scales == 0`).
    pub x_scales: u64,
    /// `[T, K]` expert ids (`idx_bytes` wide), 0 without top-k.
    pub topk_idx: u64,
    /// `[T, K]` f32, 0 without top-k.
    pub topk_weights: u64,
    /// `[T, R]` bool bytes.
    pub is_token_in_rank: u64,
    /// `[R, C + 1]` i32 from `ht_notify`.
    pub channel_prefix_matrix: u64,
    /// `[1]` i32 from `ht_notify` (for padding).
    pub num_recv_tokens: u64,
    // OUTPUT
    /// `[rows, hidden_bytes]`.
    pub recv_x: u64,
    /// `[rows, num_scales]` f32.
    pub recv_x_scales: u64,
    /// `[rows, K]` i64: local expert id or -1.
    pub recv_topk_idx: u64,
    /// `[rows, K]` f32 (0 where not local).
    pub recv_topk_weights: u64,
    /// `[rows]` i32: source token index (-1 on padding; 0 = not written).
    pub recv_src_idx: u64,
    /// `[T, R]` i32: each token's index among its channel's tokens sent to each rank, -1 if
    /// not sent (the handle's map for combine).
    pub send_head: u64,
    /// The [`ErrorSlot`].
    pub error: u64,
    // CONFIG
    /// Device table of the `R` heap bases (0 = no heap: every rank takes the ring).
    pub heap_bases: u64,
    /// This call's mailbox epoch (the same on every rank, increasing): the kernel sets it at
    /// entry ([`HtLayout::epochs`]); the host passes 0.
    pub epoch: u64,
    /// `[R, C]` i32 out: the first row of this rank's tokens of channel `c` in rank `d`'s
    /// outputs, where it sends any (for a pulling combine); 0 = not written.
    pub remote_row0: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// Bytes per token (multiple of 16).
    pub hidden_bytes: u64,
    /// Bytes per dispatch slot.
    pub slot_bytes: u64,
    /// Tokens of this rank.
    pub num_tokens: u32,
    /// f32 scales per token.
    pub num_scales: u32,
    /// Experts per token (0 without top-k).
    pub num_topk: u32,
    /// 4 or 8.
    pub idx_bytes: u32,
    /// Experts in all.
    pub num_experts: u32,
    /// Slots per ring.
    pub num_slots: u32,
    /// Output rows when padded (`num_worst_tokens`), 0 for exact-size outputs.
    pub num_worst_tokens: u32,
    /// This rank.
    pub rank: u32,
    /// Ranks.
    pub num_ranks: u32,
    /// Channels.
    pub num_channels: u32,
    /// Local experts (`num_experts / R`).
    pub num_local_experts: u32,
    /// 1 when this rank's outputs lie in its heap: peers store into them directly.
    pub direct: u32,
}

/// Parameters of `ht_combine`: the reverse of a dispatch (same grid shape).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HtCombineParams {
    /// Device table of the `R` symmetric buffer addresses.
    pub peer_bases: u64,
    // INPUT
    /// `[rows, hidden]` bf16, in the dispatch output's row order.
    pub x: u64,
    /// `[rows, K]` f32 or 0.
    pub topk_weights: u64,
    /// `[T, hidden]` bf16 or 0.
    pub bias_0: u64,
    /// `[T, hidden]` bf16 or 0.
    pub bias_1: u64,
    /// `[T, R]` bool bytes (the dispatch's).
    pub is_token_in_rank: u64,
    /// `[R, C + 1]` i32 (the dispatch's).
    pub channel_prefix_matrix: u64,
    /// `[T, R]` i32 (the dispatch's).
    pub send_head: u64,
    // OUTPUT
    /// `[T, hidden]` bf16.
    pub combined_x: u64,
    /// `[T, K]` f32 or 0.
    pub combined_topk_weights: u64,
    /// The [`ErrorSlot`].
    pub error: u64,
    // CONFIG
    /// Device table of the `R` heap bases (0 = no heap).
    pub heap_bases: u64,
    /// `[R, C]` i32 from the dispatch (`HtDispatchParams::remote_row0`).
    pub remote_row0: u64,
    /// This call's combine epoch (the same on every rank, increasing): the kernel sets it at
    /// entry ([`HtLayout::epochs`]); the host passes 0.
    pub epoch: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// Bytes per combine slot.
    pub slot_bytes: u64,
    /// Bytes per dispatch slot of the buffer (to locate the combine regions).
    pub dispatch_slot_bytes: u64,
    /// Tokens of this rank.
    pub num_tokens: u32,
    /// bf16 elements per row (multiple of 8).
    pub hidden: u32,
    /// Weights per row (0 without weights).
    pub num_topk: u32,
    /// Slots per ring.
    pub num_slots: u32,
    /// This rank.
    pub rank: u32,
    /// Ranks.
    pub num_ranks: u32,
    /// Channels.
    pub num_channels: u32,
    /// Local experts of the buffer (to locate the combine regions).
    pub num_local_experts: u32,
    /// 1 when `x` (and `topk_weights`, if any) lie in this rank's heap: peers may pull.
    pub pull: u32,
    /// Zero.
    pub reserved: u32,
}

/// Where each region of an LL (low-latency) symmetric buffer lives. Two identical sets
/// (the host alternates calls between them; a call's outputs are views into its set); in
/// each, for `L` local experts, `E` experts in all, `R` ranks and `M` = max tokens per rank:
///
/// | region | size | written by |
/// |---|---|---|
/// | dispatch flags `[L][R]`: `{begin << 32 \| count, epoch}` u64 pairs | `L * R * 16` | source rank |
/// | combine flags `[R]` u64 = `epoch << 1 \| pull` | `R * 8` | expert owner |
/// | released `[R]` u64: the last epoch on this set that rank is done with | `R * 8` | every rank |
/// | block counters, epoch word, last epoch on this set | 256 | this rank |
/// | receive counters `[L]` u32: rows reserved per local expert | `L * 4` | source ranks (atomics) |
/// | begins `[E]` u64 = `epoch << 32 \| begin`: this rank's reserved ranges | `E * 8` | this rank |
/// | pair rows `[M][LL_MAX_TOPK]` i32: where each (token, k) row landed | `M * 128` | this rank |
/// | recv x `[L][R*M]` rows of `row_bytes` (fp8: `row_bytes / 2`) | `L * R * M * row_bytes` | source ranks |
/// | recv scales `[L][H/128][R*M]` f32 | `L * R * M * row_bytes / 64` | source ranks |
/// | recv src info `[L][R*M]` i32 | `L * R * M * 4` | source ranks |
/// | combine x `[L][R*M]` rows (zero-copy expert outputs, pulled by sources) | `L * R * M * row_bytes` | this rank's caller |
/// | combine slots `[E][M]` (pushed rows) | `E * M * slot_bytes` | expert owner |
/// | rank-major flags `[R]` u64 = `epoch << 32 \| T_src` | `R * 8` | source rank |
/// | rank-major slots `[R][M]` (row, `[epoch, token]`, 32 ids, 32 weights) | `R * M * rank_major_slot_bytes` | source rank |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlLayout {
    /// Bytes per combine slot: a row of `row_bytes` plus 16 bytes, the `[epoch, token]`
    /// marker of the rank-major slots that start with the same bytes; the pushed combine's
    /// completion comes from its flag, so its slots leave those 16 bytes unused.
    pub slot_bytes: u64,
    /// Offset of the dispatch flags in a set.
    pub dispatch_flags: u64,
    /// Offset of the combine flags in a set.
    pub combine_flags: u64,
    /// Offset of the released words in a set.
    pub released: u64,
    /// Offset of the block counters in a set.
    pub counters: u64,
    /// Offset of the receive counters in a set.
    pub recv_counters: u64,
    /// Offset of the begins in a set.
    pub begins: u64,
    /// Offset of the pair rows in a set.
    pub pair_rows: u64,
    /// Offset of the received rows in a set.
    pub recv_x: u64,
    /// Offset of the received fp8 scales in a set.
    pub recv_scales: u64,
    /// Offset of the received rows' source tokens in a set.
    pub recv_src_info: u64,
    /// Offset of the zero-copy combine input in a set.
    pub combine_x: u64,
    /// Offset of the combine slots in a set.
    pub combine_slots: u64,
    /// Offset of the rank-major flags in a set.
    pub rank_major_flags: u64,
    /// Offset of the rank-major slots in a set.
    pub rank_major_slots: u64,
    /// Bytes per rank-major slot: row, 16 bytes of marker, then `MAX_TOPK` i32 expert ids
    /// and `MAX_TOPK` f32 weights.
    pub rank_major_slot_bytes: u64,
    /// Bytes of one set.
    pub set_bytes: u64,
    /// Local experts.
    pub num_local_experts: u64,
    /// Ranks.
    pub num_ranks: u64,
    /// Max tokens per rank.
    pub max_tokens: u64,
}

/// [`LlLayout::counters`] + this: the dispatch block counter (u32).
pub const LL_DISPATCH_COUNTER: u64 = 0;
/// [`LlLayout::counters`] + this, set 0: the rank's epoch counter (u64).
pub const LL_EPOCH_WORD: u64 = 64;
/// [`LlLayout::counters`] + this: the combine block counter (u32).
pub const LL_COMBINE_COUNTER: u64 = 128;
/// [`LlLayout::counters`] + this: the epoch of this rank's last dispatch on the set (u64).
pub const LL_LAST_EPOCH: u64 = 192;

impl LlLayout {
    /// The layout for rows of `row_bytes` (a multiple of 16).
    #[inline(always)]
    pub const fn new(num_ranks: u32, num_experts: u32, max_tokens: u32, row_bytes: u64) -> Self {
        let (r, e, m) = (num_ranks as u64, num_experts as u64, max_tokens as u64);
        let l = match e.checked_div(r) {
            Some(l) => l,
            None => 0,
        };
        let rows = l * r * m; // received rows per set
        let slot_bytes = row_bytes + 16;
        let dispatch_flags = 0;
        let combine_flags = align128(dispatch_flags + l * r * 16);
        let released = align128(combine_flags + r * 8);
        let counters = align128(released + r * 8);
        let recv_counters = align128(counters + 256);
        let begins = align128(recv_counters + l * 4);
        let pair_rows = align128(begins + e * 8);
        let recv_x = align128(pair_rows + m * 4 * LL_MAX_TOPK as u64);
        let recv_scales = align128(recv_x + rows * row_bytes);
        let recv_src_info = align128(recv_scales + rows * (row_bytes / 64));
        let combine_x = align128(recv_src_info + rows * 4);
        let combine_slots = align128(combine_x + rows * row_bytes);
        let rank_major_flags = align128(combine_slots + e * m * slot_bytes);
        let rank_major_slot_bytes = slot_bytes + 8 * LL_MAX_TOPK as u64;
        let rank_major_slots = align128(rank_major_flags + r * 8);
        let set_bytes = align128(rank_major_slots + r * m * rank_major_slot_bytes);
        LlLayout {
            slot_bytes,
            dispatch_flags,
            combine_flags,
            released,
            counters,
            recv_counters,
            begins,
            pair_rows,
            recv_x,
            recv_scales,
            recv_src_info,
            combine_x,
            combine_slots,
            rank_major_flags,
            rank_major_slots,
            rank_major_slot_bytes,
            set_bytes,
            num_local_experts: l,
            num_ranks: r,
            max_tokens: m,
        }
    }

    /// Total bytes: two sets.
    #[inline(always)]
    pub const fn total_bytes(&self) -> u64 {
        2 * self.set_bytes
    }

    /// Offset (from the buffer's start, in set 0) of this rank's epoch counter.
    #[inline(always)]
    pub const fn epoch_word(&self) -> u64 {
        self.counters + LL_EPOCH_WORD
    }

    /// Received rows per local expert (`R * M`).
    #[inline(always)]
    pub const fn rows_per_expert(&self) -> u64 {
        self.num_ranks * self.max_tokens
    }

    /// Rank-major slot of (source rank, token) within a set.
    #[inline(always)]
    pub const fn rank_major_slot(&self, src: u64, token: u64) -> u64 {
        self.rank_major_slots + (src * self.max_tokens + token) * self.rank_major_slot_bytes
    }

    /// Combine slot of (global expert, token) within a set.
    #[inline(always)]
    pub const fn combine_slot(&self, expert: u64, token: u64) -> u64 {
        self.combine_slots + (expert * self.max_tokens + token) * self.slot_bytes
    }
}

/// Parameters of `ll_dispatch` and `ll_combine` (one struct: the two share most fields).
/// Grid: a fixed number of blocks per buffer (the block counters count modulo it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LlParams {
    /// Device table of the `R` symmetric buffer addresses.
    pub peer_bases: u64,
    /// Dispatch: `[T, H]` bf16 tokens (with [`LL_FP8_INPUT`]: e4m3 bytes). Combine:
    /// `[L, R*M, H]` bf16 expert outputs (rank-major combine: `[R, M, H]`, one pre-reduced
    /// row per received token).
    pub x: u64,
    /// Dispatch with [`LL_FP8_INPUT`]: `[T, H/128]` f32, the scales of `x`'s rows.
    pub x_scales: u64,
    /// `[T, K]` expert ids (`idx_bytes` wide).
    pub topk_idx: u64,
    /// Combine: `[T, K]` f32.
    pub topk_weights: u64,
    /// Rank-major dispatch out: `[R, M, H]` bf16 (with [`LL_FP8_INPUT`]: e4m3 bytes).
    /// (Expert-major outputs are regions of the buffer set: [`LlLayout::recv_x`] and the
    /// regions after it.)
    pub packed_recv_x: u64,
    /// Rank-major dispatch out with [`LL_FP8_INPUT`]: `[R, M, H/128]` f32, the rows' scales.
    pub packed_recv_x_scales: u64,
    /// Rank-major dispatch out (and rank-major combine in): `[R, M]` i32, the source token of
    /// each row.
    pub packed_recv_src_info: u64,
    /// `[L, R]` i64: `begin << 32 | count` (dispatch writes, combine reads).
    pub packed_recv_layout_range: u64,
    /// Dispatch out: `[L]` i32 (rank-major: `[R]`, also the rank-major combine's input).
    pub packed_recv_count: u64,
    /// Combine out: `[T, H]` bf16.
    pub combined_x: u64,
    /// Rank-major dispatch out: `[R, M, K]` local expert ids (-1 elsewhere), i64 or i32
    /// (`recv_idx_bytes`).
    pub recv_topk_idx: u64,
    /// Rank-major dispatch out: `[R, M, K]` f32 (0 where not local).
    pub recv_topk_weights: u64,
    /// Expert-major dispatch, optional (0: none): `[L]` i32 the receive adds each local
    /// expert's received rows to (DeepEP's `cumulative_local_expert_recv_stats`).
    pub cumulative_local_expert_recv_stats: u64,
    /// Expert-major dispatch, optional (0: none): `[R]` i64 the receive adds, per source
    /// rank, the `%clock64` cycles each of its waits for that rank's flag took (one wait per
    /// local expert; DeepEP's `dispatch_wait_recv_cost_stats`).
    pub dispatch_wait_recv_cost_stats: u64,
    /// Combine, optional (0: none): `[R]` i64 the receive adds, per expert owner, the
    /// `%clock64` cycles block 0's wait for that owner's flag took (DeepEP's
    /// `combine_wait_recv_cost_stats`).
    pub combine_wait_recv_cost_stats: u64,
    /// The [`ErrorSlot`].
    pub error: u64,
    /// Set by the kernel itself at entry (the host passes 0): the call's flag value, >= 1.
    /// Never a host-side value, so a captured CUDA graph replays correctly.
    pub epoch: u64,
    /// This rank's epoch counter (a `u64` in its own buffer, [`LlLayout::epoch_word`]):
    /// a dispatch's send phase takes `counter + 1` as its epoch, and its grid's last block
    /// stores it back.
    pub epoch_word: u64,
    /// The call's epoch (`u64`, device memory of the call's handle): written by a dispatch's
    /// send phase, read by its receive phase and by the combine that uses the handle.
    pub call_epoch: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// Bytes per row (`2 * hidden`, a multiple of 16).
    pub row_bytes: u64,
    /// Tokens of this rank (<= `max_tokens`).
    pub num_tokens: u32,
    /// Experts per token.
    pub num_topk: u32,
    /// 4 or 8.
    pub idx_bytes: u32,
    /// Experts in all.
    pub num_experts: u32,
    /// Max tokens per rank (`M`).
    pub max_tokens: u32,
    /// This rank.
    pub rank: u32,
    /// Ranks.
    pub num_ranks: u32,
    /// Which halves run: [`LL_SEND`], [`LL_RECV`] or both (a send-only launch returns a
    /// hook; the receive launch comes later and holds no SM meanwhile).
    pub phases: u32,
    /// Dispatch: [`LL_FP8`] casts to fp8 e4m3 with per-128-channel scales (hidden a
    /// multiple of 128), [`LL_ROUND_SCALE`] rounds the scales up to powers of two.
    pub fp8: u32,
    /// The buffer set (0 or 1) of the call, chosen by the host: a dispatch's outputs are
    /// views into it, so the host must know where they are.
    pub set: u32,
    /// Combine: 1 when `x` is this rank's combine-x region of `set` (zero-copy) and the
    /// call is not send-only — sources then read (pull) the rows from it.
    pub pull: u32,
    /// Rank-major dispatch: bytes of each `recv_topk_idx` entry, 8 (i64) or 4 (i32, NCCL
    /// EP's); 0 reads as 8.
    pub recv_idx_bytes: u32,
}

/// [`LlParams::fp8`]: cast to fp8 in the dispatch kernel.
pub const LL_FP8: u32 = 1;
/// [`LlParams::fp8`]: scales rounded up to powers of two.
pub const LL_ROUND_SCALE: u32 = 2;
/// [`LlParams::fp8`] (with [`LL_ROUND_SCALE`]): scales output as UE8M0 bytes (the f32
/// exponent field), four per `u32`: `[L, R*M, H/512]` i32.
pub const LL_UE8M0: u32 = 4;
/// [`LlParams::fp8`] (with [`LL_FP8`] alone): `x` is fp8 already, e4m3 rows with their f32
/// scales in [`LlParams::x_scales`]; both are sent as they are (NCCL EP's `QUANT_FWD`).
pub const LL_FP8_INPUT: u32 = 8;

/// Parameters of `global_expert_ids`: adds `offset` (`rank * L`) to every local expert id
/// (`>= 0`) of `ids` (`[blocks, rows, K]`, `width`-byte integers), turning a dispatch's local
/// ids into NCCL EP's `GLOBAL` ones; with `counts` (`[blocks]` i32), only the first
/// `counts[b]` rows of block `b`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GlobalIdsParams {
    /// `[blocks, rows, K]` ids.
    pub ids: u64,
    /// `[blocks]` i32 valid rows per block (0: every row).
    pub counts: u64,
    /// Blocks.
    pub blocks: u32,
    /// Rows per block.
    pub rows: u32,
    /// K.
    pub num_topk: u32,
    /// 4 or 8.
    pub width: u32,
    /// Added to each id `>= 0`.
    pub offset: u32,
    /// Zero.
    pub reserved: u32,
}

/// Parameters of `ht_drop_overflow` (NCCL EP's `NCCL_EP_OVERFLOW_DROP`), run between an
/// HT route's first count exchange and a second one: the sender removes the (token,
/// destination) pairs that would land at row `budget` or later of the destination (rows
/// arrive source-rank-major, each source's in token order), by setting their expert ids
/// to -1 in `topk_idx`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DropOverflowParams {
    /// `[T, K]` global expert ids (i32 or i64, -1 = none), changed in place.
    pub topk_idx: u64,
    /// `[T, R]` u8 of the routing before the drop.
    pub is_token_in_rank: u64,
    /// `[R, R]` i32 of the first exchange: `[s][d]` = tokens ranks `0..=s` send to `d`.
    pub rank_prefix_matrix: u64,
    /// `[1]` i32 out: rows this rank would receive without the drop (0: not written).
    pub routed_total: u64,
    /// T.
    pub num_tokens: u32,
    /// K.
    pub num_topk: u32,
    /// E.
    pub num_experts: u32,
    /// R.
    pub num_ranks: u32,
    /// This rank.
    pub rank: u32,
    /// 4 or 8.
    pub idx_bytes: u32,
    /// Rows each destination keeps.
    pub budget: u32,
    /// Zero.
    pub reserved: u32,
}

/// Parameters of `ll_scales_token_major`: `src` `[batches, cols, rows]` f32 (the LL
/// dispatch's column-major fp8 scales: `[L, H/128, R*M]`) into `dst` `[batches, rows, cols]`
/// (NCCL EP's `[L, R*M, H/128]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ScalesParams {
    /// `[batches, cols, rows]` f32.
    pub src: u64,
    /// `[batches, rows, cols]` f32.
    pub dst: u64,
    /// `[batches]` i32: only the first `counts[b]` rows of batch `b` are moved (0: all).
    pub counts: u64,
    /// Batches (local experts).
    pub batches: u32,
    /// Rows per batch (`R*M`).
    pub rows: u32,
    /// Columns (scales per row).
    pub cols: u32,
    /// Zero.
    pub reserved: u32,
}

/// Parameters of `ll_copy_counted_rows`: the first `counts[b]` rows (`row_bytes` each) of
/// every batch `b` of `src` (`[batches, rows, row_bytes]`) to the same place in `dst`: the
/// LL expert-major dispatch's received rows into the caller's output, not the whole region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CountedRowsParams {
    /// `[batches, rows, row_bytes]`.
    pub src: u64,
    /// `[batches, rows, row_bytes]`.
    pub dst: u64,
    /// `[batches]` i32.
    pub counts: u64,
    /// Bytes per row, a multiple of 16.
    pub row_bytes: u64,
    /// Batches (local experts).
    pub batches: u32,
    /// Rows per batch (`R*M`).
    pub rows: u32,
}

/// Most experts per token in LL mode (rank-major slots carry this many ids and weights).
pub const LL_MAX_TOPK: u32 = 32;

/// [`LlParams::phases`]: issue the sends (and raise the flags).
pub const LL_SEND: u32 = 1;
/// [`LlParams::phases`]: wait for and consume what peers sent.
pub const LL_RECV: u32 = 2;

/// Parameters of the `selftest_*` kernels that exercise each device primitive (on the CPU
/// emulator in CI and on the GPU in the bundle). Meaning of the fields is per kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SelfTestParams {
    /// First buffer (input, usually).
    pub a: u64,
    /// Second buffer.
    pub b: u64,
    /// Third buffer (output, usually).
    pub c: u64,
    /// The [`ErrorSlot`] (wait tests).
    pub error: u64,
    /// Element count.
    pub n: u64,
    /// A value (flag value, expected count...).
    pub value: u64,
    /// Wait bound in nanoseconds.
    pub timeout_ns: u64,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn all_gather_layout_regions_do_not_overlap() {
        for ranks in 1..=8u32 {
            for blocks in 1..=4u32 {
                let l = AllGatherLayout::new(ranks, blocks, 4096);
                assert!(l.ready_offset < l.arrived_offset && l.arrived_offset < l.data_offset);
                let last_ready = l.flag_offset(l.ready_offset, ranks - 1, blocks - 1, blocks);
                assert!(last_ready + 8 <= l.arrived_offset);
                let last_arrived = l.flag_offset(l.arrived_offset, ranks - 1, blocks - 1, blocks);
                assert!(last_arrived + 8 <= l.data_offset);
                assert_eq!(l.data_offset % 128, 0);
                assert_eq!(l.total_bytes, l.data_offset + ranks as u64 * 4096);
            }
        }
    }

    #[test]
    fn params_are_plain_old_data() {
        // The host passes these as raw bytes to cuLaunchKernel: no padding surprises.
        assert_eq!(core::mem::size_of::<AllGatherParams>(), 7 * 8 + 2 * 4);
        assert_eq!(core::mem::size_of::<DeviceError>(), 6 * 4 + 2 * 8);
        assert_eq!(core::mem::size_of::<ErrorSlot>(), 16);
        assert_eq!(core::mem::size_of::<LayoutParams>(), 5 * 8 + 6 * 4);
        assert_eq!(core::mem::size_of::<SelfTestParams>(), 7 * 8);
        assert_eq!(core::mem::size_of::<LlParams>(), 22 * 8 + 12 * 4);
        assert_eq!(core::mem::size_of::<DropOverflowParams>(), 4 * 8 + 8 * 4);
        assert_eq!(core::mem::size_of::<CountedRowsParams>(), 4 * 8 + 2 * 4);
        assert_eq!(core::mem::size_of::<ScalesParams>(), 3 * 8 + 4 * 4);
        assert_eq!(core::mem::size_of::<HtExpertMajorParams>(), 13 * 8 + 8 * 4);
    }
}
