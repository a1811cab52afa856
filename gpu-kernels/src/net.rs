//! GPU side of the inter-node transport: kernels write commands (puts, signals, quiets) into a
//! ring in host-mapped memory that the host proxy of their GPU carries out (docs/design.md,
//! "Inter-node transport"; the slot format is [`crate::abi::net`]).
//!
//! Many warps push at once: a lane claims a position with an atomic add on the ring's
//! device-memory head, waits (bounded) while the proxy is a whole ring behind, then stores the
//! slot's four tagged words. Producers keep a cached copy of the proxy's tail in device
//! memory, so host memory is read only when the ring looks full.
use crate::abi::net::{NET_SLOT_BYTES, NetCmd, NetExchangeParams, NetOp, NetRing, NetTestParams};
use crate::copy::copy_warp;
use crate::dev::{self, Waiting};

/// Net: a producer waiting for room in a command ring (the proxy's tail).
pub const SITE_NET_RING_FULL: u32 = 40;
/// Net: a quiet waiting for the proxy to finish the ring's earlier commands.
pub const SITE_NET_QUIET: u32 = 41;
/// Net self-test: waiting for a peer's signal.
pub const SITE_NET_SIGNAL: u32 = 42;

/// One thread: claims the next position of `ring` and writes `cmd` there, waiting while the
/// ring is full. The position, or `None` after a timeout (reported) or another thread's
/// error. What the command moves must be written before (the fence here publishes it).
///
/// # Safety
/// `ring` describes a live ring ([`NetRing`]); `w.error` is the rank's error slot.
#[inline(always)]
pub unsafe fn push(ring: &NetRing, cmd: &NetCmd, w: Waiting) -> Option<u64> {
    let slots = 1u64 << ring.log2_slots;
    // SAFETY: the ring's words, as the caller's contract says.
    unsafe {
        let pos = dev::atom_add_relaxed_gpu_u64(ring.head as *mut u64, 1);
        let cache = ring.tail_cache as *mut u64;
        if pos >= dev::ld_relaxed_sys_u64(cache) + slots {
            let tail = dev::wait_at_least(w, ring.tail as *const u64, pos + 1 - slots, |v| v)?;
            // Racing producers may store an older tail: that costs a read, never a slot.
            dev::st_relaxed_sys_u64(cache, tail);
        }
        let [w0, w1, w2, w3] = cmd.encode(pos, ring.log2_slots);
        dev::fence_acq_rel_sys();
        // Four plain stores in any order: the reader takes the slot once all carry its tag.
        let slot = (ring.slots + (pos & (slots - 1)) * NET_SLOT_BYTES) as *mut u64;
        dev::st_relaxed_sys_u64(slot, w0);
        dev::st_relaxed_sys_u64(slot.add(1), w1);
        dev::st_relaxed_sys_u64(slot.add(2), w2);
        dev::st_relaxed_sys_u64(slot.add(3), w3);
        Some(pos)
    }
}

/// One thread: waits until the proxy has carried out every command pushed to `ring` before
/// this call (it gives a `QUIET` slot back only then). False after a timeout or an error.
///
/// # Safety
/// As [`push`].
#[inline(always)]
pub unsafe fn quiet(ring: &NetRing, w: Waiting) -> bool {
    // SAFETY: forwarded.
    unsafe {
        let Some(pos) = push(ring, &NetCmd { op: NetOp::Quiet, ..NetCmd::NOP }, w) else { return false };
        dev::wait_at_least(Waiting { site: SITE_NET_QUIET, ..w }, ring.tail as *const u64, pos + 1, |v| v).is_some()
    }
}

/// The command warp `warp` pushes `i`-th in [`net_selftest`]: every op but `Quiet` and
/// fields that tell warp and index apart.
pub const fn selftest_cmd(warp: u32, i: u32) -> NetCmd {
    let op = match i % 4 {
        0 => NetOp::Put,
        1 => NetOp::PutSignal,
        2 => NetOp::Signal,
        _ => NetOp::Nop,
    };
    NetCmd {
        op,
        flags: 0,
        peer: warp,
        len: i as u64 * 16,
        src_off: (warp as u64) << 32 | i as u64,
        dst_off: (i as u64) << 24 | warp as u64,
        sig_idx: warp ^ i,
        sig_add: -(i as i32) - 1,
    }
}

kernel! {
    /// Command-ring self-test: lane 0 of every warp pushes [`selftest_cmd`]`(warp, 0..n)`,
    /// then a quiet. The host drains the ring meanwhile and checks that every command came
    /// exactly once, whole, in each warp's order.
    pub unsafe fn net_selftest(p: NetTestParams) as NET_SELFTEST {
        let warp = dev::block_idx_x() * dev::num_warps() + dev::warp_id();
        let w = Waiting { timeout_ns: p.timeout_ns, error: p.error, rank: 0, peer: 0, site: SITE_NET_RING_FULL };
        if dev::lane_id() == 0 {
            // SAFETY: the ring and the error slot the host set up for this launch.
            unsafe {
                let mut ok = true;
                let mut i = 0;
                while ok && i < p.commands_per_warp {
                    ok = push(&p.ring, &selftest_cmd(warp, i), w).is_some();
                    i += 1;
                }
                if ok {
                    quiet(&p.ring, w);
                }
            }
        }
    }
}

kernel! {
    /// Put/signal exchange self-test ([`NetExchangeParams`]): one block of `R` warps; warp
    /// `q` puts block `q` of `data` to rank `q` with a signal, waits for rank `q`'s signal,
    /// copies block `R + q` (what `q` put here) to `out`, then quiets the ring.
    pub unsafe fn net_exchange_selftest(p: NetExchangeParams) as NET_EXCHANGE_SELFTEST {
        let q = dev::warp_id();
        let (r, bytes) = (p.num_ranks, p.bytes as u64);
        if q >= r || q == p.rank {
            return;
        }
        let w = Waiting { timeout_ns: p.timeout_ns, error: p.error, rank: p.rank, peer: q, site: SITE_NET_RING_FULL };
        // SAFETY: the ring, buffers and error slot the host set up for this launch.
        unsafe {
            let mut pushed = true;
            if dev::lane_id() == 0 {
                let cmd = NetCmd {
                    op: NetOp::PutSignal,
                    peer: q,
                    len: bytes,
                    src_off: q as u64 * bytes,
                    dst_off: (r + p.rank) as u64 * bytes,
                    sig_idx: p.rank,
                    sig_add: 1,
                    ..NetCmd::NOP
                };
                pushed = push(&p.ring, &cmd, w).is_some()
                    && dev::wait_at_least(Waiting { site: SITE_NET_SIGNAL, ..w }, (p.signals + 8 * q as u64) as *const u64, p.epoch, |v| v).is_some();
            }
            if dev::shfl_idx_u32(pushed as u32, 0) == 0 {
                return;
            }
            // The signal's acquire (lane 0) covers the warp after the warp barrier.
            dev::sync_warp(0xffff_ffff);
            copy_warp(p.out + q as u64 * bytes, p.data + (r + q) as u64 * bytes, bytes, false);
            if dev::lane_id() == 0 {
                quiet(&p.ring, w);
            }
        }
    }
}
