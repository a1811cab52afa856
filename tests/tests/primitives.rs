//! Every `dev::` primitive, through the `selftest_*` kernels, on the device of
//! `MOE_EP_DEVICE` (the CPU emulator in CI, the GPU in the bundle).
// Every launch below passes buffers allocated right before it, sized as the kernel's docs say.
#![allow(clippy::undocumented_unsafe_blocks)]

use moe_ep::kernels::selftest::*;
use moe_ep::{Device, Error, ErrorRecord, Group, LaunchConfig, Stream};
use moe_ep_abi::SelfTestParams;
use moe_ep_tests::{Rng, device};

fn cfg(grid_dim: u32, block_dim: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim, shared_mem_bytes }
}

fn upload(dev: &Device, stream: &Stream, words: &[u32]) -> moe_ep::DeviceBuffer {
    let b = dev.alloc(words.len() * 4).unwrap();
    b.write(stream, 0, words).unwrap();
    b
}

#[test]
fn indices_and_launch_shape() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let (grid, block) = (3u32, 64u32);
    let out = dev.alloc((grid * block * 16) as usize).unwrap();
    out.fill(&s, 0xAB).unwrap();
    let p = SelfTestParams { c: out.ptr(), ..Default::default() };
    unsafe { s.launch(&SELFTEST_INDICES, cfg(grid, block, 0), p) }.unwrap();
    s.synchronize().unwrap();
    let got: Vec<u32> = out.to_vec(&s).unwrap();
    for g in 0..grid * block {
        let (t, b) = (g % block, g / block);
        let want = [t, b, block | grid << 16, (t % 32) | ((t / 32) << 8) | (block / 32) << 16];
        assert_eq!(&got[4 * g as usize..4 * g as usize + 4], &want, "thread {g}");
    }
}

#[test]
fn shared_memory_dynamic_static_and_shared_atomics() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let mut rng = Rng::fresh("smem");
    let (grid, block) = (4u32, 64u32);
    let n = grid * block - 17; // a ragged last block
    let a = rng.words(n as usize);
    let da = upload(&dev, &s, &a);
    let hist = dev.alloc(65 * 4).unwrap();
    let out = dev.alloc(n as usize * 4).unwrap();
    out.fill(&s, 0xEE).unwrap();
    let p = SelfTestParams { a: da.ptr(), b: hist.ptr(), c: out.ptr(), n: n as u64, ..Default::default() };
    unsafe { s.launch(&SELFTEST_SMEM, cfg(grid, block, block * 4), p) }.unwrap();
    s.synchronize().unwrap();
    let got: Vec<u32> = out.to_vec(&s).unwrap();
    for i in 0..n {
        let (b, t) = (i / block, i % block);
        let src = b * block + (block - 1 - t);
        let want = if src < n { a[src as usize] } else { 0 };
        assert_eq!(got[i as usize], want, "reversed word {i}");
    }
    let h: Vec<u32> = hist.to_vec(&s).unwrap();
    let mut want = vec![0u32; 64];
    a.iter().for_each(|&v| want[(v % 64) as usize] += 1);
    assert_eq!(&h[..64], &want[..]);
    assert_eq!(h[64], block * 4, "dyn_smem_bytes");
}

#[test]
fn warp_shuffles_and_ballot() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let mut rng = Rng::fresh("warp");
    let (grid, block) = (2u32, 64u32);
    let a = rng.words((grid * block) as usize);
    let da = upload(&dev, &s, &a);
    let out = dev.alloc((grid * block / 32 * 16) as usize).unwrap();
    out.fill(&s, 0x5A).unwrap();
    let p = SelfTestParams { a: da.ptr(), c: out.ptr(), ..Default::default() };
    unsafe { s.launch(&SELFTEST_WARP, cfg(grid, block, 0), p) }.unwrap();
    s.synchronize().unwrap();
    let got: Vec<u32> = out.to_vec(&s).unwrap();
    for (w, lanes) in a.chunks(32).enumerate() {
        let sum = lanes.iter().fold(0u32, |x, &y| x.wrapping_add(y));
        let odd = lanes.iter().enumerate().fold(0u32, |m, (i, &v)| m | (v & 1) << i);
        assert_eq!(&got[4 * w..4 * w + 4], &[sum, odd, lanes[5], sum], "warp {w}");
    }
}

#[test]
fn sixteen_byte_loads_and_stores() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let mut rng = Rng::fresh("v4");
    let n = 1000usize; // vectors
    let a = rng.words(4 * n);
    let da = upload(&dev, &s, &a);
    let (b, c) = (dev.alloc(16 * n).unwrap(), dev.alloc(16 * n).unwrap());
    b.fill(&s, 0x11).unwrap();
    c.fill(&s, 0x22).unwrap();
    let p = SelfTestParams { a: da.ptr(), b: b.ptr(), c: c.ptr(), n: n as u64, ..Default::default() };
    unsafe { s.launch(&SELFTEST_COPY_V4, cfg(3, 64, 0), p) }.unwrap();
    s.synchronize().unwrap();
    assert_eq!(b.to_vec::<u32>(&s).unwrap(), a);
    assert_eq!(c.to_vec::<u32>(&s).unwrap(), a);
}

#[test]
fn message_passing_between_concurrent_blocks_for_every_pairing() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let n = 300u64;
    let rounds = MESSAGE_ROUNDS as usize;
    let data = dev.alloc(rounds * n as usize * 4).unwrap();
    data.fill(&s, 0xCC).unwrap();
    let flags = dev.alloc(rounds * 8).unwrap();
    let sums = dev.alloc(rounds * 8).unwrap();
    let err = ErrorRecord::new(&dev).unwrap();
    let p = SelfTestParams {
        a: data.ptr(),
        b: flags.ptr(),
        c: sums.ptr(),
        error: err.ptr(),
        n,
        timeout_ns: 20_000_000_000,
        ..Default::default()
    };
    unsafe { s.launch(&SELFTEST_MESSAGE_PASSING, cfg(2, 64, 0), p) }.unwrap();
    s.synchronize().unwrap();
    assert_eq!(err.peek().unwrap(), None, "no wait may time out");
    let got: Vec<u64> = sums.to_vec(&s).unwrap();
    for (r, &sum) in got.iter().enumerate() {
        let want: u64 = (0..n).map(|i| r as u64 * 1000 + i).sum();
        assert_eq!(sum, want, "round {r}: consumer saw the producer's data");
    }
}

#[test]
fn contended_atomics_and_cas() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let (grid, block) = (4u32, 64u32);
    let c = dev.alloc(5 * 4).unwrap();
    let b = dev.alloc(8).unwrap();
    let p = SelfTestParams { b: b.ptr(), c: c.ptr(), ..Default::default() };
    unsafe { s.launch(&SELFTEST_ATOMICS, cfg(grid, block, 0), p) }.unwrap();
    s.synchronize().unwrap();
    let n = grid * block;
    let got: Vec<u32> = c.to_vec(&s).unwrap();
    assert_eq!(&got[..3], &[n, 2 * n, 3 * n]);
    assert!((1..=n).contains(&got[3]), "CAS winner wrote its id + 1, got {}", got[3]);
    assert_eq!(got[4], 1, "exactly one CAS winner");
    assert_eq!(b.to_vec::<u64>(&s).unwrap()[0], (0..n as u64).sum::<u64>());
}

#[test]
fn bounded_wait_times_out_into_a_typed_error_and_the_device_stays_usable() {
    let dev = device();
    let groups = Group::in_process(std::slice::from_ref(&dev)).unwrap();
    let g = &groups[0];
    let s = g.stream();
    let flag = dev.alloc(8).unwrap();
    let out = dev.alloc(16).unwrap();
    let timeout_ns = 50_000_000u64;
    let p = SelfTestParams {
        a: flag.ptr(),
        c: out.ptr(),
        error: g.error_ptr(),
        value: 3,
        timeout_ns,
        ..Default::default()
    };
    unsafe { s.launch(&SELFTEST_TIMEOUT, cfg(1, 32, 0), p) }.unwrap();
    s.synchronize().unwrap();
    match g.take_device_error("selftest_timeout") {
        Err(Error::Timeout { rank: 3, peer: 7, site: 42, expected: 1, observed: 0, .. }) => {}
        other => panic!("expected a typed timeout, got {other:?}"),
    }
    let t: Vec<u64> = out.to_vec(s).unwrap();
    assert!(t[0] >= timeout_ns, "waited {} ns, bound {timeout_ns}", t[0]);
    assert_eq!(t[1], 1, "globaltimer advances across nanosleep");
    // The record was cleared and the device still runs kernels.
    g.take_device_error("selftest_timeout").unwrap();
    let c = dev.alloc(20).unwrap();
    unsafe {
        s.launch(&SELFTEST_ATOMICS, cfg(1, 32, 0), SelfTestParams { b: flag.ptr(), c: c.ptr(), ..Default::default() })
    }
    .unwrap();
    s.synchronize().unwrap();
    assert_eq!(c.to_vec::<u32>(s).unwrap()[0], 32);
}

#[test]
fn bad_launch_shapes_are_rejected_before_launch() {
    let dev = device();
    let s = dev.new_stream().unwrap();
    let p = SelfTestParams::default();
    for bad in [cfg(0, 32, 0), cfg(1, 0, 0), cfg(1, 33, 0), cfg(1, 2048, 0)] {
        let r = unsafe { s.launch(&SELFTEST_INDICES, bad, p) };
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{bad:?} gave {r:?}");
    }
}
