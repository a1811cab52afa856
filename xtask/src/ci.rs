//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure.

use crate::{Result, cargo, ptx, run as run_cmd, secs};
use std::time::Instant;

/// One CI step: a name for the summary and what it does.
struct Step {
    name: String,
    action: Box<dyn Fn() -> Result>,
}

fn step(name: impl Into<String>, action: impl Fn() -> Result + 'static) -> Step {
    Step { name: name.into(), action: Box::new(action) }
}

/// `cargo xtask test [-- <cargo test args>]`.
pub fn run(args: &[String]) -> Result {
    let test_args: Vec<String> = match args.split_first() {
        None => Vec::new(),
        Some((dd, rest)) if dd == "--" => rest.to_vec(),
        Some((a, _)) => {
            return Err(format!("test: unexpected argument `{a}` (extra cargo test args go after `--`)"));
        }
    };
    let mut steps = vec![
        step("cargo fmt --all --check", || run_cmd(cargo().args(["fmt", "--all", "--check"]))),
        step("cargo clippy --workspace --all-targets -- -D warnings", || {
            run_cmd(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
        }),
        step("cargo xtask ptx --check", || ptx::run(&ptx::PtxOptions { check: true, ..Default::default() })),
        step(format!("cargo test --workspace {}", test_args.join(" ")).trim_end().to_string(), move || {
            run_cmd(cargo().args(["test", "--workspace"]).args(&test_args))
        }),
    ];
    steps.extend(python_steps());

    let mut done: Vec<(String, &str, String)> = Vec::new();
    let mut failure = None;
    let t_all = Instant::now();
    for s in &steps {
        if failure.is_some() {
            done.push((s.name.clone(), "skipped", String::new()));
            continue;
        }
        eprintln!("\n==> {}", s.name);
        let t = Instant::now();
        match (s.action)() {
            Ok(()) => done.push((s.name.clone(), "ok", secs(t))),
            Err(e) => {
                eprintln!("error: {e}");
                done.push((s.name.clone(), "FAILED", secs(t)));
                failure = Some(s.name.clone());
            }
        }
    }
    eprintln!("\n==> summary ({})", secs(t_all));
    for (name, state, t) in &done {
        eprintln!("  {state:<7} {t:>7}  {name}");
    }
    match failure {
        Some(name) => Err(format!("step failed: {name}")),
        None => {
            eprintln!("all {} steps passed", done.len());
            Ok(())
        }
    }
}

/// The Python package's checks (a future `crates/python` with pytest tests) go here: e.g. build
/// the extension with maturin into a venv under target/, then `python -m pytest crates/python/tests`.
/// Nothing to run yet.
fn python_steps() -> Vec<Step> {
    if crate::root().join("crates/python").is_dir() {
        eprintln!("note: crates/python exists but `cargo xtask test` does not run its tests yet (xtask/src/ci.rs)");
    }
    Vec::new()
}
