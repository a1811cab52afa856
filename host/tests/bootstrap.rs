//! Tests of rank bootstrap: in-process groups, TCP groups as threads and as processes, ids, env.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use moe_ep::Error;
use moe_ep::bootstrap::{
    Bootstrap, DEFAULT_BOOTSTRAP_TIMEOUT, EnvConfig, InProcessBootstrap, MAX_BLOB_BYTES, TcpBootstrap, UNIQUE_ID_BYTES,
    UniqueId,
};
use proptest::prelude::*;

const LOOPBACK: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// Deterministic blob of rank `rank` in round `round`: sizes vary, zero included.
fn blob(rank: usize, round: usize) -> Vec<u8> {
    let len = (rank * 37 + round * 101) % 300;
    (0..len).map(|i| (i * 7 + rank * 13 + round * 29) as u8).collect()
}

/// Runs `f(rank)` on one thread per rank and returns the results in rank order.
fn on_threads<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let f = f.clone();
            thread::spawn(move || f(rank))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

fn bootstrap_message(e: &Error) -> &str {
    match e {
        Error::Bootstrap(msg) => msg,
        other => panic!("expected Error::Bootstrap, got {other:?}"),
    }
}

/// Repeated all-gathers with varying sizes, and barriers, checking rank order.
fn exercise<B: Bootstrap>(boot: &B, rounds: usize) {
    let n = boot.num_ranks();
    for round in 0..rounds {
        let all = boot.all_gather(&blob(boot.rank(), round)).expect("all_gather");
        assert_eq!(all.len(), n);
        for (r, got) in all.iter().enumerate() {
            assert_eq!(got, &blob(r, round), "rank {} round {round}: blob of rank {r}", boot.rank());
        }
        if round % 3 == 0 {
            boot.barrier().expect("barrier");
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind(LOOPBACK).and_then(|l| l.local_addr()).expect("probe bind").port()
}

// ------------------------------------------------------------------------------------------
// In-process
// ------------------------------------------------------------------------------------------

#[test]
fn in_process_all_gather_1_4_8_ranks() {
    for n in [1, 4, 8] {
        let group = InProcessBootstrap::new_group(n, Duration::from_secs(10));
        assert_eq!(group.len(), n);
        let handles: Vec<_> = group
            .into_iter()
            .map(|boot| {
                thread::spawn(move || {
                    assert_eq!(boot.num_ranks(), n);
                    exercise(&boot, 10);
                })
            })
            .collect();
        for h in handles {
            h.join().expect("rank thread panicked");
        }
    }
}

#[test]
fn in_process_large_blob_and_limit() {
    let group = InProcessBootstrap::new_group(2, Duration::from_secs(10));
    let too_big = vec![0u8; MAX_BLOB_BYTES + 1];
    assert!(matches!(group[0].all_gather(&too_big), Err(Error::InvalidArgument { arg: "blob", .. })));
    let handles: Vec<_> = group
        .into_iter()
        .map(|boot| {
            thread::spawn(move || {
                let mine = vec![boot.rank() as u8 + 1; MAX_BLOB_BYTES];
                let all = boot.all_gather(&mine).expect("1 MiB all_gather");
                assert_eq!(all[0], vec![1u8; MAX_BLOB_BYTES]);
                assert_eq!(all[1], vec![2u8; MAX_BLOB_BYTES]);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("rank thread panicked");
    }
}

#[test]
fn in_process_missing_rank_times_out_naming_it() {
    let timeout = Duration::from_millis(300);
    let mut group = InProcessBootstrap::new_group(4, timeout);
    let _absent = group.pop(); // rank 3 never calls
    let start = Instant::now();
    let handles: Vec<_> = group.into_iter().map(|boot| thread::spawn(move || boot.all_gather(b"x"))).collect();
    for h in handles {
        let err = h.join().expect("rank thread panicked").expect_err("must time out");
        let msg = bootstrap_message(&err);
        assert!(msg.contains("timed out after") && msg.contains("waiting for ranks [3]"), "{msg}");
    }
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

// ------------------------------------------------------------------------------------------
// TCP, ranks as threads
// ------------------------------------------------------------------------------------------

#[test]
fn tcp_four_ranks_repeated_all_gathers_and_1_mib() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    assert!(id.addr().ip().is_loopback() && id.addr().port() != 0);
    let n = 4;
    on_threads(n, move |rank| {
        let boot = TcpBootstrap::new(&id, rank, n, Duration::from_secs(10)).expect("TcpBootstrap::new");
        assert_eq!((boot.rank(), boot.num_ranks()), (rank, n));
        exercise(&boot, 10);
        let mine = vec![rank as u8 ^ 0x5a; MAX_BLOB_BYTES];
        let all = boot.all_gather(&mine).expect("1 MiB all_gather");
        for (r, got) in all.iter().enumerate() {
            assert_eq!(got, &vec![r as u8 ^ 0x5a; MAX_BLOB_BYTES]);
        }
        let err = boot.all_gather(&vec![0u8; MAX_BLOB_BYTES + 1]).expect_err("over the limit");
        assert!(matches!(err, Error::InvalidArgument { arg: "blob", .. }), "{err:?}");
        // A rejected blob sends nothing: the group still works.
        exercise(&boot, 2);
    });
}

#[test]
fn tcp_single_rank() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let boot = TcpBootstrap::new(&id, 0, 1, Duration::from_secs(1)).expect("single rank");
    assert_eq!(boot.all_gather(b"alone").expect("all_gather"), vec![b"alone".to_vec()]);
    boot.barrier().expect("barrier");
}

#[test]
fn tcp_hub_starts_after_the_others() {
    // No listener yet: clients see "connection refused" and retry until rank 0 binds.
    let id = UniqueId::from_parts(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())), [7u8; 32]);
    let n = 3;
    on_threads(n, move |rank| {
        if rank == 0 {
            thread::sleep(Duration::from_millis(600));
        }
        let boot = TcpBootstrap::new(&id, rank, n, Duration::from_secs(10)).expect("TcpBootstrap::new");
        exercise(&boot, 3);
    });
}

#[test]
fn tcp_wrong_secret_is_refused_and_hub_times_out() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let mut forged_secret = *id.secret();
    forged_secret[0] ^= 1;
    let forged = UniqueId::from_parts(id.addr(), forged_secret);
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let results = on_threads(3, move |rank| {
        let id = if rank == 2 { forged } else { id };
        TcpBootstrap::new(&id, rank, 3, timeout).map(|_| ())
    });
    let bad = bootstrap_message(results[2].as_ref().expect_err("bad secret must fail"));
    assert!(bad.contains("wrong secret"), "{bad}");
    let hub = bootstrap_message(results[0].as_ref().expect_err("hub must time out"));
    assert!(hub.contains("timed out after 2s waiting for ranks [2]") && hub.contains("wrong secret"), "{hub}");
    let good = bootstrap_message(results[1].as_ref().expect_err("rank 1 learns of the failure"));
    assert!(good.contains("waiting for ranks [2]"), "{good}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn tcp_duplicate_rank_is_refused() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let timeout = Duration::from_secs(2);
    // Threads 1 and 2 both claim rank 1; nobody is rank 2.
    let results = on_threads(3, move |thread| TcpBootstrap::new(&id, thread.min(1), 3, timeout).map(|_| ()));
    let hub = bootstrap_message(results[0].as_ref().expect_err("hub must time out"));
    assert!(hub.contains("waiting for ranks [2]") && hub.contains("duplicate rank 1"), "{hub}");
    let dups = results[1..]
        .iter()
        .filter(|r| matches!(r, Err(Error::Bootstrap(msg)) if msg.contains("refused this rank: duplicate rank 1")))
        .count();
    assert_eq!(dups, 1, "{results:?}");
}

#[test]
fn tcp_num_ranks_mismatch_is_refused() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let timeout = Duration::from_secs(1);
    let results = on_threads(2, move |rank| TcpBootstrap::new(&id, rank, 2 + rank, timeout).map(|_| ()));
    let client = bootstrap_message(results[1].as_ref().expect_err("mismatch"));
    assert!(client.contains("num_ranks mismatch"), "{client}");
    assert!(results[0].is_err());
}

#[test]
fn tcp_bad_arguments_rejected_by_constructor() {
    let id = UniqueId::from_parts(SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), [0; 32]);
    let t = Duration::from_secs(1);
    assert!(matches!(TcpBootstrap::new(&id, 4, 4, t), Err(Error::InvalidArgument { arg: "rank", .. })));
    assert!(matches!(TcpBootstrap::new(&id, 0, 0, t), Err(Error::InvalidArgument { arg: "num_ranks", .. })));
    assert!(matches!(TcpBootstrap::new(&id, 1, 2, Duration::ZERO), Err(Error::InvalidArgument { arg: "timeout", .. })));
}

#[test]
fn tcp_hub_that_never_arrives_times_out() {
    let id = UniqueId::from_parts(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())), [1u8; 32]);
    let start = Instant::now();
    let err = TcpBootstrap::new(&id, 1, 2, Duration::from_millis(800)).expect_err("no hub");
    let msg = bootstrap_message(&err);
    assert!(msg.contains("timed out") && msg.contains("waiting for ranks [0]"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

#[test]
fn tcp_client_that_never_arrives_times_out() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let start = Instant::now();
    let err = TcpBootstrap::new(&id, 0, 3, Duration::from_millis(800)).expect_err("no clients");
    let msg = bootstrap_message(&err);
    assert!(msg.contains("timed out after 800ms waiting for ranks [1, 2]"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

#[test]
fn tcp_rank_skipping_all_gather_times_out_everyone() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let start = Instant::now();
    let results = on_threads(3, move |rank| {
        let boot = TcpBootstrap::new(&id, rank, 3, Duration::from_secs(1)).expect("TcpBootstrap::new");
        exercise(&boot, 2);
        if rank == 2 {
            // Stay connected but skip the next collective.
            thread::sleep(Duration::from_millis(1800));
            return Ok(());
        }
        let first = boot.all_gather(b"late").map(|_| ());
        // The group is unusable afterwards, and says so at once.
        let again = boot.all_gather(b"again").expect_err("broken group");
        assert!(bootstrap_message(&again).contains("earlier failure"));
        first
    });
    let hub = bootstrap_message(results[0].as_ref().expect_err("hub times out"));
    assert!(hub.contains("timed out after 1s waiting for ranks [2]"), "{hub}");
    let client = bootstrap_message(results[1].as_ref().expect_err("rank 1 fails too"));
    assert!(client.contains("waiting for ranks [2]"), "{client}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn tcp_dead_peer_fails_fast() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let start = Instant::now();
    let results = on_threads(3, move |rank| {
        let boot = TcpBootstrap::new(&id, rank, 3, Duration::from_secs(10)).expect("TcpBootstrap::new");
        boot.barrier().expect("barrier");
        if rank == 2 {
            drop(boot); // the "process" dies: its connection closes
            return Ok(());
        }
        boot.all_gather(b"anyone?").map(|_| ())
    });
    let hub = bootstrap_message(results[0].as_ref().expect_err("hub sees the dead peer"));
    assert!(hub.contains("rank 2 closed its connection"), "{hub}");
    let client = bootstrap_message(results[1].as_ref().expect_err("rank 1 hears from the hub"));
    assert!(client.contains("rank 2 closed its connection"), "{client}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn tcp_dead_hub_fails_fast() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let start = Instant::now();
    let results = on_threads(2, move |rank| {
        let boot = TcpBootstrap::new(&id, rank, 2, Duration::from_secs(10)).expect("TcpBootstrap::new");
        boot.barrier().expect("barrier");
        if rank == 0 {
            drop(boot);
            return Ok(());
        }
        boot.all_gather(b"hello?").map(|_| ())
    });
    let client = bootstrap_message(results[1].as_ref().expect_err("hub is gone"));
    assert!(client.contains("rank 0"), "{client}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn tcp_from_vars_with_port_and_secret_overrides() {
    let port = free_port();
    let n = 3;
    on_threads(n, move |rank| {
        let vars: HashMap<&str, String> = HashMap::from([
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", n.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "localhost".to_string()),
            ("MASTER_PORT", "1".to_string()),
            ("MOE_EP_BOOTSTRAP_PORT", port.to_string()),
            ("MOE_EP_BOOTSTRAP_SECRET", "correct horse battery staple".to_string()),
        ]);
        let boot = TcpBootstrap::from_vars(|k| vars.get(k).cloned(), Duration::from_secs(10)).expect("from_vars");
        assert_eq!((boot.rank(), boot.num_ranks()), (rank, n));
        exercise(&boot, 3);
    });
}

// ------------------------------------------------------------------------------------------
// UniqueId
// ------------------------------------------------------------------------------------------

#[test]
fn unique_id_round_trips() {
    let id = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    let bytes = id.to_bytes();
    assert_eq!(bytes.len(), UNIQUE_ID_BYTES);
    assert_eq!(UniqueId::from_bytes(&bytes).expect("from_bytes"), id);
    let hex = id.to_string();
    assert_eq!(hex.len(), 2 * UNIQUE_ID_BYTES);
    assert_eq!(hex.parse::<UniqueId>().expect("from hex"), id);
    assert_eq!(format!("  {}\n", hex.to_uppercase()).parse::<UniqueId>().expect("upper-case hex"), id);
    let debug = format!("{id:?}");
    assert!(!debug.contains(&hex[128..192]), "Debug must not print the secret: {debug}");
    // Two ids never share a secret.
    let other = UniqueId::with_addr(LOOPBACK).expect("UniqueId");
    assert_ne!(other.secret(), id.secret());
}

#[test]
fn unique_id_new_picks_a_usable_address() {
    let id = UniqueId::new().expect("UniqueId::new");
    assert_ne!(id.addr().port(), 0);
    assert!(!id.addr().ip().is_unspecified());
}

#[test]
fn unique_id_rejects_garbage() {
    let bytes = UniqueId::from_parts(SocketAddr::from((Ipv4Addr::LOCALHOST, 80)), [3; 32]).to_bytes();
    let invalid = |r: moe_ep::Result<UniqueId>| matches!(r, Err(Error::InvalidArgument { .. }));
    assert!(invalid(UniqueId::from_bytes(&bytes[..127])));
    assert!(invalid(UniqueId::from_bytes(&[bytes.as_slice(), &[0]].concat())));
    assert!(invalid(UniqueId::from_bytes(&[])));
    let mut bad_magic = bytes;
    bad_magic[0] ^= 0xff;
    assert!(invalid(UniqueId::from_bytes(&bad_magic)));
    let mut bad_version = bytes;
    bad_version[8] = 99;
    assert!(invalid(UniqueId::from_bytes(&bad_version)));
    let mut bad_family = bytes;
    bad_family[10] = 5;
    assert!(invalid(UniqueId::from_bytes(&bad_family)));
    assert!(invalid("xyz".parse::<UniqueId>()));
    assert!(invalid("ab".repeat(UNIQUE_ID_BYTES).parse::<UniqueId>()));
    assert!(invalid("zz".repeat(UNIQUE_ID_BYTES).parse::<UniqueId>()));
}

proptest! {
    #[test]
    fn unique_id_bytes_round_trip(
        v4 in any::<bool>(),
        ip4 in any::<u32>(),
        ip6 in any::<u128>(),
        scope in any::<u32>(),
        port in any::<u16>(),
        secret in any::<[u8; 32]>(),
    ) {
        let addr = if v4 {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip4), port))
        } else {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip6), port, 0, scope))
        };
        let id = UniqueId::from_parts(addr, secret);
        prop_assert_eq!(UniqueId::from_bytes(&id.to_bytes()).expect("from_bytes"), id);
        prop_assert_eq!(id.to_string().parse::<UniqueId>().expect("from hex"), id);
    }
}

// ------------------------------------------------------------------------------------------
// Environment
// ------------------------------------------------------------------------------------------

fn env_of(pairs: &[(&str, &str)]) -> moe_ep::Result<EnvConfig> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    EnvConfig::from_vars(|k| map.get(k).cloned())
}

/// Asserts an `InvalidArgument` for variable `var` whose message contains `needle`.
fn assert_env_error(result: moe_ep::Result<EnvConfig>, var: &str, needle: &str) {
    match result {
        Err(e @ Error::InvalidArgument { arg, .. }) => {
            let msg = e.to_string();
            assert_eq!(arg, var, "{msg}");
            assert!(msg.contains(var) && msg.contains(needle), "{msg}");
        }
        other => panic!("expected an InvalidArgument for {var}, got {other:?}"),
    }
}

const TORCHRUN: [(&str, &str); 5] =
    [("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")];

fn with(
    base: &[(&'static str, &'static str)],
    overrides: &[(&'static str, Option<&'static str>)],
) -> Vec<(&'static str, &'static str)> {
    let mut vars: Vec<_> = base.iter().filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k)).copied().collect();
    vars.extend(overrides.iter().filter_map(|(k, v)| v.map(|v| (*k, v))));
    vars
}

#[test]
fn env_config_torchrun() {
    let cfg = env_of(&TORCHRUN).expect("torchrun vars");
    assert_eq!(
        cfg,
        EnvConfig { rank: 3, world_size: 8, local_rank: 1, master_addr: "node7".into(), master_port: 29500 }
    );
}

#[test]
fn env_config_srun_fallback() {
    let vars = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "12345"),
    ];
    let cfg = env_of(&vars).expect("srun vars");
    assert_eq!((cfg.rank, cfg.world_size, cfg.local_rank), (5, 16, 1));
    // torchrun's variables win over srun's.
    let both = [vars.as_slice(), &[("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]].concat();
    let cfg = env_of(&both).expect("both");
    assert_eq!((cfg.rank, cfg.world_size, cfg.local_rank), (2, 4, 0));
    assert_env_error(env_of(&with(&vars, &[("SLURM_PROCID", Some("16"))])), "SLURM_PROCID", "16");
}

#[test]
fn env_config_errors_name_the_variable() {
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        assert_env_error(env_of(&with(&TORCHRUN, &[(var, None)])), var, "not set");
    }
    assert_env_error(env_of(&with(&TORCHRUN, &[("RANK", Some("three"))])), "RANK", "\"three\"");
    assert_env_error(env_of(&with(&TORCHRUN, &[("RANK", Some("-1"))])), "RANK", "\"-1\"");
    assert_env_error(env_of(&with(&TORCHRUN, &[("WORLD_SIZE", Some("8x"))])), "WORLD_SIZE", "\"8x\"");
    assert_env_error(env_of(&with(&TORCHRUN, &[("LOCAL_RANK", Some(""))])), "LOCAL_RANK", "\"\"");
    assert_env_error(env_of(&with(&TORCHRUN, &[("MASTER_PORT", Some("70000"))])), "MASTER_PORT", "70000");
    assert_env_error(env_of(&with(&TORCHRUN, &[("MASTER_PORT", Some("0"))])), "MASTER_PORT", "0");
    assert_env_error(env_of(&with(&TORCHRUN, &[("MASTER_ADDR", Some(" "))])), "MASTER_ADDR", "not set");
    assert_env_error(env_of(&with(&TORCHRUN, &[("RANK", Some("8"))])), "RANK", "RANK=8 is not below WORLD_SIZE=8");
    assert_env_error(env_of(&with(&TORCHRUN, &[("WORLD_SIZE", Some("0")), ("RANK", Some("0"))])), "WORLD_SIZE", "0");
    assert_env_error(env_of(&with(&TORCHRUN, &[("LOCAL_RANK", Some("9"))])), "LOCAL_RANK", "9");
}

#[test]
fn from_vars_rejects_bad_bootstrap_variables() {
    let map = |extra: &[(&'static str, Option<&'static str>)]| -> HashMap<&'static str, String> {
        with(
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
            ],
            extra,
        )
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    };
    let t = Duration::from_secs(1);
    let vars = map(&[("MOE_EP_BOOTSTRAP_PORT", Some("nope"))]);
    let err = TcpBootstrap::from_vars(|k| vars.get(k).cloned(), t).expect_err("bad port");
    assert!(matches!(err, Error::InvalidArgument { arg: "MOE_EP_BOOTSTRAP_PORT", .. }), "{err:?}");
    let vars = map(&[("MASTER_PORT", Some("65535"))]);
    let err = TcpBootstrap::from_vars(|k| vars.get(k).cloned(), t).expect_err("no room for MASTER_PORT + 1");
    assert!(matches!(err, Error::InvalidArgument { arg: "MASTER_PORT", .. }), "{err:?}");
    let vars = map(&[("MOE_EP_BOOTSTRAP_SECRET", Some(""))]);
    let err = TcpBootstrap::from_vars(|k| vars.get(k).cloned(), t).expect_err("empty secret");
    assert!(matches!(err, Error::InvalidArgument { arg: "MOE_EP_BOOTSTRAP_SECRET", .. }), "{err:?}");
}

#[test]
fn default_timeout_is_120_s_unless_overridden() {
    assert_eq!(DEFAULT_BOOTSTRAP_TIMEOUT, Duration::from_secs(120));
    if std::env::var_os("MOE_EP_BOOTSTRAP_TIMEOUT_S").is_none() {
        assert_eq!(moe_ep::bootstrap::default_timeout(), DEFAULT_BOOTSTRAP_TIMEOUT);
        assert_eq!(moe_ep::bootstrap::try_default_timeout().expect("unset"), DEFAULT_BOOTSTRAP_TIMEOUT);
    }
}

// ------------------------------------------------------------------------------------------
// Real processes: this test binary re-runs itself as ranks 1..=3; the test itself is rank 0.
// ------------------------------------------------------------------------------------------

const CHILD_ENV: &str = "MOE_EP_BOOTSTRAP_CHILD";
const CHILD_TEST: &str = "multi_process_child";
const CHILD_MARK: &str = "MOE_EP_CHILD_RESULT";
const WORLD: usize = 4;

/// The blob rank `rank` contributes in the multi-process test.
fn process_blob(rank: usize) -> Vec<u8> {
    format!("rank {rank} of {WORLD} says hello").into_bytes().repeat(rank + 1)
}

/// FNV-1a over all blobs with their lengths.
fn checksum(blobs: &[Vec<u8>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for blob in blobs {
        for &b in (blob.len() as u64).to_le_bytes().iter().chain(blob) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Variables that would change the secret or the port if the parent's environment had them.
const SCRUBBED: [&str; 7] = [
    "MOE_EP_BOOTSTRAP_PORT",
    "MOE_EP_BOOTSTRAP_SECRET",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
];

#[test]
#[ignore = "child process of multi_process_tcp_bootstrap; does nothing unless MOE_EP_BOOTSTRAP_CHILD=1"]
fn multi_process_child() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("1") {
        return;
    }
    let boot = TcpBootstrap::from_env(Duration::from_secs(15)).expect("TcpBootstrap::from_env");
    let all = boot.all_gather(&process_blob(boot.rank())).expect("all_gather");
    boot.barrier().expect("barrier");
    println!("{CHILD_MARK} rank={} checksum={:016x}", boot.rank(), checksum(&all));
}

#[test]
fn multi_process_tcp_bootstrap() {
    let exe = std::env::current_exe().expect("current_exe");
    // The bootstrap port is MASTER_PORT + 1; make that the port known to be free.
    let port = loop {
        let p = free_port();
        if p > 1 {
            break p;
        }
    };
    let master_port = (port - 1).to_string();
    let vars_of = |rank: usize| -> HashMap<&'static str, String> {
        HashMap::from([
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", WORLD.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", master_port.clone()),
        ])
    };
    let children: Vec<_> = (1..WORLD)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--ignored", "--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for var in SCRUBBED {
                cmd.env_remove(var);
            }
            cmd.envs(vars_of(rank));
            cmd.spawn().expect("spawn child rank")
        })
        .collect();

    let vars = vars_of(0);
    let hub = TcpBootstrap::from_vars(|k| vars.get(k).cloned(), Duration::from_secs(15));
    let outcome = hub.and_then(|boot| {
        let all = boot.all_gather(&process_blob(0))?;
        boot.barrier()?;
        Ok(all)
    });
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().expect("wait for child")).collect();
    let all = match outcome {
        Ok(all) => all,
        Err(e) => {
            for out in &outputs {
                eprintln!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            }
            panic!("rank 0 failed: {e}");
        }
    };
    let expected: Vec<Vec<u8>> = (0..WORLD).map(process_blob).collect();
    assert_eq!(all, expected);
    let sum = checksum(&all);
    for (i, out) in outputs.iter().enumerate() {
        let rank = i + 1;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank} failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let line = format!("{CHILD_MARK} rank={rank} checksum={sum:016x}");
        assert!(stdout.contains(&line), "rank {rank} did not print `{line}`:\n{stdout}");
    }
}
