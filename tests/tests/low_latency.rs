//! LL dispatch/combine on the device against `reference::ll_dispatch` / `ll_combine`, bit
//! for bit, on fresh random inputs: random -1 entries, token counts that change between
//! calls (including zero), many consecutive calls alternating the two buffer sets. Ranks
//! are threads here; the per-rank checks (`moe_ep_tests::ll`) also run one rank per
//! process (`multiprocess_ep.rs`).
use moe_ep::Group;
use moe_ep::layout::IndexType;
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlRankMajorInput, LlStats};
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
/// expert-major calls on the same buffer (shared sets and counters), with hooks; the last
/// two calls send fp8 rows with their scales (NCCL EP's `QUANT_FWD`).
#[test]
fn ll_rank_major_interleaved_with_expert_major() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (e, h, k, m) = (16usize, 128usize, 4usize, if dev.is_cpu() { 10 } else { 128 });
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
        // fp8 input: the rows and the scales are each moved as the bf16 rows are.
        let fp8 = (call >= 2).then(|| ll::fp8_rank_major(&mut rng, &routing, &tokens, &w, h, m));
        calls.push((idx, tokens, x, w, want, want_em, fp8));
    }
    on_ranks(groups, |rank, group| {
        let mut buf = LlBuffer::new(&group, LlConfig { num_experts: e, hidden: h, max_tokens: m }).unwrap();
        let s = group.stream();
        for (call, (idx, tokens, x, w, want, want_em, fp8)) in calls.iter().enumerate() {
            let ctx = format!("rank {rank} call {call}");
            let t = tokens[rank];
            let (topk, weights, xb) = (upload(&group, &idx[rank]), upload(&group, &w[rank]), upload(&group, &x[rank]));
            let fp8_in =
                fp8.as_ref().map(|((rows, scales), _)| (upload(&group, &rows[rank]), upload(&group, &scales[rank])));
            group.bootstrap().barrier().unwrap();
            let input = LlRankMajorInput {
                x: fp8_in.as_ref().map_or(&xb, |f| &f.0),
                x_scales: fp8_in.as_ref().map(|f| &f.1),
                num_tokens: t,
                topk_idx: &topk,
                index_type: IndexType::I64,
                topk_weights: &weights,
                num_topk: k,
            };
            let mut rm = buf.dispatch_rank_major(&group, &input, call % 2 == 1).unwrap();
            rm.complete(&group, &buf).unwrap();
            let em = buf
                .dispatch(&group, &xb, t, &topk, IndexType::I64, k, LlDispatchOptions::default(), LlStats::default())
                .unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ll dispatches").unwrap();
            let rv = &want[rank];
            let counts: Vec<i32> = rm.recv_count.to_vec(s).unwrap();
            assert_eq!(counts, rv.recv_count, "{ctx}: counts");
            let gs = rm.recv_src_idx.to_vec::<i32>(s).unwrap();
            let (gi, gw) = (rm.recv_topk_idx.to_vec::<i64>(s).unwrap(), rm.recv_topk_weights.to_vec::<f32>(s).unwrap());
            for (src, &c) in counts.iter().enumerate() {
                let rows = src * m..src * m + c as usize;
                assert_eq!(&gs[rows.clone()], &rv.recv_src_idx[rows.clone()], "{ctx}: src idx from {src}");
                let (a, b) = (rows.start * h, rows.end * h);
                match fp8 {
                    None => {
                        assert!(rm.recv_x.to_vec::<u16>(s).unwrap()[a..b] == rv.recv_x[a..b], "{ctx}: rows from {src}")
                    }
                    Some((_, (want_rows, want_scales))) => {
                        assert!(
                            rm.recv_x.to_vec::<u8>(s).unwrap()[a..b] == want_rows[rank][a..b],
                            "{ctx}: fp8 rows from {src}"
                        );
                        let (a, b) = (rows.start * h / 128, rows.end * h / 128);
                        let got: Vec<f32> = rm.recv_x_scales.as_ref().unwrap().to_vec(s).unwrap();
                        assert!(
                            got[a..b].iter().zip(&want_scales[rank][a..b]).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{ctx}: scales from {src}"
                        );
                    }
                }
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

/// Rank-major dispatch then rank-major combine (NCCL EP's `RANK_MAJOR`) against
/// `reference::ll_combine_rank_major`: each rank returns fresh rows for what it received,
/// the sources sum them per token; ids out as i32 and i64; every other call send-only.
#[test]
fn ll_rank_major_combine_matches_the_reference() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (e, h, k, m) = (16usize, 64usize, 4usize, if dev.is_cpu() { 10 } else { 128 });
    let mut rng = Rng::fresh("low_latency-rank-major-combine");
    let mut calls = Vec::new();
    for call in 0..4 {
        let idx = random_routing(&mut rng, n, (e, k, m), 5, |r| (r + call) % 4 == 3);
        let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
        let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 4.0)).collect();
        let w: Vec<Vec<f32>> = tokens.iter().map(|&t| vec![0.5; t * k]).collect();
        let routing = Routing::new(n, e, k, idx.clone()).unwrap();
        let recv = reference::ll_dispatch_rank_major(&routing, &x, &w, h, m).unwrap();
        let y: Vec<Vec<u16>> = (0..n).map(|_| rng.bf16(n * m * h, 4.0)).collect();
        let want = reference::ll_combine_rank_major(&routing, &recv, &y, h, m).unwrap();
        calls.push((idx, tokens, x, w, recv, y, want));
    }
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let mut buf = LlBuffer::new(&group, LlConfig { num_experts: e, hidden: h, max_tokens: m }).unwrap();
        let s = group.stream();
        for (call, (idx, tokens, x, w, recv, y, want)) in calls.iter().enumerate() {
            let (ctx, t, send_only, ib) =
                (format!("rank {rank} call {call}"), tokens[rank], call % 2 == 1, 4 + 4 * (call % 2));
            let (topk, weights, xb) = (upload(&group, &idx[rank]), upload(&group, &w[rank]), upload(&group, &x[rank]));
            let mut out = moe_ep::low_latency::LlRankMajorOutputs::in_memory(
                [
                    s.alloc(n * m * 2 * h).unwrap(),
                    s.alloc(4 * n).unwrap(),
                    s.alloc(4 * n * m).unwrap(),
                    s.alloc(ib * n * m * k).unwrap(),
                    s.alloc(4 * n * m * k).unwrap(),
                    s.alloc(8).unwrap(),
                ],
                ib,
            );
            let input = LlRankMajorInput {
                x: &xb,
                x_scales: None,
                num_tokens: t,
                topk_idx: &topk,
                index_type: IndexType::I64,
                topk_weights: &weights,
                num_topk: k,
            };
            buf.dispatch_rank_major_into(&group, &mut out, &input, send_only).unwrap();
            out.complete(&group, &buf).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ll rank-major dispatch").unwrap();
            let rv = &recv[rank];
            assert_eq!(out.recv_count.to_vec::<i32>(s).unwrap(), rv.recv_count, "{ctx}: counts");
            let ids: Vec<i64> = match ib {
                4 => out.recv_topk_idx.to_vec::<i32>(s).unwrap().into_iter().map(i64::from).collect(),
                _ => out.recv_topk_idx.to_vec::<i64>(s).unwrap(),
            };
            for (src, &c) in rv.recv_count.iter().enumerate() {
                let rows = src * m * k..(src * m + c as usize) * k;
                assert_eq!(ids[rows.clone()], rv.recv_topk_idx[rows], "{ctx}: {ib}-byte ids from {src}");
            }
            // Expert outputs: this rank's fresh rows, poison past the counts.
            let yb = upload(&group, &y[rank]);
            let combined = s.alloc(t * 2 * h + 16).unwrap();
            combined.fill_async(s, 0xee).unwrap();
            let hook =
                buf.combine_rank_major(&group, &out, &yb, &combined, t, &topk, IndexType::I64, k, send_only).unwrap();
            if let Some(hook) = hook {
                hook.launch(&group, &buf).unwrap();
            }
            s.synchronize().unwrap();
            group.take_device_error("ll rank-major combine").unwrap();
            let got: Vec<u16> = combined.to_vec(s).unwrap();
            assert!(got[..t * h] == want[rank][..], "{ctx}: combined");
            group.bootstrap().barrier().unwrap(); // nobody reuses the set while a peer reads it
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
        on_ranks(Group::in_process(&devices(n)).unwrap(), |_, group| ll::check_graph_rank(&d, replays, &group, None));
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
            let out = buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts, LlStats::default()).unwrap();
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

/// DeepEP's LL statistics: every dispatch — plain, send-only (added by its receive half:
/// checked in between), fp8, a captured graph's first call and each replay — adds each
/// local expert's received rows to `cumulative_local_expert_recv_stats`, exactly; the
/// outputs stay bit-exact with the statistics on; every wait is measured (entries > 0).
#[test]
fn ll_stats_count_every_dispatch() {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let m = if dev.is_cpu() { 8 } else { 128 };
    let case = ll::Case { num_experts: 16, hidden: 128, num_topk: 4, max_tokens: m, calls: 4, hooks: true };
    let calls = ll::prepare(&case, n, &mut Rng::fresh("low_latency-stats"));
    let graph = ll::prepare_graph(n, m, &mut Rng::fresh("low_latency-stats-graph"));
    let replays = 3;
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let (l, k, s) = (case.num_experts / n, case.num_topk, group.stream());
        let stats = ll::Stats::new(&group, l);
        let cfg = LlConfig { num_experts: case.num_experts, hidden: case.hidden, max_tokens: m };
        let mut buf = LlBuffer::new(&group, cfg).unwrap();
        // Plain and send-only calls, alternating, each checked against the reference.
        ll::check_rank_on(&mut buf, &case, &calls, &group, Some(&stats));
        let mut want: Vec<i32> =
            (0..l).map(|e| calls.iter().map(|c| c.want.ranks[rank].packed_recv_count[e]).sum()).collect();
        assert_eq!(stats.recv(&group), want, "rank {rank}: after the plain and send-only calls");
        // fp8, call 0's routing again.
        let c = &calls[0];
        let (topk, xb) = (upload(&group, &c.idx[rank]), upload(&group, &c.x[rank]));
        group.bootstrap().barrier().unwrap();
        let fp8 = LlDispatchOptions { use_fp8: true, ..Default::default() };
        let out = buf.dispatch(&group, &xb, c.tokens[rank], &topk, IndexType::I64, k, fp8, stats.dispatch()).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ll fp8").unwrap();
        let counts = &c.want.ranks[rank].packed_recv_count;
        assert_eq!(&out.packed_recv_count.to_vec::<i32>(s).unwrap(), counts, "rank {rank}: fp8 counts");
        want.iter_mut().zip(counts).for_each(|(w, c)| *w += c);
        assert_eq!(stats.recv(&group), want, "rank {rank}: after the fp8 dispatch");
        // A graph: its first, ordinary call and every replay add again.
        group.bootstrap().barrier().unwrap();
        ll::check_graph_rank(&graph, replays, &group, Some(&stats));
        for (le, w) in want.iter_mut().enumerate() {
            let rows = graph.idx.iter().flatten().filter(|&&e| e == (rank * l + le) as i64).count();
            *w += ((1 + replays) * rows) as i32;
        }
        assert_eq!(stats.recv(&group), want, "rank {rank}: after {replays} graph replays");
        let (dispatch_wait, combine_wait) = stats.waits(&group);
        assert!(dispatch_wait.iter().all(|&c| c > 0), "rank {rank}: dispatch waits {dispatch_wait:?}");
        assert!(combine_wait.iter().all(|&c| c > 0), "rank {rank}: combine waits {combine_wait:?}");
    });
}

/// Wait costs point at the late rank: every rank but `late` sends first (send-only, done)
/// and then waits in its receive half while `late` sleeps `delay` before its whole call, for
/// the dispatch and again for the combine. Their waits for the others end at the first poll,
/// so the entry for `late` is their largest (on the emulator, whose cycles are nanoseconds,
/// also at least a quarter of the delay per wait). No entry exceeds its waits times the
/// receive's wall time at 4 cycles per ns, and the outputs stay bit-exact.
#[test]
fn ll_wait_cost_stats_point_at_the_late_rank() {
    let dev = device();
    let (n, cpu) = (num_ranks(&dev).min(8), dev.is_cpu());
    if n < 2 {
        return; // nobody to be late for
    }
    let m = if cpu { 8 } else { 128 };
    let case = ll::Case { num_experts: 16, hidden: 64, num_topk: 4, max_tokens: m, calls: 1, hooks: false };
    let (l, h, k) = (case.num_experts / n, case.hidden, case.num_topk);
    let c = &ll::prepare(&case, n, &mut Rng::fresh("low_latency-late-rank"))[0];
    // Identity experts: each rank returns the rows it received.
    let rows: Vec<Vec<u16>> = c.want.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    let combined = reference::ll_combine(&c.want.handle, &rows, &c.w, h).unwrap();
    let (late, delay) = (1, std::time::Duration::from_millis(if cpu { 600 } else { 50 }));
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let s = group.stream();
        let stats = ll::Stats::new(&group, l);
        let mut buf =
            LlBuffer::new(&group, LlConfig { num_experts: case.num_experts, hidden: h, max_tokens: m }).unwrap();
        let t = c.tokens[rank];
        let (topk, weights, xb) =
            (upload(&group, &c.idx[rank]), upload(&group, &c.w[rank]), upload(&group, &c.x[rank]));
        let early = rank != late;
        // After the early ranks' send halves: the receive's start, `delay` late on `late`.
        let start = || {
            s.synchronize().unwrap();
            group.bootstrap().barrier().unwrap();
            if !early {
                std::thread::sleep(delay);
            }
            std::time::Instant::now()
        };
        let wall_ns = |start: std::time::Instant| {
            s.synchronize().unwrap();
            group.take_device_error("ll").unwrap();
            start.elapsed().as_nanos() as i64
        };
        let opts = LlDispatchOptions { send_only: early, ..Default::default() };
        let dispatch = |buf: &mut LlBuffer| {
            buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts, stats.dispatch()).unwrap()
        };
        let sent = early.then(|| dispatch(&mut buf));
        let began = start();
        let mut out = sent.unwrap_or_else(|| dispatch(&mut buf));
        out.complete(&group, &buf).unwrap();
        let dispatch_ns = wall_ns(began);
        let counts: Vec<i32> = out.packed_recv_count.to_vec(s).unwrap();
        assert_eq!(counts, c.want.ranks[rank].packed_recv_count, "rank {rank}: counts");
        let combine = |buf: &mut LlBuffer| {
            let (y, st) = (&out.packed_recv_x, stats.combine());
            buf.combine(&group, &out.handle, y, t, &topk, IndexType::I64, &weights, k, early, st).unwrap()
        };
        let sent = early.then(|| combine(&mut buf));
        let began = start();
        let mut comb = sent.unwrap_or_else(|| combine(&mut buf));
        comb.complete(&group, &buf).unwrap();
        let combine_ns = wall_ns(began);
        let got: Vec<u16> = comb.combined_x.to_vec(s).unwrap();
        assert!(got[..t * h] == combined[rank][..], "rank {rank}: combined_x");
        let (dispatch_wait, combine_wait) = stats.waits(&group);
        let ctx = format!(
            "rank {rank}: dispatch waits {dispatch_wait:?} ({dispatch_ns} ns), combine waits {combine_wait:?} ({combine_ns} ns)"
        );
        // One dispatch wait per local expert and source, one combine wait per owner.
        assert!(dispatch_wait.iter().all(|&w| 0 < w && w <= l as i64 * dispatch_ns * 4), "{ctx}");
        assert!(combine_wait.iter().all(|&w| 0 < w && w <= combine_ns * 4), "{ctx}");
        if early {
            for (src, (&d, &cw)) in dispatch_wait.iter().zip(&combine_wait).enumerate() {
                assert!(src == late || (d < dispatch_wait[late] && cw < combine_wait[late]), "{ctx}: late rank {late}");
            }
            let quarter = delay.as_nanos() as i64 / 4;
            assert!(!cpu || (dispatch_wait[late] >= l as i64 * quarter && combine_wait[late] >= quarter), "{ctx}");
        }
        group.bootstrap().barrier().unwrap();
    });
}

/// Bad arguments are refused before any launch with an error naming them — too many tokens,
/// top-k out of range, a short `x`, outputs of another buffer handed to `dispatch_into`,
/// short statistics buffers, a combine statistic given to a dispatch and vice versa — and
/// the buffer stays usable: a correct dispatch + zero-copy combine follows.
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
        err(
            buf.dispatch(&group, &long_x, m + 1, &long_idx, IndexType::I64, k, opts, LlStats::default()).map(drop),
            "num_tokens > max",
        );
        err(buf.dispatch(&group, &xb, t, &topk, IndexType::I64, 33, opts, LlStats::default()).map(drop), "top-k 33");
        err(
            buf.dispatch(
                &group,
                &upload(&group, &[0u16; 8]),
                m,
                &long_idx,
                IndexType::I64,
                k,
                opts,
                LlStats::default(),
            )
            .map(drop),
            "short x",
        );
        let fp8 = LlDispatchOptions { use_fp8: true, ..opts };
        err(
            buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, fp8, LlStats::default()).map(drop),
            "fp8 with hidden 64",
        );
        // Outputs of another buffer: the senders would store into that buffer's set.
        group.bootstrap().barrier().unwrap();
        let foreign = other.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts, LlStats::default()).unwrap();
        err(
            buf.dispatch_into(&group, &foreign, &xb, t, &topk, IndexType::I64, k, opts, LlStats::default()).map(drop),
            "foreign outputs",
        );
        // Statistics: too short for [L] i32 / [R] i64, or given to the wrong op.
        let named = |r: moe_ep::Result<()>, want: &str| match r {
            Err(moe_ep::Error::InvalidArgument { arg, .. }) if arg == want => {}
            Err(other) => panic!("rank {rank}: {want}: wrong error {other}"),
            Ok(()) => panic!("rank {rank}: {want}: accepted"),
        };
        let (short, stats) = (group.stream().alloc(4).unwrap(), ll::Stats::new(&group, e / n));
        let dispatch_with = |buf: &mut LlBuffer, st: LlStats<'_>| {
            buf.dispatch(&group, &xb, t, &topk, IndexType::I64, k, opts, st).map(drop)
        };
        let short_recv = LlStats { cumulative_local_expert_recv_stats: Some(&short), ..Default::default() };
        named(dispatch_with(&mut buf, short_recv), "cumulative_local_expert_recv_stats");
        let short_wait = LlStats { dispatch_wait_recv_cost_stats: Some(&short), ..Default::default() };
        named(dispatch_with(&mut buf, short_wait), "dispatch_wait_recv_cost_stats");
        named(dispatch_with(&mut buf, stats.combine()), "combine_wait_recv_cost_stats");
        let weights = upload(&group, &calls[0].w[rank]);
        let combine_with = |buf: &mut LlBuffer, st: LlStats<'_>| {
            let y = &foreign.packed_recv_x;
            buf.combine(&group, &foreign.handle, y, t, &topk, IndexType::I64, &weights, k, false, st).map(drop)
        };
        named(combine_with(&mut buf, stats.dispatch()), "cumulative_local_expert_recv_stats");
        let short_wait = LlStats { combine_wait_recv_cost_stats: Some(&short), ..Default::default() };
        named(combine_with(&mut buf, short_wait), "combine_wait_recv_cost_stats");
        group.stream().synchronize().unwrap();
        group.take_device_error("ll, other buffer").unwrap();
        // Still usable (and the refused calls moved no buffer set: every rank agrees on the
        // next one): the whole check of one call on `buf`, zero-copy on some ranks.
        ll::check_rank_on(&mut buf, &case, &calls, &group, None);
        group.bootstrap().barrier().unwrap();
        drop(foreign);
    });
}
