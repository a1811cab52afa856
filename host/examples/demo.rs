//! An MoE layer's communication, end to end: HT dispatch → identity experts → HT combine,
//! then LL dispatch → identity experts → LL combine. Every output of every call is checked
//! bit for bit against the CPU reference (`moe_ep::reference`), each op is timed, and a
//! table says how long each took and whether it matched. Exits non-zero on a mismatch.
//!
//! On a GPU machine: one rank per GPU when there are several, else 8 ranks sharing GPU 0,
//! at DeepEP's test sizes (HT 4096 tokens per rank, LL 128; hidden 7168, top-8 of 256
//! experts). Without a GPU: 4 ranks on the CPU emulator, running the very same kernel
//! source, at small sizes (HT 64 tokens, LL 16; hidden 256, top-4 of 16 experts). The
//! times are single calls seen from the host; `cargo xtask bench ht|ll` measures properly.
//!
//!     cargo xtask demo            # or: cargo run --release -p moe-ep --example demo
//!     cargo xtask demo -- --ranks 2 --tokens 128 --ll-tokens 32 --hidden 512
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs, HtDispatchOutputs};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlDispatchOutputs, LlStats};
use moe_ep::reference::{self, HtRecv, LayoutRange, LlRecv, Routing, f32_to_bf16};
use moe_ep::{Device, DeviceBuffer, Group, Stream};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: demo [--ranks N] [--tokens N] [--ll-tokens N] [--hidden H]";
const OPS: [&str; 4] = ["HT dispatch", "HT combine", "LL dispatch", "LL combine"];
/// What checked outputs are overwritten with (see [`poison`]).
const POISON: u8 = 0xA5;

/// The model's shapes and how many calls of each op to make.
#[derive(Clone, Copy)]
struct Sizes {
    experts: usize,
    topk: usize,
    hidden: usize,
    /// Tokens per rank of the HT calls.
    ht_tokens: usize,
    /// Tokens per rank of the LL calls.
    ll_tokens: usize,
    /// Untimed first calls (pool growth, first touch on a GPU).
    warm_up_calls: usize,
    timed_calls: usize,
}

/// One rank's tokens and their routing.
struct Tokens {
    /// `[T, hidden]` bf16 bits.
    x: Vec<u16>,
    /// `[T, topk]`, distinct experts per token.
    topk_idx: Vec<i64>,
    /// `[T, topk]`.
    topk_weights: Vec<f32>,
}

/// What the reference says one rank gets.
struct Expected {
    ht_dispatch: HtRecv<u16>,
    ht_combined: Vec<u16>,
    ll_dispatch: LlRecv<u16>,
    ll_combined: Vec<u16>,
}

/// One op on one rank: µs of each timed call, the bytes one call moves, whether every call
/// matched the reference.
struct OpRun {
    us: Vec<f64>,
    bytes: usize,
    matched: bool,
}

impl OpRun {
    fn new(bytes: usize) -> OpRun {
        OpRun { us: Vec::new(), bytes, matched: true }
    }
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `tokens` random bf16 rows in `[-4, 4)`, each routed to `topk` distinct random experts.
    fn tokens(&mut self, tokens: usize, s: &Sizes) -> Tokens {
        let x = (0..tokens * s.hidden).map(|_| f32_to_bf16(8.0 * self.unit() - 4.0)).collect();
        let mut topk_idx = Vec::with_capacity(tokens * s.topk);
        for _ in 0..tokens {
            let row = topk_idx.len();
            while topk_idx.len() < row + s.topk {
                let expert = (self.next_u64() % s.experts as u64) as i64;
                if !topk_idx[row..].contains(&expert) {
                    topk_idx.push(expert);
                }
            }
        }
        let topk_weights = (0..tokens * s.topk).map(|_| self.unit()).collect();
        Tokens { x, topk_idx, topk_weights }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // More than 8 spinning streams on one GPU need more hardware queues (before CUDA starts).
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        // SAFETY: single-threaded at this point; no other code reads the environment yet.
        unsafe { std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", "32") };
    }
    let flags = parse_flags()?;
    let flag = |name: &str| flags.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    let device = Device::from_env()?;
    let cpu = device.is_cpu();
    let devices: Vec<Device> = match (cpu, Device::cuda_count().unwrap_or(0), flag("--ranks")) {
        (true, _, ranks) => vec![device.clone(); ranks.unwrap_or(4)],
        // HT within one NVLink domain takes up to 8 ranks.
        (false, n, None) if n >= 2 => (0..n.min(8)).map(Device::cuda).collect::<Result<_, _>>()?,
        (false, _, ranks) => vec![device.clone(); ranks.unwrap_or(8)],
    };
    let num_ranks = devices.len();
    // The emulator runs an OS thread per GPU thread, and the waiting ones share the cores
    // with the working ones: a call takes a second or so whatever its size. So: small
    // shapes, few calls and no warm-up (nothing is loaded or first touched lazily there).
    // Experts: a multiple of the rank count (each rank holds as many).
    let (experts, topk, hidden, ht_tokens, ll_tokens, warm_up_calls, timed_calls) =
        if cpu { (16usize, 4, 256, 64, 16, 0, 3) } else { (256, 8, 7168, 4096, 128, 1, 5) };
    let sizes = Sizes {
        experts: experts.next_multiple_of(num_ranks),
        topk,
        hidden: flag("--hidden").unwrap_or(hidden),
        ht_tokens: flag("--tokens").unwrap_or(ht_tokens),
        ll_tokens: flag("--ll-tokens").unwrap_or(ll_tokens),
        warm_up_calls,
        timed_calls,
    };
    let placement = if cpu {
        format!("on the {}", device.name())
    } else if devices.iter().filter(|d| d.same_as(&devices[0])).count() == 1 {
        format!("one per GPU ({})", device.name())
    } else {
        format!("sharing one {}", device.name())
    };
    println!(
        "moe-ep demo: {num_ranks} ranks {placement}; hidden {}, top-{} of {} experts, bf16 rows, identity experts",
        sizes.hidden, sizes.topk, sizes.experts,
    );

    // Every rank's inputs (its generator seeded by its rank), and what the reference makes
    // of all of them.
    let mut rngs: Vec<Rng> = (0..num_ranks).map(|rank| Rng(0xDE30 + rank as u64)).collect();
    let ht_in: Vec<Tokens> = rngs.iter_mut().map(|rng| rng.tokens(sizes.ht_tokens, &sizes)).collect();
    let ll_in: Vec<Tokens> = rngs.iter_mut().map(|rng| rng.tokens(sizes.ll_tokens, &sizes)).collect();
    let expected = reference_outputs(&sizes, &ht_in, &ll_in)?;

    let groups = Group::in_process(&devices)?;
    let runs = std::thread::scope(|s| -> moe_ep::Result<Vec<[OpRun; 4]>> {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let (ht, ll, want) = (&ht_in[group.rank()], &ll_in[group.rank()], &expected[group.rank()]);
                s.spawn(move || -> moe_ep::Result<[OpRun; 4]> {
                    let [ht_dispatch, ht_combine] = run_ht(&group, &sizes, ht, want)?;
                    let [ll_dispatch, ll_combine] = run_ll(&group, &sizes, ll, want)?;
                    Ok([ht_dispatch, ht_combine, ll_dispatch, ll_combine])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })?;

    println!(
        "time: host wall clock from a barrier of all ranks to the end of a stream synchronize, the slowest \
         rank's, median of {} calls{}",
        sizes.timed_calls,
        if sizes.warm_up_calls > 0 { " after a warm-up" } else { "" }
    );
    println!(
        "GB/s: token bytes one rank moves (HT: the rows it receives, and sends back; LL: a row per (token, \
         expert) it sends, and gets back), mean over ranks, / time"
    );
    println!("{:<12} {:>12} {:>11} {:>9}  matches reference", "op", "tokens/rank", "time µs", "GB/s");
    let mut all_matched = true;
    for (op, name) in OPS.iter().enumerate() {
        let slowest: Vec<f64> =
            (0..sizes.timed_calls).map(|call| runs.iter().map(|r| r[op].us[call]).fold(0.0, f64::max)).collect();
        let us = median(slowest);
        let bytes = runs.iter().map(|r| r[op].bytes).sum::<usize>() as f64 / num_ranks as f64;
        let gbps = bytes / us / 1e3;
        // The emulator moves well under a MB/s: keep three digits there too.
        let gbps = if gbps >= 0.1 { format!("{gbps:.2}") } else { format!("{gbps:.2e}") };
        let matched = runs.iter().all(|r| r[op].matched);
        all_matched &= matched;
        let tokens = if op < 2 { sizes.ht_tokens } else { sizes.ll_tokens };
        println!("{name:<12} {tokens:>12} {us:>11.1} {gbps:>9}  {}", if matched { "yes" } else { "NO" });
    }
    if !all_matched {
        return Err("some outputs differ from the CPU reference".into());
    }
    println!("ok: every output of every call on every rank matched the CPU reference bit for bit.");
    Ok(())
}

/// `--name N` pairs from the command line.
fn parse_flags() -> Result<Vec<(String, usize)>, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    args.chunks(2)
        .map(|pair| match pair {
            [name, value] if ["--ranks", "--tokens", "--ll-tokens", "--hidden"].contains(&name.as_str()) => {
                value.parse().map(|v| (name.clone(), v)).map_err(|_| format!("{name} {value}: not a number\n{USAGE}"))
            }
            _ => Err(format!("unexpected argument `{}`\n{USAGE}", pair[0])),
        })
        .collect()
}

/// Per rank, what the reference dispatches and combines, the experts being the identity
/// (each received row is its own expert output).
fn reference_outputs(s: &Sizes, ht_in: &[Tokens], ll_in: &[Tokens]) -> moe_ep::Result<Vec<Expected>> {
    let n = ht_in.len();
    let routing =
        |input: &[Tokens]| Routing::new(n, s.experts, s.topk, input.iter().map(|t| t.topk_idx.clone()).collect());
    let xs = |input: &[Tokens]| input.iter().map(|t| t.x.clone()).collect::<Vec<_>>();
    let weights = |input: &[Tokens]| input.iter().map(|t| t.topk_weights.clone()).collect::<Vec<_>>();

    let ht = reference::ht_dispatch(&routing(ht_in)?, &xs(ht_in), &weights(ht_in), s.hidden, 1, None)?;
    let ht_y: Vec<Vec<u16>> = ht.ranks.iter().map(|r| r.recv_x.clone()).collect();
    let ht_combined = reference::ht_combine(&ht.handle, &ht_y, None, [None, None], s.hidden)?;
    drop(ht_y);

    let ll = reference::ll_dispatch(&routing(ll_in)?, &xs(ll_in), s.hidden, s.ll_tokens)?;
    let ll_y: Vec<Vec<u16>> = ll.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
    let ll_combined = reference::ll_combine(&ll.handle, &ll_y, &weights(ll_in), s.hidden)?;
    drop(ll_y);

    Ok(ht
        .ranks
        .into_iter()
        .zip(ht_combined)
        .zip(ll.ranks.into_iter().zip(ll_combined))
        .map(|((ht_dispatch, ht_combined), (ll_dispatch, ll_combined))| Expected {
            ht_dispatch,
            ht_combined: ht_combined.combined_x,
            ll_dispatch,
            ll_combined,
        })
        .collect())
}

/// One rank's HT calls: `get_dispatch_layout`, then per call dispatch → identity experts →
/// combine, each output checked.
fn run_ht(group: &Group, s: &Sizes, input: &Tokens, want: &Expected) -> moe_ep::Result<[OpRun; 2]> {
    let (stream, t, h, k) = (group.stream(), s.ht_tokens, s.hidden, s.topk);
    let mut buf = HtBuffer::new(
        group,
        HtConfig {
            num_experts: s.experts,
            hidden: h,
            num_topk: k,
            num_scales: 0,
            // One channel (two blocks) on the emulator, where each GPU thread is an OS
            // thread; on a GPU the default (20 SMs, or a share of the GPU's).
            num_channels: if group.device().is_cpu() { 1 } else { 0 },
            warps_per_peer: 0,
            num_slots: 0,
            // Room for two calls' outputs of the worst routing (every token of every rank
            // here): dispatch then stores rows straight into them and combine pulls them
            // back (the one-pass path).
            heap_bytes: 2 * group.num_ranks() * t * (2 * h + 4 + 12 * k) + (1 << 20),
        },
    )?;
    let _teardown = Teardown(group);
    let (x, topk_idx, topk_weights) =
        (upload(stream, &input.x)?, upload(stream, &input.topk_idx)?, upload(stream, &input.topk_weights)?);
    let layout = get_dispatch_layout(group, &topk_idx, IndexType::I64, t, k, s.experts)?;
    let args = HtDispatchArgs {
        x: &x,
        hidden_bytes: 2 * h,
        num_tokens: t,
        x_scales: None,
        topk: Some((&topk_idx, IndexType::I64, &topk_weights, k)),
        layout: &layout,
        expert_alignment: 1,
        num_worst_tokens: None,
    };
    let rows_bytes = want.ht_dispatch.num_recv_tokens * 2 * h;
    let (mut dispatch, mut combine) = (OpRun::new(rows_bytes), OpRun::new(rows_bytes));
    for call in 0..s.warm_up_calls + s.timed_calls {
        let (out, dispatch_us) = timed(group, || buf.dispatch(group, &args))?;
        group.take_device_error("ht_dispatch")?;
        dispatch.matched &= ht_dispatch_matches(stream, &out, &want.ht_dispatch, h, k)?;
        // Identity experts: each received row is its own expert output.
        let (combined, combine_us) =
            timed(group, || buf.combine(group, &out.handle, &out.recv_x, h, None, [None, None]))?;
        group.take_device_error("ht_combine")?;
        combine.matched &= combined.combined_x.to_vec::<u16>(stream)?[..t * h] == want.ht_combined[..];
        poison(stream, &[&out.recv_x, &out.recv_src_idx, &out.recv_topk_idx, &out.recv_topk_weights])?;
        poison(stream, &[&combined.combined_x])?;
        if call >= s.warm_up_calls {
            dispatch.us.push(dispatch_us);
            combine.us.push(combine_us);
        }
    }
    Ok([dispatch, combine])
}

/// One rank's LL calls: per call dispatch → identity experts → combine, each output checked.
fn run_ll(group: &Group, s: &Sizes, input: &Tokens, want: &Expected) -> moe_ep::Result<[OpRun; 2]> {
    let (stream, t, h, k) = (group.stream(), s.ll_tokens, s.hidden, s.topk);
    let mut buf = LlBuffer::new(group, LlConfig { num_experts: s.experts, hidden: h, max_tokens: t })?;
    let _teardown = Teardown(group);
    let (x, topk_idx, topk_weights) =
        (upload(stream, &input.x)?, upload(stream, &input.topk_idx)?, upload(stream, &input.topk_weights)?);
    let rows_bytes = input.topk_idx.iter().filter(|&&e| e >= 0).count() * 2 * h;
    let (mut dispatch, mut combine) = (OpRun::new(rows_bytes), OpRun::new(rows_bytes));
    for call in 0..s.warm_up_calls + s.timed_calls {
        let bf16 = LlDispatchOptions::default(); // no fp8 cast, both halves in one call
        let (out, dispatch_us) =
            timed(group, || buf.dispatch(group, &x, t, &topk_idx, IndexType::I64, k, bf16, LlStats::default()))?;
        group.take_device_error("ll_dispatch")?;
        dispatch.matched &= ll_dispatch_matches(stream, &out, &want.ll_dispatch, group.num_ranks(), t, h)?;
        // Identity experts writing their outputs into the zero-copy buffer, where the
        // sources read them in place (DeepEP's `zero_copy` combine).
        let y = buf.combine_buffer(&out.handle);
        y.copy_from_async(stream, &out.packed_recv_x, y.len())?;
        let (combined, combine_us) = timed(group, || {
            buf.combine(
                group,
                &out.handle,
                &y,
                t,
                &topk_idx,
                IndexType::I64,
                &topk_weights,
                k,
                false,
                LlStats::default(),
            )
        })?;
        group.take_device_error("ll_combine")?;
        combine.matched &= combined.combined_x.to_vec::<u16>(stream)?[..t * h] == want.ll_combined[..];
        // Peers write this rank's receive rows only in the dispatch after next (same set),
        // which none starts before this rank has joined the next call's barrier.
        poison(stream, &[&out.packed_recv_x, &out.handle.packed_recv_src_info, &combined.combined_x])?;
        if call >= s.warm_up_calls {
            dispatch.us.push(dispatch_us);
            combine.us.push(combine_us);
        }
    }
    Ok([dispatch, combine])
}

/// Runs the collective `op` once every rank is ready and waits for it: its result and µs.
fn timed<T>(group: &Group, op: impl FnOnce() -> moe_ep::Result<T>) -> moe_ep::Result<(T, f64)> {
    // Ranks may share a GPU: nobody launches while a peer still copies (docs/design.md).
    group.stream().synchronize()?;
    group.bootstrap().barrier()?;
    let started = Instant::now();
    let result = op()?;
    group.stream().synchronize()?;
    Ok((result, started.elapsed().as_secs_f64() * 1e6))
}

/// Overwrites outputs already checked: heap blocks, pool memory and LL buffer sets are
/// reused, and a later call that failed to write its outputs must not pass on these.
fn poison(s: &Stream, buffers: &[&DeviceBuffer]) -> moe_ep::Result<()> {
    buffers.iter().try_for_each(|b| b.fill(s, POISON))
}

/// An HT dispatch's outputs against the reference's: counts, rows, source tokens, local
/// expert ids and weights.
fn ht_dispatch_matches(
    s: &Stream,
    out: &HtDispatchOutputs,
    want: &HtRecv<u16>,
    hidden: usize,
    topk: usize,
) -> moe_ep::Result<bool> {
    let n = want.num_recv_tokens;
    if out.num_recv_tokens != Some(n)
        || out.num_recv_tokens_per_expert_list.as_ref() != Some(&want.num_recv_tokens_per_expert)
    {
        return Ok(false);
    }
    let weights: Vec<f32> = out.recv_topk_weights.to_vec(s)?;
    Ok(out.recv_x.to_vec::<u16>(s)?[..n * hidden] == want.recv_x[..]
        && out.recv_src_idx.to_vec::<i32>(s)?[..n] == want.recv_src_idx[..]
        && out.recv_topk_idx.to_vec::<i64>(s)?[..n * topk] == want.recv_topk_idx[..]
        && weights[..n * topk].iter().zip(&want.recv_topk_weights).all(|(a, b)| a.to_bits() == b.to_bits()))
}

/// An LL dispatch's outputs against the reference's. Rows of different source ranks land in
/// arrival order, so the comparison is per (local expert, source) range: the same counts,
/// ranges that tile each expert's rows, the same source tokens and rows.
fn ll_dispatch_matches(
    s: &Stream,
    out: &LlDispatchOutputs,
    want: &LlRecv<u16>,
    num_ranks: usize,
    max_tokens: usize,
    hidden: usize,
) -> moe_ep::Result<bool> {
    let counts: Vec<i32> = out.packed_recv_count.to_vec(s)?;
    let ranges: Vec<i64> = out.handle.packed_recv_layout_range.to_vec(s)?;
    let src_info: Vec<i32> = out.handle.packed_recv_src_info.to_vec(s)?;
    let x: Vec<u16> = out.packed_recv_x.to_vec(s)?;
    if counts != want.packed_recv_count {
        return Ok(false);
    }
    let slots = num_ranks * max_tokens; // rows per local expert
    for (expert, &count) in counts.iter().enumerate() {
        let mut covered = vec![false; count as usize];
        for src in 0..num_ranks {
            let got = LayoutRange::unpack(ranges[expert * num_ranks + src]);
            let exp = LayoutRange::unpack(want.packed_recv_layout_range[expert * num_ranks + src]);
            if got.count != exp.count || got.begin + got.count > covered.len() {
                return Ok(false);
            }
            for i in 0..got.count {
                let (row, want_row) = (expert * slots + got.begin + i, expert * slots + exp.begin + i);
                let rows_differ = x[row * hidden..(row + 1) * hidden]
                    != want.packed_recv_x[want_row * hidden..(want_row + 1) * hidden];
                if std::mem::replace(&mut covered[got.begin + i], true)
                    || src_info[row] != want.packed_recv_src_info[want_row]
                    || rows_differ
                {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// `data` in a new buffer of the stream's pool.
fn upload<T: bytemuck::Pod>(s: &Stream, data: &[T]) -> moe_ep::Result<DeviceBuffer> {
    let b = s.alloc(std::mem::size_of_val(data).max(16))?;
    b.write(s, 0, data)?;
    Ok(b)
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Dropped before the rank's buffer, also on an early return: peers write into each
/// other's buffers, so nobody frees its own while a peer may still use it.
struct Teardown<'a>(&'a Group);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.0.stream().synchronize();
        let _ = self.0.bootstrap().barrier();
    }
}
