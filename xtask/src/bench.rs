//! `cargo xtask bench [NAME [args...]]`: benchmarks by name.
//!
//! To add one (e.g. `ht`, `ll`): write `fn ht(args: &[String]) -> Result` (typically
//! `run(cargo().args(["run", "--release", "-p", "moe-ep-bench", "--bin", "ht", "--"]).args(args))`)
//! and list it in [`BENCHES`].

use crate::Result;

/// A benchmark: name, one-line description, entry point (gets the arguments after the name).
type Bench = (&'static str, &'static str, fn(&[String]) -> Result);

/// All benchmarks.
const BENCHES: &[Bench] = &[
    ("ht", "HT intranode dispatch (bf16, fp8) and combine; see crates/bench/src/bin/ht.rs", ht),
    ("ll", "LL dispatch and combine (bf16); see crates/bench/src/bin/ll.rs", ll),
];

/// `cargo xtask bench ht [args]`: the Rust bench; on a GPU machine follow it with
/// `python3 tests/gpu/ht_torch_reference.py` for the same-run torch reference.
fn ht(args: &[String]) -> Result {
    bench_bin("ht", args)
}

/// `cargo xtask bench ll [args]`.
fn ll(args: &[String]) -> Result {
    bench_bin("ll", args)
}

fn bench_bin(bin: &str, args: &[String]) -> Result {
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["run", "--release", "-p", "moe-ep-bench", "--bin", bin, "--"])
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("bench {bin} failed: {status}")) }
}

fn list() -> String {
    if BENCHES.is_empty() {
        return "no benchmarks yet".into();
    }
    BENCHES.iter().map(|(n, d, _)| format!("  {n:<8} {d}")).collect::<Vec<_>>().join("\n")
}

pub fn run(args: &[String]) -> Result {
    let Some((name, rest)) = args.split_first() else {
        println!("benchmarks (cargo xtask bench NAME [args...]):\n{}", list());
        return Ok(());
    };
    match BENCHES.iter().find(|(n, _, _)| n == name) {
        Some((_, _, f)) => f(rest),
        None => Err(format!("unknown benchmark `{name}`; available:\n{}", list())),
    }
}
