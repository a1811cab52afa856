//! The CPU emulator's own guarantees (kernel-level tests of every primitive are in
//! `tests/tests/primitives.rs`, which also run on the GPU).
#![cfg(not(target_arch = "nvptx64"))]
use moe_ep_kernels::dev;
use std::sync::atomic::{AtomicU32, Ordering};

#[test]
fn all_blocks_of_a_launch_run_at_once() {
    // Block b waits for block (b+1) % grid: only possible if every block is resident.
    let grid = 8u32;
    let flags: Vec<AtomicU32> = (0..grid).map(|_| AtomicU32::new(0)).collect();
    let base = flags.as_ptr() as usize;
    let ok = AtomicU32::new(0);
    let r = unsafe {
        dev::launch(grid, 32, 0, || {
            let b = dev::block_idx_x();
            let f = |i: u32| (base as *mut u32).wrapping_add(i as usize);
            if dev::thread_idx_x() == 0 {
                dev::st_release_sys_u32(f(b), 1);
                if dev::wait_until(10_000_000_000, || dev::ld_acquire_sys_u32(f((b + 1) % grid)) == 1) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    r.unwrap();
    assert_eq!(ok.load(Ordering::Relaxed), grid);
}

#[test]
fn sync_threads_or_reduces_over_the_block() {
    let hits = AtomicU32::new(0);
    unsafe {
        dev::launch(2, 64, 0, || {
            let t = dev::thread_idx_x();
            for round in 0..10u32 {
                // Round r: only thread r*5 of block 1 votes true.
                let vote = dev::block_idx_x() == 1 && t == round * 5;
                let any = dev::sync_threads_or(vote);
                assert_eq!(any, dev::block_idx_x() == 1, "round {round}");
                if any && t == 0 {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    }
    .unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 10);
}

#[test]
fn a_panicking_thread_aborts_the_launch_instead_of_hanging() {
    let r = unsafe {
        dev::launch(2, 64, 0, || {
            if dev::block_idx_x() == 1 && dev::thread_idx_x() == 3 {
                panic!("boom");
            }
            dev::sync_threads(); // the rest of block 1 would wait forever
        })
    };
    let e = r.unwrap_err();
    assert!(e.contains("boom"), "{e}");
}

#[test]
fn global_operations_on_shared_memory_are_caught() {
    // The GPU faults with CUDA_ERROR_INVALID_ADDRESS_SPACE here; the emulator must too.
    let r = unsafe { dev::launch(1, 32, 0, || dev::st_relaxed_sys_u32(dev::static_smem(), 1)) };
    assert!(r.unwrap_err().contains("shared-memory address"));
    let r = unsafe {
        dev::launch(1, 32, 64, || {
            dev::ld_v4(dev::dyn_smem());
        })
    };
    assert!(r.is_err());
}

#[test]
fn bad_launch_shapes_are_errors() {
    for (g, b) in [(0, 32), (1, 0), (1, 48), (1000, 1024)] {
        assert!(unsafe { dev::launch(g, b, 0, || {}) }.is_err(), "{g}x{b}");
    }
}

#[test]
fn atomics_on_host_mapped_memory_are_caught() {
    // PCIe GPUs can't do atomics on host memory (the kernel faults); the emulator must agree.
    let word = Box::new(AtomicU32::new(0));
    let addr = word.as_ptr() as usize;
    dev::register_host_mapped(addr, 4);
    let r = unsafe {
        dev::launch(1, 32, 0, || {
            dev::atom_cas_acq_rel_sys_u32(addr as *mut u32, 0, 1);
        })
    };
    let plain = unsafe { dev::launch(1, 32, 0, || dev::st_release_sys_u32(addr as *mut u32, 7)) };
    dev::unregister_host_mapped(addr);
    assert!(r.unwrap_err().contains("host-memory address"));
    plain.unwrap(); // plain (release) stores to host memory are fine
    assert_eq!(word.load(Ordering::Relaxed), 7);
}
