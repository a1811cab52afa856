//! `cargo xtask gpu-bundle [--out DIR] [--no-ptx]`: everything the GPU machine (no Rust, no
//! network) needs to run moe-ep's tests: stripped release test binaries, the examples, bench
//! binaries, the PTX, `tests/gpu/*.{sh,py}`, a `run.sh` that runs them and sums up, and a
//! `bench.sh` for the benchmarks.

use crate::json::Json;
use crate::{Result, cargo, output, ptx, root, show};
use std::fs;
use std::path::{Path, PathBuf};

/// The bundle must stay small enough to carry to the GPU machine.
const MAX_BYTES: u64 = 60 << 20;
/// Marks a folder as a bundle, so `--out` never wipes anything else.
const MARKER: &str = ".moe-ep-bundle";
/// Packages whose binaries are bundled.
const HOST_PACKAGE: &str = "moe-ep";
const BENCH_PACKAGE: &str = "moe-ep-bench";
/// The example run.sh runs (counts as one test).
const DEMO_EXAMPLE: &str = "demo";

pub fn run(args: &[String]) -> Result {
    let mut out = root().join("bundle");
    let mut rebuild_ptx = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => {
                let dir = it.next().ok_or("gpu-bundle: --out needs a folder")?;
                out = std::env::current_dir().map_err(|e| e.to_string())?.join(dir);
            }
            "--no-ptx" => rebuild_ptx = false,
            _ => {
                return Err(format!("gpu-bundle: unknown argument `{a}` (expected --out DIR, --no-ptx)"));
            }
        }
    }
    if rebuild_ptx {
        // The host crate embeds host/ptx/moe_ep_kernels.ptx: bring it up to date first.
        eprintln!("==> PTX");
        ptx::run(&ptx::PtxOptions::default())?;
    }

    eprintln!("==> test binaries");
    let tests = build(&["test", "--release", "--workspace", "--exclude", "xtask", "--no-run"], |a| {
        a.get("profile").and_then(|p| p.get("test")).and_then(Json::as_bool) == Some(true)
    })?;
    eprintln!("==> examples");
    let examples = build(&["build", "--release", "-p", HOST_PACKAGE, "--examples"], |a| has_kind(a, "example"))?;
    let mut benches = Vec::new();
    if workspace_packages()?.iter().any(|p| p == BENCH_PACKAGE) {
        eprintln!("==> benches");
        benches = build(&["build", "--release", "-p", BENCH_PACKAGE, "--bins", "--benches"], |_| true)?;
    }

    prepare(&out)?;
    let bin = out.join("bin");
    let mut names: Vec<&str> = Vec::new();
    for (name, exe) in tests.iter().chain(&examples).chain(&benches) {
        if names.contains(&name.as_str()) {
            return Err(format!("gpu-bundle: two binaries would both be bin/{name}"));
        }
        names.push(name);
        fs::copy(exe, bin.join(name)).map_err(|e| format!("copying {}: {e}", exe.display()))?;
    }
    fs::copy(root().join(ptx::TRACKED), out.join("moe_ep_kernels.ptx"))
        .map_err(|e| format!("copying {}: {e}", ptx::TRACKED))?;
    let scripts = copy_gpu_scripts(&out)?;
    python_package(&out)?;
    // The C library (shared, stripped) and the C tests built against it, for tests/gpu/c_abi.sh.
    eprintln!("==> C library and C tests");
    crate::capi::install(true, false, &out.join("c"))?;
    crate::capi::build_tests(&out.join("c"), &out.join("c/bin"))?;

    let demo = examples.iter().map(|(n, _)| n.clone()).find(|n| *n == format!("{HOST_PACKAGE}-{DEMO_EXAMPLE}"));
    let test_names: Vec<String> = tests.iter().map(|(n, _)| n.clone()).collect();
    let script = RUN_SH
        .replace("@TESTS@", &test_names.join(" "))
        .replace("@SCRIPTS@", &scripts.join(" "))
        .replace("@DEMO@", demo.as_deref().unwrap_or(""));
    write_executable(&out.join("run.sh"), &script)?;
    write_executable(&out.join("bench.sh"), BENCH_SH)?;
    fs::write(out.join("BUILD_INFO"), build_info()).map_err(|e| e.to_string())?;

    let size = dir_size(&out)?;
    eprintln!(
        "\nbundle {}: {} test binaries, {} examples, {} bench binaries, {} scripts; {:.1} MiB",
        out.display(),
        tests.len(),
        examples.len(),
        benches.len(),
        scripts.len(),
        size as f64 / (1 << 20) as f64
    );
    if size > MAX_BYTES {
        return Err(format!("the bundle is {size} bytes, over the {} MiB limit", MAX_BYTES >> 20));
    }
    let dir = out.file_name().unwrap_or_default().to_string_lossy();
    eprintln!("on the GPU machine: {dir}/run.sh (tests), {dir}/bench.sh OUT_DIR (benchmarks)");
    Ok(())
}

fn has_kind(artifact: &Json, kind: &str) -> bool {
    artifact
        .get("target")
        .and_then(|t| t.get("kind"))
        .is_some_and(|k| k.as_array().iter().any(|x| x.as_str() == Some(kind)))
}

/// Runs a stripped release cargo build with JSON messages; returns (bundle name, executable)
/// of the artifacts `want` accepts.
fn build(args: &[&str], want: impl Fn(&Json) -> bool) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(args).arg("--message-format=json-render-diagnostics").env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    eprintln!("$ CARGO_PROFILE_RELEASE_STRIP=symbols {}", show(&cmd));
    let mut found = Vec::new();
    for line in output(&mut cmd)?.lines().filter(|l| l.starts_with('{')) {
        let msg = Json::parse(line)?;
        if msg.get("reason").and_then(Json::as_str) != Some("compiler-artifact") || !want(&msg) {
            continue;
        }
        let Some(exe) = msg.get("executable").and_then(Json::as_str) else {
            continue;
        };
        let package = package_name(msg.get("package_id").and_then(Json::as_str).unwrap_or("?"));
        let target = msg.get("target").and_then(|t| t.get("name")).and_then(Json::as_str).unwrap_or("?");
        let is_lib = ["lib", "rlib", "cdylib", "dylib", "staticlib", "proc-macro"].iter().any(|k| has_kind(&msg, k));
        let name = format!("{package}-{}", if is_lib { "lib" } else { target });
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("gpu-bundle: unexpected binary name {name:?}"));
        }
        found.push((name, PathBuf::from(exe)));
    }
    found.sort();
    Ok(found)
}

/// The package name in a cargo package id: `path+file:///w/host#moe-ep@0.1.0`,
/// `path+file:///w/xtask#0.0.0` (name = folder), or the old `name 0.1.0 (source)`.
fn package_name(id: &str) -> String {
    match id.rsplit_once('#') {
        Some((_, frag)) if frag.contains('@') => frag.split('@').next().unwrap_or(frag).to_string(),
        Some((url, _)) => url.rsplit('/').next().unwrap_or(url).to_string(),
        None => id.split(' ').next().unwrap_or(id).to_string(),
    }
}

/// Names of the workspace's packages.
fn workspace_packages() -> Result<Vec<String>> {
    let meta = Json::parse(&output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?)?;
    let packages = meta.get("packages").map(Json::as_array).unwrap_or_default();
    Ok(packages.iter().filter_map(|p| p.get("name").and_then(Json::as_str)).map(str::to_string).collect())
}

/// Empties `out` (only if it is a bundle or empty) and creates out/bin.
fn prepare(out: &Path) -> Result {
    if out.exists() {
        let empty = fs::read_dir(out).map_err(|e| e.to_string())?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            return Err(format!("{} exists and is not a bundle ({MARKER} missing): not overwriting it", out.display()));
        }
        fs::remove_dir_all(out).map_err(|e| format!("removing the old {}: {e}", out.display()))?;
    }
    fs::create_dir_all(out.join("bin")).map_err(|e| format!("creating {}: {e}", out.display()))?;
    fs::write(out.join(MARKER), "made by `cargo xtask gpu-bundle`; the whole folder is rewritten by it\n")
        .map_err(|e| e.to_string())
}

/// Copies tests/gpu/*.sh and *.py into the bundle; returns the scripts (*.sh), sorted.
fn copy_gpu_scripts(out: &Path) -> Result<Vec<String>> {
    let dir = root().join("tests/gpu");
    let mut scripts = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(scripts);
    };
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let is_sh = name.ends_with(".sh");
        if !path.is_file() || !(is_sh || name.ends_with(".py")) {
            continue;
        }
        if name == "run.sh" || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("gpu-bundle: tests/gpu/{name}: rename it (run.sh and unusual names are not allowed)"));
        }
        fs::copy(&path, out.join(&name)).map_err(|e| format!("copying {}: {e}", path.display()))?;
        if is_sh && !name.starts_with("bench") {
            scripts.push(name); // a test script (benchmarks run from bench.sh)
        }
    }
    scripts.sort();
    Ok(scripts)
}

/// Copies the `.py` files under `from` (recursively) to `to`.
fn copy_py_tree(from: &Path, to: &Path) -> Result {
    let Ok(entries) = fs::read_dir(from) else { return Ok(()) };
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap_or_default().to_owned();
        if path.is_dir() {
            copy_py_tree(&path, &to.join(&name))?;
        } else if path.extension().is_some_and(|x| x == "py") {
            fs::copy(&path, to.join(&name)).map_err(|e| format!("copying {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// The Python package for tests/gpu/python_torch.sh: the abi3 wheel (release, stripped; any
/// CPython >= 3.10 on x86-64 Linux), its tests, and pytest's wheels in case the GPU machine
/// lacks pytest (it has no network).
fn python_package(out: &Path) -> Result {
    eprintln!("==> python wheel");
    let dir = out.join("python");
    let wheel = crate::ci::build_wheel(&dir, true)?;
    eprintln!("wheel: {}", wheel.display());
    // `import deep_ep` served by moe-ep (pure Python: scripts put the folder on PYTHONPATH).
    copy_py_tree(&root().join("crates/python/deep_ep_alias"), &dir.join("deep_ep_alias"))?;
    let tests = dir.join("tests");
    fs::create_dir_all(&tests).map_err(|e| e.to_string())?;
    let src = root().join("crates/python/tests");
    for e in fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))? {
        let path = e.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "py") {
            let name = path.file_name().unwrap_or_default();
            fs::copy(&path, tests.join(name)).map_err(|e| format!("copying {}: {e}", path.display()))?;
        }
    }
    let mut get = crate::ci::python();
    get.args(["-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.12", "--dest"])
        .arg(dir.join("wheels"))
        .arg("pytest");
    if let Err(e) = crate::run(&mut get) {
        eprintln!("warning: no pytest wheels in the bundle ({e}); the GPU machine must have pytest");
    }
    Ok(())
}

fn build_info() -> String {
    let git =
        |args: &[&str]| output(std::process::Command::new("git").current_dir(root()).args(args)).unwrap_or_default();
    let commit = git(&["log", "-1", "--format=%h %cI %s"]);
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).lines().count();
    format!(
        "moe-ep GPU bundle, commit {}{}\n",
        commit.trim(),
        if dirty > 0 { format!(" + {dirty} modified files") } else { String::new() }
    )
}

fn write_executable(path: &Path, text: &str) -> Result {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let meta = e.metadata().map_err(|e| e.to_string())?;
        total += if meta.is_dir() { dir_size(&e.path())? } else { meta.len() };
    }
    Ok(total)
}

/// The bundle's entry point (`@TESTS@`, `@SCRIPTS@`, `@DEMO@` are filled in).
/// The bundle's benchmark entry point: both benches' sweeps with the same-run baselines,
/// one CSV, the plots.
const BENCH_SH: &str = r#"#!/usr/bin/env bash
# moe-ep benchmarks on the GPU machine (see docs/benchmarks.md):
#   ./bench.sh OUT_DIR [--gpus N]   HT and LL sweeps (8 ranks on one GPU by default; with
#                                   --gpus N, one rank per GPU), same-run torch (and, across
#                                   GPUs, torch+NCCL) baselines, OUT_DIR/bench.csv and plots.
#   MOE_EP_BENCH_LIMIT=150          seconds per bench binary
set -u
cd "$(dirname "$0")" || exit 1
out=${1:?usage: ./bench.sh OUT_DIR [--gpus N]}
shift
mkdir -p "$out"
export MOE_EP_DEVICE=cuda CUDA_DEVICE_MAX_CONNECTIONS=32 NCCL_NVLS_ENABLE=0
export MOE_EP_TIMEOUT_S=${MOE_EP_TIMEOUT_S:-10} MOE_EP_BOOTSTRAP_TIMEOUT_S=${MOE_EP_BOOTSTRAP_TIMEOUT_S:-30}
limit=${MOE_EP_BENCH_LIMIT:-150}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date
for b in ht ll; do
  echo "=== $b"
  timeout -k 10 "$limit" bin/moe-ep-bench-$b --sweep --torch ht_torch_reference.py --csv "$out/bench.csv" "$@" 2>&1 |
    tee "$out/bench_$b.log"
done
python3 plot_bench.py "$out/bench.csv" "$out" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
echo "=== py (DeepEP's timing loop, one process per rank)"
./bench_py.sh "$out" 2>&1 | tee "$out/bench_py.log"
"#;

const RUN_SH: &str = r#"#!/usr/bin/env bash
# moe-ep GPU test bundle, made by `cargo xtask gpu-bundle` (see BUILD_INFO). On the GPU machine:
#   ./run.sh [NAME...]         all test binaries, then the tests/gpu scripts, then the demo
#                              (or only the named ones: bin/ names, script names)
#   MOE_EP_TEST_ARGS='...'     extra arguments for every test binary (e.g. a test-name filter)
#   MOE_EP_TEST_TIMEOUT=300    seconds per test binary and for the demo
#   MOE_EP_SCRIPT_TIMEOUT=900  seconds per script
#   MOE_EP_DEMO_ARGS='...'     arguments for the demo
# Logs go to logs/. The last line is "N passed, M failed"; the exit status is 1 when M > 0.
set -u
cd "$(dirname "$0")" || exit 1
export MOE_EP_DEVICE=cuda
export CUDA_DEVICE_MAX_CONNECTIONS=32 # > 8 streams must not share hardware queues
export NCCL_NVLS_ENABLE=0             # never NVLink multicast
export MOE_EP_TIMEOUT_S=${MOE_EP_TIMEOUT_S:-30} # device-side waits give up (typed error) well inside the harness timeout
# MPS is not started here (it changes every process on the GPU): scripts that need it start
# and stop it themselves (`nvidia-cuda-mps-control -d`, `echo quit | nvidia-cuda-mps-control`)
# with these folders.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/moe-ep-mps
export CUDA_MPS_LOG_DIRECTORY=/tmp/moe-ep-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"

TESTS=(@TESTS@)
SCRIPTS=(@SCRIPTS@)
DEMO="@DEMO@"
TEST_TIMEOUT=${MOE_EP_TEST_TIMEOUT:-300}
SCRIPT_TIMEOUT=${MOE_EP_SCRIPT_TIMEOUT:-900}
read -r -a TEST_ARGS <<< "${MOE_EP_TEST_ARGS:-}"
read -r -a DEMO_ARGS <<< "${MOE_EP_DEMO_ARGS:-}"
ONLY=("$@")

cat BUILD_INFO 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "nvidia-smi failed"
date

rm -rf logs
mkdir -p logs
PASSED=0
FAILED=0
FAILED_LOGS=()

selected() { # NAME: is it to be run?
  [ ${#ONLY[@]} -eq 0 ] && return 0
  local o
  for o in "${ONLY[@]}"; do [ "$o" = "$1" ] && return 0; done
  return 1
}

run_logged() { # NAME LIMIT CMD...: CMD under timeout, output to logs/NAME.log and the terminal; sets RC
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "logs/$name.log"
  RC=${PIPESTATUS[0]}
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    echo "=== $name: timed out after ${limit}s" | tee -a "logs/$name.log"
  fi
  echo "=== $name: exit status $RC"
}

add() { # NAME PASSED FAILED
  PASSED=$((PASSED + $2))
  FAILED=$((FAILED + $3))
  if [ "$3" -gt 0 ]; then FAILED_LOGS+=("$1"); fi
}

for t in "${TESTS[@]}"; do
  selected "$t" || continue
  run_logged "$t" "$TEST_TIMEOUT" "bin/$t" --test-threads=1 "${TEST_ARGS[@]}"
  # libtest: "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; ..."
  read -r n p f < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed;.*/\1 \2/p' "logs/$t.log" |
    awk '{ p += $1; f += $2; n++ } END { print n + 0, p + 0, f + 0 }')
  if [ "$n" -eq 0 ]; then # crashed or timed out before its summary
    if [ "$RC" -eq 0 ]; then p=1; else f=1; fi
  elif [ "$RC" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1
  fi
  add "$t" "$p" "$f"
done

for s in "${SCRIPTS[@]}"; do
  selected "$s" || continue
  run_logged "$s" "$SCRIPT_TIMEOUT" bash "./$s"
  # each script ends with "N passed, M failed"
  last=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "logs/$s.log" | tail -n 1)
  if [ -z "$last" ]; then
    p=0
    f=1
  else
    p=${last%% passed*}
    f=${last#*passed, }
    f=${f%% failed*}
    if [ "$RC" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  fi
  add "$s" "$p" "$f"
done

if [ -n "$DEMO" ] && selected "$DEMO"; then
  run_logged "$DEMO" "$TEST_TIMEOUT" "bin/$DEMO" "${DEMO_ARGS[@]}"
  if [ "$RC" -eq 0 ]; then add "$DEMO" 1 0; else add "$DEMO" 0 1; fi
fi

echo
if [ ${#FAILED_LOGS[@]} -gt 0 ]; then
  for name in "${FAILED_LOGS[@]}"; do
    echo "=== FAILED: $name (tail of logs/$name.log)"
    tail -n 40 "logs/$name.log"
    echo
  done
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
"#;

#[cfg(test)]
mod tests {
    use super::package_name;

    #[test]
    fn package_names() {
        assert_eq!(package_name("path+file:///w/host#moe-ep@0.1.0"), "moe-ep");
        assert_eq!(package_name("path+file:///w/xtask#0.0.0"), "xtask");
        assert_eq!(package_name("registry+https://github.com/rust-lang/crates.io-index#libc@0.2.1"), "libc");
        assert_eq!(package_name("moe-ep 0.1.0 (path+file:///w/host)"), "moe-ep");
    }
}
