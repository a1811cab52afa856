//! HT intranode checks, one rank's side: the in-process tests (`tests/intranode.rs`, ranks
//! as threads) and the multi-process ones (`tests/multiprocess_ep.rs`, one rank per
//! process) call the same functions. Inputs are drawn from one seeded [`Rng`], so every
//! process regenerates every rank's data and the CPU reference's outputs for it.
use crate::{Rng, upload};
use moe_ep::Group;
use moe_ep::intranode::{HtBuffer, HtCombineOutputs, HtConfig, HtDispatchArgs, HtDispatchBuffers, HtMaps};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep::reference::{self, HtCombined, HtDispatch, Routing};
use std::hash::{Hash, Hasher};

/// One HT test configuration.
#[derive(Clone, Copy)]
pub struct Case {
    pub num_experts: usize,
    pub hidden: usize,
    pub num_topk: usize,
    pub max_tokens: usize,
    pub num_worst_tokens: Option<usize>,
    pub with_bias: bool,
    pub calls: usize,
    /// Ring slots (0 = the default); small values force wrap-around and waiting senders.
    pub num_slots: usize,
    /// Warps per peer in a block (0 = the default).
    pub warps_per_peer: usize,
    pub routing: Routes,
    /// Output heap bytes per rank (0 = none: every call through the rings).
    pub heap_bytes: usize,
}

/// How tokens are routed.
#[derive(Clone, Copy, PartialEq)]
pub enum Routes {
    /// Distinct random experts per token, about one entry in 8 dropped (-1).
    Random,
    /// Every token to expert 0 only (one rank receives everything).
    AllToExpertZero,
    /// Random, but never an expert of the last rank (it receives nothing).
    SkipLastRank,
}

impl Case {
    /// Random routing, bias, 3 calls, default rings.
    pub fn new(num_experts: usize, hidden: usize, num_topk: usize, max_tokens: usize) -> Case {
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
            heap_bytes: 0,
        }
    }

    fn config(&self, num_scales: usize) -> HtConfig {
        HtConfig {
            num_experts: self.num_experts,
            hidden: self.hidden,
            num_topk: self.num_topk,
            num_scales,
            num_channels: 0,
            warps_per_peer: self.warps_per_peer,
            num_slots: self.num_slots,
            heap_bytes: self.heap_bytes,
        }
    }
}

/// Per rank `[T_r, K]` top-k ids for `call` (uneven counts; rank 1 empty on even calls).
pub fn routing(rng: &mut Rng, num_ranks: usize, case: &Case, call: usize) -> Vec<Vec<i64>> {
    (0..num_ranks)
        .map(|r| {
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

/// One call's inputs for every rank and the reference's outputs.
pub struct Call {
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub x: Vec<Vec<u16>>,
    pub w: Vec<Vec<f32>>,
    pub want: HtDispatch<u16>,
    /// Expert outputs to combine, per rank.
    pub y: Vec<Vec<u16>>,
    pub bias: [Vec<Vec<u16>>; 2],
    pub combined: Vec<HtCombined>,
}

/// Every call's inputs and reference outputs for `n` ranks.
pub fn prepare(case: &Case, n: usize, rng: &mut Rng) -> Vec<Call> {
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    (0..case.calls)
        .map(|call| {
            let idx = routing(rng, n, case, call);
            let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
            let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
            let w: Vec<Vec<f32>> =
                tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect()).collect();
            let r = Routing::new(n, e, k, idx.clone()).unwrap();
            let want = reference::ht_dispatch(&r, &x, &w, h, 1, case.num_worst_tokens).unwrap();
            // Expert outputs: fresh bf16 rows per received row, plus bias per source token.
            let rows: Vec<usize> = want.ranks.iter().map(|rv| rv.recv_src_idx.len()).collect();
            let y: Vec<Vec<u16>> = rows.iter().map(|&m| rng.bf16(m * h, 8.0)).collect();
            let b0: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
            let b1: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
            let bias = if case.with_bias { [Some(&b0[..]), Some(&b1[..])] } else { [None, None] };
            let weights: Vec<Vec<f32>> = want.ranks.iter().map(|rv| rv.recv_topk_weights.clone()).collect();
            let combined = reference::ht_combine(&want.handle, &y, Some(&weights), bias, h).unwrap();
            Call { idx, tokens, x, w, want, y, bias: [b0, b1], combined }
        })
        .collect()
}

/// One rank's side of every call: dispatch, combine (weights, bias) and cached dispatch,
/// each output bit for bit against the reference, outputs poisoned first. Returns, per
/// call, whether the dispatch went the one-pass way (outputs in the heap).
pub fn check_rank(case: &Case, calls: &[Call], group: &Group) -> Vec<bool> {
    let (rank, h, k, e) = (group.rank(), case.hidden, case.num_topk, case.num_experts);
    let mut buf = HtBuffer::new(group, case.config(0)).unwrap();
    // Heap blocks are reused: stale rows of an earlier call must not pass for this one's.
    buf.set_poison(Some(0xA5));
    let s = group.stream();
    let mut one_pass = Vec::new();
    for (call, c) in calls.iter().enumerate() {
        let t = c.tokens[rank];
        let topk = upload(group, &c.idx[rank]);
        let weights = upload(group, &c.w[rank]);
        let xb = upload(group, &c.x[rank]);
        let layout = get_dispatch_layout(group, &topk, IndexType::I64, t, k, e).unwrap();
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
        // Ranks may share one GPU: uploads from pageable memory may wait for the device, so
        // no rank starts the collective while another is still uploading.
        group.bootstrap().barrier().unwrap();
        let started = std::time::Instant::now();
        let out = buf.dispatch(group, &args).unwrap();
        let host_call = started.elapsed(); // a long one: the host was stalled in the driver
        s.synchronize().unwrap();
        group
            .take_device_error("ht_dispatch")
            .unwrap_or_else(|e| panic!("rank {rank} call {call}: {e:?} (dispatch() returned after {host_call:?})"));
        let rv = &c.want.ranks[rank];
        let got_n = rv.num_recv_tokens;
        let ctx = format!("rank {rank} call {call}");
        one_pass.push(out.one_pass);
        if case.num_worst_tokens.is_none() {
            assert_eq!(out.num_recv_tokens, Some(got_n), "{ctx}");
            assert_eq!(out.num_recv_tokens_per_expert_list.as_ref(), Some(&rv.num_recv_tokens_per_expert), "{ctx}");
        }
        assert_eq!(out.num_recv_tokens_per_expert.to_vec::<i32>(s).unwrap(), rv.num_recv_tokens_per_expert, "{ctx}");
        let rows = out.handle.num_rows;
        assert_eq!(rows, rv.recv_src_idx.len(), "{ctx}");
        let recv_x: Vec<u16> = out.recv_x.to_vec(s).unwrap();
        assert!(recv_x[..got_n * h] == rv.recv_x[..got_n * h], "{ctx}: recv_x");
        assert_eq!(&out.recv_src_idx.to_vec::<i32>(s).unwrap()[..rows], &rv.recv_src_idx[..], "{ctx}: recv_src_idx");
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
        assert_eq!(rpm, c.want.handle.rank_prefix_matrix(), "{ctx}: rank_prefix_matrix");

        // Combine the fresh expert outputs back (with the received weights, and bias).
        // With a heap, the expert outputs live in it (`alloc_output`), so peers pull them
        // when every rank's do; otherwise (or when it is full) a plain upload.
        let yb = match buf.alloc_output(group, c.y[rank].len() * 2) {
            Some(b) => {
                b.write(s, 0, &c.y[rank]).unwrap();
                b
            }
            None => upload(group, &c.y[rank]),
        };
        let (bb0, bb1) = (upload(group, &c.bias[0][rank]), upload(group, &c.bias[1][rank]));
        let bias = if case.with_bias { [Some(&bb0), Some(&bb1)] } else { [None, None] };
        group.bootstrap().barrier().unwrap();
        let comb = buf.combine(group, &out.handle, &yb, h, Some((&out.recv_topk_weights, k)), bias).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht_combine").unwrap();
        let cx: Vec<u16> = comb.combined_x.to_vec(s).unwrap();
        assert!(cx[..t * h] == c.combined[rank].combined_x[..], "{ctx}: combined_x");
        let cw: Vec<f32> = comb.combined_topk_weights.unwrap().to_vec(s).unwrap();
        let want_w = c.combined[rank].combined_topk_weights.as_ref().unwrap();
        assert!(cw[..t * k].iter().zip(want_w).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}: combined weights");

        // Cached dispatch with the same handle (the backward of a combine): same rows.
        group.bootstrap().barrier().unwrap();
        let (again, _) = buf.dispatch_cached(group, &out.handle, &xb, 2 * h, None).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht_dispatch (cached)").unwrap();
        let again: Vec<u16> = again.to_vec(s).unwrap();
        assert!(again[..got_n * h] == rv.recv_x[..got_n * h], "{ctx}: cached dispatch recv_x");
    }
    // Nobody frees its buffer (mapped by peers) while a peer may still read it.
    group.bootstrap().barrier().unwrap();
    one_pass
}

/// fp8 dispatch inputs: `hidden` bytes per token plus `hidden / 128` f32 scales.
pub struct Fp8 {
    pub case: Case,
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub x: Vec<Vec<u8>>,
    pub scales: Vec<Vec<f32>>,
    pub w: Vec<Vec<f32>>,
    pub want: HtDispatch<u8>,
    /// Per-expert counts with `expert_alignment = 4`, per rank.
    pub aligned_counts: Vec<Vec<i32>>,
}

/// fp8 payloads (hidden 256, top-4 of 16), for `n` ranks.
pub fn prepare_fp8(n: usize, max_tokens: usize, rng: &mut Rng) -> Fp8 {
    let case = Case::new(16, 256, 4, max_tokens);
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    let idx = routing(rng, n, &case, 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u8>> = tokens.iter().map(|&t| (0..t * h).map(|_| rng.next_u32() as u8).collect()).collect();
    let scales: Vec<Vec<f32>> =
        tokens.iter().map(|&t| (0..t * (h / 128)).map(|_| rng.next_u32() as f32).collect()).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| vec![0.5; t * k]).collect();
    let r = Routing::new(n, e, k, idx.clone()).unwrap();
    let want = reference::ht_dispatch(&r, &x, &w, h, 1, None).unwrap();
    let aligned = reference::ht_dispatch(&r, &x, &w, h, 4, None).unwrap();
    let aligned_counts = aligned.ranks.iter().map(|rv| rv.num_recv_tokens_per_expert.clone()).collect();
    Fp8 { case, idx, tokens, x, scales, w, want, aligned_counts }
}

/// One rank's fp8 dispatch: payload bytes, scales (moved untouched) and aligned counts.
pub fn check_fp8_rank(d: &Fp8, group: &Group) {
    let (rank, h, k, e) = (group.rank(), d.case.hidden, d.case.num_topk, d.case.num_experts);
    let num_scales = h / 128;
    let mut buf = HtBuffer::new(group, d.case.config(num_scales)).unwrap();
    let s = group.stream();
    let t = d.tokens[rank];
    let (topk, weights) = (upload(group, &d.idx[rank]), upload(group, &d.w[rank]));
    let (xb, sb) = (upload(group, &d.x[rank]), upload(group, &d.scales[rank]));
    let layout = get_dispatch_layout(group, &topk, IndexType::I64, t, k, e).unwrap();
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
    let out = buf.dispatch(group, &args).unwrap();
    s.synchronize().unwrap();
    group.take_device_error("ht_dispatch").unwrap();
    let rv = &d.want.ranks[rank];
    let m = rv.num_recv_tokens;
    assert_eq!(out.num_recv_tokens, Some(m));
    let got: Vec<u8> = out.recv_x.to_vec(s).unwrap();
    assert!(got[..m * h] == rv.recv_x[..], "rank {rank}: fp8 payload");
    // expert_alignment = 4 rounds the per-expert counts up.
    let counts = out.num_recv_tokens_per_expert_list.clone().unwrap();
    assert_eq!(counts, d.aligned_counts[rank]);
    assert!(counts.iter().all(|c| c % 4 == 0));
    let got_scales: Vec<f32> = out.recv_x_scales.to_vec(s).unwrap();
    for (row, src) in d.want.handle.recv_sources(rank).iter().enumerate() {
        let from = &d.scales[src.rank][src.token * num_scales..(src.token + 1) * num_scales];
        assert_eq!(&got_scales[row * num_scales..(row + 1) * num_scales], from, "rank {rank} row {row}");
    }
    group.bootstrap().barrier().unwrap();
}

/// DeepEP's pressure check: dispatch + combine of the same inputs `reruns` times.
pub struct Reruns {
    pub case: Case,
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub x: Vec<Vec<u16>>,
    pub w: Vec<Vec<f32>>,
    /// Per rank, the hash of the reference's outputs (what every rerun must hash to).
    pub want_hash: Vec<u64>,
}

/// Hash of one rank's dispatch + combine outputs (valid rows only).
pub struct Outputs<'a> {
    pub recv_x: &'a [u16],
    pub recv_topk_idx: &'a [i64],
    pub recv_topk_weights: &'a [f32],
    pub recv_src_idx: &'a [i32],
    pub combined_x: &'a [u16],
    pub combined_topk_weights: &'a [f32],
}

impl Outputs<'_> {
    /// A hash that is the same in every process of one build (`DefaultHasher::new()` has
    /// fixed keys), so a child's hash can be compared with its parent's.
    pub fn hash(&self) -> u64 {
        let mut hs = std::collections::hash_map::DefaultHasher::new();
        self.recv_x.hash(&mut hs);
        self.recv_topk_idx.hash(&mut hs);
        self.recv_topk_weights.iter().map(|w| w.to_bits()).for_each(|b| b.hash(&mut hs));
        self.recv_src_idx.hash(&mut hs);
        self.combined_x.hash(&mut hs);
        self.combined_topk_weights.iter().map(|w| w.to_bits()).for_each(|b| b.hash(&mut hs));
        hs.finish()
    }
}

/// Rerun inputs (hidden 64, top-4 of 16) for `n` ranks, and the reference's hashes.
pub fn prepare_reruns(n: usize, max_tokens: usize, rng: &mut Rng) -> Reruns {
    let case = Case::new(16, 64, 4, max_tokens);
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    let idx = routing(rng, n, &case, 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 1e9).collect()).collect();
    let r = Routing::new(n, e, k, idx.clone()).unwrap();
    let d = reference::ht_dispatch(&r, &x, &w, h, 1, None).unwrap();
    // The op combines what it received, with the received weights and no bias.
    let y: Vec<Vec<u16>> = d.ranks.iter().map(|rv| rv.recv_x.clone()).collect();
    let rw: Vec<Vec<f32>> = d.ranks.iter().map(|rv| rv.recv_topk_weights.clone()).collect();
    let c = reference::ht_combine(&d.handle, &y, Some(&rw), [None, None], h).unwrap();
    let want_hash = (0..n)
        .map(|r| {
            Outputs {
                recv_x: &d.ranks[r].recv_x,
                recv_topk_idx: &d.ranks[r].recv_topk_idx,
                recv_topk_weights: &d.ranks[r].recv_topk_weights,
                recv_src_idx: &d.ranks[r].recv_src_idx,
                combined_x: &c[r].combined_x,
                combined_topk_weights: c[r].combined_topk_weights.as_deref().unwrap_or(&[]),
            }
            .hash()
        })
        .collect();
    Reruns { case, idx, tokens, x, w, want_hash }
}

/// One rank's side of `reruns` dispatch + combine calls; asserts every rerun hashes to the
/// reference's hash and returns that hash (the multi-process harness compares it again).
pub fn check_reruns_rank(d: &Reruns, reruns: usize, group: &Group) -> u64 {
    let (rank, h, k, e) = (group.rank(), d.case.hidden, d.case.num_topk, d.case.num_experts);
    let mut buf = HtBuffer::new(group, d.case.config(0)).unwrap();
    let s = group.stream();
    let t = d.tokens[rank];
    let (topk, weights, xb) = (upload(group, &d.idx[rank]), upload(group, &d.w[rank]), upload(group, &d.x[rank]));
    let layout = get_dispatch_layout(group, &topk, IndexType::I64, t, k, e).unwrap();
    let mut last = None;
    for rerun in 0..reruns {
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
        let out = buf.dispatch(group, &args).unwrap();
        let c =
            buf.combine(group, &out.handle, &out.recv_x, h, Some((&out.recv_topk_weights, k)), [None, None]).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht dispatch+combine").unwrap();
        let rows = out.handle.num_rows;
        let hash = Outputs {
            recv_x: &out.recv_x.to_vec::<u16>(s).unwrap()[..rows * h],
            recv_topk_idx: &out.recv_topk_idx.to_vec::<i64>(s).unwrap()[..rows * k],
            recv_topk_weights: &out.recv_topk_weights.to_vec::<f32>(s).unwrap()[..rows * k],
            recv_src_idx: &out.recv_src_idx.to_vec::<i32>(s).unwrap()[..rows],
            combined_x: &c.combined_x.to_vec::<u16>(s).unwrap()[..t * h],
            combined_topk_weights: &c.combined_topk_weights.unwrap().to_vec::<f32>(s).unwrap()[..t * k],
        }
        .hash();
        assert_eq!(hash, d.want_hash[rank], "rank {rank}: rerun {rerun} hashes differently from the reference");
        last = Some(hash);
    }
    group.bootstrap().barrier().unwrap();
    last.expect("at least one rerun")
}

/// Graph-replay inputs (hidden 64, top-4 of 16, padded outputs): one routing and three sets
/// of token values, each with the reference's dispatch and the combine of what was received
/// (identity experts, the received weights, no bias).
pub struct Graph {
    pub case: Case,
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub w: Vec<Vec<f32>>,
    pub variants: Vec<GraphVariant>,
}

/// One set of token values and what the reference makes of it.
pub struct GraphVariant {
    pub x: Vec<Vec<u16>>,
    pub want: HtDispatch<u16>,
    pub combined: Vec<HtCombined>,
}

/// Graph-replay data for `n` ranks of up to `max_tokens` tokens.
pub fn prepare_graph(n: usize, max_tokens: usize, rng: &mut Rng) -> Graph {
    let case = Case { num_worst_tokens: Some(n * max_tokens), with_bias: false, ..Case::new(16, 64, 4, max_tokens) };
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    let idx = routing(rng, n, &case, 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 1e9).collect()).collect();
    let r = Routing::new(n, e, k, idx.clone()).unwrap();
    let variants = (0..3)
        .map(|_| {
            let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
            let d = reference::ht_dispatch(&r, &x, &w, h, 1, case.num_worst_tokens).unwrap();
            let y: Vec<Vec<u16>> = d.ranks.iter().map(|rv| rv.recv_x.clone()).collect();
            let rw: Vec<Vec<f32>> = d.ranks.iter().map(|rv| rv.recv_topk_weights.clone()).collect();
            let c = reference::ht_combine(&d.handle, &y, Some(&rw), [None, None], h).unwrap();
            GraphVariant { x, want: d, combined: c }
        })
        .collect();
    Graph { case, idx, tokens, w, variants }
}

/// Padded dispatch + combine into memory allocated up front (from the heap with
/// `in_heap`: the one-pass dispatch and the pulling combine), captured once (a CUDA graph
/// on a GPU, recorded launches on the CPU) and replayed `replays` times with new token
/// values; every output is poisoned before each replay and compared with the reference
/// after it. Returns whether the dispatch took the one-pass way.
pub fn check_graph_rank(d: &Graph, replays: usize, in_heap: bool, group: &Group) -> bool {
    let (rank, h, k, e) = (group.rank(), d.case.hidden, d.case.num_topk, d.case.num_experts);
    let (r, rows) = (group.num_ranks(), d.case.num_worst_tokens.unwrap());
    let cfg = HtConfig { heap_bytes: if in_heap { 4 << 20 } else { 0 }, ..d.case.config(0) };
    let mut buf = HtBuffer::new(group, cfg).unwrap();
    let s = group.stream();
    let t = d.tokens[rank];
    let (topk, weights) = (upload(group, &d.idx[rank]), upload(group, &d.w[rank]));
    let xb = upload(group, &d.variants[0].x[rank]);
    let layout = get_dispatch_layout(group, &topk, IndexType::I64, t, k, e).unwrap();
    let args = HtDispatchArgs {
        x: &xb,
        hidden_bytes: 2 * h,
        num_tokens: t,
        x_scales: None,
        topk: Some((&topk, IndexType::I64, &weights, k)),
        layout: &layout,
        expert_alignment: 1,
        num_worst_tokens: Some(rows),
    };
    let row_buf = |bytes: usize| match in_heap {
        true => buf.alloc_output(group, bytes).expect("room in the heap"),
        false => s.alloc(bytes).unwrap(),
    };
    let c = buf.num_channels();
    let into = HtDispatchBuffers {
        recv_x: row_buf(rows * 2 * h),
        recv_x_scales: s.alloc(16).unwrap(), // not written (no scales); not in the heap either
        recv_topk_idx: row_buf(rows * k * 8),
        recv_topk_weights: row_buf(rows * k * 4),
        recv_src_idx: row_buf(rows * 4),
        maps: HtMaps {
            num_recv_tokens_per_expert: s.alloc(4 * (e / r)).unwrap(),
            rank_prefix_matrix: s.alloc(4 * r * r).unwrap(),
            channel_prefix_matrix: s.alloc(4 * r * (c + 1)).unwrap(),
            num_recv_tokens: s.alloc(4).unwrap(),
            remote_row0: s.alloc(4 * r * c).unwrap(),
            send_head: s.alloc((4 * t * r).max(4)).unwrap(),
            is_token_in_rank: s.alloc((t * r).max(1)).unwrap(),
        },
    };
    let combined = HtCombineOutputs {
        combined_x: s.alloc((t * h * 2).max(16)).unwrap(),
        combined_topk_weights: Some(s.alloc((t * k * 4).max(4)).unwrap()),
    };
    // An ordinary call first (kernels loaded, rings warm), then the capture.
    group.bootstrap().barrier().unwrap();
    drop(buf.dispatch(group, &args).unwrap());
    s.synchronize().unwrap();
    group.take_device_error("ht_dispatch").unwrap();
    s.begin_capture().unwrap();
    let out = buf.dispatch_into(group, &args, into).unwrap();
    let comb =
        buf.combine_into(group, &out.handle, &out.recv_x, h, Some((&out.recv_topk_weights, k)), [None, None], combined);
    let comb = comb.unwrap();
    let graph = s.end_capture().unwrap();
    let one_pass = out.one_pass;
    // Instantiation can wait for kernels running on a shared GPU: all ranks first, then replay.
    group.bootstrap().barrier().unwrap();
    let cw = comb.combined_topk_weights.as_ref().unwrap();
    for replay in 0..replays {
        let GraphVariant { x, want, combined: want_c } = &d.variants[replay % 3];
        xb.write(s, 0, &x[rank]).unwrap();
        for b in [&out.recv_x, &out.recv_topk_idx, &out.recv_topk_weights, &out.recv_src_idx, &comb.combined_x, cw] {
            b.fill(s, 0xA5).unwrap(); // poison
        }
        group.bootstrap().barrier().unwrap();
        graph.launch(s).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht graph").unwrap();
        let (rv, ctx) = (&want.ranks[rank], format!("rank {rank} replay {replay}"));
        let m = rv.num_recv_tokens;
        assert!(out.recv_x.to_vec::<u16>(s).unwrap()[..m * h] == rv.recv_x[..m * h], "{ctx}: recv_x");
        assert_eq!(out.recv_src_idx.to_vec::<i32>(s).unwrap()[..rows], rv.recv_src_idx[..], "{ctx}: recv_src_idx");
        assert_eq!(out.recv_topk_idx.to_vec::<i64>(s).unwrap()[..rows * k], rv.recv_topk_idx[..], "{ctx}: topk_idx");
        let got_w: Vec<f32> = out.recv_topk_weights.to_vec(s).unwrap();
        assert!(got_w[..rows * k].iter().zip(&rv.recv_topk_weights).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}");
        let cx: Vec<u16> = comb.combined_x.to_vec(s).unwrap();
        assert!(cx[..t * h] == want_c[rank].combined_x[..], "{ctx}: combined_x");
        let got_cw: Vec<f32> = cw.to_vec(s).unwrap();
        let want_cw = want_c[rank].combined_topk_weights.as_ref().unwrap();
        assert!(got_cw[..t * k].iter().zip(want_cw).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}: weights");
    }
    group.bootstrap().barrier().unwrap();
    drop(graph);
    one_pass
}
