//! HT intranode dispatch/combine on the device against `reference::ht_dispatch` /
//! `ht_combine`, bit for bit, on fresh random inputs with poisoned outputs: uneven and
//! empty ranks, random -1 entries, exact-size and padded (`num_worst_tokens`) outputs,
//! bias and weights, many consecutive calls over the same rings. Ranks are threads here;
//! the per-rank checks (`moe_ep_tests::ht`) also run one rank per process
//! (`multiprocess_ep.rs`).
use moe_ep::Group;
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep_tests::ht::{self, Case, Routes};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks, upload};

/// 4 experts of hidden 64, top-`num_topk`, defaults otherwise.
fn small_config(num_topk: usize, heap_bytes: usize) -> HtConfig {
    HtConfig {
        num_experts: 4,
        hidden: 64,
        num_topk,
        num_scales: 0,
        num_channels: 0,
        warps_per_peer: 0,
        num_slots: 0,
        heap_bytes,
    }
}

fn run(case: Case) {
    let n = num_ranks(&device()).min(8);
    let calls = ht::prepare(&case, n, &mut Rng::fresh("intranode"));
    on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| {
        ht::check_rank(&case, &calls, &group);
    });
}

#[test]
fn ht_exact_size_many_calls() {
    let cpu = device().is_cpu();
    run(Case { calls: 4, ..Case::new(16, 64, 4, if cpu { 40 } else { 500 }) });
}

#[test]
fn ht_padded_outputs_without_bias() {
    let cpu = device().is_cpu();
    let max_tokens = if cpu { 30 } else { 300 };
    run(Case {
        num_worst_tokens: Some(8 * max_tokens + 3),
        with_bias: false,
        calls: 2,
        ..Case::new(8, 128, 2, max_tokens)
    });
}

#[test]
fn ht_tiny_rings_wrap_and_block_senders() {
    let cpu = device().is_cpu();
    // Two slots per receiving warp: senders wait for space all the time.
    run(Case { num_slots: 2 * 8, calls: 3, ..Case::new(16, 32, 3, if cpu { 120 } else { 2000 }) });
    // Several rings per block (channels of uneven length in one block), tiny as well.
    run(Case { num_slots: 2 * 8, warps_per_peer: 2, calls: 2, ..Case::new(16, 32, 3, if cpu { 61 } else { 2001 }) });
}

#[test]
fn ht_adversarial_routings() {
    let cpu = device().is_cpu();
    let n = if cpu { 40 } else { 400 };
    run(Case { routing: Routes::AllToExpertZero, calls: 2, ..Case::new(16, 64, 4, n) });
    run(Case { routing: Routes::SkipLastRank, calls: 2, ..Case::new(16, 64, 4, n) });
}

#[test]
fn ht_wide_topk_many_experts_deepseek_hidden() {
    let cpu = device().is_cpu();
    run(Case {
        calls: 2,
        ..Case::new(1024, if cpu { 2880 } else { 7168 }, if cpu { 32 } else { 8 }, if cpu { 6 } else { 256 })
    });
}

/// The one-pass path: outputs in the heap, senders store into them directly (exact-size,
/// padded, fp8-free bf16 rows with bias and cached dispatch), bit for bit as the rings.
#[test]
fn ht_one_pass_outputs_in_the_heap() {
    let cpu = device().is_cpu();
    let heap_bytes = if cpu { 8 << 20 } else { 256 << 20 };
    let n = num_ranks(&device()).min(8);
    let exact = Case { calls: 4, heap_bytes, ..Case::new(16, 2880, 4, if cpu { 40 } else { 500 }) };
    let max_tokens = if cpu { 30 } else { 300 };
    let padded = Case {
        num_worst_tokens: Some(8 * max_tokens + 3),
        with_bias: false,
        calls: 2,
        heap_bytes,
        ..Case::new(8, 128, 2, max_tokens)
    };
    for case in [exact, padded] {
        let calls = ht::prepare(&case, n, &mut Rng::fresh("intranode-one-pass"));
        let modes = on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ht::check_rank(&case, &calls, &group));
        assert!(modes.iter().flatten().all(|&d| d), "every call fits the heap, yet some took the ring: {modes:?}");
    }
}

/// Ranks whose outputs don't fit their heap take the ring while the others take direct
/// stores, in the same call: rank 0 receives every token (expert 0 only, at least 3 rows of
/// 2 KiB), the others nothing, so only their (256-byte) blocks fit a 4 KiB heap.
#[test]
fn ht_one_pass_and_ring_mixed_in_one_call() {
    let cpu = device().is_cpu();
    let n = num_ranks(&device()).min(8);
    let case = Case {
        routing: Routes::AllToExpertZero,
        calls: 3,
        heap_bytes: 4 << 10,
        ..Case::new(16, 1024, 4, if cpu { 60 } else { 400 })
    };
    let calls = ht::prepare(&case, n, &mut Rng::fresh("intranode-mixed"));
    let modes = on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ht::check_rank(&case, &calls, &group));
    assert!(modes[0].iter().all(|&d| !d), "rank 0's outputs can't fit 4 KiB: {modes:?}");
    assert!(modes[1..].iter().flatten().all(|&d| d), "empty outputs fit: {modes:?}");
}

/// Every model hidden size the issue names, one call each (and the largest supported).
/// Padded dispatch + combine into memory allocated up front, captured once (a CUDA graph on
/// a GPU, recorded launches on the CPU) and replayed with new token values: the epochs live
/// on the device, so identical parameters give fresh, correct results every replay — through
/// the rings, and with every output in the heap (one-pass dispatch, pulling combine).
#[test]
fn ht_graph_capture_and_replay() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let d = ht::prepare_graph(n, if dev.is_cpu() { 24 } else { 512 }, &mut Rng::fresh("intranode-graph"));
    let replays = if dev.is_cpu() { 4 } else { 100 };
    for in_heap in [false, true] {
        let one_pass = on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| {
            ht::check_graph_rank(&d, replays, in_heap, &group)
        });
        assert!(one_pass.iter().all(|&p| p == in_heap), "in_heap {in_heap}: one-pass {one_pass:?}");
    }
}

#[test]
fn ht_hidden_sizes_2880_to_16384() {
    let cpu = device().is_cpu();
    for hidden in [2880, 4096, 5120, 7168, 16384] {
        run(Case { calls: 1, ..Case::new(16, hidden, 4, if cpu { 6 } else { 64 }) });
    }
}

/// fp8 dispatch: `hidden` bytes per token plus `hidden / 128` f32 scales, moved untouched.
#[test]
fn ht_fp8_payload_with_scales() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let d = ht::prepare_fp8(n, if dev.is_cpu() { 30 } else { 400 }, &mut Rng::fresh("intranode-fp8"));
    on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ht::check_fp8_rank(&d, &group));
}

/// DeepEP's pressure check: the same inputs twenty times give identical output hashes,
/// equal to the hash of the reference's outputs.
#[test]
fn ht_twenty_reruns_give_identical_hashes() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let d = ht::prepare_reruns(n, if dev.is_cpu() { 20 } else { 1000 }, &mut Rng::fresh("intranode-reruns"));
    let hashes = on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ht::check_reruns_rank(&d, 20, &group));
    assert_eq!(hashes, d.want_hash);
}

#[test]
fn ht_bad_arguments_are_rejected_before_launch_and_the_buffer_stays_usable() {
    let groups = Group::in_process(&devices(2)).unwrap();
    on_ranks(groups, |rank, group| {
        let bad = |cfg: HtConfig| HtBuffer::new(&group, cfg).err().map(|e| e.to_string());
        let ok = small_config(2, 0);
        assert!(bad(HtConfig { num_experts: 5, ..ok }).unwrap().contains("num_experts"));
        assert!(bad(HtConfig { hidden: 60, ..ok }).unwrap().contains("hidden"));
        assert!(bad(HtConfig { hidden: 32768, ..ok }).unwrap().contains("hidden"));
        assert!(bad(HtConfig { num_topk: 33, ..ok }).unwrap().contains("num_topk"));
        assert!(bad(HtConfig { num_slots: 2, ..ok }).unwrap().contains("num_slots"));
        let mut buf = HtBuffer::new(&group, ok).unwrap();
        let t = 3;
        let idx: Vec<i64> = vec![0, 1, 2, 3, -1, 1];
        let topk = upload(&group, &idx);
        let weights = upload(&group, &[1.0f32; 6]);
        let x = upload(&group, &[7u16; 3 * 64]);
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, 2, 4).unwrap();
        let args = |hidden_bytes: usize, num_tokens: usize, k: usize| HtDispatchArgs {
            x: &x,
            hidden_bytes,
            num_tokens,
            x_scales: None,
            topk: Some((&topk, IndexType::I64, &weights, k)),
            layout: &layout,
            expert_alignment: 1,
            num_worst_tokens: None,
        };
        let mut err = |a: HtDispatchArgs| buf.dispatch(&group, &a).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(args(120, t, 2)).contains("hidden_bytes"), "not a multiple of 16");
        assert!(err(args(256, t, 2)).contains("hidden_bytes"), "wider than the buffer");
        assert!(err(args(128, 4, 2)).contains("x"), "more tokens than x holds");
        assert!(err(args(128, t, 3)).contains("top-3"), "top-k above the buffer's");
        // Still usable: a correct dispatch goes through.
        group.bootstrap().barrier().unwrap();
        let out = buf.dispatch(&group, &args(128, t, 2)).unwrap();
        group.stream().synchronize().unwrap();
        group.take_device_error("ht_dispatch").unwrap();
        // Experts 0-1 live on rank 0, 2-3 on rank 1: rank 0 gets tokens 0 and 2 of both ranks.
        assert_eq!(out.num_recv_tokens, Some(if rank == 0 { 4 } else { 2 }));
        group.bootstrap().barrier().unwrap(); // nobody frees its buffer while a peer may still use it
    });
}

/// A padded output too small for what arrives is refused with a typed error instead of a
/// write past its end.
#[test]
fn ht_num_worst_tokens_too_small_is_an_error_not_an_overflow() {
    let groups = Group::in_process(&devices(2)).unwrap();
    let results = on_ranks(groups, |_, mut group| {
        // Long enough that an emulated block starved by a loaded machine (CI: 2 cores, tests in
        // parallel; seen to stall 2 s) does not time out before the overflow is reported.
        group.set_timeout(std::time::Duration::from_secs(10)).unwrap();
        let cfg = small_config(1, 0);
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        // Three tokens per rank, all to expert 0 (rank 0): rank 0 receives 6 rows.
        let (topk, weights, x) =
            (upload(&group, &[0i64; 3]), upload(&group, &[1f32; 3]), upload(&group, &[1u16; 3 * 64]));
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, 3, 1, 4).unwrap();
        let args = HtDispatchArgs {
            x: &x,
            hidden_bytes: 128,
            num_tokens: 3,
            x_scales: None,
            topk: Some((&topk, IndexType::I64, &weights, 1)),
            layout: &layout,
            expert_alignment: 1,
            num_worst_tokens: Some(4),
        };
        group.bootstrap().barrier().unwrap();
        let out = buf.dispatch(&group, &args).unwrap();
        group.stream().synchronize().unwrap();
        let r = group.take_device_error("ht_dispatch");
        group.bootstrap().barrier().unwrap(); // nobody frees its buffer while a peer may still use it
        drop(out);
        r
    });
    match &results[0] {
        Err(moe_ep::Error::InvalidArgument { arg: "num_worst_tokens", reason }) => {
            assert!(reason.contains("6 rows arrive") && reason.contains("holds 4"), "{reason}")
        }
        other => panic!("rank 0: expected an overflow error, got {other:?}"),
    }
}

/// A rank that never joins a one-pass call: its peers' waits for its mailboxes end in typed
/// timeouts naming it and the wait site, not in a hang (cached dispatch: a sender waits for
/// the receiver's dispatch mailbox; combine: every rank waits for every combine mailbox).
#[test]
fn ht_one_pass_missing_peer_is_a_timeout() {
    use moe_ep::Error;
    use moe_ep::kernels::intranode::{SITE_COMBINE_MAILBOX, SITE_DISPATCH_DIRECT, SITE_DISPATCH_MAILBOX};
    let groups = Group::in_process(&devices(2)).unwrap();
    on_ranks(groups, |rank, mut group| {
        let cfg = small_config(2, 1 << 20);
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        // Every token to experts 0 and 2: one on each rank.
        let (t, k) = (3, 2);
        let topk = upload(&group, &[0i64, 2, 0, 2, 0, 2]);
        let (weights, x) = (upload(&group, &[0.5f32; 6]), upload(&group, &[3u16; 3 * 64]));
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, 4).unwrap();
        let args = HtDispatchArgs {
            x: &x,
            hidden_bytes: 128,
            num_tokens: t,
            x_scales: None,
            topk: Some((&topk, IndexType::I64, &weights, k)),
            layout: &layout,
            expert_alignment: 1,
            num_worst_tokens: None,
        };
        group.bootstrap().barrier().unwrap();
        let out = buf.dispatch(&group, &args).unwrap();
        group.stream().synchronize().unwrap();
        group.take_device_error("ht_dispatch").unwrap();
        assert!(out.one_pass);
        group.bootstrap().barrier().unwrap();
        if rank == 0 {
            // Long enough that a starved emulated block of rank 0 itself (CI: 2 cores, tests in
            // parallel; seen to stall 2 s) does not time out first on its own mailbox. The two
            // waits for rank 1 below take this long each.
            group.set_timeout(std::time::Duration::from_secs(10)).unwrap();
            let recv = buf.alloc_output(&group, 6 * 128).unwrap();
            buf.dispatch_cached_into(&group, &out.handle, &x, 128, None, &recv, None).unwrap();
            group.stream().synchronize().unwrap();
            match group.take_device_error("ht_dispatch (cached)") {
                // Its senders wait for rank 1's mailbox, its receivers for rank 1's stores:
                // whichever gives up first is reported.
                Err(Error::Timeout { rank: 0, peer: 1, site, .. }) => {
                    assert!([SITE_DISPATCH_MAILBOX, SITE_DISPATCH_DIRECT].contains(&site), "site {site}")
                }
                other => panic!("expected a timeout waiting for rank 1, got {other:?}"),
            }
            let _ = buf.combine(&group, &out.handle, &out.recv_x, 64, None, [None, None]).unwrap();
            group.stream().synchronize().unwrap();
            match group.take_device_error("ht_combine") {
                Err(Error::Timeout { rank: 0, peer: 1, site, .. }) => assert_eq!(site, SITE_COMBINE_MAILBOX),
                other => panic!("expected a timeout waiting for rank 1's combine mailbox, got {other:?}"),
            }
        }
        // Rank 1 keeps its buffer (mapped by rank 0) until rank 0 is done.
        group.bootstrap().barrier().unwrap();
    });
}

/// NCCL EP's HT `EXPERT_MAJOR` layout over a padded FLAT dispatch with aligned counts: the
/// zones, slot weights and padding, and the way back (rows and weights), bit for bit against
/// the reference; too few slots is a typed error.
#[test]
fn ht_expert_major_permute_and_reduce_match_the_reference() {
    use moe_ep::expert_major::{ExpertMajorIo, zone_counts};
    use moe_ep::reference::{self, Routing};
    let dev = device();
    let n = num_ranks(&dev).min(4);
    let (e, h, k, m, align) = (8usize, 64usize, 3usize, if dev.is_cpu() { 12 } else { 256 }, 4usize);
    let case = Case { calls: 1, ..Case::new(e, h, k, m) };
    let mut rng = Rng::fresh("intranode-expert-major");
    let idx = ht::routing(&mut rng, n, &case, 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 9e9).collect()).collect();
    let rows = n * m; // flat rows
    let slots = rows * 2 + e * align; // room for duplicates and padding
    let want =
        reference::ht_dispatch(&Routing::new(n, e, k, idx.clone()).unwrap(), &x, &w, h, align, Some(rows)).unwrap();
    let ems: Vec<_> = want.ranks.iter().map(|r| reference::ht_expert_major(r, k, h, slots).unwrap()).collect();
    let y: Vec<Vec<u16>> = (0..n).map(|_| rng.bf16(slots * h, 8.0)).collect();
    let yw: Vec<Vec<f32>> = (0..n).map(|_| (0..slots).map(|i| i as f32 * 0.5).collect()).collect();
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let cfg = HtConfig { num_experts: e, hidden: h, num_topk: k, ..small_config(k, 0) };
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        let (t, s) = (tokens[rank], group.stream());
        let (topk, weights, xb) = (upload(&group, &idx[rank]), upload(&group, &w[rank]), upload(&group, &x[rank]));
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, e).unwrap();
        let args = HtDispatchArgs {
            x: &xb,
            hidden_bytes: 2 * h,
            num_tokens: t,
            x_scales: None,
            topk: Some((&topk, IndexType::I64, &weights, k)),
            layout: &layout,
            expert_alignment: align,
            num_worst_tokens: Some(rows),
        };
        group.bootstrap().barrier().unwrap();
        let out = buf.dispatch(&group, &args).unwrap();
        let (em_x, em_w, slot_map) =
            (s.alloc(slots * 2 * h).unwrap(), s.alloc(4 * slots).unwrap(), s.alloc(4 * rows * k).unwrap());
        em_x.fill_async(s, 0xee).unwrap();
        em_w.fill_async(s, 0xee).unwrap();
        let io = |slots: usize| ExpertMajorIo {
            flat_x: &out.recv_x,
            flat_topk_idx: &out.recv_topk_idx,
            flat_topk_weights: Some(&out.recv_topk_weights),
            num_rows: &out.handle.num_recv_tokens,
            expert_counts: &out.num_recv_tokens_per_expert,
            em_x: &em_x,
            em_weights: Some(&em_w),
            slot_map: &slot_map,
            row_bytes: 2 * h,
            max_rows: rows,
            num_slots: slots,
            num_topk: k,
            num_local_experts: e / n,
            drop_overflow: false,
        };
        io(slots).permute(&group).unwrap();
        let l = e / n;
        let (counts, offsets, total) = (s.alloc(8 * l).unwrap(), s.alloc(4 * l).unwrap(), s.alloc(8).unwrap());
        zone_counts(&group, &out.num_recv_tokens_per_expert, l, [Some(&counts), None, Some(&total)], true, None)
            .unwrap();
        zone_counts(&group, &out.num_recv_tokens_per_expert, l, [None, Some(&offsets), None], false, None).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("expert-major permute").unwrap();
        let want_em = &ems[rank];
        let used: usize = want_em.counts.iter().map(|&c| c as usize).sum();
        let ctx = format!("rank {rank}");
        assert_eq!(
            counts.to_vec::<i64>(s).unwrap(),
            want_em.counts.iter().map(|&c| c as i64).collect::<Vec<_>>(),
            "{ctx}: i64 counts"
        );
        assert_eq!(offsets.to_vec::<i32>(s).unwrap(), want_em.offsets, "{ctx}: offsets");
        assert_eq!(total.to_vec::<i64>(s).unwrap(), vec![used as i64], "{ctx}: total");
        assert!(em_x.to_vec::<u16>(s).unwrap()[..used * h] == want_em.x[..used * h], "{ctx}: zones");
        assert_eq!(em_w.to_vec::<f32>(s).unwrap()[..used], want_em.weights[..used], "{ctx}: slot weights");

        // The way back: fresh expert outputs per slot and slot weights.
        let (yb, ywb) = (upload(&group, &y[rank]), upload(&group, &yw[rank]));
        let (flat, flat_w) = (s.alloc(rows * 2 * h).unwrap(), s.alloc(4 * rows * k).unwrap());
        flat.fill_async(s, 0xee).unwrap();
        let back = ExpertMajorIo {
            flat_x: &flat,
            flat_topk_weights: Some(&flat_w),
            em_x: &yb,
            em_weights: Some(&ywb),
            ..io(slots)
        };
        back.reduce(&group).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("expert-major reduce").unwrap();
        let (want_x, want_w) = reference::ht_expert_major_reduce(want_em, &y[rank], Some(&yw[rank]), k, h);
        let nr = want.ranks[rank].num_recv_tokens;
        assert!(flat.to_vec::<u16>(s).unwrap()[..nr * h] == want_x[..nr * h], "{ctx}: reduced rows");
        assert_eq!(flat_w.to_vec::<f32>(s).unwrap()[..nr * k], want_w.unwrap()[..nr * k], "{ctx}: reduced weights");

        // Too few slots: a typed error naming both counts.
        if used > 0 {
            io(used - 1).permute(&group).unwrap();
            s.synchronize().unwrap();
            match group.take_device_error("expert-major permute") {
                Err(moe_ep::Error::InvalidArgument { reason, .. }) => {
                    assert!(reason.contains(&format!("{used} rows arrive")), "{ctx}: {reason}")
                }
                other => panic!("{ctx}: expected an overflow error, got {other:?}"),
            }
        }

        // The DROP policy: zones cut at fewer slots than they need (mid-zone), no error.
        let cut = used * 2 / 3;
        let want_cut = reference::ht_expert_major_dropping(&want.ranks[rank], k, h, cut).unwrap();
        em_x.fill_async(s, 0xee).unwrap();
        em_w.fill_async(s, 0xee).unwrap();
        let dropping = ExpertMajorIo { drop_overflow: true, ..io(cut) };
        dropping.permute(&group).unwrap();
        let per_expert = &out.num_recv_tokens_per_expert;
        zone_counts(&group, per_expert, l, [Some(&counts), Some(&offsets), None], false, Some(cut)).unwrap();
        zone_counts(&group, per_expert, l, [None, None, Some(&total)], true, Some(cut)).unwrap();
        let back = ExpertMajorIo {
            flat_x: &flat,
            flat_topk_weights: Some(&flat_w),
            em_x: &yb,
            em_weights: Some(&ywb),
            ..dropping
        };
        flat.fill_async(s, 0xee).unwrap();
        back.reduce(&group).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("expert-major permute, dropping").unwrap();
        assert_eq!(counts.to_vec::<i32>(s).unwrap()[..l], want_cut.counts[..], "{ctx}: cut counts");
        assert_eq!(offsets.to_vec::<i32>(s).unwrap(), want_cut.offsets, "{ctx}: cut offsets");
        assert_eq!(total.to_vec::<i64>(s).unwrap(), vec![used as i64], "{ctx}: the uncut total");
        assert!(em_x.to_vec::<u16>(s).unwrap()[..cut * h] == want_cut.x[..], "{ctx}: cut zones");
        assert_eq!(em_w.to_vec::<f32>(s).unwrap()[..cut], want_cut.weights[..], "{ctx}: cut slot weights");
        let (want_x, want_w) = reference::ht_expert_major_reduce(&want_cut, &y[rank], Some(&yw[rank]), k, h);
        assert!(flat.to_vec::<u16>(s).unwrap()[..nr * h] == want_x[..nr * h], "{ctx}: reduced rows, dropping");
        assert_eq!(flat_w.to_vec::<f32>(s).unwrap()[..nr * k], want_w.unwrap()[..nr * k], "{ctx}: weights, dropping");
        group.bootstrap().barrier().unwrap();
    });
}
