//! Rank bootstrap: how the ranks of a job find each other and exchange small blobs (CUDA IPC
//! handles, RDMA queue-pair numbers, ...) before any GPU communication exists.
//!
//! ```
//! use std::time::Duration;
//! use moe_ep::bootstrap::{Bootstrap, TcpBootstrap, UniqueId};
//!
//! # fn main() -> moe_ep::Result<()> {
//! let num_ranks = 3;
//! // Rank 0 makes the id; its hex form (`id.to_string()`) can travel to other processes.
//! let id = UniqueId::new()?;
//! let threads: Vec<_> = (0..num_ranks)
//!     .map(|rank| {
//!         std::thread::spawn(move || -> moe_ep::Result<Vec<Vec<u8>>> {
//!             let boot = TcpBootstrap::new(&id, rank, num_ranks, Duration::from_secs(30))?;
//!             boot.all_gather(&(rank as u32).to_le_bytes())
//!         })
//!     })
//!     .collect();
//! for thread in threads {
//!     let blobs = thread.join().expect("rank thread panicked")?;
//!     let ranks: Vec<u32> = blobs.iter().map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
//!     assert_eq!(ranks, [0, 1, 2]);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Two implementations of [`Bootstrap`]:
//!
//! * [`InProcessBootstrap`]: the ranks are threads of one process ([`InProcessBootstrap::new_group`]).
//! * [`TcpBootstrap`]: one rank per process. Rank 0 is the hub of a star: every other rank opens one
//!   TCP connection to it and authenticates with a 32-byte secret (challenge–response with
//!   SHA-256, so the secret never crosses the wire). The rendezvous comes either from a
//!   [`UniqueId`] that rank 0 makes and the launcher passes around (like `ncclUniqueId`), or from
//!   the variables that `torchrun` / `srun` set ([`TcpBootstrap::from_env`], [`EnvConfig`]).
//!
//! Every wait is bounded: a rank that never arrives, dies or sends garbage makes the others fail
//! with [`Error::Bootstrap`] naming the missing ranks, never hang. After such a failure a group is
//! unusable (later calls fail at once); make a new one.
//!
//! Environment variables read here:
//!
//! | variable | meaning |
//! |---|---|
//! | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` | torchrun's rendezvous ([`EnvConfig`]) |
//! | `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` | srun fallbacks for the first three |
//! | `MOE_EP_BOOTSTRAP_PORT` | port of rank 0's hub for [`TcpBootstrap::from_env`] (default `MASTER_PORT + 1`) |
//! | `MOE_EP_BOOTSTRAP_SECRET` | shared secret for [`TcpBootstrap::from_env`] |
//! | `MOE_EP_BOOTSTRAP_ADDR` | address [`UniqueId::new`] listens on |
//! | `MOE_EP_BOOTSTRAP_TIMEOUT_S` | [`default_timeout`] |

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Largest blob one rank may contribute to one [`Bootstrap::all_gather`] (1 MiB).
pub const MAX_BLOB_BYTES: usize = 1 << 20;

/// Default time a bootstrap operation waits for the other ranks: 120 s.
///
/// [`default_timeout`] applies the `MOE_EP_BOOTSTRAP_TIMEOUT_S` override.
pub const DEFAULT_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);

/// Size of [`UniqueId::to_bytes`] (the size of an `ncclUniqueId`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// Environment variable overriding [`DEFAULT_BOOTSTRAP_TIMEOUT`], in seconds (fractions allowed).
const TIMEOUT_ENV: &str = "MOE_EP_BOOTSTRAP_TIMEOUT_S";
const ADDR_ENV: &str = "MOE_EP_BOOTSTRAP_ADDR";
const PORT_ENV: &str = "MOE_EP_BOOTSTRAP_PORT";
const SECRET_ENV: &str = "MOE_EP_BOOTSTRAP_SECRET";

/// [`DEFAULT_BOOTSTRAP_TIMEOUT`], or `MOE_EP_BOOTSTRAP_TIMEOUT_S` seconds when that variable is set
/// to a positive number (fractions allowed).
///
/// An unusable value is ignored (the default applies); [`try_default_timeout`] reports it instead.
pub fn default_timeout() -> Duration {
    try_default_timeout().unwrap_or(DEFAULT_BOOTSTRAP_TIMEOUT)
}

/// Like [`default_timeout`], but a `MOE_EP_BOOTSTRAP_TIMEOUT_S` that is not a positive number of
/// seconds is an [`Error::InvalidArgument`] naming the variable.
pub fn try_default_timeout() -> Result<Duration> {
    let Ok(text) = std::env::var(TIMEOUT_ENV) else {
        return Ok(DEFAULT_BOOTSTRAP_TIMEOUT);
    };
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| Error::invalid(TIMEOUT_ENV, format!("{TIMEOUT_ENV}={text:?} is not a number of seconds")))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(Error::invalid(TIMEOUT_ENV, format!("{TIMEOUT_ENV}={text:?} must be greater than zero")));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|e| Error::invalid(TIMEOUT_ENV, format!("{TIMEOUT_ENV}={text:?} is not a usable duration: {e}")))
}

/// How the ranks of one job exchange small blobs during setup.
///
/// All methods except [`rank`](Bootstrap::rank) and [`num_ranks`](Bootstrap::num_ranks) are
/// collective: every rank of the group calls them, in the same order.
pub trait Bootstrap: Send + Sync {
    /// This rank, in `0..num_ranks()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn num_ranks(&self) -> usize;

    /// Gathers every rank's `blob` (at most [`MAX_BLOB_BYTES`]; lengths may differ between ranks)
    /// and returns them in rank order: element `r` is rank `r`'s blob.
    ///
    /// A blob over the limit is rejected with [`Error::InvalidArgument`] before anything is sent
    /// (the other ranks then time out). A rank that does not join within the group's timeout makes
    /// the others fail with [`Error::Bootstrap`] naming it.
    fn all_gather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Returns once every rank has called `barrier` (an all-gather of empty blobs).
    fn barrier(&self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}

fn check_blob(blob: &[u8]) -> Result<()> {
    if blob.len() > MAX_BLOB_BYTES {
        return Err(Error::invalid(
            "blob",
            format!("{} bytes exceed the bootstrap limit of {MAX_BLOB_BYTES} bytes (1 MiB) per rank", blob.len()),
        ));
    }
    Ok(())
}

fn check_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::invalid("timeout", "must be greater than zero"));
    }
    Ok(())
}

/// `now + timeout`, saturating far in the future for huge timeouts.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).or_else(|| now.checked_add(Duration::from_secs(1 << 32))).unwrap_or(now)
}

/// Time left until `deadline`; `None` once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

// ---------------------------------------------------------------------------------------------
// In-process bootstrap
// ---------------------------------------------------------------------------------------------

/// A [`Bootstrap`] whose ranks are threads of one process, built on a `Mutex` and a `Condvar`.
///
/// Make all handles at once with [`new_group`](InProcessBootstrap::new_group) and move one to each
/// rank's thread.
pub struct InProcessBootstrap {
    rank: usize,
    num_ranks: usize,
    timeout: Duration,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<GroupState>,
    arrived_cv: Condvar,
}

struct GroupState {
    /// Number of completed all-gathers.
    generation: u64,
    /// Blobs of the all-gather in progress.
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// Blobs of the last completed all-gather.
    result: Arc<Vec<Vec<u8>>>,
    /// Set when an all-gather timed out; every later call fails with it.
    broken: Option<String>,
}

impl InProcessBootstrap {
    /// One handle per rank (element `r` is rank `r`) of a group of `n` ranks; each call waits at
    /// most `timeout` for the others. `n == 0` gives no handles.
    pub fn new_group(n: usize, timeout: Duration) -> Vec<InProcessBootstrap> {
        let shared = Arc::new(Shared {
            state: Mutex::new(GroupState {
                generation: 0,
                slots: vec![None; n],
                arrived: 0,
                result: Arc::new(Vec::new()),
                broken: None,
            }),
            arrived_cv: Condvar::new(),
        });
        (0..n).map(|rank| InProcessBootstrap { rank, num_ranks: n, timeout, shared: Arc::clone(&shared) }).collect()
    }

    /// How long each collective waits for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> Result<MutexGuard<'_, GroupState>> {
        self.shared.state.lock().map_err(|_| {
            Error::Bootstrap(format!("rank {}: in-process group state poisoned by a panicking rank", self.rank))
        })
    }
}

impl fmt::Debug for InProcessBootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessBootstrap")
            .field("rank", &self.rank)
            .field("num_ranks", &self.num_ranks)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Bootstrap for InProcessBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    fn all_gather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        check_blob(blob)?;
        let rank = self.rank;
        let deadline = deadline_after(self.timeout);
        let mut state = self.lock()?;
        if let Some(why) = &state.broken {
            return Err(Error::Bootstrap(format!("rank {rank}: group unusable after an earlier failure: {why}")));
        }
        let generation = state.generation;
        let Some(slot) = state.slots.get_mut(rank) else {
            return Err(Error::Bootstrap(format!("rank {rank}: not a rank of this group")));
        };
        if slot.is_some() {
            return Err(Error::Bootstrap(format!(
                "rank {rank} entered all_gather #{generation} twice (two threads share one rank's handle)"
            )));
        }
        *slot = Some(blob.to_vec());
        state.arrived += 1;
        if state.arrived == self.num_ranks {
            let blobs: Vec<Vec<u8>> = state.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            let result = Arc::new(blobs);
            state.result = Arc::clone(&result);
            state.arrived = 0;
            state.generation = generation.wrapping_add(1);
            drop(state);
            self.shared.arrived_cv.notify_all();
            return Ok((*result).clone());
        }
        loop {
            if state.generation != generation {
                let result = Arc::clone(&state.result);
                drop(state);
                return Ok((*result).clone());
            }
            if let Some(why) = &state.broken {
                return Err(Error::Bootstrap(format!("rank {rank}: {why}")));
            }
            let Some(left) = remaining(deadline) else {
                let missing: Vec<usize> =
                    state.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(r, _)| r).collect();
                let why = format!(
                    "in-process all_gather #{generation} timed out after {:?} waiting for ranks {missing:?}",
                    self.timeout
                );
                state.broken = Some(why.clone());
                drop(state);
                self.shared.arrived_cv.notify_all();
                return Err(Error::Bootstrap(format!("rank {rank}: {why}")));
            };
            state = match self.shared.arrived_cv.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(_) => {
                    return Err(Error::Bootstrap(format!(
                        "rank {rank}: in-process group state poisoned by a panicking rank"
                    )));
                }
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// UniqueId
// ---------------------------------------------------------------------------------------------

const UID_MAGIC: [u8; 8] = *b"MOEEPUID";
const UID_VERSION: u16 = 1;

/// Where rank 0's bootstrap hub listens, plus a random 32-byte secret: everything the other ranks
/// need to join (the moe-ep analogue of `ncclUniqueId`).
///
/// Rank 0 makes one with [`new`](UniqueId::new) (which already binds the listening socket) and
/// hands it to the other ranks as [`to_bytes`](UniqueId::to_bytes) (128 bytes) or as hex
/// ([`Display`](fmt::Display) / [`FromStr`]). Treat it like a password: anyone holding it can join
/// the group. `Debug` does not print the secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UniqueId {
    addr: SocketAddr,
    secret: [u8; 32],
}

/// Listeners bound by [`UniqueId::new`]/[`UniqueId::with_addr`], waiting for rank 0's
/// [`TcpBootstrap::new`] in this process. Keyed by the advertised address (which includes the port).
static LISTENERS: Mutex<Vec<(SocketAddr, TcpListener)>> = Mutex::new(Vec::new());

fn register_listener(addr: SocketAddr, listener: TcpListener) {
    let mut listeners = LISTENERS.lock().unwrap_or_else(PoisonError::into_inner);
    listeners.retain(|(a, _)| *a != addr);
    listeners.push((addr, listener));
}

fn take_listener(addr: SocketAddr) -> Option<TcpListener> {
    let mut listeners = LISTENERS.lock().unwrap_or_else(PoisonError::into_inner);
    let index = listeners.iter().position(|(a, _)| *a == addr)?;
    Some(listeners.swap_remove(index).1)
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| Error::Io(format!("getrandom failed: {e}")))?;
    Ok(bytes)
}

impl UniqueId {
    /// Makes a fresh id on rank 0: binds a TCP listener on an ephemeral port and draws a random
    /// secret. Call it in the process that will be rank 0; [`TcpBootstrap::new`] with rank 0 in this
    /// process picks the listener up.
    ///
    /// The address is `MOE_EP_BOOTSTRAP_ADDR` if set (`host`, `ip`, `host:port` or `[ipv6]:port`;
    /// without a port, an ephemeral one), else the IPv4 address of this host's first non-loopback,
    /// non-link-local interface that is up (`getifaddrs`), else `127.0.0.1` (single-host only).
    /// Set `MOE_EP_BOOTSTRAP_ADDR` when the first interface is not the one the other hosts reach.
    ///
    /// The listener stays open until rank 0's [`TcpBootstrap::new`] takes it; an id that is never
    /// used keeps its port for the life of the process.
    pub fn new() -> Result<UniqueId> {
        let addr = match std::env::var(ADDR_ENV) {
            Ok(text) => parse_bootstrap_addr(&text)?,
            Err(_) => SocketAddr::new(IpAddr::V4(first_interface_ipv4().unwrap_or(Ipv4Addr::LOCALHOST)), 0),
        };
        Self::with_addr(addr)
    }

    /// Like [`new`](UniqueId::new) but binds exactly `addr` (port 0: an ephemeral port). An
    /// unspecified IP (`0.0.0.0`, `::`) listens on every interface and advertises the address
    /// [`new`](UniqueId::new) would pick.
    pub fn with_addr(addr: SocketAddr) -> Result<UniqueId> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::Bootstrap(format!("could not listen on {addr}: {e}")))?;
        let local = listener.local_addr()?;
        let advertised = if local.ip().is_unspecified() {
            SocketAddr::new(IpAddr::V4(first_interface_ipv4().unwrap_or(Ipv4Addr::LOCALHOST)), local.port())
        } else {
            local
        };
        let secret = random_bytes::<32>()?;
        register_listener(advertised, listener);
        Ok(UniqueId { addr: advertised, secret })
    }

    /// An id from its parts, without binding anything: rank 0's [`TcpBootstrap::new`] then binds
    /// `addr` itself (which must name a port of this host other than 0).
    pub fn from_parts(addr: SocketAddr, secret: [u8; 32]) -> UniqueId {
        UniqueId { addr, secret }
    }

    /// Address of rank 0's hub.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared secret.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The id as 128 bytes: magic `MOEEPUID`, version (u16 LE), address family (4 or 6),
    /// port (u16 LE), IP (16 bytes), IPv6 scope id (u32 LE), secret (bytes 64..96), zeros.
    pub fn to_bytes(&self) -> [u8; UNIQUE_ID_BYTES] {
        let mut b = [0u8; UNIQUE_ID_BYTES];
        b[0..8].copy_from_slice(&UID_MAGIC);
        b[8..10].copy_from_slice(&UID_VERSION.to_le_bytes());
        b[12..14].copy_from_slice(&self.addr.port().to_le_bytes());
        match self.addr {
            SocketAddr::V4(a) => {
                b[10] = 4;
                b[16..20].copy_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                b[10] = 6;
                b[16..32].copy_from_slice(&a.ip().octets());
                b[32..36].copy_from_slice(&a.scope_id().to_le_bytes());
            }
        }
        b[64..96].copy_from_slice(&self.secret);
        b
    }

    /// Parses [`to_bytes`](UniqueId::to_bytes)'s output; rejects a wrong length, magic, version or
    /// address family.
    pub fn from_bytes(bytes: &[u8]) -> Result<UniqueId> {
        let bad = |why: String| Error::invalid("unique id", why);
        let b: &[u8; UNIQUE_ID_BYTES] =
            bytes.try_into().map_err(|_| bad(format!("expected {UNIQUE_ID_BYTES} bytes, got {}", bytes.len())))?;
        if b[0..8] != UID_MAGIC {
            return Err(bad("bad magic: not a moe-ep bootstrap UniqueId".into()));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != UID_VERSION {
            return Err(bad(format!("version {version}, this build reads version {UID_VERSION}")));
        }
        let port = u16::from_le_bytes([b[12], b[13]]);
        let addr = match b[10] {
            4 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(b[16], b[17], b[18], b[19]), port)),
            6 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[16..32]);
                let scope = u32::from_le_bytes([b[32], b[33], b[34], b[35]]);
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope))
            }
            family => return Err(bad(format!("unknown address family {family}"))),
        };
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&b[64..96]);
        Ok(UniqueId { addr, secret })
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UniqueId").field("addr", &self.addr).field("secret", &"<redacted>").finish()
    }
}

/// Lower-case hex of [`UniqueId::to_bytes`] (256 characters).
impl fmt::Display for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.to_bytes()))
    }
}

/// Parses the hex form written by [`Display`](fmt::Display) (surrounding whitespace ignored).
impl FromStr for UniqueId {
    type Err = Error;

    fn from_str(s: &str) -> Result<UniqueId> {
        let s = s.trim();
        let bytes = from_hex(s).ok_or_else(|| {
            Error::invalid(
                "unique id",
                format!("not a hex string of {} digits ({} chars)", 2 * UNIQUE_ID_BYTES, s.len()),
            )
        })?;
        UniqueId::from_bytes(&bytes)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    s.as_bytes().chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// Parses `MOE_EP_BOOTSTRAP_ADDR`: `ip`, `ip:port`, `[ipv6]`, `[ipv6]:port`, `host`, `host:port`.
fn parse_bootstrap_addr(text: &str) -> Result<SocketAddr> {
    let bad = |why: String| Error::invalid(ADDR_ENV, format!("{ADDR_ENV}={text:?}: {why}"));
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty".into()));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = t.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad(format!("bad port {port:?}")))?),
        None => (t, 0),
    };
    resolve(host, port).map_err(|e| bad(format!("cannot resolve {host:?}: {e}")))
}

/// Resolves `host` (an IP or a name) with `port`; the first address wins.
fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host:?} resolved to no address")))
}

/// IPv4 address of the first interface that is up and neither loopback nor link-local.
#[cfg(unix)]
fn first_interface_ipv4() -> Option<Ipv4Addr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success getifaddrs stores a list that we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list from getifaddrs, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & (libc::IFF_UP as libc::c_uint) != 0;
        let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0;
        if ifa.ifa_addr.is_null() || !up || loopback {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points to a sockaddr, whose family field is always valid.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if libc::c_int::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a `sockaddr_in`; getifaddrs allocates it as such.
        let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
        let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
        if !(ip.is_loopback() || ip.is_link_local() || ip.is_unspecified()) {
            found = Some(ip);
            break;
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(not(unix))]
fn first_interface_ipv4() -> Option<Ipv4Addr> {
    None
}

// ---------------------------------------------------------------------------------------------
// Environment (torchrun / srun)
// ---------------------------------------------------------------------------------------------

/// Rank layout and rendezvous address as `torchrun` (or `srun`) describes them in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvConfig {
    /// Global rank: `RANK`, else `SLURM_PROCID`.
    pub rank: usize,
    /// Number of ranks: `WORLD_SIZE`, else `SLURM_NTASKS`.
    pub world_size: usize,
    /// Rank on this host: `LOCAL_RANK`, else `SLURM_LOCALID`.
    pub local_rank: usize,
    /// Host of rank 0: `MASTER_ADDR` (srun does not set it; export it, e.g. the first host of
    /// `$SLURM_JOB_NODELIST`).
    pub master_addr: String,
    /// torchrun's TCPStore port on rank 0's host: `MASTER_PORT`.
    pub master_port: u16,
}

impl EnvConfig {
    /// Reads the process environment; see [`from_vars`](EnvConfig::from_vars).
    pub fn from_env() -> Result<EnvConfig> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `vars` (name → value), e.g. a map in tests.
    ///
    /// Missing, unparsable or inconsistent values (rank ≥ world size, world size 0, port 0) are an
    /// [`Error::InvalidArgument`] whose `arg` is the variable at fault and whose reason quotes its
    /// value.
    pub fn from_vars(vars: impl Fn(&str) -> Option<String>) -> Result<EnvConfig> {
        let (rank_var, rank) = index_var(&vars, "RANK", "SLURM_PROCID")?;
        let (world_var, world_size) = index_var(&vars, "WORLD_SIZE", "SLURM_NTASKS")?;
        let (local_var, local_rank) = index_var(&vars, "LOCAL_RANK", "SLURM_LOCALID")?;
        if world_size == 0 {
            return Err(Error::invalid(world_var, format!("{world_var}=0: the world needs at least one rank")));
        }
        if rank >= world_size {
            return Err(Error::invalid(rank_var, format!("{rank_var}={rank} is not below {world_var}={world_size}")));
        }
        if local_rank >= world_size {
            return Err(Error::invalid(
                local_var,
                format!("{local_var}={local_rank} is not below {world_var}={world_size}"),
            ));
        }
        let master_addr = vars("MASTER_ADDR").map(|a| a.trim().to_string()).unwrap_or_default();
        if master_addr.is_empty() {
            return Err(Error::invalid(
                "MASTER_ADDR",
                "MASTER_ADDR is not set (torchrun sets it; under srun export rank 0's host name)",
            ));
        }
        let port_text = vars("MASTER_PORT")
            .ok_or_else(|| Error::invalid("MASTER_PORT", "MASTER_PORT is not set (torchrun sets it)"))?;
        let master_port = parse_port("MASTER_PORT", &port_text)?;
        Ok(EnvConfig { rank, world_size, local_rank, master_addr, master_port })
    }
}

/// Reads `primary`, else `fallback`, as a non-negative integer; returns the name it used.
fn index_var(
    vars: &impl Fn(&str) -> Option<String>,
    primary: &'static str,
    fallback: &'static str,
) -> Result<(&'static str, usize)> {
    let (name, text) = match (vars(primary), vars(fallback)) {
        (Some(text), _) => (primary, text),
        (None, Some(text)) => (fallback, text),
        (None, None) => {
            return Err(Error::invalid(
                primary,
                format!("{primary} is not set (torchrun sets it), nor is {fallback} (srun sets it)"),
            ));
        }
    };
    let value = text
        .trim()
        .parse::<usize>()
        .map_err(|_| Error::invalid(name, format!("{name}={text:?} is not a non-negative integer")))?;
    Ok((name, value))
}

fn parse_port(name: &'static str, text: &str) -> Result<u16> {
    match text.trim().parse::<u16>() {
        Ok(0) => Err(Error::invalid(name, format!("{name}=0 is not a usable port"))),
        Ok(port) => Ok(port),
        Err(_) => Err(Error::invalid(name, format!("{name}={text:?} is not a port number (1..=65535)"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------
//
// Every message is a frame: payload length (u64 LE) + payload.
//   hub -> client  HELLO   PROTO_MAGIC | version u32 LE | nonce [32]
//   client -> hub  AUTH    PROTO_MAGIC | rank u64 LE | num_ranks u64 LE | SHA-256(secret|nonce|rank|num_ranks)
//   hub -> client  STATUS  0 (accepted) | 1 + UTF-8 reason (rejected)
//   hub -> client  READY   0 (all ranks joined) | 1 + UTF-8 reason
//   client -> hub  BLOB    seq u64 LE | blob
//   hub -> client  RESULT  0 | seq u64 | n u64 | n lengths u64 | blobs   or   1 + UTF-8 reason

const PROTO_MAGIC: [u8; 8] = *b"MOEEPBST";
const PROTO_VERSION: u32 = 1;
const HELLO_LEN: usize = 8 + 4 + 32;
const AUTH_LEN: usize = 8 + 8 + 8 + 32;
const HANDSHAKE_MAX: usize = 64 << 10;
const STATUS_OK: u8 = 0;
const STATUS_ERR: u8 = 1;
/// Frames of this size or less go out in one write.
const COALESCE_MAX: usize = 64 << 10;
/// Handshakes the hub runs at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

fn write_all_by(stream: &TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut w = stream;
    while !buf.is_empty() {
        let left = remaining(deadline).ok_or_else(timed_out)?;
        w.set_write_timeout(Some(left))?;
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact_by(stream: &TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut r = stream;
    while !buf.is_empty() {
        let left = remaining(deadline).ok_or_else(timed_out)?;
        r.set_read_timeout(Some(left))?;
        match r.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_frame(stream: &TcpStream, parts: &[&[u8]], deadline: Instant) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = (len as u64).to_le_bytes();
    if len <= COALESCE_MAX {
        let mut frame = Vec::with_capacity(8 + len);
        frame.extend_from_slice(&header);
        for part in parts {
            frame.extend_from_slice(part);
        }
        return write_all_by(stream, &frame, deadline);
    }
    write_all_by(stream, &header, deadline)?;
    for part in parts {
        write_all_by(stream, part, deadline)?;
    }
    Ok(())
}

fn frame_len(header: [u8; 8], max: usize) -> io::Result<usize> {
    let len = u64::from_le_bytes(header);
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len}-byte frame exceeds the limit of {max}"))),
    }
}

fn read_frame(stream: &TcpStream, max: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 8];
    read_exact_by(stream, &mut header, deadline)?;
    let mut payload = vec![0u8; frame_len(header, max)?];
    read_exact_by(stream, &mut payload, deadline)?;
    Ok(payload)
}

/// Sends a 1-byte-code status frame with an optional reason; best effort within one second.
fn send_status(stream: &TcpStream, status: std::result::Result<(), &str>) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    match status {
        Ok(()) => write_frame(stream, &[&[STATUS_OK]], deadline),
        Err(reason) => write_frame(stream, &[&[STATUS_ERR], reason.as_bytes()], deadline),
    }
}

/// Parses a status frame: `Ok(rest)` for code 0, `Err(reason)` for code 1.
fn parse_status(frame: &[u8]) -> std::result::Result<&[u8], String> {
    match frame.split_first() {
        Some((&STATUS_OK, rest)) => Ok(rest),
        Some((&STATUS_ERR, reason)) => Err(String::from_utf8_lossy(reason).into_owned()),
        _ => Err("malformed status message".into()),
    }
}

fn auth_mac(secret: &[u8; 32], nonce: &[u8; 32], rank: u64, num_ranks: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(secret);
    h.update(nonce);
    h.update(rank.to_le_bytes());
    h.update(num_ranks.to_le_bytes());
    h.finalize().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "connection closed by the peer".into(),
        kind if is_timeout(e) || kind == io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// TCP bootstrap
// ---------------------------------------------------------------------------------------------

/// A [`Bootstrap`] for one rank per process over TCP: a star with rank 0 as the hub.
///
/// Make one per rank with [`new`](TcpBootstrap::new) (from a [`UniqueId`]) or
/// [`from_env`](TcpBootstrap::from_env) (from torchrun's / srun's variables). Construction is
/// itself collective: it returns once all ranks have joined (or fails naming those that did not).
/// Sockets use `TCP_NODELAY`; every read and write is bounded by the timeout.
pub struct TcpBootstrap {
    rank: usize,
    num_ranks: usize,
    timeout: Duration,
    link: Mutex<Link>,
}

struct Link {
    role: Role,
    /// Number of completed all-gathers; frames carry it to catch ranks out of step.
    seq: u64,
    broken: Option<String>,
}

enum Role {
    Single,
    /// Connection to rank `r` at index `r - 1`.
    Hub(Vec<TcpStream>),
    Client(TcpStream),
}

/// `deadline + extra`, or `deadline` if that is not representable.
fn later(deadline: Instant, extra: Duration) -> Instant {
    deadline.checked_add(extra).unwrap_or(deadline)
}

/// Extra time a client waits past its own deadline for the hub, which knows which ranks are
/// missing, to report a failure.
fn client_grace(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(2))
}

impl TcpBootstrap {
    /// Joins the group that `id` describes as `rank` of `num_ranks`, waiting at most `timeout`
    /// for everything (this call and each later collective).
    ///
    /// Rank 0 uses the listener that [`UniqueId::new`] bound in this process (or binds `id.addr()`
    /// itself), accepts the other `num_ranks - 1` ranks and authenticates them; connections with a
    /// wrong secret, a duplicate rank, a rank out of range or a different `num_ranks` are refused
    /// (the refused peer gets an error) and rank 0 keeps waiting. Other ranks connect to
    /// `id.addr()`, retrying until the timeout, so rank 0 may start later.
    pub fn new(id: &UniqueId, rank: usize, num_ranks: usize, timeout: Duration) -> Result<TcpBootstrap> {
        check_group(rank, num_ranks, timeout)?;
        let deadline = deadline_after(timeout);
        let role = if rank == 0 {
            let listener = match take_listener(id.addr) {
                Some(listener) => Some(listener),
                None if num_ranks == 1 => None,
                None => {
                    if id.addr.port() == 0 {
                        return Err(Error::invalid("id", "rank 0 cannot listen on port 0 of a UniqueId"));
                    }
                    Some(bind_hub(id.addr, "the UniqueId's address")?)
                }
            };
            match listener {
                Some(listener) => hub_form_group(listener, id.addr, &id.secret, num_ranks, timeout, deadline)?,
                None => Role::Single,
            }
        } else {
            let addr = id.addr;
            Role::Client(client_join(&|| Ok(addr), &addr.to_string(), &id.secret, rank, num_ranks, timeout, deadline)?)
        };
        Ok(Self::with_role(rank, num_ranks, timeout, role))
    }

    /// [`from_vars`](TcpBootstrap::from_vars) with the process environment.
    pub fn from_env(timeout: Duration) -> Result<TcpBootstrap> {
        Self::from_vars(|name| std::env::var(name).ok(), timeout)
    }

    /// Joins the group described by torchrun's / srun's variables, read through `vars`
    /// (see [`EnvConfig`]).
    ///
    /// * The hub is rank 0 at `MASTER_ADDR`, port `MASTER_PORT + 1` (torchrun's own TCPStore holds
    ///   `MASTER_PORT`), or `MOE_EP_BOOTSTRAP_PORT` if set. Rank 0 listens on all interfaces
    ///   unless `MASTER_ADDR` is a loopback address.
    /// * The secret is `MOE_EP_BOOTSTRAP_SECRET` if set: 64 hex digits are used as the 32 bytes,
    ///   any other string is hashed with SHA-256. Otherwise it is SHA-256 of `"moe-ep"`,
    ///   `MASTER_ADDR`, the port, `WORLD_SIZE` and `TORCHELASTIC_RUN_ID` (or `SLURM_JOB_ID`).
    ///   That default is known to anyone who can read the job's environment: it only keeps
    ///   unrelated jobs from talking to each other by accident. Set `MOE_EP_BOOTSTRAP_SECRET`
    ///   (same value on every rank) for real authentication.
    pub fn from_vars(vars: impl Fn(&str) -> Option<String>, timeout: Duration) -> Result<TcpBootstrap> {
        let cfg = EnvConfig::from_vars(&vars)?;
        check_group(cfg.rank, cfg.world_size, timeout)?;
        let port = match vars(PORT_ENV) {
            Some(text) => parse_port(PORT_ENV, &text)?,
            None => cfg.master_port.checked_add(1).ok_or_else(|| {
                Error::invalid(
                    "MASTER_PORT",
                    format!(
                        "MASTER_PORT={} leaves no room for the bootstrap port MASTER_PORT+1; set {PORT_ENV}",
                        cfg.master_port
                    ),
                )
            })?,
        };
        let secret = env_secret(&vars, &cfg, port)?;
        let deadline = deadline_after(timeout);
        let desc = format!("{}:{port}", cfg.master_addr);
        let role = if cfg.world_size == 1 {
            Role::Single
        } else if cfg.rank == 0 {
            let bind_addr = match resolve(&cfg.master_addr, port) {
                Ok(addr) if addr.ip().is_loopback() => addr,
                Ok(SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            };
            let listener = bind_hub(bind_addr, "MASTER_ADDR:port")?;
            hub_form_group(listener, bind_addr, &secret, cfg.world_size, timeout, deadline)?
        } else {
            let master = cfg.master_addr.clone();
            let resolve_hub = move || resolve(&master, port);
            Role::Client(client_join(&resolve_hub, &desc, &secret, cfg.rank, cfg.world_size, timeout, deadline)?)
        };
        Ok(Self::with_role(cfg.rank, cfg.world_size, timeout, role))
    }

    /// How long each collective waits for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn with_role(rank: usize, num_ranks: usize, timeout: Duration, role: Role) -> TcpBootstrap {
        TcpBootstrap { rank, num_ranks, timeout, link: Mutex::new(Link { role, seq: 0, broken: None }) }
    }
}

impl fmt::Debug for TcpBootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpBootstrap")
            .field("rank", &self.rank)
            .field("num_ranks", &self.num_ranks)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn check_group(rank: usize, num_ranks: usize, timeout: Duration) -> Result<()> {
    if num_ranks == 0 {
        return Err(Error::invalid("num_ranks", "must be at least 1"));
    }
    if rank >= num_ranks {
        return Err(Error::invalid("rank", format!("rank {rank} is not below num_ranks {num_ranks}")));
    }
    check_timeout(timeout)
}

fn env_secret(vars: &impl Fn(&str) -> Option<String>, cfg: &EnvConfig, port: u16) -> Result<[u8; 32]> {
    if let Some(text) = vars(SECRET_ENV) {
        if text.is_empty() {
            return Err(Error::invalid(SECRET_ENV, format!("{SECRET_ENV} is set but empty")));
        }
        if let Some(bytes) = from_hex(text.trim()).and_then(|b| <[u8; 32]>::try_from(b).ok()) {
            return Ok(bytes);
        }
        return Ok(Sha256::digest(text.as_bytes()).into());
    }
    let run_id = vars("TORCHELASTIC_RUN_ID").or_else(|| vars("SLURM_JOB_ID")).unwrap_or_default();
    let mut h = Sha256::new();
    for part in ["moe-ep", cfg.master_addr.as_str(), &port.to_string(), &cfg.world_size.to_string(), run_id.as_str()] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    Ok(h.finalize().into())
}

fn bind_hub(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| Error::Bootstrap(format!("rank 0 could not listen on {addr} ({what}): {e}")))
}

/// Result of one connection's handshake on the hub.
enum Arrival {
    Authenticated { rank: usize, stream: TcpStream, peer: SocketAddr },
    Refused { peer: SocketAddr, reason: String },
}

/// The hub's side of one handshake; runs on its own thread so that a silent peer cannot stall
/// the others.
fn hub_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    secret: [u8; 32],
    num_ranks: usize,
    deadline: Instant,
) -> Arrival {
    let refused = |reason: String| Arrival::Refused { peer, reason };
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        return refused(format!("socket setup failed: {e}"));
    }
    let nonce = match random_bytes::<32>() {
        Ok(nonce) => nonce,
        Err(e) => return refused(e.to_string()),
    };
    if let Err(e) = write_frame(&stream, &[&PROTO_MAGIC, &PROTO_VERSION.to_le_bytes(), &nonce], deadline) {
        return refused(format!("sending hello: {}", describe_io(&e)));
    }
    let auth = match read_frame(&stream, HANDSHAKE_MAX, deadline) {
        Ok(auth) => auth,
        Err(e) => return refused(format!("reading authentication: {}", describe_io(&e))),
    };
    let reject = |reason: String| {
        // Best effort: the peer learns why before the connection closes.
        let _ = send_status(&stream, Err(&reason));
        reason
    };
    if auth.len() != AUTH_LEN || auth[0..8] != PROTO_MAGIC {
        return refused(reject("not a moe-ep bootstrap client (malformed authentication)".into()));
    }
    let claimed_rank = le_u64(&auth[8..16]);
    let claimed_ranks = le_u64(&auth[16..24]);
    let mut mac = [0u8; 32];
    mac.copy_from_slice(&auth[24..56]);
    if !constant_time_eq(&mac, &auth_mac(&secret, &nonce, claimed_rank, claimed_ranks)) {
        return refused(reject(format!(
            "authentication failed for a peer claiming rank {claimed_rank}: wrong secret (its UniqueId or \
             {SECRET_ENV} differs from rank 0's)"
        )));
    }
    if usize::try_from(claimed_ranks).ok() != Some(num_ranks) {
        return refused(reject(format!(
            "num_ranks mismatch: rank {claimed_rank} says num_ranks = {claimed_ranks}, rank 0 has {num_ranks}"
        )));
    }
    match usize::try_from(claimed_rank) {
        Ok(rank) if (1..num_ranks).contains(&rank) => Arrival::Authenticated { rank, stream, peer },
        _ => refused(reject(format!("rank {claimed_rank} is not a client rank of this group (1..{num_ranks})"))),
    }
}

/// Tells every connected peer why the hub gave up (best effort).
fn broadcast_error<'a>(streams: impl IntoIterator<Item = &'a TcpStream>, reason: &str) {
    let reason = format!("rank 0 reported: {reason}");
    for stream in streams {
        let _ = send_status(stream, Err(&reason));
    }
}

/// The hub's view of the group while it forms.
struct Formation {
    /// Rank `r`'s connection and address at index `r - 1`.
    peers: Vec<Option<(TcpStream, SocketAddr)>>,
    joined: usize,
    /// The first few refused connections, for the timeout message.
    refusals: Vec<String>,
    refusal_count: usize,
}

impl Formation {
    fn arrive(&mut self, arrival: Arrival) {
        let refusal = match arrival {
            Arrival::Authenticated { rank, stream, peer } => match &self.peers[rank - 1] {
                Some((_, first)) => {
                    let reason = format!("duplicate rank {rank}: rank {rank} already joined from {first}");
                    let _ = send_status(&stream, Err(&reason));
                    Some(format!("{peer}: {reason}"))
                }
                None => match send_status(&stream, Ok(())) {
                    Ok(()) => {
                        self.peers[rank - 1] = Some((stream, peer));
                        self.joined += 1;
                        None
                    }
                    Err(e) => Some(format!("{peer} (rank {rank}): {}", describe_io(&e))),
                },
            },
            Arrival::Refused { peer, reason } => Some(format!("{peer}: {reason}")),
        };
        if let Some(refusal) = refusal {
            self.refusal_count += 1;
            if self.refusals.len() < 8 {
                self.refusals.push(refusal);
            }
        }
    }
}

/// Rank 0: accepts and authenticates the other ranks, then tells them all to go.
fn hub_form_group(
    listener: TcpListener,
    addr: SocketAddr,
    secret: &[u8; 32],
    num_ranks: usize,
    timeout: Duration,
    deadline: Instant,
) -> Result<Role> {
    listener.set_nonblocking(true)?;
    let mut group =
        Formation { peers: (1..num_ranks).map(|_| None).collect(), joined: 0, refusals: Vec::new(), refusal_count: 0 };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Arrival>();

    loop {
        while let Ok(arrival) = rx.try_recv() {
            in_flight.fetch_sub(1, Ordering::Relaxed);
            group.arrive(arrival);
        }
        if group.joined == num_ranks - 1 {
            break;
        }
        let Some(left) = remaining(deadline) else {
            let missing: Vec<usize> = (1..num_ranks).filter(|r| group.peers[r - 1].is_none()).collect();
            let mut why =
                format!("rank 0 timed out after {timeout:?} waiting for ranks {missing:?} to connect to {addr}");
            if group.refusal_count > 0 {
                why.push_str(&format!(
                    "; refused {} connection(s): {}",
                    group.refusal_count,
                    group.refusals.join("; ")
                ));
            }
            broadcast_error(group.peers.iter().flatten().map(|(s, _)| s), &why);
            return Err(Error::Bootstrap(why));
        };
        let poll = left.min(Duration::from_millis(5));
        if in_flight.load(Ordering::Relaxed) >= MAX_HANDSHAKES {
            if let Ok(arrival) = rx.recv_timeout(poll) {
                in_flight.fetch_sub(1, Ordering::Relaxed);
                group.arrive(arrival);
            }
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let tx = tx.clone();
                let secret = *secret;
                let counter = Arc::clone(&in_flight);
                counter.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new().name("moe-ep-bootstrap-handshake".into()).spawn(move || {
                    let _ = tx.send(hub_handshake(stream, peer, secret, num_ranks, deadline));
                });
                if let Err(e) = spawned {
                    counter.fetch_sub(1, Ordering::Relaxed);
                    group.arrive(Arrival::Refused { peer, reason: format!("could not start a handshake thread: {e}") });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Ok(arrival) = rx.recv_timeout(poll) {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    group.arrive(arrival);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Transient (aborted connection, out of descriptors): note it and keep going.
                group.arrive(Arrival::Refused { peer: addr, reason: format!("accept failed: {e}") });
                std::thread::sleep(poll);
            }
        }
    }
    drop(listener);

    let streams: Vec<TcpStream> = group.peers.into_iter().flatten().map(|(s, _)| s).collect();
    let ready_deadline = deadline.max(Instant::now() + Duration::from_secs(1));
    for (i, stream) in streams.iter().enumerate() {
        if let Err(e) = write_frame(stream, &[&[STATUS_OK]], ready_deadline) {
            let why = format!("rank 0 lost rank {} while starting the group: {}", i + 1, describe_io(&e));
            broadcast_error(&streams, &why);
            return Err(Error::Bootstrap(why));
        }
    }
    Ok(Role::Hub(streams))
}

enum JoinFailure {
    /// Worth another connection attempt (hub not up yet, connection reset, ...).
    Retry(String),
    Fatal(Error),
}

/// A non-hub rank: connects to the hub (retrying until the deadline), authenticates, and waits
/// until every rank has joined.
fn client_join(
    resolve_hub: &dyn Fn() -> io::Result<SocketAddr>,
    desc: &str,
    secret: &[u8; 32],
    rank: usize,
    num_ranks: usize,
    timeout: Duration,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(10);
    let mut last = String::from("no attempt finished");
    let stream = loop {
        let Some(left) = remaining(deadline) else {
            return Err(Error::Bootstrap(format!(
                "rank {rank} timed out after {timeout:?} waiting for ranks [0] (the hub at {desc}); last error: {last}"
            )));
        };
        let attempt = resolve_hub()
            .map_err(|e| JoinFailure::Retry(format!("resolving {desc}: {e}")))
            .and_then(|addr| {
                TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5)))
                    .map_err(|e| JoinFailure::Retry(format!("connecting to {addr}: {e}")))
            })
            .and_then(|stream| client_handshake(stream, secret, rank, num_ranks, deadline));
        match attempt {
            Ok(stream) => break stream,
            Err(JoinFailure::Fatal(e)) => return Err(e),
            Err(JoinFailure::Retry(why)) => last = why,
        }
        if let Some(left) = remaining(deadline) {
            std::thread::sleep(backoff.min(left));
        }
        backoff = (backoff * 2).min(Duration::from_millis(200));
    };
    // Wait for the hub's go; a little longer than our own deadline so that the hub, which knows
    // who is missing, can report first.
    let ready = read_frame(&stream, HANDSHAKE_MAX, later(deadline, client_grace(timeout))).map_err(|e| {
        let why = if is_timeout(&e) {
            format!(
                "timed out after {timeout:?} waiting for rank 0 (the hub at {desc}) to report that all ranks joined"
            )
        } else {
            format!("lost rank 0 (the hub at {desc}) while waiting for the other ranks: {}", describe_io(&e))
        };
        Error::Bootstrap(format!("rank {rank}: {why}"))
    })?;
    parse_status(&ready).map_err(|why| Error::Bootstrap(format!("rank {rank}: {why}")))?;
    Ok(stream)
}

fn client_handshake(
    stream: TcpStream,
    secret: &[u8; 32],
    rank: usize,
    num_ranks: usize,
    deadline: Instant,
) -> std::result::Result<TcpStream, JoinFailure> {
    let retry = |what: &str, e: io::Error| JoinFailure::Retry(format!("{what}: {}", describe_io(&e)));
    stream.set_nodelay(true).map_err(|e| retry("setting TCP_NODELAY", e))?;
    let hello = read_frame(&stream, HANDSHAKE_MAX, deadline).map_err(|e| retry("reading the hub's hello", e))?;
    if hello.len() != HELLO_LEN || hello[0..8] != PROTO_MAGIC {
        return Err(JoinFailure::Retry("the peer is not a moe-ep bootstrap hub".into()));
    }
    let version = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]);
    if version != PROTO_VERSION {
        return Err(JoinFailure::Fatal(Error::Bootstrap(format!(
            "rank {rank}: rank 0 speaks bootstrap protocol version {version}, this build speaks {PROTO_VERSION}"
        ))));
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&hello[12..44]);
    let (rank64, ranks64) = (rank as u64, num_ranks as u64);
    let mac = auth_mac(secret, &nonce, rank64, ranks64);
    write_frame(&stream, &[&PROTO_MAGIC, &rank64.to_le_bytes(), &ranks64.to_le_bytes(), &mac], deadline)
        .map_err(|e| retry("sending authentication", e))?;
    let status = read_frame(&stream, HANDSHAKE_MAX, deadline).map_err(|e| retry("reading the hub's verdict", e))?;
    match parse_status(&status) {
        Ok(_) => Ok(stream),
        Err(why) => Err(JoinFailure::Fatal(Error::Bootstrap(format!("rank {rank}: rank 0 refused this rank: {why}")))),
    }
}

impl Bootstrap for TcpBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    fn all_gather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        check_blob(blob)?;
        let rank = self.rank;
        let mut link = self
            .link
            .lock()
            .map_err(|_| Error::Bootstrap(format!("rank {rank}: bootstrap state poisoned by a panicking thread")))?;
        if let Some(why) = &link.broken {
            return Err(Error::Bootstrap(format!("rank {rank}: group unusable after an earlier failure: {why}")));
        }
        let deadline = deadline_after(self.timeout);
        let seq = link.seq;
        let outcome = match &link.role {
            Role::Single => Ok(vec![blob.to_vec()]),
            Role::Hub(peers) => hub_all_gather(peers, blob, seq, self.timeout, deadline),
            Role::Client(hub) => client_all_gather(hub, blob, seq, self.num_ranks, self.timeout, deadline),
        };
        match outcome {
            Ok(blobs) => {
                link.seq += 1;
                Ok(blobs)
            }
            Err(why) => {
                link.broken = Some(why.clone());
                Err(Error::Bootstrap(format!("rank {rank}: {why}")))
            }
        }
    }
}

/// Receives one frame from every peer at once (poll), so that the error names every rank that is
/// missing, not just the first.
fn gather_frames(
    peers: &[TcpStream],
    max: usize,
    seq: u64,
    timeout: Duration,
    deadline: Instant,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    struct Incoming {
        header: [u8; 8],
        header_got: usize,
        body: Option<Vec<u8>>,
        body_got: usize,
        done: bool,
    }
    let mut incoming: Vec<Incoming> = peers
        .iter()
        .map(|_| Incoming { header: [0; 8], header_got: 0, body: None, body_got: 0, done: false })
        .collect();
    let mut pending = peers.len();
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(peers.len());
    let mut which: Vec<usize> = Vec::with_capacity(peers.len());
    while pending > 0 {
        let Some(left) = remaining(deadline) else {
            let missing: Vec<usize> = (0..peers.len()).filter(|&i| !incoming[i].done).map(|i| i + 1).collect();
            return Err(format!("all_gather #{seq} timed out after {timeout:?} waiting for ranks {missing:?}"));
        };
        fds.clear();
        which.clear();
        for (i, stream) in peers.iter().enumerate() {
            if !incoming[i].done {
                fds.push(libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                which.push(i);
            }
        }
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX).max(1);
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` is a live, exclusively borrowed array of `nfds` initialised pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed during all_gather #{seq}: {e}"));
        }
        for (pfd, &i) in fds.iter().zip(&which) {
            if pfd.revents == 0 {
                continue;
            }
            let rank = i + 1;
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(format!("the connection to rank {rank} is invalid"));
            }
            let inc = &mut incoming[i];
            let mut stream = &peers[i];
            // The socket is readable, so this read returns without blocking; the read timeout
            // is a safety net.
            if let Some(left) = remaining(deadline) {
                let _ = stream.set_read_timeout(Some(left));
            }
            let read = match &mut inc.body {
                None => stream.read(&mut inc.header[inc.header_got..]),
                Some(body) => stream.read(&mut body[inc.body_got..]),
            };
            let n = match read {
                Ok(0) => {
                    return Err(format!(
                        "rank {rank} closed its connection during all_gather #{seq} (did its process exit?)"
                    ));
                }
                Ok(n) => n,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading all_gather #{seq} from rank {rank}: {e}")),
            };
            match &inc.body {
                None => {
                    inc.header_got += n;
                    if inc.header_got == 8 {
                        let len =
                            frame_len(inc.header, max).map_err(|e| format!("rank {rank} sent a bad frame: {e}"))?;
                        inc.body = Some(vec![0u8; len]);
                    }
                }
                Some(_) => inc.body_got += n,
            }
            if let Some(body) = &inc.body
                && inc.body_got == body.len()
            {
                inc.done = true;
                pending -= 1;
            }
        }
    }
    Ok(incoming.into_iter().map(|inc| inc.body.unwrap_or_default()).collect())
}

fn hub_all_gather(
    peers: &[TcpStream],
    own: &[u8],
    seq: u64,
    timeout: Duration,
    deadline: Instant,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let frames = gather_frames(peers, 8 + MAX_BLOB_BYTES, seq, timeout, deadline)
        .inspect_err(|why| broadcast_error(peers, why))?;
    let mut blobs = Vec::with_capacity(peers.len() + 1);
    blobs.push(own.to_vec());
    for (i, mut frame) in frames.into_iter().enumerate() {
        let got = if frame.len() >= 8 { Some(le_u64(&frame)) } else { None };
        if got != Some(seq) {
            let why = format!("rank {} is out of step: it sent all_gather {got:?}, rank 0 is at #{seq}", i + 1);
            broadcast_error(peers, &why);
            return Err(why);
        }
        frame.drain(..8);
        blobs.push(frame);
    }
    let n = blobs.len();
    let mut head = Vec::with_capacity(1 + 16 + 8 * n);
    head.push(STATUS_OK);
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&(n as u64).to_le_bytes());
    for blob in &blobs {
        head.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(n + 1);
    parts.push(&head);
    parts.extend(blobs.iter().map(Vec::as_slice));
    for (i, stream) in peers.iter().enumerate() {
        if let Err(e) = write_frame(stream, &parts, deadline) {
            let why = if is_timeout(&e) {
                format!("all_gather #{seq} timed out after {timeout:?} sending results to ranks [{}]", i + 1)
            } else {
                format!("sending all_gather #{seq} results to rank {}: {}", i + 1, describe_io(&e))
            };
            broadcast_error(&peers[i + 1..], &why);
            return Err(why);
        }
    }
    Ok(blobs)
}

fn client_all_gather(
    hub: &TcpStream,
    blob: &[u8],
    seq: u64,
    num_ranks: usize,
    timeout: Duration,
    deadline: Instant,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let max = 1 + 16 + num_ranks.saturating_mul(8 + MAX_BLOB_BYTES);
    if let Err(e) = write_frame(hub, &[&seq.to_le_bytes(), blob], deadline) {
        // The hub may already have said why it gave up.
        if let Ok(frame) = read_frame(hub, max, Instant::now() + Duration::from_millis(200))
            && let Err(why) = parse_status(&frame)
        {
            return Err(why);
        }
        return Err(if is_timeout(&e) {
            format!("all_gather #{seq} timed out after {timeout:?} waiting for ranks [0] (the hub) to take its blob")
        } else {
            format!("sending all_gather #{seq} to rank 0 (the hub): {}", describe_io(&e))
        });
    }
    let frame = read_frame(hub, max, later(deadline, client_grace(timeout))).map_err(|e| {
        if is_timeout(&e) {
            format!(
                "all_gather #{seq} timed out after {timeout:?} waiting for ranks [0] (the hub) to return the results"
            )
        } else {
            format!("receiving all_gather #{seq} from rank 0 (the hub): {}", describe_io(&e))
        }
    })?;
    let body = parse_status(&frame)?;
    parse_results(body, seq, num_ranks).ok_or_else(|| format!("malformed all_gather #{seq} results from rank 0"))
}

fn parse_results(body: &[u8], seq: u64, num_ranks: usize) -> Option<Vec<Vec<u8>>> {
    if body.len() < 16 || le_u64(body) != seq || usize::try_from(le_u64(&body[8..])).ok()? != num_ranks {
        return None;
    }
    let lens_end = 16usize.checked_add(num_ranks.checked_mul(8)?)?;
    let lens = body.get(16..lens_end)?;
    let mut data = body.get(lens_end..)?;
    let mut blobs = Vec::with_capacity(num_ranks);
    for len in lens.chunks_exact(8) {
        let len = usize::try_from(le_u64(len)).ok()?;
        let blob = data.get(..len)?;
        blobs.push(blob.to_vec());
        data = &data[len..];
    }
    data.is_empty().then_some(blobs)
}
