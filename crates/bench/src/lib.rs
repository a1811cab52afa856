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
    let s = dev.new_stream()?;
    let (a, b) = (s.alloc(bytes)?, s.alloc(bytes)?);
    b.copy_from_async(&s, &a, bytes)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let e0 = s.record_event()?;
        b.copy_from_async(&s, &a, bytes)?;
        let e1 = s.record_event()?;
        times.push(e0.elapsed_ms(&e1)?);
    }
    Ok(2.0 * bytes as f64 / (median(times) as f64 * 1e-3))
}

/// Sets `CUDA_DEVICE_MAX_CONNECTIONS=32` unless set: ranks sharing a GPU need more hardware
/// queues than the default 8. Call first thing in `main`.
pub fn more_hardware_queues() {
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        // SAFETY: called at the start of main, before any thread or CUDA call.
        unsafe { std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", "32") };
    }
}
