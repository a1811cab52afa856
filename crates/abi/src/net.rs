//! The inter-node command ring: what a kernel writes for the host proxy to carry out
//! (docs/design.md, "Inter-node transport").
//!
//! A kernel asks for a put or a signal by writing one 32-byte [`NetCmd`] slot into a ring in
//! host-mapped memory; the proxy thread of its GPU reads the slot and drives the transport
//! (RDMA, TCP or the in-process simulation). Slots are four `u64` words, and every word
//! carries the slot's *lap tag* in its top byte: the tag of position `pos` in a ring of
//! `2^log2_slots` slots is `(pos >> log2_slots) & 0x7F | 0x80`. So
//! - a word is never zero, and the tag changes every lap: nothing is ever cleared;
//! - the reader knows a slot is whole when all four words carry the tag it expects. Writes
//!   from the GPU to host memory may land torn or out of order (NVSHMEM's and NCCL's proxies
//!   guard against the same); a slot with some words of the old lap is still being written.
//!
//! ```
//! use moe_ep_abi::net::{NetCmd, NetOp, Slot};
//! let put = NetCmd { op: NetOp::PutSignal, peer: 3, len: 4096, src_off: 1 << 20, dst_off: 1 << 21, sig_idx: 7, sig_add: 1, ..NetCmd::NOP };
//! let words = put.encode(5, 4); // position 5 of a 16-slot ring
//! assert_eq!(NetCmd::decode(&words, 5, 4), Slot::Ready(put));
//! assert_eq!(NetCmd::decode(&words, 21, 4), Slot::Empty); // the next lap's reader waits
//! ```
use bytemuck::{Pod, Zeroable};

/// Words of a slot.
pub const NET_SLOT_WORDS: usize = 4;
/// Bytes of a slot.
pub const NET_SLOT_BYTES: u64 = 8 * NET_SLOT_WORDS as u64;
/// Bits of a word below its tag.
const PAYLOAD_BITS: u32 = 56;
const PAYLOAD_MASK: u64 = (1 << PAYLOAD_BITS) - 1;
/// The largest `len` of one command (`u32`), `src_off` / `dst_off` (56 bits), `peer` (16
/// bits) and `sig_idx` (24 bits).
pub const NET_MAX_LEN: u64 = u32::MAX as u64;
/// See [`NET_MAX_LEN`].
pub const NET_MAX_OFFSET: u64 = PAYLOAD_MASK;
/// See [`NET_MAX_LEN`].
pub const NET_MAX_PEER: u32 = u16::MAX as u32;
/// See [`NET_MAX_LEN`].
pub const NET_MAX_SIG_IDX: u32 = (1 << 24) - 1;

/// What a command asks for. Ordering holds per (ring, peer) only: a signal becomes visible
/// at the peer after every earlier put of its ring to that peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NetOp {
    /// Nothing (a slot given up, e.g. by a warp that found nothing to send).
    Nop = 0,
    /// Copy `len` bytes from `src_off` of the local symmetric buffer to `dst_off` of the peer's.
    Put = 1,
    /// [`NetOp::Put`], then add `sig_add` to the peer's signal word `sig_idx`.
    PutSignal = 2,
    /// Add `sig_add` to the peer's signal word `sig_idx`.
    Signal = 3,
    /// Done when every earlier command of the ring is visible at its peer and its source may
    /// be reused; the proxy gives the slot back only then.
    Quiet = 4,
}

impl NetOp {
    fn from_bits(bits: u64) -> Option<NetOp> {
        Some(match bits {
            0 => NetOp::Nop,
            1 => NetOp::Put,
            2 => NetOp::PutSignal,
            3 => NetOp::Signal,
            4 => NetOp::Quiet,
            _ => return None,
        })
    }
}

/// One command, as a kernel writes it and the proxy reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetCmd {
    /// What to do.
    pub op: NetOp,
    /// Reserved (0).
    pub flags: u8,
    /// The destination rank (global).
    pub peer: u32,
    /// Bytes of a put.
    pub len: u64,
    /// Where a put's bytes start in the local symmetric buffer.
    pub src_off: u64,
    /// Where they go in the peer's.
    pub dst_off: u64,
    /// The peer's signal word (an index into its signal table: `u64` counters, one writer
    /// each, never reset).
    pub sig_idx: u32,
    /// What a signal adds.
    pub sig_add: i32,
}

/// What a reader finds at a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// No word of this lap yet.
    Empty,
    /// Some words of this lap, not all: still being written (read again).
    Partial,
    /// The whole command.
    Ready(NetCmd),
    /// All words of this lap, but not a command this version knows (a bad op code).
    Invalid,
}

/// The tag of ring position `pos` with `2^log2_slots` slots (never 0; changes each lap).
#[inline(always)]
pub const fn lap_tag(pos: u64, log2_slots: u32) -> u64 {
    ((pos >> log2_slots) & 0x7F) | 0x80
}

impl NetCmd {
    /// All zero but the op: a base for struct update syntax.
    pub const NOP: NetCmd =
        NetCmd { op: NetOp::Nop, flags: 0, peer: 0, len: 0, src_off: 0, dst_off: 0, sig_idx: 0, sig_add: 0 };

    /// Whether every field fits its bits (the limits `NET_MAX_*`).
    pub const fn fits(&self) -> bool {
        self.flags < 16
            && self.peer <= NET_MAX_PEER
            && self.len <= NET_MAX_LEN
            && self.src_off <= NET_MAX_OFFSET
            && self.dst_off <= NET_MAX_OFFSET
            && self.sig_idx <= NET_MAX_SIG_IDX
    }

    /// The four words of this command at ring position `pos` (fields past their limits are
    /// cut to their bits: check [`NetCmd::fits`] first).
    #[inline(always)]
    pub const fn encode(&self, pos: u64, log2_slots: u32) -> [u64; NET_SLOT_WORDS] {
        let tag = lap_tag(pos, log2_slots) << PAYLOAD_BITS;
        [
            tag | (self.op as u64) << 52
                | ((self.flags as u64) & 0xF) << 48
                | ((self.peer as u64) & 0xFFFF) << 32
                | (self.len & 0xFFFF_FFFF),
            tag | (self.src_off & PAYLOAD_MASK),
            tag | (self.dst_off & PAYLOAD_MASK),
            tag | ((self.sig_idx as u64) & 0xFF_FFFF) << 32 | self.sig_add as u32 as u64,
        ]
    }

    /// What `words`, read at ring position `pos`, hold.
    pub fn decode(words: &[u64; NET_SLOT_WORDS], pos: u64, log2_slots: u32) -> Slot {
        let tag = lap_tag(pos, log2_slots);
        let current = words.iter().filter(|w| *w >> PAYLOAD_BITS == tag).count();
        if current == 0 {
            return Slot::Empty;
        }
        if current < NET_SLOT_WORDS {
            return Slot::Partial;
        }
        let w0 = words[0];
        let Some(op) = NetOp::from_bits(w0 >> 52 & 0xF) else { return Slot::Invalid };
        Slot::Ready(NetCmd {
            op,
            flags: (w0 >> 48 & 0xF) as u8,
            peer: (w0 >> 32 & 0xFFFF) as u32,
            len: w0 & 0xFFFF_FFFF,
            src_off: words[1] & PAYLOAD_MASK,
            dst_off: words[2] & PAYLOAD_MASK,
            sig_idx: (words[3] >> 32 & 0xFF_FFFF) as u32,
            sig_add: words[3] as u32 as i32,
        })
    }
}

/// Where a command ring lives (a kernel parameter): slots and the consumer index in
/// host-mapped memory the proxy polls, the producers' claim counter and their cached copy
/// of the consumer index in device memory (so a producer reads host memory only when the
/// ring looks full).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NetRing {
    /// `2^log2_slots` slots of [`NET_SLOT_BYTES`] (host-mapped, device address).
    pub slots: u64,
    /// `u64`: positions the proxy has taken (host-mapped, device address).
    pub tail: u64,
    /// `u64`: positions claimed by producers (device memory).
    pub head: u64,
    /// `u64`: the producers' last read of `tail` (device memory).
    pub tail_cache: u64,
    /// log2 of the slot count.
    pub log2_slots: u32,
    /// Reserved (0).
    pub pad: u32,
}

/// Parameters of the command-ring self-test kernel (`net_selftest`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NetTestParams {
    /// The ring every warp pushes to.
    pub ring: NetRing,
    /// The [`crate::ErrorSlot`].
    pub error: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// Commands each warp pushes before its quiet.
    pub commands_per_warp: u32,
    /// Reserved (0).
    pub pad: u32,
}

/// Parameters of the put/signal exchange self-test (`net_exchange_selftest`): every rank
/// puts block `q` of its `data` to every peer `q`, signalling each, and copies what each peer
/// put to it into `out` once that peer's signal says it is there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NetExchangeParams {
    /// The rank's command ring.
    pub ring: NetRing,
    /// This rank's symmetric data buffer: `[2R, bytes]`, blocks `0..R` to send, `R..2R` where
    /// peers' blocks land (block `R + q` from rank `q`).
    pub data: u64,
    /// This rank's signal table (`u64` per source rank).
    pub signals: u64,
    /// `[R, bytes]`: what each peer sent, copied after its signal.
    pub out: u64,
    /// The [`crate::ErrorSlot`].
    pub error: u64,
    /// Wait bound, ns.
    pub timeout_ns: u64,
    /// The signal value that means "call `epoch`'s block is here" (signals are never reset).
    pub epoch: u64,
    /// Bytes per block (a multiple of 16).
    pub bytes: u32,
    /// This rank.
    pub rank: u32,
    /// Ranks.
    pub num_ranks: u32,
    /// Reserved (0).
    pub pad: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NetCmd {
        NetCmd {
            op: NetOp::PutSignal,
            flags: 0,
            peer: NET_MAX_PEER,
            len: NET_MAX_LEN,
            src_off: NET_MAX_OFFSET,
            dst_off: 12345 << 4,
            sig_idx: NET_MAX_SIG_IDX,
            sig_add: -7,
        }
    }

    #[test]
    fn commands_round_trip_at_every_lap_and_field_limit() {
        for log2 in [0, 4, 12] {
            for lap in 0..300u64 {
                let pos = (lap << log2) + (lap % (1 << log2));
                for cmd in [sample(), NetCmd::NOP, NetCmd { op: NetOp::Quiet, ..NetCmd::NOP }] {
                    assert!(cmd.fits());
                    let words = cmd.encode(pos, log2);
                    assert!(words.iter().all(|&w| w != 0), "a word is never zero");
                    assert_eq!(NetCmd::decode(&words, pos, log2), Slot::Ready(cmd), "lap {lap}");
                }
            }
        }
    }

    #[test]
    fn the_last_lap_reads_as_empty_and_a_mix_of_laps_as_partial() {
        let log2 = 3;
        let old = sample().encode(2, log2); // lap 0
        let new = NetCmd { op: NetOp::Signal, sig_idx: 1, sig_add: 1, ..NetCmd::NOP }.encode(10, log2); // lap 1
        assert_eq!(NetCmd::decode(&old, 10, log2), Slot::Empty);
        // Laps 0 and 128 share a tag only 128 laps apart: a producer is never that far ahead.
        assert_eq!(NetCmd::decode(&old, 2 + (128 << log2), log2), NetCmd::decode(&old, 2, log2));
        for torn in 1..15u32 {
            let mut words = old;
            for (i, w) in words.iter_mut().enumerate() {
                if torn >> i & 1 == 1 {
                    *w = new[i];
                }
            }
            assert_eq!(NetCmd::decode(&words, 10, log2), Slot::Partial, "words {torn:04b} written");
        }
        assert!(matches!(NetCmd::decode(&new, 10, log2), Slot::Ready(c) if c.op == NetOp::Signal));
    }

    #[test]
    fn unknown_ops_and_oversized_fields_are_told_apart() {
        let mut words = sample().encode(0, 2);
        words[0] |= 0xF << 52;
        assert_eq!(NetCmd::decode(&words, 0, 2), Slot::Invalid);
        assert!(!NetCmd { len: NET_MAX_LEN + 1, ..sample() }.fits());
        assert!(!NetCmd { src_off: NET_MAX_OFFSET + 1, ..sample() }.fits());
        assert!(!NetCmd { peer: NET_MAX_PEER + 1, ..sample() }.fits());
        assert!(!NetCmd { sig_idx: NET_MAX_SIG_IDX + 1, ..sample() }.fits());
        assert!(!NetCmd { flags: 16, ..sample() }.fits());
    }
}
