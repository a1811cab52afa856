//! Warp-cooperative data movement shared by the HT and LL kernels.
use crate::abi::WARP_SIZE;
use crate::dev::{self, U4};

/// 16-byte loads each lane keeps in flight before storing: one load at a time leaves a
/// warp waiting a full memory (or NVLink) latency per 512 bytes.
const UNROLL: usize = 4;

#[inline(always)]
unsafe fn load(src: u64, v: u64, read_only: bool) -> U4 {
    // SAFETY: the caller of `copy_warp` guarantees the range.
    unsafe {
        let p = (src as *const U4).add(v as usize);
        if read_only { dev::ld_nc_v4(p) } else { dev::ld_v4(p) }
    }
}

/// Warp-cooperative copy of `bytes` (a multiple of 16) from `src` to `dst` (local or peer
/// addresses). `src_read_only`: nobody writes `src` during the kernel, so the
/// non-coherent path (`ld.global.nc`) may serve it.
///
/// # Safety
/// Both ranges are valid, 16-byte aligned, `bytes` long. All 32 lanes call together.
#[inline(always)]
pub unsafe fn copy_warp(dst: u64, src: u64, bytes: u64, src_read_only: bool) {
    let n = bytes / 16;
    let lane = dev::lane_id() as u64;
    let warp = WARP_SIZE as u64;
    let step = warp * UNROLL as u64;
    let mut base = 0u64;
    // SAFETY (both loops): indices stay below `n` vectors.
    unsafe {
        while base + step <= n {
            let mut x = [U4::default(); UNROLL];
            for (j, x) in x.iter_mut().enumerate() {
                *x = load(src, base + lane + warp * j as u64, src_read_only);
            }
            for (j, x) in x.iter().enumerate() {
                dev::st_v4((dst as *mut U4).add((base + lane + warp * j as u64) as usize), *x);
            }
            base += step;
        }
        let mut v = base + lane;
        while v < n {
            dev::st_v4((dst as *mut U4).add(v as usize), load(src, v, src_read_only));
            v += warp;
        }
    }
}
