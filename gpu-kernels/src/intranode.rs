//! HT (high-throughput) dispatch and combine inside one NVLink domain.
//!
//! # Protocol
//! `ht_notify` (one block) exchanges counts behind two barriers; every rank then knows the
//! output row of every (source rank, channel) pair: `channel_prefix_matrix[src][c]`.
//! `ht_dispatch` / `ht_combine` run `2 * C / W` blocks of `W * R` warps: block `2b` sends
//! channels `b * W .. (b + 1) * W`, block `2b + 1` receives them, and warp `g * R + d`
//! serves peer `d` in channel `b * W + g`. Channel `c` owns a contiguous token range of every
//! rank ([`HtLayout::channel_range`]). More channels per block (`W`) give each SM more warps,
//! hence more bytes in flight, without changing the one-writer/one-reader rings.
//!
//! Data moves through rings in the **receiver's** symmetric buffer, one per (source,
//! channel): "senders own tails, receivers own heads", both kept on the receiver. Counters
//! are cumulative over calls (never reset), so a ring's slot is `position % num_slots` and a
//! stale value can't pass for a fresh one. The sender copies a token into a slot with 16-byte
//! stores, then `bar.warp.sync` + `fence.acq_rel.sys` + `st.release.sys` of `tail`; it waits
//! for space by acquiring `head`. The receiver acquires `tail`, copies the slots out, then
//! releases `head`. Calls don't overlap a peer's previous call on the same rings: the notify
//! entry barrier waits until every rank has finished its earlier kernels.
//!
//! **One pass** (dispatch only): a receiver whose outputs lie in its heap (the host's
//! `SymHeap`, mapped by every peer) opens its mailbox ([`HtMailbox`]) in `MODE_DIRECT`:
//! heap offsets of its outputs and its `channel_prefix_matrix`, the call's epoch released
//! last. A sender warp reads the mailbox at its first token for that receiver (so the
//! receiver still waits for it) and stores token `i` of channel `c` straight into output
//! row `cpm[me][c] + i` — no ring, no second copy. The channel is split in two halves: the
//! sender block's warp sends the first, the receiver block's warp (idle otherwise) the
//! second; each adds its count to the ring's `tail` after its stores, and the receiver waits
//! for `tail = head + n` and moves `head` along, so a later ring call starts even. The
//! receiver block's warp learns the mode from the sender block's warp (a note in its own
//! buffer), never from the mailbox unless the receiver waits for it: through the ring, the
//! receiver may have had everything from the sender block's warp already and moved on. A
//! receiver whose outputs are elsewhere (`MODE_RING`) gets the whole channel through the
//! ring from the sender block's warp, in the same call as direct peers.
//!
//! Dispatch slots: `[x: hidden_bytes][scales: 4*S][src_idx: 4][topk_idx: 4*K][weights: 4*K]`.
//! Combine slots: `[x: 2*hidden bf16][weights: 4*K]`. Combine sums each token's copies in
//! f32 in ascending rank order after the bias (`b0 + b1`), then rounds to bf16 once — the
//! order of `reference::ht_combine`, so results are bit-exact.
//!
//! Wait sites ([`crate::abi::DeviceError::site`]): see the `SITE_*` constants.
use crate::abi::{
    DeviceError, ErrorSlot, HT_COMBINE_BLOCKS, HT_DISPATCH_BLOCKS, HT_EPOCH_COMBINE, HT_EPOCH_DISPATCH,
    HT_EPOCH_NOTIFY, HT_MAX_RANKS, HtCombineParams, HtDispatchParams, HtLayout, HtMailbox, HtNotifyParams, WARP_SIZE,
    error_code,
};
use crate::copy::{copy_warp, shfl_idx_u64};
use crate::dev::{self, U4};
use crate::num::{bf16_to_f32, f32_to_bf16};

/// Notify: waiting for peers to enter the call.
pub const SITE_NOTIFY_ENTRY: u32 = 10;
/// Notify: waiting for peers' counts.
pub const SITE_NOTIFY_COUNTS: u32 = 11;
/// Dispatch sender: waiting for ring space.
pub const SITE_DISPATCH_SEND: u32 = 12;
/// Dispatch receiver: waiting for tokens.
pub const SITE_DISPATCH_RECV: u32 = 13;
/// Combine sender: waiting for ring space.
pub const SITE_COMBINE_SEND: u32 = 14;
/// Combine receiver: waiting for rows.
pub const SITE_COMBINE_RECV: u32 = 15;
/// Dispatch sender: waiting for a receiver's mailbox (one-pass path).
pub const SITE_DISPATCH_MAILBOX: u32 = 16;
/// Dispatch receiver: waiting for senders' direct stores (one-pass path).
pub const SITE_DISPATCH_DIRECT: u32 = 17;
/// Combine: waiting for a rank's combine mailbox.
pub const SITE_COMBINE_MAILBOX: u32 = 18;
/// Combine: waiting for every rank to finish (end-of-combine flags).
pub const SITE_COMBINE_DONE: u32 = 19;

/// Flush a sender's tail after this many tokens even when the ring has room.
const PUBLISH_EVERY: u64 = 8;

/// This warp's (channel, peer) in a dispatch/combine block of `W * R` warps (module docs),
/// with `W`, the channels per block.
#[inline(always)]
fn channel_and_peer(num_ranks: u32) -> (u32, u32, u32) {
    let w_per = dev::num_warps() / num_ranks;
    let warp = dev::warp_id();
    ((dev::block_idx_x() / 2) * w_per + warp / num_ranks, warp % num_ranks, w_per)
}

/// Tokens each combine-receiving warp sums per round (module docs): 8 tokens per ring per
/// round when `R` is small, within half a ring (`num_slots >= 2 * R` is checked on the host).
#[inline(always)]
fn combine_tokens_per_warp(num_ranks: u32, num_slots: u32) -> u32 {
    (8u32.div_ceil(num_ranks.max(1))).min(num_slots / (2 * num_ranks.max(1))).max(1)
}

#[inline(always)]
unsafe fn peer_base(table: u64, r: u32) -> u64 {
    // SAFETY: the caller passes the device table of `R` symmetric buffer addresses.
    unsafe { *(table as *const u64).add(r as usize) }
}

/// The call's epoch: one past the last call's, on this rank's epoch word `which`
/// ([`HtLayout::epochs`], `local` = this rank's buffer). Every thread reads it at kernel
/// entry, before the kernel stores it back.
#[inline(always)]
unsafe fn call_epoch(local: u64, l: &HtLayout, which: u64) -> u64 {
    // SAFETY: the word lies in this rank's buffer, written by earlier kernels of the stream.
    unsafe { dev::ld_relaxed_sys_u64((local + l.epochs + which) as *const u64) + 1 }
}

/// End of a dispatch/combine, in every thread of every block whatever happened before: the
/// grid's last block (counted on `counter`) stores `epoch` on word `which`.
#[inline(always)]
unsafe fn end_call(local: u64, l: &HtLayout, which: u64, counter: u64, epoch: u64) {
    // SAFETY: word and counter lie in this rank's buffer (HtLayout::epochs).
    unsafe {
        if dev::last_block(local + l.epochs + counter) && dev::thread_idx_x() == 0 {
            dev::st_relaxed_sys_u64((local + l.epochs + which) as *mut u64, epoch);
        }
    }
}

/// Warp-cooperative [`dev::wait_at_least`]: lane 0 waits, every lane gets the result. Lane 0's
/// acquire covers every lane's accesses after it (a shuffle orders no memory; the warp
/// barrier does).
#[inline(always)]
unsafe fn warp_wait_at_least(w: dev::Waiting, at: *const u64, expected: u64, key: impl Fn(u64) -> u64) -> Option<u64> {
    let (mut ok, mut seen) = (1u32, 0u64);
    if dev::lane_id() == 0 {
        // SAFETY: forwarded.
        match unsafe { dev::wait_at_least(w, at, expected, key) } {
            Some(v) => seen = v,
            None => ok = 0,
        }
    }
    let ok = dev::shfl_idx_u32(ok, 0);
    let seen = shfl_idx_u64(seen, 0);
    dev::sync_warp(0xffff_ffff);
    (ok == 1).then_some(seen)
}

/// Who takes part in a [`flag_barrier`].
#[derive(Clone, Copy)]
struct Ranks {
    peer_bases: u64,
    error: u64,
    rank: u32,
    num_ranks: u32,
    epoch: u64,
    timeout_ns: u64,
}

/// The [`Ranks`] of a kernel's parameters (every HT parameter struct has these fields).
macro_rules! ranks_of {
    ($p:expr) => {
        Ranks {
            peer_bases: $p.peer_bases,
            error: $p.error,
            rank: $p.rank,
            num_ranks: $p.num_ranks,
            epoch: $p.epoch,
            timeout_ns: $p.timeout_ns,
        }
    };
}

/// Barrier among the `R` ranks: thread `t < R` raises `epoch` on the flag this rank owns in
/// peer `t`'s buffer and waits for peer `t`'s flag in this one; `flag_of(w)` is the offset
/// of the flag rank `w` writes. True (in every thread) when nobody timed out.
#[inline(always)]
unsafe fn flag_barrier(s: Ranks, site: u32, flag_of: impl Fn(u64) -> u64) -> bool {
    let t = dev::thread_idx_x();
    let mut failed = false;
    if t < s.num_ranks {
        // SAFETY: flags lie in the symmetric buffers; the table has R entries.
        unsafe {
            let theirs = peer_base(s.peer_bases, t) + flag_of(s.rank as u64);
            dev::fence_acq_rel_sys();
            dev::st_release_sys_u64(theirs as *mut u64, s.epoch);
            let mine = (peer_base(s.peer_bases, s.rank) + flag_of(t as u64)) as *const u64;
            failed = dev::wait_at_least(dev::waiting!(s, t, site), mine, s.epoch, |v| v).is_none();
        }
    }
    !dev::sync_threads_or(failed)
}

/// Barrier of `ht_notify` through flag `which` (0 entry, 1 counts).
#[inline(always)]
unsafe fn barrier(p: &HtNotifyParams, l: &HtLayout, which: u64, site: u32) -> bool {
    let s = ranks_of!(p);
    // SAFETY: the flags of layout `l`.
    unsafe { flag_barrier(s, site, |w| l.flag(which, w)) }
}

kernel! {
    /// Count exchange before an HT dispatch (see the module docs). One block, >= `R` threads,
    /// `C * R <= 1024`.
    pub unsafe fn ht_notify(p: HtNotifyParams) as HT_NOTIFY = "_ZN6moe_ep9intranode6notifyEv", {
        let t = dev::thread_idx_x();
        let bd = dev::block_dim_x();
        let (r, c_count) = (p.num_ranks, p.num_channels);
        let num_local = p.num_experts.checked_div(r).unwrap_or(0);
        let l = HtLayout::new(r, c_count, 0, num_local, 0, 0);
        let bins: *mut u32 = dev::static_smem();
        let mut p = p;
        // SAFETY (whole body): regions come from `l`, the layout the host sized the buffers
        // with; inputs hold the documented shapes.
        unsafe {
            let local = peer_base(p.peer_bases, p.rank);
            p.epoch = call_epoch(local, &l, HT_EPOCH_NOTIFY);
            if !barrier(&p, &l, 0, SITE_NOTIFY_ENTRY) {
                return;
            }
            // Per-channel, per-destination token counts.
            let mut i = t;
            while i < c_count * r {
                *bins.add(i as usize) = 0;
                i += bd;
            }
            dev::sync_threads();
            for c in 0..c_count {
                let (begin, end) = l.channel_range(p.num_tokens as u64, c as u64);
                let mut tok = begin + t as u64;
                while tok < end {
                    for d in 0..r {
                        if *(p.is_token_in_rank as *const u8).add((tok * r as u64 + d as u64) as usize) != 0 {
                            dev::atom_add_shared_u32(bins.add((c * r + d) as usize), 1);
                        }
                    }
                    tok += bd as u64;
                }
            }
            dev::sync_threads();
            // Thread d < R writes everything destination d needs.
            if t < r {
                let dst = peer_base(p.peer_bases, t);
                let me = p.rank as u64;
                for j in 0..r {
                    let v = *(p.num_tokens_per_rank as *const i32).add(j as usize);
                    *((dst + l.count_matrix) as *mut i32).add((me * r as u64 + j as u64) as usize) = v;
                }
                for e in 0..num_local {
                    let v = *(p.num_tokens_per_expert as *const i32).add((t * num_local + e) as usize);
                    *((dst + l.expert_counts) as *mut i32).add((me * num_local as u64 + e as u64) as usize) = v;
                }
                for c in 0..c_count {
                    let v = *bins.add((c * r + t) as usize) as i32;
                    *((dst + l.channel_counts) as *mut i32).add((me * c_count as u64 + c as u64) as usize) = v;
                }
            }
            dev::sync_threads();
            if !barrier(&p, &l, 1, SITE_NOTIFY_COUNTS) {
                return;
            }
            if t == 0 {
                // Every thread read the word at entry, before the barriers.
                dev::st_relaxed_sys_u64((local + l.epochs + HT_EPOCH_NOTIFY) as *mut u64, p.epoch);
            }
            let counts = (local + l.count_matrix) as *const i32;
            if t == 0 {
                let rpm = p.rank_prefix_matrix as *mut i32;
                for j in 0..r {
                    let mut acc = 0i32;
                    for i in 0..r {
                        acc += *counts.add((i * r + j) as usize);
                        *rpm.add((i * r + j) as usize) = acc;
                    }
                }
                let chan = (local + l.channel_counts) as *const i32;
                let cpm = p.channel_prefix_matrix as *mut i32;
                let mut row = 0i32;
                for src in 0..r {
                    for c in 0..c_count {
                        *cpm.add((src * (c_count + 1) + c) as usize) = row;
                        row += *chan.add((src * c_count + c) as usize);
                    }
                    *cpm.add((src * (c_count + 1) + c_count) as usize) = row;
                }
                *(p.num_recv_tokens as *mut i32) = row;
                if p.host_counts != 0 {
                    dev::st_release_sys_u32(p.host_counts as *mut u32, row as u32);
                }
            }
            let experts = (local + l.expert_counts) as *const i32;
            let align = p.expert_alignment.max(1) as i32;
            let mut e = t;
            while e < num_local {
                let mut n = 0i32;
                for src in 0..r {
                    n += *experts.add((src * num_local + e) as usize);
                }
                n = (n + align - 1) / align * align;
                *(p.num_recv_tokens_per_expert as *mut i32).add(e as usize) = n;
                if p.host_counts != 0 {
                    dev::st_release_sys_u32((p.host_counts as *mut u32).add(1 + e as usize), n as u32);
                }
                e += bd;
            }
        }
    }
}

/// The sending side of one ring, driven by one warp. It touches the peer's buffer only once
/// it has something to send: a peer that expects nothing from us may already have finished
/// (and, at teardown, freed its buffer).
struct Sender {
    tail: *mut u64,
    head: *const u64,
    slots: u64,
    slot_bytes: u64,
    num_slots: u64,
    /// Whether `pos`/`published`/`head_seen` were read from the ring yet.
    started: bool,
    /// Next position to fill.
    pos: u64,
    /// Last position published to `tail`.
    published: u64,
    /// Last `head` seen.
    head_seen: u64,
}

impl Sender {
    #[inline(always)]
    fn new(tail: u64, slots: u64, slot_bytes: u64, num_slots: u64) -> Sender {
        let head = (tail + moe_ep_abi::FLAG_STRIDE_BYTES) as *const u64;
        Sender {
            tail: tail as *mut u64,
            head,
            slots,
            slot_bytes,
            num_slots,
            started: false,
            pos: 0,
            published: 0,
            head_seen: 0,
        }
    }

    /// Warp-cooperative: publishes the filled slots.
    #[inline(always)]
    unsafe fn publish(&mut self) {
        if !self.started {
            return;
        }
        dev::sync_warp(0xffff_ffff);
        if dev::lane_id() == 0 && self.published != self.pos {
            dev::fence_acq_rel_sys();
            // SAFETY: the ring's tail line.
            unsafe { dev::st_release_sys_u64(self.tail, self.pos) };
        }
        self.published = self.pos;
    }

    /// Warp-cooperative: address of the next free slot, waiting for the receiver when the
    /// ring is full. `None` after a timeout (reported at `site`, waiting for `peer`) or
    /// another thread's error.
    #[inline(always)]
    unsafe fn reserve(&mut self, p: dev::Waiting) -> Option<u64> {
        if !self.started {
            // The ring continues where our last call left it (we are its only writer).
            // SAFETY: the ring's tail line in the peer's mapped buffer.
            let pos = unsafe { dev::ld_acquire_sys_u64(self.tail) };
            (self.pos, self.published, self.head_seen, self.started) = (pos, pos, pos, true);
        }
        if self.pos - self.head_seen >= self.num_slots {
            // SAFETY: forwarded.
            unsafe { self.publish() };
            // Room for slot `pos` once `head > pos - num_slots`; lane 0's acquire of `head`
            // covers every lane's stores into the freed slots.
            // SAFETY: the ring's head line.
            self.head_seen = unsafe { warp_wait_at_least(p, self.head, self.pos + 1 - self.num_slots, |v| v) }?;
        }
        let slot = self.slots + (self.pos % self.num_slots) * self.slot_bytes;
        self.pos += 1;
        Some(slot)
    }

    /// After a slot is written: publish every few tokens.
    #[inline(always)]
    unsafe fn written(&mut self) {
        if self.pos - self.published >= PUBLISH_EVERY {
            // SAFETY: forwarded.
            unsafe { self.publish() };
        }
    }
}

/// Warp-cooperative: waits until `tail > pos`; the tail seen, or `None`.
#[inline(always)]
unsafe fn wait_tail(w: dev::Waiting, tail: *const u64, pos: u64) -> Option<u64> {
    // SAFETY: the ring's tail line in the local buffer.
    unsafe { warp_wait_at_least(w, tail, pos + 1, |v| v) }
}

/// A receiver's mailbox as a sender reads it ([`HtMailbox`]).
#[derive(Clone, Copy)]
struct Mailbox {
    mode: u64,
    /// The receiver's heap base as this rank addresses it.
    heap: u64,
    /// Offsets of `recv_x`, `recv_x_scales`, `recv_src_idx`, `recv_topk_idx`,
    /// `recv_topk_weights` in that heap.
    out: [u64; 5],
    /// The receiver's first output row for this rank's tokens of the channel.
    row0: u64,
}

/// Warp-cooperative: waits until `dst` has opened this call's mailbox, then reads it. `None`
/// after a timeout or another thread's error.
#[inline(always)]
unsafe fn read_mailbox(p: &HtDispatchParams, l: &HtLayout, dst: u32, channel: u32) -> Option<Mailbox> {
    // SAFETY (whole body): the mailbox region of `dst`'s mapped buffer, the rank's error slot.
    unsafe {
        let at = peer_base(p.peer_bases, dst) + l.mailbox;
        let fields = at as *const u64;
        let epoch = fields.add(HtMailbox::EPOCH as usize);
        warp_wait_at_least(dev::waiting!(p, dst, SITE_DISPATCH_MAILBOX), epoch, p.epoch, |v| v)?;
        // `.sys` loads: this SM may hold an earlier call's mailbox in L1.
        let field = |i: u64| dev::ld_relaxed_sys_u64(fields.add(i as usize));
        let cpm = (at + HtMailbox::BYTES) as *const u32;
        let row0 = dev::ld_relaxed_sys_u32(cpm.add((p.rank * (p.num_channels + 1) + channel) as usize)) as u64;
        Some(Mailbox {
            mode: field(HtMailbox::MODE),
            heap: if p.heap_bases != 0 { peer_base(p.heap_bases, dst) } else { 0 },
            out: [
                field(HtMailbox::RECV_X),
                field(HtMailbox::RECV_X_SCALES),
                field(HtMailbox::RECV_SRC_IDX),
                field(HtMailbox::RECV_TOPK_IDX),
                field(HtMailbox::RECV_TOPK_WEIGHTS),
            ],
            row0,
        })
    }
}

/// Warp-cooperative: the mode of `dst`'s mailbox in this call as the sender block's warp
/// noted it (`epoch << 2 | mode` at `note`). `None` after a timeout or another error.
#[inline(always)]
unsafe fn wait_note(p: &HtDispatchParams, note: *const u64, dst: u32) -> Option<u64> {
    // SAFETY: `note` lies in this rank's buffer.
    let seen = unsafe { warp_wait_at_least(dev::waiting!(p, dst, SITE_DISPATCH_MAILBOX), note, p.epoch, |v| v >> 2) };
    seen.map(|v| v & 3)
}

/// Warp-cooperative (one warp of the rank): opens this call's mailbox with `mode`.
#[inline(always)]
unsafe fn open_mailbox(p: &HtDispatchParams, l: &HtLayout, mode: u64) {
    // SAFETY (whole body): this rank's mailbox region; `channel_prefix_matrix` holds
    // `R * (C + 1)` i32 written by `ht_notify` (an earlier kernel).
    unsafe {
        let at = peer_base(p.peer_bases, p.rank) + l.mailbox;
        let fields = at as *mut u64;
        let lane = dev::lane_id();
        if lane == 0 {
            let heap = if p.heap_bases != 0 { peer_base(p.heap_bases, p.rank) } else { 0 };
            let offset =
                |ptr: u64| if ptr == 0 || mode != HtMailbox::MODE_DIRECT { HtMailbox::NONE } else { ptr - heap };
            dev::st_relaxed_sys_u64(fields.add(HtMailbox::MODE as usize), mode);
            let outs = [p.recv_x, p.recv_x_scales, p.recv_src_idx, p.recv_topk_idx, p.recv_topk_weights];
            for (i, ptr) in outs.into_iter().enumerate() {
                dev::st_relaxed_sys_u64(fields.add(HtMailbox::RECV_X as usize + i), offset(ptr));
            }
        }
        let cpm = (at + HtMailbox::BYTES) as *mut u32;
        let mut i = lane;
        while i < p.num_ranks * (p.num_channels + 1) {
            dev::st_relaxed_sys_u32(cpm.add(i as usize), *(p.channel_prefix_matrix as *const u32).add(i as usize));
            i += WARP_SIZE;
        }
        dev::sync_warp(0xffff_ffff);
        if lane == 0 {
            dev::fence_acq_rel_sys();
            dev::st_release_sys_u64(fields.add(HtMailbox::EPOCH as usize), p.epoch);
        }
    }
}

/// Warp-cooperative: token `t` straight into output row `row` of `dst` (the one-pass path).
#[inline(always)]
unsafe fn store_direct(p: &HtDispatchParams, m: &Mailbox, dst: u32, t: u64, row: u64) {
    let lane = dev::lane_id();
    let (k_count, num_scales) = (p.num_topk, p.num_scales as u64);
    // SAFETY (whole body): the receiver sized its outputs for every row it expects (its
    // mailbox would say REFUSE otherwise); inputs as in `ht_dispatch`.
    unsafe {
        copy_warp(m.heap + m.out[0] + row * p.hidden_bytes, p.x + t * p.hidden_bytes, p.hidden_bytes, true);
        if num_scales != 0 && m.out[1] != HtMailbox::NONE {
            let mut s = lane as u64;
            while s < num_scales {
                *((m.heap + m.out[1]) as *mut f32).add((row * num_scales + s) as usize) =
                    *(p.x_scales as *const f32).add((t * num_scales + s) as usize);
                s += WARP_SIZE as u64;
            }
        }
        if lane == 0 && m.out[2] != HtMailbox::NONE {
            *((m.heap + m.out[2]) as *mut i32).add(row as usize) = t as i32;
        }
        if lane < k_count && m.out[3] != HtMailbox::NONE {
            let at = (t * k_count as u64 + lane as u64) as usize;
            let e = if p.idx_bytes == 4 {
                *(p.topk_idx as *const i32).add(at)
            } else {
                *(p.topk_idx as *const i64).add(at) as i32
            };
            let local_e = e - (dst * p.num_local_experts) as i32;
            let is_local = e >= 0 && local_e >= 0 && (local_e as u32) < p.num_local_experts;
            let out = (row * k_count as u64 + lane as u64) as usize;
            *((m.heap + m.out[3]) as *mut i64).add(out) = if is_local { local_e as i64 } else { -1 };
            *((m.heap + m.out[4]) as *mut f32).add(out) =
                if is_local { *(p.topk_weights as *const f32).add(at) } else { 0.0 };
        }
    }
}

/// Warp-cooperative: sends this warp's share of channel `channel`'s tokens to `dst` and
/// writes their `send_head` entries. `half` 0 (the sender block's warp) walks the channel
/// from its start; `half` 1 (the receiver block's warp) walks its second half. At its first
/// token for `dst` a warp reads `dst`'s mailbox: through the ring, half 0 sends everything;
/// with direct stores, each half sends its own and adds its count to the ring's `tail`.
/// False after a timeout or another thread's error.
#[inline(always)]
unsafe fn dispatch_send(p: &HtDispatchParams, l: &HtLayout, dst: u32, channel: u32, half: u32) -> bool {
    let lane = dev::lane_id();
    let r = p.num_ranks as u64;
    let k_count = p.num_topk;
    let meta = p.hidden_bytes + 4 * p.num_scales as u64; // offset of src_idx in a slot
    let (begin, end) = l.channel_range(p.num_tokens as u64, channel as u64);
    let mid = begin + (end - begin) / 2;
    // SAFETY (whole body): as in `ht_dispatch`.
    unsafe {
        let in_rank = |tok: u64| *(p.is_token_in_rank as *const u8).add((tok * r + dst as u64) as usize) != 0;
        let base = peer_base(p.peer_bases, dst);
        let me = p.rank as u64;
        let tail = base + l.ring_tail(l.dispatch_ctrl, me, channel as u64);
        let mut ring = Sender::new(
            tail,
            base + l.ring_slot(l.dispatch_slots, p.slot_bytes, me, channel as u64, 0),
            p.slot_bytes,
            p.num_slots as u64,
        );
        let mut t0 = begin;
        let mut sent = 0u32;
        if half == 1 {
            // The second half's indices continue the first half's.
            while t0 < mid {
                let tok = t0 + lane as u64;
                sent += dev::ballot(tok < mid && in_rank(tok)).count_ones();
                t0 += WARP_SIZE as u64;
            }
            t0 = mid;
        }
        let first = sent;
        let mut mb: Option<Mailbox> = None;
        let mut limit = end;
        let note = (peer_base(p.peer_bases, p.rank) + l.mode_notes + (dst as u64 * l.num_channels + channel as u64) * 8)
            as *mut u64;
        while t0 < limit {
            let tok = t0 + lane as u64;
            let mut goes = tok < limit && in_rank(tok);
            if mb.is_none() && dev::ballot(goes) != 0 {
                if half == 1 {
                    // `dst` may already have all its tokens through the ring (from the sender
                    // block's warp) and be in a later call: learn its mode from that warp,
                    // which read the mailbox while `dst` still waited for it.
                    let Some(mode) = wait_note(p, note, dst) else { return false };
                    if mode != HtMailbox::MODE_DIRECT {
                        return true; // the sender block's warp sends all of them
                    }
                }
                // Here `dst` waits for this token: its mailbox is this call's.
                let Some(m) = read_mailbox(p, l, dst, channel) else { return false };
                if half == 0 {
                    if lane == 0 {
                        dev::st_release_sys_u64(note, p.epoch << 2 | m.mode);
                        if p.remote_row0 != 0 {
                            *(p.remote_row0 as *mut i32).add((dst * p.num_channels + channel) as usize) = m.row0 as i32;
                        }
                    }
                    if m.mode == HtMailbox::MODE_DIRECT {
                        limit = mid; // the rest is the receiver block's warp's
                        goes &= tok < mid;
                    }
                }
                mb = Some(m);
            }
            let mask = dev::ballot(goes);
            if tok < limit {
                let rank_in_mask = (mask & ((1u32 << lane) - 1)).count_ones();
                *(p.send_head as *mut i32).add((tok * r + dst as u64) as usize) =
                    if goes { (sent + rank_in_mask) as i32 } else { -1 };
            }
            if let Some(m) = mb {
                let mut bits = mask;
                while bits != 0 {
                    let j = bits.trailing_zeros();
                    bits &= bits - 1;
                    let t = t0 + j as u64;
                    if m.mode == HtMailbox::MODE_DIRECT {
                        let row = m.row0 + (sent + (mask & ((1u32 << j) - 1)).count_ones()) as u64;
                        store_direct(p, &m, dst, t, row);
                        continue;
                    }
                    if m.mode != HtMailbox::MODE_RING {
                        continue; // refused: the receiver reported it
                    }
                    let waiting = dev::waiting!(p, dst, SITE_DISPATCH_SEND);
                    let Some(slot) = ring.reserve(waiting) else { return false };
                    copy_warp(slot, p.x + t * p.hidden_bytes, p.hidden_bytes, true);
                    let mut s = lane;
                    while s < p.num_scales {
                        *((slot + p.hidden_bytes) as *mut f32).add(s as usize) =
                            *(p.x_scales as *const f32).add((t * p.num_scales as u64 + s as u64) as usize);
                        s += WARP_SIZE;
                    }
                    if lane == 0 {
                        *((slot + meta) as *mut i32) = t as i32;
                    }
                    if lane < k_count {
                        let at = (t * k_count as u64 + lane as u64) as usize;
                        let e = if p.idx_bytes == 4 {
                            *(p.topk_idx as *const i32).add(at)
                        } else {
                            *(p.topk_idx as *const i64).add(at) as i32
                        };
                        *((slot + meta + 4) as *mut i32).add(lane as usize) = e;
                        *((slot + meta + 4 + 4 * k_count as u64) as *mut f32).add(lane as usize) =
                            *(p.topk_weights as *const f32).add(at);
                    }
                    ring.written();
                }
            }
            sent += mask.count_ones();
            t0 += WARP_SIZE as u64;
        }
        match mb {
            Some(m) if m.mode == HtMailbox::MODE_RING => ring.publish(),
            Some(m) if m.mode == HtMailbox::MODE_DIRECT && sent > first => {
                // Every lane's stores, then the count: the receiver waits for `tail`.
                dev::sync_warp(0xffff_ffff);
                if lane == 0 {
                    dev::fence_acq_rel_sys();
                    dev::red_add_release_sys_u64(tail as *mut u64, (sent - first) as u64);
                }
            }
            _ => {}
        }
        true
    }
}

kernel! {
    /// HT dispatch (see the module docs).
    pub unsafe fn ht_dispatch(p: HtDispatchParams) as HT_DISPATCH = "_ZN6moe_ep9intranode8dispatchEv", {
        let l = HtLayout::new(p.num_ranks, p.num_channels, p.num_slots, p.num_local_experts, p.slot_bytes, 0);
        let mut p = p;
        // SAFETY: the host sized every buffer for this layout and these parameters.
        unsafe {
            let local = peer_base(p.peer_bases, p.rank);
            p.epoch = call_epoch(local, &l, HT_EPOCH_DISPATCH);
            dispatch(&p, &l);
            end_call(local, &l, HT_EPOCH_DISPATCH, HT_DISPATCH_BLOCKS, p.epoch);
        }
    }
}

/// The body of `ht_dispatch`: its threads may leave at different points (errors).
#[inline(always)]
unsafe fn dispatch(p: &HtDispatchParams, l: &HtLayout) {
    let lane = dev::lane_id();
    let r = p.num_ranks;
    let (channel, peer, w_per) = channel_and_peer(r);
    let is_sender = dev::block_idx_x() & 1 == 0;
    let k_count = p.num_topk;
    let meta = p.hidden_bytes + 4 * p.num_scales as u64; // offset of src_idx in a slot
    // SAFETY (whole body): buffers and regions as documented in HtDispatchParams and
    // HtLayout; the host checked every size before the launch.
    unsafe {
        if is_sender {
            if !dispatch_send(p, l, peer, channel, 0) {
                return;
            }
        } else {
            // A padded output must hold every row: refuse rather than write past it.
            let num_recv = *(p.num_recv_tokens as *const i32) as u32;
            let overflow = p.num_worst_tokens != 0 && num_recv > p.num_worst_tokens;
            if dev::block_idx_x() == 1 && dev::warp_id() == 0 {
                let mode = if overflow {
                    HtMailbox::MODE_REFUSE
                } else if p.direct != 0 {
                    HtMailbox::MODE_DIRECT
                } else {
                    HtMailbox::MODE_RING
                };
                open_mailbox(p, l, mode);
            }
            if overflow {
                if dev::thread_idx_x() == 0 {
                    let rec = DeviceError {
                        code: error_code::OVERFLOW,
                        rank: p.rank,
                        peer: u32::MAX,
                        block: dev::block_idx_x(),
                        site: SITE_DISPATCH_RECV,
                        expected: p.num_worst_tokens as u64,
                        observed: num_recv as u64,
                        reserved: 0,
                    };
                    dev::report_error(p.error as *mut ErrorSlot, rec);
                }
                return;
            }
            let src = peer;
            let local = peer_base(p.peer_bases, p.rank);
            let tail = (local + l.ring_tail(l.dispatch_ctrl, src as u64, channel as u64)) as *const u64;
            let head = (tail as u64 + moe_ep_abi::FLAG_STRIDE_BYTES) as *mut u64;
            let slots = local + l.ring_slot(l.dispatch_slots, p.slot_bytes, src as u64, channel as u64, 0);
            let cpm = p.channel_prefix_matrix as *const i32;
            let row0 = *cpm.add((src * (p.num_channels + 1) + channel) as usize) as u64;
            let n = *cpm.add((src * (p.num_channels + 1) + channel + 1) as usize) as u64 - row0;
            let base = dev::ld_relaxed_sys_u64(head);
            let lo_expert = (p.rank * p.num_local_experts) as i32;
            let mut got = 0u64;
            while p.direct == 0 && got < n {
                let Some(seen) = wait_tail(dev::waiting!(p, src, SITE_DISPATCH_RECV), tail, base + got) else { return };
                let upto = (seen - base).min(n);
                while got < upto {
                    let slot = slots + ((base + got) % p.num_slots as u64) * p.slot_bytes;
                    let row = row0 + got;
                    copy_warp(p.recv_x + row * p.hidden_bytes, slot, p.hidden_bytes, false);
                    let mut s = lane;
                    while s < p.num_scales {
                        *(p.recv_x_scales as *mut f32).add((row * p.num_scales as u64 + s as u64) as usize) =
                            *((slot + p.hidden_bytes) as *const f32).add(s as usize);
                        s += WARP_SIZE;
                    }
                    if lane == 0 && p.recv_src_idx != 0 {
                        *(p.recv_src_idx as *mut i32).add(row as usize) = *((slot + meta) as *const i32);
                    }
                    if lane < k_count {
                        let e = *((slot + meta + 4) as *const i32).add(lane as usize);
                        let w = *((slot + meta + 4 + 4 * k_count as u64) as *const f32).add(lane as usize);
                        let local_e = e - lo_expert;
                        let is_local = e >= 0 && local_e >= 0 && (local_e as u32) < p.num_local_experts;
                        let at = (row * k_count as u64 + lane as u64) as usize;
                        *(p.recv_topk_idx as *mut i64).add(at) = if is_local { local_e as i64 } else { -1 };
                        *(p.recv_topk_weights as *mut f32).add(at) = if is_local { w } else { 0.0 };
                    }
                    got += 1;
                }
                dev::sync_warp(0xffff_ffff);
                if lane == 0 {
                    dev::st_release_sys_u64(head, base + got);
                }
            }
            // The second half of this warp's channel to `peer`, when it takes direct stores.
            if !dispatch_send(p, l, peer, channel, 1) {
                return;
            }
            if p.direct != 0 && n > 0 {
                // Both halves of `src`'s senders add their counts to the ring's tail once
                // their stores are out; the head follows, so a later ring call starts even.
                if wait_tail(dev::waiting!(p, src, SITE_DISPATCH_DIRECT), tail, base + n - 1).is_none() {
                    return;
                }
                if lane == 0 {
                    dev::st_release_sys_u64(head, base + n);
                }
            }
        }
        // Padding rows of a fixed-size (num_worst_tokens) output, spread over receivers.
        if !is_sender && p.num_worst_tokens != 0 {
            let num_recv = *(p.num_recv_tokens as *const i32) as u64;
            let stride = (p.num_channels / w_per * dev::block_dim_x()) as u64;
            let mut row = num_recv + (dev::block_idx_x() / 2 * dev::block_dim_x() + dev::thread_idx_x()) as u64;
            while row < p.num_worst_tokens as u64 && p.recv_src_idx != 0 {
                *(p.recv_src_idx as *mut i32).add(row as usize) = -1;
                for k in 0..k_count as u64 {
                    *(p.recv_topk_idx as *mut i64).add((row * k_count as u64 + k) as usize) = -1;
                    *(p.recv_topk_weights as *mut f32).add((row * k_count as u64 + k) as usize) = 0.0;
                }
                row += stride;
            }
        }
    }
}

/// [`sum_copies`] for `r <= 8` ranks: `U2` vectors of each copy before the first add with two
/// ranks (`2 * U2` loads in flight per lane), 2 with up to four and 1 with up to eight (8).
#[inline(always)]
unsafe fn sum_copies_of<const U2: usize>(
    r: u32,
    slot: &[u64; HT_MAX_RANKS as usize],
    from: u32,
    num_vecs: u64,
    out: u64,
    b0: u64,
    b1: u64,
) {
    // SAFETY: forwarded (`sum_copies`' contract; `from` has bits below `r` only).
    unsafe {
        if r <= 2 {
            sum_copies::<2, U2>(slot, from, num_vecs, out, b0, b1);
        } else if r <= 4 {
            sum_copies::<4, 2>(slot, from, num_vecs, out, b0, b1);
        } else {
            sum_copies::<8, 1>(slot, from, num_vecs, out, b0, b1);
        }
    }
}

/// Loads a lane of `sum_copies` may have in flight (copies x steps).
const XS: usize = 16;

/// Warp-cooperative: one combined row `out` = bf16(b0 + b1 + the copies in ascending rank
/// order, in f32), from the copies in `slot[d]` for each bit `d` of `from` (`d < NR`) and the
/// bias rows `b0`, `b1` (0 = none), `num_vecs` 16-byte vectors each. Each lane issues the
/// loads of `U` vectors of every copy before the first add.
#[inline(always)]
unsafe fn sum_copies<const NR: usize, const U: usize>(
    slot: &[u64; HT_MAX_RANKS as usize],
    from: u32,
    num_vecs: u64,
    out: u64,
    b0: u64,
    b1: u64,
) {
    const { assert!((U == 1 || U == 2 || U == 4 || U == 8) && NR * U <= XS) };
    let lane = dev::lane_id() as u64;
    let warp = WARP_SIZE as u64;
    let mut base = 0u64;
    // SAFETY (whole body): every vector index is below `num_vecs`; the caller passes rows of
    // `num_vecs` vectors.
    unsafe {
        while base < num_vecs {
            // The `U` steps are written out (loops over them were left rolled, and `xs` then
            // lived in local memory); `xs[u * NR + d]` is copy `d` of step `u`.
            let mut xs = [U4::default(); XS];
            let load = |u: usize, xs: &mut [U4; XS]| {
                let v = base + u as u64 * warp + lane;
                for d in 0..NR {
                    if v < num_vecs && from >> d & 1 != 0 {
                        xs[u * NR + d] = dev::ld_v4((slot[d] as *const U4).add(v as usize));
                    }
                }
            };
            let reduce = |u: usize, xs: &[U4; XS]| {
                let v = base + u as u64 * warp + lane;
                if v >= num_vecs {
                    return;
                }
                // acc = b0 + b1 first (0 + 0 without bias), as the reference.
                let bias =
                    |b: u64| if b != 0 { dev::ld_nc_v4((b as *const U4).add(v as usize)) } else { U4::default() };
                let (w0, w1) = (bias(b0), bias(b1));
                let (w0, w1) = ([w0.x, w0.y, w0.z, w0.w], [w1.x, w1.y, w1.z, w1.w]);
                let mut acc = [0f32; 8];
                for i in 0..8 {
                    let half = |w: &[u32; 4]| bf16_to_f32((w[i / 2] >> (16 * (i % 2))) as u16);
                    acc[i] = half(&w0) + half(&w1);
                }
                for d in 0..NR {
                    if from >> d & 1 != 0 {
                        let x = xs[u * NR + d];
                        let words = [x.x, x.y, x.z, x.w];
                        for i in 0..8 {
                            acc[i] += bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16);
                        }
                    }
                }
                let mut o = [0u32; 4];
                for i in 0..8 {
                    o[i / 2] |= (f32_to_bf16(acc[i]) as u32) << (16 * (i % 2));
                }
                dev::st_v4((out as *mut U4).add(v as usize), U4 { x: o[0], y: o[1], z: o[2], w: o[3] });
            };
            load(0, &mut xs);
            if U > 1 {
                load(1, &mut xs);
            }
            if U > 2 {
                load(2, &mut xs);
                load(3, &mut xs);
            }
            if U > 4 {
                load(4, &mut xs);
                load(5, &mut xs);
                load(6, &mut xs);
                load(7, &mut xs);
            }
            reduce(0, &xs);
            if U > 1 {
                reduce(1, &xs);
            }
            if U > 2 {
                reduce(2, &xs);
                reduce(3, &xs);
            }
            if U > 4 {
                reduce(4, &xs);
                reduce(5, &xs);
                reduce(6, &xs);
                reduce(7, &xs);
            }
            base += U as u64 * warp;
        }
    }
}

/// The ring way of a combine (module docs): sender blocks push the rows back, receiver
/// blocks sum. False after a timeout or another thread's error.
#[inline(always)]
unsafe fn combine_ring(p: &HtCombineParams, l: &HtLayout) -> bool {
    let warp = dev::warp_id();
    let lane = dev::lane_id();
    let r = p.num_ranks;
    let (channel, peer, w_per) = channel_and_peer(r);
    let is_sender = dev::block_idx_x() & 1 == 0;
    let k_count = p.num_topk;
    let row_bytes = 2 * p.hidden as u64;
    let bases: *mut u64 = dev::static_smem();
    // SAFETY (whole body): as in ht_dispatch.
    unsafe {
        if is_sender {
            // Send the rows received from `dst` in channel `c` back to it, in order.
            let dst = peer;
            let base = peer_base(p.peer_bases, dst);
            let me = p.rank as u64;
            let mut ring = Sender::new(
                base + l.ring_tail(l.combine_ctrl, me, channel as u64),
                base + l.ring_slot(l.combine_slots, p.slot_bytes, me, channel as u64, 0),
                p.slot_bytes,
                p.num_slots as u64,
            );
            let cpm = p.channel_prefix_matrix as *const i32;
            let row0 = *cpm.add((dst * (p.num_channels + 1) + channel) as usize) as u64;
            let row1 = *cpm.add((dst * (p.num_channels + 1) + channel + 1) as usize) as u64;
            for row in row0..row1 {
                let waiting = dev::waiting!(p, dst, SITE_COMBINE_SEND);
                let Some(slot) = ring.reserve(waiting) else { return false };
                copy_warp(slot, p.x + row * row_bytes, row_bytes, true);
                if lane < k_count && p.topk_weights != 0 {
                    *((slot + row_bytes) as *mut f32).add(lane as usize) =
                        *(p.topk_weights as *const f32).add((row * k_count as u64 + lane as u64) as usize);
                }
                ring.written();
            }
            ring.publish();
            return true;
        }
        // Receiver: the `R` warps of group `g` sum the tokens of channel `channel` (this
        // warp's), `R * k` per round (warp `w` takes tokens `w, w + R, ...` of the round),
        // each token's copies in ascending rank order. All groups run as many rounds as the
        // block's longest channel (block barriers), and heads are released once a round:
        // `k > 1` when `R` is small, so two ranks don't pay a barrier and a system fence
        // every two tokens; a round uses at most half a ring, so senders keep filling.
        let local = peer_base(p.peer_bases, p.rank);
        let t = dev::thread_idx_x();
        let first = dev::block_idx_x() / 2 * w_per; // the block's first channel
        if t < r * w_per {
            let c = (first + t / r) as u64;
            let head =
                (local + l.ring_tail(l.combine_ctrl, (t % r) as u64, c) + moe_ep_abi::FLAG_STRIDE_BYTES) as *const u64;
            *bases.add(t as usize) = dev::ld_relaxed_sys_u64(head);
        }
        dev::sync_threads();
        let group_bases = bases.add((warp / r * r) as usize); // this group's, by source rank
        let (begin, end) = l.channel_range(p.num_tokens as u64, channel as u64);
        let k = combine_tokens_per_warp(r, p.num_slots) as u64;
        let per_round = r as u64 * k;
        let mut rounds = 0;
        for g in 0..w_per {
            let (b, e) = l.channel_range(p.num_tokens as u64, (first + g) as u64);
            rounds = rounds.max((e - b).div_ceil(per_round));
        }
        let in_rank =
            |tok: u64, d: u32| *(p.is_token_in_rank as *const u8).add((tok * r as u64 + d as u64) as usize) != 0;
        let send_head = |tok: u64, d: u32| *(p.send_head as *const i32).add((tok * r as u64 + d as u64) as usize);
        for round in 0..rounds {
            let chunk = begin + round * per_round;
            let mut failed = false;
            for j in 0..k {
                let tok = chunk + j * r as u64 + (warp % r) as u64;
                if tok < end && !failed {
                    // Wait until every copy of the token has arrived.
                    for d in 0..r {
                        if in_rank(tok, d) {
                            let pos = *group_bases.add(d as usize) + send_head(tok, d) as u64;
                            let tail = (local + l.ring_tail(l.combine_ctrl, d as u64, channel as u64)) as *const u64;
                            if wait_tail(dev::waiting!(p, d, SITE_COMBINE_RECV), tail, pos).is_none() {
                                failed = true;
                                break;
                            }
                        }
                    }
                    if !failed {
                        // Slots of the token's copies, by source rank.
                        let mut slot = [0u64; HT_MAX_RANKS as usize];
                        let mut from = 0u32;
                        for d in 0..HT_MAX_RANKS {
                            if d < r && in_rank(tok, d) {
                                let pos = *group_bases.add(d as usize) + send_head(tok, d) as u64;
                                slot[d as usize] = local
                                    + l.ring_slot(
                                        l.combine_slots,
                                        p.slot_bytes,
                                        d as u64,
                                        channel as u64,
                                        pos % p.num_slots as u64,
                                    );
                                from |= 1 << d;
                            }
                        }
                        let num_vecs = p.hidden as u64 / 8;
                        let row = |base: u64| if base != 0 { base + tok * num_vecs * 16 } else { 0 };
                        let (out, b0, b1) = (row(p.combined_x), row(p.bias_0), row(p.bias_1));
                        // Eight loads in flight per lane whatever R is (R copies x 8 / R
                        // vectors): with only R, two ranks' receivers starved for bytes.
                        sum_copies_of::<4>(r, &slot, from, num_vecs, out, b0, b1);
                        if lane < k_count && p.combined_topk_weights != 0 {
                            let mut acc = 0f32;
                            for (d, &at) in slot.iter().enumerate() {
                                if from >> d & 1 != 0 {
                                    acc += *((at + row_bytes) as *const f32).add(lane as usize);
                                }
                            }
                            *(p.combined_topk_weights as *mut f32).add((tok * k_count as u64 + lane as u64) as usize) =
                                acc;
                        }
                    }
                }
            }
            if dev::sync_threads_or(failed) {
                return false;
            }
            // Free the slots this round consumed: thread `g * R + d` releases head `d` of
            // the block's channel `g`.
            if t < r * w_per {
                let (d, c) = (t % r, (first + t / r) as u64);
                let (b, e) = l.channel_range(p.num_tokens as u64, c);
                let chunk = b + round * per_round;
                let mut consumed = -1i32;
                let mut tok = chunk;
                while tok < (chunk + per_round).min(e) {
                    if in_rank(tok, d) {
                        consumed = send_head(tok, d);
                    }
                    tok += 1;
                }
                if consumed >= 0 {
                    dev::fence_acq_rel_sys();
                    let head =
                        (local + l.ring_tail(l.combine_ctrl, d as u64, c) + moe_ep_abi::FLAG_STRIDE_BYTES) as *mut u64;
                    dev::st_release_sys_u64(head, *bases.add(t as usize) + consumed as u64 + 1);
                }
            }
        }
    }
    true
}

/// Static shared memory (u64 index) where a combine block keeps every rank's `x` base
/// (`[8]`) and weights base (`[8]`) for the pull way; below it the ring receiver's heads.
const PULL_BASES: usize = 64;

/// Which way this combine goes, decided alike on every rank: pull when every rank's `x`
/// (and weights, if any) lie in its heap. Block 0 opens this rank's mailbox (slot
/// `epoch % 2`); every block reads all of them into shared memory. `None` after a timeout
/// or another thread's error. A rank can be at most one call ahead (every combine ends
/// with all ranks' flags), so the other slot still holds what a slower rank reads.
#[inline(always)]
unsafe fn combine_mode(p: &HtCombineParams, l: &HtLayout) -> Option<bool> {
    let t = dev::thread_idx_x();
    let r = p.num_ranks;
    let slot = l.combine_mailbox + (p.epoch % 2) * moe_ep_abi::FLAG_STRIDE_BYTES;
    let bases: *mut u64 = dev::static_smem();
    let (mut missing, mut failed) = (false, false);
    // SAFETY (whole body): mailbox slots of the ranks' mapped buffers; shared memory within
    // STATIC_SMEM_BYTES; the rank's error slot.
    unsafe {
        if dev::block_idx_x() == 0 && t == 0 {
            let mine = (peer_base(p.peer_bases, p.rank) + slot) as *mut u64;
            let heap = if p.heap_bases != 0 { peer_base(p.heap_bases, p.rank) } else { 0 };
            let offset = |ptr: u64| if ptr == 0 || p.pull == 0 { HtMailbox::NONE } else { ptr - heap };
            dev::st_relaxed_sys_u64(mine.add(1), offset(p.x));
            dev::st_relaxed_sys_u64(mine.add(2), offset(p.topk_weights));
            dev::fence_acq_rel_sys();
            dev::st_release_sys_u64(mine, p.epoch);
        }
        if t < r {
            let theirs = (peer_base(p.peer_bases, t) + slot) as *const u64;
            failed = dev::wait_at_least(dev::waiting!(p, t, SITE_COMBINE_MAILBOX), theirs, p.epoch, |v| v).is_none();
            let (x, w) = (dev::ld_relaxed_sys_u64(theirs.add(1)), dev::ld_relaxed_sys_u64(theirs.add(2)));
            missing = x == HtMailbox::NONE || (p.topk_weights != 0 && w == HtMailbox::NONE);
            let heap = if p.heap_bases != 0 { peer_base(p.heap_bases, t) } else { 0 };
            *bases.add(PULL_BASES + t as usize) = heap.wrapping_add(x);
            *bases.add(PULL_BASES + 8 + t as usize) = heap.wrapping_add(w);
        }
    }
    if dev::sync_threads_or(failed) {
        return None;
    }
    Some(!dev::sync_threads_or(missing))
}

/// The pull way of a combine: each rank reads every copy of its tokens straight from the
/// expert ranks' `x` (row `remote_row0[d][c] + send_head`) and sums them in rank order —
/// one read of each copy, one write of each token. The two blocks of a channel pair share
/// its tokens.
#[inline(always)]
unsafe fn combine_pull(p: &HtCombineParams, l: &HtLayout) {
    let lane = dev::lane_id();
    let r = p.num_ranks;
    let k_count = p.num_topk;
    let w_per = dev::num_warps() / r;
    let nw = dev::num_warps() as u64;
    let first = dev::block_idx_x() / 2 * w_per;
    let warp_in_pair = (dev::block_idx_x() & 1) as u64 * nw + dev::warp_id() as u64;
    let row_bytes = 2 * p.hidden as u64;
    let num_vecs = p.hidden as u64 / 8;
    let bases: *const u64 = dev::static_smem();
    // SAFETY (whole body): every row index comes from the dispatch that made the handle
    // (rows below each peer's `num_rows`); bases from `combine_mode`.
    unsafe {
        let in_rank =
            |tok: u64, d: u32| *(p.is_token_in_rank as *const u8).add((tok * r as u64 + d as u64) as usize) != 0;
        for g in 0..w_per {
            let c = first + g;
            let (begin, end) = l.channel_range(p.num_tokens as u64, c as u64);
            let mut tok = begin + warp_in_pair;
            while tok < end {
                let mut slot = [0u64; HT_MAX_RANKS as usize];
                let mut rows = [0u64; HT_MAX_RANKS as usize];
                let mut from = 0u32;
                for d in 0..HT_MAX_RANKS {
                    if d < r && in_rank(tok, d) {
                        let row0 = *(p.remote_row0 as *const i32).add((d * p.num_channels + c) as usize) as u64;
                        let row = row0 + *(p.send_head as *const i32).add((tok * r as u64 + d as u64) as usize) as u64;
                        slot[d as usize] = *bases.add(PULL_BASES + d as usize) + row * row_bytes;
                        rows[d as usize] = row;
                        from |= 1 << d;
                    }
                }
                // Weights first: `rows` is then dead while the copies' loads are in flight.
                if lane < k_count && p.combined_topk_weights != 0 {
                    let mut acc = 0f32;
                    for (d, &row) in rows.iter().enumerate() {
                        if from >> d & 1 != 0 {
                            let w = *bases.add(PULL_BASES + 8 + d) as *const f32;
                            acc += *w.add((row * k_count as u64 + lane as u64) as usize);
                        }
                    }
                    *(p.combined_topk_weights as *mut f32).add((tok * k_count as u64 + lane as u64) as usize) = acc;
                }
                let row = |base: u64| if base != 0 { base + tok * num_vecs * 16 } else { 0 };
                let (out, b0, b1) = (row(p.combined_x), row(p.bias_0), row(p.bias_1));
                // 16 loads in flight per lane with two ranks: across GPUs half the copies are
                // remote loads (more ranks keep 8: 16 would spill).
                sum_copies_of::<8>(r, &slot, from, num_vecs, out, b0, b1);
                tok += 2 * nw;
            }
        }
    }
}

/// End of a combine: block `b` raises its flag at every rank and waits for every rank's
/// block `b`, so no rank's `x` is released (or its mailbox slot reused) while a peer may
/// still read it. False after a timeout or another thread's error.
#[inline(always)]
unsafe fn combine_done(p: &HtCombineParams, l: &HtLayout) -> bool {
    let b = dev::block_idx_x() as u64;
    let nb = 2 * l.num_channels;
    let s = ranks_of!(p);
    dev::sync_threads();
    // SAFETY: `combine_done[w][b]` of layout `l`.
    unsafe { flag_barrier(s, SITE_COMBINE_DONE, |w| l.combine_done + (w * nb + b) * moe_ep_abi::FLAG_STRIDE_BYTES) }
}

kernel! {
    /// HT combine (see the module docs).
    pub unsafe fn ht_combine(p: HtCombineParams) as HT_COMBINE = "_ZN6moe_ep9intranode7combineEv", {
        let l = HtLayout::new(p.num_ranks, p.num_channels, p.num_slots, p.num_local_experts, p.dispatch_slot_bytes, p.slot_bytes);
        let mut p = p;
        // SAFETY: the host sized every buffer for this layout and these parameters.
        unsafe {
            let local = peer_base(p.peer_bases, p.rank);
            p.epoch = call_epoch(local, &l, HT_EPOCH_COMBINE);
            // Block-uniform from here on (`combine_ring`'s warps meet again at its end).
            if let Some(pull) = combine_mode(&p, &l) {
                let ok = if pull {
                    combine_pull(&p, &l);
                    true
                } else {
                    combine_ring(&p, &l)
                };
                if !dev::sync_threads_or(!ok) {
                    combine_done(&p, &l);
                }
            }
            end_call(local, &l, HT_EPOCH_COMBINE, HT_COMBINE_BLOCKS, p.epoch);
        }
    }
}
