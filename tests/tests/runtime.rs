//! The host runtime on the device of `MOE_EP_DEVICE`: events and stream ordering, mapped
//! host memory both ways, typed errors for bad devices and out-of-range copies.
// Every launch below passes buffers allocated right before it, sized as the kernel's docs say.
#![allow(clippy::undocumented_unsafe_blocks)]

use moe_ep::kernels::selftest::{SELFTEST_COPY_V4, SELFTEST_TIMEOUT};
use moe_ep::{Device, Error, ErrorRecord, LaunchConfig};
use moe_ep_abi::SelfTestParams;
use moe_ep_tests::{Rng, device};

const ONE_WARP: LaunchConfig = LaunchConfig { grid_dim: 1, block_dim: 32, shared_mem_bytes: 0 };

#[test]
fn events_time_work_and_order_streams() {
    let dev = device();
    let (a, b) = (dev.new_stream().unwrap(), dev.new_stream().unwrap());
    let flag = dev.alloc(16).unwrap();
    let out = dev.alloc(16).unwrap();
    let copy = dev.alloc(16).unwrap();
    let err = ErrorRecord::new(&dev).unwrap();
    let wait_ns = 30_000_000u64;
    let start = a.record_event().unwrap();
    // Stream a: a kernel that waits 30 ms (its flag never comes), then writes `out`.
    let p = SelfTestParams { a: flag.ptr(), c: out.ptr(), error: err.ptr(), timeout_ns: wait_ns, ..Default::default() };
    unsafe { a.launch(&SELFTEST_TIMEOUT, ONE_WARP, p) }.unwrap();
    let done = a.record_event().unwrap();
    // Stream b copies `out` only after `done`: it must see what stream a wrote.
    b.wait_event(&done).unwrap();
    let p = SelfTestParams { a: out.ptr(), b: copy.ptr(), c: copy.ptr(), n: 1, ..Default::default() };
    unsafe { b.launch(&SELFTEST_COPY_V4, ONE_WARP, p) }.unwrap();
    b.synchronize().unwrap();
    let ms = start.elapsed_ms(&done).unwrap();
    assert!(ms >= 0.9 * wait_ns as f32 / 1e6, "events measured {ms} ms around a {wait_ns} ns wait");
    let got: Vec<u64> = copy.to_vec(&b).unwrap();
    assert!(got[0] >= wait_ns && got[1] == 1, "stream b ran before stream a's kernel finished: {got:?}");
    assert!(matches!(err.take("selftest_timeout"), Err(Error::Timeout { .. })));
}

/// More in-process ranks on one GPU than its hardware queues is refused, not left to hang;
/// the emulator has no such limit.
#[test]
fn too_many_ranks_on_one_gpu_are_refused() {
    let dev = device();
    let queues: usize = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let too_many = vec![dev.clone(); queues + 1];
    match moe_ep::Group::in_process(&too_many) {
        Err(Error::Unsupported(what)) => assert!(!dev.is_cpu(), "the emulator refused: {what}"),
        Ok(groups) => assert!(dev.is_cpu(), "{} ranks on one GPU accepted", groups.len()),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn mapped_host_memory_both_ways() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let words = Rng::fresh("mapped").words(64);
    let src = dev.alloc_host_mapped(256).unwrap();
    let dst = dev.alloc_host_mapped(256).unwrap();
    for (i, w) in words.iter().enumerate() {
        src.write(4 * i, *w).unwrap();
    }
    let tmp = dev.alloc(256).unwrap();
    // host -> kernel (reads mapped memory) -> kernel writes mapped memory -> host
    let p = SelfTestParams { a: src.device_ptr(), b: tmp.ptr(), c: dst.device_ptr(), n: 16, ..Default::default() };
    unsafe { s.launch(&SELFTEST_COPY_V4, ONE_WARP, p) }.unwrap();
    s.synchronize().unwrap();
    let got: Vec<u32> = (0..64).map(|i| dst.read(4 * i).unwrap()).collect();
    assert_eq!(got, words);
    assert!(matches!(dst.read::<u32>(256), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dst.read::<u32>(2), Err(Error::InvalidArgument { .. })));
}

#[test]
fn device_errors_are_typed_never_panics() {
    assert!(matches!(Device::from_name("tpu"), Err(Error::InvalidArgument { arg: "device", .. })));
    assert!(matches!(Device::from_name("cuda:x"), Err(Error::InvalidArgument { .. })));
    // No GPU (CI): NoDriver; a GPU machine: GPU 99 does not exist.
    match Device::cuda(99) {
        Err(Error::NoDriver(_)) | Err(Error::InvalidArgument { arg: "ordinal", .. }) => {}
        other => panic!("expected a typed error, got {other:?}"),
    }
    let dev = device();
    let s = dev.new_stream().unwrap();
    let b = dev.alloc(64).unwrap();
    assert!(matches!(b.write(&s, 60, &[0u32; 2]), Err(Error::InvalidArgument { arg: "offset", .. })));
    let mut out = [0u8; 65];
    assert!(matches!(b.read(&s, 0, &mut out), Err(Error::InvalidArgument { .. })));
    if dev.is_cpu() {
        assert!(matches!(b.ipc_handle(), Err(Error::Unsupported(_))));
    }
    assert!(matches!(b.export_fd(), Err(Error::Unsupported(_))), "plain allocations are not exportable as fds");
}

#[test]
fn shareable_memory_maps_twice_to_the_same_bytes() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let a = dev.alloc_shareable(1 << 16).unwrap();
    let fd = a.export_fd().unwrap();
    let b = dev.import_fd(&fd, a.len()).unwrap();
    assert_ne!(a.ptr(), b.ptr(), "a second mapping");
    let words = Rng::fresh("shareable").words(1024);
    a.write(&s, 0, &words).unwrap();
    let mut got = vec![0u32; 1024];
    b.read(&s, 0, &mut got).unwrap();
    assert_eq!(got, words);
}
