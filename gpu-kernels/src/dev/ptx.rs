//! nvptx64 back end of `dev`: stdarch intrinsics and inline PTX. The only file with `asm!`.
//! Every wrapper is `#[inline(always)]`, so no `.func` call survives in the PTX.
//!
//! Pointers are generic addresses of global memory (local or an NVLink/IPC peer mapping);
//! the `.global` state space in the instructions is valid for them because CUDA's generic
//! and global addresses of device memory coincide.
use super::{STATIC_SMEM_BYTES, U4};
use core::arch::{asm, global_asm, nvptx};

// Rust cannot place a `static` in addrspace(3), so the shared arrays are declared in PTX
// (LLVM prints module asm right after the `.version/.target/.address_size` header).
global_asm!(
    ".extern .shared .align 16 .b8 moe_ep_dyn_smem[];",
    ".shared .align 16 .b8 moe_ep_static_smem[{n}];",
    n = const STATIC_SMEM_BYTES,
);

// ------------------------------------------------------------------ indices
/// `%tid.x`.
#[inline(always)]
pub fn thread_idx_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_thread_idx_x() as u32 }
}
/// `%ctaid.x`.
#[inline(always)]
pub fn block_idx_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_x() as u32 }
}
/// `%ntid.x`.
#[inline(always)]
pub fn block_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_dim_x() as u32 }
}
/// `%nctaid.x`.
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_grid_dim_x() as u32 }
}
/// `%laneid`.
#[inline(always)]
pub fn lane_id() -> u32 {
    let r: u32;
    // SAFETY: reads a special register.
    unsafe { asm!("mov.u32 {r}, %laneid;", r = out(reg32) r, options(pure, nomem, nostack)) };
    r
}

// ------------------------------------------------------------------ barriers
/// `bar.sync 0` (`__syncthreads()`): all threads of the block.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: a block-wide barrier; every thread of the block must reach it.
    unsafe { nvptx::_syncthreads() }
}
/// `bar.red.or.pred` (`__syncthreads_or`): a block barrier that returns whether any thread's
/// `pred` was true.
#[inline(always)]
pub fn sync_threads_or(pred: bool) -> bool {
    let r: u32;
    // SAFETY: a block-wide barrier with an OR reduction; every thread must reach it.
    unsafe {
        asm!("{{ .reg .pred %p, %q; setp.ne.u32 %p, {x}, 0; bar.red.or.pred %q, 0, %p; selp.u32 {r}, 1, 0, %q; }}",
             x = in(reg32) pred as u32, r = out(reg32) r, options(nostack))
    };
    r != 0
}
/// `bar.warp.sync mask` (`__syncwarp(mask)`).
#[inline(always)]
pub fn sync_warp(mask: u32) {
    // SAFETY: warp barrier over `mask`.
    unsafe { asm!("bar.warp.sync {m};", m = in(reg32) mask, options(nostack)) }
}

// ------------------------------------------------------------------ shared memory
/// Generic pointer to the block's static shared array ([`STATIC_SMEM_BYTES`]).
#[inline(always)]
pub fn static_smem<T>() -> *mut T {
    let p: u64;
    // SAFETY: address arithmetic only.
    unsafe { asm!("cvta.shared.u64 {p}, moe_ep_static_smem;", p = out(reg64) p, options(pure, nomem, nostack)) };
    p as *mut T
}
/// Generic pointer to the block's dynamic shared memory (size set at launch).
#[inline(always)]
pub fn dyn_smem<T>() -> *mut T {
    let p: u64;
    // SAFETY: address arithmetic only.
    unsafe { asm!("cvta.shared.u64 {p}, moe_ep_dyn_smem;", p = out(reg64) p, options(pure, nomem, nostack)) };
    p as *mut T
}
/// `%dynamic_smem_size`.
#[inline(always)]
pub fn dyn_smem_bytes() -> u32 {
    let r: u32;
    // SAFETY: reads a special register.
    unsafe { asm!("mov.u32 {r}, %dynamic_smem_size;", r = out(reg32) r, options(pure, nomem, nostack)) };
    r
}
/// `atom.shared.add.u32` on a generic pointer into shared memory; returns the old value.
///
/// # Safety
/// `p` points into this block's shared memory, 4-byte aligned.
#[inline(always)]
pub unsafe fn atom_add_shared_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: caller's contract.
    unsafe {
        asm!("{{ .reg .u64 %sa; cvta.to.shared.u64 %sa, {p}; atom.shared.add.u32 {o}, [%sa], {v}; }}",
             p = in(reg64) p, v = in(reg32) v, o = out(reg32) old, options(nostack))
    };
    old
}

// ------------------------------------------------------------------ loads / stores with semantics
macro_rules! ld_st {
    ($ld:ident, $st:ident, $t:ty, $reg:ident, $lsem:literal, $ssem:literal, $ty:literal) => {
        #[doc = concat!("`ld.", $lsem, ".sys.global.", $ty, "`.")]
        ///
        /// # Safety
        /// `p` is a valid, aligned global address.
        #[inline(always)]
        pub unsafe fn $ld(p: *const $t) -> $t {
            let v: $t;
            // SAFETY: caller's contract.
            unsafe { asm!(concat!("ld.", $lsem, ".sys.global.", $ty, " {v}, [{p}];"), p = in(reg64) p, v = out($reg) v, options(nostack)) };
            v
        }
        #[doc = concat!("`st.", $ssem, ".sys.global.", $ty, "`.")]
        ///
        /// # Safety
        /// `p` is a valid, aligned global address.
        #[inline(always)]
        pub unsafe fn $st(p: *mut $t, v: $t) {
            // SAFETY: caller's contract.
            unsafe { asm!(concat!("st.", $ssem, ".sys.global.", $ty, " [{p}], {v};"), p = in(reg64) p, v = in($reg) v, options(nostack)) }
        }
    };
}
ld_st!(ld_acquire_sys_u32, st_release_sys_u32, u32, reg32, "acquire", "release", "u32");
ld_st!(ld_acquire_sys_u64, st_release_sys_u64, u64, reg64, "acquire", "release", "u64");
ld_st!(ld_relaxed_sys_u32, st_relaxed_sys_u32, u32, reg32, "relaxed", "relaxed", "u32");
ld_st!(ld_relaxed_sys_u64, st_relaxed_sys_u64, u64, reg64, "relaxed", "relaxed", "u64");

// ------------------------------------------------------------------ atomics and reductions
/// `atom.relaxed.gpu.global.add.u32`; returns the old value. A counter, orders nothing.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn atom_add_relaxed_gpu_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: caller's contract.
    unsafe {
        asm!("atom.relaxed.gpu.global.add.u32 {o}, [{p}], {v};", p = in(reg64) p, v = in(reg32) v, o = out(reg32) old, options(nostack))
    };
    old
}
/// `atom.relaxed.gpu.global.add.u64`; returns the old value. A claim counter, orders nothing.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn atom_add_relaxed_gpu_u64(p: *mut u64, v: u64) -> u64 {
    let old: u64;
    // SAFETY: caller's contract.
    unsafe {
        asm!("atom.relaxed.gpu.global.add.u64 {o}, [{p}], {v};", p = in(reg64) p, v = in(reg64) v, o = out(reg64) old, options(nostack))
    };
    old
}
/// `atom.relaxed.sys.global.add.u32`; returns the old value. A counter any GPU may add to
/// (a peer's, over NVLink); orders nothing.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn atom_add_relaxed_sys_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: caller's contract.
    unsafe {
        asm!("atom.relaxed.sys.global.add.u32 {o}, [{p}], {v};", p = in(reg64) p, v = in(reg32) v, o = out(reg32) old, options(nostack))
    };
    old
}
/// `atom.release.gpu.global.add.u32`; returns the old value. Publishes prior writes to the GPU.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn atom_add_release_gpu_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: caller's contract.
    unsafe {
        asm!("atom.release.gpu.global.add.u32 {o}, [{p}], {v};", p = in(reg64) p, v = in(reg32) v, o = out(reg32) old, options(nostack))
    };
    old
}
/// `atom.acq_rel.sys.global.cas.b32`; returns the old value.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn atom_cas_acq_rel_sys_u32(p: *mut u32, cmp: u32, new: u32) -> u32 {
    let old: u32;
    // SAFETY: caller's contract.
    unsafe {
        asm!("atom.acq_rel.sys.global.cas.b32 {o}, [{p}], {c}, {n};",
             p = in(reg64) p, c = in(reg32) cmp, n = in(reg32) new, o = out(reg32) old, options(nostack))
    };
    old
}
/// `red.release.sys.global.add.u32`: add with release semantics, no return value.
///
/// # Safety
/// `p` is a valid, aligned global address.
#[inline(always)]
pub unsafe fn red_add_release_sys_u32(p: *mut u32, v: u32) {
    // SAFETY: caller's contract.
    unsafe { asm!("red.release.sys.global.add.u32 [{p}], {v};", p = in(reg64) p, v = in(reg32) v, options(nostack)) }
}
/// `red.release.sys.global.add.u64`.
///
/// # Safety
/// `p` is a valid, 8-aligned global address.
#[inline(always)]
pub unsafe fn red_add_release_sys_u64(p: *mut u64, v: u64) {
    // SAFETY: caller's contract.
    unsafe { asm!("red.release.sys.global.add.u64 [{p}], {v};", p = in(reg64) p, v = in(reg64) v, options(nostack)) }
}

/// `red.relaxed.gpu.global.add.u64`: add, no return value, orders nothing. Statistics this
/// GPU accumulates and reads after the kernel.
///
/// # Safety
/// `p` is a valid, 8-aligned global address.
#[inline(always)]
pub unsafe fn red_add_relaxed_gpu_u64(p: *mut u64, v: u64) {
    // SAFETY: caller's contract.
    unsafe { asm!("red.relaxed.gpu.global.add.u64 [{p}], {v};", p = in(reg64) p, v = in(reg64) v, options(nostack)) }
}

// ------------------------------------------------------------------ fences
/// `fence.acq_rel.gpu`.
#[inline(always)]
pub fn fence_acq_rel_gpu() {
    // SAFETY: a fence.
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
}
/// `fence.acq_rel.sys`: orders this thread's accesses for every GPU and the host.
#[inline(always)]
pub fn fence_acq_rel_sys() {
    // SAFETY: a fence.
    unsafe { asm!("fence.acq_rel.sys;", options(nostack)) }
}
/// `fence.sc.sys`.
#[inline(always)]
pub fn fence_sc_sys() {
    // SAFETY: a fence.
    unsafe { asm!("fence.sc.sys;", options(nostack)) }
}

// ------------------------------------------------------------------ 16-byte data moves
/// `ld.global.nc.v4.u32`: read-only-path load. Only for data no one writes during the kernel.
///
/// # Safety
/// `p` is a valid, 16-aligned global address.
#[inline(always)]
pub unsafe fn ld_nc_v4(p: *const U4) -> U4 {
    let (x, y, z, w): (u32, u32, u32, u32);
    // SAFETY: caller's contract.
    unsafe {
        asm!("ld.global.nc.v4.u32 {{{x}, {y}, {z}, {w}}}, [{p}];",
             p = in(reg64) p, x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w,
             options(readonly, nostack, preserves_flags))
    };
    U4 { x, y, z, w }
}
/// `ld.global.v4.u32`: coherent load (data another thread or GPU published).
///
/// # Safety
/// `p` is a valid, 16-aligned global address.
#[inline(always)]
pub unsafe fn ld_v4(p: *const U4) -> U4 {
    let (x, y, z, w): (u32, u32, u32, u32);
    // SAFETY: caller's contract.
    unsafe {
        asm!("ld.global.v4.u32 {{{x}, {y}, {z}, {w}}}, [{p}];",
             p = in(reg64) p, x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w,
             options(nostack, preserves_flags))
    };
    U4 { x, y, z, w }
}
/// `st.global.v4.u32`: 16-byte store, local or to an NVLink/IPC peer address.
///
/// # Safety
/// `p` is a valid, 16-aligned global address.
#[inline(always)]
pub unsafe fn st_v4(p: *mut U4, v: U4) {
    // SAFETY: caller's contract.
    unsafe {
        asm!("st.global.v4.u32 [{p}], {{{x}, {y}, {z}, {w}}};",
             p = in(reg64) p, x = in(reg32) v.x, y = in(reg32) v.y, z = in(reg32) v.z, w = in(reg32) v.w,
             options(nostack))
    }
}

// ------------------------------------------------------------------ warp collectives
// Not `pure`: a collective must not be hoisted, merged or duplicated across control flow.
/// `shfl.sync.bfly.b32` over the full warp. Warp-cooperative: all 32 lanes call together.
#[inline(always)]
pub fn shfl_bfly_u32(v: u32, lane_mask: u32) -> u32 {
    let r: u32;
    // SAFETY: full-warp shuffle.
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 0x1f, 0xffffffff;",
             r = out(reg32) r, v = in(reg32) v, m = in(reg32) lane_mask, options(nostack))
    };
    r
}
/// `shfl.sync.idx.b32` (broadcast from `src_lane`). Warp-cooperative.
#[inline(always)]
pub fn shfl_idx_u32(v: u32, src_lane: u32) -> u32 {
    let r: u32;
    // SAFETY: full-warp shuffle.
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, {s}, 0x1f, 0xffffffff;",
             r = out(reg32) r, v = in(reg32) v, s = in(reg32) src_lane, options(nostack))
    };
    r
}
/// `match.any.sync.b32`: the lanes whose `v` equals this lane's. Warp-cooperative.
#[inline(always)]
pub fn match_any_u32(v: u32) -> u32 {
    let r: u32;
    // SAFETY: full-warp match.
    unsafe { asm!("match.any.sync.b32 {r}, {v}, 0xffffffff;", r = out(reg32) r, v = in(reg32) v, options(nostack)) };
    r
}
/// `vote.sync.ballot.b32`: bit `i` set iff lane `i`'s `pred`. Warp-cooperative.
#[inline(always)]
pub fn ballot(pred: bool) -> u32 {
    let r: u32;
    // SAFETY: full-warp vote.
    unsafe {
        asm!("{{ .reg .pred %p; setp.ne.u32 %p, {x}, 0; vote.sync.ballot.b32 {r}, %p, 0xffffffff; }}",
             x = in(reg32) pred as u32, r = out(reg32) r, options(nostack))
    };
    r
}

// ------------------------------------------------------------------ arithmetic
/// `fma.rn.f32`: `a * b + c` with one rounding (what the CPU reference's `mul_add` does).
#[inline(always)]
pub fn fma_rn_f32(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe {
        asm!("fma.rn.f32 {r}, {a}, {b}, {c};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c,
             options(pure, nomem, nostack))
    };
    r
}

/// `cvt.rn.satfinite.e4m3x2.f32`: two f32 to fp8 e4m3, `lo` in the low byte.
#[inline(always)]
pub fn cvt_e4m3x2(lo: f32, hi: f32) -> u16 {
    let r: u16;
    // SAFETY: pure arithmetic (sm_89+).
    unsafe {
        asm!("cvt.rn.satfinite.e4m3x2.f32 {r}, {hi}, {lo};", r = out(reg16) r, hi = in(reg32) hi, lo = in(reg32) lo,
             options(pure, nomem, nostack))
    };
    r
}

// ------------------------------------------------------------------ time
/// `%globaltimer` in nanoseconds: a clock-rate-independent bound for waits.
#[inline(always)]
pub fn globaltimer_ns() -> u64 {
    let t: u64;
    // SAFETY: reads a special register; volatile (not pure) so it is re-read in loops.
    unsafe { asm!("mov.u64 {t}, %globaltimer;", t = out(reg64) t, options(nomem, nostack)) };
    t
}
/// `%clock64`: this SM's cycle counter, to measure short waits (SM cycles, not time: it
/// runs at the SM clock and SMs' counters are unrelated).
#[inline(always)]
pub fn clock64() -> u64 {
    let t: u64;
    // SAFETY: reads a special register; volatile (not pure) so it is re-read.
    unsafe { asm!("mov.u64 {t}, %clock64;", t = out(reg64) t, options(nomem, nostack)) };
    t
}
/// `nanosleep.u32`: yield the issue slot for about `ns` nanoseconds.
#[inline(always)]
pub fn nanosleep_ns(ns: u32) {
    // SAFETY: a sleep.
    unsafe { asm!("nanosleep.u32 {n};", n = in(reg32) ns, options(nomem, nostack)) }
}
/// One step of a polling loop's back-off: spin briefly, then sleep a little, so waiting
/// warps leave issue slots to the warps doing the work.
#[inline(always)]
pub fn backoff(spins: u32) {
    if spins > 64 {
        nanosleep_ns(64);
    }
}
