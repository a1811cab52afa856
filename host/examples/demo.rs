//! The peer-kernel round trip: every rank stores its block into every other rank's memory
//! with 16-byte stores and raises a release flag there; every rank checks what it got.
//!
//! On a GPU machine: one rank per GPU when there are several, else 8 ranks sharing GPU 0.
//! Without a GPU: 4 ranks on the CPU emulator, running the very same kernel source.
//!
//!     cargo xtask demo            # or: cargo run --release -p moe-ep --example demo
//!     cargo xtask demo -- --ranks 2 --bytes 1048576
use moe_ep::collective::AllGather;
use moe_ep::{Device, Group, Sharing};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // More than 8 spinning streams on one GPU need more hardware queues (before CUDA starts).
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        // SAFETY: single-threaded at this point; no other code reads the environment yet.
        unsafe { std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", "32") };
    }
    let arg = |name: &str| -> Option<usize> {
        let args: Vec<String> = std::env::args().collect();
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
    };
    let device = Device::from_env()?;
    let devices: Vec<Device> = match (device.is_cpu(), Device::cuda_count().unwrap_or(0), arg("--ranks")) {
        (true, _, ranks) => vec![device.clone(); ranks.unwrap_or(4)],
        (false, n, None) if n >= 2 => (0..n).map(Device::cuda).collect::<Result<_, _>>()?,
        (false, _, ranks) => vec![device.clone(); ranks.unwrap_or(8)],
    };
    let num_ranks = devices.len();
    let block_bytes = arg("--bytes").unwrap_or(if device.is_cpu() { 64 << 10 } else { 16 << 20 });
    let reps = 5;
    println!(
        "moe-ep demo: {num_ranks} ranks on {} ({}), {} KiB per rank",
        device.name(),
        if device.is_cpu() { "CPU emulator" } else { "GPU" },
        block_bytes >> 10
    );

    let groups = Group::in_process(&devices)?;
    let results: Vec<Result<(f64, bool), moe_ep::Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                s.spawn(move || -> Result<(f64, bool), moe_ep::Error> {
                    let rank = group.rank();
                    let words = block_bytes / 4;
                    let mut ag = AllGather::new(&group, block_bytes, 0, Sharing::Auto)?;
                    let send = group.device().alloc(block_bytes)?;
                    let recv = group.device().alloc(num_ranks * block_bytes)?;
                    let pattern = |r: usize, i: usize| (r as u32) << 24 | i as u32;
                    send.write(group.stream(), 0, &(0..words).map(|i| pattern(rank, i)).collect::<Vec<u32>>())?;
                    ag.run(&group, &send, &recv)?; // warm-up (JIT, first touch)
                    let t = Instant::now();
                    for _ in 0..reps {
                        ag.run(&group, &send, &recv)?;
                    }
                    let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
                    let got: Vec<u32> = recv.to_vec(group.stream())?;
                    let ok = (0..num_ranks).all(|src| (0..words).all(|i| got[src * words + i] == pattern(src, i)));
                    Ok((us, ok))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    println!("{:>4}  {:>12}  {:>14}  received all blocks intact", "rank", "µs/call", "GB/s stored");
    let mut all_ok = true;
    for (rank, r) in results.into_iter().enumerate() {
        let (us, ok) = r?;
        all_ok &= ok;
        let gbps = (num_ranks * block_bytes) as f64 / us / 1e3;
        println!("{rank:>4}  {us:>12.1}  {gbps:>14.2}  {}", if ok { "yes" } else { "NO" });
    }
    if !all_ok {
        return Err("some rank received wrong data".into());
    }
    println!(
        "ok: every rank stored its block into every peer and raised a release flag; every rank acquired all flags and read every block back bit-exactly."
    );
    Ok(())
}
