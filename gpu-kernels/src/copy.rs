//! Warp-cooperative data movement shared by the HT and LL kernels.
use crate::abi::WARP_SIZE;
use crate::dev::{self, U4};

/// 16-byte loads each lane keeps in flight before storing: one load at a time leaves a
/// warp waiting a full memory (or NVLink) latency per 512 bytes.
const UNROLL: usize = 4;
/// Bytes a warp moves per step of [`copy_warp_to_many`] (its loads in flight): a row split
/// at multiples of this keeps every step whole.
pub const COPY_STEP_BYTES: u64 = WARP_SIZE as u64 * UNROLL as u64 * 16;

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
    // SAFETY: forwarded contract.
    unsafe { copy_warp_n::<UNROLL>(dst, src, bytes, src_read_only) }
}

/// [`copy_warp`] with `N` loads in flight per lane: for copies that few warps make, where
/// more bytes in flight per warp keep memory (or NVLink) busy.
///
/// # Safety
/// As [`copy_warp`].
#[inline(always)]
pub unsafe fn copy_warp_n<const N: usize>(dst: u64, src: u64, bytes: u64, src_read_only: bool) {
    let n = bytes / 16;
    let lane = dev::lane_id() as u64;
    let warp = WARP_SIZE as u64;
    let step = warp * N as u64;
    let mut base = 0u64;
    // SAFETY (both loops): indices stay below `n` vectors.
    unsafe {
        while base + step <= n {
            let mut x = [U4::default(); N];
            for (j, x) in x.iter_mut().enumerate() {
                *x = load(src, base + lane + warp * j as u64, src_read_only);
            }
            for (j, x) in x.iter().enumerate() {
                dev::st_v4((dst as *mut U4).add((base + lane + warp * j as u64) as usize), *x);
            }
            base += step;
        }
        // A partial last step: its loads too are all issued before its stores (predicated
        // only here: the checks cost issue slots in the full steps).
        if base < n {
            let mut x = [U4::default(); N];
            for (j, x) in x.iter_mut().enumerate() {
                let v = base + lane + warp * j as u64;
                if v < n {
                    *x = load(src, v, src_read_only);
                }
            }
            for (j, x) in x.iter().enumerate() {
                let v = base + lane + warp * j as u64;
                if v < n {
                    dev::st_v4((dst as *mut U4).add(v as usize), *x);
                }
            }
        }
    }
}

/// `v` of lane `src_lane` (a 64-bit warp shuffle).
#[inline(always)]
pub fn shfl_idx_u64(v: u64, src_lane: u32) -> u64 {
    let lo = dev::shfl_idx_u32(v as u32, src_lane);
    let hi = dev::shfl_idx_u32((v >> 32) as u32, src_lane);
    (hi as u64) << 32 | lo as u64
}

/// Warp-cooperative copy of one row `src` (`bytes`, a multiple of 16, nobody writes it during
/// the kernel) to several destinations: lane `k` holds destination `k` in `dst_of_lane`, for
/// each bit `k` of `lanes`. The row is read once: each step's loads are stored to every
/// destination, so a token sent to 8 experts costs one read, not 8.
///
/// # Safety
/// `src` and every destination are valid, 16-byte aligned ranges of `bytes`. All 32 lanes
/// call together, with the same `lanes`.
#[inline(always)]
pub unsafe fn copy_warp_to_many(dst_of_lane: u64, lanes: u32, src: u64, bytes: u64) {
    let n = bytes / 16;
    let lane = dev::lane_id() as u64;
    let warp = WARP_SIZE as u64;
    let step = warp * UNROLL as u64;
    let mut base = 0u64;
    // SAFETY (both parts): indices stay below `n` vectors of every range.
    unsafe {
        while base + step <= n {
            let mut x = [U4::default(); UNROLL];
            for (j, x) in x.iter_mut().enumerate() {
                *x = load(src, base + lane + warp * j as u64, true);
            }
            let mut m = lanes;
            while m != 0 {
                let dst = shfl_idx_u64(dst_of_lane, m.trailing_zeros());
                m &= m - 1;
                for (j, x) in x.iter().enumerate() {
                    dev::st_v4((dst as *mut U4).add((base + lane + warp * j as u64) as usize), *x);
                }
            }
            base += step;
        }
        // A partial last step, predicated (every lane still shuffles).
        if base < n {
            let mut x = [U4::default(); UNROLL];
            for (j, x) in x.iter_mut().enumerate() {
                let v = base + lane + warp * j as u64;
                if v < n {
                    *x = load(src, v, true);
                }
            }
            let mut m = lanes;
            while m != 0 {
                let dst = shfl_idx_u64(dst_of_lane, m.trailing_zeros());
                m &= m - 1;
                for (j, x) in x.iter().enumerate() {
                    let v = base + lane + warp * j as u64;
                    if v < n {
                        dev::st_v4((dst as *mut U4).add(v as usize), *x);
                    }
                }
            }
        }
    }
}
