//! Kernels that exercise each `dev` primitive, checked by the host's tests on the CPU
//! emulator (CI) and on the GPU (the bundle). Each doc says what it writes; the checks are
//! in `tests/tests/primitives.rs`.
use crate::abi::{ErrorSlot, SelfTestParams};
use crate::dev::{self, U4};

kernel! {
    /// Indices: `c[4*g..4*g+4] = [tid, ctaid, ntid | nctaid<<16, laneid | warp<<8 | nwarps<<16]`
    /// for global thread `g`.
    pub unsafe fn selftest_indices(p: SelfTestParams) as SELFTEST_INDICES {
        let g = dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x();
        let out = p.c as *mut u32;
        // SAFETY: `c` holds 4 words per launched thread.
        unsafe {
            *out.add(4 * g as usize) = dev::thread_idx_x();
            *out.add(4 * g as usize + 1) = dev::block_idx_x();
            *out.add(4 * g as usize + 2) = dev::block_dim_x() | dev::grid_dim_x() << 16;
            *out.add(4 * g as usize + 3) = dev::lane_id() | dev::warp_id() << 8 | dev::num_warps() << 16;
        }
    }
}

kernel! {
    /// Shared memory. Each block reverses its `block_dim` words of `a` into `c` through
    /// dynamic shared memory (launch with `block_dim*4` bytes), and histograms `a[i] % 64`
    /// into the static array with `atom.shared`, then into `b[0..64]` with `atom.relaxed.gpu`.
    /// Thread 0 of block 0 writes `dyn_smem_bytes()` to `b[64]`. `n` = words in `a`.
    pub unsafe fn selftest_smem(p: SelfTestParams) as SELFTEST_SMEM {
        let t = dev::thread_idx_x();
        let bd = dev::block_dim_x();
        let i = dev::block_idx_x() * bd + t;
        let (a, b, c) = (p.a as *const u32, p.b as *mut u32, p.c as *mut u32);
        let rev: *mut u32 = dev::dyn_smem();
        let hist: *mut u32 = dev::static_smem();
        // SAFETY: `a`,`c` hold `n` words, `b` 65; smem sizes as documented.
        unsafe {
            if t < 64 {
                *hist.add(t as usize) = 0;
            }
            *rev.add(t as usize) = if (i as u64) < p.n { *a.add(i as usize) } else { 0 };
            dev::sync_threads();
            if (i as u64) < p.n {
                dev::atom_add_shared_u32(hist.add((*a.add(i as usize) % 64) as usize), 1);
            }
            let j = dev::block_idx_x() * bd + (bd - 1 - t);
            if (j as u64) < p.n {
                *c.add(j as usize) = *rev.add(t as usize);
            }
            dev::sync_threads();
            if t < 64 && *hist.add(t as usize) != 0 {
                dev::atom_add_relaxed_gpu_u32(b.add(t as usize), *hist.add(t as usize));
            }
            if i == 0 {
                *b.add(64) = dev::dyn_smem_bytes();
            }
        }
    }
}

kernel! {
    /// Warp collectives over `a` (one word per thread): per global warp `w`,
    /// `c[4w] = Σ` (butterfly shuffle), `c[4w+1] = ballot(odd)`, `c[4w+2] = value of lane 5`
    /// (index shuffle), `c[4w+3] = Σ` again after `sync_warp`.
    pub unsafe fn selftest_warp(p: SelfTestParams) as SELFTEST_WARP {
        let g = dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x();
        // SAFETY: `a` has one word per thread, `c` four per warp.
        unsafe {
            let v = *(p.a as *const u32).add(g as usize);
            let mut sum = v;
            let mut m = 16;
            while m >= 1 {
                sum = sum.wrapping_add(dev::shfl_bfly_u32(sum, m));
                m >>= 1;
            }
            let odd = dev::ballot(v & 1 == 1);
            let from5 = dev::shfl_idx_u32(v, 5);
            dev::sync_warp(0xffff_ffff);
            if dev::lane_id() == 0 {
                let out = (p.c as *mut u32).add(4 * (g / 32) as usize);
                *out = sum;
                *out.add(1) = odd;
                *out.add(2) = from5;
                *out.add(3) = sum;
            }
        }
    }
}

kernel! {
    /// 16-byte moves: `b[i] = ld.nc(a[i])` then `c[i] = ld(b[i])` for `n` vectors.
    pub unsafe fn selftest_copy_v4(p: SelfTestParams) as SELFTEST_COPY_V4 {
        let stride = (dev::block_dim_x() * dev::grid_dim_x()) as u64;
        let mut i = (dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x()) as u64;
        let (a, b, c) = (p.a as *const U4, p.b as *mut U4, p.c as *mut U4);
        while i < p.n {
            // SAFETY: each buffer holds `n` 16-byte-aligned vectors.
            unsafe {
                dev::st_v4(b.add(i as usize), dev::ld_nc_v4(a.add(i as usize)));
                dev::st_v4(c.add(i as usize), dev::ld_v4(b.add(i as usize)));
            }
            i += stride;
        }
    }
}

/// Rounds of [`selftest_message_passing`], one per publish/observe pairing.
pub const MESSAGE_ROUNDS: u32 = 8;

kernel! {
    /// Message passing between the two blocks of a 2-block launch (so both must run at
    /// once). In round `r` block 0 writes `a[r*n + i] = r*1000 + i`, then publishes flag
    /// `b[r]` (u64 slots) with one pairing:
    /// 0 `st.release.sys.u32`, 1 `st.release.sys.u64`, 2 `fence.sc.sys` + `st.relaxed.sys.u64`,
    /// 3 `red.release.sys.add.u32`, 4 `red.release.sys.add.u64`, 5 `atom.release.gpu.add.u32`,
    /// 6 `atom.acq_rel.sys.cas`, 7 `fence.acq_rel.gpu` + `st.relaxed.sys.u32`. Block 1
    /// observes it (acquire load, or relaxed load + fence in rounds 2 and 7) through
    /// `wait_until`, then `c[r] = Σ a[r*n..r*n+n]` (u64 slots).
    /// A wait past `timeout_ns` reports site `r` into `error`.
    pub unsafe fn selftest_message_passing(p: SelfTestParams) as SELFTEST_MESSAGE_PASSING {
        let t = dev::thread_idx_x();
        let bd = dev::block_dim_x() as u64;
        let (data, flags, sums) = (p.a as *mut u32, p.b as *mut u64, p.c as *mut u64);
        let err = p.error as *mut ErrorSlot;
        for r in 0..MESSAGE_ROUNDS {
            // SAFETY: `a` holds MESSAGE_ROUNDS*n words, `b` and `c` MESSAGE_ROUNDS u64 slots.
            unsafe {
                let flag = flags.add(r as usize);
                let flag32 = flag as *mut u32;
                if dev::block_idx_x() == 0 {
                    let mut i = t as u64;
                    while i < p.n {
                        *data.add((r as u64 * p.n + i) as usize) = r * 1000 + i as u32;
                        i += bd;
                    }
                    dev::sync_threads();
                    if t == 0 {
                        dev::fence_acq_rel_sys();
                        match r {
                            0 => dev::st_release_sys_u32(flag32, 1),
                            1 => dev::st_release_sys_u64(flag, 1),
                            2 => {
                                dev::fence_sc_sys();
                                dev::st_relaxed_sys_u64(flag, 1);
                            }
                            3 => dev::red_add_release_sys_u32(flag32, 1),
                            4 => dev::red_add_release_sys_u64(flag, 1),
                            5 => {
                                dev::atom_add_release_gpu_u32(flag32, 1);
                            }
                            6 => {
                                dev::atom_cas_acq_rel_sys_u32(flag32, 0, 1);
                            }
                            _ => {
                                dev::fence_acq_rel_gpu();
                                dev::st_relaxed_sys_u32(flag32, 1);
                            }
                        }
                    }
                } else {
                    let mut arrived = true;
                    if t == 0 {
                        let mut seen = 0u64;
                        arrived = dev::wait_until(p.timeout_ns, || {
                            seen = match r {
                                1 | 4 => dev::ld_acquire_sys_u64(flag),
                                2 => {
                                    let v = dev::ld_relaxed_sys_u64(flag);
                                    dev::fence_acq_rel_sys();
                                    v
                                }
                                7 => {
                                    let v = dev::ld_relaxed_sys_u32(flag32) as u64;
                                    dev::fence_acq_rel_gpu();
                                    v
                                }
                                _ => dev::ld_acquire_sys_u32(flag32) as u64,
                            };
                            seen == 1
                        });
                        if !arrived {
                            dev::report_timeout(err, 0, 0, r, 1, seen);
                        }
                    }
                    // Every thread leaves if thread 0's wait failed (`bar.red.or`).
                    if dev::sync_threads_or(!arrived) {
                        return;
                    }
                    if t == 0 {
                        let mut sum = 0u64;
                        for i in 0..p.n {
                            sum += *data.add((r as u64 * p.n + i) as usize) as u64;
                        }
                        *sums.add(r as usize) = sum;
                    }
                    dev::sync_threads();
                }
            }
        }
    }
}

kernel! {
    /// Contended atomics from every thread: `c[0] += 1` (`atom.relaxed.gpu`), `c[1] += 2`
    /// (`atom.release.gpu`), `c[2] += 3` (`red.release.sys`), `c[3]`: CAS 0 → g+1 (one winner,
    /// counted in `c[4]`), `b[0] += g` as u64 (`red.release.sys.u64`).
    pub unsafe fn selftest_atomics(p: SelfTestParams) as SELFTEST_ATOMICS {
        let g = dev::block_idx_x() * dev::block_dim_x() + dev::thread_idx_x();
        let c = p.c as *mut u32;
        // SAFETY: `c` holds 5 words, `b` one u64.
        unsafe {
            dev::atom_add_relaxed_gpu_u32(c, 1);
            dev::atom_add_release_gpu_u32(c.add(1), 2);
            dev::red_add_release_sys_u32(c.add(2), 3);
            if dev::atom_cas_acq_rel_sys_u32(c.add(3), 0, g + 1) == 0 {
                dev::atom_add_relaxed_gpu_u32(c.add(4), 1);
            }
            dev::red_add_release_sys_u64(p.b as *mut u64, g as u64);
        }
    }
}

kernel! {
    /// A wait that never succeeds: thread 0 waits for `a[0] == 1` (nobody writes it) for
    /// `timeout_ns`, then reports a timeout (rank `value`, peer 7, site 42, expected 1) and
    /// writes the elapsed `%globaltimer` ns to `c[0]`. Then it sleeps in `nanosleep` steps
    /// until the timer moved 2000 ns: `c[1] = 1` if it did within `timeout_ns`.
    pub unsafe fn selftest_timeout(p: SelfTestParams) as SELFTEST_TIMEOUT {
        if dev::thread_idx_x() != 0 || dev::block_idx_x() != 0 {
            return;
        }
        // SAFETY: `a` one u64, `c` two u64, `error` the host-visible record.
        unsafe {
            let flag = p.a as *const u64;
            let out = p.c as *mut u64;
            let t0 = dev::globaltimer_ns();
            let mut seen = 0;
            let arrived = dev::wait_until(p.timeout_ns, || {
                seen = dev::ld_acquire_sys_u64(flag);
                seen == 1
            });
            let elapsed = dev::globaltimer_ns().wrapping_sub(t0);
            if !arrived {
                dev::report_timeout(p.error as *mut ErrorSlot, p.value as u32, 7, 42, 1, seen);
            }
            *out = elapsed;
            let t1 = dev::globaltimer_ns();
            let moved = dev::wait_until(p.timeout_ns, || {
                dev::nanosleep_ns(500);
                dev::globaltimer_ns().wrapping_sub(t1) >= 2000
            });
            *out.add(1) = moved as u64;
        }
    }
}
