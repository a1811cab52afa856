//! Host side of the inter-node transport's command rings (docs/design.md, "Inter-node
//! transport"): the ring a GPU's kernels push [`NetCmd`]s into, the [`Proxy`] that reads it,
//! and the [`Transport`]s that carry the commands out (so far the in-process
//! [`SimTransport`] of the CPU back end, with its chaos mode; `tcp` and `verbs` follow).
//!
//! ```
//! use moe_ep::{Device, net::CommandRing};
//! # fn main() -> moe_ep::Result<()> {
//! let stream = Device::cpu().new_stream()?;
//! let mut ring = CommandRing::new(&stream, 4)?; // 16 slots
//! assert_eq!(ring.poll()?, None); // nothing pushed yet
//! assert_eq!(ring.ring().log2_slots, 4); // what a kernel takes
//! # Ok(())
//! # }
//! ```
mod tcp;
pub use tcp::TcpTransport;

use crate::device::{DeviceBuffer, HostMapped, Stream};
use crate::group::SymmetricBuffer;
use crate::{Error, Result};
use moe_ep_abi::net::{NET_SLOT_BYTES, NET_SLOT_WORDS, NetCmd, NetOp, NetRing, Slot};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The most slots of one ring (2^16: 2 MiB of host-mapped memory).
pub const MAX_LOG2_SLOTS: u32 = 16;

/// A command ring: slots and the consumer's tail in host-mapped memory, the producers' head
/// and cached tail in device memory ([`NetRing`]). One reader (the proxy thread) polls it.
///
/// After a device-side timeout (a producer that found the ring full for too long) the ring
/// has a claimed position that will never be written: make a new one.
pub struct CommandRing {
    slots: HostMapped,
    tail: HostMapped,
    _head: DeviceBuffer,
    _tail_cache: DeviceBuffer,
    ring: NetRing,
    /// The next position to read.
    next: u64,
}

impl CommandRing {
    /// A ring of `2^log2_slots` slots for kernels on `stream`'s device (zeroed: every slot
    /// reads as empty, as a zero word carries no lap's tag).
    pub fn new(stream: &Stream, log2_slots: u32) -> Result<CommandRing> {
        if log2_slots > MAX_LOG2_SLOTS {
            return Err(Error::invalid("log2_slots", format!("{log2_slots} > {MAX_LOG2_SLOTS}")));
        }
        let device = stream.device();
        let slot_bytes = (NET_SLOT_BYTES as usize) << log2_slots;
        let (slots, tail) = (device.alloc_host_mapped(slot_bytes)?, device.alloc_host_mapped(8)?);
        // SAFETY: the whole of the fresh allocation, which no kernel uses yet; `tail.write`
        // below fences after it.
        unsafe { std::ptr::write_bytes(slots.host_ptr(), 0, slot_bytes) };
        tail.write(0, 0u64)?;
        let (head, tail_cache) = (stream.alloc(8)?, stream.alloc(8)?);
        stream.synchronize()?;
        let ring = NetRing {
            slots: slots.device_ptr(),
            tail: tail.device_ptr(),
            head: head.ptr(),
            tail_cache: tail_cache.ptr(),
            log2_slots,
            pad: 0,
        };
        Ok(CommandRing { slots, tail, _head: head, _tail_cache: tail_cache, ring, next: 0 })
    }

    /// What a kernel takes to push into this ring.
    pub fn ring(&self) -> NetRing {
        self.ring
    }

    /// The next position [`CommandRing::poll`] reads.
    pub fn next_position(&self) -> u64 {
        self.next
    }

    /// The command at the next position, once all its words have landed (then the position
    /// advances), or None. Its slot stays taken until [`CommandRing::release`] passes it.
    pub fn poll(&mut self) -> Result<Option<(u64, NetCmd)>> {
        let pos = self.next;
        let index = (pos & ((1 << self.ring.log2_slots) - 1)) as usize;
        let base = self.slots.host_ptr() as usize + index * NET_SLOT_BYTES as usize;
        let mut words = [0u64; NET_SLOT_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: word `i` of slot `index`, inside the ring's host memory, 8-aligned; the
            // GPU writes it with plain stores after a system fence (acquire pairs with it).
            *w = unsafe { AtomicU64::from_ptr((base + 8 * i) as *mut u64) }.load(Ordering::Acquire);
        }
        match NetCmd::decode(&words, pos, self.ring.log2_slots) {
            Slot::Empty | Slot::Partial => Ok(None),
            Slot::Ready(cmd) => {
                self.next += 1;
                Ok(Some((pos, cmd)))
            }
            Slot::Invalid => Err(Error::KernelFault(format!("command ring: position {pos} holds an unknown op"))),
        }
    }

    /// Gives the slots of every position before `upto` back to the producers (and completes
    /// the quiets among them). Positions are given back in order, never past what was read.
    pub fn release(&self, upto: u64) -> Result<()> {
        if upto > self.next {
            return Err(Error::invalid("upto", format!("{upto} is past the positions read ({})", self.next)));
        }
        self.tail.write(0, upto)
    }
}

/// What carries commands out between ranks (the transport contract, docs/design.md): puts
/// land in any order, a signal on (ring, peer) only after that ring's earlier puts to the
/// peer, nothing is ordered across rings. Back ends: `sim` (in-process, here); `tcp` and
/// `verbs` follow.
pub trait Transport: Send {
    /// Starts `cmd` (a put, put-signal or signal) from this rank's ring `ring`.
    fn submit(&mut self, ring: usize, cmd: &NetCmd) -> Result<()>;
    /// Moves submitted work along (a transport that completes at `submit` has none).
    fn progress(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether everything submitted on `ring` so far is visible at its peers, with its
    /// sources reusable (what a `QUIET` waits for).
    fn flushed(&mut self, ring: usize) -> Result<bool>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn submit(&mut self, ring: usize, cmd: &NetCmd) -> Result<()> {
        (**self).submit(ring, cmd)
    }
    fn progress(&mut self) -> Result<()> {
        (**self).progress()
    }
    fn flushed(&mut self, ring: usize) -> Result<bool> {
        (**self).flushed(ring)
    }
}

/// Ranks of one process on the CPU back end: a put is a copy between their symmetric
/// buffers, a signal an atomic add on the peer's signal table. Without chaos both happen at
/// `submit`. With [`SimTransport::with_chaos`] they wait and are applied a few at a time, in
/// a seeded random order that keeps only what the contract promises: puts land in pieces
/// and in any order, a signal waits only for the earlier puts of its (ring, peer).
pub struct SimTransport {
    /// Every rank's data buffer base and length.
    data: Vec<(u64, usize)>,
    /// Every rank's signal table base and `u64` count.
    signals: Vec<(u64, usize)>,
    rank: usize,
    chaos: Option<Chaos>,
}

/// A put or a signal, checked and resolved to addresses.
#[derive(Clone, Copy)]
enum SimOp {
    Copy { src: u64, dst: u64, len: usize },
    Add { word: u64, add: u64 },
}

impl SimOp {
    fn apply(self) {
        match self {
            // SAFETY: resolved inside live symmetric buffers (checked at submit); `copy`
            // allows overlap.
            SimOp::Copy { src, dst, len } => unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) },
            SimOp::Add { word, add } => {
                // SAFETY: a word of a live signal table (checked at submit), 8-aligned.
                let word = unsafe { AtomicU64::from_ptr(word as *mut u64) };
                // Release: the copies applied before it (by this thread) are visible with it.
                word.fetch_add(add, Ordering::Release);
            }
        }
    }
}

/// The seeded misbehaviour of a [`SimTransport`]: operations waiting to be applied, in
/// submission order, with their (ring, peer).
struct Chaos {
    state: u64,
    pending: Vec<(usize, u32, SimOp)>,
}

impl Chaos {
    /// xorshift64*.
    fn next(&mut self, below: usize) -> usize {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % below.max(1)
    }

    /// Whether pending operation `i` may be applied now: a copy always; an add once no
    /// copy of its (ring, peer) submitted before it is pending.
    fn eligible(&self, i: usize) -> bool {
        let (ring, peer, op) = self.pending[i];
        matches!(op, SimOp::Copy { .. })
            || !self.pending[..i].iter().any(|&(r, p, o)| r == ring && p == peer && matches!(o, SimOp::Copy { .. }))
    }
}

impl SimTransport {
    /// Rank `rank`'s transport over `data` (the symmetric buffer puts address) and `signals`
    /// (the `u64` signal tables), both made on the CPU back end.
    pub fn new(rank: usize, data: &SymmetricBuffer, signals: &SymmetricBuffer) -> Result<SimTransport> {
        if !data.local().device().is_cpu() || !signals.local().device().is_cpu() {
            return Err(Error::Unsupported("the sim transport moves host memory: the CPU back end only".into()));
        }
        let bases = |b: &SymmetricBuffer, len: usize| -> Vec<(u64, usize)> {
            (0..).map_while(|r| b.peer_ptr(r)).map(|p| (p, len)).collect()
        };
        let (data_v, signals_v) = (bases(data, data.len()), bases(signals, signals.len() / 8));
        if rank >= data_v.len() || data_v.len() != signals_v.len() {
            return Err(Error::invalid("rank", format!("{rank} of {} ranks", data_v.len())));
        }
        Ok(SimTransport { data: data_v, signals: signals_v, rank, chaos: None })
    }

    /// The same transport, misbehaving as the contract allows, from `seed`.
    pub fn with_chaos(self, seed: u64) -> SimTransport {
        SimTransport { chaos: Some(Chaos { state: seed | 1, pending: Vec::new() }), ..self }
    }

    fn put(&self, cmd: &NetCmd) -> Result<SimOp> {
        let peer = cmd.peer as usize;
        let (Some(&(src, src_len)), Some(&(dst, dst_len))) = (self.data.get(self.rank), self.data.get(peer)) else {
            return Err(Error::invalid("peer", format!("rank {peer} of {}", self.data.len())));
        };
        let len = cmd.len as usize;
        let fits = |off: u64, size: usize| (off as usize).checked_add(len).is_some_and(|end| end <= size);
        if !fits(cmd.src_off, src_len) || !fits(cmd.dst_off, dst_len) {
            return Err(Error::invalid(
                "put",
                format!("{len} bytes at {} -> {} leave the buffers", cmd.src_off, cmd.dst_off),
            ));
        }
        Ok(SimOp::Copy { src: src + cmd.src_off, dst: dst + cmd.dst_off, len })
    }

    fn signal(&self, cmd: &NetCmd) -> Result<SimOp> {
        let peer = cmd.peer as usize;
        let Some(&(base, count)) = self.signals.get(peer) else {
            return Err(Error::invalid("peer", format!("rank {peer} of {}", self.signals.len())));
        };
        if cmd.sig_idx as usize >= count {
            return Err(Error::invalid("sig_idx", format!("{} of {count} signals", cmd.sig_idx)));
        }
        Ok(SimOp::Add { word: base + 8 * cmd.sig_idx as u64, add: cmd.sig_add as i64 as u64 })
    }
}

impl Transport for SimTransport {
    fn submit(&mut self, ring: usize, cmd: &NetCmd) -> Result<()> {
        let ops = match cmd.op {
            NetOp::Put => vec![self.put(cmd)?],
            NetOp::PutSignal => vec![self.put(cmd)?, self.signal(cmd)?],
            NetOp::Signal => vec![self.signal(cmd)?],
            NetOp::Nop | NetOp::Quiet => Vec::new(),
        };
        let Some(chaos) = &mut self.chaos else {
            ops.into_iter().for_each(SimOp::apply);
            return Ok(());
        };
        for op in ops {
            match op {
                // In up to four pieces, each applied on its own.
                SimOp::Copy { src, dst, len } => {
                    let mut cuts: Vec<usize> = (0..chaos.next(4)).map(|_| chaos.next(len + 1)).collect();
                    cuts.extend([0, len]);
                    cuts.sort_unstable();
                    for w in cuts.windows(2).filter(|w| w[1] > w[0]) {
                        let piece = SimOp::Copy { src: src + w[0] as u64, dst: dst + w[0] as u64, len: w[1] - w[0] };
                        chaos.pending.push((ring, cmd.peer, piece));
                    }
                }
                add => chaos.pending.push((ring, cmd.peer, add)),
            }
        }
        Ok(())
    }

    fn progress(&mut self) -> Result<()> {
        let Some(chaos) = &mut self.chaos else { return Ok(()) };
        // At least one (the oldest is always eligible), at most half of what waits.
        for _ in 0..1 + chaos.next(chaos.pending.len() / 2 + 1) {
            let eligible: Vec<usize> = (0..chaos.pending.len()).filter(|&i| chaos.eligible(i)).collect();
            if eligible.is_empty() {
                break;
            }
            let i = eligible[chaos.next(eligible.len())];
            chaos.pending.remove(i).2.apply();
        }
        Ok(())
    }

    fn flushed(&mut self, ring: usize) -> Result<bool> {
        Ok(self.chaos.as_ref().is_none_or(|c| c.pending.iter().all(|&(r, ..)| r != ring)))
    }
}

/// A rank's proxy: reads its command rings in turn and hands the commands to its transport.
/// A `QUIET` slot is given back only once its ring is flushed, so the kernel waiting on it
/// resumes only then.
pub struct Proxy<T: Transport> {
    rings: Vec<CommandRing>,
    transport: T,
    /// Per ring, a quiet read but not yet given back.
    quiet_at: Vec<Option<u64>>,
}

impl<T: Transport> Proxy<T> {
    /// A proxy over `rings` (ring `i` is the transport's ring `i`).
    pub fn new(rings: Vec<CommandRing>, transport: T) -> Proxy<T> {
        let n = rings.len();
        Proxy { rings, transport, quiet_at: vec![None; n] }
    }

    /// The rings (what kernels take: `rings()[i].ring()`).
    pub fn rings(&self) -> &[CommandRing] {
        &self.rings
    }

    /// Polls until `stop` is set and a pass finds nothing more, backing off while idle (spin,
    /// yield, then 50 µs sleeps). An error ends the loop: kernels waiting on this proxy then
    /// time out, and the caller reports the error.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let mut idle = 0u32;
        loop {
            if self.poll_once()? > 0 {
                idle = 0;
                continue;
            }
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            idle = idle.saturating_add(1);
            match idle {
                0..64 => std::hint::spin_loop(),
                64..1024 => std::thread::yield_now(),
                _ => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        }
    }

    /// One pass over every ring: submits what has landed, gives slots back. The number of
    /// commands taken. An error (a bad command, a failed transport) is the peer's or the
    /// kernel's: the caller reports it; the ring is then out of step.
    pub fn poll_once(&mut self) -> Result<usize> {
        self.transport.progress()?;
        let mut taken = 0;
        for (i, ring) in self.rings.iter_mut().enumerate() {
            if let Some(pos) = self.quiet_at[i] {
                if !self.transport.flushed(i)? {
                    continue; // nothing after a quiet is taken before it completes
                }
                ring.release(pos + 1)?;
                self.quiet_at[i] = None;
            }
            while let Some((pos, cmd)) = ring.poll()? {
                taken += 1;
                if cmd.op == NetOp::Quiet {
                    if self.transport.flushed(i)? {
                        ring.release(pos + 1)?;
                        continue;
                    }
                    self.quiet_at[i] = Some(pos);
                    break;
                }
                self.transport.submit(i, &cmd)?;
                ring.release(pos + 1)?;
            }
        }
        Ok(taken)
    }
}
