//! `dev`: the one vocabulary of device primitives every kernel uses.
//!
//! Two back ends with the same functions: `ptx.rs` (inline PTX, the only file with `asm!`)
//! on nvptx64, `emu.rs` (the CPU emulator) elsewhere. Names spell out operation, semantics
//! and scope, `{op}_{sem}_{scope}_{type}`, like the PTX they emit:
//!
//! | function | PTX | pairs with |
//! |---|---|---|
//! | `st_release_sys_u32/u64` | `st.release.sys.global` | `ld_acquire_sys_*` |
//! | `ld_acquire_sys_u32/u64` | `ld.acquire.sys.global` | `st_release_sys_*`, `red_add_release_sys_*` |
//! | `st_relaxed_sys_u32/u64`, `ld_relaxed_sys_u32/u64` | `st/ld.relaxed.sys.global` | a `fence_*` on each side |
//! | `red_add_release_sys_u32/u64` | `red.release.sys.global.add` | `ld_acquire_sys_*` |
//! | `red_add_relaxed_gpu_u64` | `red.relaxed.gpu.global.add.u64` | statistics (read after the kernel) |
//! | `atom_add_relaxed_gpu_u32/u64`, `atom_add_release_gpu_u32` | `atom.{relaxed,release}.gpu.global.add` | counters, claims |
//! | `atom_add_relaxed_sys_u32` | `atom.relaxed.sys.global.add` | counters peers add to |
//! | `atom_cas_acq_rel_sys_u32` | `atom.acq_rel.sys.global.cas` | claims, locks |
//! | `fence_acq_rel_gpu/sys`, `fence_sc_sys` | `fence.{acq_rel,sc}.{gpu,sys}` | relaxed flags |
//! | `ld_nc_v4`, `ld_v4`, `st_v4` | `ld.global.nc.v4.u32`, `ld.global.v4.u32`, `st.global.v4.u32` | 16-byte data moves |
//! | `shfl_bfly_u32`, `shfl_idx_u32`, `ballot`, `match_any_u32` | `shfl.sync.*`, `vote.sync.ballot`, `match.any.sync` | warp-cooperative: all 32 lanes call |
//! | `sync_threads`, `sync_threads_or`, `sync_warp` | `bar.sync 0`, `bar.red.or.pred`, `bar.warp.sync` | |
//! | `static_smem`, `dyn_smem`, `atom_add_shared_u32` | `.shared` arrays, `atom.shared.add` | |
//! | `globaltimer_ns`, `nanosleep_ns` | `%globaltimer`, `nanosleep.u32` | wait bounds |
//! | `clock64` | `%clock64` | wait-cost statistics (SM cycles; emulator: ns) |
//! | `fma_rn_f32` | `fma.rn.f32` | one rounding, as the reference's `mul_add` |
//! | `cvt_e4m3x2` | `cvt.rn.satfinite.e4m3x2.f32` | fp8 casts |
//!
//! Built on them here: [`warp_sum_u32`], [`wait_until`] (every wait loop in every kernel), [`wait_at_least`]
//! (the HT and LL waits on a flag or counter), [`last_block`] and [`report_error`].

use crate::abi::{DeviceError, ErrorSlot, WARP_SIZE, error_code};

/// 16 bytes: the unit of every token copy (one `v4.u32` load or store).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U4 {
    /// Word 0.
    pub x: u32,
    /// Word 1.
    pub y: u32,
    /// Word 2.
    pub z: u32,
    /// Word 3.
    pub w: u32,
}

/// Bytes of the module-scope static shared-memory array ([`static_smem`]).
pub const STATIC_SMEM_BYTES: usize = 4096;

#[cfg(target_arch = "nvptx64")]
mod ptx;
#[cfg(target_arch = "nvptx64")]
pub use ptx::*;

#[cfg(not(target_arch = "nvptx64"))]
mod emu;
#[cfg(not(target_arch = "nvptx64"))]
pub use emu::*;

/// Warp index inside the block.
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx_x() / WARP_SIZE
}

/// Warps per block.
#[inline(always)]
pub fn num_warps() -> u32 {
    block_dim_x() / WARP_SIZE
}

/// The sum of `v` over the warp, in every lane. Warp-cooperative.
#[inline(always)]
pub fn warp_sum_u32(mut v: u32) -> u32 {
    let mut mask = WARP_SIZE / 2;
    while mask > 0 {
        v = v.wrapping_add(shfl_bfly_u32(v, mask));
        mask /= 2;
    }
    v
}

/// The minimum of `v` over the warp, in every lane. Warp-cooperative.
#[inline(always)]
pub fn warp_min_u32(mut v: u32) -> u32 {
    let mut mask = WARP_SIZE / 2;
    while mask > 0 {
        v = v.min(shfl_bfly_u32(v, mask));
        mask /= 2;
    }
    v
}

/// Spins until `done()` returns true or `timeout_ns` of `%globaltimer` time passed.
/// Returns `false` on timeout. Every wait loop in every kernel goes through here, so every
/// wait is bounded (the caller turns `false` into a [`report_error`]).
#[inline(always)]
pub fn wait_until(timeout_ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = globaltimer_ns();
    let mut spins = 0u32;
    loop {
        if done() {
            return true;
        }
        if globaltimer_ns().wrapping_sub(start) > timeout_ns {
            return false;
        }
        spins = spins.wrapping_add(1);
        backoff(spins);
    }
}

/// Who waits for whom, for the timeout report of a [`wait_at_least`].
#[derive(Clone, Copy)]
pub struct Waiting {
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// The rank's [`ErrorSlot`] (device address).
    pub error: u64,
    /// The waiting rank.
    pub rank: u32,
    /// The rank waited for.
    pub peer: u32,
    /// The kernel's `SITE_*` of this wait.
    pub site: u32,
}

/// The [`Waiting`] of a kernel's parameters (every HT and LL parameter struct has
/// `timeout_ns`, `error` and `rank`) for `peer` at `site`.
macro_rules! waiting {
    ($p:expr, $peer:expr, $site:expr) => {
        $crate::dev::Waiting { timeout_ns: $p.timeout_ns, error: $p.error, rank: $p.rank, peer: $peer, site: $site }
    };
}
pub(crate) use waiting;

/// The wait of the HT and LL kernels: this thread reads `at` (acquire) until `key(value) >=
/// expected`, bounded by the timeout. The value seen, or `None` after a timeout (reported
/// with `expected` and the key seen) or another thread's error.
///
/// # Safety
/// `at` is a valid, aligned global address; `w.error` is the rank's error slot.
#[inline(always)]
pub unsafe fn wait_at_least(w: Waiting, at: *const u64, expected: u64, key: impl Fn(u64) -> u64) -> Option<u64> {
    let mut seen = 0;
    // SAFETY: the caller's contract.
    unsafe {
        let arrived = wait_until(w.timeout_ns, || {
            seen = ld_acquire_sys_u64(at);
            key(seen) >= expected || error_raised(w.error as *const ErrorSlot)
        });
        if !arrived {
            report_timeout(w.error as *mut ErrorSlot, w.rank, w.peer, w.site, expected, key(seen));
        }
        (arrived && key(seen) >= expected).then_some(seen)
    }
}

/// Records an error through the [`ErrorSlot`] at `slot` (first writer wins) and returns.
/// Callers then leave the kernel normally: a trap would poison the CUDA context.
///
/// # Safety
/// `slot` points to a valid `ErrorSlot` in device memory whose `record` is a valid,
/// device-writable `DeviceError`.
#[inline(always)]
pub unsafe fn report_error(slot: *mut ErrorSlot, record: DeviceError) {
    // SAFETY: the caller guarantees both pointers; fields are 4/8-byte aligned.
    unsafe {
        if atom_cas_acq_rel_sys_u32(core::ptr::addr_of_mut!((*slot).claimed), 0, 1) != 0 {
            return;
        }
        let host = (*slot).record as *mut DeviceError;
        // Plain stores, field by field (host memory takes no atomics; an aggregate volatile
        // store could lower to a memcpy call), then `code` with release semantics.
        core::ptr::addr_of_mut!((*host).rank).write_volatile(record.rank);
        core::ptr::addr_of_mut!((*host).peer).write_volatile(record.peer);
        core::ptr::addr_of_mut!((*host).block).write_volatile(record.block);
        core::ptr::addr_of_mut!((*host).site).write_volatile(record.site);
        core::ptr::addr_of_mut!((*host).expected).write_volatile(record.expected);
        core::ptr::addr_of_mut!((*host).observed).write_volatile(record.observed);
        fence_acq_rel_sys();
        st_release_sys_u32(core::ptr::addr_of_mut!((*host).code), record.code);
    }
}

/// Reports a timeout of a wait on `peer` at `site` (see [`report_error`]).
///
/// # Safety
/// As [`report_error`].
#[inline(always)]
pub unsafe fn report_timeout(slot: *mut ErrorSlot, rank: u32, peer: u32, site: u32, expected: u64, observed: u64) {
    let record = DeviceError {
        code: error_code::TIMEOUT,
        rank,
        peer,
        block: block_idx_x(),
        site,
        expected,
        observed,
        reserved: 0,
    };
    // SAFETY: forwarded contract.
    unsafe { report_error(slot, record) }
}

/// True once some thread claimed `slot` (so other waits can stop early).
///
/// # Safety
/// As [`report_error`].
#[inline(always)]
pub unsafe fn error_raised(slot: *const ErrorSlot) -> bool {
    // SAFETY: forwarded contract.
    unsafe { ld_relaxed_sys_u32(core::ptr::addr_of!((*slot).claimed)) != 0 }
}

/// Block-cooperative, after this block's work: counts the block done on `counter` (a u32
/// that only grows, one per block per launch); true (in every thread) in the grid's last
/// block of this launch, which then sees every other block's work.
///
/// # Safety
/// `counter` is a u32 in this GPU's memory that only this kernel's launches add to, each
/// with the same grid size; every thread of the block calls this.
#[inline(always)]
pub unsafe fn last_block(counter: u64) -> bool {
    sync_threads();
    let mut last = false;
    if thread_idx_x() == 0 {
        fence_acq_rel_sys();
        // SAFETY: forwarded contract.
        let old = unsafe { atom_add_release_gpu_u32(counter as *mut u32, 1) };
        last = (old + 1) % grid_dim_x() == 0;
        fence_acq_rel_sys();
    }
    sync_threads_or(last)
}
