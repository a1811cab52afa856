//! Routing layout: from `topk_idx [T, K]` to where each token goes.
//!
//! # `get_dispatch_layout`
//! Grid-stride, one thread per token. Per token: read its `K` expert ids (i32 or i64; -1 =
//! none), count each expert, collect the ranks that own them as bits of a `u64`, write the
//! token's row of `is_token_in_rank`, count each rank once. Counts gather in dynamic shared
//! memory (`[num_experts]` then `[num_ranks]` u32) and reach the zeroed outputs through one
//! atomic add per non-zero bin and block: integer sums, so the result is deterministic.
//! An expert id outside `-1..num_experts` is reported as `BAD_INPUT` (site = token) and
//! ignored.
//!
//! # `ht_drop_overflow`
//! See [`DropOverflowParams`]. One block; warp `w` takes destinations `w`, `w + warps`, ...
//! and walks the tokens 32 at a time: a ballot over `is_token_in_rank[.., d]` gives each
//! token its position among this rank's tokens to `d`, which after the rows of lower
//! ranks (`rank_prefix_matrix[rank - 1][d]`) is its row at `d`.
use crate::abi::{DeviceError, DropOverflowParams, ErrorSlot, GlobalIdsParams, LayoutParams, error_code};
use crate::dev;

kernel! {
    /// See the module docs.
    pub unsafe fn get_dispatch_layout(p: LayoutParams) as GET_DISPATCH_LAYOUT {
        let t = dev::thread_idx_x();
        let bd = dev::block_dim_x();
        let expert_bins: *mut u32 = dev::dyn_smem();
        // SAFETY: the host sizes dynamic shared memory as (num_experts + num_ranks) u32.
        let rank_bins = unsafe { expert_bins.add(p.num_experts as usize) };
        let bins = p.num_experts + p.num_ranks;
        let mut i = t;
        while i < bins {
            // SAFETY: i < bins, inside the dynamic shared array.
            unsafe { *expert_bins.add(i as usize) = 0 };
            i += bd;
        }
        dev::sync_threads();

        let experts_per_rank = p.num_experts.checked_div(p.num_ranks).unwrap_or(1).max(1);
        let stride = bd * dev::grid_dim_x();
        let mut token = dev::block_idx_x() * bd + t;
        while token < p.num_tokens {
            let mut ranks = 0u64;
            for k in 0..p.num_topk {
                let at = token as usize * p.num_topk as usize + k as usize;
                // SAFETY: `topk_idx` holds num_tokens * num_topk entries of idx_bytes.
                let expert = unsafe {
                    if p.idx_bytes == 4 { *(p.topk_idx as *const i32).add(at) as i64 } else { *(p.topk_idx as *const i64).add(at) }
                };
                if expert < 0 || expert >= p.num_experts as i64 {
                    if expert != -1 {
                        let rec = DeviceError {
                            code: error_code::BAD_INPUT,
                            rank: p.rank,
                            peer: u32::MAX,
                            block: dev::block_idx_x(),
                            site: token,
                            expected: p.num_experts as u64,
                            observed: expert as u64,
                            reserved: 0,
                        };
                        // SAFETY: `error` is the rank's error slot.
                        unsafe { dev::report_error(p.error as *mut ErrorSlot, rec) };
                    }
                    continue;
                }
                // SAFETY: expert < num_experts.
                unsafe { dev::atom_add_shared_u32(expert_bins.add(expert as usize), 1) };
                ranks |= 1u64 << ((expert as u32 / experts_per_rank) & 63);
            }
            let row = p.is_token_in_rank as *mut u8;
            for r in 0..p.num_ranks {
                let hit = (ranks >> r) & 1;
                // SAFETY: `is_token_in_rank` holds num_tokens * num_ranks bytes; r < num_ranks.
                unsafe {
                    *row.add(token as usize * p.num_ranks as usize + r as usize) = hit as u8;
                    if hit != 0 {
                        dev::atom_add_shared_u32(rank_bins.add(r as usize), 1);
                    }
                }
            }
            token += stride;
        }
        dev::sync_threads();

        let mut i = t;
        while i < bins {
            // SAFETY: i < bins; the outputs hold num_experts / num_ranks i32.
            unsafe {
                let count = *expert_bins.add(i as usize);
                if count != 0 {
                    let out = if i < p.num_experts {
                        (p.num_tokens_per_expert as *mut u32).add(i as usize)
                    } else {
                        (p.num_tokens_per_rank as *mut u32).add((i - p.num_experts) as usize)
                    };
                    dev::atom_add_relaxed_gpu_u32(out, count);
                }
            }
            i += bd;
        }
    }
}

kernel! {
    /// See [`GlobalIdsParams`]. Grid-stride over the entries.
    pub unsafe fn global_expert_ids(p: GlobalIdsParams) as GLOBAL_EXPERT_IDS {
        let per_block = p.rows as u64 * p.num_topk as u64;
        let total = p.blocks as u64 * per_block;
        let stride = (dev::block_dim_x() * dev::grid_dim_x()) as u64;
        let mut i = (dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x()) as u64;
        while i < total {
            let (b, row) = (i / per_block, (i % per_block) / p.num_topk.max(1) as u64);
            // SAFETY: `counts` holds `blocks` i32 and `ids` `total` entries (host-checked).
            unsafe {
                let valid = p.counts == 0 || (row as i64) < *(p.counts as *const i32).add(b as usize) as i64;
                if valid {
                    if p.width == 4 {
                        let at = (p.ids as *mut i32).add(i as usize);
                        if *at >= 0 {
                            *at += p.offset as i32;
                        }
                    } else {
                        let at = (p.ids as *mut i64).add(i as usize);
                        if *at >= 0 {
                            *at += p.offset as i64;
                        }
                    }
                }
            }
            i += stride;
        }
    }
}

kernel! {
    /// See the module docs.
    pub unsafe fn ht_drop_overflow(p: DropOverflowParams) as HT_DROP_OVERFLOW {
        let (lane, warp, warps) = (dev::lane_id(), dev::warp_id(), dev::num_warps());
        let (r, me) = (p.num_ranks, p.rank);
        let per_rank = p.num_experts.checked_div(r).unwrap_or(1).max(1);
        // SAFETY (whole body): the arrays hold what DropOverflowParams says (host-checked).
        unsafe {
            let rpm = p.rank_prefix_matrix as *const i32;
            if dev::thread_idx_x() == 0 && p.routed_total != 0 {
                *(p.routed_total as *mut i32) = *rpm.add(((r - 1) * r + me) as usize);
            }
            let mut d = warp;
            while d < r {
                let before = if me == 0 { 0 } else { (*rpm.add(((me - 1) * r + d) as usize)).max(0) as u32 };
                let keep = p.budget.saturating_sub(before);
                let mut seen = 0u32; // this rank's tokens to `d` so far (warp-uniform)
                let mut base = 0u32;
                while base < p.num_tokens {
                    let tok = base + lane;
                    let hit = tok < p.num_tokens && *(p.is_token_in_rank as *const u8).add((tok * r + d) as usize) != 0;
                    let mask = dev::ballot(hit);
                    let pos = seen + (mask & ((1u32 << lane) - 1)).count_ones();
                    if hit && pos >= keep {
                        for k in 0..p.num_topk {
                            let at = (tok * p.num_topk + k) as usize;
                            if p.idx_bytes == 4 {
                                let id = (p.topk_idx as *mut i32).add(at);
                                if *id >= 0 && *id as u32 / per_rank == d {
                                    *id = -1;
                                }
                            } else {
                                let id = (p.topk_idx as *mut i64).add(at);
                                if *id >= 0 && (*id as u64 / per_rank as u64) == d as u64 {
                                    *id = -1;
                                }
                            }
                        }
                    }
                    seen += mask.count_ones();
                    base += 32;
                }
                d += warps;
            }
        }
    }
}
