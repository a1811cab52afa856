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
    }
}
