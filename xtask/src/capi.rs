//! The C library: `cargo xtask capi-install` puts `libnccl_ep` and `nccl_ep.h` under a
//! prefix the way a user installs them; the C tests (`crates/capi/tests/c/*.c`) are compiled
//! with `cc` against that install and run (`cargo xtask test`'s C step, the GPU bundle).
use crate::{Result, cargo, root, run as run_cmd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `cargo xtask capi-install [--release] [--prefix DIR]` (default prefix: target/c-abi).
pub fn install_cmd(args: &[String]) -> Result {
    let (mut release, mut prefix) = (false, root().join("target/c-abi"));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--release" => release = true,
            "--prefix" => prefix = it.next().ok_or("--prefix needs a folder")?.into(),
            other => return Err(format!("capi-install: unexpected argument `{other}`")),
        }
    }
    install(release, true, &prefix)?;
    eprintln!("installed {}/include/nccl_ep.h and {}/lib/libnccl_ep.{{so,a}}", prefix.display(), prefix.display());
    Ok(())
}

/// Builds the library and copies it with its headers under `prefix` (the static archive
/// too, with `with_static`). Release builds are stripped.
pub fn install(release: bool, with_static: bool, prefix: &Path) -> Result {
    let mut build = cargo();
    build.args(["build", "-p", "moe-ep-capi"]);
    if release {
        build.arg("--release").env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    }
    run_cmd(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d));
    let built = target.join(if release { "release" } else { "debug" });
    let copy = |from: &Path, to: &Path| -> Result {
        std::fs::create_dir_all(to.parent().ok_or("no parent")?).map_err(|e| format!("{}: {e}", to.display()))?;
        std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))
    };
    let include = root().join("crates/capi/include");
    copy(&include.join("nccl_ep.h"), &prefix.join("include/nccl_ep.h"))?;
    copy(&include.join("nccl_ep/ep_enums.h"), &prefix.join("include/nccl_ep/ep_enums.h"))?;
    for lib in ["libnccl_ep.so", "libnccl_ep.a"].into_iter().take(if with_static { 2 } else { 1 }) {
        copy(&built.join(lib), &prefix.join("lib").join(lib))?;
    }
    Ok(())
}

/// The C test programs, each compiled against the install at `prefix` into `out`:
/// `(name, binary)`. `abi_sizes` uses the header only; `static_link` links `libnccl_ep.a`
/// (skipped when the install has none).
pub fn build_tests(prefix: &Path, out: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dir = root().join("crates/capi/tests/c");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let mut built = Vec::new();
    for src in sources {
        let name = src.file_stem().and_then(|s| s.to_str()).ok_or("bad file name")?.to_string();
        if name == "static_link" && !prefix.join("lib/libnccl_ep.a").exists() {
            continue;
        }
        let bin = out.join(&name);
        let mut cmd = Command::new(&cc);
        cmd.args(["-std=c11", "-D_GNU_SOURCE", "-O1", "-Wall", "-Wextra", "-Werror", "-DMOE_EP_NO_NCCL_H"])
            .arg("-I")
            .arg(prefix.join("include"))
            .arg(&src)
            .arg("-o")
            .arg(&bin);
        match name.as_str() {
            "abi_sizes" => {}
            // The static library carries Rust's std: it needs the system libraries std uses.
            "static_link" => {
                cmd.arg(prefix.join("lib/libnccl_ep.a")).args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s"]);
            }
            _ => {
                cmd.arg("-L").arg(prefix.join("lib")).args(["-lnccl_ep", "-lpthread", "-ldl"]);
            }
        }
        run_cmd(&mut cmd)?;
        built.push((name, bin));
    }
    Ok(built)
}

/// `cargo xtask test`'s C step: install into target/c-abi, compile every C test against it,
/// run each on the CPU emulator (unless MOE_EP_DEVICE says otherwise).
pub fn test() -> Result {
    let prefix = root().join("target/c-abi");
    install(false, true, &prefix)?;
    for (name, bin) in build_tests(&prefix, &prefix.join("bin"))? {
        // roundtrip runs twice: ranks as threads, then as processes (2, to keep CI short).
        let modes: &[&[(&str, &str)]] = if name == "roundtrip" {
            &[&[], &[("MOE_EP_TEST_PROCS", "1"), ("MOE_EP_TEST_RANKS", "2")]]
        } else {
            &[&[]]
        };
        for mode in modes {
            let mut cmd = Command::new(&bin);
            cmd.env("LD_LIBRARY_PATH", prefix.join("lib")).envs(mode.iter().copied());
            if std::env::var_os("MOE_EP_DEVICE").is_none() {
                cmd.env("MOE_EP_DEVICE", "cpu");
            }
            run_cmd(&mut cmd).map_err(|e| format!("C test {name} {mode:?}: {e}"))?;
        }
    }
    Ok(())
}
