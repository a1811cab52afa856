//! One rank per process: this test binary re-runs itself as N child processes that join
//! through the TCP bootstrap (`RANK`, `WORLD_SIZE`, ... as torchrun sets them), share
//! symmetric memory across processes (CUDA IPC handles or VMM/memfd descriptors) and run
//! the all-gather kernel. On the CPU back end the "device memory" is a memfd, so CI runs
//! the whole cross-process path; on a GPU the bundle's script starts the MPS daemon first.
use moe_ep::collective::AllGather;
use moe_ep::{Group, Sharing};
use moe_ep_tests::{Rng, device};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "MOE_EP_MP_CHILD";
const WORDS: usize = 4096;

fn block_of(seed: u64, rank: usize, rep: usize) -> Vec<u32> {
    Rng::new(seed ^ ((rank as u64) << 32) ^ rep as u64).words(WORDS)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_processes(num_procs: usize, sharing: &str) {
    let seed = Rng::fresh("multiprocess").next_u64();
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..num_procs)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "child_rank", "--ignored", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, "1")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", num_procs.to_string())
                .env("LOCAL_RANK", rank.to_string()) // GPU LOCAL_RANK % count: all on one GPU if there is one
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", (port - 1).to_string())
                .env("MOE_EP_BOOTSTRAP_PORT", port.to_string())
                .env("MOE_EP_BOOTSTRAP_TIMEOUT_S", "60")
                .env("MOE_EP_TEST_SHARING", sharing)
                .env("MOE_EP_TEST_SEED", seed.to_string())
                .env("MOE_EP_DEVICE", std::env::var("MOE_EP_DEVICE").unwrap_or_else(|_| "cpu".into()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut failures = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.stdout.take().map(std::io::read_to_string).transpose().unwrap().unwrap_or_default();
        let err = child.stderr.take().map(std::io::read_to_string).transpose().unwrap().unwrap_or_default();
        let ok = status.is_some_and(|s| s.success()) && out.contains(&format!("RANK_OK {rank}"));
        if !ok {
            failures.push(format!("rank {rank} ({status:?}):\n{out}\n{err}"));
        }
    }
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
