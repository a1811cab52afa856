//! moe-ep on cudarc types: a program holding its tensors as cudarc `CudaSlice`s on its own
//! `CudaStream` (as cudarc and candle programs do) dispatches and combines them in place.
//! moe-ep views the slices' device memory (no copies) and orders its work after the
//! program's stream, which in turn waits for moe-ep before it reads the outputs.
//!
//! Needs a GPU: `cargo run --release -p moe-ep --example cudarc -- [RANKS]` (RANKS ranks
//! share GPU 0 as threads; default 2). Prints one line per rank and fails on a wrong result.
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use moe_ep::buffer::{Buffer, BufferConfig, CallStream, HtCombineCall, HtRouteCall, HtRoutedDispatch, HtShapes};
use moe_ep::intranode::HtCombineOutputs;
use moe_ep::layout::IndexType;
use moe_ep::{Device, DeviceBuffer, Group, Stream};
use std::sync::Arc;

const EXPERTS: usize = 8;
const HIDDEN: usize = 256;
const TOPK: usize = 2;
const TOKENS: usize = 64;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// moe-ep's view of a cudarc slice: the same device memory, not owned.
fn view<T>(dev: &Device, slice: &CudaSlice<T>, stream: &CudaStream) -> DeviceBuffer {
    let (ptr, _record) = slice.device_ptr(stream);
    // SAFETY: the slice lives on this GPU's primary context (cudarc's and moe-ep's) and
    // outlives every op given the view (`main` keeps them until the stream is synchronised).
    unsafe { DeviceBuffer::borrowed(dev, ptr, slice.len() * size_of::<T>()) }
}

fn rank_main(ctx: &Arc<CudaContext>, group: Group, ranks: usize) -> Result<(), Error> {
    let (rank, dev) = (group.rank(), group.device().clone());
    let buffer = Buffer::new(group, BufferConfig { nvl_bytes: 64 << 20, heap_bytes: None, rdma_bytes: 0 })?;
    // The program's own stream and tensors.
    let stream = ctx.new_stream()?;
    let x: Vec<u16> = (0..TOKENS * HIDDEN).map(|i| 0x3f80 + ((rank + i) % 8) as u16).collect(); // bf16 ~1
    let topk_idx: Vec<i64> =
        (0..TOKENS * TOPK).map(|i| ((i / TOPK) * 3 + (i % TOPK) * 5) as i64 % EXPERTS as i64).collect();
    let x_dev = stream.clone_htod(&x)?;
    let idx_dev = stream.clone_htod(&topk_idx)?;
    let weights = stream.clone_htod(&vec![1.0f32; TOKENS * TOPK])?;
    let rows = ranks * TOKENS;
    let recv_x = stream.alloc_zeros::<u16>(rows * HIDDEN)?;
    let recv_idx = stream.alloc_zeros::<i64>(rows * TOPK)?;
    let recv_w = stream.alloc_zeros::<f32>(rows * TOPK)?;
    let combined = stream.alloc_zeros::<u16>(TOKENS * HIDDEN)?;

    // Every op below runs after the work queued on `stream` so far, and `stream` after it.
    // SAFETY: cudarc's stream lives on GPU 0's primary context and outlives the ops.
    let call = CallStream::on(unsafe { Stream::from_raw_shared(&dev, stream.cu_stream() as usize) });
    let shapes = HtShapes { num_experts: EXPERTS, hidden: HIDDEN, num_topk: TOPK, num_scales: 0, num_channels: 0 };
    let route = buffer.ht_route(
        &call,
        HtRouteCall {
            topk_idx: &view(&dev, &idx_dev, &stream),
            index_type: IndexType::I64,
            num_tokens: TOKENS,
            num_topk: TOPK,
            expert_alignment: 1,
            shapes,
            memory: None,
            recv_budget: None,
        },
    )?;
    let dispatch = HtRoutedDispatch {
        x: &view(&dev, &x_dev, &stream),
        hidden_bytes: 2 * HIDDEN,
        x_scales: None,
        topk_weights: &view(&dev, &weights, &stream),
        rows,
        recv_x: view(&dev, &recv_x, &stream),
        recv_x_scales: None,
        recv_topk_idx: view(&dev, &recv_idx, &stream),
        recv_topk_weights: view(&dev, &recv_w, &stream),
    };
    let (handle, _) = buffer.ht_dispatch_routed(&call, &route, dispatch)?;
    // Identity experts: the received rows go straight back.
    let back =
        HtCombineCall { x: &view(&dev, &recv_x, &stream), hidden: HIDDEN, topk_weights: None, bias: [None, None] };
    let into = HtCombineOutputs { combined_x: view(&dev, &combined, &stream), combined_topk_weights: None };
    buffer.ht_combine(&call, &handle, &back, Some(into))?;

    // Each token comes back once per rank holding one of its experts.
    let got = stream.clone_dtoh(&combined)?;
    let per_rank = EXPERTS / ranks;
    for t in 0..TOKENS {
        let mut owners: Vec<i64> = topk_idx[t * TOPK..(t + 1) * TOPK].iter().map(|e| e / per_rank as i64).collect();
        owners.sort();
        owners.dedup();
        for h in 0..HIDDEN {
            let want = f32::from_bits((x[t * HIDDEN + h] as u32) << 16) * owners.len() as f32;
            let have = f32::from_bits((got[t * HIDDEN + h] as u32) << 16);
            if have != want {
                return Err(format!("rank {rank}: token {t} element {h} is {have}, expected {want}").into());
            }
        }
    }
    buffer.synchronize()?;
    println!("rank {rank}: {TOKENS} tokens dispatched and combined in cudarc memory, all correct");
    buffer.destroy()?; // collective: no rank frees memory a peer may still use
    Ok(())
}

fn main() -> Result<(), Error> {
    let ranks: usize = std::env::args().nth(1).map_or(Ok(2), |a| a.parse())?;
    let ctx = CudaContext::new(0)?;
    let groups = Group::in_process(&vec![Device::cuda(0)?; ranks])?;
    std::thread::scope(|s| {
        let ranks: Vec<_> = groups.into_iter().map(|g| s.spawn(|| rank_main(&ctx, g, ranks))).collect();
        ranks.into_iter().try_for_each(|r| r.join().map_err(|_| Error::from("a rank panicked"))?)
    })
}
