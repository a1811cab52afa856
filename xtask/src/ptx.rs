//! `cargo xtask ptx`: gpu-kernels → PTX (pinned nightly, NVPTX backend) → ptxas report.
//!
//! The PTX must be byte-identical whatever folder the repository is cloned into (CI runs
//! `--check` on its own clone), so the build
//! * takes no flags from the environment (`RUSTFLAGS`, `CARGO_ENCODED_RUSTFLAGS`,
//!   `CARGO_PROFILE_*`, ... are removed) and pins the release-profile settings that change code;
//! * uses cargo's `trim-paths`, which remaps the workspace, registry and sysroot paths, so no
//!   absolute path can reach the PTX (e.g. through `Location::caller()`);
//! * relies on cargo's `-C metadata` (hence the mangled-symbol hashes) depending on package ids
//!   relative to the workspace root, not on its absolute path.

use crate::{Result, output, root, run as run_cmd};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernels' toolchain (rustc 1.97.0 e50aa6fba, LLVM 22).
pub const TOOLCHAIN: &str = "nightly-2026-05-20";
const SM: &str = "sm_90";
const TARGET: &str = "nvptx64-nvidia-cuda";
const KERNEL_PACKAGE: &str = "moe-ep-kernels";
/// The PTX the host crate embeds (`include_str!`), relative to the workspace root.
pub const TRACKED: &str = "host/ptx/moe_ep_kernels.ptx";
/// Build folder of the nvptx build (its own, so host builds never share fingerprints with it).
const OUT_DIR: &str = "target/ptx";
const RUSTFLAGS: &str = "-Zunstable-options -Cpanic=immediate-abort -Ctarget-cpu=sm_90";
/// Release-profile settings pinned for the nvptx build, whatever the workspace or user config says.
const PROFILE: &[&str] = &[
    "profile.release.opt-level=3",
    "profile.release.debug=false",
    "profile.release.debug-assertions=false",
    "profile.release.overflow-checks=false",
    "profile.release.incremental=false",
    "profile.release.lto=false",
    "profile.release.panic=\"unwind\"", // cargo passes no -Cpanic; RUSTFLAGS' immediate-abort applies
    "profile.release.trim-paths=\"all\"",
];

/// ptxas from PyPI's `nvidia-cuda-nvcc` wheel (x86-64 Linux), checked against its sha256.
const PTXAS_VERSION: &str = "13.5.37";
const PTXAS_WHEEL_PLATFORM: &str = "manylinux_2_17_x86_64";
const PTXAS_WHEEL_SHA256: &str = "f5c4f7ead5d964fb4af42bbf1e6d3ec3c1e6e9d83b53749f691d387e7fcaa3a7";
const PTXAS_WHEEL_MEMBER: &str = "nvidia/cu13/bin/ptxas";

#[derive(Debug, Default, Clone)]
pub struct PtxOptions {
    /// Compare with the tracked file instead of writing it.
    pub check: bool,
    /// Spills are an error rather than a warning.
    pub deny_spills: bool,
    /// Skip ptxas.
    pub no_ptxas: bool,
}

impl PtxOptions {
    pub fn parse(args: &[String]) -> Result<PtxOptions> {
        let mut o = PtxOptions::default();
        for a in args {
            match a.as_str() {
                "--check" => o.check = true,
                "--deny-spills" => o.deny_spills = true,
                "--no-ptxas" => o.no_ptxas = true,
                _ => {
                    return Err(format!("ptx: unknown argument `{a}` (expected --check, --deny-spills, --no-ptxas)"));
                }
            }
        }
        Ok(o)
    }
}

/// `cargo xtask ptx [--check]`.
pub fn run(o: &PtxOptions) -> Result {
    let root = root();
    let tracked_path = root.join(TRACKED);
    let fresh = build()?;
    let fresh_path = root.join(OUT_DIR).join("moe_ep_kernels.ptx");
    eprintln!("built {} ({} lines, {})", fresh_path.display(), fresh.lines().count(), header(&fresh));

    let externs = extern_funcs(&fresh);
    if !externs.is_empty() {
        return Err(format!(
            "the PTX has unresolved calls (`.extern .func`: a panic path, a runtime division, a \
             non-#[inline] helper from another crate, ...); the module would fail to load:\n{externs}\
             (PTX left in {})",
            fresh_path.display()
        ));
    }

    if o.check {
        let tracked = match fs::read_to_string(&tracked_path) {
            Ok(t) => t,
            Err(e) => return Err(format!("{TRACKED} cannot be read ({e}): run `cargo xtask ptx`")),
        };
        let externs = extern_funcs(&tracked);
        if !externs.is_empty() {
            return Err(format!("{TRACKED} has `.extern .func` lines:\n{externs}run `cargo xtask ptx`"));
        }
        if tracked != fresh {
            return Err(format!("{TRACKED} is stale: run `cargo xtask ptx`\n{}", first_diff(&tracked, &fresh)));
        }
        eprintln!("{TRACKED} is up to date");
    } else if fs::read_to_string(&tracked_path).ok().as_deref() == Some(fresh.as_str()) {
        // Not rewritten, so the host crate (include_str!) is not rebuilt for nothing.
        eprintln!("{TRACKED} unchanged");
    } else {
        fs::create_dir_all(tracked_path.parent().unwrap()).map_err(|e| e.to_string())?;
        fs::write(&tracked_path, &fresh).map_err(|e| format!("writing {TRACKED}: {e}"))?;
        eprintln!("{TRACKED} updated");
    }

    if o.no_ptxas {
        return Ok(());
    }
    assemble(&fresh_path, o.deny_spills)
}

/// The `.version` and `.target` lines, for the log.
fn header(ptx: &str) -> String {
    ptx.lines().filter(|l| l.starts_with(".version") || l.starts_with(".target")).collect::<Vec<_>>().join(", ")
}

/// Lines starting with `.extern .func`, numbered, one per line.
fn extern_funcs(ptx: &str) -> String {
    let mut s = String::new();
    for (i, l) in ptx.lines().enumerate() {
        if l.starts_with(".extern .func") {
            s += &format!("  {}: {l}\n", i + 1);
        }
    }
    s
}

/// The first differing region of two texts, as `-` (tracked) / `+` (fresh) lines: from the
/// first difference to where both sides agree again on a few lines.
fn first_diff(old: &str, new: &str) -> String {
    const MAX: usize = 15; // lines shown per side
    const WINDOW: usize = 400; // how far to look for the resynchronisation
    const SYNC: usize = 3; // equal lines that count as "agree again"
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let p = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if p == a.len() && p == b.len() {
        return "(the files differ only in line endings or the final newline)".into();
    }
    let (a_rest, b_rest) = (&a[p..], &b[p..]);
    let agree = |i: usize, j: usize| {
        (0..SYNC).all(|k| match (a_rest.get(i + k), b_rest.get(j + k)) {
            (Some(x), Some(y)) => x == y,
            (None, None) => true,
            _ => false,
        })
    };
    // The resynchronisation with the fewest lines skipped on both sides (else: show MAX lines each).
    let (ea, eb) = (0..2 * WINDOW)
        .flat_map(|d| (0..=d).map(move |i| (i, d - i)))
        .find(|&(i, j)| i <= a_rest.len() && j <= b_rest.len() && (i, j) != (0, 0) && agree(i, j))
        .unwrap_or((a_rest.len(), b_rest.len()));
    let mut out =
        format!("first difference at line {} (tracked: {} lines, fresh build: {} lines):\n", p + 1, a.len(), b.len());
    for (sign, lines) in [("-", &a_rest[..ea]), ("+", &b_rest[..eb])] {
        for l in lines.iter().take(MAX) {
            out += &format!("{sign} {l}\n");
        }
        if lines.len() > MAX {
            out += &format!("{sign} ... ({} more lines)\n", lines.len() - MAX);
        }
    }
    out
}

/// Installs the pinned toolchain and its rust-src when missing (rustup).
pub fn ensure_toolchain() -> Result {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let installed = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| t == TOOLCHAIN || t.strip_prefix(TOOLCHAIN).is_some_and(|host| host.starts_with('-')));
    if !installed {
        eprintln!("installing the kernels' toolchain {TOOLCHAIN}");
        return run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--no-self-update", // never replace the user's rustup as a side effect
        ]));
    }
    let sysroot = output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.is_file() {
        eprintln!("adding rust-src to {TOOLCHAIN}");
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))?;
    }
    Ok(())
}

/// Removes every environment variable through which a user's setup could change the build.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let drop = [
            "RUSTFLAGS",
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTC_BOOTSTRAP",
            "RUSTUP_TOOLCHAIN",
            "CARGO",
            "CARGO_INCREMENTAL",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET_DIR",
        ]
        .contains(&k.as_ref())
            || ["CARGO_ENCODED_", "CARGO_PROFILE_", "CARGO_BUILD_", "CARGO_TARGET_", "CARGO_UNSTABLE_", "__CARGO"]
                .iter()
                .any(|p| k.starts_with(p));
        if drop {
            cmd.env_remove(k.as_ref());
        }
    }
}

/// Builds the kernels crate to PTX in target/ptx; returns the PTX text (also left in
/// target/ptx/moe_ep_kernels.ptx).
pub fn build() -> Result<String> {
    ensure_toolchain()?;
    let root = root();
    let out_dir = root.join(OUT_DIR);
    fs::create_dir_all(&out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    // A fresh emit path per run: `cargo rustc` fingerprints its extra arguments, so the
    // kernels crate is always recompiled (a second or so) and the PTX can never be a
    // leftover from an earlier build. The path does not reach the output.
    let emit = out_dir.join(format!("emit-{}.ptx", std::process::id()));
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root);
    clean_env(&mut cmd);
    cmd.env("RUSTFLAGS", RUSTFLAGS)
        .args(["run", TOOLCHAIN, "cargo", "rustc", "-p", KERNEL_PACKAGE, "--lib", "--release"])
        .args(["--target", TARGET, "-Zbuild-std=core", "-Ztrim-paths", "--target-dir", OUT_DIR]);
    for c in PROFILE {
        cmd.args(["--config", c]);
    }
    cmd.arg("--").arg(format!("--emit=asm={}", emit.display())).arg("-Ccodegen-units=1");
    let result = run_cmd(&mut cmd).and_then(|()| {
        fs::read_to_string(&emit).map_err(|e| format!("the build left no PTX at {} ({e})", emit.display()))
    });
    let _ = fs::remove_file(&emit);
    let ptx = with_max_threads(&result?)?;
    let dest = out_dir.join("moe_ep_kernels.ptx");
    fs::write(&dest, &ptx).map_err(|e| format!("writing {}: {e}", dest.display()))?;
    Ok(ptx)
}

/// Kernels the host never launches with more threads per block than this. Rust can't say so
/// (no `__launch_bounds__`), so `.maxntid` goes into the PTX here: ptxas and the driver's JIT
/// then keep such a kernel within 65536 / threads registers per thread, and a launch can't
/// fail for lack of registers (`ht_combine` at 135 registers x 512 threads did, on an H200).
/// The host refuses larger HT blocks (`moe_ep_abi::HT_MAX_BLOCK_WARPS` warps), and a host
/// test checks the shipped PTX carries that bound.
const MAX_THREADS: &[(&str, u32)] =
    &[("_ZN6moe_ep9intranode8dispatchEv", 512), ("_ZN6moe_ep9intranode7combineEv", 512)];

/// `ptx` with a `.maxntid` directive after the parameter list of every kernel of
/// [`MAX_THREADS`].
fn with_max_threads(ptx: &str) -> Result<String> {
    let mut out = String::with_capacity(ptx.len() + 64 * MAX_THREADS.len());
    let mut pending: Option<u32> = None;
    let mut seen = 0;
    for line in ptx.lines() {
        out.push_str(line);
        out.push('\n');
        if let Some(name) = line.strip_prefix(".visible .entry ").and_then(|l| l.strip_suffix('(')) {
            pending = MAX_THREADS.iter().find(|(k, _)| *k == name).map(|(_, n)| *n);
        } else if line == ")"
            && let Some(n) = pending.take()
        {
            out.push_str(&format!(".maxntid {n}, 1, 1\n"));
            seen += 1;
        }
    }
    if seen != MAX_THREADS.len() {
        return Err(format!("expected the kernels {MAX_THREADS:?} in the PTX, found {seen} of them"));
    }
    Ok(out)
}

/// ptxas -v figures of one kernel entry (or, for `entry == false`, a called `.func`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub name: String,
    pub entry: bool,
    pub registers: u64,
    pub barriers: u64,
    pub smem: u64,
    pub stack: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

/// Parses `N word word, N word, ...` into (words, N) pairs.
fn fields(s: &str) -> Vec<(String, u64)> {
    s.split(',')
        .filter_map(|part| {
            let mut words = part.split_whitespace().filter(|w| !w.eq_ignore_ascii_case("used"));
            let n = words.next()?.parse().ok()?;
            Some((words.collect::<Vec<_>>().join(" "), n))
        })
        .collect()
}

/// Parses `ptxas -v` output.
pub fn parse_ptxas(text: &str) -> Vec<Stats> {
    let mut all: Vec<Stats> = Vec::new();
    let mut current: Option<usize> = None; // the entry being compiled
    let mut props: Option<usize> = None; // whose "Function properties" come next
    let quoted = |s: &str| s.split('\'').nth(1).map(str::to_string);
    let find_or_add = |all: &mut Vec<Stats>, name: String, entry: bool| match all.iter().position(|s| s.name == name) {
        Some(i) => {
            all[i].entry |= entry;
            i
        }
        None => {
            all.push(Stats { name, entry, ..Stats::default() });
            all.len() - 1
        }
    };
    for line in text.lines() {
        let info = line.trim_start_matches("ptxas info").trim_start_matches([' ', ':']);
        let target = if info.starts_with("Compiling entry function") {
            current = quoted(info).map(|n| find_or_add(&mut all, n, true));
            None
        } else if let Some(name) = info.strip_prefix("Function properties for ") {
            props = Some(find_or_add(&mut all, name.trim().to_string(), false));
            None
        } else if info.contains("bytes stack frame") {
            props.take()
        } else if info.starts_with("Used ") {
            current
        } else {
            None
        };
        let Some(i) = target else { continue };
        let s = &mut all[i];
        for (k, n) in fields(info) {
            match k.as_str() {
                "bytes stack frame" => s.stack = n,
                "bytes spill stores" => s.spill_stores = n,
                "bytes spill loads" => s.spill_loads = n,
                "registers" => s.registers = n,
                "barriers" => s.barriers = n,
                "bytes smem" => s.smem = n,
                _ => {}
            }
        }
    }
    all
}

/// Assembles the PTX with ptxas and prints the per-kernel table.
fn assemble(ptx: &Path, deny_spills: bool) -> Result {
    let ptxas = ptxas()?;
    let cubin = ptx.with_file_name(format!("moe_ep_kernels.{SM}.cubin"));
    let mut cmd = Command::new(&ptxas);
    cmd.arg(format!("-arch={SM}")).args(["-O3", "-v"]).arg(ptx).arg("-o").arg(&cubin);
    let line = crate::show(&cmd);
    eprintln!("$ {line}");
    let out = cmd.output().map_err(|e| format!("cannot run `{line}`: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("ptxas rejected the PTX ({}):\n{text}", out.status));
    }
    for l in text.lines().filter(|l| !l.starts_with("ptxas info") && !l.starts_with("    ")) {
        eprintln!("{l}"); // warnings and anything unexpected
    }
    let stats = parse_ptxas(&text);
    let w = stats.iter().map(|s| s.name.len()).max().unwrap_or(6).max(6);
    println!(
        "{:<w$}  {:>4}  {:>8}  {:>6}  {:>7}  {:>10}  {:>9}",
        "kernel", "regs", "barriers", "smem B", "stack B", "spill st B", "spill ld B"
    );
    for s in &stats {
        let name = if s.entry { s.name.clone() } else { format!("{} (.func)", s.name) };
        println!(
            "{name:<w$}  {:>4}  {:>8}  {:>6}  {:>7}  {:>10}  {:>9}",
            s.registers, s.barriers, s.smem, s.stack, s.spill_stores, s.spill_loads
        );
    }
    println!("cubin: {}", cubin.display());
    let spilling: Vec<&str> =
        stats.iter().filter(|s| s.spill_stores + s.spill_loads > 0).map(|s| s.name.as_str()).collect();
    if spilling.is_empty() {
        return Ok(());
    }
    let msg = format!("register spills in: {}", spilling.join(", "));
    if deny_spills {
        return Err(msg);
    }
    eprintln!("warning: {msg} (fails with --deny-spills)");
    Ok(())
}

/// `$MOE_EP_PTXAS`, else the cached ptxas (downloaded on first use).
pub fn ptxas() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOE_EP_PTXAS").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("MOE_EP_PTXAS={} is not a file", p.display())) };
    }
    let dir = cache_dir()?.join(format!("ptxas-{PTXAS_VERSION}"));
    let exe = dir.join("ptxas");
    if !exe.is_file() {
        install_ptxas(&dir)?;
    }
    Ok(exe)
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/moe-ep`.
pub fn cache_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = match nonempty("XDG_CACHE_HOME") {
        Some(p) if p.is_absolute() => p,
        _ => nonempty("HOME").ok_or("neither XDG_CACHE_HOME nor HOME is set")?.join(".cache"),
    };
    Ok(base.join("moe-ep"))
}

/// Downloads the pinned nvidia-cuda-nvcc wheel with pip (hash-checked) and extracts ptxas.
fn install_ptxas(dir: &Path) -> Result {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("no pinned ptxas for this host: set MOE_EP_PTXAS to a ptxas (CUDA >= 12.x)".into());
    }
    let parent = dir.parent().unwrap();
    let tmp = parent.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    eprintln!("installing ptxas {PTXAS_VERSION} (PyPI nvidia-cuda-nvcc, 47 MB) into {}", dir.display());
    let result = (|| {
        let req = tmp.join("requirements.txt");
        fs::write(&req, format!("nvidia-cuda-nvcc=={PTXAS_VERSION} --hash=sha256:{PTXAS_WHEEL_SHA256}\n"))
            .map_err(|e| e.to_string())?;
        run_cmd(
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir"])
                .args(["--platform", PTXAS_WHEEL_PLATFORM, "--require-hashes", "-r"])
                .arg(&req)
                .arg("-d")
                .arg(&tmp),
        )?;
        let wheel = fs::read_dir(&tmp)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or("pip left no wheel")?;
        let staged = tmp.join("ptxas");
        run_cmd(
            Command::new("python3")
                .args([
                    "-c",
                    "import sys, zipfile\nopen(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))",
                ])
                .arg(&wheel)
                .arg(PTXAS_WHEEL_MEMBER)
                .arg(&staged),
        )?;
        set_executable(&staged)?;
        let version = output(Command::new(&staged).arg("--version"))?;
        if !version.contains(&format!("V{PTXAS_VERSION}")) {
            return Err(format!("unexpected ptxas version:\n{version}"));
        }
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        fs::rename(&staged, dir.join("ptxas")).map_err(|e| format!("installing ptxas: {e}"))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

#[cfg(unix)]
fn set_executable(p: &Path) -> Result {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

#[cfg(not(unix))]
fn set_executable(_: &Path) -> Result {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'all_gather' for 'sm_90'
ptxas info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Function properties for all_gather
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 1 barriers, 4096 bytes smem, 384 bytes cmem[0]
ptxas info    : Compile time = 52.801 ms
ptxas info    : Compiling entry function 'selftest_warp' for 'sm_90'
ptxas info    : Function properties for selftest_warp
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
";
        let s = parse_ptxas(text);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            Stats {
                name: "all_gather".into(),
                entry: true,
                registers: 28,
                barriers: 1,
                smem: 4096,
                ..Stats::default()
            }
        );
        assert_eq!((s[1].name.as_str(), s[1].entry, s[1].spill_stores, s[1].stack), ("helper", false, 4, 8));
        assert_eq!((s[2].registers, s[2].spill_stores, s[2].spill_loads, s[2].stack), (255, 12, 8, 16));
    }

    #[test]
    fn diff_shows_first_difference() {
        let d = first_diff("a\nb\nc\nd\ne\nf\n", "a\nB\nc\nd\ne\nf\ng\n");
        assert_eq!(d, "first difference at line 2 (tracked: 6 lines, fresh build: 7 lines):\n- b\n+ B\n");
        let d = first_diff("a\nb\n", "a\nx\ny\nb\n");
        assert!(d.ends_with("line 2 (tracked: 2 lines, fresh build: 4 lines):\n+ x\n+ y\n"), "{d}");
        let d = first_diff("a\nb\n", "a\nb\nc\n");
        assert!(d.ends_with("+ c\n"), "{d}");
        assert!(first_diff("a\n", "a").contains("final newline"));
    }

    #[test]
    fn finds_extern_funcs() {
        let ptx = ".version 7.8\n.extern .func foo\n(\n)\n.visible .entry k()\n";
        assert_eq!(extern_funcs(ptx), "  2: .extern .func foo\n");
    }

    #[test]
    fn max_threads_go_after_the_parameter_list() {
        let ptx = ".visible .entry _ZN6moe_ep9intranode8dispatchEv(\n\t.param .b8 p[8]\n)\n{\n}\n\
                   .visible .entry other(\n)\n{\n}\n.visible .entry _ZN6moe_ep9intranode7combineEv(\n)\n{\n}\n";
        let out = with_max_threads(ptx).unwrap();
        assert_eq!(out.matches(".maxntid 512, 1, 1\n{").count(), 2, "{out}");
        assert!(out.contains(".entry other(\n)\n{"), "{out}");
        assert!(with_max_threads(".visible .entry _ZN6moe_ep9intranode7combineEv(\n)\n{\n}\n").is_err());
    }
}
