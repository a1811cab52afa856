//! One rank per process: a test binary re-runs itself as N child processes, joined by the
//! TCP bootstrap through the environment torchrun sets (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Each child picks GPU `LOCAL_RANK % count`
//! (`Group::from_env`), or the CPU emulator, where "device memory" is a memfd shared
//! across processes, so CI runs the whole cross-process path.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one child process left behind.
pub struct Outcome {
    pub rank: usize,
    /// Exit status, or `None` when it was killed at the deadline.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Status and the tails of both outputs, for a failure message.
    pub fn describe(&self) -> String {
        let tail =
            |s: &str| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        let status =
            self.status.map_or("killed: no rank wrote anything for the time limit".to_string(), |s| s.to_string());
        format!("rank {} ({status}):\n{}\n{}", self.rank, tail(&self.stdout), tail(&self.stderr))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs this executable with `args` as ranks `0..num_procs` (plus `env`), waits for all of
/// them, kills the ones still running once no rank has written any output for `limit`, and
/// returns every rank's outcome. The bound is on silence, not on the whole run, so a slow
/// but progressing run on a loaded machine (each case prints a line) is not cut short,
/// while a hang still ends. Outputs go to files, not pipes, so a chatty child never blocks
/// on a full pipe.
pub fn run_ranks(num_procs: usize, args: &[&str], env: &[(&str, String)], limit: Duration) -> Vec<Outcome> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir();
    let log = |rank: usize, what: &str| -> PathBuf {
        dir.join(format!("moe-ep-rank-{}-{port}-{rank}.{what}", std::process::id()))
    };
    let mut children: Vec<_> = (0..num_procs)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", num_procs.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", (port - 1).to_string())
                .env("MOE_EP_BOOTSTRAP_PORT", port.to_string())
                .env("MOE_EP_BOOTSTRAP_TIMEOUT_S", "60")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(log(rank, "out")).unwrap())
                .stderr(std::fs::File::create(log(rank, "err")).unwrap());
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let written = || -> u64 {
        (0..num_procs)
            .flat_map(|rank| ["out", "err"].map(|what| log(rank, what)))
            .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
            .sum()
    };
    let (mut last_written, mut deadline) = (0, Instant::now() + limit);
    let mut outcomes = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            let now_written = written();
            if now_written != last_written {
                (last_written, deadline) = (now_written, Instant::now() + limit);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let read = |what| {
            let path = log(rank, what);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let _ = std::fs::remove_file(&path);
            text
        };
        outcomes.push(Outcome { rank, status, stdout: read("out"), stderr: read("err") });
    }
    outcomes
}
