//! moe-ep's developer tasks: `cargo xtask <command>` (see `cargo xtask help`).
//!
//! Std only, so CI compiles it in a few seconds.

mod bench;
mod bundle;
mod capi;
mod ci;
mod json;
mod ptx;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const HELP: &str = "\
cargo xtask <command> [options]

commands:
  ptx [--check] [--deny-spills] [--no-ptxas]
        Build the GPU kernels (crate gpu-kernels) to PTX with the pinned nightly and write
        host/ptx/moe_ep_kernels.ptx; fail on `.extern .func`; assemble with ptxas (sm_90) and
        print registers / spills / stack / shared memory per kernel (cubin: target/ptx/).
        --check        build into target/ptx only and fail if the tracked PTX is stale
        --deny-spills  fail (instead of warn) when a kernel spills registers
        --no-ptxas     skip the ptxas step
        env MOE_EP_PTXAS=path uses that ptxas instead of the cached PyPI one
  test [-- <cargo test args>]
        CI: cargo fmt --check, cargo clippy -D warnings, ptx --check, cargo test --workspace
        (arguments after `--` go to `cargo test --workspace`; harness args after a second `--`),
        the C tests against the installed C library, the Python package's tests.
  capi-install [--release] [--prefix DIR]
        Build the C library and install DIR/include/nccl_ep.h (+ nccl_ep/ep_enums.h) and
        DIR/lib/libnccl_ep.{so,a} (default DIR: target/c-abi).
  demo [args...]
        cargo run --release -p moe-ep --example demo -- args...
  gpu-bundle [--out DIR] [--no-ptx]
        Build stripped release test binaries + examples (+ benches) into DIR (default bundle/)
        with a run.sh for the GPU machine. --no-ptx: don't rebuild the PTX first.
  bench [NAME [args...]]
        Run a benchmark; without NAME, list them.
  help  This text.
";

/// Every task's result: `Err` carries the message printed before exiting with status 1.
pub type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "ptx" => ptx::PtxOptions::parse(rest).and_then(|o| ptx::run(&o).map(|_| ())),
        "test" => ci::run(rest),
        "demo" => demo(rest),
        "gpu-bundle" => bundle::run(rest),
        "capi-install" => capi::install_cmd(rest),
        "bench" => bench::run(rest),
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent folder").to_path_buf()
}

/// The cargo that runs this xtask (`$CARGO`), for host builds.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// `cmd` as a shell-like line for logs.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '"', '\'', '$', '*', '\\']) {
            s += &format!(" '{}'", a.replace('\'', r"'\''"));
        } else {
            s += " ";
            s += &a;
        }
    }
    s
}

/// Runs `cmd` with inherited stdio; `Err` names it when it cannot start or fails.
pub fn run(cmd: &mut Command) -> Result {
    let line = show(cmd);
    eprintln!("$ {line}");
    let status = cmd.status().map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`{line}` failed ({status})")) }
}

/// Runs `cmd` capturing stdout (stderr inherited); `Err` when it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = show(cmd);
    let out = cmd.stderr(std::process::Stdio::inherit()).output().map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{line}` failed ({})", out.status));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("`{line}`: output is not UTF-8: {e}"))
}

/// Seconds since `t`, for step timings.
pub fn secs(t: Instant) -> String {
    format!("{:.1}s", t.elapsed().as_secs_f64())
}

/// `cargo xtask demo [args]`: the example written in host/examples/demo.rs.
fn demo(args: &[String]) -> Result {
    let args = args.strip_prefix(&["--".to_string()]).unwrap_or(args);
    run(cargo().args(["run", "--release", "-p", "moe-ep", "--example", "demo", "--"]).args(args))
}
