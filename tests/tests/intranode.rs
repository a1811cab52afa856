//! HT intranode dispatch/combine on the device against `reference::ht_dispatch` /
//! `ht_combine`, bit for bit, on fresh random inputs with poisoned outputs: uneven and
//! empty ranks, random -1 entries, exact-size and padded (`num_worst_tokens`) outputs,
//! bias and weights, many consecutive calls over the same rings.
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep::reference::{self, Routing, f32_to_bf16};
use moe_ep::{DeviceBuffer, Group};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks};

struct Case {
    num_experts: usize,
    hidden: usize,
    num_topk: usize,
    max_tokens: usize,
    num_worst_tokens: Option<usize>,
    with_bias: bool,
    calls: usize,
    /// Ring slots (0 = the default); small values force wrap-around and waiting senders.
    num_slots: usize,
    /// Warps per peer in a block (0 = the default).
    warps_per_peer: usize,
    routing: Routes,
}

#[derive(Clone, Copy, PartialEq)]
enum Routes {
    /// Distinct random experts per token, about one entry in 8 dropped (-1).
    Random,
    /// Every token to expert 0 only (one rank receives everything).
    AllToExpertZero,
    /// Random, but never an expert of the last rank (it receives nothing).
    SkipLastRank,
}

impl Case {
    fn new(num_experts: usize, hidden: usize, num_topk: usize, max_tokens: usize) -> Case {
        Case {
            num_experts,
            hidden,
            num_topk,
            max_tokens,
            num_worst_tokens: None,
            with_bias: true,
            calls: 3,
            num_slots: 0,
            warps_per_peer: 0,
            routing: Routes::Random,
        }
    }
}

/// Random bf16 bits of moderate values (no NaN/inf), so sums stay finite.
fn bf16_row(rng: &mut Rng, n: usize) -> Vec<u16> {
    (0..n).map(|_| f32_to_bf16((rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 8.0)).collect()
}

fn routing(rng: &mut Rng, num_ranks: usize, case: &Case, call: usize) -> Vec<Vec<i64>> {
    (0..num_ranks)
        .map(|r| {
            // Uneven counts that change between calls; rank 1 is empty on even calls.
            let t = if r == 1 && call.is_multiple_of(2) { 0 } else { 1 + rng.below(case.max_tokens as u64) as usize };
            let usable = match case.routing {
                Routes::SkipLastRank => case.num_experts - case.num_experts / num_ranks,
                _ => case.num_experts,
            };
            let mut idx = Vec::new();
            for _ in 0..t {
                let mut row: Vec<i64> = Vec::new();
                if case.routing == Routes::AllToExpertZero {
                    row.push(0);
                    row.resize(case.num_topk, -1);
                }
                while row.len() < case.num_topk {
                    let e = rng.below(usable as u64) as i64;
                    if !row.contains(&e) {
                        row.push(e);
                    }
                }
                if case.routing != Routes::AllToExpertZero {
                    for e in row.iter_mut() {
                        if rng.below(8) == 0 {
                            *e = -1;
                        }
                    }
                }
                idx.extend(row);
            }
            idx
        })
        .collect()
}

fn upload<T: bytemuck::Pod>(group: &Group, data: &[T]) -> DeviceBuffer {
    let b = group.stream().alloc((std::mem::size_of_val(data)).max(16)).unwrap();
    b.write(group.stream(), 0, data).unwrap();
    b
}

fn run(case: Case) {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    let mut rng = Rng::fresh("intranode");
    // Every call's inputs and reference outputs, computed up front for all ranks.
    let mut calls = Vec::new();
    for call in 0..case.calls {
        let idx = routing(&mut rng, n, &case, call);
        let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
        let x: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let w: Vec<Vec<f32>> =
            tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect()).collect();
        let r = Routing::new(n, e, k, idx.clone()).unwrap();
        let want = reference::ht_dispatch(&r, &x, &w, h, 1, case.num_worst_tokens).unwrap();
        // Expert outputs: fresh bf16 rows per received row, plus bias per source token.
        let rows: Vec<usize> = want.ranks.iter().map(|rv| rv.recv_src_idx.len()).collect();
        let y: Vec<Vec<u16>> = rows.iter().map(|&m| bf16_row(&mut rng, m * h)).collect();
        let b0: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let b1: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let bias = if case.with_bias { [Some(&b0[..]), Some(&b1[..])] } else { [None, None] };
        let combined = reference::ht_combine(
            &want.handle,
            &y,
            Some(&want.ranks.iter().map(|rv| rv.recv_topk_weights.clone()).collect::<Vec<_>>()),
            bias,
            h,
        )
        .unwrap();
        calls.push((idx, tokens, x, w, want, y, b0, b1, combined));
    }
    let groups = Group::in_process(&devices(n)).unwrap();
    let cfg = HtConfig {
        num_experts: e,
        hidden: h,
        num_topk: k,
        num_scales: 0,
        num_channels: 0,
        warps_per_peer: case.warps_per_peer,
        num_slots: case.num_slots,
    };
    on_ranks(groups, |rank, group| {
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        let s = group.stream();
        for (call, (idx, tokens, x, w, want, y, b0, b1, combined)) in calls.iter().enumerate() {
            let t = tokens[rank];
            let topk = upload(&group, &idx[rank]);
            let weights = upload(&group, &w[rank]);
            let xb = upload(&group, &x[rank]);
            let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, e).unwrap();
            let args = HtDispatchArgs {
                x: &xb,
                hidden_bytes: 2 * h,
                num_tokens: t,
                x_scales: None,
                topk: Some((&topk, IndexType::I64, &weights, k)),
                layout: &layout,
                expert_alignment: 1,
                num_worst_tokens: case.num_worst_tokens,
            };
            // Ranks share one GPU here: uploads from pageable memory may wait for the device, so
            // no rank starts the collective while another is still uploading.
            group.bootstrap().barrier().unwrap();
            let started = std::time::Instant::now();
            let out = buf.dispatch(&group, &args).unwrap();
            let host_call = started.elapsed(); // a long one: the host was stalled in the driver
            s.synchronize().unwrap();
            group
                .take_device_error("ht_dispatch")
                .unwrap_or_else(|e| panic!("rank {rank} call {call}: {e:?} (dispatch() returned after {host_call:?})"));
            let rv = &want.ranks[rank];
            let got_n = rv.num_recv_tokens;
            let ctx = format!("rank {rank} call {call}");
            if case.num_worst_tokens.is_none() {
                assert_eq!(out.num_recv_tokens, Some(got_n), "{ctx}");
                assert_eq!(out.num_recv_tokens_per_expert_list.as_ref(), Some(&rv.num_recv_tokens_per_expert), "{ctx}");
            }
            assert_eq!(
                out.num_recv_tokens_per_expert.to_vec::<i32>(s).unwrap(),
                rv.num_recv_tokens_per_expert,
                "{ctx}"
            );
            let rows = out.handle.num_rows;
            assert_eq!(rows, rv.recv_src_idx.len(), "{ctx}");
            let recv_x: Vec<u16> = out.recv_x.to_vec(s).unwrap();
            assert!(recv_x[..got_n * h] == rv.recv_x[..got_n * h], "{ctx}: recv_x");
            assert_eq!(
                &out.recv_src_idx.to_vec::<i32>(s).unwrap()[..rows],
                &rv.recv_src_idx[..],
                "{ctx}: recv_src_idx"
            );
            assert_eq!(
                &out.recv_topk_idx.to_vec::<i64>(s).unwrap()[..rows * k],
                &rv.recv_topk_idx[..],
                "{ctx}: recv_topk_idx"
            );
            let got_w: Vec<f32> = out.recv_topk_weights.to_vec(s).unwrap();
            assert!(
                got_w[..rows * k].iter().zip(&rv.recv_topk_weights).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ctx}: weights"
            );
            let rpm: Vec<i32> = out.handle.rank_prefix_matrix.to_vec(s).unwrap();
            assert_eq!(rpm, want.handle.rank_prefix_matrix(), "{ctx}: rank_prefix_matrix");

            // Combine the fresh expert outputs back (with the received weights, and bias).
            let yb = upload(&group, &y[rank]);
            let (bb0, bb1) = (upload(&group, &b0[rank]), upload(&group, &b1[rank]));
            let bias = if case.with_bias { [Some(&bb0), Some(&bb1)] } else { [None, None] };
            group.bootstrap().barrier().unwrap();
            let c = buf.combine(&group, &out.handle, &yb, h, Some((&out.recv_topk_weights, k)), bias).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ht_combine").unwrap();
            let cx: Vec<u16> = c.combined_x.to_vec(s).unwrap();
            assert!(cx[..t * h] == combined[rank].combined_x[..], "{ctx}: combined_x");
            let cw: Vec<f32> = c.combined_topk_weights.unwrap().to_vec(s).unwrap();
            let want_w = combined[rank].combined_topk_weights.as_ref().unwrap();
            assert!(cw[..t * k].iter().zip(want_w).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}: combined weights");

            // Cached dispatch with the same handle (the backward of a combine): same rows.
            group.bootstrap().barrier().unwrap();
            let (again, _) = buf.dispatch_cached(&group, &out.handle, &xb, 2 * h, None).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ht_dispatch (cached)").unwrap();
            let again: Vec<u16> = again.to_vec(s).unwrap();
            assert!(again[..got_n * h] == rv.recv_x[..got_n * h], "{ctx}: cached dispatch recv_x");
        }
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

/// Every model hidden size the issue names, one call each (and the largest supported).
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
    let (h, k, e) = (256usize, 4usize, 16usize);
    let num_scales = h / 128;
    let max_tokens = if dev.is_cpu() { 30 } else { 400 };
    let mut rng = Rng::fresh("intranode-fp8");
    let idx = routing(&mut rng, n, &Case::new(e, h, k, max_tokens), 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u8>> = tokens.iter().map(|&t| (0..t * h).map(|_| rng.next_u32() as u8).collect()).collect();
    let scales: Vec<Vec<f32>> =
        tokens.iter().map(|&t| (0..t * num_scales).map(|_| rng.next_u32() as f32).collect()).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| vec![0.5; t * k]).collect();
    let r = Routing::new(n, e, k, idx.clone()).unwrap();
    let want = reference::ht_dispatch(&r, &x, &w, h, 1, None).unwrap();
    let groups = Group::in_process(&devices(n)).unwrap();
    let cfg = HtConfig {
        num_experts: e,
        hidden: h,
        num_topk: k,
        num_scales,
        num_channels: 0,
        warps_per_peer: 0,
        num_slots: 0,
    };
    on_ranks(groups, |rank, group| {
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        let s = group.stream();
        let t = tokens[rank];
        let (topk, weights) = (upload(&group, &idx[rank]), upload(&group, &w[rank]));
        let (xb, sb) = (upload(&group, &x[rank]), upload(&group, &scales[rank]));
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, e).unwrap();
        let args = HtDispatchArgs {
            x: &xb,
            hidden_bytes: h,
            num_tokens: t,
            x_scales: Some((&sb, num_scales)),
            topk: Some((&topk, IndexType::I64, &weights, k)),
            layout: &layout,
            expert_alignment: 4,
            num_worst_tokens: None,
        };
        group.bootstrap().barrier().unwrap();
        let out = buf.dispatch(&group, &args).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht_dispatch").unwrap();
        let rv = &want.ranks[rank];
        let m = rv.num_recv_tokens;
        assert_eq!(out.num_recv_tokens, Some(m));
        let got: Vec<u8> = out.recv_x.to_vec(s).unwrap();
        assert!(got[..m * h] == rv.recv_x[..], "rank {rank}: fp8 payload");
        // expert_alignment = 4 rounds the per-expert counts up.
        let counts = out.num_recv_tokens_per_expert_list.unwrap();
        let want_counts =
            reference::ht_dispatch(&r, &x, &w, h, 4, None).unwrap().ranks[rank].num_recv_tokens_per_expert.clone();
        assert_eq!(counts, want_counts);
        assert!(counts.iter().all(|c| c % 4 == 0));
        let got_scales: Vec<f32> = out.recv_x_scales.to_vec(s).unwrap();
        for (row, src) in want.handle.recv_sources(rank).iter().enumerate() {
            let from = &scales[src.rank][src.token * num_scales..(src.token + 1) * num_scales];
            assert_eq!(&got_scales[row * num_scales..(row + 1) * num_scales], from, "rank {rank} row {row}");
        }
    });
}

/// DeepEP's pressure check: the same inputs twenty times give identical output hashes.
#[test]
fn ht_twenty_reruns_give_identical_hashes() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (h, k, e) = (64usize, 4usize, 16usize);
    let mut rng = Rng::fresh("intranode-reruns");
    let idx = routing(&mut rng, n, &Case::new(e, h, k, if dev.is_cpu() { 20 } else { 1000 }), 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 1e9).collect()).collect();
    let groups = Group::in_process(&devices(n)).unwrap();
    let cfg = HtConfig {
        num_experts: e,
        hidden: h,
        num_topk: k,
        num_scales: 0,
        num_channels: 0,
        warps_per_peer: 0,
        num_slots: 0,
    };
    on_ranks(groups, |rank, group| {
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        let s = group.stream();
        let t = tokens[rank];
        let (topk, weights, xb) = (upload(&group, &idx[rank]), upload(&group, &w[rank]), upload(&group, &x[rank]));
        let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, e).unwrap();
        let mut first = None;
        for rerun in 0..20 {
            let args = HtDispatchArgs {
                x: &xb,
                hidden_bytes: 2 * h,
                num_tokens: t,
                x_scales: None,
                topk: Some((&topk, IndexType::I64, &weights, k)),
                layout: &layout,
                expert_alignment: 1,
                num_worst_tokens: None,
            };
            group.bootstrap().barrier().unwrap();
            let out = buf.dispatch(&group, &args).unwrap();
            let c = buf
                .combine(&group, &out.handle, &out.recv_x, h, Some((&out.recv_topk_weights, k)), [None, None])
                .unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ht dispatch+combine").unwrap();
            let mut hash = std::collections::hash_map::DefaultHasher::new();
            use std::hash::Hash;
            out.recv_x.to_vec::<u8>(s).unwrap().hash(&mut hash);
            out.recv_topk_idx.to_vec::<i64>(s).unwrap().hash(&mut hash);
            out.recv_topk_weights.to_vec::<u32>(s).unwrap().hash(&mut hash);
            out.recv_src_idx.to_vec::<i32>(s).unwrap().hash(&mut hash);
            c.combined_x.to_vec::<u16>(s).unwrap().hash(&mut hash);
            c.combined_topk_weights.unwrap().to_vec::<u32>(s).unwrap().hash(&mut hash);
            let hash = std::hash::Hasher::finish(&hash);
            assert_eq!(*first.get_or_insert(hash), hash, "rank {rank}: rerun {rerun} differs");
        }
    });
}

#[test]
fn ht_bad_arguments_are_rejected_before_launch_and_the_buffer_stays_usable() {
    let groups = Group::in_process(&devices(2)).unwrap();
    on_ranks(groups, |rank, group| {
        let bad = |cfg: HtConfig| HtBuffer::new(&group, cfg).err().map(|e| e.to_string());
        let ok = HtConfig {
            num_experts: 4,
            hidden: 64,
            num_topk: 2,
            num_scales: 0,
            num_channels: 0,
            warps_per_peer: 0,
            num_slots: 0,
        };
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
    });
}

/// A padded output too small for what arrives is refused with a typed error instead of a
/// write past its end.
#[test]
fn ht_num_worst_tokens_too_small_is_an_error_not_an_overflow() {
    let groups = Group::in_process(&devices(2)).unwrap();
    let results = on_ranks(groups, |_, mut group| {
        group.set_timeout(std::time::Duration::from_millis(500)).unwrap();
        let cfg = HtConfig {
            num_experts: 4,
            hidden: 64,
            num_topk: 1,
            num_scales: 0,
            num_channels: 0,
            warps_per_peer: 0,
            num_slots: 0,
        };
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
