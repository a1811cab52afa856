//! `cargo xtask bench [NAME [args...]]`: benchmarks by name.
//!
//! To add one (e.g. `ht`, `ll`): write `fn ht(args: &[String]) -> Result` (typically
//! `run(cargo().args(["run", "--release", "-p", "moe-ep-bench", "--bin", "ht", "--"]).args(args))`)
//! and list it in [`BENCHES`].

use crate::Result;

/// A benchmark: name, one-line description, entry point (gets the arguments after the name).
type Bench = (&'static str, &'static str, fn(&[String]) -> Result);

/// All benchmarks. None yet: `ht` (high-throughput dispatch/combine) and `ll` (low-latency)
/// will be added with the moe-ep-bench package.
const BENCHES: &[Bench] = &[];

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
