//! HT and LL with one rank per process: this binary re-runs itself as N processes joined by
//! the TCP bootstrap (`moe_ep_tests::procs`), one GPU each (`LOCAL_RANK % count`) or the CPU
//! emulator (memfd-shared memory), and every process runs the same per-rank checks as the
//! in-process tests (`moe_ep_tests::{ht, ll}`), bit for bit against the CPU reference:
//! HT dispatch + combine with bias and cached dispatch, padded outputs, fp8 payloads, 20
//! reruns; LL expert-major with receive hooks, a CUDA graph replayed. Hashes of the reruns'
//! and replays' outputs come back to this process and must equal its own reference's.
//!
//! A plain binary (`harness = false`) so that what cannot run is reported as ignored, not
//! passed. Process counts: `MOE_EP_TEST_PROCS` (e.g. `2,4`); default 2 and 4 on the CPU. On a
//! GPU (`MOE_EP_DEVICE=cuda`) the tests run only when `MOE_EP_TEST_PROCS` is set:
//! `tests/gpu/multigpu.sh` sets it to 2, 4, 8 up to the GPU count (one GPU per process;
//! processes sharing a GPU without MPS time-slice it). Arguments: an optional name filter
//! (libtest flags such as `--test-threads=1` are accepted and ignored).
use moe_ep::Group;
use moe_ep_tests::procs::{Outcome, run_ranks};
use moe_ep_tests::{Rng, device, ht, ll};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "MOE_EP_MP_EP_CHILD";
const CASES: [&str; 7] =
    ["ht_exact_bias_cached", "ht_padded", "ht_one_pass", "ht_fp8", "ht_20_reruns", "ll_hooks", "ll_graph_replay"];

/// Shapes: small on the CPU emulator (CI), larger on GPUs.
struct Sizes {
    ht_tokens: usize,
    ll_tokens: usize,
    replays: usize,
}

fn sizes(cpu: bool) -> Sizes {
    if cpu {
        Sizes { ht_tokens: 24, ll_tokens: 8, replays: 4 }
    } else {
        Sizes { ht_tokens: 500, ll_tokens: 128, replays: 100 }
    }
}

fn ht_exact(s: &Sizes) -> ht::Case {
    ht::Case { calls: 3, ..ht::Case::new(16, 64, 4, s.ht_tokens) }
}

fn ht_padded(s: &Sizes) -> ht::Case {
    ht::Case {
        num_worst_tokens: Some(8 * s.ht_tokens + 3),
        with_bias: false,
        calls: 2,
        ..ht::Case::new(8, 128, 2, s.ht_tokens)
    }
}

fn ll_hooks(s: &Sizes) -> ll::Case {
    ll::Case { num_experts: 16, hidden: 64, num_topk: 4, max_tokens: s.ll_tokens, calls: 4, hooks: true }
}

/// The seed every process draws its inputs from.
fn seed() -> u64 {
    std::env::var("MOE_EP_TEST_SEED").ok().and_then(|s| s.parse().ok()).expect("MOE_EP_TEST_SEED (set by the parent)")
}

/// One case on this process's rank; `Some(hash)` for the cases whose outputs are hashed.
fn run_case(name: &str, group: &Group, s: &Sizes) -> Option<u64> {
    let (n, mut rng) = (group.num_ranks(), Rng::new(seed()));
    match name {
        "ht_exact_bias_cached" => {
            ht::check_rank(&ht_exact(s), &ht::prepare(&ht_exact(s), n, &mut rng), group);
        }
        "ht_padded" => {
            ht::check_rank(&ht_padded(s), &ht::prepare(&ht_padded(s), n, &mut rng), group);
        }
        "ht_one_pass" => {
            let case = ht::Case { heap_bytes: 8 << 20, ..ht_exact(s) };
            let one_pass = ht::check_rank(&case, &ht::prepare(&case, n, &mut rng), group);
            assert!(one_pass.iter().all(|&d| d), "outputs fit the heap, yet a call took the ring: {one_pass:?}");
        }
        "ht_fp8" => ht::check_fp8_rank(&ht::prepare_fp8(n, s.ht_tokens, &mut rng), group),
        "ht_20_reruns" => return Some(ht::check_reruns_rank(&ht::prepare_reruns(n, s.ht_tokens, &mut rng), 20, group)),
        "ll_hooks" => ll::check_rank(&ll_hooks(s), &ll::prepare(&ll_hooks(s), n, &mut rng), group),
        "ll_graph_replay" => {
            return Some(ll::check_graph_rank(&ll::prepare_graph(n, s.ll_tokens, &mut rng), s.replays, group, None));
        }
        other => panic!("unknown case {other}"),
    }
    None
}

/// What the parent expects a hashed case's rank to report (from its own reference run).
fn want_hashes(name: &str, n: usize, seed: u64, s: &Sizes) -> Option<Vec<u64>> {
    let mut rng = Rng::new(seed);
    match name {
        "ht_20_reruns" => Some(ht::prepare_reruns(n, s.ht_tokens, &mut rng).want_hash),
        "ll_graph_replay" => {
            let d = ll::prepare_graph(n, s.ll_tokens, &mut rng);
            Some(d.variants[(s.replays - 1) % 3].1.iter().map(|v| ll::hash_u16(v)).collect())
        }
        _ => None,
    }
}

/// A child: one rank, every selected case in order, a line per finished case.
fn child(cases: &[&str]) {
    let group = Group::from_env().unwrap();
    let s = sizes(group.device().is_cpu());
    eprintln!("rank {} of {} on {:?}", group.rank(), group.num_ranks(), group.device());
    for &name in cases {
        let hash = run_case(name, &group, &s);
        println!("CASE_OK {name} {} {}", group.rank(), hash.map_or("-".into(), |h| h.to_string()));
    }
}

/// Did every rank finish `name`, with the hash the parent expects?
fn verdict(name: &str, outcomes: &[Outcome], want: Option<&[u64]>) -> Result<(), String> {
    for o in outcomes {
        let line = o.stdout.lines().find(|l| l.split_whitespace().nth(1) == Some(name));
        let Some(line) = line else {
            return Err(format!("rank {} did not finish {name}", o.rank));
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) != Some(&o.rank.to_string().as_str()) {
            return Err(format!("rank {}: reported as {:?}", o.rank, f.get(2)));
        }
        if let Some(want) = want {
            let got: Option<u64> = f.get(3).and_then(|h| h.parse().ok());
            if got != Some(want[o.rank]) {
                return Err(format!("rank {}: output hash {got:?}, the reference's is {}", o.rank, want[o.rank]));
            }
        }
    }
    if let Some(o) = outcomes.iter().find(|o| !o.success()) {
        return Err(format!("rank {} exited badly after finishing {name}", o.rank));
    }
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let filter = argv.iter().find(|a| !a.starts_with('-')).cloned().unwrap_or_default();
    if argv.iter().any(|a| a == "--list") {
        for c in CASES {
            println!("{c}: test");
        }
        return;
    }
    if let Ok(list) = std::env::var(CHILD_ENV) {
        let cases: Vec<&str> = list.split(',').collect();
        child(&cases);
        return;
    }
    let cpu = device().is_cpu();
    let procs: Vec<usize> = match std::env::var("MOE_EP_TEST_PROCS") {
        Ok(v) => v.split(',').map(|p| p.trim().parse().expect("MOE_EP_TEST_PROCS: process counts, e.g. 2,4")).collect(),
        Err(_) if cpu => vec![2, 4],
        Err(_) => Vec::new(),
    };
    let cases: Vec<&str> = CASES.iter().copied().filter(|c| c.contains(&filter)).collect();
    let started = Instant::now();
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    println!("\nrunning {} tests", cases.len() * procs.len().max(1));
    if procs.is_empty() {
        for c in &cases {
            println!(
                "test {c} ... ignored, on a GPU it needs MOE_EP_TEST_PROCS (tests/gpu/multigpu.sh sets it, one GPU per process)"
            );
            ignored += 1;
        }
    }
    let limit = Duration::from_secs(
        std::env::var("MOE_EP_TEST_MP_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(if cpu {
            240
        } else {
            600
        }),
    );
    for &n in &procs {
        if cases.is_empty() {
            break;
        }
        let seed = Rng::fresh("multiprocess_ep").next_u64();
        let env = [
            (CHILD_ENV, cases.join(",")),
            ("MOE_EP_TEST_SEED", seed.to_string()),
            ("MOE_EP_DEVICE", std::env::var("MOE_EP_DEVICE").unwrap_or_else(|_| "cpu".into())),
        ];
        let outcomes = run_ranks(n, &[], &env, limit);
        let mut logs_shown = false;
        for &c in &cases {
            let s = sizes(cpu);
            match verdict(c, &outcomes, want_hashes(c, n, seed, &s).as_deref()) {
                Ok(()) => {
                    println!("test {c}_{n}_processes ... ok");
                    passed += 1;
                }
                Err(why) => {
                    println!("test {c}_{n}_processes ... FAILED: {why}");
                    failed += 1;
                    if !logs_shown {
                        // The first failure's logs explain the later ones (ranks stop at a panic).
                        outcomes.iter().filter(|o| !o.success()).for_each(|o| println!("{}", o.describe()));
                        logs_shown = true;
                    }
                }
            }
        }
    }
    let result = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {result}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
