//! The `tcp` transport: where no RDMA NIC exists (and across simulated nodes), commands go
//! over one TCP connection per (rank, peer), and the receiving side applies them.
//!
//! A frame is a 40-byte header (op, ring, length, destination offset, signal index and
//! addend, sequence number) and, for a put, its payload. The receiving thread of a
//! connection writes the payload into its rank's symmetric buffer, then adds the signal
//! (release), then acknowledges the frame's sequence number; `flushed` compares what was
//! sent on a ring with what the peer acknowledged. A byte stream keeps more order than the
//! contract asks, so tests that need reordering use the sim transport's chaos mode.
//!
//! The CPU back end only for now: the receiver writes host memory (on a GPU it will stage
//! through pinned memory and `cuMemcpyHtoDAsync`).
use super::Transport;
use crate::bootstrap::Bootstrap;
use crate::group::SymmetricBuffer;
use crate::{Error, Result};
use moe_ep_abi::net::{NetCmd, NetOp};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes of a frame header.
const HEADER_BYTES: usize = 40;

/// One rank's view of a buffer: base address and bytes (host memory).
#[derive(Clone, Copy)]
struct Region {
    base: u64,
    len: usize,
}

/// What a receiving thread writes into: this rank's data buffer and signal table.
#[derive(Clone, Copy)]
struct Local {
    data: Region,
    signals: Region,
}

/// The first error a connection's thread met (reported by the next `progress`).
type ErrorSlot = Arc<Mutex<Option<String>>>;

/// One peer: the connection frames go out on, and what the peer has acknowledged.
struct Peer {
    stream: TcpStream,
    /// Sequence numbers sent so far (frames are numbered from 1).
    sent: u64,
    /// The highest sequence number the peer acknowledged.
    acked: Arc<AtomicU64>,
}

/// The `tcp` transport of one rank (module docs).
pub struct TcpTransport {
    local: Local,
    peers: Vec<Option<Peer>>,
    /// Per ring, per peer: the last sequence number sent on that ring.
    ring_last: Vec<Vec<u64>>,
    error: ErrorSlot,
    threads: Vec<JoinHandle<()>>,
    /// Every connection, for shutting them down when dropped.
    sockets: Vec<TcpStream>,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Io(format!("tcp transport: {what}: {e}"))
}

impl TcpTransport {
    /// Collective: connects this rank to every peer of `bootstrap`'s group on the loopback
    /// interface (each rank listens on a free port and all-gathers it) for `rings` rings.
    /// `data` is the symmetric buffer puts address, `signals` the `u64` signal tables.
    pub fn connect(
        bootstrap: &dyn Bootstrap,
        data: &SymmetricBuffer,
        signals: &SymmetricBuffer,
        rings: usize,
    ) -> Result<TcpTransport> {
        if !data.local().device().is_cpu() || !signals.local().device().is_cpu() {
            return Err(Error::Unsupported(
                "the tcp transport writes host memory: the CPU back end only, for now".into(),
            ));
        }
        let (rank, n) = (bootstrap.rank(), bootstrap.num_ranks());
        let local = Local {
            data: Region { base: data.local().ptr(), len: data.len() },
            signals: Region { base: signals.local().ptr(), len: signals.len() },
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| io_err("bind", e))?;
        let port = listener.local_addr().map_err(|e| io_err("local_addr", e))?.port();
        let ports = bootstrap.all_gather(&port.to_le_bytes())?;
        // Built up in place: on an error, its Drop shuts what was opened and joins the threads.
        let mut t = TcpTransport {
            local,
            peers: Vec::with_capacity(n),
            ring_last: vec![vec![0; n]; rings],
            error: Arc::default(),
            threads: Vec::new(),
            sockets: Vec::new(),
        };
        // Outgoing: a connection to every peer, opened with this rank's number.
        for (q, blob) in ports.iter().enumerate() {
            if q == rank {
                t.peers.push(None);
                continue;
            }
            let port =
                u16::from_le_bytes(blob.as_slice().try_into().map_err(|_| Error::Bootstrap("bad port blob".into()))?);
            let mut stream =
                TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map_err(|e| io_err("connect", e))?;
            t.sockets.push(stream.try_clone().map_err(|e| io_err("clone", e))?);
            stream.set_nodelay(true).map_err(|e| io_err("nodelay", e))?;
            stream.write_all(&(rank as u32).to_le_bytes()).map_err(|e| io_err("hello", e))?;
            let acked = Arc::new(AtomicU64::new(0));
            let (reader, acked2) = (stream.try_clone().map_err(|e| io_err("clone", e))?, acked.clone());
            t.threads.push(std::thread::spawn(move || read_acks(reader, &acked2)));
            t.peers.push(Some(Peer { stream, sent: 0, acked }));
        }
        // Incoming: one connection from every peer; a thread applies its frames.
        for _ in 0..n.saturating_sub(1) {
            let (mut stream, _) = listener.accept().map_err(|e| io_err("accept", e))?;
            t.sockets.push(stream.try_clone().map_err(|e| io_err("clone", e))?);
            stream.set_nodelay(true).map_err(|e| io_err("nodelay", e))?;
            let mut hello = [0u8; 4];
            stream.read_exact(&mut hello).map_err(|e| io_err("hello", e))?;
            let error = t.error.clone();
            t.threads.push(std::thread::spawn(move || apply_frames(stream, local, &error)));
        }
        // No rank sends before every rank has accepted its connections.
        bootstrap.barrier()?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        match self.error.lock().map(|e| e.clone()) {
            Ok(None) => Ok(()),
            Ok(Some(msg)) => Err(Error::Io(format!("tcp transport: {msg}"))),
            Err(_) => Err(Error::Io("tcp transport: a connection thread panicked".into())),
        }
    }
}

impl Transport for TcpTransport {
    fn submit(&mut self, ring: usize, cmd: &NetCmd) -> Result<()> {
        self.check()?;
        let (has_data, has_signal) = match cmd.op {
            NetOp::Put => (true, false),
            NetOp::PutSignal => (true, true),
            NetOp::Signal => (false, true),
            NetOp::Nop | NetOp::Quiet => return Ok(()),
        };
        let q = cmd.peer as usize;
        let Some(Some(peer)) = self.peers.get_mut(q) else {
            return Err(Error::invalid("peer", format!("rank {q}: not a peer of this transport")));
        };
        let Some(last) = self.ring_last.get_mut(ring) else {
            return Err(Error::invalid("ring", format!("{ring} of {}", self.ring_last.len())));
        };
        let len = if has_data { cmd.len as usize } else { 0 };
        if has_data && (cmd.src_off as usize).checked_add(len).is_none_or(|end| end > self.local.data.len) {
            return Err(Error::invalid("put", format!("{len} bytes at {} leave the buffer", cmd.src_off)));
        }
        peer.sent += 1;
        last[q] = peer.sent;
        let mut header = [0u8; HEADER_BYTES];
        header[0] = has_data as u8 | (has_signal as u8) << 1;
        header[4..8].copy_from_slice(&(ring as u32).to_le_bytes());
        header[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        header[16..24].copy_from_slice(&cmd.dst_off.to_le_bytes());
        header[24..28].copy_from_slice(&cmd.sig_idx.to_le_bytes());
        header[28..32].copy_from_slice(&cmd.sig_add.to_le_bytes());
        header[32..40].copy_from_slice(&peer.sent.to_le_bytes());
        peer.stream.write_all(&header).map_err(|e| io_err("send", e))?;
        if len > 0 {
            // SAFETY: `len` bytes at `src_off` of this rank's live buffer (checked above).
            let payload = unsafe { std::slice::from_raw_parts((self.local.data.base + cmd.src_off) as *const u8, len) };
            peer.stream.write_all(payload).map_err(|e| io_err("send", e))?;
        }
        Ok(())
    }

    fn progress(&mut self) -> Result<()> {
        self.check()
    }

    fn flushed(&mut self, ring: usize) -> Result<bool> {
        self.check()?;
        let Some(last) = self.ring_last.get(ring) else {
            return Err(Error::invalid("ring", format!("{ring} of {}", self.ring_last.len())));
        };
        Ok(self.peers.iter().zip(last).all(|(p, &l)| p.as_ref().is_none_or(|p| p.acked.load(Ordering::Acquire) >= l)))
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both); // wakes the threads blocked in reads
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Records the first error of a connection thread.
fn fail(error: &ErrorSlot, msg: String) {
    if let Ok(mut e) = error.lock()
        && e.is_none()
    {
        *e = Some(msg);
    }
}

/// An outgoing connection's reader: the peer's cumulative acknowledgements, until the
/// connection closes.
fn read_acks(mut stream: TcpStream, acked: &AtomicU64) {
    let mut seq = [0u8; 8];
    while stream.read_exact(&mut seq).is_ok() {
        acked.fetch_max(u64::from_le_bytes(seq), Ordering::Release);
    }
}

/// An incoming connection's thread: applies each frame (payload, then signal), then
/// acknowledges it.
fn apply_frames(mut stream: TcpStream, local: Local, error: &ErrorSlot) {
    let (mut header, mut staging) = ([0u8; HEADER_BYTES], Vec::new());
    while stream.read_exact(&mut header).is_ok() {
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
        let half = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
        let (has_data, has_signal) = (header[0] & 1 != 0, header[0] & 2 != 0);
        let (len, dst_off, sig_idx, sig_add, seq) = (word(8) as usize, word(16), half(24), half(28) as i32, word(32));
        if has_data {
            if (dst_off as usize).checked_add(len).is_none_or(|end| end > local.data.len) {
                return fail(error, format!("a put of {len} bytes at {dst_off} leaves the buffer"));
            }
            // Staged: the rank's kernels may read the buffer meanwhile (other blocks of it).
            staging.resize(len, 0);
            if stream.read_exact(&mut staging).is_err() {
                return fail(error, "a connection closed inside a put".into());
            }
            // SAFETY: `len` bytes at `dst_off` of this rank's live buffer (checked above).
            unsafe { std::ptr::copy_nonoverlapping(staging.as_ptr(), (local.data.base + dst_off) as *mut u8, len) };
        }
        if has_signal {
            if 8 * (sig_idx as usize + 1) > local.signals.len {
                return fail(error, format!("signal {sig_idx} is past the table"));
            }
            // SAFETY: word `sig_idx` of this rank's live signal table (checked above), 8-aligned.
            let word = unsafe { AtomicU64::from_ptr((local.signals.base + 8 * sig_idx as u64) as *mut u64) };
            // Release: the payloads read before it are visible with it.
            word.fetch_add(sig_add as i64 as u64, Ordering::Release);
        }
        if stream.write_all(&seq.to_le_bytes()).is_err() {
            return;
        }
    }
}
