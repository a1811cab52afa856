//! LL checks, one rank's side, shared by the in-process tests (`tests/low_latency.rs`) and
//! the multi-process ones (`tests/multiprocess_ep.rs`); inputs come from one seeded [`Rng`]
//! so every process regenerates every rank's data and the reference's outputs.
use crate::{Rng, upload};
use moe_ep::layout::IndexType;
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlStats};
use moe_ep::reference::{self, LayoutRange, LlDispatch, Routing};
use moe_ep::{DeviceBuffer, Group};

/// Per rank, `[T_r, K]` distinct random experts per token (T_r in 1..=max_tokens, or 0 where
/// `empty(rank)`), each entry dropped (-1) with probability `1 / drop_one_in` (0: never).
pub fn random_routing(
    rng: &mut Rng,
    n: usize,
    (num_experts, num_topk, max_tokens): (usize, usize, usize),
    drop_one_in: u64,
    empty: impl Fn(usize) -> bool,
) -> Vec<Vec<i64>> {
    (0..n)
        .map(|r| {
            let t = if empty(r) { 0 } else { 1 + rng.below(max_tokens as u64) as usize };
            let mut v = Vec::new();
            for _ in 0..t {
                let mut row: Vec<i64> = Vec::new();
                while row.len() < num_topk {
                    let e = rng.below(num_experts as u64) as i64;
                    if !row.contains(&e) {
                        row.push(e);
                    }
                }
                if drop_one_in > 0 {
                    row.iter_mut().for_each(|e| {
                        if rng.below(drop_one_in) == 0 {
                            *e = -1
                        }
                    });
                }
                v.extend(row);
            }
            v
        })
        .collect()
}

/// A rank's LL statistics buffers ([`LlStats`]), zeroed: `[L]` i32 received rows per local
/// expert, `[R]` i64 wait cycles per rank of the dispatch's and of the combine's receive.
pub struct Stats {
    pub recv: DeviceBuffer,
    pub dispatch_wait: DeviceBuffer,
    pub combine_wait: DeviceBuffer,
}

impl Stats {
    pub fn new(group: &Group, num_local_experts: usize) -> Stats {
        let (s, r) = (group.stream(), group.num_ranks());
        Stats {
            recv: s.alloc(4 * num_local_experts).unwrap(),
            dispatch_wait: s.alloc(8 * r).unwrap(),
            combine_wait: s.alloc(8 * r).unwrap(),
        }
    }
    /// What a dispatch adds to.
    pub fn dispatch(&self) -> LlStats<'_> {
        LlStats {
            cumulative_local_expert_recv_stats: Some(&self.recv),
            dispatch_wait_recv_cost_stats: Some(&self.dispatch_wait),
            ..Default::default()
        }
    }
    /// What a combine adds to.
    pub fn combine(&self) -> LlStats<'_> {
        LlStats { combine_wait_recv_cost_stats: Some(&self.combine_wait), ..Default::default() }
    }
    /// The received rows so far (waits for the stream).
    pub fn recv(&self, group: &Group) -> Vec<i32> {
        self.recv.to_vec(group.stream()).unwrap()
    }
    /// The dispatch's and the combine's wait cycles so far (waits for the stream).
    pub fn waits(&self, group: &Group) -> (Vec<i64>, Vec<i64>) {
        let s = group.stream();
        (self.dispatch_wait.to_vec(s).unwrap(), self.combine_wait.to_vec(s).unwrap())
    }
}

/// The dispatch and combine statistics of `stats`, or none.
fn dispatch_stats(stats: Option<&Stats>) -> LlStats<'_> {
    stats.map_or_else(LlStats::default, Stats::dispatch)
}
fn combine_stats(stats: Option<&Stats>) -> LlStats<'_> {
    stats.map_or_else(LlStats::default, Stats::combine)
}

/// One LL test configuration: expert-major dispatch + weighted combine, `calls` times.
#[derive(Clone, Copy)]
pub struct Case {
    pub num_experts: usize,
    pub hidden: usize,
    pub num_topk: usize,
    pub max_tokens: usize,
    pub calls: usize,
    /// Every other call split into send + later receive (`send_only` and the hooks).
    pub hooks: bool,
}

/// One call's inputs for every rank and the reference's outputs.
pub struct Call {
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub x: Vec<Vec<u16>>,
    pub w: Vec<Vec<f32>>,
    pub want: LlDispatch<u16>,
    /// Expert outputs `[L, R·max_tokens, H]` per rank.
    pub y: Vec<Vec<u16>>,
    pub combined: Vec<Vec<u16>>,
}

/// Every call's inputs and reference outputs for `n` ranks.
pub fn prepare(case: &Case, n: usize, rng: &mut Rng) -> Vec<Call> {
    let (e, h, k, m) = (case.num_experts, case.hidden, case.num_topk, case.max_tokens);
    let l = e / n;
    (0..case.calls)
        .map(|call| {
            let idx = random_routing(rng, n, (e, k, m), 6, |r| (r + call) % 3 == 2);
            let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
            let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 4.0)).collect();
            let w: Vec<Vec<f32>> =
                tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect()).collect();
            let routing = Routing::new(n, e, k, idx.clone()).unwrap();
            let want = reference::ll_dispatch(&routing, &x, h, m).unwrap();
            let y: Vec<Vec<u16>> = (0..n).map(|_| rng.bf16(l * n * m * h, 4.0)).collect();
            let combined = reference::ll_combine(&want.handle, &y, &w, h).unwrap();
            Call { idx, tokens, x, w, want, y, combined }
        })
        .collect()
}

/// Pairs `(row, reference row)` of every received row (indices into `[L * R * M]`), matched
/// through the layout ranges: per (local expert, source) the `i`-th row of the kernel's
/// range is the `i`-th of the reference's (the ranges themselves may lie in any order).
pub fn matched_rows<T>(
    want: &reference::LlRecv<T>,
    ranges: &[i64],
    n: usize,
    max_tokens: usize,
) -> Vec<(usize, usize)> {
    let slots = n * max_tokens;
    let mut pairs = Vec::new();
    for (e, src) in (0..want.packed_recv_count.len()).flat_map(|e| (0..n).map(move |src| (e, src))) {
        let got = LayoutRange::unpack(ranges[e * n + src]);
        let w = LayoutRange::unpack(want.packed_recv_layout_range[e * n + src]);
        pairs.extend((0..got.count.min(w.count)).map(|i| (e * slots + got.begin + i, e * slots + w.begin + i)));
    }
    pairs
}

/// One rank's expert-major dispatch outputs `(packed_recv_x, src_info, counts, ranges)`
/// against the reference's: the same counts; per (local expert, source) the same number of
/// rows, the same source tokens and rows bit for bit. The ranges of different sources may
/// lie in any order (arrival) but must tile `0..count` of each expert.
pub fn check_expert_major<T: PartialEq + Copy + std::fmt::Debug>(
    want: &reference::LlRecv<T>,
    (got_x, got_src, counts, ranges): (&[T], &[i32], &[i32], &[i64]),
    n: usize,
    max_tokens: usize,
    hidden: usize,
    ctx: &str,
) {
    assert_eq!(counts, &want.packed_recv_count[..], "{ctx}: counts");
    let slots = n * max_tokens;
    for (e, &cnt) in counts.iter().enumerate() {
        let mut covered = vec![false; cnt as usize];
        for src in 0..n {
            let got = LayoutRange::unpack(ranges[e * n + src]);
            let w = LayoutRange::unpack(want.packed_recv_layout_range[e * n + src]);
            assert_eq!(got.count, w.count, "{ctx}: rows from rank {src} at expert {e}");
            assert!(got.begin + got.count <= cnt as usize, "{ctx}: range {got:?} of rank {src} past expert {e}'s rows");
            for i in 0..got.count {
                assert!(!std::mem::replace(&mut covered[got.begin + i], true), "{ctx}: ranges overlap at expert {e}");
                let (g, r) = (e * slots + got.begin + i, e * slots + w.begin + i);
                assert_eq!(
                    got_src[g], want.packed_recv_src_info[r],
                    "{ctx}: src info of expert {e}, rank {src}, row {i}"
                );
                assert!(
                    got_x[g * hidden..(g + 1) * hidden] == want.packed_recv_x[r * hidden..(r + 1) * hidden],
                    "{ctx}: row {i} from rank {src} at expert {e}"
                );
            }
        }
    }
}

/// One rank's side of every call: counts, layout ranges, source info and rows of every
/// local expert, and the combined tokens, bit for bit against the reference. Some ranks'
/// expert outputs go through the zero-copy buffer (pulled), the others' are pushed.
pub fn check_rank(case: &Case, calls: &[Call], group: &Group) {
    let cfg = LlConfig { num_experts: case.num_experts, hidden: case.hidden, max_tokens: case.max_tokens };
    check_rank_on(&mut LlBuffer::new(group, cfg).unwrap(), case, calls, group, None);
}

/// [`check_rank`] on an existing buffer (built for `case`'s shapes), adding to `stats` if
/// given (a send-only dispatch's receive half adds the counts: checked).
pub fn check_rank_on(buf: &mut LlBuffer, case: &Case, calls: &[Call], group: &Group, stats: Option<&Stats>) {
    let (rank, n) = (group.rank(), group.num_ranks());
    let (hidden, num_topk, max_tokens) = (case.hidden, case.num_topk, case.max_tokens);
    let s = group.stream();
    for (call, c) in calls.iter().enumerate() {
        let ctx = format!("rank {rank} call {call}");
        let t = c.tokens[rank];
        let (topk, weights, xb, yb) = (
            upload(group, &c.idx[rank]),
            upload(group, &c.w[rank]),
            upload(group, &c.x[rank]),
            upload(group, &c.y[rank]),
        );
        group.bootstrap().barrier().unwrap();
        let send_only = case.hooks && call % 2 == 0;
        let opts = LlDispatchOptions { send_only, ..Default::default() };
        let before = stats.map(|st| st.recv(group));
        let mut out =
            buf.dispatch(group, &xb, t, &topk, IndexType::I64, num_topk, opts, dispatch_stats(stats)).unwrap();
        assert_eq!(out.recv_hook.is_some(), send_only);
        if let (true, Some(st)) = (send_only, stats) {
            assert_eq!(Some(st.recv(group)), before, "{ctx}: received-rows statistics before the receive half");
        }
        out.complete(group, buf).unwrap();
        // The expert outputs in this dispatch's row order (the reference's, per matched row).
        let ranges: Vec<i64> = out.handle.packed_recv_layout_range.to_vec(s).unwrap();
        let mut y = vec![0u16; c.y[rank].len()];
        for (row, want_row) in matched_rows(&c.want.ranks[rank], &ranges, n, max_tokens) {
            y[row * hidden..(row + 1) * hidden].copy_from_slice(&c.y[rank][want_row * hidden..(want_row + 1) * hidden]);
        }
        // Zero-copy on some ranks and calls: those owners' rows are pulled, the others' pushed.
        let zero_copy = (rank + call) % 3 != 0;
        let y_in = if zero_copy { buf.combine_buffer(&out.handle) } else { yb };
        y_in.write(s, 0, &y).unwrap();
        let mut comb = buf
            .combine(
                group,
                &out.handle,
                &y_in,
                t,
                &topk,
                IndexType::I64,
                &weights,
                num_topk,
                send_only,
                combine_stats(stats),
            )
            .unwrap();
        comb.complete(group, buf).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ll dispatch+combine").unwrap();
        let got_x: Vec<u16> = out.packed_recv_x.to_vec(s).unwrap();
        let got_src: Vec<i32> = out.handle.packed_recv_src_info.to_vec(s).unwrap();
        let counts: Vec<i32> = out.packed_recv_count.to_vec(s).unwrap();
        check_expert_major(&c.want.ranks[rank], (&got_x, &got_src, &counts, &ranges), n, max_tokens, hidden, &ctx);
        let got: Vec<u16> = comb.combined_x.to_vec(s).unwrap();
        assert!(got[..t * hidden] == c.combined[rank][..], "{ctx}: combined_x");
    }
    group.bootstrap().barrier().unwrap();
}

/// Token values per rank and the combined tokens they give per rank (bf16 bits).
pub type Variant = (Vec<Vec<u16>>, Vec<Vec<u16>>);

/// Graph-replay inputs: one routing, three sets of token values, identity experts.
pub struct Graph {
    pub case: Case,
    pub idx: Vec<Vec<i64>>,
    pub tokens: Vec<usize>,
    pub w: Vec<Vec<f32>>,
    /// (x per rank, combined_x per rank), bf16 bits.
    pub variants: Vec<Variant>,
}

/// Graph-replay data (16 experts, hidden 64, top-4) for `n` ranks.
pub fn prepare_graph(n: usize, max_tokens: usize, rng: &mut Rng) -> Graph {
    let case = Case { num_experts: 16, hidden: 64, num_topk: 4, max_tokens, calls: 1, hooks: false };
    let (e, h, k, m) = (case.num_experts, case.hidden, case.num_topk, max_tokens);
    let idx = random_routing(rng, n, (e, k, m), 0, |_| false);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let w: Vec<Vec<f32>> =
        tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect()).collect();
    let routing = Routing::new(n, e, k, idx.clone()).unwrap();
    let variants = (0..3)
        .map(|_| {
            let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 4.0)).collect();
            let d = reference::ll_dispatch(&routing, &x, h, m).unwrap();
            let y: Vec<Vec<u16>> = d.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
            (x, reference::ll_combine(&d.handle, &y, &w, h).unwrap())
        })
        .collect();
    Graph { case, idx, tokens, w, variants }
}

/// Dispatch + combine captured once (a CUDA graph on a GPU, recorded launches on the CPU)
/// and replayed `replays` times with new token values in the same buffers; returns the
/// hash of the last replay's combined tokens (identical in every process of one build).
/// Every call (the first, ordinary one and each replay) adds to `stats` if given.
pub fn check_graph_rank(d: &Graph, replays: usize, group: &Group, stats: Option<&Stats>) -> u64 {
    let rank = group.rank();
    let (e, h, k, m) = (d.case.num_experts, d.case.hidden, d.case.num_topk, d.case.max_tokens);
    let mut buf = LlBuffer::new(group, LlConfig { num_experts: e, hidden: h, max_tokens: m }).unwrap();
    let s = group.stream();
    let t = d.tokens[rank];
    let (topk, weights, xb) =
        (upload(group, &d.idx[rank]), upload(group, &d.w[rank]), upload(group, &d.variants[0].0[rank]));
    group.bootstrap().barrier().unwrap();
    // A first, ordinary call creates the buffers the captured calls reuse.
    let opts = LlDispatchOptions::default();
    let out = buf.dispatch(group, &xb, t, &topk, IndexType::I64, k, opts, dispatch_stats(stats)).unwrap();
    let y = &out.packed_recv_x;
    let c =
        buf.combine(group, &out.handle, y, t, &topk, IndexType::I64, &weights, k, false, combine_stats(stats)).unwrap();
    s.synchronize().unwrap();
    group.take_device_error("ll").unwrap();
    s.begin_capture().unwrap();
    buf.dispatch_into(group, &out, &xb, t, &topk, IndexType::I64, k, opts, dispatch_stats(stats)).unwrap();
    buf.combine_into(
        group,
        &out.handle,
        &out.packed_recv_x,
        &c.combined_x,
        t,
        &topk,
        IndexType::I64,
        &weights,
        k,
        false,
        combine_stats(stats),
    )
    .unwrap();
    let graph = s.end_capture().unwrap();
    // Instantiation can wait for kernels running on a shared GPU: all ranks first, then replay.
    group.bootstrap().barrier().unwrap();
    let mut last = 0;
    for replay in 0..replays {
        let (x, want) = &d.variants[replay % 3];
        xb.write(s, 0, &x[rank]).unwrap();
        c.combined_x.fill(s, 0xEE).unwrap(); // poison
        group.bootstrap().barrier().unwrap();
        graph.launch(s).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ll graph").unwrap();
        let got: Vec<u16> = c.combined_x.to_vec(s).unwrap();
        assert!(got[..t * h] == want[rank][..], "rank {rank} replay {replay}: combined_x");
        last = hash_u16(&got[..t * h]);
    }
    group.bootstrap().barrier().unwrap();
    last
}

/// `DefaultHasher::new()` has fixed keys: the same value in every process of one build.
pub fn hash_u16(v: &[u16]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hs = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut hs);
    hs.finish()
}

/// fp8 rows (any e4m3 bytes: they are moved, never read) and their f32 scales, per rank.
pub type Fp8Rows = (Vec<Vec<u8>>, Vec<Vec<f32>>);

/// Fresh fp8 input for a rank-major dispatch of `routing` (`tokens[r]` tokens of hidden `h`,
/// at most `m` per rank, weights `w`), and what each rank receives: rows and scales land
/// where bf16 rows would (`reference::ll_dispatch_rank_major` over each). (input, received).
pub fn fp8_rank_major(
    rng: &mut Rng,
    routing: &Routing,
    tokens: &[usize],
    w: &[Vec<f32>],
    h: usize,
    m: usize,
) -> (Fp8Rows, Fp8Rows) {
    let rows: Vec<Vec<u8>> = tokens.iter().map(|&t| (0..t * h).map(|_| rng.next_u32() as u8).collect()).collect();
    let scales: Vec<Vec<f32>> =
        tokens.iter().map(|&t| (0..t * h / 128).map(|_| rng.next_u32() as f32 / 3e9).collect()).collect();
    let moved_rows = reference::ll_dispatch_rank_major(routing, &rows, w, h, m).unwrap();
    let moved_scales = reference::ll_dispatch_rank_major(routing, &scales, w, h / 128, m).unwrap();
    let received =
        (moved_rows.into_iter().map(|r| r.recv_x).collect(), moved_scales.into_iter().map(|r| r.recv_x).collect());
    ((rows, scales), received)
}
