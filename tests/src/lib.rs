//! Helpers shared by moe-ep's integration tests.
//!
//! The same test binaries run on the CPU emulator (CI: no GPU) and on a GPU (the bundle's
//! `run.sh` sets `MOE_EP_DEVICE=cuda`): [`device`] picks the back end at run time.
#![allow(clippy::undocumented_unsafe_blocks)]
use moe_ep::{Device, DeviceBuffer, Group};

pub mod ht;
pub mod ll;
pub mod procs;

/// The device the tests run on: `MOE_EP_DEVICE` (`cpu`, `cuda`, `cuda:N`), default CPU.
pub fn device() -> Device {
    let name = std::env::var("MOE_EP_DEVICE").unwrap_or_else(|_| "cpu".into());
    Device::from_name(&name).unwrap_or_else(|e| panic!("MOE_EP_DEVICE={name}: {e}"))
}

/// One device per rank: all the same on the CPU; on CUDA spread round-robin over every
/// visible GPU, so a multi-GPU machine runs the same tests over NVLink/P2P.
pub fn devices(n: usize) -> Vec<Device> {
    let first = device();
    match (first.is_cpu(), Device::cuda_count()) {
        (false, Ok(count)) if count > 1 => {
            (0..n).map(|r| Device::cuda(r % count).unwrap_or_else(|e| panic!("GPU {}: {e}", r % count))).collect()
        }
        _ => vec![first; n],
    }
}

/// Ranks for in-process group tests: 4 on the emulator (CI), 8 on a GPU, unless
/// `MOE_EP_TEST_RANKS` says otherwise.
pub fn num_ranks(device: &Device) -> usize {
    std::env::var("MOE_EP_TEST_RANKS").ok().and_then(|v| v.parse().ok()).unwrap_or(if device.is_cpu() { 4 } else { 8 })
}

/// A small deterministic generator (SplitMix64) seeded from the clock, so every run draws
/// fresh inputs; the seed is printed so a failure can be replayed with `MOE_EP_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `MOE_EP_TEST_SEED` or the clock (printed).
    pub fn fresh(label: &str) -> Rng {
        let seed = std::env::var("MOE_EP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("[{label}] MOE_EP_TEST_SEED={seed}");
        Rng(seed)
    }

    /// A generator with a given seed (for data every rank can regenerate).
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// `n` bf16 bits of values uniform in `[-span / 2, span / 2)` (no NaN/inf, so sums stay
    /// finite).
    pub fn bf16(&mut self, n: usize, span: f32) -> Vec<u16> {
        (0..n)
            .map(|_| moe_ep::reference::f32_to_bf16((self.next_u32() as f32 / u32::MAX as f32 - 0.5) * span))
            .collect()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random words.
    pub fn words(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.next_u32()).collect()
    }
}

/// Runs `f(rank, group)` on one thread per group and returns the results in rank order
/// (panics in a rank propagate).
pub fn on_ranks<T: Send>(groups: Vec<Group>, f: impl Fn(usize, Group) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.into_iter().enumerate().map(|(r, g)| s.spawn(move || f(r, g))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// `data` in a new stream-ordered buffer of the group's stream.
pub fn upload<T: bytemuck::Pod>(group: &Group, data: &[T]) -> DeviceBuffer {
    let b = group.stream().alloc(std::mem::size_of_val(data).max(16)).unwrap();
    b.write(group.stream(), 0, data).unwrap();
    b
}
