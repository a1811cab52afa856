//! Shared pieces of moe-ep's benchmarks: arguments, data, timing, the copy ceiling.
use moe_ep::{Device, DeviceBuffer, Result, Stream};

/// `bytes` in a new stream-ordered buffer.
pub fn upload(stream: &Stream, bytes: &[u8]) -> Result<DeviceBuffer> {
    let b = stream.alloc(bytes.len().max(16))?;
    b.write(stream, 0, bytes)?;
    Ok(b)
}

/// `--name value` from the command line, else `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
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

/// `--name value` as a string, if given.
pub fn arg_str(name: &str) -> Option<String> {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned()
}

/// Same-run torch reference: runs `python3 SCRIPT --tokens ... EXTRA...` (the bundle's
/// `ht_torch_reference.py`) and returns `(tokens, "dispatch"|"combine", µs)` from its table.
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
    // Rows: "<tokens> <op> <dtype> <µs> <copies>".
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let t = f.first()?.parse().ok()?;
            let op = f.get(1)?.to_string();
            let us = f.get(3)?.parse().ok()?;
            Some((t, op, us))
        })
        .collect()
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
