//! LL (low-latency) dispatch and combine for decode: every (token, expert) pair goes
//! straight to the expert's rank, no count exchange, no host synchronisation.
//!
//! # Protocol (`LlLayout`, two buffer sets picked by epoch parity)
//! **Dispatch.** Warps take tokens; lane `k` owns the token's `k`-th expert `e` on rank `d`
//! (local `l`) and its slot `[l][me][token]` there; the warp reads the row once and stores
//! it into every slot, and each owning lane marks its slot `[epoch, token]`. Each
//! block then adds one to a local block counter (`atom.release.gpu` after
//! `fence.acq_rel.sys`); the block that completes the grid's count raises, at every rank
//! `d` and local expert `l`, the flag `[l][me] = epoch << 32 | T` (release). Receiving:
//! a block per local expert, a warp per source rank at once: acquire the source's flag and
//! count the slots marked with this epoch; after a block barrier every source's first output
//! row is known, and each warp packs its source's slots, in token order, into
//! `packed_recv_x` — rows ordered by (source rank, source token) as `reference::ll_dispatch`.
//! Stale slots carry an older epoch, so nothing needs cleaning.
//! **Combine.** The same warps send each packed row back to its source rank's slot
//! `[global expert][token]`; the last block raises combine flag `[e]` at every rank for each
//! local expert `e`; then each rank acquires all `E` flags and sums, per token, `k`
//! ascending, `fma(y_k, w_k, acc)` from 0 — the reference's order, bit for bit.
//! fp8 (`LlParams::fp8`): the sender casts each row in the kernel (per-128-channel amax
//! scales, as `reference::quantize_row_fp8`), so a slot carries `hidden` bytes plus scales.
//! Epochs live on the device (`LlParams::epoch_word`, `call_epoch`): the host passes the
//! same parameters every time, so a captured CUDA graph replays correctly.
//! `phases` splits each kernel: a send-only launch returns once its sends and flags are out
//! (the host hands back a hook); the receive launch comes later, so no SM waits meanwhile.
//! Waits time out into the error slot at the `SITE_*` sites.
use crate::abi::{
    ErrorSlot, LL_FP8, LL_MAX_TOPK, LL_RECV, LL_ROUND_SCALE, LL_SEND, LL_UE8M0, LlLayout, LlParams, WARP_SIZE,
};
use crate::copy::{copy_warp, copy_warp_to_many, shfl_idx_u64};
use crate::dev::{self, U4};
use crate::num::{bf16_to_f32, f32_to_bf16};

/// Dispatch receiver: waiting for a source rank's flag.
pub const SITE_LL_DISPATCH_RECV: u32 = 20;
/// Combine: waiting for an expert owner's flag.
pub const SITE_LL_COMBINE_RECV: u32 = 21;

#[inline(always)]
unsafe fn base_of(p: &LlParams, r: u32, l: &LlLayout) -> u64 {
    // SAFETY: the table holds R addresses; the set offset stays inside each buffer.
    unsafe { *(p.peer_bases as *const u64).add(r as usize) + (p.epoch & 1) * l.set_bytes }
}

/// `ceil(log2(x))` of a positive normal f32, from its bits.
#[inline(always)]
fn ceil_log2(x: f32) -> i32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    if bits & 0x7F_FFFF == 0 { exp } else { exp + 1 }
}

/// `2^e` for `-126 <= e <= 127`, exactly.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Warp-cooperative fp8 cast of one bf16 row (`hidden` a multiple of 128) into every
/// destination slot (lane `k` holds slot `k` in `dst_of_lane`, for each bit `k` of `lanes`):
/// `hidden` e4m3 bytes, then `hidden / 128` f32 scales — `reference::quantize_row_fp8`.
/// Half a warp takes a 128-channel group: 16 lanes of 8 values, amax over the 16 lanes.
#[inline(always)]
unsafe fn cast_row_fp8(dst_of_lane: u64, lanes: u32, src: u64, hidden: u64, round_scale: bool) {
    let lane = dev::lane_id() as u64;
    let groups = hidden / 128;
    // This lane's 16-byte vector (8 bf16) of group g; `load` gives zeros past the last group.
    let vec_of = |g: u64| g * 16 + lane % 16;
    let load = |g: u64| {
        // SAFETY: vec_of(g) < hidden / 8 whenever g < groups.
        if g < groups { unsafe { dev::ld_nc_v4((src as *const U4).add(vec_of(g) as usize)) } } else { U4::default() }
    };
    let cast = |x: U4, g: u64| {
        let v = vec_of(g);
        let words = [x.x, x.y, x.z, x.w];
        let mut vals = [0f32; 8];
        let mut amax = 0f32;
        for i in 0..8 {
            vals[i] = bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16);
            amax = amax.max(vals[i].abs());
        }
        // Max over the 16 lanes of this half-warp (xor masks below 16 stay inside it).
        amax = amax.max(f32::from_bits(dev::shfl_bfly_u32(amax.to_bits(), 8)));
        amax = amax.max(f32::from_bits(dev::shfl_bfly_u32(amax.to_bits(), 4)));
        amax = amax.max(f32::from_bits(dev::shfl_bfly_u32(amax.to_bits(), 2)));
        amax = amax.max(f32::from_bits(dev::shfl_bfly_u32(amax.to_bits(), 1)));
        let amax = amax.max(1e-4);
        let (scale, scale_inv) = if round_scale {
            let e = ceil_log2(amax / 448.0);
            (pow2(e), pow2(-e))
        } else {
            (amax / 448.0, 448.0 / amax)
        };
        let pair = |i: usize| dev::cvt_e4m3x2(vals[2 * i] * scale_inv, vals[2 * i + 1] * scale_inv) as u32;
        let (q0, q1) = (pair(0) | pair(1) << 16, pair(2) | pair(3) << 16);
        // Cast once, store to every destination (all lanes shuffle; those with a group store).
        let mut m = lanes;
        while m != 0 {
            let dst = shfl_idx_u64(dst_of_lane, m.trailing_zeros());
            m &= m - 1;
            if g < groups {
                // SAFETY: `dst` holds `hidden` bytes of payload then the scales.
                unsafe {
                    *((dst + v * 8) as *mut u32) = q0;
                    *((dst + v * 8 + 4) as *mut u32) = q1;
                    if lane & 15 == 0 {
                        *((dst + hidden) as *mut f32).add(g as usize) = scale;
                    }
                }
            }
        }
    };
    // Half a warp per group, two groups a step, four steps' loads in flight before the first
    // cast (one step at a time left a 7168-wide row at ~20 µs: 28 round trips to memory).
    let mut step = 0u64; // warp-uniform: every lane takes part in every shuffle
    while step < groups {
        let g = step + lane / 16;
        let (x0, x1, x2, x3) = (load(g), load(g + 2), load(g + 4), load(g + 6));
        cast(x0, g);
        cast(x1, g + 2);
        cast(x2, g + 4);
        cast(x3, g + 6);
        step += 8;
    }
}

/// Block-cooperative receive of one source's stream of marked slots: waits (thread 0) for
/// `flag == epoch << 32 | T`, then finds the slots of tokens `0..T` marked with this epoch
/// (`marker(token)` = address of the slot's marker word) and calls `visit(token, index)` for
/// each, in token order, `index` counting from 0; `visit` runs warp-cooperatively on the
/// warp that found the token. Returns how many there were, or `None` after a timeout
/// (reported for `peer` at `site`) or another thread's error.
#[inline(always)]
unsafe fn receive_marked(
    p: &LlParams,
    flag: *const u64,
    peer: u32,
    site: u32,
    marker: impl Fn(u32) -> u64,
    mut visit: impl FnMut(u32, u32),
) -> Option<u32> {
    let counts: *mut u32 = dev::static_smem(); // [0] = T of the source, [1..] = per-warp counts
    let mut failed = false;
    // SAFETY: `flag`, the markers and `counts` are valid (the caller's layout; static smem).
    unsafe {
        if dev::thread_idx_x() == 0 {
            let mut seen = 0u64;
            let ok = dev::wait_until(p.timeout_ns, || {
                seen = dev::ld_acquire_sys_u64(flag);
                seen >> 32 == p.epoch || dev::error_raised(p.error as *const ErrorSlot)
            });
            failed = !ok || seen >> 32 != p.epoch;
            if !ok {
                dev::report_timeout(p.error as *mut ErrorSlot, p.rank, peer, site, p.epoch, seen >> 32);
            }
            *counts = seen as u32;
        }
        if dev::sync_threads_or(failed) {
            return None;
        }
        let num_tokens = *counts;
        let mut found = 0u32;
        let mut t0 = 0u32;
        while t0 < num_tokens {
            // One thread per token of this chunk: is its slot marked with this epoch?
            let t = t0 + dev::thread_idx_x();
            let present = t < num_tokens && dev::ld_relaxed_sys_u32(marker(t) as *const u32) == p.epoch as u32;
            let mask = dev::ballot(present);
            if dev::lane_id() == 0 {
                *counts.add(1 + dev::warp_id() as usize) = mask.count_ones();
            }
            dev::sync_threads();
            let (mut before, mut total) = (0u32, 0u32);
            for w in 0..dev::num_warps() {
                let c = *counts.add(1 + w as usize);
                if w < dev::warp_id() {
                    before += c;
                }
                total += c;
            }
            dev::sync_threads();
            // Warp w handles its own present tokens, in order.
            let mut m = mask;
            let mut index = found + before;
            while m != 0 {
                let j = m.trailing_zeros();
                m &= m - 1;
                visit(t0 + dev::warp_id() * WARP_SIZE + j, index);
                index += 1;
            }
            found += total;
            t0 += dev::block_dim_x();
        }
        dev::sync_threads();
        Some(found)
    }
}

#[inline(always)]
unsafe fn expert_of(p: &LlParams, t: u32, k: u32) -> i64 {
    let at = (t * p.num_topk + k) as usize;
    // SAFETY: `topk_idx` holds [T, K] entries of idx_bytes.
    unsafe {
        if p.idx_bytes == 4 { *(p.topk_idx as *const i32).add(at) as i64 } else { *(p.topk_idx as *const i64).add(at) }
    }
}

/// The call's epoch: a new one (counter + 1, recorded in `call_epoch`) for a dispatch's send
/// phase, else the one its dispatch recorded. Every thread calls it at kernel entry.
#[inline(always)]
unsafe fn resolve_epoch(p: &mut LlParams, new_call: bool) {
    // SAFETY: both words live in device memory written by earlier kernels of this stream.
    unsafe {
        p.epoch = if new_call {
            let e = dev::ld_relaxed_sys_u64(p.epoch_word as *const u64) + 1;
            if dev::block_idx_x() == 0 && dev::thread_idx_x() == 0 {
                dev::st_relaxed_sys_u64(p.call_epoch as *mut u64, e);
            }
            e
        } else {
            dev::ld_relaxed_sys_u64(p.call_epoch as *const u64)
        };
    }
}

/// After this block's sends: count it done; true (in every thread) in the grid's last block,
/// which then sees every other block's sends.
#[inline(always)]
unsafe fn last_block(counter: u64) -> bool {
    dev::sync_threads();
    let mut last = false;
    if dev::thread_idx_x() == 0 {
        dev::fence_acq_rel_sys();
        // SAFETY: the counter lies in this rank's buffer.
        let old = unsafe { dev::atom_add_release_gpu_u32(counter as *mut u32, 1) };
        last = (old + 1) % dev::grid_dim_x() == 0;
        dev::fence_acq_rel_sys();
    }
    dev::sync_threads_or(last)
}

kernel! {
    /// LL dispatch (see the module docs).
    pub unsafe fn ll_dispatch(p: LlParams) as LL_DISPATCH {
        let mut p = p;
        let new_call = p.phases & LL_SEND != 0;
        // SAFETY: the epoch words come from the host's LlBuffer.
        unsafe { resolve_epoch(&mut p, new_call) };
        let l = LlLayout::new(p.num_ranks, p.num_experts, p.max_tokens, p.row_bytes);
        let num_local = l.num_local_experts as u32;
        let lane = dev::lane_id();
        let warps = dev::num_warps() * dev::grid_dim_x();
        let me = p.rank;
        let epoch32 = p.epoch as u32;
        // SAFETY (whole body): every address comes from `l`, the layout the host sized the
        // buffers with; inputs and outputs hold the shapes LlParams documents.
        unsafe {
            let local = base_of(&p, me, &l);
            // Send.
            let mut t = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
            while p.phases & LL_SEND != 0 && t < p.num_tokens {
                // Lane k owns the token's k-th expert: its slot at the expert's rank. The row
                // is read once and stored to all of them.
                let e = if lane < p.num_topk { expert_of(&p, t, lane) } else { -1 };
                let slot = if e >= 0 {
                    let (dst, le) = (e as u32 / num_local, e as u32 % num_local);
                    base_of(&p, dst, &l) + l.dispatch_slot(le as u64, me as u64, t as u64)
                } else {
                    0
                };
                let lanes = dev::ballot(e >= 0);
                let row = p.x + t as u64 * p.row_bytes;
                if p.fp8 & LL_FP8 != 0 {
                    cast_row_fp8(slot, lanes, row, p.row_bytes / 2, p.fp8 & LL_ROUND_SCALE != 0);
                } else {
                    copy_warp_to_many(slot, lanes, row, p.row_bytes);
                }
                if e >= 0 {
                    *((slot + p.row_bytes) as *mut u32) = epoch32;
                    *((slot + p.row_bytes + 4) as *mut u32) = t;
                }
                t += warps;
            }
            if p.phases & LL_SEND != 0 && last_block(local + l.counters) {
                let mut i = dev::thread_idx_x();
                while i < p.num_ranks * num_local {
                    let (dst, le) = (i / num_local, i % num_local);
                    let flag = base_of(&p, dst, &l) + l.dispatch_flags + (le as u64 * l.num_ranks + me as u64) * 8;
                    dev::st_release_sys_u64(flag as *mut u64, p.epoch << 32 | p.num_tokens as u64);
                    i += dev::block_dim_x();
                }
                // Every block read the counter before counting itself done: advance it.
                if dev::thread_idx_x() == 0 {
                    dev::st_relaxed_sys_u64(p.epoch_word as *mut u64, p.epoch);
                }
            }
            // Receive: a block per local expert; its warps take the sources (warp w: sources
            // w, w + warps, ...) and work on them at once: wait for the flag and count the
            // marked slots, then (after a block barrier, which gives every source's first
            // row) copy the rows in token order.
            let num_warps = dev::num_warps();
            let (warp, r) = (dev::warp_id(), p.num_ranks);
            let counts: *mut u32 = dev::static_smem(); // [src] marked rows, [R + src] T of src
            let mut le = dev::block_idx_x();
            while p.phases & LL_RECV != 0 && le < num_local {
                let slot = |src: u32, tok: u32| local + l.dispatch_slot(le as u64, src as u64, tok as u64);
                let marked = |src: u32, tok: u32, num_tokens: u32| {
                    tok < num_tokens && dev::ld_relaxed_sys_u32((slot(src, tok) + p.row_bytes) as *const u32) == epoch32
                };
                let mut failed = false;
                let mut src = warp;
                while src < r {
                    let flag = (local + l.dispatch_flags + (le as u64 * l.num_ranks + src as u64) * 8) as *const u64;
                    let Some(num_tokens) = wait_flag_warp(&p, flag, src, SITE_LL_DISPATCH_RECV) else {
                        failed = true;
                        break;
                    };
                    let mut n = 0;
                    let mut t0 = 0;
                    while t0 < num_tokens {
                        n += dev::ballot(marked(src, t0 + lane, num_tokens)).count_ones();
                        t0 += WARP_SIZE;
                    }
                    if lane == 0 {
                        *counts.add(src as usize) = n;
                        *counts.add((r + src) as usize) = num_tokens;
                    }
                    src += num_warps;
                }
                if dev::sync_threads_or(failed) {
                    return;
                }
                let mut src = warp;
                while src < r {
                    let mut begin = 0u32;
                    for s in 0..src {
                        begin += *counts.add(s as usize);
                    }
                    let num_tokens = *counts.add((r + src) as usize);
                    let mut index = 0u32;
                    let mut t0 = 0;
                    while t0 < num_tokens {
                        let mut m = dev::ballot(marked(src, t0 + lane, num_tokens));
                        while m != 0 {
                            let tok = t0 + m.trailing_zeros();
                            m &= m - 1;
                            receive_row(&p, &l, le, begin + index, tok, slot(src, tok));
                            index += 1;
                        }
                        t0 += WARP_SIZE;
                    }
                    if lane == 0 {
                        let at = (le * r + src) as usize;
                        *(p.packed_recv_layout_range as *mut i64).add(at) = ((begin as i64) << 32) | index as i64;
                    }
                    src += num_warps;
                }
                if dev::thread_idx_x() == 0 {
                    let mut total = 0u32;
                    for s in 0..r {
                        total += *counts.add(s as usize);
                    }
                    *(p.packed_recv_count as *mut i32).add(le as usize) = total as i32;
                }
                dev::sync_threads();
                le += dev::grid_dim_x();
            }
        }
    }
}

/// Warp-cooperative: lane 0 waits for `flag == epoch << 32 | T`; returns `T` (in every
/// lane), or `None` after a timeout (reported for `peer` at `site`) or another error.
#[inline(always)]
unsafe fn wait_flag_warp(p: &LlParams, flag: *const u64, peer: u32, site: u32) -> Option<u32> {
    let mut seen = 0u64;
    let mut ok = 1u32;
    if dev::lane_id() == 0 {
        // SAFETY: `flag` lies in this rank's buffer (the caller's layout).
        unsafe {
            let arrived = dev::wait_until(p.timeout_ns, || {
                seen = dev::ld_acquire_sys_u64(flag);
                seen >> 32 == p.epoch || dev::error_raised(p.error as *const ErrorSlot)
            });
            ok = (arrived && seen >> 32 == p.epoch) as u32;
            if !arrived {
                dev::report_timeout(p.error as *mut ErrorSlot, p.rank, peer, site, p.epoch, seen >> 32);
            }
        }
    }
    let ok = dev::shfl_idx_u32(ok, 0);
    let num_tokens = dev::shfl_idx_u32(seen as u32, 0);
    // A shuffle orders no memory: the warp barrier makes lane 0's acquire cover the other
    // lanes' reads of the source's slots.
    dev::sync_warp(0xffff_ffff);
    if ok == 1 { Some(num_tokens) } else { None }
}

/// Warp-cooperative: copies the slot of token `tok` into row `row` of local expert `le`'s
/// output (bf16, or fp8 bytes plus scales stored group-major per expert — DeepEP's
/// column-major `[L, R*M, G]`, the token index contiguous) and records its source token.
#[inline(always)]
unsafe fn receive_row(p: &LlParams, l: &LlLayout, le: u32, row: u32, tok: u32, from: u64) {
    let lane = dev::lane_id() as u64;
    let out_row = le as u64 * l.num_ranks * l.max_tokens + row as u64;
    // SAFETY: outputs hold [L, R*M] rows (LlParams); `from` is a slot of the layout.
    unsafe {
        if p.fp8 & LL_FP8 != 0 {
            let hidden = p.row_bytes / 2;
            copy_warp(p.packed_recv_x + out_row * hidden, from, hidden, false);
            let (groups, rows) = (hidden / 128, l.num_ranks * l.max_tokens);
            let mut s = lane;
            while s < groups {
                let scale = *((from + hidden) as *const f32).add(s as usize);
                if p.fp8 & LL_UE8M0 != 0 {
                    // i32 words [L][G/4][R*M]; byte g % 4 of word g / 4 = the exponent of scale g.
                    let word = (le as u64 * (groups / 4) + s / 4) * rows + row as u64;
                    *(p.packed_recv_x_scales as *mut u8).add((word * 4 + s % 4) as usize) =
                        (scale.to_bits() >> 23) as u8;
                } else {
                    let at = (le as u64 * groups + s) * rows + row as u64;
                    *(p.packed_recv_x_scales as *mut f32).add(at as usize) = scale;
                }
                s += WARP_SIZE as u64;
            }
        } else {
            copy_warp(p.packed_recv_x + out_row * p.row_bytes, from, p.row_bytes, false);
        }
        if lane == 0 {
            *(p.packed_recv_src_info as *mut i32).add(out_row as usize) = tok as i32;
        }
    }
}

kernel! {
    /// LL combine (see the module docs).
    pub unsafe fn ll_combine(p: LlParams) as LL_COMBINE {
        let mut p = p;
        // SAFETY: as in ll_dispatch; a combine reuses its dispatch's epoch.
        unsafe { resolve_epoch(&mut p, false) };
        let l = LlLayout::new(p.num_ranks, p.num_experts, p.max_tokens, p.row_bytes);
        let num_local = l.num_local_experts as u32;
        let lane = dev::lane_id();
        let gwarp = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
        let warps = dev::num_warps() * dev::grid_dim_x();
        let me = p.rank;
        let slots_per_expert = p.num_ranks * p.max_tokens;
        // SAFETY (whole body): as in ll_dispatch.
        unsafe {
            let local = base_of(&p, me, &l);
            // Send every received row back to its source: slot [global expert][token]. The
            // rows of all (expert, source) ranges, in order, are dealt round-robin to the
            // grid's warps (a range holds a few rows: dealing each range from warp 0 would
            // leave most warps idle). Each warp reads the ranges 32 at a time, a lane each,
            // with a prefix sum for the rows before each (one range after another would be
            // hundreds of dependent loads: ~40 µs at 1 token on an H200).
            let num_pairs = if p.phases & LL_SEND != 0 { num_local * p.num_ranks } else { 0 };
            let mut dealt = 0u32; // rows of the ranges before this chunk
            let mut q0 = 0u32;
            while q0 < num_pairs {
                let q = q0 + lane; // range q = local expert q / R, source q % R
                let range = if q < num_pairs { *(p.packed_recv_layout_range as *const i64).add(q as usize) } else { 0 };
                let (begin, count) = ((range >> 32) as u32, range as u32);
                let mut incl = count;
                let mut off = 1;
                while off < WARP_SIZE {
                    let y = dev::shfl_idx_u32(incl, lane.saturating_sub(off));
                    if lane >= off {
                        incl += y;
                    }
                    off *= 2;
                }
                let before = dealt.wrapping_add(incl - count);
                let mut nonempty = dev::ballot(count != 0);
                while nonempty != 0 {
                    let j = nonempty.trailing_zeros();
                    nonempty &= nonempty - 1;
                    let (begin, count) = (dev::shfl_idx_u32(begin, j), dev::shfl_idx_u32(count, j));
                    let before = dev::shfl_idx_u32(before, j);
                    let (le, src) = ((q0 + j) / p.num_ranks, (q0 + j) % p.num_ranks);
                    let expert = me * num_local + le;
                    // The first i with (before + i) % warps == gwarp.
                    let mut i = (gwarp + warps - before % warps) % warps;
                    while i < count {
                        let row = le * slots_per_expert + begin + i;
                        let tok = *(p.packed_recv_src_info as *const i32).add(row as usize) as u64;
                        let slot = base_of(&p, src, &l) + l.combine_slot(expert as u64, tok);
                        copy_warp(slot, p.x + row as u64 * p.row_bytes, p.row_bytes, true);
                        if lane == 0 {
                            *((slot + p.row_bytes) as *mut u32) = p.epoch as u32;
                        }
                        i += warps;
                    }
                }
                dealt = dealt.wrapping_add(dev::shfl_idx_u32(incl, WARP_SIZE - 1));
                q0 += WARP_SIZE;
            }
            if p.phases & LL_SEND != 0 && last_block(local + l.counters + 128) {
                let mut i = dev::thread_idx_x();
                while i < p.num_ranks * num_local {
                    let (dst, le) = (i / num_local, i % num_local);
                    let flag = base_of(&p, dst, &l) + l.combine_flags + (me * num_local + le) as u64 * 8;
                    dev::st_release_sys_u64(flag as *mut u64, p.epoch);
                    i += dev::block_dim_x();
                }
            }
            if p.phases & LL_RECV == 0 {
                return;
            }
            // Every expert owner has sent back everything for this rank?
            let mut failed = false;
            let mut e = dev::thread_idx_x();
            while e < p.num_experts {
                let flag = (local + l.combine_flags + e as u64 * 8) as *const u64;
                let mut seen = 0;
                let ok = dev::wait_until(p.timeout_ns, || {
                    seen = dev::ld_acquire_sys_u64(flag);
                    seen >= p.epoch || dev::error_raised(p.error as *const ErrorSlot)
                });
                if !ok || seen < p.epoch {
                    failed = true;
                    if !ok {
                        dev::report_timeout(p.error as *mut ErrorSlot, me, e / num_local, SITE_LL_COMBINE_RECV, p.epoch, seen);
                    }
                    break;
                }
                e += dev::block_dim_x();
            }
            if dev::sync_threads_or(failed) {
                return;
            }
            // Weighted sum per token, k ascending, one fused multiply-add per term. Work
            // items are (token, 32-vector chunk of the row), dealt over the grid's warps, so
            // a few tokens still keep every warp busy.
            let num_vecs = p.row_bytes / 16;
            let chunks = num_vecs.div_ceil(WARP_SIZE as u64);
            let mut item = gwarp as u64;
            while item < p.num_tokens as u64 * chunks {
                let t = (item / chunks) as u32;
                let v = item % chunks * WARP_SIZE as u64 + lane as u64;
                if v < num_vecs {
                    let mut acc = [0f32; 8];
                    // Eight experts at a time: their loads are all issued before the first
                    // fused multiply-add, which still runs in ascending k. (Named values, not
                    // an array: an array here would live in local memory.)
                    let fetch = |k: u32| -> (U4, f32, bool) {
                        let e = if k < p.num_topk { expert_of(&p, t, k) } else { -1 };
                        if e < 0 {
                            return (U4::default(), 0.0, false);
                        }
                        let w = *(p.topk_weights as *const f32).add((t * p.num_topk + k) as usize);
                        (dev::ld_v4(((local + l.combine_slot(e as u64, t as u64)) as *const U4).add(v as usize)), w, true)
                    };
                    macro_rules! add {
                        ($y:expr, $w:expr, $valid:expr) => {
                            if $valid {
                                let words = [$y.x, $y.y, $y.z, $y.w];
                                for i in 0..8 {
                                    acc[i] = dev::fma_rn_f32(bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16), $w, acc[i]);
                                }
                            }
                        };
                    }
                    let mut k0 = 0;
                    while k0 < p.num_topk {
                        let (y0, w0, v0) = fetch(k0);
                        let (y1, w1, v1) = fetch(k0 + 1);
                        let (y2, w2, v2) = fetch(k0 + 2);
                        let (y3, w3, v3) = fetch(k0 + 3);
                        let (y4, w4, v4) = fetch(k0 + 4);
                        let (y5, w5, v5) = fetch(k0 + 5);
                        let (y6, w6, v6) = fetch(k0 + 6);
                        let (y7, w7, v7) = fetch(k0 + 7);
                        add!(y0, w0, v0);
                        add!(y1, w1, v1);
                        add!(y2, w2, v2);
                        add!(y3, w3, v3);
                        add!(y4, w4, v4);
                        add!(y5, w5, v5);
                        add!(y6, w6, v6);
                        add!(y7, w7, v7);
                        k0 += 8;
                    }
                    let mut out = [0u32; 4];
                    for i in 0..8 {
                        out[i / 2] |= (f32_to_bf16(acc[i]) as u32) << (16 * (i % 2));
                    }
                    dev::st_v4((p.combined_x as *mut U4).add((t as u64 * num_vecs + v) as usize), U4 { x: out[0], y: out[1], z: out[2], w: out[3] });
                }
                item += warps as u64;
            }
        }
    }
}

/// Rank-major receiver: waiting for a source rank's flag.
pub const SITE_LL_RANK_MAJOR_RECV: u32 = 22;

kernel! {
    /// LL dispatch, rank-major (NCCL EP's `RANK_MAJOR`): each token goes once to every rank
    /// holding one of its experts, with its `topk_idx` and weights, into slot `[me][token]`
    /// marked `[epoch, token]`; the grid's last block raises flag `[me] = epoch << 32 | T` at
    /// every rank. Receivers (a block per source rank) pack the marked slots in token order
    /// into `[R, M, H]`, localising expert ids (-1 and weight 0 for experts elsewhere).
    /// Outputs: `packed_recv_x` `[R, M, H]`, `packed_recv_src_info` `[R, M]`,
    /// `packed_recv_count` `[R]`, `recv_topk_idx` / `recv_topk_weights` `[R, M, K]`.
    pub unsafe fn ll_dispatch_rank_major(p: LlParams) as LL_DISPATCH_RANK_MAJOR {
        let mut p = p;
        let new_call = p.phases & LL_SEND != 0;
        // SAFETY: as in ll_dispatch.
        unsafe { resolve_epoch(&mut p, new_call) };
        let l = LlLayout::new(p.num_ranks, p.num_experts, p.max_tokens, p.row_bytes);
        let num_local = l.num_local_experts as u32;
        let lane = dev::lane_id();
        let warps = dev::num_warps() * dev::grid_dim_x();
        let me = p.rank;
        let k_count = p.num_topk;
        let epoch32 = p.epoch as u32;
        let meta = p.row_bytes + 16; // ids, then weights
        // SAFETY (whole body): as in ll_dispatch, with the rank-major regions of `l`.
        unsafe {
            let local = base_of(&p, me, &l);
            let mut t = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
            while p.phases & LL_SEND != 0 && t < p.num_tokens {
                let mut ranks = 0u64;
                for k in 0..k_count {
                    let e = expert_of(&p, t, k);
                    if e >= 0 {
                        ranks |= 1u64 << ((e as u32 / num_local) & 63);
                    }
                }
                // 32 destinations at a time, lane d owning destination d0 + d: the row is read
                // once and stored to each of them.
                let (id, weight) = if lane < k_count {
                    (expert_of(&p, t, lane) as i32, *(p.topk_weights as *const f32).add((t * k_count + lane) as usize))
                } else {
                    (-1, 0.0)
                };
                let mut d0 = 0;
                while d0 < p.num_ranks {
                    let dst = d0 + lane;
                    let goes = dst < p.num_ranks && (ranks >> (dst & 63)) & 1 != 0;
                    let slot = if goes { base_of(&p, dst, &l) + l.rank_major_slot(me as u64, t as u64) } else { 0 };
                    let lanes = dev::ballot(goes);
                    copy_warp_to_many(slot, lanes, p.x + t as u64 * p.row_bytes, p.row_bytes);
                    let mut m = lanes;
                    while m != 0 {
                        let to = shfl_idx_u64(slot, m.trailing_zeros());
                        m &= m - 1;
                        if lane < k_count {
                            *((to + meta) as *mut i32).add(lane as usize) = id;
                            *((to + meta + 4 * LL_MAX_TOPK as u64) as *mut f32).add(lane as usize) = weight;
                        }
                    }
                    if goes {
                        *((slot + p.row_bytes) as *mut u32) = epoch32;
                        *((slot + p.row_bytes + 4) as *mut u32) = t;
                    }
                    d0 += WARP_SIZE;
                }
                t += warps;
            }
            if p.phases & LL_SEND != 0 && last_block(local + l.counters) {
                let mut dst = dev::thread_idx_x();
                while dst < p.num_ranks {
                    let flag = base_of(&p, dst, &l) + l.rank_major_flags + me as u64 * 8;
                    dev::st_release_sys_u64(flag as *mut u64, p.epoch << 32 | p.num_tokens as u64);
                    dst += dev::block_dim_x();
                }
                if dev::thread_idx_x() == 0 {
                    dev::st_relaxed_sys_u64(p.epoch_word as *mut u64, p.epoch);
                }
            }
            let lo = (me * num_local) as i32;
            let mut src = dev::block_idx_x();
            while p.phases & LL_RECV != 0 && src < p.num_ranks {
                let flag = (local + l.rank_major_flags + src as u64 * 8) as *const u64;
                let slot = |tok: u32| local + l.rank_major_slot(src as u64, tok as u64);
                let copy = |tok: u32, index: u32| {
                    let from = slot(tok);
                    let out_row = src as u64 * l.max_tokens + index as u64;
                    copy_warp(p.packed_recv_x + out_row * p.row_bytes, from, p.row_bytes, false);
                    if lane == 0 {
                        *(p.packed_recv_src_info as *mut i32).add(out_row as usize) = tok as i32;
                    }
                    if lane < k_count {
                        let e = *((from + meta) as *const i32).add(lane as usize);
                        let w = *((from + meta + 4 * LL_MAX_TOPK as u64) as *const f32).add(lane as usize);
                        let local_e = e - lo;
                        let is_local = e >= 0 && local_e >= 0 && (local_e as u32) < num_local;
                        let at = (out_row * k_count as u64 + lane as u64) as usize;
                        *(p.recv_topk_idx as *mut i64).add(at) = if is_local { local_e as i64 } else { -1 };
                        *(p.recv_topk_weights as *mut f32).add(at) = if is_local { w } else { 0.0 };
                    }
                };
                let Some(n) = receive_marked(&p, flag, src, SITE_LL_RANK_MAJOR_RECV, |t| slot(t) + p.row_bytes, copy)
                else {
                    return;
                };
                if dev::thread_idx_x() == 0 {
                    *(p.packed_recv_count as *mut i32).add(src as usize) = n as i32;
                }
                src += dev::grid_dim_x();
            }
        }
    }
}
