//! Every size limit of moe-ep in one place: what the kernels are built for (their constants
//! live in the ABI crate, shared with the kernels) and what the host checks before a launch.

/// Most experts per token (top-k), in every mode: the LL kernels keep one row slot per
/// (token, k) ([`moe_ep_abi::LL_MAX_TOPK`]).
pub const MAX_TOPK: usize = 32;
/// Most experts in all: the layout kernel's and the receive counters' room.
pub const MAX_EXPERTS: usize = 1024;
/// Largest hidden size in bf16 elements (a multiple of 8; fp8 needs 128, UE8M0 512).
pub const MAX_HIDDEN: usize = 16384;
/// Most ranks the layout kernel takes ([`moe_ep_abi::LAYOUT_MAX_RANKS`]).
pub const MAX_LAYOUT_RANKS: usize = moe_ep_abi::LAYOUT_MAX_RANKS as usize;
/// Most ranks in one HT (NVLink) domain ([`moe_ep_abi::HT_MAX_RANKS`]).
pub const MAX_HT_RANKS: usize = moe_ep_abi::HT_MAX_RANKS as usize;
/// Most warps of an HT block: the kernels are built with `.maxntid` for this many threads
/// ([`moe_ep_abi::HT_MAX_BLOCK_WARPS`]).
pub const MAX_HT_BLOCK_WARPS: usize = moe_ep_abi::HT_MAX_BLOCK_WARPS as usize;
/// Most threads of any block (CUDA's limit).
pub const MAX_BLOCK_THREADS: usize = 1024;

const _: () = assert!(MAX_TOPK == moe_ep_abi::LL_MAX_TOPK as usize, "the LL slots are sized for MAX_TOPK");
