//! Memory every peer can write: a first-fit heap inside a symmetric buffer.
//!
//! The one-pass HT path (docs/design.md) has senders store rows straight into the
//! receiver's outputs, so outputs must live where every peer already has a mapping. A
//! [`SymHeap`] is one symmetric buffer, mapped into every rank once when it is made; its
//! blocks are [`DeviceBuffer`]s at the same offset in every rank's mapping, so a peer
//! addresses rank `r`'s block as `peer_base(r) + offset` — the offset is all that needs
//! telling.
//!
//! Blocks come back in stream order: dropping one records an event on the stream it was
//! allocated for, and the block is handed out again only once that event has completed.
//! [`SymHeap::alloc`] never waits: when nothing large enough is free it returns `None`, and
//! the caller takes its other path (the ring).
//!
//! ```
//! use moe_ep::{Device, group::Group, heap::SymHeap};
//! # fn main() -> moe_ep::Result<()> {
//! let group = Group::in_process(&[Device::cpu()])?.remove(0); // one rank
//! let heap = SymHeap::new(&group, 1 << 20)?;
//! let a = heap.alloc(group.stream(), 1000).expect("room");
//! assert_eq!(heap.offset_of(&a), Some(0));
//! assert!(heap.contains(&a) && !heap.contains(&group.stream().alloc(16)?));
//! let b = heap.alloc(group.stream(), 1000).expect("room");
//! assert_eq!(heap.offset_of(&b), Some(1024)); // 256-byte aligned
//! drop(a); // free again once the stream has passed this point (at once on the CPU)
//! assert_eq!(heap.offset_of(&heap.alloc(group.stream(), 10).unwrap()), Some(0));
//! # Ok(())
//! # }
//! ```
use crate::device::{DeviceBuffer, Event, Stream, StreamHandle};
use crate::group::{Group, Sharing, SymmetricBuffer};
use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// The longest [`SymHeap::alloc_waiting`] waits for a block to come back.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Block sizes and offsets are multiples of this (the CUDA allocator's own alignment, so
/// vector loads and TMA work on any block).
pub const HEAP_ALIGN: u64 = 256;

/// A first-fit heap in a symmetric buffer (module docs). Collective to make; cheap to share.
#[derive(Clone)]
pub struct SymHeap {
    inner: Arc<Inner>,
}

struct Inner {
    /// Outlives every block: a block holds this `Inner`.
    sym: SymmetricBuffer,
    blocks: Mutex<FreeList<Option<Event>>>,
}

impl SymHeap {
    /// Collective: every rank of `group` makes its heap of `bytes` (rounded up to
    /// [`HEAP_ALIGN`]) in one symmetric allocation.
    pub fn new(group: &Group, bytes: usize) -> Result<SymHeap> {
        if bytes == 0 {
            return Err(Error::invalid("bytes", "a heap needs at least one byte"));
        }
        let capacity = (bytes as u64).next_multiple_of(HEAP_ALIGN);
        Ok(SymHeap::in_buffer(group.alloc_symmetric(capacity as usize, Sharing::Auto)?))
    }

    /// A heap over all of `sym` (e.g. a [`SymmetricBuffer::slice`] of a buffer made up
    /// front); not collective. Make it alike on every rank.
    pub fn in_buffer(sym: SymmetricBuffer) -> SymHeap {
        let capacity = (sym.len() as u64) / HEAP_ALIGN * HEAP_ALIGN;
        SymHeap { inner: Arc::new(Inner { sym, blocks: Mutex::new(FreeList::new(capacity)) }) }
    }

    /// A block of `bytes` for work on `stream` (its contents are whatever was there), or
    /// `None` when no free block is large enough yet. Never waits.
    pub fn alloc(&self, stream: &Stream, bytes: usize) -> Option<DeviceBuffer> {
        self.alloc_inner(stream, bytes, false)
    }

    /// Like [`SymHeap::alloc`], but when blocks given back are still in use by their stream,
    /// waits (on the host) for them, oldest first, until one fits. `None` only when the
    /// blocks still held by their owners leave no room. A host that runs ahead of the GPU
    /// (a loop of asynchronous calls) is thus held to the GPU's pace instead of the calls
    /// taking a slower path.
    pub fn alloc_waiting(&self, stream: &Stream, bytes: usize) -> Option<DeviceBuffer> {
        self.alloc_inner(stream, bytes, true)
    }

    fn alloc_inner(&self, stream: &Stream, bytes: usize, wait: bool) -> Option<DeviceBuffer> {
        let size = (bytes.max(1) as u64).next_multiple_of(HEAP_ALIGN);
        let offset = {
            let mut blocks = self.inner.blocks.lock().ok()?;
            loop {
                blocks.reclaim(|done| done.as_ref().is_none_or(|e| e.is_complete().unwrap_or(false)));
                if let Some(offset) = blocks.take(size) {
                    break offset;
                }
                // The oldest block given back: waiting for it can't deadlock, as its event
                // follows only work that every rank has queued already.
                match blocks.pending.first().map(|p| &p.2) {
                    // Polled, not cuEventSynchronize: ranks that are threads of one process
                    // must keep launching meanwhile (the event may wait for their kernels).
                    Some(Some(event)) if wait => {
                        let start = std::time::Instant::now();
                        while !event.is_complete().ok()? {
                            if start.elapsed() > WAIT_LIMIT {
                                return None; // the caller takes its other path
                            }
                            std::thread::sleep(std::time::Duration::from_micros(20));
                        }
                    }
                    _ => return None,
                }
            }
        };
        let (inner, source) = (self.inner.clone(), stream.event_source());
        let give_back = Box::new(move || inner.give_back(offset, size, &source));
        let local = self.inner.sym.local();
        // SAFETY: [offset, offset + size) lies in the heap's buffer, which `give_back` keeps
        // alive; the free list hands it to nobody else until it is given back.
        Some(unsafe { DeviceBuffer::lent(local.device(), local.ptr() + offset, bytes, give_back) })
    }

    /// Where `block` (one of this heap's) starts, from the heap's base on every rank.
    pub fn offset_of(&self, block: &DeviceBuffer) -> Option<u64> {
        let base = self.inner.sym.local().ptr();
        let end = base + self.capacity();
        (block.ptr() >= base && block.ptr() < end).then(|| block.ptr() - base)
    }

    /// Whether all of `buf` lies in this heap (so peers can address it).
    pub fn contains(&self, buf: &DeviceBuffer) -> bool {
        self.offset_of(buf).is_some_and(|o| o + buf.len() as u64 <= self.capacity())
    }

    /// The device table of every rank's heap base (what kernels add offsets to).
    pub fn peer_table_ptr(&self) -> u64 {
        self.inner.sym.peer_table_ptr()
    }

    /// Rank `r`'s heap base as this rank addresses it.
    pub fn peer_base(&self, r: usize) -> Option<u64> {
        self.inner.sym.peer_ptr(r)
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.sym.len() as u64
    }

    /// No block of it is held (every one handed out was dropped), and no other clone of it.
    pub fn is_idle(&self) -> bool {
        Arc::strong_count(&self.inner) == 1
    }

    /// Bytes in free blocks, not counting blocks whose stream has not passed their drop yet.
    pub fn free_bytes(&self) -> u64 {
        self.inner.blocks.lock().map(|b| b.free_bytes()).unwrap_or(0)
    }
}

impl Inner {
    /// A dropped block: free once `stream` has done what was queued so far. If no event
    /// can be recorded the block is never reused (a leak, not a race).
    fn give_back(&self, offset: u64, size: u64, stream: &StreamHandle) {
        let Ok(done) = stream.record_event() else { return };
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.put_back(offset, size, Some(done));
        }
    }
}

/// First-fit free list over `[0, capacity)`; blocks given back wait in `pending` (oldest
/// first) until their `D` says they are done. Kept free of device types so it can be tested alone.
struct FreeList<D> {
    capacity: u64,
    /// Sorted by offset, coalesced.
    free: Vec<(u64, u64)>,
    pending: Vec<(u64, u64, D)>,
}

impl<D> FreeList<D> {
    fn new(capacity: u64) -> Self {
        FreeList { capacity, free: vec![(0, capacity)], pending: Vec::new() }
    }

    /// The lowest offset of a free run of `size` bytes, now taken.
    fn take(&mut self, size: u64) -> Option<u64> {
        let i = self.free.iter().position(|&(_, len)| len >= size)?;
        let (offset, len) = self.free[i];
        if len == size {
            self.free.remove(i);
        } else {
            self.free[i] = (offset + size, len - size);
        }
        Some(offset)
    }

    fn put_back(&mut self, offset: u64, size: u64, done: D) {
        debug_assert!(offset + size <= self.capacity);
        self.pending.push((offset, size, done));
    }

    /// Moves the pending blocks that `is_done` accepts to the free list.
    fn reclaim(&mut self, is_done: impl Fn(&D) -> bool) {
        let mut i = 0;
        while i < self.pending.len() {
            if is_done(&self.pending[i].2) {
                let (offset, size, _) = self.pending.remove(i); // keeps the oldest first
                self.insert_free(offset, size);
            } else {
                i += 1;
            }
        }
    }

    fn insert_free(&mut self, offset: u64, size: u64) {
        let i = self.free.partition_point(|&(o, _)| o < offset);
        self.free.insert(i, (offset, size));
        // Merge with the next run, then with the previous one.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    fn free_bytes(&self) -> u64 {
        self.free.iter().map(|&(_, len)| len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn first_fit_coalesces_and_waits_for_done() {
        let mut f = FreeList::<Rc<Cell<bool>>>::new(1000);
        let (a, b, c) = (f.take(100).unwrap(), f.take(200).unwrap(), f.take(300).unwrap());
        assert_eq!((a, b, c), (0, 100, 300));
        assert_eq!(f.take(401), None, "only 400 bytes left");
        let done_b = Rc::new(Cell::new(false));
        f.put_back(b, 200, done_b.clone());
        f.reclaim(|d| d.get());
        assert_eq!(f.take(150), Some(600), "b's stream has not passed its drop: not reused yet");
        done_b.set(true);
        f.reclaim(|d| d.get());
        assert_eq!(f.take(150), Some(100), "first fit: b's run, lowest offset");
        f.put_back(100, 150, Rc::new(Cell::new(true)));
        f.put_back(a, 100, Rc::new(Cell::new(true)));
        f.put_back(c, 300, Rc::new(Cell::new(true)));
        f.put_back(600, 150, Rc::new(Cell::new(true)));
        f.reclaim(|d| d.get());
        assert_eq!(f.free, vec![(0, 1000)], "every run merged back into one");
        assert_eq!(f.free_bytes(), 1000);
        assert_eq!(f.take(1000), Some(0));
    }

    #[test]
    fn random_alloc_free_never_overlaps() {
        let mut f = FreeList::<()>::new(1 << 16);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut x = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) {
                let size = 1 + x % 3000;
                if let Some(o) = f.take(size) {
                    assert!(o + size <= 1 << 16);
                    assert!(live.iter().all(|&(lo, len)| o + size <= lo || lo + len <= o), "overlap at {o}");
                    live.push((o, size));
                }
            } else if !live.is_empty() {
                let (o, size) = live.swap_remove((x / 3) as usize % live.len());
                f.put_back(o, size, ());
                f.reclaim(|_| true);
            }
            let used: u64 = live.iter().map(|&(_, len)| len).sum();
            assert_eq!(f.free_bytes() + used, 1 << 16);
        }
    }
}
