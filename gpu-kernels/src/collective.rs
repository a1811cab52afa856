//! Small collectives over symmetric buffers: the first peer kernels, and the proof that
//! Rust-written kernels can store into another rank's memory and signal it.
//!
//! # `all_gather`
//! Grid: `num_blocks` blocks (the same on every rank), `block_dim >= num_ranks` threads.
//! Block `b` owns chunk `b` of every rank's block (`ceil(block_bytes/16 / num_blocks)`
//! 16-byte vectors), so blocks never wait on each other, only on their counterparts.
//!
//! Symmetric buffer regions (see [`AllGatherLayout`]):
//! - `ready[src][b]` u64: rank `src`'s block `b` has entered call `epoch` here, so this
//!   rank's previous result was fully read (the receiver owns nothing; senders write).
//! - `arrived[src][b]` u64: rank `src`'s block `b` has stored its chunk for `epoch`.
//! - `data[src][block_bytes]`: the gathered blocks.
//!
//! Phases of block `b`: (1) tell every peer "ready for `epoch`" and wait until every peer
//! said so here; (2) store the chunk into every peer's `data[rank]` with 16-byte stores;
//! barrier, `fence.acq_rel.sys`, then `st.release.sys` `arrived[rank][b] = epoch` at each
//! peer; (3) acquire `arrived[src][b] >= epoch` for every `src`, then copy chunk `b` of every
//! `data[src]` into `recv`. Flags are epochs, never reset, so a stale flag can't pass for a
//! fresh one. Waits time out into the host-visible [`DeviceError`] (sites below).
use crate::abi::{AllGatherLayout, AllGatherParams, DeviceError, ErrorSlot, error_code};
use crate::dev::{self, U4};

/// [`DeviceError::site`] of the wait for peers' `ready` flags.
pub const SITE_READY: u32 = 1;
/// [`DeviceError::site`] of the wait for peers' `arrived` flags.
pub const SITE_ARRIVED: u32 = 2;

/// Waits, by threads `t < num_ranks`, until the local `flags[t][b] >= epoch` (`flags` is
/// the region's offset); true (in every thread) when every wait succeeded.
#[inline(always)]
unsafe fn wait_flags(p: &AllGatherParams, flags: u64, site: u32) -> bool {
    let t = dev::thread_idx_x();
    let b = dev::block_idx_x();
    let num_blocks = dev::grid_dim_x();
    let mut failed = false;
    if t < p.num_ranks {
        // SAFETY: `peer_bases` has `num_ranks` entries; entry `rank` is the local buffer.
        let local = unsafe { *(p.peer_bases as *const u64).add(p.rank as usize) };
        let layout = AllGatherLayout::new(p.num_ranks, num_blocks, p.block_bytes);
        let flag = layout.flag_offset(local + flags, t, b, num_blocks) as *const u64;
        let err = p.error as *mut ErrorSlot;
        let mut seen = 0;
        // SAFETY: `flag` lies inside the local symmetric buffer (layout computed above).
        let ok = dev::wait_until(p.timeout_ns, || {
            seen = unsafe { dev::ld_acquire_sys_u64(flag) };
            seen >= p.epoch || unsafe { dev::error_raised(err) }
        });
        failed = !ok || seen < p.epoch;
        if !ok {
            // SAFETY: `error` is the host-visible record.
            unsafe { dev::report_timeout(err, p.rank, t, site, p.epoch, seen) };
        }
    }
    !dev::sync_threads_or(failed)
}

/// Raises, by threads `t < num_ranks`, `flags[rank][b] = epoch` in peer `t`'s buffer
/// (`flags` is the region's offset).
#[inline(always)]
unsafe fn signal_peers(p: &AllGatherParams, flags: u64) {
    let t = dev::thread_idx_x();
    let num_blocks = dev::grid_dim_x();
    if t < p.num_ranks {
        // SAFETY: `peer_bases` has `num_ranks` entries, each a mapped symmetric buffer.
        unsafe {
            let base = *(p.peer_bases as *const u64).add(t as usize);
            let layout = AllGatherLayout::new(p.num_ranks, num_blocks, p.block_bytes);
            let flag = layout.flag_offset(base + flags, p.rank, dev::block_idx_x(), num_blocks) as *mut u64;
            // Cumulativity: the barrier gathered the block's stores, this fence pushes them
            // out system-wide before the flag.
            dev::fence_acq_rel_sys();
            dev::st_release_sys_u64(flag, p.epoch);
        }
    }
}

kernel! {
    /// Symmetric all-gather (see the module docs).
    pub unsafe fn all_gather(p: AllGatherParams) as ALL_GATHER {
        let t = dev::thread_idx_x();
        let b = dev::block_idx_x();
        let num_blocks = dev::grid_dim_x();
        if p.num_ranks == 0 || p.num_ranks > dev::block_dim_x() || !p.block_bytes.is_multiple_of(16) || p.rank >= p.num_ranks {
            if t == 0 && b == 0 {
                let rec = DeviceError { code: error_code::BAD_LAUNCH, rank: p.rank, peer: u32::MAX, ..DeviceError::default() };
                // SAFETY: `error` is the host-visible record.
                unsafe { dev::report_error(p.error as *mut ErrorSlot, rec) };
            }
            return;
        }
        let layout = AllGatherLayout::new(p.num_ranks, num_blocks, p.block_bytes);
        let num_vecs = p.block_bytes / 16;
        let chunk = num_vecs.div_ceil(num_blocks as u64);
        let begin = (b as u64 * chunk).min(num_vecs);
        let end = (begin + chunk).min(num_vecs);

        // (1) Every peer is in this call, so its previous result has been copied out.
        // SAFETY (whole body): pointers come from the host's symmetric allocation, sized by
        // the same `AllGatherLayout`; `send`/`recv` hold `block_bytes`/`num_ranks*block_bytes`.
        unsafe {
            signal_peers(&p, layout.ready_offset);
            if !wait_flags(&p, layout.ready_offset, SITE_READY) {
                return;
            }
            // (2) Store chunk b of our block into data[rank] of every peer, nearest first.
            let send = p.send as *const U4;
            for d in 0..p.num_ranks {
                let mut dst = p.rank + d;
                if dst >= p.num_ranks {
                    dst -= p.num_ranks;
                }
                let base = *(p.peer_bases as *const u64).add(dst as usize);
                let out = (base + layout.data_offset + p.rank as u64 * p.block_bytes) as *mut U4;
                let mut v = begin + t as u64;
                while v < end {
                    dev::st_v4(out.add(v as usize), dev::ld_nc_v4(send.add(v as usize)));
                    v += dev::block_dim_x() as u64;
                }
            }
            dev::sync_threads();
            signal_peers(&p, layout.arrived_offset);
            // (3) Wait for chunk b from every source, then copy it out.
            if !wait_flags(&p, layout.arrived_offset, SITE_ARRIVED) {
                return;
            }
            let local = *(p.peer_bases as *const u64).add(p.rank as usize);
            for src in 0..p.num_ranks {
                let from = (local + layout.data_offset + src as u64 * p.block_bytes) as *const U4;
                let to = (p.recv + src as u64 * p.block_bytes) as *mut U4;
                let mut v = begin + t as u64;
                while v < end {
                    dev::st_v4(to.add(v as usize), dev::ld_v4(from.add(v as usize)));
                    v += dev::block_dim_x() as u64;
                }
            }
        }
    }
}
