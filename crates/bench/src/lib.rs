//! Shared pieces of moe-ep's benchmarks: arguments, data, timing, the copy ceilings.
use moe_ep::{Device, DeviceBuffer, Error, Event, Result, Stream};

/// `bytes` in a new stream-ordered buffer.
pub fn upload(stream: &Stream, bytes: &[u8]) -> Result<DeviceBuffer> {
    let b = stream.alloc(bytes.len().max(16))?;
    b.write(stream, 0, bytes)?;
    Ok(b)
}

/// `--name value` from the command line, else `default`.
pub fn arg(name: &str, default: usize) -> usize {
    arg_str(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Whether `--name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// SplitMix64, for routing and data.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `[num_tokens, num_topk]` distinct uniform experts per token (DeepEP's bench routing).
    pub fn topk(&mut self, num_tokens: usize, num_topk: usize, num_experts: usize) -> Vec<i64> {
        let mut idx = Vec::with_capacity(num_tokens * num_topk);
        for _ in 0..num_tokens {
            let mut row: Vec<i64> = Vec::with_capacity(num_topk);
            while row.len() < num_topk {
                let e = (self.next_u64() % num_experts as u64) as i64;
                if !row.contains(&e) {
                    row.push(e);
                }
            }
            idx.extend(row);
        }
        idx
    }

    /// bf16 bits of values in [1, 2).
    pub fn bf16(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| 0x3F80 | (self.next_u64() as u16 & 0x7F)).collect()
    }
}

/// Median of `v` (not empty).
pub fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Device-to-device copy rate in bytes/s, counting bytes read plus bytes written, measured
/// now on `dev` (the ceiling every bench reports against).
pub fn copy_rate(dev: &Device) -> Result<f64> {
    let bytes = if dev.is_cpu() { 64 << 20 } else { 2 << 30 };
    Ok(2.0 * bytes as f64 / copy_seconds(dev, bytes)?)
}

/// Sets `CUDA_DEVICE_MAX_CONNECTIONS=32` unless set: ranks sharing a GPU need more hardware
/// queues than the default 8. Call first thing in `main`.
pub fn more_hardware_queues() {
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        // SAFETY: called at the start of main, before any thread or CUDA call.
        unsafe { std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", "32") };
    }
}

/// Seconds a same-run device-to-device copy of `bytes` takes (median of 5): the ceiling of
/// an op that moves those bytes once.
pub fn copy_seconds(dev: &Device, bytes: usize) -> Result<f64> {
    let s = dev.new_stream()?;
    let (a, b) = (s.alloc(bytes.max(16))?, s.alloc(bytes.max(16))?);
    b.copy_from_async(&s, &a, bytes)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let e0 = s.record_event()?;
        b.copy_from_async(&s, &a, bytes)?;
        let e1 = s.record_event()?;
        times.push(e0.elapsed_ms(&e1)?);
    }
    Ok(median(times) as f64 * 1e-3)
}

/// `--gpus N` (default 1: every rank on the device of `MOE_EP_DEVICE`): the GPUs the ranks
/// are spread over, rank `r` on GPU `r % N` (`Group::in_process` enables peer access between
/// them). On the CPU emulator the N "GPUs" are all the emulator (a smoke test of the mode).
pub fn gpu_devices(dev: &Device) -> Result<Vec<Device>> {
    let gpus = arg("--gpus", 1).max(1);
    if gpus == 1 || dev.is_cpu() {
        return Ok(vec![dev.clone(); gpus]);
    }
    let count = Device::cuda_count()?;
    if gpus > count {
        return Err(Error::invalid("--gpus", format!("{gpus} GPUs asked for, {count} visible")));
    }
    (0..gpus).map(Device::cuda).collect()
}

/// Seconds for every device of `devs` to receive `bytes_per_peer` from every other one, all
/// at once (the same-run NVLink ceiling of an all-to-all moving those bytes): one stream per
/// ordered pair on the receiving device, each a device-to-device copy from the peer's memory
/// (peer access must be enabled); time = the latest copy's end after its device's start
/// event, median of 5 after a warm-up. The whole run, not one link: what every GPU moving
/// its share to every peer at once reaches.
pub fn peer_copy_seconds(devs: &[Device], bytes_per_peer: usize) -> Result<f64> {
    let bytes = bytes_per_peer.max(16);
    let heads: Vec<Stream> = devs.iter().map(Device::new_stream).collect::<Result<_>>()?;
    // (receiving device, its stream, source buffer on the peer, destination on the receiver)
    let mut pairs = Vec::new();
    for (i, to) in devs.iter().enumerate() {
        for (j, from) in devs.iter().enumerate() {
            if i != j {
                pairs.push((i, to.new_stream()?, from.alloc(bytes)?, to.alloc(bytes)?));
            }
        }
    }
    let mut times = Vec::new();
    for rep in 0..6 {
        let starts: Vec<Event> = heads.iter().map(Stream::record_event).collect::<Result<_>>()?;
        let mut ends = Vec::new();
        for (i, s, src, dst) in &pairs {
            s.wait_event(&starts[*i])?;
            dst.copy_from_async(s, src, bytes)?;
            ends.push((*i, s.record_event()?));
        }
        let mut ms = 0f32;
        for (i, end) in &ends {
            ms = ms.max(starts[*i].elapsed_ms(end)?);
        }
        if rep > 0 {
            times.push(ms); // the first run warms up the peer mappings
        }
    }
    Ok(median(times) as f64 * 1e-3)
}

/// `--name value` as a string, if given.
pub fn arg_str(name: &str) -> Option<String> {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned()
}

/// Same-run torch reference: runs `python3 SCRIPT --tokens ... EXTRA...` (the bundle's
/// `ht_torch_reference.py`, or `ep_nccl_reference.py` across GPUs) and returns
/// `(tokens, "dispatch bf16"|"dispatch fp8"|"combine bf16", µs)` from its table.
/// Empty (with a note on stderr) when the script or torch is missing: the bench still runs.
pub fn torch_reference(script: &str, tokens: &[usize], extra: &[String]) -> Vec<(usize, String, f64)> {
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--tokens")
        .args(tokens.iter().map(|t| t.to_string()))
        .args(extra)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            eprintln!("torch reference failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
            return Vec::new();
        }
        Err(e) => {
            eprintln!("torch reference not run: {e}");
            return Vec::new();
        }
    };
    // Rows: "<tokens> <op> <dtype> <µs> ...".
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let t = f.first()?.parse().ok()?;
            let op = format!("{} {}", f.get(1)?, f.get(2)?);
            let us = f.get(3)?.parse().ok()?;
            Some((t, op, us))
        })
        .collect()
}

/// The reference's µs for `op` ("dispatch fp8", ...) at `tokens`; an op it did not run is
/// compared with its bf16 version (the one-GPU torch reference has no fp8).
pub fn torch_us(rows: &[(usize, String, f64)], tokens: usize, op: &str) -> Option<f64> {
    let kind = op.split(' ').next().unwrap_or("");
    let find = |name: &str| rows.iter().find(|(t, o, _)| *t == tokens && o == name).map(|v| v.2);
    find(op).or_else(|| find(&format!("{kind} bf16")))
}

/// The same-run baseline: with `--gpus N > 1`, `--nccl SCRIPT` (else `ep_nccl_reference.py`
/// next to the `--torch` script: torch.distributed `all_to_all_single` over NCCL, N
/// processes), run with `--gpus N --mode MODE` (`ht`: a copy per (token, rank), `ll`: per
/// (token, expert)); on one GPU, the `--torch` script. `extra` are the model arguments
/// (`--hidden ...`); empty when no script was named.
pub fn baseline(
    (gpus, mode): (usize, &str),
    ranks: usize,
    tokens: &[usize],
    extra: &[String],
) -> Vec<(usize, String, f64)> {
    let torch = arg_str("--torch");
    let (script, mut args) = if gpus > 1 {
        let sibling = torch.map(|t| std::path::Path::new(&t).with_file_name("ep_nccl_reference.py"));
        let nccl = arg_str("--nccl").or_else(|| sibling.filter(|p| p.exists()).map(|p| p.display().to_string()));
        (nccl, vec!["--gpus".to_string(), gpus.to_string(), "--mode".into(), mode.into()])
    } else {
        (torch, vec!["--ranks".to_string(), ranks.to_string()])
    };
    match script {
        Some(script) => {
            args.extend_from_slice(extra);
            torch_reference(&script, tokens, &args)
        }
        None => Vec::new(),
    }
}

/// Appends `line` to the CSV file of `--csv PATH`, if given (plots are drawn from it).
pub fn csv_line(line: &str) {
    if let Some(path) = arg_str("--csv") {
        use std::io::Write;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        if let Ok(mut f) = f {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Declare right after a rank's shared buffer: when it goes (before the buffer, declared
/// earlier), the rank waits for its own stream and then for every peer, so no buffer that
/// peers map is freed while their kernels may still touch it — also when a rank returns
/// early with an error, whose message would otherwise be lost to a crash.
pub struct Teardown<'a>(pub &'a moe_ep::Group);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.0.stream().synchronize();
        let _ = self.0.bootstrap().barrier();
    }
}
