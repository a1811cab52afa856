//! CPU reference of dispatch and combine: the readable specification that the GPU kernels
//! must match bit for bit.
//!
//! Every function here simulates *all* ranks at once: per-rank inputs and outputs are
//! `Vec`s indexed by rank, and every tensor is a flat row-major `Vec` (shapes are given as
//! `[rows, cols]` in the docs). Semantics follow DeepEP (V1) and NCCL EP.
//!
//! ```
//! use moe_ep::reference::{self, Routing, bf16_to_f32, f32_to_bf16};
//!
//! // 2 ranks, 4 experts (rank 0 owns experts 0 and 1, rank 1 owns 2 and 3), top-2 routing.
//! // Rank 0 has two tokens, rank 1 has one; -1 means "no expert".
//! let routing = Routing::new(2, 4, 2, vec![vec![0, 3, 1, -1], vec![2, 3]])?;
//! let hidden = 8;
//! let x = vec![
//!     (0..2 * hidden).map(|i| f32_to_bf16(i as f32)).collect::<Vec<u16>>(),
//!     vec![f32_to_bf16(1.0); hidden],
//! ];
//! let topk_weights = vec![vec![0.5, 0.5, 1.0, 0.0], vec![0.25, 0.75]];
//!
//! // High-throughput mode: a token goes once to every rank holding one of its experts.
//! let ht = reference::ht_dispatch(&routing, &x, &topk_weights, hidden, 1, None)?;
//! assert_eq!(ht.ranks[0].num_recv_tokens, 2); // tokens 0 and 1 of rank 0
//! assert_eq!(ht.ranks[1].num_recv_tokens, 2); // token 0 of rank 0, token 0 of rank 1
//! assert_eq!(ht.ranks[1].recv_topk_idx, vec![-1, 1, 0, 1]); // local expert ids
//! // Identity experts; HT combine is an unweighted sum over the ranks that got the token.
//! let y: Vec<Vec<u16>> = ht.ranks.iter().map(|r| r.recv_x.clone()).collect();
//! let out = reference::ht_combine(&ht.handle, &y, None, [None, None], hidden)?;
//! assert_eq!(bf16_to_f32(out[0].combined_x[3]), 6.0); // token 0 went to 2 ranks: 2 * 3.0
//! assert_eq!(bf16_to_f32(out[0].combined_x[hidden + 3]), 11.0); // token 1 went to 1 rank
//!
//! // Low-latency mode: one copy per (token, expert); weights are applied at combine.
//! let ll = reference::ll_dispatch(&routing, &x, hidden, 4)?;
//! assert_eq!(ll.ranks[1].packed_recv_count, vec![1, 2]); // expert 2: 1 row, expert 3: 2 rows
//! let y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
//! let out = reference::ll_combine(&ll.handle, &y, &topk_weights, hidden)?;
//! assert_eq!(bf16_to_f32(out[0][3]), 3.0); // 0.5 * 3.0 + 0.5 * 3.0
//! assert_eq!(bf16_to_f32(out[1][0]), 1.0); // 0.25 * 1.0 + 0.75 * 1.0
//! # Ok::<(), moe_ep::Error>(())
//! ```
//!
//! # Routing
//!
//! Rank `r` routes its `T_r` tokens with `topk_idx[r]`, shape `[T_r, K]`; an entry is a
//! global expert id in `0..E` or `-1` (no expert). A row lists each expert at most once.
//! `T_r` may differ between ranks and may be 0. The `E` experts are spread evenly over the
//! `R` ranks: with `L = E / R` experts per rank, expert `e` lives on rank `e / L` as local
//! expert `e % L`.
//!
//! # Modes
//!
//! * **Layout** ([`get_dispatch_layout`]): per-rank and per-expert token counts.
//! * **High-throughput (HT)** ([`ht_dispatch`], [`ht_combine`]), DeepEP's "normal" mode:
//!   a token travels once to each rank holding at least one of its experts; combine sums the
//!   copies (no weights).
//! * **Low-latency (LL)** ([`ll_dispatch`], [`ll_dispatch_rank_major`], [`ll_combine`],
//!   [`ll_combine_rank_major`]):
//!   a token travels once per selected expert into fixed-size per-expert buffers; combine
//!   applies the routing weights.
//!
//! # Receive order (deterministic, unlike DeepEP's atomics)
//!
//! * HT: the rows a rank receives are ordered by source rank, then by source token index.
//! * LL expert-major: per local expert, rows are packed from row 0, ordered by source rank,
//!   then by source token index.
//! * LL rank-major: block `s` holds the tokens of source rank `s` in token order.
//!
//! # Numerics (part of the spec: kernels must reproduce these exact operations)
//!
//! * bf16 is stored as its bit pattern (`u16`). [`bf16_to_f32`] is exact; [`f32_to_bf16`]
//!   rounds to nearest, ties to even, and turns every NaN into [`BF16_NAN`]. Results are
//!   rounded to bf16 exactly once, after all accumulation.
//! * HT combine, per element of token `t` of source rank `s`:
//!   `acc = f32(bias0[t]) + f32(bias1[t])` (an absent bias is `+0.0`), then for every rank
//!   `r` that received the token, in ascending `r`: `acc = acc + f32(x_r[row])`. The
//!   result is `f32_to_bf16(acc)`. This is DeepEP's order (bias first).
//!   `combined_topk_weights[t][k]` starts at `0.0` and adds the received weights in the
//!   same ascending-rank order.
//! * LL combine, per element of token `t`: `acc = 0.0`, then for `k = 0..K` with
//!   `topk_idx[t][k] != -1`: `acc = fma(f32(y_k), w[t][k], acc)`, a fused multiply-add
//!   with one rounding (what nvcc makes of DeepEP's `acc += x * w`; kernels use
//!   `fma.rn.f32`). The result is `f32_to_bf16(acc)`.
//! * Dispatch only moves data: payload rows are copied bit for bit.
//!
//! # Padding
//!
//! Rows the kernels never write (LL rows past `packed_recv_count`, rank-major rows past
//! `recv_count`, HT rows past `num_recv_tokens` with `num_worst_tokens`) are defined here
//! as: payload `T::default()` (zero bits), weights `0.0`, expert ids and source indices
//! `-1`. Comparisons against kernels only look at these rows where the kernel documents
//! that it writes them (HT padding rows of `recv_topk_idx` are written as `-1`, as in DeepEP).

use crate::{Error, Result};

// ---------------------------------------------------------------------------------------
// bf16
// ---------------------------------------------------------------------------------------

/// The NaN that [`f32_to_bf16`] returns for every NaN input (CUDA's canonical bf16 NaN).
pub const BF16_NAN: u16 = 0x7FFF;

/// Widens a bf16 (given by its bits) to f32. Exact: bf16 is the top half of an f32.
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Rounds an f32 to bf16 (returned as its bits): round to nearest, ties to even, like
/// CUDA's `__float2bfloat16` / `cvt.rn.bf16.f32`. Overflow gives ±infinity, subnormals are
/// kept (no flush to zero), and every NaN becomes [`BF16_NAN`].
pub fn f32_to_bf16(value: f32) -> u16 {
    if value.is_nan() {
        return BF16_NAN;
    }
    let bits = value.to_bits();
    // Add just under half a bf16 ulp, plus one if the kept part is odd: ties go to even.
    let kept_lsb = (bits >> 16) & 1;
    let rounded = bits + 0x7FFF + kept_lsb; // no overflow: the largest non-NaN is 0xFF80_0000
    (rounded >> 16) as u16
}

/// Largest finite fp8 e4m3 value (the "fn" variant: no infinities; `0x7F` is NaN).
pub const E4M3_MAX: f32 = 448.0;

/// Rounds an f32 to fp8 e4m3 (bits): nearest, ties to even, saturating to ±448 (CUDA's
/// `cvt.rn.satfinite.e4m3x2.f32`); NaN becomes `0x7F`.
pub fn f32_to_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7F;
    }
    let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
    let a = f64::from(value.abs());
    // Ties to even. Exact: `x` is an f32 scaled by a power of two, held in an f64.
    let round_even = |x: f64| {
        let r = x.round(); // halves away from zero
        if x - x.trunc() == 0.5 && r % 2.0 != 0.0 { r - 1.0 } else { r }
    };
    let magnitude = if a >= f64::from(E4M3_MAX) {
        0x7E
    } else if a < 2f64.powi(-6) {
        // Subnormal (or the smallest normal, when rounding carries): steps of 2^-9.
        round_even(a * 512.0) as u8
    } else {
        let e = a.log2().floor() as i32;
        let e = if a < 2f64.powi(e) {
            e - 1
        } else if a >= 2f64.powi(e + 1) {
            e + 1
        } else {
            e
        };
        let mut q = round_even((a / 2f64.powi(e) - 1.0) * 8.0) as i32;
        let mut e = e;
        if q == 8 {
            q = 0;
            e += 1;
        }
        let field = e + 7;
        if field > 15 || (field == 15 && q == 7) { 0x7E } else { ((field as u8) << 3) | q as u8 }
    };
    sign | magnitude
}

/// Widens fp8 e4m3 bits to f32 (exact).
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let (field, mant) = ((bits >> 3) & 0xF, bits & 7);
    if field == 15 && mant == 7 {
        return f32::NAN;
    }
    let v = if field == 0 {
        f64::from(mant) * 2f64.powi(-9)
    } else {
        (1.0 + f64::from(mant) / 8.0) * 2f64.powi(field as i32 - 7)
    };
    sign * v as f32
}

/// DeepEP's per-token, per-128-channel fp8 cast of one bf16 row: `amax` of each group
/// (at least 1e-4), `scale = amax / 448` and `q = e4m3(x * (448 / amax))`; with
/// `round_scale`, `scale = 2^ceil(log2(amax / 448))` and `q = e4m3(x * 2^-that)`.
/// Returns the fp8 bits (`hidden`) and the f32 scales (`hidden / 128`).
pub fn quantize_row_fp8(row: &[u16], round_scale: bool) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(row.len());
    let mut scales = Vec::with_capacity(row.len() / 128);
    for group in row.chunks(128) {
        let amax = group.iter().fold(0f32, |m, &b| m.max(bf16_to_f32(b).abs())).max(1e-4);
        let (scale, scale_inv) = if round_scale {
            let e = ceil_log2(amax / E4M3_MAX);
            (2f32.powi(e), 2f32.powi(-e))
        } else {
            (amax / E4M3_MAX, E4M3_MAX / amax)
        };
        scales.push(scale);
        q.extend(group.iter().map(|&b| f32_to_e4m3(bf16_to_f32(b) * scale_inv)));
    }
    (q, scales)
}

/// `ceil(log2(x))` for a positive normal f32, exactly (from its bits).
pub fn ceil_log2(x: f32) -> i32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    if bits & 0x7F_FFFF == 0 { exp } else { exp + 1 }
}

// ---------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------

/// The routing of all ranks: who sends which token to which experts. Validated on creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    num_ranks: usize,
    num_experts: usize,
    num_topk: usize,
    topk_idx: Vec<Vec<i64>>,
}

impl Routing {
    /// Builds a routing from each rank's `topk_idx` (`topk_idx[r]` has shape `[T_r, num_topk]`).
    ///
    /// Errors unless: `num_ranks >= 1`, `num_topk >= 1`, `num_experts` is a positive multiple
    /// of `num_ranks`, there is one `topk_idx` per rank, each with a multiple of `num_topk`
    /// entries, every entry is `-1` or in `0..num_experts`, and no row repeats an expert.
    pub fn new(num_ranks: usize, num_experts: usize, num_topk: usize, topk_idx: Vec<Vec<i64>>) -> Result<Self> {
        check_sizes(num_ranks, num_experts, num_topk)?;
        if topk_idx.len() != num_ranks {
            return Err(Error::invalid(
                "topk_idx",
                format!("expected one entry per rank ({num_ranks}), got {}", topk_idx.len()),
            ));
        }
        for rank_topk_idx in &topk_idx {
            check_topk_idx(rank_topk_idx, num_topk, num_experts)?;
        }
        Ok(Routing { num_ranks, num_experts, num_topk, topk_idx })
    }

    /// Number of ranks `R`.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// Number of experts `E` over all ranks.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Experts selected per token `K` (some entries may be -1).
    pub fn num_topk(&self) -> usize {
        self.num_topk
    }

    /// Experts per rank `L = E / R`.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.num_ranks
    }

    /// Rank that owns global expert `expert`: `expert / L`.
    pub fn rank_of_expert(&self, expert: usize) -> usize {
        expert / self.experts_per_rank()
    }

    /// Local id of global expert `expert` on its rank: `expert % L`.
    pub fn local_expert(&self, expert: usize) -> usize {
        expert % self.experts_per_rank()
    }

    /// Number of tokens `T_rank` of rank `rank` (0 for a rank that does not exist).
    pub fn num_tokens(&self, rank: usize) -> usize {
        self.topk_idx.get(rank).map_or(0, |idx| idx.len() / self.num_topk)
    }

    /// `topk_idx` of rank `rank`, shape `[T_rank, K]` (empty for a rank that does not exist).
    pub fn topk_idx(&self, rank: usize) -> &[i64] {
        self.topk_idx.get(rank).map_or(&[], |idx| idx.as_slice())
    }

    /// NCCL EP's overflow policy DROP: every destination keeps the first `budget` rows in
    /// the order they arrive (source rank ascending, then token ascending); a token past that
    /// loses its experts on that destination (-1). Also returns the rows each rank would have
    /// received without the drop.
    pub fn drop_overflow(&self, budget: usize) -> (Routing, Vec<usize>) {
        let k = self.num_topk;
        let mut topk_idx = self.topk_idx.clone();
        let mut arrived = vec![0usize; self.num_ranks];
        for (src, idx) in topk_idx.iter_mut().enumerate() {
            for token in 0..self.num_tokens(src) {
                let row = &mut idx[token * k..(token + 1) * k];
                for (dst, arrived) in arrived.iter_mut().enumerate() {
                    let to_dst = |e: i64| e >= 0 && self.rank_of_expert(e as usize) == dst;
                    if !row.iter().any(|&e| to_dst(e)) {
                        continue;
                    }
                    if *arrived >= budget {
                        row.iter_mut().filter(|e| to_dst(**e)).for_each(|e| *e = -1);
                    }
                    *arrived += 1;
                }
            }
        }
        (Routing { topk_idx, ..self.clone() }, arrived)
    }

    /// The `K` entries of token `token` of rank `rank`.
    fn topk_row(&self, rank: usize, token: usize) -> &[i64] {
        &self.topk_idx[rank][token * self.num_topk..(token + 1) * self.num_topk]
    }

    /// The `k`-th expert of token `token` of rank `rank`; `None` for -1.
    fn expert(&self, rank: usize, token: usize, k: usize) -> Option<usize> {
        usize::try_from(self.topk_row(rank, token)[k]).ok()
    }
}

fn check_sizes(num_ranks: usize, num_experts: usize, num_topk: usize) -> Result<()> {
    if num_ranks == 0 {
        return Err(Error::invalid("num_ranks", "must be at least 1"));
    }
    if num_topk == 0 {
        return Err(Error::invalid("num_topk", "must be at least 1"));
    }
    if num_experts == 0 || !num_experts.is_multiple_of(num_ranks) {
        return Err(Error::invalid(
            "num_experts",
            format!("must be a positive multiple of num_ranks ({num_ranks}), got {num_experts}"),
        ));
    }
    Ok(())
}

fn check_topk_idx(topk_idx: &[i64], num_topk: usize, num_experts: usize) -> Result<()> {
    if !topk_idx.len().is_multiple_of(num_topk) {
        return Err(Error::invalid(
            "topk_idx",
            format!("length {} is not a multiple of num_topk ({num_topk})", topk_idx.len()),
        ));
    }
    for (token, row) in topk_idx.chunks(num_topk).enumerate() {
        for (k, &expert) in row.iter().enumerate() {
            if expert < -1 || expert >= num_experts as i64 {
                return Err(Error::invalid(
                    "topk_idx",
                    format!("token {token}: expert {expert} is neither -1 nor in 0..{num_experts}"),
                ));
            }
            if expert != -1 && row[..k].contains(&expert) {
                return Err(Error::invalid("topk_idx", format!("token {token}: expert {expert} selected twice")));
            }
        }
    }
    Ok(())
}

/// Checks that `per_rank` has one entry per rank and that entry `r` holds `rows[r] * width` values.
fn check_shape<V>(arg: &'static str, per_rank: &[Vec<V>], rows: &[usize], width: usize) -> Result<()> {
    if per_rank.len() != rows.len() {
        return Err(Error::invalid(
            arg,
            format!("expected one entry per rank ({}), got {}", rows.len(), per_rank.len()),
        ));
    }
    for (rank, (data, &n)) in per_rank.iter().zip(rows).enumerate() {
        if data.len() != n * width {
            return Err(Error::invalid(
                arg,
                format!("rank {rank}: expected {n} x {width} = {} values, got {}", n * width, data.len()),
            ));
        }
    }
    Ok(())
}

fn check_hidden(hidden: usize) -> Result<()> {
    if hidden == 0 { Err(Error::invalid("hidden", "must be at least 1")) } else { Ok(()) }
}

fn to_i32(value: usize, arg: &'static str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::invalid(arg, format!("{value} does not fit in i32")))
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

/// Output of [`get_dispatch_layout`] for one rank (DeepEP's `get_dispatch_layout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLayout {
    /// `[R]`: tokens with at least one expert on rank `r` (a token counts once per rank).
    pub num_tokens_per_rank: Vec<i32>,
    /// `[E]`: tokens that selected expert `e`.
    pub num_tokens_per_expert: Vec<i32>,
    /// `[T, R]`: whether token `t` has at least one expert on rank `r`.
    pub is_token_in_rank: Vec<bool>,
}

/// Counts, for one rank's `topk_idx` (`[T, num_topk]`), where its tokens go. -1 entries
/// count nowhere. Errors on the same conditions as [`Routing::new`].
pub fn get_dispatch_layout(
    topk_idx: &[i64],
    num_topk: usize,
    num_ranks: usize,
    num_experts: usize,
) -> Result<DispatchLayout> {
    check_sizes(num_ranks, num_experts, num_topk)?;
    check_topk_idx(topk_idx, num_topk, num_experts)?;
    let experts_per_rank = num_experts / num_ranks;
    let num_tokens = topk_idx.len() / num_topk;

    let mut num_tokens_per_rank = vec![0i32; num_ranks];
    let mut num_tokens_per_expert = vec![0i32; num_experts];
    let mut is_token_in_rank = vec![false; num_tokens * num_ranks];
    for token in 0..num_tokens {
        for &entry in &topk_idx[token * num_topk..(token + 1) * num_topk] {
            let Ok(expert) = usize::try_from(entry) else { continue };
            num_tokens_per_expert[expert] += 1;
            is_token_in_rank[token * num_ranks + expert / experts_per_rank] = true;
        }
        for rank in 0..num_ranks {
            if is_token_in_rank[token * num_ranks + rank] {
                num_tokens_per_rank[rank] += 1;
            }
        }
    }
    Ok(DispatchLayout { num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank })
}

// ---------------------------------------------------------------------------------------
// High-throughput dispatch / combine
// ---------------------------------------------------------------------------------------

/// Where a received row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSource {
    /// Source rank.
    pub rank: usize,
    /// Token index on the source rank.
    pub token: usize,
}

/// What one rank receives from [`ht_dispatch`]. `N` = `num_recv_tokens`; the row count of
/// every tensor is `num_worst_tokens` when given, else `N`.
#[derive(Debug, Clone, PartialEq)]
pub struct HtRecv<T> {
    /// `[rows, H]`: received tokens, ordered by (source rank, source token).
    pub recv_x: Vec<T>,
    /// `[rows, K]`: the token's `topk_idx` seen from this rank: the local expert id where the
    /// expert lives on this rank, else -1.
    pub recv_topk_idx: Vec<i64>,
    /// `[rows, K]`: the token's weight where `recv_topk_idx` is a local expert, else `0.0`
    /// (as DeepEP's intranode dispatch writes it).
    pub recv_topk_weights: Vec<f32>,
    /// `[rows]`: index of the row's token on its source rank (-1 on padding rows).
    pub recv_src_idx: Vec<i32>,
    /// `N`: rows actually received.
    pub num_recv_tokens: usize,
    /// `[L]`: entries of `recv_topk_idx` equal to each local expert, each rounded up to a
    /// multiple of `expert_alignment`.
    pub num_recv_tokens_per_expert: Vec<i32>,
}

/// What [`ht_combine`] needs to send rows back: the origin of every received row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtHandle {
    num_topk: usize,
    num_tokens: Vec<usize>,
    num_worst_tokens: Option<usize>,
    rank_prefix_matrix: Vec<i32>,
    recv_sources: Vec<Vec<TokenSource>>,
}

impl HtHandle {
    /// `[R, R]`, the same on every rank (DeepEP's `rank_prefix_matrix`): entry `[i][j]` is
    /// the number of tokens rank `j` receives from ranks `0..=i`. Rank `j`'s rows from
    /// source `i` are rows `[i-1][j]..[i][j]` (from 0 for `i = 0`), and `[R-1][j]` is its `N`.
    pub fn rank_prefix_matrix(&self) -> &[i32] {
        &self.rank_prefix_matrix
    }

    /// Origin of each of the `N` rows received by `rank` (empty for a rank that does not exist).
    pub fn recv_sources(&self, rank: usize) -> &[TokenSource] {
        self.recv_sources.get(rank).map_or(&[], |s| s.as_slice())
    }

    /// Rows of every tensor received by `rank`, padding included.
    fn num_rows(&self, rank: usize) -> usize {
        self.num_worst_tokens.unwrap_or(self.recv_sources[rank].len())
    }
}

/// Output of [`ht_dispatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct HtDispatch<T> {
    /// What each rank received, indexed by receiving rank.
    pub ranks: Vec<HtRecv<T>>,
    /// Input to [`ht_combine`].
    pub handle: HtHandle,
}

/// High-throughput dispatch (DeepEP normal mode): every token goes once to every rank that
/// holds at least one of its experts.
///
/// `x[r]` is `[T_r, hidden]` (any `Copy` element: dispatch only moves data) and
/// `topk_weights[r]` is `[T_r, K]`. `expert_alignment >= 1` rounds the per-expert counts up.
/// With `num_worst_tokens = Some(w)`, every output has exactly `w` rows (error if a rank
/// receives more than `w`).
pub fn ht_dispatch<T: Copy + Default>(
    routing: &Routing,
    x: &[Vec<T>],
    topk_weights: &[Vec<f32>],
    hidden: usize,
    expert_alignment: usize,
    num_worst_tokens: Option<usize>,
) -> Result<HtDispatch<T>> {
    let num_ranks = routing.num_ranks();
    let num_topk = routing.num_topk();
    let experts_per_rank = routing.experts_per_rank();
    let num_tokens: Vec<usize> = (0..num_ranks).map(|r| routing.num_tokens(r)).collect();
    check_hidden(hidden)?;
    check_shape("x", x, &num_tokens, hidden)?;
    check_shape("topk_weights", topk_weights, &num_tokens, num_topk)?;
    if expert_alignment == 0 {
        return Err(Error::invalid("expert_alignment", "must be at least 1"));
    }

    // Every source rank computes its layout.
    let mut layouts = Vec::with_capacity(num_ranks);
    for src in 0..num_ranks {
        layouts.push(get_dispatch_layout(routing.topk_idx(src), num_topk, num_ranks, routing.num_experts())?);
    }

    // rank_prefix_matrix[i][j] = tokens rank j receives from ranks 0..=i.
    let mut rank_prefix_matrix = vec![0i32; num_ranks * num_ranks];
    for i in 0..num_ranks {
        for j in 0..num_ranks {
            let before = if i == 0 { 0 } else { rank_prefix_matrix[(i - 1) * num_ranks + j] };
            rank_prefix_matrix[i * num_ranks + j] = before + layouts[i].num_tokens_per_rank[j];
        }
    }

    let mut ranks = Vec::with_capacity(num_ranks);
    let mut recv_sources = Vec::with_capacity(num_ranks);
    for dst in 0..num_ranks {
        let mut recv = HtRecv {
            recv_x: Vec::new(),
            recv_topk_idx: Vec::new(),
            recv_topk_weights: Vec::new(),
            recv_src_idx: Vec::new(),
            num_recv_tokens: 0,
            num_recv_tokens_per_expert: vec![0; experts_per_rank],
        };
        let mut sources = Vec::new();
        for src in 0..num_ranks {
            for token in 0..num_tokens[src] {
                if !layouts[src].is_token_in_rank[token * num_ranks + dst] {
                    continue;
                }
                recv.recv_x.extend_from_slice(&x[src][token * hidden..(token + 1) * hidden]);
                for k in 0..num_topk {
                    match routing.expert(src, token, k) {
                        Some(expert) if routing.rank_of_expert(expert) == dst => {
                            let local = routing.local_expert(expert);
                            recv.recv_topk_idx.push(local as i64);
                            recv.recv_topk_weights.push(topk_weights[src][token * num_topk + k]);
                            recv.num_recv_tokens_per_expert[local] += 1;
                        }
                        _ => {
                            recv.recv_topk_idx.push(-1);
                            recv.recv_topk_weights.push(0.0);
                        }
                    }
                }
                recv.recv_src_idx.push(to_i32(token, "x")?);
                sources.push(TokenSource { rank: src, token });
            }
        }
        recv.num_recv_tokens = sources.len();
        for count in &mut recv.num_recv_tokens_per_expert {
            let aligned = (*count as usize).div_ceil(expert_alignment) * expert_alignment;
            *count = to_i32(aligned, "expert_alignment")?;
        }
        if let Some(rows) = num_worst_tokens {
            if rows < recv.num_recv_tokens {
                return Err(Error::invalid(
                    "num_worst_tokens",
                    format!("rank {dst} receives {} tokens, more than {rows}", recv.num_recv_tokens),
                ));
            }
            recv.recv_x.resize(rows * hidden, T::default());
            recv.recv_topk_idx.resize(rows * num_topk, -1);
            recv.recv_topk_weights.resize(rows * num_topk, 0.0);
            recv.recv_src_idx.resize(rows, -1);
        }
        ranks.push(recv);
        recv_sources.push(sources);
    }

    let handle = HtHandle { num_topk, num_tokens, num_worst_tokens, rank_prefix_matrix, recv_sources };
    Ok(HtDispatch { ranks, handle })
}

/// One rank's HT dispatch output in NCCL EP's `EXPERT_MAJOR` layout ([`ht_expert_major`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HtExpertMajor<T> {
    /// `[slots, H]`: zone `e` (local expert order) holds, in row order, every received row
    /// with local expert `e`, then `T::default()` padding up to `counts[e]`.
    pub x: Vec<T>,
    /// `[slots]`: each slot's weight (the row's weight for the zone's expert; 0 on padding).
    pub weights: Vec<f32>,
    /// `[L]`: zone sizes (`num_recv_tokens_per_expert`, aligned).
    pub counts: Vec<i32>,
    /// `[L]`: zone starts.
    pub offsets: Vec<i32>,
    /// `[N, K]`: the slot of each (row, k) whose expert is local, else -1.
    pub slot_of: Vec<i32>,
}

/// NCCL EP's HT `EXPERT_MAJOR` layout of `recv` (one rank's [`ht_dispatch`] output, `L`
/// local experts, rows `hidden` wide) in `num_slots` slots; more slots needed is an error.
pub fn ht_expert_major<T: Copy + Default>(
    recv: &HtRecv<T>,
    num_topk: usize,
    hidden: usize,
    num_slots: usize,
) -> Result<HtExpertMajor<T>> {
    let total: usize = recv.num_recv_tokens_per_expert.iter().map(|&c| c as usize).sum();
    if total > num_slots {
        return Err(Error::invalid("num_slots", format!("{total} slots needed, {num_slots} given")));
    }
    expert_major(recv, num_topk, hidden, num_slots)
}

/// [`ht_expert_major`] under NCCL EP's overflow policy DROP: the zones are cut at
/// `num_slots`. Zone `e`, starting at `start` (the uncut sizes before it), keeps
/// `min(size, num_slots - start)` slots (none past `num_slots`); copies of rows that land
/// past that are dropped (`slot_of` -1). `counts` and `offsets` are the cut ones.
pub fn ht_expert_major_dropping<T: Copy + Default>(
    recv: &HtRecv<T>,
    num_topk: usize,
    hidden: usize,
    num_slots: usize,
) -> Result<HtExpertMajor<T>> {
    expert_major(recv, num_topk, hidden, num_slots)
}

fn expert_major<T: Copy + Default>(
    recv: &HtRecv<T>,
    num_topk: usize,
    hidden: usize,
    num_slots: usize,
) -> Result<HtExpertMajor<T>> {
    let sizes = &recv.num_recv_tokens_per_expert;
    let starts: Vec<usize> = sizes.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c as usize))).collect();
    let kept: Vec<usize> =
        sizes.iter().zip(&starts).map(|(&c, &s)| (c as usize).min(num_slots.saturating_sub(s))).collect();
    let n = recv.num_recv_tokens;
    let mut out = HtExpertMajor {
        x: vec![T::default(); num_slots * hidden],
        weights: vec![0.0; num_slots],
        counts: kept.iter().map(|&c| to_i32(c, "slots")).collect::<Result<_>>()?,
        offsets: starts.iter().map(|&s| to_i32(s.min(num_slots), "slots")).collect::<Result<_>>()?,
        slot_of: vec![-1; n * num_topk],
    };
    let mut filled = vec![0usize; sizes.len()];
    for row in 0..n {
        for k in 0..num_topk {
            let e = recv.recv_topk_idx[row * num_topk + k];
            if e < 0 {
                continue;
            }
            let e = e as usize;
            let at = filled[e];
            filled[e] += 1;
            if at >= kept[e] {
                continue; // dropped
            }
            let slot = starts[e] + at;
            out.x[slot * hidden..(slot + 1) * hidden].copy_from_slice(&recv.recv_x[row * hidden..(row + 1) * hidden]);
            out.weights[slot] = recv.recv_topk_weights[row * num_topk + k];
            out.slot_of[row * num_topk + k] = to_i32(slot, "slot")?;
        }
    }
    Ok(out)
}

/// The way back from NCCL EP's HT `EXPERT_MAJOR` layout: each of the `N` rows of `em` is the
/// f32 sum, k ascending, of its slots' rows of `y` (`[slots, hidden]` bf16), rounded once;
/// with `weights` (`[slots]`), also `[N, K]` weights (0 where the expert is elsewhere).
pub fn ht_expert_major_reduce<T>(
    em: &HtExpertMajor<T>,
    y: &[u16],
    weights: Option<&[f32]>,
    num_topk: usize,
    hidden: usize,
) -> (Vec<u16>, Option<Vec<f32>>) {
    let n = em.slot_of.len() / num_topk.max(1);
    let mut x = vec![0u16; n * hidden];
    for row in 0..n {
        let mut acc = vec![0f32; hidden];
        for k in 0..num_topk {
            let s = em.slot_of[row * num_topk + k];
            if s >= 0 {
                for (a, &v) in acc.iter_mut().zip(&y[s as usize * hidden..(s as usize + 1) * hidden]) {
                    *a += bf16_to_f32(v);
                }
            }
        }
        for (o, a) in x[row * hidden..(row + 1) * hidden].iter_mut().zip(acc) {
            *o = f32_to_bf16(a);
        }
    }
    let w = weights.map(|w| em.slot_of.iter().map(|&s| if s >= 0 { w[s as usize] } else { 0.0 }).collect());
    (x, w)
}

/// What one source rank gets back from [`ht_combine`].
#[derive(Debug, Clone, PartialEq)]
pub struct HtCombined {
    /// `[T, H]` bf16: sum of the copies of each token (see the module docs for the order).
    pub combined_x: Vec<u16>,
    /// `[T, K]`: per `k`, sum of the copies' weights; present when weights were passed.
    pub combined_topk_weights: Option<Vec<f32>>,
}

/// High-throughput combine: sends every received row back to its source and sums the
/// copies of each token, unweighted, in ascending receiving-rank order, after the bias.
///
/// `x[r]` (bf16 bits) and `topk_weights[r]` have the row count of rank `r`'s dispatch output
/// (`num_worst_tokens` when it was given; padding rows are ignored), widths `hidden` and `K`.
/// `bias` is DeepEP's `(bias_0, bias_1)`: each, if present, is one `[T_s, hidden]` bf16
/// tensor per source rank `s`. A token that went nowhere gets `bias_0 + bias_1` (zero
/// without bias) and zero weights.
pub fn ht_combine(
    handle: &HtHandle,
    x: &[Vec<u16>],
    topk_weights: Option<&[Vec<f32>]>,
    bias: [Option<&[Vec<u16>]>; 2],
    hidden: usize,
) -> Result<Vec<HtCombined>> {
    let num_ranks = handle.num_tokens.len();
    let num_topk = handle.num_topk;
    let rows: Vec<usize> = (0..num_ranks).map(|r| handle.num_rows(r)).collect();
    check_hidden(hidden)?;
    check_shape("x", x, &rows, hidden)?;
    if let Some(weights) = topk_weights {
        check_shape("topk_weights", weights, &rows, num_topk)?;
    }
    for b in bias.iter().flatten() {
        check_shape("bias", b, &handle.num_tokens, hidden)?;
    }

    // copies[s][t] = the (receiving rank, row) pairs holding token t of rank s, ascending rank.
    let mut copies: Vec<Vec<Vec<(usize, usize)>>> = handle.num_tokens.iter().map(|&t| vec![Vec::new(); t]).collect();
    for (dst, sources) in handle.recv_sources.iter().enumerate() {
        for (row, source) in sources.iter().enumerate() {
            copies[source.rank][source.token].push((dst, row));
        }
    }

    let mut out = Vec::with_capacity(num_ranks);
    for (src, token_copies) in copies.iter().enumerate() {
        let num_tokens = handle.num_tokens[src];
        let mut combined_x = vec![0u16; num_tokens * hidden];
        for (token, token_copies) in token_copies.iter().enumerate() {
            for h in 0..hidden {
                let i = token * hidden + h;
                let bias_value = |b: Option<&[Vec<u16>]>| b.map_or(0.0, |b| bf16_to_f32(b[src][i]));
                let mut acc = bias_value(bias[0]) + bias_value(bias[1]);
                for &(dst, row) in token_copies {
                    acc += bf16_to_f32(x[dst][row * hidden + h]);
                }
                combined_x[i] = f32_to_bf16(acc);
            }
        }
        let combined_topk_weights = topk_weights.map(|weights| {
            let mut combined = vec![0.0f32; num_tokens * num_topk];
            for (token, token_copies) in token_copies.iter().enumerate() {
                for k in 0..num_topk {
                    let mut acc = 0.0f32;
                    for &(dst, row) in token_copies {
                        acc += weights[dst][row * num_topk + k];
                    }
                    combined[token * num_topk + k] = acc;
                }
            }
            combined
        });
        out.push(HtCombined { combined_x, combined_topk_weights });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ---------------------------------------------------------------------------------------

/// Rows `begin..begin + count` of a local expert's buffer, received from one source rank.
/// DeepEP stores it as one `i64`: `count` in the low 32 bits, `begin` in the high 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutRange {
    /// First row.
    pub begin: usize,
    /// Number of rows.
    pub count: usize,
}

impl LayoutRange {
    /// DeepEP's packing: `(begin << 32) | count`.
    pub fn pack(self) -> i64 {
        ((self.begin as i64) << 32) | (self.count as i64 & 0xFFFF_FFFF)
    }

    /// Inverse of [`LayoutRange::pack`].
    pub fn unpack(packed: i64) -> Self {
        LayoutRange { begin: (packed >> 32) as u32 as usize, count: packed as u32 as usize }
    }
}

/// What one rank receives from [`ll_dispatch`] (DeepEP `low_latency_dispatch` names).
/// `M` = `num_max_dispatch_tokens_per_rank`; each local expert has `R * M` row slots.
#[derive(Debug, Clone, PartialEq)]
pub struct LlRecv<T> {
    /// `[L, R * M, H]`: per local expert, received rows packed from row 0, ordered by
    /// (source rank, source token). Rows past `packed_recv_count` are `T::default()`.
    pub packed_recv_x: Vec<T>,
    /// `[L, R * M]`: source token index of each row (-1 past `packed_recv_count`).
    pub packed_recv_src_info: Vec<i32>,
    /// `[L, R]`: [`LayoutRange::pack`] of the rows from each source rank. A source that sent
    /// nothing gets `count = 0` and `begin` = rows from lower source ranks.
    pub packed_recv_layout_range: Vec<i64>,
    /// `[L]`: rows received per local expert.
    pub packed_recv_count: Vec<i32>,
}

/// What [`ll_combine`] needs: the routing and where each (token, expert) row landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlHandle {
    routing: Routing,
    num_max_dispatch_tokens_per_rank: usize,
    recv_src_info: Vec<Vec<i32>>,
    recv_layout_range: Vec<Vec<i64>>,
}

impl LlHandle {
    /// The routing the dispatch used.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// `M`, the per-rank token capacity of the dispatch.
    pub fn num_max_dispatch_tokens_per_rank(&self) -> usize {
        self.num_max_dispatch_tokens_per_rank
    }
}

/// Output of [`ll_dispatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct LlDispatch<T> {
    /// What each rank received, indexed by receiving rank.
    pub ranks: Vec<LlRecv<T>>,
    /// Input to [`ll_combine`].
    pub handle: LlHandle,
}

fn check_max_tokens(routing: &Routing, max_tokens: usize) -> Result<()> {
    for rank in 0..routing.num_ranks() {
        if routing.num_tokens(rank) > max_tokens {
            return Err(Error::invalid(
                "num_max_dispatch_tokens_per_rank",
                format!("rank {rank} has {} tokens, more than {max_tokens}", routing.num_tokens(rank)),
            ));
        }
    }
    Ok(())
}

/// Low-latency dispatch, expert-major (DeepEP `low_latency_dispatch`): every (token, k)
/// with an expert goes to that expert's rank, so a token reaches a rank once per local
/// expert it selected there. `x[r]` is `[T_r, hidden]`; every `T_r` must be at most
/// `num_max_dispatch_tokens_per_rank`.
pub fn ll_dispatch<T: Copy + Default>(
    routing: &Routing,
    x: &[Vec<T>],
    hidden: usize,
    num_max_dispatch_tokens_per_rank: usize,
) -> Result<LlDispatch<T>> {
    let num_ranks = routing.num_ranks();
    let experts_per_rank = routing.experts_per_rank();
    let max_tokens = num_max_dispatch_tokens_per_rank;
    let slots = num_ranks * max_tokens; // row slots per local expert
    let num_tokens: Vec<usize> = (0..num_ranks).map(|r| routing.num_tokens(r)).collect();
    check_hidden(hidden)?;
    check_shape("x", x, &num_tokens, hidden)?;
    check_max_tokens(routing, max_tokens)?;

    let mut ranks = Vec::with_capacity(num_ranks);
    for dst in 0..num_ranks {
        let mut recv = LlRecv {
            packed_recv_x: vec![T::default(); experts_per_rank * slots * hidden],
            packed_recv_src_info: vec![-1; experts_per_rank * slots],
            packed_recv_layout_range: vec![0; experts_per_rank * num_ranks],
            packed_recv_count: vec![0; experts_per_rank],
        };
        for local in 0..experts_per_rank {
            let expert = (dst * experts_per_rank + local) as i64;
            let mut row = 0; // next free row of this expert's buffer
            for src in 0..num_ranks {
                let begin = row;
                for token in 0..num_tokens[src] {
                    if !routing.topk_row(src, token).contains(&expert) {
                        continue;
                    }
                    let slot = local * slots + row;
                    recv.packed_recv_x[slot * hidden..(slot + 1) * hidden]
                        .copy_from_slice(&x[src][token * hidden..(token + 1) * hidden]);
                    recv.packed_recv_src_info[slot] = to_i32(token, "x")?;
                    row += 1;
                }
                let range = LayoutRange { begin, count: row - begin };
                recv.packed_recv_layout_range[local * num_ranks + src] = range.pack();
            }
            recv.packed_recv_count[local] = to_i32(row, "x")?;
        }
        ranks.push(recv);
    }

    let handle = LlHandle {
        routing: routing.clone(),
        num_max_dispatch_tokens_per_rank,
        recv_src_info: ranks.iter().map(|r| r.packed_recv_src_info.clone()).collect(),
        recv_layout_range: ranks.iter().map(|r| r.packed_recv_layout_range.clone()).collect(),
    };
    Ok(LlDispatch { ranks, handle })
}

/// What one rank receives from [`ll_dispatch_rank_major`] (NCCL EP's rank-major layout).
/// `M` = `num_max_dispatch_tokens_per_rank`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlRankMajorRecv<T> {
    /// `[R, M, H]`: block `s` holds, in token order, the tokens of rank `s` with at least one
    /// expert on this rank (each once). Rows past `recv_count[s]` are `T::default()`.
    pub recv_x: Vec<T>,
    /// `[R]`: rows received from each source rank.
    pub recv_count: Vec<i32>,
    /// `[R, M]`: source token index of each row (-1 past `recv_count`).
    pub recv_src_idx: Vec<i32>,
    /// `[R, M, K]`: the row's `topk_idx` as local expert ids, -1 for experts elsewhere (and
    /// on unused rows).
    pub recv_topk_idx: Vec<i64>,
    /// `[R, M, K]`: the row's weights where `recv_topk_idx` is a local expert, else `0.0`.
    pub recv_topk_weights: Vec<f32>,
}

/// Low-latency dispatch, rank-major: like HT dispatch (one copy per receiving rank), but
/// into fixed `[R, M]` slots per receiving rank. `x[r]` is `[T_r, hidden]`,
/// `topk_weights[r]` is `[T_r, K]`; every `T_r` must be at most `M`.
pub fn ll_dispatch_rank_major<T: Copy + Default>(
    routing: &Routing,
    x: &[Vec<T>],
    topk_weights: &[Vec<f32>],
    hidden: usize,
    num_max_dispatch_tokens_per_rank: usize,
) -> Result<Vec<LlRankMajorRecv<T>>> {
    let num_ranks = routing.num_ranks();
    let num_topk = routing.num_topk();
    let max_tokens = num_max_dispatch_tokens_per_rank;
    let num_tokens: Vec<usize> = (0..num_ranks).map(|r| routing.num_tokens(r)).collect();
    check_hidden(hidden)?;
    check_shape("x", x, &num_tokens, hidden)?;
    check_shape("topk_weights", topk_weights, &num_tokens, num_topk)?;
    check_max_tokens(routing, max_tokens)?;

    let mut out = Vec::with_capacity(num_ranks);
    for dst in 0..num_ranks {
        let mut recv = LlRankMajorRecv {
            recv_x: vec![T::default(); num_ranks * max_tokens * hidden],
            recv_count: vec![0; num_ranks],
            recv_src_idx: vec![-1; num_ranks * max_tokens],
            recv_topk_idx: vec![-1; num_ranks * max_tokens * num_topk],
            recv_topk_weights: vec![0.0; num_ranks * max_tokens * num_topk],
        };
        for src in 0..num_ranks {
            let mut row = 0;
            for token in 0..num_tokens[src] {
                let has_expert_here = (0..num_topk)
                    .any(|k| routing.expert(src, token, k).map(|e| routing.rank_of_expert(e)) == Some(dst));
                if !has_expert_here {
                    continue;
                }
                let slot = src * max_tokens + row;
                recv.recv_x[slot * hidden..(slot + 1) * hidden]
                    .copy_from_slice(&x[src][token * hidden..(token + 1) * hidden]);
                recv.recv_src_idx[slot] = to_i32(token, "x")?;
                for k in 0..num_topk {
                    if let Some(expert) = routing.expert(src, token, k)
                        && routing.rank_of_expert(expert) == dst
                    {
                        recv.recv_topk_idx[slot * num_topk + k] = routing.local_expert(expert) as i64;
                        recv.recv_topk_weights[slot * num_topk + k] = topk_weights[src][token * num_topk + k];
                    }
                }
                row += 1;
            }
            recv.recv_count[src] = to_i32(row, "x")?;
        }
        out.push(recv);
    }
    Ok(out)
}

/// Low-latency combine, rank-major (NCCL EP's `RANK_MAJOR`): each rank `r` returns one
/// pre-reduced row per token its [`ll_dispatch_rank_major`] received (`y[r]`, bf16 bits
/// shaped like its `recv_x`: `[R, M, hidden]`, rows below `recv_count`), and each source
/// token sums, in f32 from 0, the rows of the ranks holding one of its experts in ascending
/// rank order, unweighted, rounded once to bf16. `recv[r]` is rank `r`'s dispatch output.
/// Returns `[T_s, hidden]` bf16 per source rank; a token with no expert gives zeros.
pub fn ll_combine_rank_major(
    routing: &Routing,
    recv: &[LlRankMajorRecv<u16>],
    y: &[Vec<u16>],
    hidden: usize,
    num_max_dispatch_tokens_per_rank: usize,
) -> Result<Vec<Vec<u16>>> {
    let (num_ranks, num_topk, m) = (routing.num_ranks(), routing.num_topk(), num_max_dispatch_tokens_per_rank);
    check_hidden(hidden)?;
    if recv.len() != num_ranks || y.len() != num_ranks || y.iter().any(|v| v.len() != num_ranks * m * hidden) {
        return Err(Error::invalid("y", format!("one [{num_ranks}, {m}, {hidden}] tensor per rank expected")));
    }
    let mut out = Vec::with_capacity(num_ranks);
    for src in 0..num_ranks {
        let mut combined = vec![0u16; routing.num_tokens(src) * hidden];
        for token in 0..routing.num_tokens(src) {
            let mut owners: Vec<usize> = (0..num_topk)
                .filter_map(|k| routing.expert(src, token, k).map(|e| routing.rank_of_expert(e)))
                .collect();
            owners.sort_unstable();
            owners.dedup();
            let mut acc = vec![0f32; hidden];
            for r in owners {
                let block = &recv[r].recv_src_idx[src * m..(src + 1) * m];
                let count = recv[r].recv_count[src] as usize;
                let Some(j) = block[..count].iter().position(|&t| t as usize == token) else {
                    return Err(Error::invalid(
                        "recv",
                        format!("rank {r} did not receive token {token} of rank {src}"),
                    ));
                };
                let row = &y[r][(src * m + j) * hidden..(src * m + j + 1) * hidden];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += bf16_to_f32(v);
                }
            }
            for (o, a) in combined[token * hidden..(token + 1) * hidden].iter_mut().zip(acc) {
                *o = f32_to_bf16(a);
            }
        }
        out.push(combined);
    }
    Ok(out)
}

/// Low-latency combine (DeepEP `low_latency_combine`): every expert output row goes back to
/// its source rank, which computes per token `Σ_k w[t][k] · y_k` in f32 (see the module docs
/// for the exact operations) and rounds once to bf16.
///
/// `x[r]` is rank `r`'s expert output, bf16 bits shaped like its `packed_recv_x`
/// (`[L, R * M, hidden]`; only rows below `packed_recv_count` are read). `topk_weights[s]`
/// is `[T_s, K]` on the source rank; entries whose `topk_idx` is -1 are ignored. Returns
/// `combined_x` (`[T_s, hidden]` bf16) per source rank; a token with no expert gives zeros.
pub fn ll_combine(
    handle: &LlHandle,
    x: &[Vec<u16>],
    topk_weights: &[Vec<f32>],
    hidden: usize,
) -> Result<Vec<Vec<u16>>> {
    let routing = &handle.routing;
    let num_ranks = routing.num_ranks();
    let num_topk = routing.num_topk();
    let num_experts = routing.num_experts();
    let experts_per_rank = routing.experts_per_rank();
    let slots = num_ranks * handle.num_max_dispatch_tokens_per_rank;
    let num_tokens: Vec<usize> = (0..num_ranks).map(|r| routing.num_tokens(r)).collect();
    check_hidden(hidden)?;
    check_shape("x", x, &vec![experts_per_rank * slots; num_ranks], hidden)?;
    check_shape("topk_weights", topk_weights, &num_tokens, num_topk)?;

    // Send: each expert output row lands on its source rank in slot (global expert, token),
    // found through the handle's layout ranges and source indices.
    // landed[s][e * T_s + t] = (rank, row of x[rank]) holding expert e's output for token t.
    let mut landed: Vec<Vec<Option<(usize, usize)>>> =
        num_tokens.iter().map(|&t| vec![None; num_experts * t]).collect();
    for dst in 0..num_ranks {
        for local in 0..experts_per_rank {
            let expert = dst * experts_per_rank + local;
            for src in 0..num_ranks {
                let range = LayoutRange::unpack(handle.recv_layout_range[dst][local * num_ranks + src]);
                for row in range.begin..range.begin + range.count {
                    let slot = local * slots + row;
                    let token = usize::try_from(handle.recv_src_info[dst][slot])
                        .map_err(|_| Error::invalid("handle", "row without a source token"))?;
                    landed[src][expert * num_tokens[src] + token] = Some((dst, slot));
                }
            }
        }
    }

    // Reduce: each source rank sums the weighted expert outputs of each token, k ascending.
    let mut out = Vec::with_capacity(num_ranks);
    for src in 0..num_ranks {
        let mut combined_x = vec![0u16; num_tokens[src] * hidden];
        for token in 0..num_tokens[src] {
            let mut acc = vec![0.0f32; hidden];
            for k in 0..num_topk {
                let Some(expert) = routing.expert(src, token, k) else {
                    continue;
                };
                let weight = topk_weights[src][token * num_topk + k];
                let (dst, slot) = landed[src][expert * num_tokens[src] + token]
                    .ok_or_else(|| Error::invalid("handle", "an expert output row is missing"))?;
                for (h, value) in acc.iter_mut().enumerate() {
                    *value = bf16_to_f32(x[dst][slot * hidden + h]).mul_add(weight, *value);
                }
            }
            for (h, value) in acc.iter().enumerate() {
                combined_x[token * hidden + h] = f32_to_bf16(*value);
            }
        }
        out.push(combined_x);
    }
    Ok(out)
}
