//! NCCL EP's HT `EXPERT_MAJOR` layout over the rows of a FLAT dispatch.
//!
//! Zone `e` of the expert-major output holds, in dispatch row order, every received row
//! with local expert `e` among its top-k (a row with two local experts appears in both
//! zones), then zero padding up to `expert_counts[e]` (the notify's counts, rounded up to
//! the alignment). Zones follow each other in local expert order.
//! * `ht_expert_major_counts` (one thread): zone sizes, offsets and total for the caller.
//! * `ht_expert_major_permute` (a block per zone): rows into their zones, each slot's weight
//!   beside it, and `slot_map[row][k]` for the way back; zero padding.
//! * `ht_expert_major_reduce` (a warp per row): each flat row becomes the f32 sum, k
//!   ascending, of its slots' rows (bf16, rounded once); weights, if any, go back to
//!   `[rows, K]` (0 where the expert is elsewhere).
//!
//! Zones that need more than `num_slots` in all are an `OVERFLOW` error, or under the DROP
//! policy (`drop_overflow`) cut there: zone `e` keeps `min(size, num_slots - start)` slots
//! (see [`kept`]), and its later rows' copies are dropped (`slot_map` -1, nothing summed).
use crate::abi::{DeviceError, ErrorSlot, HtExpertMajorParams, WARP_SIZE, error_code};
use crate::copy::copy_warp;
use crate::dev::{self, U4};
use crate::num::{add_bf16x8, pack_bf16x8};

/// Sum of the zone sizes before zone `e`, and of all of them.
///
/// # Safety
/// `p.expert_counts` holds `L` i32.
#[inline(always)]
unsafe fn zone_start(p: &HtExpertMajorParams, e: u32) -> (u64, u64) {
    let (mut before, mut total) = (0u64, 0u64);
    for j in 0..p.num_local_experts {
        // SAFETY: j < L.
        let c = unsafe { *(p.expert_counts as *const i32).add(j as usize) }.max(0) as u64;
        if j < e {
            before += c;
        }
        total += c;
    }
    (before, total)
}

/// Slots zone `e` (of `size`, starting at `start`) keeps: all of them, or under the DROP
/// policy those below `num_slots`.
#[inline(always)]
fn kept(p: &HtExpertMajorParams, start: u64, size: u64) -> u64 {
    if p.drop_overflow != 0 { size.min((p.num_slots as u64).saturating_sub(start)) } else { size }
}

/// Rows of this dispatch, bounded by the flat capacity.
///
/// # Safety
/// `p.num_rows` is an i32 in device memory.
#[inline(always)]
unsafe fn rows(p: &HtExpertMajorParams) -> u32 {
    // SAFETY: forwarded.
    (unsafe { *(p.num_rows as *const i32) }.max(0) as u32).min(p.max_rows)
}

kernel! {
    /// See the module docs. One thread.
    pub unsafe fn ht_expert_major_counts(p: HtExpertMajorParams) as HT_EXPERT_MAJOR_COUNTS {
        if dev::thread_idx_x() != 0 || dev::block_idx_x() != 0 {
            return;
        }
        // SAFETY: the outputs, when given, hold `L` (total: 1) entries of the chosen width.
        unsafe {
            let put = |at: u64, i: u32, v: u64| {
                if at != 0 {
                    if p.out_i64 != 0 {
                        *(at as *mut i64).add(i as usize) = v as i64;
                    } else {
                        *(at as *mut i32).add(i as usize) = v as i32;
                    }
                }
            };
            let mut offset = 0u64;
            for e in 0..p.num_local_experts {
                let c = (*(p.expert_counts as *const i32).add(e as usize)).max(0) as u64;
                put(p.counts_out, e, kept(&p, offset, c));
                let cut = if p.drop_overflow != 0 { offset.min(p.num_slots as u64) } else { offset };
                put(p.offsets_out, e, cut);
                offset += c;
            }
            put(p.total_out, 0, offset);
        }
    }
}

kernel! {
    /// See the module docs. Grid: any number of blocks (block `b` takes zones `b`, `b +
    /// grid`, ...); needs `4 * (1 + warps)` bytes of the static shared memory.
    pub unsafe fn ht_expert_major_permute(p: HtExpertMajorParams) as HT_EXPERT_MAJOR_PERMUTE {
        let (lane, warp, warps) = (dev::lane_id(), dev::warp_id(), dev::num_warps());
        let counts: *mut u32 = dev::static_smem(); // per-warp hits of the current chunk
        let k_count = p.num_topk;
        // SAFETY (whole body): every array holds what HtExpertMajorParams says (host-checked);
        // slots stay below num_slots (checked against the total first, or cut there by `kept`).
        unsafe {
            let n = rows(&p);
            let mut e = dev::block_idx_x();
            while e < p.num_local_experts {
                let (start, total) = zone_start(&p, e);
                if total > p.num_slots as u64 && p.drop_overflow == 0 {
                    if dev::thread_idx_x() == 0 && e == 0 {
                        let rec = DeviceError {
                            code: error_code::OVERFLOW,
                            rank: p.rank,
                            peer: u32::MAX,
                            block: dev::block_idx_x(),
                            site: 0,
                            expected: p.num_slots as u64,
                            observed: total,
                            reserved: 0,
                        };
                        dev::report_error(p.error as *mut ErrorSlot, rec);
                    }
                    return;
                }
                let size = kept(&p, start, (*(p.expert_counts as *const i32).add(e as usize)).max(0) as u64);
                let mut filled = 0u64; // rows placed so far (block-uniform)
                let mut base = 0u32;
                while base < n {
                    // Thread `i` of the block looks at row `base + i`: is `e` among its experts?
                    let row = base + dev::thread_idx_x();
                    let mut hit_k = u32::MAX;
                    if row < n {
                        for k in 0..k_count {
                            let id = *(p.flat_topk_idx as *const i64).add((row * k_count + k) as usize);
                            if id == e as i64 && hit_k == u32::MAX {
                                hit_k = k;
                            }
                        }
                    }
                    let mask = dev::ballot(hit_k != u32::MAX);
                    if lane == 0 {
                        *counts.add(warp as usize) = mask.count_ones();
                    }
                    dev::sync_threads();
                    let (mut before, mut chunk) = (0u64, 0u64);
                    for w in 0..warps {
                        let c = *counts.add(w as usize) as u64;
                        if w < warp {
                            before += c;
                        }
                        chunk += c;
                    }
                    // Slots of this warp's hits, in row order.
                    let mine = before + (mask & ((1u32 << lane) - 1)).count_ones() as u64;
                    if hit_k != u32::MAX && filled + mine >= size {
                        *(p.slot_map as *mut i32).add((row * k_count + hit_k) as usize) = -1; // dropped
                    }
                    if hit_k != u32::MAX && filled + mine < size {
                        let slot = start + filled + mine;
                        *(p.slot_map as *mut i32).add((row * k_count + hit_k) as usize) = slot as i32;
                        if p.em_weights != 0 {
                            let w = if p.flat_topk_weights != 0 {
                                *(p.flat_topk_weights as *const f32).add((row * k_count + hit_k) as usize)
                            } else {
                                0.0
                            };
                            *(p.em_weights as *mut f32).add(slot as usize) = w;
                        }
                    }
                    let mut m = mask;
                    let mut i = 0u64;
                    while m != 0 {
                        let bit = m.trailing_zeros();
                        m &= m - 1;
                        let slot = filled + before + i;
                        if slot < size {
                            let from = p.flat_x + (base + warp * WARP_SIZE + bit) as u64 * p.row_bytes;
                            copy_warp(p.em_x + (start + slot) * p.row_bytes, from, p.row_bytes, true);
                        }
                        i += 1;
                    }
                    filled += chunk;
                    dev::sync_threads(); // `counts` is reused by the next chunk
                    base += dev::block_dim_x();
                }
                // Padding: zero rows (and weights) after the zone's rows.
                let mut slot = filled.min(size) + warp as u64;
                while slot < size {
                    let row = (p.em_x + (start + slot) * p.row_bytes) as *mut U4;
                    let mut v = lane as u64;
                    while v < p.row_bytes / 16 {
                        dev::st_v4(row.add(v as usize), U4::default());
                        v += WARP_SIZE as u64;
                    }
                    if lane == 0 && p.em_weights != 0 {
                        *(p.em_weights as *mut f32).add((start + slot) as usize) = 0.0;
                    }
                    slot += warps as u64;
                }
                e += dev::grid_dim_x();
            }
        }
    }
}

kernel! {
    /// See the module docs. Grid: any; a warp per flat row (grid-stride).
    pub unsafe fn ht_expert_major_reduce(p: HtExpertMajorParams) as HT_EXPERT_MAJOR_REDUCE {
        let lane = dev::lane_id();
        let gwarp = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
        let warps = dev::num_warps() * dev::grid_dim_x();
        let k_count = p.num_topk;
        // SAFETY (whole body): as in the permute; slot_map entries of local experts were
        // written by the permute of the same routing and lie below num_slots.
        unsafe {
            let n = rows(&p);
            let num_vecs = p.row_bytes / 16;
            let mut row = gwarp;
            while row < n {
                // Lane k: the slot of the row's k-th expert, or -1.
                let slot = if lane < k_count {
                    let at = (row * k_count + lane) as usize;
                    let local = *(p.flat_topk_idx as *const i64).add(at) >= 0;
                    let s = if local { *(p.slot_map as *const i32).add(at) } else { -1 };
                    if s >= p.num_slots as i32 { -1 } else { s }
                } else {
                    -1
                };
                if lane < k_count && p.flat_topk_weights != 0 {
                    let w = if slot >= 0 && p.em_weights != 0 { *(p.em_weights as *const f32).add(slot as usize) } else { 0.0 };
                    *(p.flat_topk_weights as *mut f32).add((row * k_count + lane) as usize) = w;
                }
                // Whole warps step through the row (the shuffles need every lane).
                let mut v0 = 0u64;
                while v0 < num_vecs {
                    let v = v0 + lane as u64;
                    let mut acc = [0f32; 8];
                    for k in 0..k_count {
                        let s = dev::shfl_idx_u32(slot as u32, k) as i32;
                        if s >= 0 && v < num_vecs {
                            let y = dev::ld_v4((p.em_x as *const U4).add((s as u64 * num_vecs + v) as usize));
                            add_bf16x8(&mut acc, [y.x, y.y, y.z, y.w]);
                        }
                    }
                    if v < num_vecs {
                        let out = pack_bf16x8(&acc);
                        let at = (p.flat_x as *mut U4).add((row as u64 * num_vecs + v) as usize);
                        dev::st_v4(at, U4 { x: out[0], y: out[1], z: out[2], w: out[3] });
                    }
                    v0 += WARP_SIZE as u64;
                }
                row += warps;
            }
        }
    }
}
