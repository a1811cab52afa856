//! LL (low-latency) dispatch and combine for decode: every (token, expert) pair goes
//! straight to the expert's rank, no count exchange, no host synchronisation.
//!
//! # Protocol (`LlLayout`; the host alternates calls between two buffer sets)
//! **Dispatch, one pass.** The sender stores each row straight into the receiver's output
//! (`recv x` of the set, which the host hands out as `packed_recv_x`):
//! 1. Every block counts, per expert, this rank's tokens for it and each pair's index among
//!    them, in token order (`match.any` over 32 pairs at a time; a shared-memory count per
//!    warp and expert, then a prefix over the warps).
//! 2. Per expert with rows, one thread reserves them at the owner: `atom.add` on the owner's
//!    receive counter returns the range's first row (`begin`), published to the other
//!    blocks in `begins`. Ranges of different sources land in arrival order; rows within a
//!    range in token order.
//! 3. Each pair's row at its owner (`begin + index`) goes to `pair rows`, kept for the
//!    combine. Token `t` belongs to block `t % grid`, whose warps split its tokens into
//!    (token, part of the row) items, so a few tokens still keep every warp busy. Lane `k`
//!    owns the token's `k`-th expert; the warp reads each part once and stores it (or its
//!    fp8 cast and scales) to every owner, with the source token in `recv src info`.
//! 4. The grid's last block writes, at every owner and local expert, `{begin << 32 | count,
//!    epoch}` (the flag released last). The receive waits for its `R` flags per local
//!    expert, outputs the ranges and counts, and zeroes the receive counter.
//!
//! Before reserving at an owner, a sender waits until the owner has released its previous
//! use of the set (`released[owner] >=` the sender's own previous epoch there: every rank
//! makes the same calls). A rank releases a set when its combine of the set's dispatch is
//! done with the outputs, or at its next dispatch on the set (at most two outstanding
//! results, as DeepEP's LL).
//! **Combine.** An owner whose expert outputs lie in its `combine x` region (zero-copy) raises
//! combine flag `[me] = epoch << 1 | 1` at every rank and sends nothing: sources read
//! (pull) each row from there. Otherwise (or when send-only) the owner's warps (a few per
//! local expert) send each received row back to its source's slot `[global expert][token]`
//! and the last block
//! raises `epoch << 1`. Each source acquires all `R` flags and sums, per token, `k`
//! ascending, `fma(y_k, w_k, acc)` from 0 — the reference's order, bit for bit — reading
//! each `y_k` where its owner's flag says.
//! fp8 (`LlParams::fp8`): the sender casts each row in the kernel (per-128-channel amax
//! scales, as `reference::quantize_row_fp8`, 512 channels per warp step, one 16-byte store
//! per lane and owner) and stores the scales column-major. With `LL_FP8_INPUT` the rows
//! are fp8 already: their bytes and given scales go out as they are, to the same places.
//! Epochs live on the device (`LlParams::epoch_word`, `call_epoch`): the host passes the
//! same parameters every time, so a captured CUDA graph replays correctly.
//! `phases` splits each kernel: a send-only launch returns once its sends and flags are out
//! (the host hands back a hook); the receive launch comes later, so no SM waits meanwhile.
//! Waits time out into the error slot at the `SITE_*` sites.
//! Statistics (DeepEP's, each optional): the expert-major dispatch's receive adds every
//! local expert's count to `cumulative_local_expert_recv_stats`; both receives add each
//! flag wait's `%clock64` cycles to the waited-for rank's `*_wait_recv_cost_stats` entry
//! (dispatch: one wait per local expert and source; combine: block 0's, one per owner).
use crate::abi::{
    CountedRowsParams, ErrorSlot, LL_COMBINE_COUNTER, LL_DISPATCH_COUNTER, LL_FP8, LL_FP8_INPUT, LL_LAST_EPOCH,
    LL_MAX_TOPK, LL_RECV, LL_ROUND_SCALE, LL_SEND, LL_UE8M0, LlLayout, LlParams, ScalesParams, WARP_SIZE,
};
use crate::copy::{COPY_STEP_BYTES, copy_warp, copy_warp_n, copy_warp_to_many, shfl_idx_u64};
use crate::dev::{self, U4};
use crate::num::{add_bf16x8, bf16_to_f32, pack_bf16x8};

/// Dispatch receiver: waiting for a source rank's flag.
pub const SITE_LL_DISPATCH_RECV: u32 = 20;
/// Combine: waiting for an expert owner's flag.
pub const SITE_LL_COMBINE_RECV: u32 = 21;
/// Dispatch sender: waiting for an owner to release its previous use of the set.
pub const SITE_LL_RELEASE: u32 = 23;

#[inline(always)]
unsafe fn base_of(p: &LlParams, r: u32, l: &LlLayout) -> u64 {
    // SAFETY: the table holds R addresses; the set offset stays inside each buffer.
    unsafe { *(p.peer_bases as *const u64).add(r as usize) + (p.set & 1) as u64 * l.set_bytes }
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

/// Where the fp8 cast puts each row's scales: group `g`'s at `base + (g / per_word) *
/// stride + (g % per_word) * bytes`, as an f32 (`ue8m0` false: `per_word` 1, `bytes` 4) or
/// as its exponent byte (`ue8m0`: four to a word, `per_word` 4, `bytes` 1).
#[derive(Clone, Copy)]
struct ScaleDst {
    stride: u64,
    ue8m0: bool,
}

/// Channels a warp casts in one step of [`cast_row_fp8`]: 16 per lane, a 128-channel
/// group per 8 lanes, so each destination takes one 16-byte store per lane.
const FP8_STEP: u64 = 512;
/// Steps whose loads are issued together (4 KB of bf16 in flight per warp).
const FP8_STEPS_IN_FLIGHT: u64 = 4;

/// Warp-cooperative fp8 cast of steps `steps` ([`FP8_STEP`] channels each) of one bf16 row
/// (`hidden` a multiple of 128) into every destination (lane `k` holds row `k` in
/// `dst_of_lane` and its scales' base in `scale_of_lane`, for each bit `k` of `lanes`):
/// e4m3 bytes and per-group scales placed as `sd` says — `reference::quantize_row_fp8`.
/// Each step is cast once and stored to every destination.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn cast_row_fp8(
    dst_of_lane: u64,
    scale_of_lane: u64,
    lanes: u32,
    src: u64,
    hidden: u64,
    round_scale: bool,
    sd: ScaleDst,
    steps: (u64, u64),
) {
    let lane = dev::lane_id() as u64;
    let groups = hidden / 128;
    // This lane's 16 channels of step `s` (zeros past the row) and their group.
    let channel = |s: u64| s * FP8_STEP + 16 * lane;
    let load = |s: u64| {
        let c = channel(s);
        if s < steps.1 && c < hidden {
            // SAFETY: channels c..c+16 lie in the row (c < hidden, both multiples of 16).
            unsafe { [dev::ld_nc_v4((src + 2 * c) as *const U4), dev::ld_nc_v4((src + 2 * c + 16) as *const U4)] }
        } else {
            [U4::default(); 2]
        }
    };
    // The e4m3 bytes of the lane's 16 channels and its group's scale (all lanes shuffle).
    let cast = |x: [U4; 2]| -> (U4, f32) {
        let words = [x[0].x, x[0].y, x[0].z, x[0].w, x[1].x, x[1].y, x[1].z, x[1].w];
        let mut vals = [0f32; 16];
        let mut amax = 0f32;
        for i in 0..16 {
            vals[i] = bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16);
            amax = amax.max(vals[i].abs());
        }
        // Max over the group's 8 lanes (xor masks below 8 stay inside it).
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
        let q = U4 {
            x: pair(0) | pair(1) << 16,
            y: pair(2) | pair(3) << 16,
            z: pair(4) | pair(5) << 16,
            w: pair(6) | pair(7) << 16,
        };
        (q, scale)
    };
    // The word this lane stores for step `s`'s scales: its group's f32 scale (lanes 0, 8,
    // 16, 24), or the step's four UE8M0 exponents packed (lane 0).
    let scale_word = |scale: f32| -> u32 {
        if !sd.ue8m0 {
            return scale.to_bits();
        }
        let exp = scale.to_bits() >> 23;
        exp | dev::shfl_idx_u32(exp, 8) << 8 | dev::shfl_idx_u32(exp, 16) << 16 | dev::shfl_idx_u32(exp, 24) << 24
    };
    let mut s = steps.0; // warp-uniform: every lane takes part in every shuffle
    while s < steps.1 {
        let x = [load(s), load(s + 1), load(s + 2), load(s + 3)];
        let (q0, s0) = cast(x[0]);
        let (q1, s1) = cast(x[1]);
        let (q2, s2) = cast(x[2]);
        let (q3, s3) = cast(x[3]);
        let out = [(q0, scale_word(s0)), (q1, scale_word(s1)), (q2, scale_word(s2)), (q3, scale_word(s3))];
        let mut m = lanes;
        while m != 0 {
            let j = m.trailing_zeros();
            let (dst, scales) = (shfl_idx_u64(dst_of_lane, j), shfl_idx_u64(scale_of_lane, j));
            m &= m - 1;
            for (i, &(q, word)) in out.iter().enumerate() {
                let step = s + i as u64;
                let c = channel(step);
                if step >= steps.1 || c >= hidden {
                    continue;
                }
                // SAFETY: `dst` holds `hidden` bytes; `scales` places `groups` scales (ScaleDst).
                unsafe {
                    dev::st_v4((dst + c) as *mut U4, q);
                    let g = c / 128;
                    if sd.ue8m0 && lane == 0 {
                        *((scales + g / 4 * sd.stride) as *mut u32) = word;
                    } else if !sd.ue8m0 && lane.is_multiple_of(8) && g < groups {
                        *((scales + g * sd.stride) as *mut u32) = word;
                    }
                }
            }
        }
        s += FP8_STEPS_IN_FLIGHT;
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
    let e = unsafe {
        if p.idx_bytes == 4 { *(p.topk_idx as *const i32).add(at) as i64 } else { *(p.topk_idx as *const i64).add(at) }
    };
    // An id past the experts (bad input) selects nothing, like -1, rather than a wild address.
    if e < p.num_experts as i64 { e } else { -1 }
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

/// Bytes of dynamic shared memory `ll_dispatch` needs with `num_warps` warps per block: a
/// count per (warp, expert), then a total per expert.
pub const fn ll_dispatch_smem_bytes(num_warps: u32, num_experts: u32) -> u32 {
    (num_warps + 1) * num_experts * 4
}

const FULL: u32 = 0xffff_ffff;

/// Walks this warp's chunks `c0..c1` of 32 (token, k) pairs, a pair per lane, in order:
/// `visit(pair, expert, index)` with `index` = the rows for `expert` before the pair —
/// `counts[expert]` (this warp's running count) plus the chunk's lanes below with the same
/// expert (`match.any`). Warp-cooperative.
#[inline(always)]
unsafe fn walk_pairs(p: &LlParams, counts: *mut u32, c0: u32, c1: u32, mut visit: impl FnMut(u32, i64, u32)) {
    let lane = dev::lane_id();
    let pairs = p.num_tokens * p.num_topk;
    let mut c = c0;
    while c < c1 {
        let pair = c * WARP_SIZE + lane;
        // SAFETY: pairs below T*K lie in topk_idx; counts holds E entries (e < E here).
        unsafe {
            let e = if pair < pairs { expert_of(p, pair / p.num_topk, pair % p.num_topk) } else { -1 };
            let same = dev::match_any_u32(e as u32);
            let index = if e >= 0 { *counts.add(e as usize) + (same & ((1u32 << lane) - 1)).count_ones() } else { 0 };
            visit(pair, e, index);
            dev::sync_warp(FULL); // every lane has read its count
            if e >= 0 && same.trailing_zeros() == lane {
                *counts.add(e as usize) += same.count_ones();
            }
            dev::sync_warp(FULL); // the new counts are visible to the warp
        }
        c += 1;
    }
}

/// Reserves `n` rows for this rank at expert `e`'s owner once the owner has released its
/// use of the set before (epoch `prev`), and publishes the range's first row in `begins`.
#[inline(always)]
unsafe fn reserve(p: &LlParams, l: &LlLayout, e: u32, n: u32, prev: u64) -> bool {
    let num_local = l.num_local_experts as u32;
    let (owner, le) = (e / num_local, e % num_local);
    // SAFETY: every address comes from `l`.
    unsafe {
        let local = base_of(p, p.rank, l);
        let released = (local + l.released + owner as u64 * 8) as *const u64;
        if dev::wait_at_least(dev::waiting!(p, owner, SITE_LL_RELEASE), released, prev, |v| v).is_none() {
            return false;
        }
        let counter = base_of(p, owner, l) + l.recv_counters + le as u64 * 4;
        let begin = dev::atom_add_relaxed_sys_u32(counter as *mut u32, n);
        dev::st_release_sys_u64((local + l.begins + e as u64 * 8) as *mut u64, p.epoch << 32 | begin as u64);
    }
    true
}

kernel! {
    /// LL dispatch, expert-major (see the module docs).
    pub unsafe fn ll_dispatch(p: LlParams) as LL_DISPATCH = "_ZN6moe_ep11low_latency8dispatchEv", {
        let mut p = p;
        let new_call = p.phases & LL_SEND != 0;
        // SAFETY: the epoch words come from the host's LlBuffer.
        unsafe { resolve_epoch(&mut p, new_call) };
        let l = LlLayout::new(p.num_ranks, p.num_experts, p.max_tokens, p.row_bytes);
        // SAFETY (both halves): every address comes from `l`, the layout the host sized the
        // buffers with; inputs and outputs hold the shapes LlParams documents, and the launch
        // gives `ll_dispatch_smem_bytes` of dynamic shared memory.
        unsafe {
            if p.phases & LL_SEND != 0 && !dispatch_send(&p, &l) {
                return;
            }
            if p.phases & LL_RECV != 0 {
                dispatch_recv(&p, &l);
            }
        }
    }
}

/// [`LL_FP8_INPUT`]: one row's `groups` f32 scales (at `src`) to every destination (lane `k`
/// holds row `k`'s scales' base in `scale_of_lane`, for each bit `k` of `lanes`), group `g`
/// at `base + g * stride`, as the fp8 cast places them. Warp-cooperative.
#[inline(always)]
unsafe fn forward_scales(scale_of_lane: u64, lanes: u32, src: u64, groups: u64, stride: u64) {
    let lane = dev::lane_id() as u64;
    let mut m = lanes; // warp-uniform (a ballot): every lane takes part in every shuffle
    while m != 0 {
        let base = shfl_idx_u64(scale_of_lane, m.trailing_zeros());
        m &= m - 1;
        let mut g = lane;
        while g < groups {
            // SAFETY: `src` holds `groups` f32; `base` places `groups` scales `stride` apart.
            unsafe { *((base + g * stride) as *mut u32) = *((src + 4 * g) as *const u32) };
            g += WARP_SIZE as u64;
        }
    }
}

/// Dispatch's send half (module docs, steps 1-4); false after a timeout or another error.
#[inline(always)]
unsafe fn dispatch_send(p: &LlParams, l: &LlLayout) -> bool {
    let (me, num_experts, k) = (p.rank, p.num_experts, p.num_topk);
    let num_local = l.num_local_experts as u32;
    let (lane, warp, nw) = (dev::lane_id(), dev::warp_id(), dev::num_warps());
    let (block, grid, tid, bd) = (dev::block_idx_x(), dev::grid_dim_x(), dev::thread_idx_x(), dev::block_dim_x());
    let fp8 = p.fp8 & LL_FP8 != 0;
    let fp8_input = p.fp8 & LL_FP8_INPUT != 0;
    let x_bytes = if fp8 { p.row_bytes / 2 } else { p.row_bytes };
    let in_bytes = if fp8_input { x_bytes } else { p.row_bytes }; // bytes of a row of `x`
    let groups = p.row_bytes / 2 / 128;
    let rows = l.rows_per_expert();
    let sd = ScaleDst { stride: rows * 4, ue8m0: p.fp8 & LL_UE8M0 != 0 };
    // SAFETY: as in ll_dispatch.
    unsafe {
        let local = base_of(p, me, l);
        let last_epoch = (local + l.counters + LL_LAST_EPOCH) as *mut u64;
        let pair_rows = (local + l.pair_rows) as *mut i32;
        // Every block reads it before counting itself done; the last block advances it.
        let prev = dev::ld_relaxed_sys_u64(last_epoch);
        // This rank is done with its previous use of the set (at most two outstanding results).
        if block == 0 && prev > 0 {
            let mut r = tid;
            while r < p.num_ranks {
                dev::st_release_sys_u64((base_of(p, r, l) + l.released + me as u64 * 8) as *mut u64, prev);
                r += bd;
            }
        }
        // 1. Per expert: this rank's rows for it, and each pair's index among them.
        let count: *mut u32 = dev::dyn_smem(); // [warp][expert], then total[expert]
        let total = count.add((nw * num_experts) as usize);
        let chunks = (p.num_tokens * k).div_ceil(WARP_SIZE);
        let (c0, c1) = (chunks * warp / nw, chunks * (warp + 1) / nw);
        let mine = count.add((warp * num_experts) as usize);
        let mut e = lane;
        while e < num_experts {
            *mine.add(e as usize) = 0;
            e += WARP_SIZE;
        }
        dev::sync_warp(FULL);
        walk_pairs(p, mine, c0, c1, |_, _, _| {});
        dev::sync_threads();
        // Prefix over the warps; 2. one block reserves each expert's rows at its owner.
        let mut failed = false;
        let mut e = tid;
        while e < num_experts {
            let mut run = 0;
            for w in 0..nw {
                let c = count.add((w * num_experts + e) as usize);
                let n = *c;
                *c = run;
                run += n;
            }
            *total.add(e as usize) = run;
            if run > 0 && e % grid == block && !failed {
                failed = !reserve(p, l, e, run, prev);
            }
            e += bd;
        }
        if dev::sync_threads_or(failed) {
            return false;
        }
        // Each pair's row at its owner (its index among the rows for its expert after the
        // range's first), for the tokens this block sends: token t goes with block t % grid.
        walk_pairs(p, mine, c0, c1, |pair, e, index| {
            let t = pair / k;
            if e >= 0 && t % grid == block && !failed {
                let owner = e as u32 / num_local;
                let begins = (local + l.begins + e as u64 * 8) as *const u64;
                match dev::wait_at_least(dev::waiting!(p, owner, SITE_LL_RELEASE), begins, p.epoch << 32, |v| v) {
                    Some(begin) => {
                        *pair_rows.add((t * LL_MAX_TOPK + pair % k) as usize) = (begin as u32 + index) as i32
                    }
                    None => failed = true,
                }
            }
        });
        if dev::sync_threads_or(failed) {
            return false;
        }
        // 3. Work items (token, part of its row): the block's tokens, split so that a few
        // tokens still keep every warp busy (one warp per 7168-wide row left ~10 µs of
        // dependent round trips at 1 token). Lane k owns the token's k-th expert: its row at
        // the owner. Each part of the row is read once and stored to all of them.
        let my_tokens = if block < p.num_tokens { (p.num_tokens - 1 - block) / grid + 1 } else { 0 };
        // Units a part is made of: a copy step (2 KB) or four fp8 cast steps.
        let (unit, units) = if fp8 && !fp8_input {
            (FP8_STEPS_IN_FLIGHT, (p.row_bytes / 2).div_ceil(FP8_STEP).div_ceil(FP8_STEPS_IN_FLIGHT))
        } else {
            (COPY_STEP_BYTES, in_bytes.div_ceil(COPY_STEP_BYTES))
        };
        let parts = (nw / my_tokens.max(1)).clamp(1, units as u32) as u64;
        let per_part = units.div_ceil(parts) * unit;
        let mut item = warp as u64;
        while item < my_tokens as u64 * parts {
            let (t, part) = (block + (item / parts) as u32 * grid, item % parts);
            let e = if lane < k { expert_of(p, t, lane) } else { -1 };
            let (mut dst, mut scales) = (0u64, 0u64);
            if e >= 0 {
                let (owner, le) = (e as u32 / num_local, e as u32 % num_local);
                let row = *pair_rows.add((t * LL_MAX_TOPK + lane) as usize) as u64;
                let out_row = le as u64 * rows + row;
                let base = base_of(p, owner, l);
                dst = base + l.recv_x + out_row * x_bytes;
                if part == 0 {
                    *((base + l.recv_src_info) as *mut i32).add(out_row as usize) = t as i32;
                }
                let per_word = if sd.ue8m0 { 4 } else { 1 };
                scales = base + l.recv_scales + (le as u64 * (groups / per_word) * rows + row) * 4;
            }
            let lanes = dev::ballot(e >= 0);
            let src = p.x + t as u64 * in_bytes;
            let from = part * per_part;
            if fp8_input {
                let end = (from + per_part).min(in_bytes);
                copy_warp_to_many(dst + from, lanes, src + from, end.saturating_sub(from));
                if part == 0 {
                    forward_scales(scales, lanes, p.x_scales + t as u64 * groups * 4, groups, sd.stride);
                }
            } else if fp8 {
                let end = (from + per_part).min((p.row_bytes / 2).div_ceil(FP8_STEP));
                cast_row_fp8(dst, scales, lanes, src, p.row_bytes / 2, p.fp8 & LL_ROUND_SCALE != 0, sd, (from, end));
            } else {
                let end = (from + per_part).min(p.row_bytes);
                copy_warp_to_many(dst + from, lanes, src + from, end.saturating_sub(from));
            }
            item += nw as u64;
        }
        // 4. The last block: every owner's ranges and flags.
        if dev::last_block(local + l.counters + LL_DISPATCH_COUNTER) {
            let mut i = tid;
            while i < num_experts {
                let (owner, le) = (i / num_local, i % num_local);
                let n = *total.add(i as usize);
                let begin = if n > 0 {
                    dev::ld_relaxed_sys_u64((local + l.begins + i as u64 * 8) as *const u64) as u32
                } else {
                    0
                };
                let meta = base_of(p, owner, l) + l.dispatch_flags + (le as u64 * l.num_ranks + me as u64) * 16;
                dev::st_relaxed_sys_u64(meta as *mut u64, (begin as u64) << 32 | n as u64);
                dev::st_release_sys_u64((meta + 8) as *mut u64, p.epoch);
                i += bd;
            }
            if tid == 0 {
                dev::st_relaxed_sys_u64(last_epoch, p.epoch);
                dev::st_relaxed_sys_u64(p.epoch_word as *mut u64, p.epoch);
            }
        }
    }
    true
}

/// Dispatch's receive half: a block per local expert waits for every source's flag, then
/// outputs the ranges and the count and readies the receive counter for the set's next use.
/// Statistics (each optional): the count is added to the expert's
/// `cumulative_local_expert_recv_stats` entry, and each wait's `%clock64` cycles (from its
/// start until the source's flag was seen) to the source's `dispatch_wait_recv_cost_stats`.
#[inline(always)]
unsafe fn dispatch_recv(p: &LlParams, l: &LlLayout) {
    let (r, num_local) = (p.num_ranks, l.num_local_experts as u32);
    let (tid, bd) = (dev::thread_idx_x(), dev::block_dim_x());
    let wait_stats = p.dispatch_wait_recv_cost_stats as *mut u64;
    // SAFETY: as in ll_dispatch; `total` is static shared memory; the statistics hold [L]
    // i32 and [R] i64 (the host checked).
    unsafe {
        let local = base_of(p, p.rank, l);
        let total: *mut u32 = dev::static_smem();
        let mut le = dev::block_idx_x();
        while le < num_local {
            if tid == 0 {
                *total = 0;
            }
            dev::sync_threads();
            let mut failed = false;
            let mut src = tid;
            while src < r {
                let meta = local + l.dispatch_flags + (le as u64 * l.num_ranks + src as u64) * 16;
                let flag = (meta + 8) as *const u64;
                let start = dev::clock64();
                if dev::wait_at_least(dev::waiting!(p, src, SITE_LL_DISPATCH_RECV), flag, p.epoch, |v| v).is_none() {
                    failed = true;
                    break;
                }
                if !wait_stats.is_null() {
                    dev::red_add_relaxed_gpu_u64(wait_stats.add(src as usize), dev::clock64().wrapping_sub(start));
                }
                let range = dev::ld_relaxed_sys_u64(meta as *const u64);
                *(p.packed_recv_layout_range as *mut i64).add((le * r + src) as usize) = range as i64;
                dev::atom_add_shared_u32(total, range as u32);
                src += bd;
            }
            if dev::sync_threads_or(failed) {
                return;
            }
            if tid == 0 {
                *(p.packed_recv_count as *mut i32).add(le as usize) = *total as i32;
                if p.cumulative_local_expert_recv_stats != 0 {
                    let stat = (p.cumulative_local_expert_recv_stats as *mut u32).add(le as usize);
                    dev::atom_add_relaxed_gpu_u32(stat, *total); // i32 += count (two's complement)
                }
                // Every source has reserved (its flag came after): zero for the set's next use.
                dev::st_relaxed_sys_u32((local + l.recv_counters + le as u64 * 4) as *mut u32, 0);
            }
            dev::sync_threads();
            le += dev::grid_dim_x();
        }
    }
}

kernel! {
    /// LL combine (see the module docs).
    pub unsafe fn ll_combine(p: LlParams) as LL_COMBINE = "_ZN6moe_ep11low_latency7combineEv", {
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
            // Send every received row back to its source: slot [global expert][token]. Each
            // local expert's rows (packed from 0; the ranges of its sources tile them) are
            // split over `per_expert` warps, row by row. A row's source is the lane whose
            // range holds it (a ballot), so no warp walks every range (all warps dealing
            // all 256 ranges made the send issue-bound: ~45 µs at 128 tokens on an H200).
            // Zero-copy (`pull`): the rows stay in this rank's combine-x region; sources read them.
            let pull = p.pull != 0;
            let per_expert = (warps / num_local).max(1);
            let items = if p.phases & LL_SEND != 0 && !pull { num_local * per_expert } else { 0 };
            let ranges = p.packed_recv_layout_range as *const i64;
            let mut item = gwarp;
            while item < items {
                let (le, sub) = (item / per_expert, item % per_expert);
                let expert = me * num_local + le;
                // Lane s: source s0 + s's range of this expert, for 32 sources at a time.
                let range_at = |s0: u32| {
                    let src = s0 + lane;
                    let v = if src < p.num_ranks { *ranges.add((le * p.num_ranks + src) as usize) } else { 0 };
                    ((v >> 32) as u32, v as u32)
                };
                let first = range_at(0);
                let mut count = 0;
                let mut s0 = 0;
                while s0 < p.num_ranks {
                    let (_, n) = if s0 == 0 { first } else { range_at(s0) };
                    count += dev::warp_sum_u32(n);
                    s0 += WARP_SIZE;
                }
                let mut r = sub;
                while r < count {
                    // The source whose range holds row r.
                    let holds = |(begin, n): (u32, u32)| n > 0 && begin <= r && r < begin + n;
                    let mut s0 = 0;
                    let mut found = dev::ballot(holds(first));
                    while found == 0 && s0 + WARP_SIZE < p.num_ranks {
                        s0 += WARP_SIZE;
                        found = dev::ballot(holds(range_at(s0)));
                    }
                    if found == 0 {
                        break; // the ranges don't tile the rows: not a handle of this buffer's dispatch
                    }
                    let src = s0 + found.trailing_zeros();
                    let row = le * slots_per_expert + r;
                    let tok = *((local + l.recv_src_info) as *const i32).add(row as usize) as u64;
                    let slot = base_of(&p, src, &l) + l.combine_slot(expert as u64, tok);
                    // Few warps per rank: 8 loads in flight per lane (7168-wide rows: 4
                    // round trips a row instead of 7).
                    copy_warp_n::<8>(slot, p.x + row as u64 * p.row_bytes, p.row_bytes, true);
                    r += per_expert;
                }
                item += warps;
            }
            // Raise this rank's flag at every source (pulling: at once; else once every block's
            // rows are out) and release the set: its dispatch outputs are no longer read here.
            let raise = p.phases & LL_SEND != 0
                && if pull { dev::block_idx_x() == 0 } else { dev::last_block(local + l.counters + LL_COMBINE_COUNTER) };
            if raise {
                let mut r = dev::thread_idx_x();
                while r < p.num_ranks {
                    let base = base_of(&p, r, &l);
                    dev::st_release_sys_u64((base + l.combine_flags + me as u64 * 8) as *mut u64, p.epoch << 1 | pull as u64);
                    dev::st_release_sys_u64((base + l.released + me as u64 * 8) as *mut u64, p.epoch);
                    r += dev::block_dim_x();
                }
            }
            if p.phases & LL_RECV == 0 {
                return;
            }
            // Every expert owner's rows ready for this rank? `pulled[r]`: read them at rank r.
            // Block 0's wait cycles for each owner go to the owner's optional wait-cost entry
            // (`[R]` i64, host-checked; every block waits for the same flags at once: one
            // measure per combine).
            let pulled: *mut u8 = dev::static_smem();
            let wait_stats = if dev::block_idx_x() == 0 { p.combine_wait_recv_cost_stats } else { 0 } as *mut u64;
            let mut failed = false;
            let mut r = dev::thread_idx_x();
            while r < p.num_ranks {
                let flag = (local + l.combine_flags + r as u64 * 8) as *const u64;
                let start = dev::clock64();
                match dev::wait_at_least(dev::waiting!(p, r, SITE_LL_COMBINE_RECV), flag, p.epoch << 1, |v| v) {
                    Some(seen) => *pulled.add(r as usize) = (seen & 1) as u8,
                    None => {
                        failed = true;
                        break;
                    }
                }
                if !wait_stats.is_null() {
                    dev::red_add_relaxed_gpu_u64(wait_stats.add(r as usize), dev::clock64().wrapping_sub(start));
                }
                r += dev::block_dim_x();
            }
            if dev::sync_threads_or(failed) {
                return;
            }
            let pair_rows = (local + l.pair_rows) as *const i32;
            let rows = l.rows_per_expert();
            // Weighted sum per token, k ascending, one fused multiply-add per term. Work
            // items are (token, part of its 32-vector chunks), about one per warp, so a few
            // tokens still keep every warp busy; an item looks the token's K rows up once
            // (lane k: three dependent loads), then streams its chunks.
            let num_vecs = p.row_bytes / 16;
            let chunks = num_vecs.div_ceil(WARP_SIZE as u64);
            let parts = (warps as u64).div_ceil(p.num_tokens.max(1) as u64).clamp(1, chunks);
            let per_part = chunks.div_ceil(parts);
            let mut item = gwarp as u64;
            while item < p.num_tokens as u64 * parts {
                let (t, part) = ((item / parts) as u32, item % parts);
                // Lane k: where the token's k-th expert output lies (0: none) and its weight.
                let e = if lane < p.num_topk { expert_of(&p, t, lane) } else { -1 };
                let (row_of_lane, w_of_lane) = if e >= 0 {
                    let owner = e as u32 / num_local;
                    let row = if *pulled.add(owner as usize) != 0 {
                        let at = *pair_rows.add((t * LL_MAX_TOPK + lane) as usize) as u64;
                        base_of(&p, owner, &l) + l.combine_x + ((e as u64 % l.num_local_experts) * rows + at) * p.row_bytes
                    } else {
                        local + l.combine_slot(e as u64, t as u64)
                    };
                    (row, *(p.topk_weights as *const f32).add((t * p.num_topk + lane) as usize))
                } else {
                    (0, 0.0)
                };
                // Two chunks a step: 16 loads in flight per lane before the first add.
                let c_end = ((part + 1) * per_part).min(chunks);
                let mut c = part * per_part;
                while c < c_end {
                    let va = c * WARP_SIZE as u64 + lane as u64;
                    let vb = va + WARP_SIZE as u64;
                    let (in_a, in_b) = (va < num_vecs, c + 1 < c_end && vb < num_vecs);
                    let (mut acc_a, mut acc_b) = ([0f32; 8], [0f32; 8]);
                    // Eight experts at a time: their loads are all issued before the first
                    // fused multiply-add, which still runs in ascending k. (Named values, not
                    // an array: an array here would live in local memory.)
                    let fetch = |k: u32| -> (U4, U4, f32, bool) {
                        let row = shfl_idx_u64(row_of_lane, k & 31) as *const U4;
                        let w = f32::from_bits(dev::shfl_idx_u32(w_of_lane.to_bits(), k & 31));
                        let valid = k < p.num_topk && !row.is_null();
                        let ya = if valid && in_a { dev::ld_v4(row.add(va as usize)) } else { U4::default() };
                        let yb = if valid && in_b { dev::ld_v4(row.add(vb as usize)) } else { U4::default() };
                        (ya, yb, w, valid)
                    };
                    let add = |acc: &mut [f32; 8], y: U4, w: f32| {
                        let words = [y.x, y.y, y.z, y.w];
                        for i in 0..8 {
                            acc[i] = dev::fma_rn_f32(bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16), w, acc[i]);
                        }
                    };
                    macro_rules! add {
                        ($f:expr) => {
                            let (ya, yb, w, valid) = $f;
                            if valid {
                                add(&mut acc_a, ya, w);
                                add(&mut acc_b, yb, w);
                            }
                        };
                    }
                    let mut k0 = 0;
                    while k0 < p.num_topk {
                        let f0 = fetch(k0);
                        let f1 = fetch(k0 + 1);
                        let f2 = fetch(k0 + 2);
                        let f3 = fetch(k0 + 3);
                        let f4 = fetch(k0 + 4);
                        let f5 = fetch(k0 + 5);
                        let f6 = fetch(k0 + 6);
                        let f7 = fetch(k0 + 7);
                        add!(f0);
                        add!(f1);
                        add!(f2);
                        add!(f3);
                        add!(f4);
                        add!(f5);
                        add!(f6);
                        add!(f7);
                        k0 += 8;
                    }
                    let store = |acc: &[f32; 8], v: u64| {
                        let out = pack_bf16x8(acc);
                        let at = (p.combined_x as *mut U4).add((t as u64 * num_vecs + v) as usize);
                        dev::st_v4(at, U4 { x: out[0], y: out[1], z: out[2], w: out[3] });
                    };
                    if in_a {
                        store(&acc_a, va);
                    }
                    if in_b {
                        store(&acc_b, vb);
                    }
                    c += 2;
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
    /// `packed_recv_count` `[R]`, `recv_topk_idx` / `recv_topk_weights` `[R, M, K]`. With
    /// [`LL_FP8_INPUT`] (NCCL EP's `QUANT_FWD`) rows are e4m3 bytes and their `H/128` f32
    /// scales travel behind them in the slot, into `packed_recv_x_scales` `[R, M, H/128]`.
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
        // A slot holds a bf16 row; an fp8 row and its scales take less (H + H/32 bytes).
        let fp8_input = p.fp8 & LL_FP8_INPUT != 0;
        let (in_bytes, groups) = if fp8_input { (p.row_bytes / 2, p.row_bytes / 256) } else { (p.row_bytes, 0) };
        // SAFETY (whole body): as in ll_dispatch, with the rank-major regions of `l`.
        unsafe {
            let local = base_of(&p, me, &l);
            let mut t = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
            while p.phases & LL_SEND != 0 && t < p.num_tokens {
                // 32 destinations at a time, lane d owning destination d0 + d (it goes there
                // when one of the token's experts lives there): the row is read once and
                // stored to each of them.
                let (id, weight) = if lane < k_count {
                    (expert_of(&p, t, lane) as i32, *(p.topk_weights as *const f32).add((t * k_count + lane) as usize))
                } else {
                    (-1, 0.0)
                };
                let owner_of_lane = if id >= 0 { id as u32 / num_local } else { u32::MAX };
                let mut d0 = 0;
                while d0 < p.num_ranks {
                    let dst = d0 + lane;
                    let mut goes = false;
                    for k in 0..k_count {
                        goes |= dev::shfl_idx_u32(owner_of_lane, k) == dst;
                    }
                    let goes = goes && dst < p.num_ranks;
                    let slot = if goes { base_of(&p, dst, &l) + l.rank_major_slot(me as u64, t as u64) } else { 0 };
                    let lanes = dev::ballot(goes);
                    copy_warp_to_many(slot, lanes, p.x + t as u64 * in_bytes, in_bytes);
                    if fp8_input {
                        let scales = p.x_scales + t as u64 * groups * 4;
                        forward_scales(slot + in_bytes, lanes, scales, groups, 4);
                    }
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
            if p.phases & LL_SEND != 0 && dev::last_block(local + l.counters + LL_DISPATCH_COUNTER) {
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
                    copy_warp(p.packed_recv_x + out_row * in_bytes, from, in_bytes, false);
                    let mut g = lane as u64;
                    while g < groups {
                        let to = (p.packed_recv_x_scales + (out_row * groups + g) * 4) as *mut u32;
                        *to = *((from + in_bytes + 4 * g) as *const u32);
                        g += WARP_SIZE as u64;
                    }
                    if lane == 0 {
                        *(p.packed_recv_src_info as *mut i32).add(out_row as usize) = tok as i32;
                    }
                    if lane < k_count {
                        let e = *((from + meta) as *const i32).add(lane as usize);
                        let w = *((from + meta + 4 * LL_MAX_TOPK as u64) as *const f32).add(lane as usize);
                        let local_e = e - lo;
                        let is_local = e >= 0 && local_e >= 0 && (local_e as u32) < num_local;
                        let at = (out_row * k_count as u64 + lane as u64) as usize;
                        let id = if is_local { local_e } else { -1 };
                        if p.recv_idx_bytes == 4 {
                            *(p.recv_topk_idx as *mut i32).add(at) = id;
                        } else {
                            *(p.recv_topk_idx as *mut i64).add(at) = id as i64;
                        }
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

/// Rank-major combine: waiting for a rank's flag.
pub const SITE_LL_RANK_MAJOR_COMBINE: u32 = 24;

kernel! {
    /// LL combine, rank-major (NCCL EP's `RANK_MAJOR`). Send: row `j` of block `s` of `x`
    /// (`[R, M, H]` bf16, one pre-reduced row per token the rank-major dispatch brought here:
    /// `packed_recv_count [R]` rows per block, their tokens in `packed_recv_src_info [R, M]`)
    /// goes to rank `s`'s combine slot `[me][token]`; the grid's last block raises combine
    /// flag `[me] = epoch << 1` at every rank and releases the set, as the expert-major
    /// combine does. Receive: once all `R` flags are up, each token of `topk_idx` sums the
    /// rows of the ranks holding one of its experts, rank ascending, in f32 from 0,
    /// unweighted, rounded once to bf16 into `combined_x` `[T, H]` (zeros without experts).
    pub unsafe fn ll_combine_rank_major(p: LlParams) as LL_COMBINE_RANK_MAJOR {
        let mut p = p;
        // SAFETY: as in ll_dispatch; a combine reuses its dispatch's epoch.
        unsafe { resolve_epoch(&mut p, false) };
        let l = LlLayout::new(p.num_ranks, p.num_experts, p.max_tokens, p.row_bytes);
        let num_local = l.num_local_experts as u32;
        let lane = dev::lane_id();
        let gwarp = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
        let warps = dev::num_warps() * dev::grid_dim_x();
        let me = p.rank;
        // SAFETY (whole body): as in ll_dispatch; `x`, the counts and the source tokens are
        // the host-checked outputs of this set's rank-major dispatch.
        unsafe {
            let local = base_of(&p, me, &l);
            if p.phases & LL_SEND != 0 {
                let mut row = gwarp;
                while row < p.num_ranks * p.max_tokens {
                    let (src, j) = (row / p.max_tokens, row % p.max_tokens);
                    let count = *(p.packed_recv_count as *const i32).add(src as usize);
                    let tok = *(p.packed_recv_src_info as *const i32).add(row as usize);
                    // A token past M would address another slot: not this dispatch's (skip).
                    if (j as i32) < count && tok >= 0 && (tok as u32) < p.max_tokens {
                        let slot = base_of(&p, src, &l) + l.combine_slot(me as u64, tok as u64);
                        copy_warp_n::<8>(slot, p.x + row as u64 * p.row_bytes, p.row_bytes, true);
                    }
                    row += warps;
                }
                if dev::last_block(local + l.counters + LL_COMBINE_COUNTER) {
                    let mut r = dev::thread_idx_x();
                    while r < p.num_ranks {
                        let base = base_of(&p, r, &l);
                        dev::st_release_sys_u64((base + l.combine_flags + me as u64 * 8) as *mut u64, p.epoch << 1);
                        dev::st_release_sys_u64((base + l.released + me as u64 * 8) as *mut u64, p.epoch);
                        r += dev::block_dim_x();
                    }
                }
            }
            if p.phases & LL_RECV == 0 {
                return;
            }
            let mut failed = false;
            let mut r = dev::thread_idx_x();
            while r < p.num_ranks {
                let flag = (local + l.combine_flags + r as u64 * 8) as *const u64;
                if dev::wait_at_least(dev::waiting!(p, r, SITE_LL_RANK_MAJOR_COMBINE), flag, p.epoch << 1, |v| v).is_none() {
                    failed = true;
                    break;
                }
                r += dev::block_dim_x();
            }
            if dev::sync_threads_or(failed) {
                return;
            }
            // Items: (token, 32 vectors of 16 bytes), lane v on vector `32 * chunk + v`.
            let num_vecs = p.row_bytes / 16;
            let chunks = num_vecs.div_ceil(WARP_SIZE as u64);
            let mut item = gwarp as u64;
            while item < p.num_tokens as u64 * chunks {
                let (t, chunk) = ((item / chunks) as u32, item % chunks);
                let v = chunk * WARP_SIZE as u64 + lane as u64;
                // Lane k: the rank of the token's k-th expert (MAX: none).
                let e = if lane < p.num_topk { expert_of(&p, t, lane) } else { -1 };
                let owner = if e >= 0 { e as u32 / num_local } else { u32::MAX };
                let mut acc = [0f32; 8];
                let mut after = 0u32; // ranks below this are summed
                loop {
                    let next = dev::warp_min_u32(if owner >= after { owner } else { u32::MAX });
                    if next == u32::MAX {
                        break;
                    }
                    if v < num_vecs {
                        let row = (local + l.combine_slot(next as u64, t as u64)) as *const U4;
                        let y = dev::ld_v4(row.add(v as usize));
                        add_bf16x8(&mut acc, [y.x, y.y, y.z, y.w]);
                    }
                    after = next + 1;
                }
                if v < num_vecs {
                    let out = pack_bf16x8(&acc);
                    let at = (p.combined_x as *mut U4).add((t as u64 * num_vecs + v) as usize);
                    dev::st_v4(at, U4 { x: out[0], y: out[1], z: out[2], w: out[3] });
                }
                item += warps as u64;
            }
        }
    }
}

kernel! {
    /// The LL dispatch's fp8 scales, column-major per local expert (`[L, H/128, R*M]`, as TMA
    /// loads want them), token-major (`[L, R*M, H/128]`, NCCL EP's layout): grid-stride over
    /// the outputs, reads coalesced along rows.
    pub unsafe fn ll_scales_token_major(p: ScalesParams) as LL_SCALES_TOKEN_MAJOR {
        let total = p.batches as u64 * p.rows as u64 * p.cols as u64;
        let stride = (dev::block_dim_x() * dev::grid_dim_x()) as u64;
        let mut i = (dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x()) as u64;
        let (rows, cols) = (p.rows as u64, p.cols as u64);
        while i < total {
            // `i` walks the source in order: batch, column, row.
            let (b, rest) = (i / (rows * cols), i % (rows * cols));
            let (c, r) = (rest / rows, rest % rows);
            // SAFETY: both arrays hold batches * rows * cols f32, `counts` batches i32
            // (host-checked).
            unsafe {
                if p.counts == 0 || (r as i64) < *(p.counts as *const i32).add(b as usize) as i64 {
                    *(p.dst as *mut f32).add((b * rows * cols + r * cols + c) as usize) =
                        *(p.src as *const f32).add(i as usize);
                }
            }
            i += stride;
        }
    }
}

kernel! {
    /// See [`CountedRowsParams`]. A warp per row (grid-stride over batches * rows).
    pub unsafe fn ll_copy_counted_rows(p: CountedRowsParams) as LL_COPY_COUNTED_ROWS {
        let warps = (dev::num_warps() * dev::grid_dim_x()) as u64;
        let mut i = (dev::block_idx_x() * dev::num_warps() + dev::warp_id()) as u64;
        let total = p.batches as u64 * p.rows as u64;
        while i < total {
            let (b, r) = (i / p.rows as u64, i % p.rows as u64);
            // SAFETY: both regions hold batches * rows rows of row_bytes, `counts` batches i32
            // (host-checked); the branch is warp-uniform (one row per warp).
            unsafe {
                if (r as i64) < *(p.counts as *const i32).add(b as usize) as i64 {
                    copy_warp(p.dst + i * p.row_bytes, p.src + i * p.row_bytes, p.row_bytes, true);
                }
            }
            i += warps;
        }
    }
}
