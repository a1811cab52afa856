//! LL dispatch/combine on the device against `reference::ll_dispatch` / `ll_combine`, bit
//! for bit, on fresh random inputs: random -1 entries, token counts that change between
//! calls (including zero), many consecutive calls alternating the two buffer sets. Ranks
//! are threads here; the per-rank checks (`moe_ep_tests::ll`) also run one rank per
//! process (`multiprocess_ep.rs`).
use moe_ep::Group;
use moe_ep::layout::IndexType;
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions};
use moe_ep::reference::{self, Routing, f32_to_bf16};
use moe_ep_tests::ll::{self, random_routing};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks, upload};

fn run(num_experts: usize, hidden: usize, num_topk: usize, max_tokens: usize, calls: usize, hooks: bool) {
    let n = num_ranks(&device()).min(8);
    let case = ll::Case { num_experts, hidden, num_topk, max_tokens, calls, hooks };
    let calls = ll::prepare(&case, n, &mut Rng::fresh("low_latency"));
    on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ll::check_rank(&case, &calls, &group));
}

#[test]
fn ll_many_calls_alternating_buffers() {
    let cpu = device().is_cpu();
    run(16, 64, 4, if cpu { 12 } else { 128 }, 5, false);
}

#[test]
fn ll_send_only_with_receive_hooks() {
    let cpu = device().is_cpu();
    run(16, 64, 4, if cpu { 12 } else { 128 }, 4, true);
}

#[test]
fn ll_wide_topk_deepseek_hidden() {
    let cpu = device().is_cpu();
    run(
        if cpu { 64 } else { 256 },
        if cpu { 2880 } else { 7168 },
        if cpu { 16 } else { 8 },
        if cpu { 4 } else { 128 },
        2,
        true,
    );
}

/// Every model hidden size the issue names (and the largest supported), with hooks.
#[test]
fn ll_hidden_sizes_2880_to_16384() {
    let cpu = device().is_cpu();
    for hidden in [2880, 4096, 5120, 7168, 16384] {
        run(16, hidden, 4, if cpu { 2 } else { 32 }, 2, true);
    }
}

/// Many local experts per rank (64 with 4 ranks), one token, top-8: a rank receives from few
/// (source, expert) pairs and most flags announce nothing.
#[test]
fn ll_many_experts_one_token() {
    run(256, 256, 8, 1, 2, false);
}

/// Rank-major dispatch against `reference::ll_dispatch_rank_major`, interleaved with
/// expert-major calls on the same buffer (shared sets and counters), with hooks.
#[test]
fn ll_rank_major_interleaved_with_expert_major() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (e, h, k, m) = (16usize, 64usize, 4usize, if dev.is_cpu() { 10 } else { 128 });
    let mut rng = Rng::fresh("low_latency-rank-major");
    let groups = Group::in_process(&devices(n)).unwrap();
    let mut calls = Vec::new();
    for call in 0..4 {
        let idx = random_routing(&mut rng, n, (e, k, m), 5, |r| (r + call) % 4 == 3);
        let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
        let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 4.0)).collect();
        let w: Vec<Vec<f32>> =
            tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 7e9).collect()).collect();
        let routing = Routing::new(n, e, k, idx.clone()).unwrap();
        let want = reference::ll_dispatch_rank_major(&routing, &x, &w, h, m).unwrap();
        let want_em = reference::ll_dispatch(&routing, &x, h, m).unwrap();
        calls.push((idx, tokens, x, w, want, want_em));
    }
    on_ranks(groups, |rank, group| {
        let mut buf = LlBuffer::new(&group, LlConfig { num_experts: e, hidden: h, max_tokens: m }).unwrap();
        let s = group.stream();
        for (call, (idx, tokens, x, w, want, want_em)) in calls.iter().enumerate() {
            let ctx = format!("rank {rank} call {call}");
            let t = tokens[rank];
            let (topk, weights, xb) = (upload(&group, &idx[rank]), upload(&group, &w[rank]), upload(&group, &x[rank]));
            group.bootstrap().barrier().unwrap();
            let mut rm =
                buf.dispatch_rank_major(&group, &xb, t, &topk, IndexType::I64, &weights, k, call % 2 == 1).unwrap();
            rm.complete(&group, &buf).unwrap();
            let em = buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, LlDispatchOptions::default()).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ll dispatches").unwrap();
            let rv = &want[rank];
            let counts: Vec<i32> = rm.recv_count.to_vec(s).unwrap();
            assert_eq!(counts, rv.recv_count, "{ctx}: counts");
            let (gx, gs) = (rm.recv_x.to_vec::<u16>(s).unwrap(), rm.recv_src_idx.to_vec::<i32>(s).unwrap());
            let (gi, gw) = (rm.recv_topk_idx.to_vec::<i64>(s).unwrap(), rm.recv_topk_weights.to_vec::<f32>(s).unwrap());
            for (src, &c) in counts.iter().enumerate() {
                let rows = src * m..src * m + c as usize;
                assert_eq!(&gs[rows.clone()], &rv.recv_src_idx[rows.clone()], "{ctx}: src idx from {src}");
                assert!(
                    gx[rows.start * h..rows.end * h] == rv.recv_x[rows.start * h..rows.end * h],
                    "{ctx}: rows from {src}"
                );
                assert_eq!(
                    &gi[rows.start * k..rows.end * k],
                    &rv.recv_topk_idx[rows.start * k..rows.end * k],
                    "{ctx}: ids"
                );
                assert!(
                    gw[rows.start * k..rows.end * k]
                        .iter()
                        .zip(&rv.recv_topk_weights[rows.start * k..rows.end * k])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}: weights"
                );
            }
            let em_counts: Vec<i32> = em.packed_recv_count.to_vec(s).unwrap();
            assert_eq!(em_counts, want_em.ranks[rank].packed_recv_count, "{ctx}: expert-major counts after rank-major");
        }
    });
}

/// Dispatch + combine captured once (a CUDA graph on a GPU, recorded launches on the CPU)
/// and replayed many times with new token values in the same buffers: the epochs live on
/// the device, so identical parameters give fresh, correct results every replay.
#[test]
fn ll_graph_capture_and_replay() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let d = ll::prepare_graph(n, if dev.is_cpu() { 8 } else { 128 }, &mut Rng::fresh("low_latency-graph"));
    let replays = if dev.is_cpu() { 6 } else { 100 };
    let hashes =
        on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ll::check_graph_rank(&d, replays, &group));
    let last = &d.variants[(replays - 1) % 3].1;
    assert_eq!(hashes, last.iter().map(|v| ll::hash_u16(v)).collect::<Vec<_>>());
}

/// fp8 dispatch: the kernel's cast (per-128-channel scales, plain and power-of-two) against
/// `reference::quantize_row_fp8` applied to the reference's received rows, byte for byte;
/// and the dequantised rows within DeepEP's tolerance of the bf16 originals.
/// Widths: one cast step (512), a partial step (640: five groups, no UE8M0), several steps
/// with a partial round (1536 on the CPU, DeepSeek's 7168 on a GPU).
#[test]
fn ll_fp8_cast_in_the_dispatch_kernel() {
    let wide = if device().is_cpu() { 1536 } else { 7168 };
    for h in [512, 640, wide] {
        fp8_dispatch_matches_the_reference(h);
    }
}

fn fp8_dispatch_matches_the_reference(h: usize) {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (e, k, m) = (16usize, 4usize, if dev.is_cpu() { 8 } else { 128 });
    let mut rng = Rng::fresh("low_latency-fp8");
    let idx = random_routing(&mut rng, n, (e, k, m), 0, |_| false);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    // Values over a wide range, so scales differ between groups.
    let x: Vec<Vec<u16>> = tokens
        .iter()
        .map(|&t| {
            (0..t * h)
                .map(|i| {
                    f32_to_bf16(
                        (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 2f32.powi((i / 128 % 7) as i32 * 3 - 9),
                    )
                })
                .collect()
        })
        .collect();
    let routing = Routing::new(n, e, k, idx.clone()).unwrap();
    let want = reference::ll_dispatch(&routing, &x, h, m).unwrap();
    let groups = Group::in_process(&devices(n)).unwrap();
    on_ranks(groups, |rank, group| {
        let mut buf = LlBuffer::new(&group, LlConfig { num_experts: e, hidden: h, max_tokens: m }).unwrap();
        let s = group.stream();
        let t = tokens[rank];
        let (topk, xb) = (upload(&group, &idx[rank]), upload(&group, &x[rank]));
        for (round_scale, use_ue8m0) in [(false, false), (true, false), (true, true)] {
            if use_ue8m0 && !h.is_multiple_of(512) {
                continue; // UE8M0 packs four groups a word
            }
            group.bootstrap().barrier().unwrap();
            let opts = LlDispatchOptions { use_fp8: true, round_scale, use_ue8m0, ..Default::default() };
            let out = buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ll fp8").unwrap();
            let rv = &want.ranks[rank];
            let counts: Vec<i32> = out.packed_recv_count.to_vec(s).unwrap();
            assert_eq!(counts, rv.packed_recv_count);
            let q: Vec<u8> = out.packed_recv_x.to_vec(s).unwrap();
            let raw: Vec<u8> = out.packed_recv_x_scales.as_ref().unwrap().to_vec(s).unwrap();
            let (slots, groups_per_row) = (n * m, h / 128);
            let ranges: Vec<i64> = out.handle.packed_recv_layout_range.to_vec(s).unwrap();
            let matched = ll::matched_rows(rv, &ranges, n, m);
            let expected: usize = counts.iter().map(|&c| c as usize).sum();
            assert_eq!(matched.len(), expected, "rank {rank}: every row matched to the reference's");
            let (mut num, mut den) = (0f64, 0f64);
            {
                for &(row, want_row) in &matched {
                    let l = row / slots;
                    let bf16_row = &rv.packed_recv_x[want_row * h..(want_row + 1) * h];
                    let (want_q, want_s) = reference::quantize_row_fp8(bf16_row, round_scale);
                    assert_eq!(
                        &q[row * h..(row + 1) * h],
                        &want_q[..],
                        "rank {rank} row {row} round {round_scale}: fp8 bytes"
                    );
                    // Scales are group-major per expert (DeepEP's column-major layout).
                    let row_in_expert = row - l * slots;
                    if use_ue8m0 {
                        // i32 words [L][G/4][R*M]: byte g % 4 of word g / 4 = exponent of scale g.
                        let got: Vec<u8> = (0..groups_per_row)
                            .map(|g| raw[((l * (groups_per_row / 4) + g / 4) * slots + row_in_expert) * 4 + g % 4])
                            .collect();
                        let want: Vec<u8> = want_s.iter().map(|s| (s.to_bits() >> 23) as u8).collect();
                        assert_eq!(got, want, "ue8m0 scales");
                    } else {
                        let got: Vec<f32> = (0..groups_per_row)
                            .map(|g| {
                                let at = ((l * groups_per_row + g) * slots + row_in_expert) * 4;
                                f32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]])
                            })
                            .collect();
                        assert_eq!(got, want_s, "scales");
                    }
                    for (j, &b) in bf16_row.iter().enumerate() {
                        let (a, d) = (
                            reference::bf16_to_f32(b) as f64,
                            (reference::e4m3_to_f32(want_q[j]) * want_s[j / 128]) as f64,
                        );
                        num += (a - d) * (a - d);
                        den += a * a;
                    }
                }
            }
            assert!(den == 0.0 || num / den < 4e-3, "relative error {} of the fp8 round trip", num / den);
        }
    });
}

/// Bad arguments are refused before any launch with an error naming them — too many tokens,
/// top-k out of range, a short `x`, outputs of another buffer handed to `dispatch_into` —
/// and the buffer stays usable: a correct dispatch + zero-copy combine follows.
#[test]
fn ll_bad_arguments_are_errors_and_the_buffer_still_works() {
    let dev = device();
    let n = num_ranks(&dev).min(4);
    let (e, h, k, m) = (16usize, 64usize, 4usize, 6usize);
    let case = ll::Case { num_experts: e, hidden: h, num_topk: k, max_tokens: m, calls: 1, hooks: false };
    let calls = ll::prepare(&case, n, &mut Rng::fresh("low_latency-bad-arguments"));
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let cfg = LlConfig { num_experts: e, hidden: h, max_tokens: m };
        let mut buf = LlBuffer::new(&group, cfg).unwrap();
        let mut other = LlBuffer::new(&group, cfg).unwrap();
        let t = calls[0].tokens[rank];
        let (topk, xb) = (upload(&group, &calls[0].idx[rank]), upload(&group, &calls[0].x[rank]));
        let opts = LlDispatchOptions::default();
        let long_idx = upload(&group, &vec![0i64; (m + 1) * k]);
        let long_x = upload(&group, &vec![0u16; (m + 1) * h]);
        let err = |r: moe_ep::Result<_>, what: &str| match r {
            Err(moe_ep::Error::InvalidArgument { .. }) => {}
            Err(other) => panic!("rank {rank}: {what}: wrong error {other}"),
            Ok(_) => panic!("rank {rank}: {what}: accepted"),
        };
        err(buf.dispatch(&group, &long_x, m + 1, &long_idx, IndexType::I64, k, opts).map(drop), "num_tokens > max");
        err(buf.dispatch(&group, &xb, t, &topk, IndexType::I64, 33, opts).map(drop), "top-k 33");
        err(
            buf.dispatch(&group, &upload(&group, &[0u16; 8]), m, &long_idx, IndexType::I64, k, opts).map(drop),
            "short x",
        );
        let fp8 = LlDispatchOptions { use_fp8: true, ..opts };
        err(buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, fp8).map(drop), "fp8 with hidden 64");
        // Outputs of another buffer: the senders would store into that buffer's set.
        group.bootstrap().barrier().unwrap();
        let foreign = other.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts).unwrap();
        err(buf.dispatch_into(&group, &foreign, &xb, t, &topk, IndexType::I64, k, opts).map(drop), "foreign outputs");
        group.stream().synchronize().unwrap();
        group.take_device_error("ll, other buffer").unwrap();
        // Still usable (and the refused calls moved no buffer set: every rank agrees on the
        // next one): the whole check of one call on `buf`, zero-copy on some ranks.
        ll::check_rank_on(&mut buf, &case, &calls, &group);
        group.bootstrap().barrier().unwrap();
        drop(foreign);
    });
}
