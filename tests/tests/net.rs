//! The inter-node command ring (`moe_ep::net::CommandRing`, `moe_ep_kernels::net`): many
//! warps pushing through a small ring while the host drains it, and a stalled proxy
//! turning into a typed timeout. On the device of `MOE_EP_DEVICE`.
// Every launch below passes a ring and an error slot made right before it.
#![allow(clippy::undocumented_unsafe_blocks)]

use moe_ep::kernels::net::{NET_EXCHANGE_SELFTEST, NET_SELFTEST, SITE_NET_RING_FULL, selftest_cmd};
use moe_ep::net::{CommandRing, Proxy, SimTransport, TcpTransport, Transport};
use moe_ep::{Error, Group, LaunchConfig, Sharing};
use moe_ep_abi::net::{NET_SLOT_BYTES, NetCmd, NetExchangeParams, NetOp, NetRing, NetTestParams};
use moe_ep_tests::{Rng, device, on_ranks};
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

/// The host's stand-in for a kernel's `push` (CPU back end: the ring's device words are host
/// memory), for proxy tests that choose their own commands.
fn push_from_host(ring: &NetRing, cmd: NetCmd) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pos = unsafe { AtomicU64::from_ptr(ring.head as *mut u64) }.fetch_add(1, Ordering::Relaxed);
    let slot = ring.slots + (pos & ((1 << ring.log2_slots) - 1)) * NET_SLOT_BYTES;
    for (i, w) in cmd.encode(pos, ring.log2_slots).into_iter().enumerate() {
        unsafe { AtomicU64::from_ptr((slot + 8 * i as u64) as *mut u64) }.store(w, Ordering::Release);
    }
    pos
}

/// The proxy over the in-process transport: rank 0's puts land in rank 1's buffer, its
/// signals add to rank 1's table after the data, a quiet's slot is given back, and a put
/// past the buffer is an error. (The sim transport moves host memory: on a GPU it must
/// refuse to be made.)
#[test]
fn the_proxy_carries_puts_and_signals_to_the_peer() {
    let dev = device();
    let groups = Group::in_process(&[dev.clone(), dev.clone()]).unwrap();
    let mut rng = Rng::fresh("net-proxy");
    let payload: Vec<u8> = (0..1024).map(|_| rng.next_u32() as u8).collect();
    on_ranks(groups, |rank, group| {
        let s = group.stream();
        let data = group.alloc_symmetric(4096, Sharing::Auto).unwrap();
        let signals = group.alloc_symmetric(8 * 16, Sharing::Auto).unwrap();
        if !dev.is_cpu() {
            assert!(matches!(SimTransport::new(rank, &data, &signals), Err(Error::Unsupported(_))));
            return;
        }
        if rank == 0 {
            data.local().write(s, 0, &payload).unwrap();
            let transport = SimTransport::new(0, &data, &signals).unwrap();
            let mut proxy = Proxy::new(vec![CommandRing::new(s, 2).unwrap()], transport);
            let ring = proxy.rings()[0].ring();
            let put = NetCmd { op: NetOp::Put, peer: 1, len: 512, src_off: 0, dst_off: 2048, ..NetCmd::NOP };
            push_from_host(&ring, put);
            push_from_host(
                &ring,
                NetCmd { op: NetOp::PutSignal, len: 512, src_off: 512, dst_off: 2560, sig_idx: 3, sig_add: 1, ..put },
            );
            push_from_host(&ring, NetCmd { op: NetOp::Signal, peer: 1, sig_idx: 5, sig_add: -2, ..NetCmd::NOP });
            push_from_host(&ring, NetCmd { op: NetOp::Quiet, ..NetCmd::NOP });
            assert_eq!(proxy.poll_once().unwrap(), 4);
            assert_eq!(proxy.poll_once().unwrap(), 0, "nothing more");
            let tail = unsafe { std::ptr::read_volatile(ring.tail as *const u64) };
            assert_eq!(tail, 4, "every slot given back, the quiet's too");
            // 4 slots: the next lap; a put past the peer's buffer is refused.
            push_from_host(&ring, NetCmd { dst_off: 4096 - 100, ..put });
            assert!(matches!(proxy.poll_once(), Err(Error::InvalidArgument { .. })));
        }
        group.bootstrap().barrier().unwrap();
        if rank == 1 {
            let got: Vec<u8> = data.local().to_vec(s).unwrap();
            assert!(got[2048..3072] == payload[..], "both puts landed");
            assert!(got[..2048].iter().chain(&got[3072..]).all(|&b| b == 0), "nothing else was written");
            let sig: Vec<u64> = signals.local().to_vec(s).unwrap();
            assert_eq!((sig[3], sig[5]), (1, 2u64.wrapping_neg()), "signals added");
            assert!(sig.iter().enumerate().all(|(i, &v)| i == 3 || i == 5 || v == 0));
        }
        group.bootstrap().barrier().unwrap(); // nobody frees a buffer a peer still writes
    });
}

/// GPU-initiated puts and signals end to end on the CPU back end: each rank's kernel puts a
/// block to every peer with a signal through its ring, its proxy thread carries them out
/// (sim transport), and each kernel copies what a peer put to it only once that peer's
/// signal arrived, so a signal ahead of its data shows as a wrong block. Three calls on the
/// same never-reset signals. (On a GPU the sim transport refuses to be made.)
#[test]
fn kernels_exchange_blocks_through_their_proxies() {
    exchange(Via::Sim(None));
}

/// As above, with every transport in chaos mode: puts land in pieces and out of order,
/// signals late (only the contract's order is kept).
#[test]
fn kernels_exchange_blocks_through_chaotic_proxies() {
    exchange(Via::Sim(Some(Rng::fresh("net-chaos").next_u64())));
}

/// As above, over the tcp transport: a loopback connection per pair of ranks, each frame
/// applied by the receiving rank's thread and acknowledged.
#[test]
fn kernels_exchange_blocks_over_tcp() {
    exchange(Via::Tcp);
}

/// Which transport the exchange goes through.
#[derive(Clone, Copy)]
enum Via {
    /// The sim transport, with chaos from this seed.
    Sim(Option<u64>),
    Tcp,
}

fn exchange(via: Via) {
    let dev = device();
    let n = 4usize;
    let bytes = 512usize;
    let groups = Group::in_process(&vec![dev.clone(); n]).unwrap();
    let mut rng = Rng::fresh("net-exchange");
    let calls: Vec<Vec<Vec<u8>>> =
        (0..3).map(|_| (0..n).map(|_| (0..n * bytes).map(|_| rng.next_u32() as u8).collect()).collect()).collect();
    on_ranks(groups, |rank, group| {
        let s = group.stream();
        let data = group.alloc_symmetric(2 * n * bytes, Sharing::Auto).unwrap();
        let signals = group.alloc_symmetric(8 * n, Sharing::Auto).unwrap();
        let made = match via {
            Via::Sim(chaos) => SimTransport::new(rank, &data, &signals).map(|t| match chaos {
                Some(seed) => Box::new(t.with_chaos(seed + rank as u64)) as Box<dyn Transport>,
                None => Box::new(t),
            }),
            Via::Tcp => {
                TcpTransport::connect(group.bootstrap(), &data, &signals, 1).map(|t| Box::new(t) as Box<dyn Transport>)
            }
        };
        let transport = match made {
            Err(Error::Unsupported(_)) if !dev.is_cpu() => return, // host-memory transports
            t => t.unwrap(),
        };
        let mut proxy = Proxy::new(vec![CommandRing::new(s, 3).unwrap()], transport);
        let ring = proxy.rings()[0].ring();
        let out = s.alloc(n * bytes).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let proxy_thread = scope.spawn(|| proxy.run(&stop));
            for (call, blocks) in calls.iter().enumerate() {
                data.local().write(s, 0, &blocks[rank]).unwrap();
                out.fill(s, 0xee).unwrap();
                group.bootstrap().barrier().unwrap(); // every rank's blocks are written
                let p = NetExchangeParams {
                    ring,
                    data: data.local().ptr(),
                    signals: signals.local().ptr(),
                    out: out.ptr(),
                    error: group.error_ptr(),
                    timeout_ns: group.timeout_ns(),
                    epoch: call as u64 + 1,
                    bytes: bytes as u32,
                    rank: rank as u32,
                    num_ranks: n as u32,
                    pad: 0,
                };
                let cfg = LaunchConfig { grid_dim: 1, block_dim: 32 * n as u32, shared_mem_bytes: 0 };
                unsafe { s.launch(&NET_EXCHANGE_SELFTEST, cfg, p) }.unwrap();
                s.synchronize().unwrap();
                group.take_device_error("net_exchange_selftest").unwrap();
                let got: Vec<u8> = out.to_vec(s).unwrap();
                for q in (0..n).filter(|&q| q != rank) {
                    let want = &calls[call][q][rank * bytes..(rank + 1) * bytes];
                    assert!(got[q * bytes..(q + 1) * bytes] == *want, "rank {rank} call {call}: block from {q}");
                }
                let sig: Vec<u64> = signals.local().to_vec(s).unwrap();
                for (q, &v) in sig.iter().enumerate() {
                    assert_eq!(
                        v,
                        if q == rank { 0 } else { call as u64 + 1 },
                        "rank {rank} call {call}: signal of {q}"
                    );
                }
                group.bootstrap().barrier().unwrap(); // no peer's next call adds to the signals checked here
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
            proxy_thread.join().unwrap().unwrap();
        });
        group.bootstrap().barrier().unwrap();
    });
}

/// The chaos mode keeps the contract: stepping a put of 4 KiB and its signal on one (ring,
/// peer), plus a put on another ring, the signal never shows before its put is whole, and
/// the put lands in pieces in some seeds (seen half-done).
#[test]
fn chaos_applies_a_signal_only_after_its_puts() {
    let dev = device();
    let groups = Group::in_process(&[dev.clone(), dev.clone()]).unwrap();
    let mut rng = Rng::fresh("net-chaos-order");
    let payload: Vec<u8> = (0..4096).map(|_| rng.next_u32() as u8 | 1).collect();
    let seeds: Vec<u64> = (0..64).map(|_| rng.next_u64()).collect();
    on_ranks(groups, |rank, group| {
        let s = group.stream();
        let data = group.alloc_symmetric(3 * 4096, Sharing::Auto).unwrap();
        let signals = group.alloc_symmetric(8 * 4, Sharing::Auto).unwrap();
        let Ok(sim) = SimTransport::new(rank, &data, &signals) else {
            assert!(!dev.is_cpu(), "the sim transport is made on the CPU back end");
            return;
        };
        if rank == 0 {
            data.local().write(s, 0, &payload).unwrap();
            let peer = data.peer_ptr(1).unwrap();
            let sig = signals.peer_ptr(1).unwrap();
            let mut seen_partial = false;
            for (k, &seed) in seeds.iter().enumerate() {
                let mut t = SimTransport::new(0, &data, &signals).unwrap().with_chaos(seed);
                let dst = 4096 * (1 + k as u64 % 2);
                let put = NetCmd {
                    op: NetOp::PutSignal,
                    peer: 1,
                    len: 4096,
                    src_off: 0,
                    dst_off: dst,
                    sig_idx: 0,
                    sig_add: 1,
                    ..NetCmd::NOP
                };
                t.submit(0, &put).unwrap();
                t.submit(1, &NetCmd { op: NetOp::Signal, peer: 1, sig_idx: 1, sig_add: 1, ..NetCmd::NOP }).unwrap();
                let before = unsafe { std::ptr::read_volatile(sig as *const u64) };
                let landed = || -> usize {
                    let got = unsafe { std::slice::from_raw_parts((peer + dst) as *const u8, 4096) };
                    got.iter().zip(&payload).filter(|(a, b)| a == b).count()
                };
                let mut steps = 0;
                while !(t.flushed(0).unwrap() && t.flushed(1).unwrap()) {
                    t.progress().unwrap();
                    steps += 1;
                    assert!(steps < 1000, "seed {seed}: still pending after 1000 steps");
                    let signalled = unsafe { std::ptr::read_volatile(sig as *const u64) } > before;
                    let n = landed();
                    seen_partial |= n > 0 && n < 4096;
                    assert!(!signalled || n == 4096, "seed {seed}: signal with {n} of 4096 bytes landed");
                }
                assert_eq!(landed(), 4096, "seed {seed}");
                // Clear the destination for the next seed that uses it.
                unsafe { std::ptr::write_bytes((peer + dst) as *mut u8, 0, 4096) };
            }
            assert!(seen_partial, "no seed landed a put in pieces");
            drop(sim);
        }
        group.bootstrap().barrier().unwrap();
    });
}

/// Over tcp, a put past the receiver's buffer is the receiver's error (its next `progress`
/// reports it) and is never acknowledged (the sender's ring does not flush); a good put and
/// signal before it landed.
#[test]
fn tcp_reports_a_bad_put_at_the_receiver() {
    let dev = device();
    let groups = Group::in_process(&[dev.clone(), dev.clone()]).unwrap();
    on_ranks(groups, |rank, group| {
        let s = group.stream();
        let data = group.alloc_symmetric(1024, Sharing::Auto).unwrap();
        let signals = group.alloc_symmetric(8 * 2, Sharing::Auto).unwrap();
        let mut t = match TcpTransport::connect(group.bootstrap(), &data, &signals, 1) {
            Err(Error::Unsupported(_)) if !dev.is_cpu() => return,
            t => t.unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        if rank == 0 {
            data.local().write(s, 0, &[7u8; 256]).unwrap();
            let good = NetCmd {
                op: NetOp::PutSignal,
                peer: 1,
                len: 256,
                src_off: 0,
                dst_off: 512,
                sig_idx: 0,
                sig_add: 1,
                ..NetCmd::NOP
            };
            t.submit(0, &good).unwrap();
            while !t.flushed(0).unwrap() {
                assert!(Instant::now() < deadline, "the good put was never acknowledged");
                std::thread::yield_now();
            }
            t.submit(0, &NetCmd { dst_off: 1000, ..good }).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert!(!t.flushed(0).unwrap(), "a refused put is never acknowledged");
        } else {
            let err = loop {
                assert!(Instant::now() < deadline, "the receiver never reported the bad put");
                if let Err(e) = t.progress() {
                    break e;
                }
                std::thread::yield_now();
            };
            assert!(matches!(err, Error::Io(ref m) if m.contains("leaves the buffer")), "{err}");
            let got: Vec<u8> = data.local().to_vec(s).unwrap();
            assert!(got[512..768].iter().all(|&b| b == 7), "the good put landed");
            assert_eq!(signals.local().to_vec::<u64>(s).unwrap()[0], 1, "and its signal");
        }
        group.bootstrap().barrier().unwrap();
    });
}
