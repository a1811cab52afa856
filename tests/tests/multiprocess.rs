//! One rank per process: this test binary re-runs itself as N child processes that join
//! through the TCP bootstrap (`RANK`, `WORLD_SIZE`, ... as torchrun sets them), share
//! symmetric memory across processes (CUDA IPC handles or VMM/memfd descriptors) and run
//! the all-gather kernel. On the CPU back end the "device memory" is a memfd, so CI runs
//! the whole cross-process path; on a GPU the bundle's script starts the MPS daemon first.
use moe_ep::collective::AllGather;
use moe_ep::{Group, Sharing};
use moe_ep_tests::procs::run_ranks;
use moe_ep_tests::{Rng, device};
use std::time::Duration;

const CHILD_ENV: &str = "MOE_EP_MP_CHILD";
const WORDS: usize = 4096;

fn block_of(seed: u64, rank: usize, rep: usize) -> Vec<u32> {
    Rng::new(seed ^ ((rank as u64) << 32) ^ rep as u64).words(WORDS)
}

fn run_processes(num_procs: usize, sharing: &str) {
    let seed = Rng::fresh("multiprocess").next_u64();
    let env = [
        (CHILD_ENV, "1".to_string()),
        ("MOE_EP_TEST_SHARING", sharing.to_string()),
        ("MOE_EP_TEST_SEED", seed.to_string()),
        ("MOE_EP_DEVICE", std::env::var("MOE_EP_DEVICE").unwrap_or_else(|_| "cpu".into())),
    ];
    let args = ["--exact", "child_rank", "--ignored", "--nocapture", "--test-threads=1"];
    let outcomes = run_ranks(num_procs, &args, &env, Duration::from_secs(180));
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| !(o.success() && o.stdout.contains(&format!("RANK_OK {}", o.rank))))
        .map(|o| o.describe())
        .collect();
    assert!(failures.is_empty(), "{sharing}: {}", failures.join("\n----\n"));
}

fn num_procs() -> usize {
    std::env::var("MOE_EP_TEST_PROCS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

#[test]
fn all_gather_across_processes_default_sharing() {
    run_processes(num_procs(), "auto");
}

#[test]
fn all_gather_across_processes_fd_sharing() {
    run_processes(num_procs().max(3), "fd");
}

/// The child side (run only by `run_processes`).
#[test]
#[ignore = "run as a child process by the tests above"]
fn child_rank() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let sharing = match std::env::var("MOE_EP_TEST_SHARING").as_deref() {
        Ok("fd") => Sharing::Fd,
        Ok("ipc") => Sharing::Ipc,
        _ => Sharing::Auto,
    };
    let seed: u64 = std::env::var("MOE_EP_TEST_SEED").unwrap().parse().unwrap();
    let group = Group::from_env().unwrap();
    let (rank, n) = (group.rank(), group.num_ranks());
    let dev = group.device().clone();
    assert_eq!(dev.is_cpu(), device().is_cpu());
    let mut ag = AllGather::new(&group, WORDS * 4, 0, sharing).unwrap();
    let send = dev.alloc(WORDS * 4).unwrap();
    let recv = dev.alloc(n * WORDS * 4).unwrap();
    for rep in 0..3 {
        send.write(group.stream(), 0, &block_of(seed, rank, rep)).unwrap();
        recv.fill(group.stream(), 0x5C).unwrap();
        ag.run(&group, &send, &recv).unwrap();
        let got: Vec<u32> = recv.to_vec(group.stream()).unwrap();
        for src in 0..n {
            assert!(
                got[src * WORDS..(src + 1) * WORDS] == block_of(seed, src, rep)[..],
                "rep {rep}: block of rank {src}"
            );
        }
    }
    group.bootstrap().barrier().unwrap();
    println!("RANK_OK {rank}");
}
