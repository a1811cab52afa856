//! `cargo xtask bench ll` (or `bin/moe-ep-bench-ll` in the GPU bundle): LL dispatch and
//! combine (bf16), every rank of the group in this process on the device of `MOE_EP_DEVICE`.
//!
//! Per op: median kernel time of the slowest rank over `--iters` event-timed calls (a host
//! barrier before each), the bytes a rank moves (dispatch: its `(token, expert)` rows sent;
//! combine: the same rows back), GB/s, and the same-run D2D copy time of all ranks' bytes
//! (read + write) as the ceiling.
//!
//!     ll [--ranks 8] [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256] [--iters 50] [--sweep]
use moe_ep::layout::IndexType;
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions};
use moe_ep::{Device, Group, Result};
use moe_ep_bench::{Rng, arg, copy_rate, flag, median, more_hardware_queues, upload};

/// Median µs of dispatch and combine on one rank, and the rows it sent.
fn bench_rank(group: &Group, tokens: usize, max_tokens: usize, iters: usize) -> Result<[f64; 3]> {
    let (h, k, e) = (arg("--hidden", 7168), arg("--topk", 8), arg("--experts", 256));
    let s = group.stream();
    let mut rng = Rng(0x11 ^ (group.rank() as u64) << 32 ^ tokens as u64);
    let idx = rng.topk(tokens, k, e);
    let rows = idx.iter().filter(|&&x| x >= 0).count();
    let upload = |bytes: &[u8]| upload(s, bytes);
    let topk = upload(bytemuck::cast_slice(&idx))?;
    let weights = upload(bytemuck::cast_slice(&vec![1.0f32 / k as f32; tokens * k]))?;
    let x = upload(bytemuck::cast_slice(&rng.bf16(tokens * h)))?;
    let mut buf = LlBuffer::new(group, LlConfig { num_experts: e, hidden: h, max_tokens })?;
    let (mut d, mut c) = (Vec::new(), Vec::new());
    for i in 0..iters + 3 {
        group.bootstrap().barrier()?;
        let e0 = s.record_event()?;
        let out = buf.dispatch(group, &x, tokens, &topk, IndexType::I64, k, LlDispatchOptions::default())?;
        let e1 = s.record_event()?;
        group.bootstrap().barrier()?;
        let e2 = s.record_event()?;
        buf.combine(group, &out.handle, &out.packed_recv_x, tokens, &topk, IndexType::I64, &weights, k, false)?;
        let e3 = s.record_event()?;
        let (dm, cm) = (e0.elapsed_ms(&e1)?, e2.elapsed_ms(&e3)?);
        group.take_device_error("ll")?;
        if i >= 3 {
            d.push(dm);
            c.push(cm);
        }
    }
    Ok([median(d) as f64 * 1e3, median(c) as f64 * 1e3, rows as f64])
}

fn main() -> Result<()> {
    more_hardware_queues();
    let dev = Device::from_env()?;
    let ranks = arg("--ranks", 8);
    let hidden = arg("--hidden", 7168);
    let iters = arg("--iters", 50);
    let tokens: Vec<usize> = if flag("--sweep") { vec![1, 8, 32, 64, 128, 256] } else { vec![arg("--tokens", 128)] };
    let rate = copy_rate(&dev)?;
    println!(
        "LL on {}, {ranks} ranks sharing it; hidden {hidden}, top-{} of {}; D2D copy {:.0} GB/s (read+write)",
        dev.name(),
        arg("--topk", 8),
        arg("--experts", 256),
        rate / 1e9
    );
    println!("{:>7} {:>9} {:>10} {:>10} {:>10} {:>7}", "tokens", "op", "time µs", "GB/s/rank", "ceil µs", "%ceil");
    for &t in &tokens {
        let max_tokens = t.max(1);
        let groups = Group::in_process(&vec![dev.clone(); ranks])?;
        let per_rank: Vec<Result<[f64; 3]>> = std::thread::scope(|s| {
            let hs: Vec<_> = groups.iter().map(|g| s.spawn(move || bench_rank(g, t, max_tokens, iters))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let per_rank: Vec<[f64; 3]> = per_rank.into_iter().collect::<Result<_>>()?;
        let rows: f64 = per_rank.iter().map(|v| v[2]).sum();
        let row_bytes = 2.0 * hidden as f64;
        let ceil_us = 2.0 * rows * row_bytes / rate * 1e6;
        for (i, op) in ["dispatch", "combine"].iter().enumerate() {
            let us = per_rank.iter().map(|v| v[i]).fold(0.0, f64::max);
            let gbps = rows / ranks as f64 * row_bytes / us / 1e3;
            println!("{t:>7} {op:>9} {us:>10.1} {gbps:>10.1} {ceil_us:>10.1} {:>6.1}%", 100.0 * ceil_us / us);
        }
    }
    Ok(())
}
