//! Property tests of the CPU reference of dispatch/combine (`moe_ep::reference`).

use moe_ep::Error;
use moe_ep::reference::{
    BF16_NAN, LayoutRange, Routing, TokenSource, bf16_to_f32, f32_to_bf16, get_dispatch_layout, ht_combine,
    ht_dispatch, ll_combine, ll_dispatch, ll_dispatch_rank_major,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Random cases
// ---------------------------------------------------------------------------------------

/// splitmix64: the test data comes from a seed that proptest picks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A bf16 small integer in -15..=15: sums of up to 8 copies stay exact.
    fn small_bf16(&mut self) -> u16 {
        f32_to_bf16(self.below(31) as f32 - 15.0)
    }

    /// A power of two in {1/4, 1/2, 1, 2} with a random sign: weighted sums stay exact in f32.
    fn pow2_weight(&mut self) -> f32 {
        let magnitude = [0.25, 0.5, 1.0, 2.0][self.below(4)];
        if self.below(2) == 0 { magnitude } else { -magnitude }
    }
}

#[derive(Debug, Clone)]
struct Case {
    routing: Routing,
    hidden: usize,
    /// `[T_r, H]` bf16 small integers per rank.
    x: Vec<Vec<u16>>,
    /// `[T_r, K]` powers of two per rank.
    weights: Vec<Vec<f32>>,
    /// Two `[T_r, H]` bf16 bias tensors.
    bias: [Vec<Vec<u16>>; 2],
}

impl Case {
    fn num_tokens(&self) -> Vec<usize> {
        (0..self.routing.num_ranks()).map(|r| self.routing.num_tokens(r)).collect()
    }

    fn max_tokens(&self) -> usize {
        self.num_tokens().into_iter().max().unwrap_or(0)
    }

    /// Experts of token `t` of rank `r`, -1 entries dropped.
    fn experts(&self, r: usize, t: usize) -> Vec<usize> {
        let k = self.routing.num_topk();
        self.routing.topk_idx(r)[t * k..(t + 1) * k].iter().filter(|&&e| e >= 0).map(|&e| e as usize).collect()
    }

    /// Sorted ranks that hold at least one expert of token `t` of rank `r`.
    fn dest_ranks(&self, r: usize, t: usize) -> Vec<usize> {
        let mut ranks: Vec<usize> = self.experts(r, t).iter().map(|&e| self.routing.rank_of_expert(e)).collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }

    fn row<'a>(&self, data: &'a [Vec<u16>], r: usize, t: usize) -> &'a [u16] {
        &data[r][t * self.hidden..(t + 1) * self.hidden]
    }
}

fn build_case(
    num_ranks: usize,
    experts_per_rank: usize,
    topk: usize,
    hidden: usize,
    drop_eighths: usize,
    seed: u64,
) -> Case {
    let mut rng = Rng(seed);
    let num_experts = num_ranks * experts_per_rank;
    let topk = topk.min(num_experts);
    let mut topk_idx = Vec::new();
    for _ in 0..num_ranks {
        let num_tokens = rng.below(13);
        let mut idx = Vec::new();
        for _ in 0..num_tokens {
            // Distinct experts: a partial Fisher-Yates shuffle, then some entries dropped to -1.
            let mut experts: Vec<i64> = (0..num_experts as i64).collect();
            let drop_all = rng.below(10) == 0;
            for k in 0..topk {
                let j = k + rng.below(num_experts - k);
                experts.swap(k, j);
                let dropped = drop_all || rng.below(8) < drop_eighths;
                idx.push(if dropped { -1 } else { experts[k] });
            }
        }
        topk_idx.push(idx);
    }
    let routing = Routing::new(num_ranks, num_experts, topk, topk_idx).expect("valid routing");
    let tokens: Vec<usize> = (0..num_ranks).map(|r| routing.num_tokens(r)).collect();
    let x = tokens.iter().map(|&t| (0..t * hidden).map(|_| rng.small_bf16()).collect()).collect();
    let weights = tokens.iter().map(|&t| (0..t * topk).map(|_| rng.pow2_weight()).collect()).collect();
    let mut bias = || tokens.iter().map(|&t| (0..t * hidden).map(|_| rng.small_bf16()).collect()).collect();
    let bias = [bias(), bias()];
    Case { routing, hidden, x, weights, bias }
}

fn arb_case() -> impl Strategy<Value = Case> {
    (1..=8usize, 1..=8usize, 1..=8usize, 1..=3usize, 0..=4usize, any::<u64>())
        .prop_map(|(r, l, k, h8, drop, seed)| build_case(r, l, k, 8 * h8, drop, seed))
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

fn is_invalid<T>(result: moe_ep::Result<T>) -> bool {
    matches!(result, Err(Error::InvalidArgument { .. }))
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn layout_matches_brute_force(case in arb_case()) {
        let routing = &case.routing;
        let (num_ranks, num_experts, k) = (routing.num_ranks(), routing.num_experts(), routing.num_topk());
        for r in 0..num_ranks {
            let layout = get_dispatch_layout(routing.topk_idx(r), k, num_ranks, num_experts).unwrap();
            let num_tokens = routing.num_tokens(r);
            let mut per_rank = vec![0; num_ranks];
            let mut per_expert = vec![0; num_experts];
            let mut in_rank = vec![false; num_tokens * num_ranks];
            for t in 0..num_tokens {
                for e in case.experts(r, t) {
                    per_expert[e] += 1;
                }
                for d in case.dest_ranks(r, t) {
                    per_rank[d] += 1;
                    in_rank[t * num_ranks + d] = true;
                }
            }
            prop_assert_eq!(&layout.num_tokens_per_rank, &per_rank);
            prop_assert_eq!(&layout.num_tokens_per_expert, &per_expert);
            prop_assert_eq!(&layout.is_token_in_rank, &in_rank);
        }
    }
}

// ---------------------------------------------------------------------------------------
// High-throughput dispatch / combine
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ht_dispatch_matches_brute_force(case in arb_case(), alignment in 1..=4usize) {
        let routing = &case.routing;
        let (num_ranks, k, h) = (routing.num_ranks(), routing.num_topk(), case.hidden);
        let local_experts = routing.experts_per_rank();
        let out = ht_dispatch(routing, &case.x, &case.weights, h, alignment, None).unwrap();
        prop_assert_eq!(out.ranks.len(), num_ranks);

        let mut total_rows = 0;
        for (dst, recv) in out.ranks.iter().enumerate() {
            // Expected rows: (src rank, src token) ascending, tokens with an expert on dst.
            let expected: Vec<TokenSource> = (0..num_ranks)
                .flat_map(|s| (0..routing.num_tokens(s)).map(move |t| TokenSource { rank: s, token: t }))
                .filter(|src| case.dest_ranks(src.rank, src.token).contains(&dst))
                .collect();
            let n = expected.len();
            total_rows += n;
            prop_assert_eq!(recv.num_recv_tokens, n);
            prop_assert_eq!(out.handle.recv_sources(dst), expected.as_slice());
            prop_assert_eq!(recv.recv_x.len(), n * h);
            prop_assert_eq!(recv.recv_topk_idx.len(), n * k);
            prop_assert_eq!(recv.recv_topk_weights.len(), n * k);
            let mut per_expert = vec![0usize; local_experts];
            for (row, src) in expected.iter().enumerate() {
                prop_assert_eq!(recv.recv_src_idx[row], src.token as i32);
                prop_assert_eq!(&recv.recv_x[row * h..(row + 1) * h], case.row(&case.x, src.rank, src.token));
                for j in 0..k {
                    let e = routing.topk_idx(src.rank)[src.token * k + j];
                    let idx = recv.recv_topk_idx[row * k + j];
                    let w = recv.recv_topk_weights[row * k + j];
                    if e >= 0 && routing.rank_of_expert(e as usize) == dst {
                        prop_assert_eq!(idx, routing.local_expert(e as usize) as i64);
                        prop_assert_eq!(w, case.weights[src.rank][src.token * k + j]);
                        per_expert[idx as usize] += 1;
                    } else {
                        prop_assert_eq!(idx, -1);
                        prop_assert_eq!(w, 0.0);
                    }
                }
            }
            let aligned: Vec<i32> =
                per_expert.iter().map(|&c| (c.div_ceil(alignment) * alignment) as i32).collect();
            prop_assert_eq!(&recv.num_recv_tokens_per_expert, &aligned);
            prop_assert!(aligned.iter().all(|&c| (c as usize).is_multiple_of(alignment)));
        }

        // Conservation: rows received = Σ over tokens of the number of ranks they go to.
        let sent: usize = (0..num_ranks)
            .map(|s| (0..routing.num_tokens(s)).map(|t| case.dest_ranks(s, t).len()).sum::<usize>())
            .sum();
        prop_assert_eq!(total_rows, sent);

        // rank_prefix_matrix[i][j] = tokens rank j receives from ranks 0..=i.
        let matrix = out.handle.rank_prefix_matrix();
        prop_assert_eq!(matrix.len(), num_ranks * num_ranks);
        for j in 0..num_ranks {
            let sources = out.handle.recv_sources(j);
            for i in 0..num_ranks {
                let from_upto_i = sources.iter().filter(|s| s.rank <= i).count();
                prop_assert_eq!(matrix[i * num_ranks + j] as usize, from_upto_i);
            }
            prop_assert_eq!(matrix[(num_ranks - 1) * num_ranks + j] as usize, out.ranks[j].num_recv_tokens);
        }
    }

    #[test]
    fn ht_num_worst_tokens_pads(case in arb_case(), extra in 0..=5usize) {
        let (k, h) = (case.routing.num_topk(), case.hidden);
        let plain = ht_dispatch(&case.routing, &case.x, &case.weights, h, 1, None).unwrap();
        let most = plain.ranks.iter().map(|r| r.num_recv_tokens).max().unwrap_or(0);
        let worst = most + extra;
        let padded = ht_dispatch(&case.routing, &case.x, &case.weights, h, 1, Some(worst)).unwrap();
        for (p, q) in plain.ranks.iter().zip(&padded.ranks) {
            let n = p.num_recv_tokens;
            prop_assert_eq!(q.num_recv_tokens, n);
            prop_assert_eq!(q.recv_x.len(), worst * h);
            prop_assert_eq!(&q.recv_x[..n * h], p.recv_x.as_slice());
            prop_assert!(q.recv_x[n * h..].iter().all(|&v| v == 0));
            prop_assert_eq!(&q.recv_topk_idx[..n * k], p.recv_topk_idx.as_slice());
            prop_assert!(q.recv_topk_idx[n * k..].iter().all(|&i| i == -1));
            prop_assert_eq!(&q.recv_topk_weights[..n * k], p.recv_topk_weights.as_slice());
            prop_assert!(q.recv_topk_weights[n * k..].iter().all(|&w| w == 0.0));
            prop_assert_eq!(&q.recv_src_idx[..n], p.recv_src_idx.as_slice());
            prop_assert!(q.recv_src_idx[n..].iter().all(|&i| i == -1));
            prop_assert_eq!(&q.num_recv_tokens_per_expert, &p.num_recv_tokens_per_expert);
        }

        // Combining the padded outputs (identity experts) equals combining the plain ones.
        let ys = |d: &moe_ep::reference::HtDispatch<u16>| d.ranks.iter().map(|r| r.recv_x.clone()).collect::<Vec<_>>();
        let ws = |d: &moe_ep::reference::HtDispatch<u16>| {
            d.ranks.iter().map(|r| r.recv_topk_weights.clone()).collect::<Vec<_>>()
        };
        let a = ht_combine(&plain.handle, &ys(&plain), Some(&ws(&plain)), [None, None], h).unwrap();
        let b = ht_combine(&padded.handle, &ys(&padded), Some(&ws(&padded)), [None, None], h).unwrap();
        prop_assert_eq!(a, b);

        // A padded size below what some rank receives is an error.
        if most > 0 {
            prop_assert!(is_invalid(ht_dispatch(&case.routing, &case.x, &case.weights, h, 1, Some(most - 1))));
        }
    }

    #[test]
    fn ht_combine_of_dispatch_sums_copies(case in arb_case(), with_bias in any::<bool>()) {
        let routing = &case.routing;
        let (num_ranks, k, h) = (routing.num_ranks(), routing.num_topk(), case.hidden);
        let dispatched = ht_dispatch(routing, &case.x, &case.weights, h, 1, None).unwrap();
        // Identity experts: each rank returns what it received.
        let y: Vec<Vec<u16>> = dispatched.ranks.iter().map(|r| r.recv_x.clone()).collect();
        let w: Vec<Vec<f32>> = dispatched.ranks.iter().map(|r| r.recv_topk_weights.clone()).collect();
        let bias = if with_bias { [Some(case.bias[0].as_slice()), Some(case.bias[1].as_slice())] } else { [None, None] };
        let combined = ht_combine(&dispatched.handle, &y, Some(&w), bias, h).unwrap();
        prop_assert_eq!(combined.len(), num_ranks);
        for (s, out) in combined.iter().enumerate() {
            let t_s = routing.num_tokens(s);
            prop_assert_eq!(out.combined_x.len(), t_s * h);
            let weights = out.combined_topk_weights.as_ref().unwrap();
            for t in 0..t_s {
                let copies = case.dest_ranks(s, t).len() as f32;
                for i in 0..h {
                    let at = t * h + i;
                    let mut expected = copies * bf16_to_f32(case.x[s][at]);
                    if with_bias {
                        expected += bf16_to_f32(case.bias[0][s][at]) + bf16_to_f32(case.bias[1][s][at]);
                    }
                    // Small integers: every partial sum is exact, so equality is exact.
                    prop_assert_eq!(bf16_to_f32(out.combined_x[at]), expected);
                }
                for j in 0..k {
                    let e = routing.topk_idx(s)[t * k + j];
                    let expected = if e >= 0 { case.weights[s][t * k + j] } else { 0.0 };
                    prop_assert_eq!(weights[t * k + j], expected);
                }
            }
        }
        // Without weights, no combined weights.
        let combined = ht_combine(&dispatched.handle, &y, None, [None, None], h).unwrap();
        prop_assert!(combined.iter().all(|c| c.combined_topk_weights.is_none()));
    }
}

#[test]
fn ht_combine_adds_bias_first() {
    // One token on rank 0, sent to both ranks. In f32, (2^24 + 2^16) + 1 + 1 stays at 2^24 + 2^16
    // (each +1 is a tie that rounds to even), a bf16 tie that rounds down to 2^24; summing the
    // copies first would give 2^24 + 2^16 + 2, which rounds up to 2^24 + 2^17.
    let routing = Routing::new(2, 2, 2, vec![vec![0, 1], vec![]]).unwrap();
    let h = 8;
    let x = vec![vec![f32_to_bf16(1.0); h], vec![]];
    let d = ht_dispatch(&routing, &x, &[vec![1.0, 1.0], vec![]], h, 1, None).unwrap();
    let y: Vec<Vec<u16>> = d.ranks.iter().map(|r| r.recv_x.clone()).collect();
    let b0 = vec![vec![f32_to_bf16(16_777_216.0); h], vec![]];
    let b1 = vec![vec![f32_to_bf16(65_536.0); h], vec![]];
    let out = ht_combine(&d.handle, &y, None, [Some(&b0), Some(&b1)], h).unwrap();
    assert!(out[0].combined_x.iter().all(|&v| bf16_to_f32(v) == 16_777_216.0));
}

// ---------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ll_dispatch_matches_brute_force(case in arb_case(), spare in 0..=3usize) {
        let routing = &case.routing;
        let (num_ranks, h) = (routing.num_ranks(), case.hidden);
        let local_experts = routing.experts_per_rank();
        let max_tokens = case.max_tokens() + spare;
        let slots = num_ranks * max_tokens;
        let out = ll_dispatch(routing, &case.x, h, max_tokens).unwrap();
        prop_assert_eq!(out.handle.num_max_dispatch_tokens_per_rank(), max_tokens);

        let mut total_rows = 0usize;
        for (dst, recv) in out.ranks.iter().enumerate() {
            prop_assert_eq!(recv.packed_recv_x.len(), local_experts * slots * h);
            prop_assert_eq!(recv.packed_recv_src_info.len(), local_experts * slots);
            prop_assert_eq!(recv.packed_recv_layout_range.len(), local_experts * num_ranks);
            prop_assert_eq!(recv.packed_recv_count.len(), local_experts);
            for l in 0..local_experts {
                let expert = dst * local_experts + l;
                let mut row = 0usize;
                for s in 0..num_ranks {
                    // Expected: tokens of s that selected this expert, in token order.
                    let tokens: Vec<usize> =
                        (0..routing.num_tokens(s)).filter(|&t| case.experts(s, t).contains(&expert)).collect();
                    let range = LayoutRange::unpack(recv.packed_recv_layout_range[l * num_ranks + s]);
                    prop_assert_eq!(range, LayoutRange { begin: row, count: tokens.len() });
                    for &t in &tokens {
                        let slot = l * slots + row;
                        prop_assert_eq!(recv.packed_recv_src_info[slot], t as i32);
                        prop_assert_eq!(&recv.packed_recv_x[slot * h..(slot + 1) * h], case.row(&case.x, s, t));
                        row += 1;
                    }
                }
                prop_assert_eq!(recv.packed_recv_count[l] as usize, row);
                total_rows += row;
                // Rows the kernels do not write are defined as zero / -1.
                prop_assert!(recv.packed_recv_src_info[l * slots + row..(l + 1) * slots].iter().all(|&i| i == -1));
                prop_assert!(recv.packed_recv_x[(l * slots + row) * h..(l + 1) * slots * h].iter().all(|&v| v == 0));
            }
        }
        // Conservation: one row per non -1 entry.
        let entries: usize = (0..num_ranks).map(|r| routing.topk_idx(r).iter().filter(|&&e| e >= 0).count()).sum();
        prop_assert_eq!(total_rows, entries);
    }

    #[test]
    fn ll_combine_of_dispatch_applies_weights(case in arb_case()) {
        let routing = &case.routing;
        let (k, h) = (routing.num_topk(), case.hidden);
        let max_tokens = case.max_tokens();
        let dispatched = ll_dispatch(routing, &case.x, h, max_tokens).unwrap();
        let y: Vec<Vec<u16>> = dispatched.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
        let combined = ll_combine(&dispatched.handle, &y, &case.weights, h).unwrap();
        for (s, out) in combined.iter().enumerate() {
            prop_assert_eq!(out.len(), routing.num_tokens(s) * h);
            for t in 0..routing.num_tokens(s) {
                // Σ_k w (w of -1 entries ignored); powers of two and small integers keep f32 exact.
                let weight_sum: f32 =
                    (0..k).filter(|&j| routing.topk_idx(s)[t * k + j] >= 0).map(|j| case.weights[s][t * k + j]).sum();
                for i in 0..h {
                    // `+ 0.0`: the accumulator starts at +0.0, so an exact zero is +0.0.
                    let exact = bf16_to_f32(case.x[s][t * h + i]) * weight_sum + 0.0;
                    prop_assert_eq!(out[t * h + i], f32_to_bf16(exact));
                }
            }
        }
    }

    #[test]
    fn ll_rank_major_matches_brute_force(case in arb_case(), spare in 0..=3usize) {
        let routing = &case.routing;
        let (num_ranks, k, h) = (routing.num_ranks(), routing.num_topk(), case.hidden);
        let max_tokens = case.max_tokens() + spare;
        let out = ll_dispatch_rank_major(routing, &case.x, &case.weights, h, max_tokens).unwrap();
        let ht = ht_dispatch(routing, &case.x, &case.weights, h, 1, None).unwrap();
        for (dst, recv) in out.iter().enumerate() {
            prop_assert_eq!(recv.recv_x.len(), num_ranks * max_tokens * h);
            let mut ht_row = 0;
            for s in 0..num_ranks {
                let tokens: Vec<usize> =
                    (0..routing.num_tokens(s)).filter(|&t| case.dest_ranks(s, t).contains(&dst)).collect();
                prop_assert_eq!(recv.recv_count[s] as usize, tokens.len());
                for (row, &t) in tokens.iter().enumerate() {
                    let slot = s * max_tokens + row;
                    prop_assert_eq!(recv.recv_src_idx[slot], t as i32);
                    prop_assert_eq!(&recv.recv_x[slot * h..(slot + 1) * h], case.row(&case.x, s, t));
                    // Same rows, same localized ids and weights as HT, just in fixed slots.
                    let ht_recv = &ht.ranks[dst];
                    prop_assert_eq!(&recv.recv_topk_idx[slot * k..(slot + 1) * k], &ht_recv.recv_topk_idx[ht_row * k..(ht_row + 1) * k]);
                    prop_assert_eq!(
                        &recv.recv_topk_weights[slot * k..(slot + 1) * k],
                        &ht_recv.recv_topk_weights[ht_row * k..(ht_row + 1) * k]
                    );
                    ht_row += 1;
                }
                for row in tokens.len()..max_tokens {
                    let slot = s * max_tokens + row;
                    prop_assert_eq!(recv.recv_src_idx[slot], -1);
                    prop_assert!(recv.recv_topk_idx[slot * k..(slot + 1) * k].iter().all(|&i| i == -1));
                    prop_assert!(recv.recv_x[slot * h..(slot + 1) * h].iter().all(|&v| v == 0));
                }
            }
            prop_assert_eq!(ht_row, ht.ranks[dst].num_recv_tokens);
        }
    }

    #[test]
    fn uneven_and_empty_ranks(case in arb_case(), empty_rank in 0..8usize) {
        // Force one rank to have no tokens and check every op still conserves tokens.
        let routing = &case.routing;
        let num_ranks = routing.num_ranks();
        let empty = empty_rank % num_ranks;
        let mut topk_idx: Vec<Vec<i64>> = (0..num_ranks).map(|r| routing.topk_idx(r).to_vec()).collect();
        topk_idx[empty].clear();
        let routing = Routing::new(num_ranks, routing.num_experts(), routing.num_topk(), topk_idx).unwrap();
        let mut x = case.x.clone();
        x[empty].clear();
        let mut weights = case.weights.clone();
        weights[empty].clear();
        let h = case.hidden;
        let ht = ht_dispatch(&routing, &x, &weights, h, 1, None).unwrap();
        prop_assert!(ht.ranks.iter().all(|r| r.recv_src_idx.len() == r.num_recv_tokens));
        let from_empty: usize = (0..num_ranks).map(|d| ht.handle.recv_sources(d).iter().filter(|s| s.rank == empty).count()).sum();
        prop_assert_eq!(from_empty, 0);
        let y: Vec<Vec<u16>> = ht.ranks.iter().map(|r| r.recv_x.clone()).collect();
        let combined = ht_combine(&ht.handle, &y, None, [None, None], h).unwrap();
        prop_assert!(combined[empty].combined_x.is_empty());

        let max_tokens = (0..num_ranks).map(|r| routing.num_tokens(r)).max().unwrap_or(0);
        let ll = ll_dispatch(&routing, &x, h, max_tokens).unwrap();
        for recv in &ll.ranks {
            for l in 0..routing.experts_per_rank() {
                let range = LayoutRange::unpack(recv.packed_recv_layout_range[l * num_ranks + empty]);
                prop_assert_eq!(range.count, 0);
            }
        }
        let y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
        let combined = ll_combine(&ll.handle, &y, &weights, h).unwrap();
        prop_assert!(combined[empty].is_empty());
    }
}

#[test]
fn ll_combine_uses_fused_multiply_add() {
    // One token, experts 0 and 1 (both on rank 0), y = 1 + 2^-7, w = (-1, 1 + 2^-23).
    // fma(y, w1, -y) = y * 2^-23 exactly; an unfused y * w1 would round away the 2^-30 term
    // and give 2^-23.
    let routing = Routing::new(1, 2, 2, vec![vec![0, 1]]).unwrap();
    let h = 8;
    let y_value = 1.0 + 2f32.powi(-7);
    let x = vec![vec![f32_to_bf16(y_value); h]];
    let d = ll_dispatch(&routing, &x, h, 1).unwrap();
    let y: Vec<Vec<u16>> = d.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    let weights = vec![vec![-1.0, 1.0 + 2f32.powi(-23)]];
    let out = ll_combine(&d.handle, &y, &weights, h).unwrap();
    let expected = f32_to_bf16(y_value * 2f32.powi(-23));
    assert_ne!(expected, f32_to_bf16(2f32.powi(-23)));
    assert!(out[0].iter().all(|&v| v == expected));
}

// ---------------------------------------------------------------------------------------
// -1 entries
// ---------------------------------------------------------------------------------------

#[test]
fn all_minus_one_sends_nothing() {
    let (num_ranks, k, h) = (3, 2, 8);
    let topk_idx = vec![vec![-1; 4 * k], vec![-1; k], vec![]];
    let routing = Routing::new(num_ranks, 6, k, topk_idx).unwrap();
    let x: Vec<Vec<u16>> = (0..num_ranks).map(|r| vec![f32_to_bf16(3.0); routing.num_tokens(r) * h]).collect();
    let w: Vec<Vec<f32>> = (0..num_ranks).map(|r| vec![1.0; routing.num_tokens(r) * k]).collect();

    let layout = get_dispatch_layout(routing.topk_idx(0), k, num_ranks, 6).unwrap();
    assert_eq!(layout.num_tokens_per_rank, vec![0; num_ranks]);
    assert_eq!(layout.num_tokens_per_expert, vec![0; 6]);
    assert!(layout.is_token_in_rank.iter().all(|&b| !b));

    let ht = ht_dispatch(&routing, &x, &w, h, 1, None).unwrap();
    assert!(ht.ranks.iter().all(|r| r.num_recv_tokens == 0 && r.recv_x.is_empty()));
    assert!(ht.ranks.iter().all(|r| r.num_recv_tokens_per_expert == vec![0, 0]));
    let y: Vec<Vec<u16>> = ht.ranks.iter().map(|r| r.recv_x.clone()).collect();
    let ht_out = ht_combine(&ht.handle, &y, None, [None, None], h).unwrap();
    assert!(ht_out.iter().all(|o| o.combined_x.iter().all(|&v| v == 0)));
    assert_eq!(ht_out[0].combined_x.len(), 4 * h);

    let ll = ll_dispatch(&routing, &x, h, 4).unwrap();
    assert!(ll.ranks.iter().all(|r| r.packed_recv_count == vec![0, 0]));
    let y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    let ll_out = ll_combine(&ll.handle, &y, &w, h).unwrap();
    assert!(ll_out.iter().all(|o| o.iter().all(|&v| v == 0)));
    assert_eq!(ll_out[1].len(), h);
}

#[test]
fn minus_one_entries_are_ignored_with_weights() {
    // Token 0 of rank 0: experts [2, -1]. The -1 entry's weight (100.0) must not matter.
    let routing = Routing::new(2, 4, 2, vec![vec![2, -1], vec![]]).unwrap();
    let h = 8;
    let x = vec![vec![f32_to_bf16(2.0); h], vec![]];
    let w = vec![vec![0.5, 100.0], vec![]];
    let ht = ht_dispatch(&routing, &x, &w, h, 1, None).unwrap();
    assert_eq!(ht.ranks[1].recv_topk_idx, vec![0, -1]);
    assert_eq!(ht.ranks[1].recv_topk_weights, vec![0.5, 0.0]);
    assert_eq!(ht.ranks[1].num_recv_tokens_per_expert, vec![1, 0]);
    let ll = ll_dispatch(&routing, &x, h, 1).unwrap();
    assert_eq!(ll.ranks[1].packed_recv_count, vec![1, 0]);
    let y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    let out = ll_combine(&ll.handle, &y, &w, h).unwrap();
    assert!(out[0].iter().all(|&v| bf16_to_f32(v) == 1.0));
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_routing_is_an_error() {
    assert!(is_invalid(Routing::new(2, 4, 2, vec![vec![0, 4], vec![]]))); // expert == E
    assert!(is_invalid(Routing::new(2, 4, 2, vec![vec![0, -2], vec![]]))); // below -1
    assert!(is_invalid(Routing::new(2, 4, 2, vec![vec![0, 1, 2], vec![]]))); // not a multiple of K
    assert!(is_invalid(Routing::new(2, 4, 2, vec![vec![0, 1]]))); // one rank missing
    assert!(is_invalid(Routing::new(3, 4, 2, vec![vec![], vec![], vec![]]))); // 4 % 3 != 0
    assert!(is_invalid(Routing::new(0, 4, 2, vec![])));
    assert!(is_invalid(Routing::new(2, 0, 2, vec![vec![], vec![]])));
    assert!(is_invalid(Routing::new(2, 4, 0, vec![vec![], vec![]])));
    assert!(is_invalid(Routing::new(2, 4, 2, vec![vec![3, 3], vec![]]))); // duplicate expert
    assert!(Routing::new(2, 4, 2, vec![vec![-1, -1], vec![]]).is_ok()); // repeated -1 is fine

    assert!(is_invalid(get_dispatch_layout(&[0, 4], 2, 2, 4)));
    assert!(is_invalid(get_dispatch_layout(&[0, 1, 2], 2, 2, 4)));
    assert!(is_invalid(get_dispatch_layout(&[0, 1], 2, 3, 4)));
}

#[test]
fn bad_tensors_are_an_error() {
    let routing = Routing::new(2, 4, 2, vec![vec![0, 3, 1, -1], vec![2, 3]]).unwrap();
    let h = 8;
    let x = vec![vec![0u16; 2 * h], vec![0u16; h]];
    let w = vec![vec![1.0; 4], vec![1.0; 2]];

    // Dispatch inputs.
    assert!(is_invalid(ht_dispatch(&routing, &[vec![0u16; 2 * h], vec![0u16; h + 1]], &w, h, 1, None)));
    assert!(is_invalid(ht_dispatch(&routing, &x[..1], &w, h, 1, None)));
    assert!(is_invalid(ht_dispatch(&routing, &x, &[vec![1.0; 4], vec![1.0; 3]], h, 1, None)));
    assert!(is_invalid(ht_dispatch(&routing, &x, &w, h, 0, None)));
    assert!(is_invalid(ht_dispatch(&routing, &x, &w, h, 1, Some(1))));
    assert!(is_invalid(ht_dispatch::<u16>(&routing, &[vec![], vec![]], &w, 0, 1, None)));
    assert!(is_invalid(ll_dispatch(&routing, &x, h, 1))); // rank 0 has 2 tokens > 1
    assert!(is_invalid(ll_dispatch(&routing, &x, h + 8, 2)));
    assert!(is_invalid(ll_dispatch_rank_major(&routing, &x, &w, h, 1)));
    assert!(is_invalid(ll_dispatch_rank_major(&routing, &x, &w[..1], h, 2)));

    // Combine inputs.
    let ht = ht_dispatch(&routing, &x, &w, h, 1, None).unwrap();
    let y: Vec<Vec<u16>> = ht.ranks.iter().map(|r| r.recv_x.clone()).collect();
    assert!(ht_combine(&ht.handle, &y, None, [None, None], h).is_ok());
    assert!(is_invalid(ht_combine(&ht.handle, &y[..1], None, [None, None], h)));
    assert!(is_invalid(ht_combine(&ht.handle, &y, None, [None, None], h + 8)));
    assert!(is_invalid(ht_combine(&ht.handle, &y, Some(&[vec![1.0; 3], vec![1.0; 4]]), [None, None], h)));
    let short_bias = vec![vec![0u16; 2 * h], vec![0u16; 2 * h]];
    assert!(is_invalid(ht_combine(&ht.handle, &y, None, [None, Some(&short_bias)], h)));

    let ll = ll_dispatch(&routing, &x, h, 2).unwrap();
    let y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    assert!(ll_combine(&ll.handle, &y, &w, h).is_ok());
    assert!(is_invalid(ll_combine(&ll.handle, &y[..1], &w, h)));
    assert!(is_invalid(ll_combine(&ll.handle, &[y[0].clone(), vec![0u16; 3]], &w, h)));
    assert!(is_invalid(ll_combine(&ll.handle, &y, &[vec![1.0; 4], vec![]], h)));
}

// ---------------------------------------------------------------------------------------
// bf16 and layout-range packing
// ---------------------------------------------------------------------------------------

#[test]
fn bf16_round_trips_every_bit_pattern() {
    for bits in 0..=u16::MAX {
        let value = bf16_to_f32(bits);
        if value.is_nan() {
            assert_eq!(f32_to_bf16(value), BF16_NAN, "NaN {bits:#06x}");
        } else {
            assert_eq!(f32_to_bf16(value), bits, "pattern {bits:#06x}");
        }
    }
    assert!(bf16_to_f32(BF16_NAN).is_nan());
}

#[test]
fn bf16_rounds_ties_to_even() {
    let one = 1.0f32.to_bits();
    // Halfway between 1.0 (even) and 1 + 2^-7 (odd): down to 1.0.
    assert_eq!(f32_to_bf16(f32::from_bits(one + 0x8000)), 0x3F80);
    // Halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
    assert_eq!(f32_to_bf16(f32::from_bits(one + 0x1_8000)), 0x3F82);
    // Just above / below halfway.
    assert_eq!(f32_to_bf16(f32::from_bits(one + 0x8001)), 0x3F81);
    assert_eq!(f32_to_bf16(f32::from_bits(one + 0x7FFF)), 0x3F80);
    // Negative ties mirror positive ones.
    assert_eq!(f32_to_bf16(-f32::from_bits(one + 0x8000)), 0xBF80);
    assert_eq!(f32_to_bf16(-f32::from_bits(one + 0x1_8000)), 0xBF82);
    // Subnormal ties.
    assert_eq!(f32_to_bf16(f32::from_bits(0x0000_8000)), 0x0000);
    assert_eq!(f32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
    // Overflow to infinity, signed zeros and infinities kept.
    assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
    assert_eq!(f32_to_bf16(f32::MIN), 0xFF80);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
    assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xFF80);
    assert_eq!(f32_to_bf16(-0.0), 0x8000);
    assert_eq!(f32_to_bf16(f32::from_bits(0xFFC0_0001)), BF16_NAN);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn bf16_rounds_to_nearest(bits in any::<u32>()) {
        let value = f32::from_bits(bits);
        let rounded = f32_to_bf16(value);
        if value.is_nan() {
            prop_assert_eq!(rounded, BF16_NAN);
        } else if value.is_finite() && bf16_to_f32(rounded).is_finite() {
            // The two bf16 neighbours bracketing `value` (truncation and one ulp away from zero).
            let down = (bits >> 16) as u16;
            let up = down + 1;
            let dist = |b: u16| (f64::from(bf16_to_f32(b)) - f64::from(value)).abs();
            prop_assert!(rounded == down || rounded == up);
            let other = if rounded == down { up } else { down };
            if bf16_to_f32(other).is_finite() {
                prop_assert!(dist(rounded) <= dist(other));
                if dist(rounded) == dist(other) {
                    prop_assert_eq!(rounded & 1, 0, "ties go to even");
                }
            }
        }
    }

    #[test]
    fn layout_range_packs_like_deepep(begin in 0..=i32::MAX as usize, count in 0..=i32::MAX as usize) {
        let range = LayoutRange { begin, count };
        let packed = range.pack();
        prop_assert_eq!(packed & 0xFFFF_FFFF, count as i64);
        prop_assert_eq!(packed >> 32, begin as i64);
        prop_assert_eq!(LayoutRange::unpack(packed), range);
    }
}

#[test]
fn e4m3_round_trips_every_finite_code_and_rounds_to_nearest_even() {
    use moe_ep::reference::{e4m3_to_f32, f32_to_e4m3};
    for code in 0u8..=255 {
        if code & 0x7F == 0x7F {
            assert!(e4m3_to_f32(code).is_nan());
            continue;
        }
        let v = e4m3_to_f32(code);
        let back = f32_to_e4m3(v);
        // +0 and -0 are distinct codes that round-trip; everything else is exact.
        assert_eq!(back, code, "code {code:#04x} = {v}");
    }
    assert_eq!(f32_to_e4m3(1e9), 0x7E, "saturates to 448");
    assert_eq!(f32_to_e4m3(-1e9), 0xFE);
    assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7E);
    assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    // 1.0625 lies halfway between 1.0 (0x38) and 1.125 (0x39): ties go to the even code.
    assert_eq!(f32_to_e4m3(1.0625), 0x38);
    assert_eq!(f32_to_e4m3(1.1875), 0x3A);
    // Halfway between the two smallest subnormals (2^-9 and 2^-8) goes to 2^-8 (even).
    assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
    // Values between codes round to the nearest.
    for _ in 0..1000 {
        let v = (rand_f32() - 0.5) * 900.0;
        let q = e4m3_to_f32(f32_to_e4m3(v));
        let err = (q - v.clamp(-448.0, 448.0)).abs();
        assert!(err <= v.abs().max(2f32.powi(-6)) / 16.0 + 2f32.powi(-10), "{v} -> {q}");
    }
}

fn rand_f32() -> f32 {
    use std::cell::Cell;
    thread_local!(static S: Cell<u64> = const { Cell::new(0x1234_5678) });
    S.with(|s| {
        let x = s.get().wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.set(x);
        (x >> 40) as f32 / (1u64 << 24) as f32
    })
}

#[test]
fn the_kernels_bit_level_e4m3_cast_matches_the_reference() {
    use moe_ep::kernels::num::f32_to_e4m3 as kernel_cast;
    use moe_ep::reference::{e4m3_to_f32, f32_to_e4m3};
    // Every code, its neighbours in f32, the midpoints between codes, and random values.
    let mut values: Vec<f32> = vec![0.0, -0.0, 448.0, 449.0, 464.0, 465.0, -480.0, f32::MAX, f32::MIN_POSITIVE, 1e-30];
    for code in 0u8..0x7F {
        let v = e4m3_to_f32(code);
        let next = e4m3_to_f32(code + 1);
        values.extend([v, -v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().saturating_sub(1))]);
        if next.is_finite() {
            let mid = (v + next) / 2.0;
            values.extend([mid, -mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits() - 1)]);
        }
    }
    for _ in 0..20000 {
        values.push((rand_f32() - 0.5) * 2f32.powi((rand_f32() * 30.0) as i32 - 20));
    }
    for v in values {
        assert_eq!(kernel_cast(v), f32_to_e4m3(v), "{v:e} ({:#010x})", v.to_bits());
    }
}
