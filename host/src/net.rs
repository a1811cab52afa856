//! Host side of the inter-node transport's command rings (docs/design.md, "Inter-node
//! transport"): the ring a GPU's kernels push [`NetCmd`]s into, and the proxy's reading of
//! it. The transports that carry the commands out come next (issue 16).
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
use crate::device::{DeviceBuffer, HostMapped, Stream};
use crate::{Error, Result};
use moe_ep_abi::net::{NET_SLOT_BYTES, NET_SLOT_WORDS, NetCmd, NetRing, Slot};
use std::sync::atomic::{AtomicU64, Ordering};

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
        for offset in (0..slot_bytes).step_by(8) {
            slots.write(offset, 0u64)?;
        }
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
