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
    ("ll", "LL dispatch (bf16, fp8) and combine, graph-replayed; see crates/bench/src/bin/ll.rs", ll),
    ("py", "the Python Buffer timed DeepEP's way (one process per rank); see tests/gpu/bench_py.py", py),
];

/// `cargo xtask bench py [--procs N]`: builds and installs the wheel into target/python-site
/// as `cargo xtask test` does, then runs tests/gpu/bench_py.sh (needs a GPU, torch, and MPS
/// when the processes share a GPU).
fn py(args: &[String]) -> Result {
    let root = crate::root();
    let site = crate::ci::install_wheel()?;
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let status = std::process::Command::new("bash")
        .arg(root.join("tests/gpu/bench_py.sh"))
        .arg(&out)
        .args(args)
        .env("MOE_EP_PYTHON_SITE", &site)
        .status()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !status.success() {
        return Err(format!("bench py failed: {status}"));
    }
    Ok(())
}

/// `cargo xtask bench ht [args]`.
fn ht(args: &[String]) -> Result {
    bench_bin("ht", args)
}

/// `cargo xtask bench ll [args]`.
fn ll(args: &[String]) -> Result {
    bench_bin("ll", args)
}

/// Runs the bench with the same-run torch reference (when python3 has torch) and its rows
/// appended to `target/bench/bench.csv`, then draws `target/bench/{ht,ll}.png` from that
/// file (when python3 has matplotlib). The GPU bundle runs `bin/moe-ep-bench-*` the same way.
fn bench_bin(bin: &str, args: &[String]) -> Result {
    let root = crate::root();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let csv = out.join("bench.csv");
    let mut extra: Vec<String> = vec!["--csv".into(), csv.display().to_string()];
    if !args.iter().any(|a| a == "--torch") {
        extra.extend(["--torch".into(), root.join("tests/gpu/ht_torch_reference.py").display().to_string()]);
    }
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["run", "--release", "-p", "moe-ep-bench", "--bin", bin, "--"])
        .args(args)
        .args(&extra)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("bench {bin} failed: {status}"));
    }
    let plot =
        std::process::Command::new("python3").arg(root.join("tests/gpu/plot_bench.py")).arg(&csv).arg(&out).status();
    if !matches!(plot, Ok(s) if s.success()) {
        eprintln!("(no plot: python3 with matplotlib is needed for tests/gpu/plot_bench.py)");
    }
    Ok(())
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
