//! The first peer kernel: every rank stores its block into every peer's symmetric buffer
//! and raises a release flag there. N ranks in one process on the device of
//! `MOE_EP_DEVICE` (4 ranks on the CPU emulator, 8 sharing one GPU).
use moe_ep::collective::AllGather;
use moe_ep::{Error, Group, Sharing};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks};
use std::time::Duration;

/// Runs `reps` all-gathers of fresh random blocks of `words` u32 and checks every rank's
/// output bit for bit against what every rank sent (outputs poisoned before each call).
fn round_trip(sharing: Sharing, words: usize, reps: usize) {
    let n = num_ranks(&device());
    let seed = Rng::fresh("all_gather").next_u64();
    let groups = Group::in_process(&devices(n)).unwrap();
    on_ranks(groups, |rank, group| {
        let mut ag = AllGather::new(&group, words * 4, 0, sharing).unwrap();
        let s = group.stream();
        let send = group.device().alloc(words * 4).unwrap();
        let recv = group.device().alloc(n * words * 4).unwrap();
        for rep in 0..reps {
            // Every rank can regenerate every rank's block from (seed, rep, rank).
            let block = |r: usize| block_of(seed, rep, r, words);
            send.write(s, 0, &block(rank)).unwrap();
            recv.fill(s, 0xA5).unwrap();
            ag.run(&group, &send, &recv).unwrap();
            let got: Vec<u32> = recv.to_vec(s).unwrap();
            for src in 0..n {
                assert!(
                    got[src * words..(src + 1) * words] == block(src)[..],
                    "rank {rank} rep {rep}: block from {src} differs"
                );
            }
        }
    });
}

/// The block rank `rank` sends in repetition `rep` (every rank can regenerate it).
fn block_of(seed: u64, rep: usize, rank: usize, words: usize) -> Vec<u32> {
    Rng::new(seed ^ ((rep as u64) << 20) ^ ((rank as u64) << 40)).words(words)
}

#[test]
fn all_gather_default_sharing_many_calls() {
    round_trip(Sharing::Auto, 1000, 5);
}

/// Blocks as large as the old demo's (64 KiB on the emulator, 16 MiB on a GPU), so every
/// thread stores many 16-byte chunks of each block in each call.
#[test]
fn all_gather_large_blocks_on_every_rank() {
    let words = if device().is_cpu() { 16 << 10 } else { 4 << 20 };
    round_trip(Sharing::Auto, words, 3);
}

#[test]
fn all_gather_through_shareable_fd_memory() {
    round_trip(Sharing::Fd, 256, 3);
}

#[test]
fn all_gather_single_rank_and_large_blocks() {
    let dev = device();
    let words = if dev.is_cpu() { 1 << 14 } else { 1 << 20 };
    let groups = Group::in_process(std::slice::from_ref(&dev)).unwrap();
    on_ranks(groups, |_, group| {
        let mut ag = AllGather::new(&group, words * 4, 0, Sharing::Auto).unwrap();
        let data = Rng::fresh("single").words(words);
        let send = dev.alloc(words * 4).unwrap();
        let recv = dev.alloc(words * 4).unwrap();
        send.write(group.stream(), 0, &data).unwrap();
        recv.fill(group.stream(), 0xFF).unwrap();
        ag.run(&group, &send, &recv).unwrap();
        assert!(recv.to_vec::<u32>(group.stream()).unwrap() == data);
    });
}

#[test]
fn a_peer_that_never_joins_is_a_timeout_not_a_hang() {
    let groups = Group::in_process(&devices(2)).unwrap();
    let results = on_ranks(groups, |rank, mut group| {
        let dev = group.device().clone();
        let mut ag = AllGather::new(&group, 64, 1, Sharing::Auto).unwrap();
        let send = dev.alloc(64).unwrap();
        let recv = dev.alloc(128).unwrap();
        group.set_timeout(Duration::from_millis(200)).unwrap();
        // Rank 1 skips the call: rank 0 must give up with a typed error.
        let r = if rank == 0 { Some(ag.run(&group, &send, &recv)) } else { None };
        group.bootstrap().barrier().unwrap();
        // The group is still usable: a fresh all-gather with everyone present works.
        group.set_timeout(Duration::from_secs(60)).unwrap();
        let mut again = AllGather::new(&group, 64, 1, Sharing::Auto).unwrap();
        send.write(group.stream(), 0, &[rank as u32 + 10; 16]).unwrap();
        again.run(&group, &send, &recv).unwrap();
        let got: Vec<u32> = recv.to_vec(group.stream()).unwrap();
        assert_eq!(got, [[10u32; 16], [11u32; 16]].concat());
        r
    });
    match &results[0] {
        Some(Err(Error::Timeout { rank: 0, peer: 1, .. })) => {}
        other => panic!("rank 0 expected a timeout waiting for rank 1, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_rejected_before_launch() {
    let dev = device();
    let groups = Group::in_process(std::slice::from_ref(&dev)).unwrap();
    let g = &groups[0];
    assert!(matches!(AllGather::new(g, 0, 0, Sharing::Auto), Err(Error::InvalidArgument { arg: "block_bytes", .. })));
    assert!(matches!(AllGather::new(g, 20, 0, Sharing::Auto), Err(Error::InvalidArgument { arg: "block_bytes", .. })));
    let mut ag = AllGather::new(g, 64, 0, Sharing::Auto).unwrap();
    let small = dev.alloc(32).unwrap();
    let ok = dev.alloc(64).unwrap();
    assert!(matches!(ag.run(g, &small, &ok), Err(Error::InvalidArgument { arg: "send", .. })));
    assert!(matches!(ag.run(g, &ok, &small), Err(Error::InvalidArgument { arg: "recv", .. })));
    // Still usable after the rejections.
    ag.run(g, &ok, &ok).unwrap();
}
