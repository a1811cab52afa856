//! The inter-node command ring (`moe_ep::net::CommandRing`, `moe_ep_kernels::net`): many
//! warps pushing through a small ring while the host drains it, and a stalled proxy
//! turning into a typed timeout. On the device of `MOE_EP_DEVICE`.
// Every launch below passes a ring and an error slot made right before it.
#![allow(clippy::undocumented_unsafe_blocks)]

use moe_ep::kernels::net::{NET_SELFTEST, SITE_NET_RING_FULL, selftest_cmd};
use moe_ep::net::CommandRing;
use moe_ep::{Error, Group, LaunchConfig};
use moe_ep_abi::net::{NetOp, NetTestParams};
use moe_ep_tests::device;
use std::time::{Duration, Instant};

#[test]
fn many_warps_push_through_a_small_ring_and_every_command_arrives_once_whole() {
    let dev = device();
    let groups = Group::in_process(std::slice::from_ref(&dev)).unwrap();
    let (g, s) = (&groups[0], groups[0].stream());
    // 16 slots for hundreds of commands: producers wait for room and the ring wraps often.
    let (blocks, warps, per_warp) = if dev.is_cpu() { (2u32, 4u32, 40u32) } else { (8, 8, 400) };
    let num_warps = blocks * warps;
    let mut ring = CommandRing::new(s, 4).unwrap();
    let p = NetTestParams {
        ring: ring.ring(),
        error: g.error_ptr(),
        timeout_ns: g.timeout_ns(),
        commands_per_warp: per_warp,
        pad: 0,
    };
    let total = (num_warps * (per_warp + 1)) as usize;
    let mut next_of_warp = vec![0u32; num_warps as usize];
    let mut quiets = 0;
    std::thread::scope(|scope| {
        // The proxy's part: take each command as it lands and give its slot back at once.
        let drain = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut seen = 0;
            while seen < total {
                assert!(Instant::now() < deadline, "{seen} of {total} commands after 300 s");
                match ring.poll().unwrap() {
                    Some((pos, cmd)) => {
                        assert_eq!(pos, seen as u64, "positions are read in order");
                        seen += 1;
                        ring.release(pos + 1).unwrap();
                        if cmd.op == NetOp::Quiet {
                            quiets += 1;
                            continue;
                        }
                        let warp = cmd.peer;
                        let i = next_of_warp[warp as usize];
                        assert_eq!(cmd, selftest_cmd(warp, i), "warp {warp}'s command {i} at position {pos}");
                        next_of_warp[warp as usize] += 1;
                    }
                    None => std::thread::yield_now(),
                }
            }
        });
        unsafe {
            s.launch(&NET_SELFTEST, LaunchConfig { grid_dim: blocks, block_dim: 32 * warps, shared_mem_bytes: 0 }, p)
        }
        .unwrap();
        s.synchronize().unwrap();
        drain.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
    g.take_device_error("net_selftest").unwrap();
    assert!(next_of_warp.iter().all(|&n| n == per_warp), "commands per warp: {next_of_warp:?}");
    assert_eq!(quiets, num_warps, "one quiet per warp");
    assert_eq!(ring.poll().unwrap(), None, "nothing past the last command");
}

#[test]
fn a_stalled_proxy_is_a_typed_timeout() {
    let dev = device();
    let groups = Group::in_process(std::slice::from_ref(&dev)).unwrap();
    let (g, s) = (&groups[0], groups[0].stream());
    let mut ring = CommandRing::new(s, 2).unwrap(); // 4 slots
    let timeout_ns = 50_000_000;
    let launch = |per_warp: u32| {
        let p =
            NetTestParams { ring: ring.ring(), error: g.error_ptr(), timeout_ns, commands_per_warp: per_warp, pad: 0 };
        unsafe { s.launch(&NET_SELFTEST, LaunchConfig { grid_dim: 1, block_dim: 32, shared_mem_bytes: 0 }, p) }
            .unwrap();
        s.synchronize().unwrap();
    };
    // Nobody drains: the fifth command finds the ring full.
    launch(6);
    match g.take_device_error("net_selftest") {
        Err(Error::Timeout { site, expected: 1, observed: 0, .. }) if site == SITE_NET_RING_FULL => {}
        other => panic!("expected a ring-full timeout, got {other:?}"),
    }
    // The four that fit are whole and in order; nothing past them.
    for i in 0..4 {
        let (pos, cmd) = ring.poll().unwrap().expect("a command");
        assert_eq!((pos, cmd), (i as u64, selftest_cmd(0, i)));
    }
    assert_eq!(ring.poll().unwrap(), None);
    assert!(ring.release(5).is_err(), "a slot not read yet can't be given back");
}
