//! `cargo xtask bench ht` (or `bin/moe-ep-bench-ht` in the GPU bundle): HT intranode
//! dispatch (bf16 and fp8) and combine (bf16), every rank of the group in this process
//! on the device of `MOE_EP_DEVICE` (default: GPU 0 when present, else the CPU emulator).
//!
//! Accounting as DeepEP's: a rank's dispatch moves the bytes it receives, its combine the
//! bytes it sends back (the same rows); GB/s per rank = those bytes / time per op. Timed:
//! cached dispatch (the handle reused, no count exchange, as DeepEP tunes) and combine, each
//! as `--iters` calls queued back to back after one host barrier (so host launch skew
//! between the ranks, which share one GPU here, is paid once, not per call); time per op =
//! the slowest rank's span / iters. Ceiling: the op's minimal traffic over all ranks (every
//! copied byte read once and written once) at the rate a same-run device-to-device copy
//! reaches; `%ceil` = ceiling / time. `--torch SCRIPT` adds the same-run pure-torch
//! reference (`ht_torch_reference.py`); `--csv PATH` appends the rows for plotting.
//!
//! Dispatch outputs come from the buffer's heap (`HtConfig::heap_bytes`), so senders store
//! into them directly (the one-pass path) and the timed cached dispatches reuse one set of
//! outputs (`dispatch_cached_into`); `--ring` leaves the heap out: every byte through the
//! rings (two passes), as before.
//!
//! `--gpus N` (issue 5): the ranks (default N) spread over N GPUs, rank r on GPU r % N, peer
//! access over NVLink. The ceiling is then NVLink's: a same-run peer copy of each GPU's share
//! of the op's bytes from every peer at once (`peer_copy_seconds`); the baseline is
//! torch.distributed `all_to_all_single` over NCCL (`--nccl ep_nccl_reference.py`, found
//! next to the `--torch` script when not named), N processes, the same ops and sizes.
//!
//!     ht [--gpus 1] [--ranks 8] [--tokens 4096] [--hidden 7168] [--topk 8] [--experts 256]
//!        [--channels C] [--iters 20] [--ring] [--sweep] [--torch SCRIPT] [--nccl SCRIPT] [--csv PATH]
//!        (--sweep: tokens 512..8192)
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep::{Device, Group, Result};
use moe_ep_bench::{
    Rng, Teardown, arg, baseline, copy_rate, csv_line, flag, gpu_devices, more_hardware_queues, peer_copy_seconds,
    torch_us, upload,
};

struct Args {
    ranks: usize,
    tokens: Vec<usize>,
    hidden: usize,
    topk: usize,
    experts: usize,
    channels: usize,
    iters: usize,
    ring: bool,
}

fn parse() -> Args {
    let tokens = if flag("--sweep") { vec![512, 1024, 2048, 4096, 8192] } else { vec![arg("--tokens", 4096)] };
    Args {
        ranks: arg("--ranks", if arg("--gpus", 1) > 1 { arg("--gpus", 1) } else { 8 }),
        tokens,
        hidden: arg("--hidden", 7168),
        topk: arg("--topk", 8),
        experts: arg("--experts", 256),
        channels: arg("--channels", 0),
        iters: arg("--iters", 20),
        ring: flag("--ring"),
    }
}

/// Per-rank (median µs dispatch bf16, dispatch fp8, combine; received rows).
fn bench_rank(group: &Group, a: &Args, tokens: usize, channels: usize) -> Result<[f64; 4]> {
    let (r, h, k, e) = (group.rank(), a.hidden, a.topk, a.experts);
    let s = group.stream();
    let mut rng = Rng(0x5EED ^ (r as u64) << 32 ^ tokens as u64);
    let idx = rng.topk(tokens, k, e);
    let x = rng.bf16(tokens * h);
    let upload = |bytes: &[u8]| upload(s, bytes);
    let topk = upload(bytemuck::cast_slice(&idx))?;
    let weights = upload(bytemuck::cast_slice(&vec![1.0f32 / k as f32; tokens * k]))?;
    let xb = upload(bytemuck::cast_slice(&x))?;
    let x8 = upload(&vec![0x38u8; tokens * h])?;
    let scales = upload(bytemuck::cast_slice(&vec![1.0f32; tokens * (h / 128)]))?;
    let cfg = HtConfig {
        num_experts: e,
        hidden: h,
        num_topk: k,
        num_scales: h / 128,
        num_channels: channels,
        warps_per_peer: 0,
        num_slots: 0,
        // Room for the first dispatch's outputs and the reused ones (bf16 and fp8 rows,
        // scales): at most every token from every rank, three times over.
        heap_bytes: if a.ring {
            0
        } else {
            3 * tokens * group.num_ranks() * (2 * h + 4 * (h / 128) + 4 + 12 * k) + (1 << 20)
        },
    };
    let mut buf = HtBuffer::new(group, cfg)?;
    let _teardown = Teardown(group);
    let layout = get_dispatch_layout(group, &topk, IndexType::I64, tokens, k, e)?;
    let args = HtDispatchArgs {
        x: &xb,
        hidden_bytes: 2 * h,
        num_tokens: tokens,
        x_scales: None,
        topk: Some((&topk, IndexType::I64, &weights, k)),
        layout: &layout,
        expert_alignment: 1,
        num_worst_tokens: None,
    };
    group.bootstrap().barrier()?;
    let out = buf.dispatch(group, &args)?;
    s.synchronize()?;
    group.take_device_error("ht_dispatch")?;
    let rows = out.num_recv_tokens.unwrap_or(0);
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        for _ in 0..2 {
            f()?; // warm up (pool memory, caches)
        }
        s.synchronize()?;
        group.bootstrap().barrier()?;
        let e0 = s.record_event()?;
        for _ in 0..a.iters {
            f()?;
        }
        let e1 = s.record_event()?;
        let ms = e0.elapsed_ms(&e1)?;
        group.take_device_error("ht")?;
        Ok(ms as f64 * 1e3 / a.iters as f64)
    };
    let reused = (
        buf.alloc_output(group, rows * 2 * h),
        buf.alloc_output(group, rows * h),
        buf.alloc_output(group, rows * 4 * (h / 128)),
    );
    let (bf16, fp8) = match reused {
        (Some(recv_bf16), Some(recv_fp8), Some(recv_scales)) if out.one_pass => {
            let bf16 = time(&mut || buf.dispatch_cached_into(group, &out.handle, &xb, 2 * h, None, &recv_bf16, None))?;
            let s8 = Some((&scales, h / 128));
            let fp8 =
                time(&mut || buf.dispatch_cached_into(group, &out.handle, &x8, h, s8, &recv_fp8, Some(&recv_scales)))?;
            (bf16, fp8)
        }
        _ => {
            if !a.ring {
                let (cap, free) = buf.heap().map_or((0, 0), |h| (h.capacity(), h.free_bytes()));
                eprintln!(
                    "rank {r}: outputs don't fit the heap ({free} of {cap} bytes free; first dispatch one-pass: {}): timing the ring path",
                    out.one_pass
                );
            }
            let bf16 = time(&mut || buf.dispatch_cached(group, &out.handle, &xb, 2 * h, None).map(drop))?;
            let fp8 =
                time(&mut || buf.dispatch_cached(group, &out.handle, &x8, h, Some((&scales, h / 128))).map(drop))?;
            (bf16, fp8)
        }
    };
    let combine = time(&mut || buf.combine(group, &out.handle, &out.recv_x, h, None, [None, None]).map(drop))?;
    Ok([bf16, fp8, combine, rows as f64])
}

fn main() -> Result<()> {
    more_hardware_queues();
    let a = parse();
    let dev = Device::from_env()?;
    let gpus = gpu_devices(&dev)?;
    let ranks_per_gpu = a.ranks.div_ceil(gpus.len());
    let sms = dev.num_sms()? as usize;
    // Ranks sharing a GPU split its SMs (a channel is 2 blocks); at most 20 SMs per rank.
    let channels = if a.channels > 0 { a.channels } else { (sms / (2 * ranks_per_gpu)).clamp(1, 10) };
    let rate = if gpus.len() > 1 { 0.0 } else { copy_rate(&dev)? };
    let path = if a.ring { "rings (two passes)" } else { "one pass (outputs in the heap)" };
    let model = format!("hidden {}, top-{} of {} experts; dispatch: {path}", a.hidden, a.topk, a.experts);
    if gpus.len() > 1 {
        println!(
            "HT intranode on {} x {} ({sms} SMs each), {} ranks ({ranks_per_gpu} per GPU), {} SMs per rank ({channels} channels); {model}; ceiling: NVLink peer copy (same run); x torch: all_to_all_single over NCCL",
            gpus.len(),
            dev.name(),
            a.ranks,
            2 * channels,
        );
    } else {
        println!(
            "HT intranode on {} ({sms} SMs), {} ranks sharing it, {} SMs per rank ({channels} channels); {model}; D2D copy {:.0} GB/s (read+write)",
            dev.name(),
            a.ranks,
            2 * channels,
            rate / 1e9
        );
    }
    let extra: Vec<String> =
        [("--hidden", a.hidden), ("--topk", a.topk), ("--experts", a.experts), ("--iters", a.iters)]
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()])
            .collect();
    let torch = baseline((gpus.len(), "ht"), a.ranks, &a.tokens, &extra);
    println!(
        "{:>8} {:>13} {:>10} {:>11} {:>12} {:>10} {:>7} {:>10} {:>8}",
        "tokens", "op", "time µs", "GB/s/rank", "recv MB/rank", "ceil µs", "%ceil", "torch µs", "x torch"
    );
    let devices: Vec<Device> = (0..a.ranks).map(|r| gpus[r % gpus.len()].clone()).collect();
    for &tokens in &a.tokens {
        let groups = Group::in_process(&devices)?;
        let per_rank: Vec<Result<[f64; 4]>> = std::thread::scope(|s| {
            let hs: Vec<_> = groups.iter().map(|g| s.spawn(|| bench_rank(g, &a, tokens, channels))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let per_rank: Vec<[f64; 4]> = per_rank.into_iter().collect::<Result<_>>()?;
        let total_rows: f64 = per_rank.iter().map(|v| v[3]).sum();
        for (i, (op, row_bytes)) in [
            ("dispatch bf16", 2 * a.hidden),
            ("dispatch fp8", a.hidden + 4 * (a.hidden / 128)),
            ("combine bf16", 2 * a.hidden),
        ]
        .iter()
        .enumerate()
        {
            let us = per_rank.iter().map(|v| v[i]).fold(0.0, f64::max);
            let recv_bytes = total_rows / a.ranks as f64 * *row_bytes as f64;
            let ceil_us = if gpus.len() > 1 {
                // Each GPU's bytes, an equal share from (dispatch) / to (combine) every GPU.
                let per_peer = recv_bytes * ranks_per_gpu as f64 / gpus.len() as f64;
                peer_copy_seconds(&gpus, per_peer as usize)? * 1e6
            } else {
                2.0 * total_rows * *row_bytes as f64 / rate * 1e6
            };
            let torch_us = torch_us(&torch, tokens, op);
            let (tu, ratio) = match torch_us {
                Some(t) => (format!("{t:.1}"), format!("{:.2}x", t / us)),
                None => ("-".into(), "-".into()),
            };
            let gbps = recv_bytes / us / 1e3;
            let pct = 100.0 * ceil_us / us;
            println!(
                "{tokens:>8} {op:>13} {us:>10.1} {gbps:>11.1} {:>12.1} {ceil_us:>10.1} {pct:>6.1}% {tu:>10} {ratio:>8}",
                recv_bytes / 1e6,
            );
            csv_line(&format!(
                "ht,{tokens},{op},{us:.2},{gbps:.2},{pct:.2},{},{}",
                torch_us.unwrap_or(f64::NAN),
                gpus.len()
            ));
        }
    }
    Ok(())
}
