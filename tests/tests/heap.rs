//! `SymHeap` on the device of `MOE_EP_DEVICE`: every rank's blocks are writable by its
//! peers at `peer_base + offset`, and blocks come back only after their stream has passed
//! their drop.
use moe_ep::DeviceBuffer;
use moe_ep::group::Group;
use moe_ep::heap::{HEAP_ALIGN, SymHeap};
use moe_ep_tests::{Rng, devices, num_ranks, on_ranks};

#[test]
fn peers_write_blocks_at_the_same_offset() {
    let n = num_ranks(&devices(1)[0]).min(4);
    let groups = Group::in_process(&devices(n)).unwrap();
    let sizes: Vec<usize> =
        Rng::fresh("heap sizes").words(6).iter().map(|w| 16 + (*w as usize % 5000) / 16 * 16).collect();
    on_ranks(groups, |r, g| {
        let heap = SymHeap::new(&g, 1 << 16).unwrap();
        let s = g.stream();
        // The same allocations on every rank land at the same offsets.
        let blocks: Vec<DeviceBuffer> = sizes.iter().map(|&b| heap.alloc(s, b).expect("room")).collect();
        let offsets: Vec<u64> = blocks.iter().map(|b| heap.offset_of(b).unwrap()).collect();
        assert!(offsets.iter().all(|o| o % HEAP_ALIGN == 0));
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "first fit from 0: {offsets:?}");
        // Rank r fills block i of rank r + 1 with (r, i, word) tags.
        let dst = (r + 1) % n;
        for (i, (&bytes, &off)) in sizes.iter().zip(&offsets).enumerate() {
            let words: Vec<u32> = (0..bytes / 4).map(|j| (r as u32) << 24 | (i as u32) << 16 | j as u32).collect();
            // SAFETY: rank dst's block i (same size and offset as ours), written only here.
            let peer = unsafe { DeviceBuffer::borrowed(g.device(), heap.peer_base(dst).unwrap() + off, bytes) };
            peer.write(s, 0, &words).unwrap();
        }
        s.synchronize().unwrap();
        g.bootstrap().barrier().unwrap();
        let src = (r + n - 1) % n;
        for (i, b) in blocks.iter().enumerate() {
            let got: Vec<u32> = b.to_vec(s).unwrap();
            let want: Vec<u32> = (0..sizes[i] / 4).map(|j| (src as u32) << 24 | (i as u32) << 16 | j as u32).collect();
            assert_eq!(got, want, "rank {r} block {i} (from rank {src})");
        }
        g.bootstrap().barrier().unwrap(); // nobody writes our blocks any more
        // Dropped blocks come back once the stream has passed the drop.
        let used: u64 = sizes.iter().map(|&b| (b as u64).next_multiple_of(HEAP_ALIGN)).sum();
        assert_eq!(heap.free_bytes(), heap.capacity() - used);
        drop(blocks);
        s.synchronize().unwrap();
        let whole = heap.alloc(s, heap.capacity() as usize).expect("everything free again, merged");
        assert_eq!(heap.offset_of(&whole), Some(0));
        assert!(heap.alloc(s, 1).is_none(), "full: no block, no wait");
        drop(whole);
        assert!(SymHeap::new(&g, 0).is_err());
        g.bootstrap().barrier().unwrap(); // peers' mappings of our heap go before our heap
    });
}
