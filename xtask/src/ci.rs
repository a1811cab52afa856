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
    // The tests run on the CPU emulator, 4 to 8 ranks of many threads each, two tests at once
    // on a shared 2-core host: a rank's threads can go minutes without the CPU (CI once timed
    // out a 100 s device wait that way). Longer bounds there; a real deadlock still ends in a
    // typed timeout, well inside CI's limit.
    for (var, secs) in [("MOE_EP_TIMEOUT_S", "600"), ("MOE_EP_BOOTSTRAP_TIMEOUT_S", "900")] {
        if std::env::var_os(var).is_none() {
            // SAFETY: xtask is single-threaded here; the children inherit the variable.
            unsafe { std::env::set_var(var, secs) };
        }
    }
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
    steps.push(step("C ABI: cc crates/capi/tests/c/*.c against the installed header and libnccl_ep, run", || {
        crate::capi::test()
    }));
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

/// The Python package (`crates/python`): build the extension wheel with maturin (dev
/// profile), install it into target/python-site, run its pytest suite on the CPU back end.
/// `.ci/run` installs maturin, pytest and numpy.
fn python_steps() -> Vec<Step> {
    vec![step("python: maturin build + pytest crates/python/tests (CPU back end)", || {
        let wheels = crate::root().join("target/wheels-ci");
        let wheel = build_wheel(&wheels, false)?;
        let site = crate::root().join("target/python-site");
        let _ = std::fs::remove_dir_all(&site);
        run_cmd(python().args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"]).arg(&site).arg(&wheel))?;
        // The `deep_ep` alias package is pure Python: its folder on the path is an install.
        let path = std::env::join_paths([site.clone(), crate::root().join("crates/python/deep_ep_alias")])
            .map_err(|e| e.to_string())?;
        run_cmd(
            python()
                .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "crates/python/tests"])
                .env("PYTHONPATH", path)
                .env("MOE_EP_DEVICE", "cpu"),
        )
    })]
}

/// Builds the release wheel and installs it into target/python-site-bench; returns that folder.
pub fn install_wheel() -> Result<std::path::PathBuf> {
    let wheel = build_wheel(&crate::root().join("target/wheels-bench"), true)?;
    let site = crate::root().join("target/python-site-bench");
    let _ = std::fs::remove_dir_all(&site);
    run_cmd(python().args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"]).arg(&site).arg(&wheel))?;
    Ok(site)
}

/// `python3` (or `$PYTHON`), run from the workspace root.
pub fn python() -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()));
    cmd.current_dir(crate::root());
    cmd
}

/// Builds the `moe-ep` wheel (abi3, Python >= 3.10) into the emptied folder `out`; returns its path.
pub fn build_wheel(out: &std::path::Path, release: bool) -> Result<std::path::PathBuf> {
    let _ = std::fs::remove_dir_all(out);
    let mut cmd = python();
    cmd.args(["-m", "maturin", "build", "--interpreter", "python3", "-m", "crates/python/Cargo.toml", "-o"]).arg(out);
    if release {
        cmd.args(["--release", "--strip"]);
    }
    run_cmd(&mut cmd)?;
    let wheel = std::fs::read_dir(out)
        .map_err(|e| format!("{}: {e}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("maturin left no wheel in {}", out.display()))?;
    Ok(wheel)
}
