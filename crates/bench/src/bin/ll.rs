//! `cargo xtask bench ll` (or `bin/moe-ep-bench-ll` in the GPU bundle): LL dispatch (bf16
//! and fp8) and combine (bf16), every rank of the group in this process on the device of
//! `MOE_EP_DEVICE`.
//!
//! Each rank captures CUDA graphs of `--iters` back-to-back repetitions — of a dispatch, of
//! a (dispatch, combine) pair, of an fp8 dispatch, of a (dispatch, zero-copy combine) pair —
//! the way a decode step replays all its layers, and times whole replays (median of 5 after
//! a warm-up): µs per op = replay / iters; a combine = its pair less the dispatch. Events
//! only around replays: one between kernels costs ~23 µs with 8 ranks sharing a GPU. Per op:
//! the mean over ranks.
//! Bytes a rank moves: dispatch, its `(token, expert)` rows sent; combine, the same rows
//! back. `combine zc`: the expert outputs already in `LlBuffer::combine_buffer` (zero-copy),
//! pulled by their sources. Ceiling: a same-run D2D copy of all ranks' bytes of the op. `--torch SCRIPT` adds the
//! same-run pure-torch reference; `--csv PATH` appends rows for plotting.
//!
//! `--gpus N` (issue 5): the ranks (default N) spread over N GPUs, rank r on GPU r % N, peer
//! access over NVLink; the ceiling is then a same-run NVLink peer copy of each GPU's bytes,
//! an equal share from every peer at once, and the baseline torch.distributed
//! `all_to_all_single` over NCCL (`--nccl ep_nccl_reference.py`, found next to `--torch`).
//!
//!     ll [--gpus 1] [--ranks 8] [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256]
//!        [--iters 50] [--sweep] [--torch SCRIPT] [--nccl SCRIPT] [--csv PATH]
use moe_ep::layout::IndexType;
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlStats};
use moe_ep::{Device, Group, Result};
use moe_ep_bench::{
    Rng, Teardown, arg, baseline, copy_seconds, csv_line, flag, gpu_devices, median, more_hardware_queues,
    peer_copy_seconds, torch_us, upload,
};

/// µs per op of (dispatch bf16, combine, dispatch fp8, zero-copy combine) on one rank, and
/// the rows it sent.
fn bench_rank(group: &Group, tokens: usize, max_tokens: usize, iters: usize) -> Result<[f64; 5]> {
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
    let _teardown = Teardown(group);
    let fp8 = LlDispatchOptions { use_fp8: true, ..Default::default() };
    group.bootstrap().barrier()?; // nobody launches while a peer still uploads (shared GPU)
    // Ordinary calls create the outputs the captured ones reuse.
    let started = std::time::Instant::now();
    let out =
        buf.dispatch(group, &x, tokens, &topk, IndexType::I64, k, LlDispatchOptions::default(), LlStats::default())?;
    // (The emulator runs kernels inside the call; on a GPU a long call is a stalled host.)
    if !group.device().is_cpu() && started.elapsed().as_secs_f64() > 1.0 {
        eprintln!("rank {}: the first dispatch() call stalled {:?} on the host", group.rank(), started.elapsed());
    }
    let c = buf.combine(
        group,
        &out.handle,
        &out.packed_recv_x,
        tokens,
        &topk,
        IndexType::I64,
        &weights,
        k,
        false,
        LlStats::default(),
    )?;
    let out8 = buf.dispatch(group, &x, tokens, &topk, IndexType::I64, k, fp8, LlStats::default())?;
    s.synchronize()?;
    group.take_device_error("ll")?;
    // Zero-copy: the expert outputs already in the buffer, read in place by their sources.
    let zero_copy = buf.combine_buffer(&out.handle);
    #[derive(Clone, Copy)]
    enum Op {
        Dispatch,
        DispatchFp8,
        Combine,
        CombineZeroCopy,
    }
    // Combines take the handle of the dispatch before them (its epoch): the bf16 one.
    let issue = |b: &mut LlBuffer, op: Op| -> Result<()> {
        let (i64, w) = (IndexType::I64, &weights);
        match op {
            Op::Dispatch => {
                b.dispatch_into(group, &out, &x, tokens, &topk, i64, k, Default::default(), LlStats::default())
            }
            Op::DispatchFp8 => b.dispatch_into(group, &out8, &x, tokens, &topk, i64, k, fp8, LlStats::default()),
            Op::Combine | Op::CombineZeroCopy => {
                let y = if matches!(op, Op::Combine) { &out.packed_recv_x } else { &zero_copy };
                b.combine_into(
                    group,
                    &out.handle,
                    y,
                    &c.combined_x,
                    tokens,
                    &topk,
                    i64,
                    w,
                    k,
                    false,
                    LlStats::default(),
                )
            }
        }
        .map(drop)
    };
    // Graphs of `iters` repetitions of a sequence of ops, the way a decode step replays all
    // its layers. Events only around a graph: an event recorded between kernels stalls ranks
    // sharing a GPU (8 ranks: ~23 µs per event, measured 2026-12-01; each graph node is ~3
    // µs otherwise).
    let mut graph_of = |ops: &[Op]| -> Result<moe_ep::Graph> {
        s.begin_capture()?;
        let captured = (0..iters).try_for_each(|_| ops.iter().try_for_each(|&op| issue(&mut buf, op)));
        let g = s.end_capture();
        captured?;
        g
    };
    let graphs = [
        graph_of(&[Op::Dispatch])?,
        graph_of(&[Op::Dispatch, Op::Combine])?,
        graph_of(&[Op::DispatchFp8])?,
        graph_of(&[Op::Dispatch, Op::CombineZeroCopy])?,
    ];
    s.synchronize()?;
    // Every rank has instantiated its graphs before any replays: on a shared GPU, an
    // instantiation can wait for the kernels running there, which wait for this rank.
    group.bootstrap().barrier()?;
    // µs per repetition: the median of 5 replays after a warm-up one.
    let per_rep = |g: &moe_ep::Graph| -> Result<f64> {
        let mut times = Vec::new();
        for rep in 0..6 {
            group.bootstrap().barrier()?;
            let e0 = s.record_event()?;
            g.launch(s)?;
            let e1 = s.record_event()?;
            e1.synchronize()?;
            group.take_device_error("ll")?;
            if rep > 0 {
                times.push(e0.elapsed_ms(&e1)?);
            }
        }
        Ok(median(times) as f64 * 1e3 / iters as f64)
    };
    let [d, dc, d8, dz] = [per_rep(&graphs[0])?, per_rep(&graphs[1])?, per_rep(&graphs[2])?, per_rep(&graphs[3])?];
    // A combine's time: its pair's less the dispatch's.
    Ok([d, dc - d, d8, rows as f64, dz - d])
}

fn main() -> Result<()> {
    more_hardware_queues();
    let dev = Device::from_env()?;
    let gpus = gpu_devices(&dev)?;
    let ranks = arg("--ranks", if gpus.len() > 1 { gpus.len() } else { 8 });
    let ranks_per_gpu = ranks.div_ceil(gpus.len());
    let hidden = arg("--hidden", 7168);
    let (topk, experts) = (arg("--topk", 8), arg("--experts", 256));
    let iters = arg("--iters", 50);
    let tokens: Vec<usize> = if flag("--sweep") { vec![1, 8, 32, 64, 128, 256] } else { vec![arg("--tokens", 128)] };
    let extra: Vec<String> = [("--hidden", hidden), ("--topk", topk), ("--experts", experts), ("--iters", iters)]
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect();
    let torch = baseline((gpus.len(), "ll"), ranks, &tokens, &extra);
    let placement = if gpus.len() > 1 {
        format!("{} x {}, {ranks} ranks ({ranks_per_gpu} per GPU); copy: NVLink peer copy", gpus.len(), dev.name())
    } else {
        format!("{}, {ranks} ranks sharing it; copy: D2D", dev.name())
    };
    println!("LL on {placement}; hidden {hidden}, top-{topk} of {experts}; graph-replayed, {iters} iterations");
    println!(
        "{:>7} {:>13} {:>10} {:>10} {:>10} {:>7} {:>10} {:>8}",
        "tokens", "op", "time µs", "GB/s/rank", "copy µs", "%copy", "torch µs", "x torch"
    );
    let devices: Vec<Device> = (0..ranks).map(|r| gpus[r % gpus.len()].clone()).collect();
    for &t in &tokens {
        let max_tokens = t.max(1);
        let groups = Group::in_process(&devices)?;
        let per_rank: Vec<Result<[f64; 5]>> = std::thread::scope(|s| {
            let hs: Vec<_> = groups.iter().map(|g| s.spawn(move || bench_rank(g, t, max_tokens, iters))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let per_rank: Vec<[f64; 5]> = per_rank.into_iter().collect::<Result<_>>()?;
        drop(groups);
        let rows: f64 = per_rank.iter().map(|v| v[3]).sum();
        for (i, op, row_bytes) in [
            (0, "dispatch bf16", 2 * hidden),
            (2, "dispatch fp8", hidden + 4 * (hidden / 128)),
            (1, "combine bf16", 2 * hidden),
            (4, "combine zc", 2 * hidden),
        ] {
            let us = per_rank.iter().map(|v| v[i]).sum::<f64>() / ranks as f64;
            let bytes = rows * row_bytes as f64;
            let copy_us = if gpus.len() > 1 {
                let per_peer = bytes / ranks as f64 * ranks_per_gpu as f64 / gpus.len() as f64;
                peer_copy_seconds(&gpus, per_peer as usize)? * 1e6
            } else {
                copy_seconds(&dev, bytes as usize)? * 1e6
            };
            let gbps = bytes / ranks as f64 / us / 1e3;
            let pct = 100.0 * copy_us / us;
            let torch_us = torch_us(&torch, t, if op == "combine zc" { "combine bf16" } else { op });
            let (tu, ratio) = match torch_us {
                Some(x) => (format!("{x:.1}"), format!("{:.2}x", x / us)),
                None => ("-".into(), "-".into()),
            };
            println!("{t:>7} {op:>13} {us:>10.1} {gbps:>10.1} {copy_us:>10.1} {pct:>6.1}% {tu:>10} {ratio:>8}");
            csv_line(&format!(
                "ll,{t},{op},{us:.2},{gbps:.2},{pct:.2},{},{}",
                torch_us.unwrap_or(f64::NAN),
                gpus.len()
            ));
        }
    }
    Ok(())
}
