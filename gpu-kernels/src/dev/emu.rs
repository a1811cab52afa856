//! CPU back end of `dev`: the emulator that runs the kernels in CI.
//!
//! One OS thread per GPU thread, and **every block of a launch runs at once**, as on a GPU
//! whose grid fits on its SMs: kernels may wait for other blocks of their own launch
//! (sender/receiver pairs) and for other ranks' launches on other host threads.
//! Warp collectives exchange values through 32 per-warp slots between two warp barriers,
//! so, as with mask `0xffffffff` on the GPU, all 32 lanes must take part. Memory-model
//! operations map onto `std::sync::atomic` with the matching ordering.
//!
//! A panic in any emulated thread aborts the launch: every barrier wakes and unwinds, and
//! [`launch`] returns the first panic message instead of hanging.
use super::{STATIC_SMEM_BYTES, U4};
use crate::abi::WARP_SIZE;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Stack of each emulated GPU thread.
const EMU_STACK_BYTES: usize = 256 << 10;
/// Most threads one emulated launch may start.
pub const EMU_MAX_THREADS_PER_LAUNCH: u32 = 4096;

struct Barrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    /// OR of the predicates of the threads that arrived in this generation.
    any: bool,
    /// The OR of the last completed generation (read by its waiters before the next one
    /// can complete, since that needs them to arrive again).
    last_any: bool,
}

impl Barrier {
    fn new(n: usize) -> Self {
        Self { n, state: Mutex::new(BarrierState::default()), cv: Condvar::new() }
    }
    /// Waits for all `n` threads; returns the OR of their `pred`s.
    fn wait_or(&self, abort: &AtomicBool, pred: bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let generation = s.generation;
        s.arrived += 1;
        s.any |= pred;
        if s.arrived == self.n {
            s.arrived = 0;
            s.last_any = s.any;
            s.any = false;
            s.generation = s.generation.wrapping_add(1);
            self.cv.notify_all();
            return s.last_any;
        }
        while s.generation == generation {
            if abort.load(Ordering::Relaxed) {
                drop(s);
                panic!("emulated launch aborted by another thread");
            }
            s = self.cv.wait_timeout(s, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.last_any
    }
    fn wait(&self, abort: &AtomicBool) {
        self.wait_or(abort, false);
    }
}

struct Warp {
    barrier: Barrier,
    slots: [AtomicU32; 32],
}

struct Block {
    barrier: Barrier,
    warps: Vec<Warp>,
    static_smem: Box<[U4]>,
    dyn_smem: Box<[U4]>,
    dyn_bytes: u32,
}

struct LaunchState {
    abort: AtomicBool,
    first_panic: Mutex<Option<String>>,
}

#[derive(Clone, Copy)]
struct Idx {
    tid: u32,
    bid: u32,
    bdim: u32,
    gdim: u32,
    block: *const Block,
    launch: *const LaunchState,
}

thread_local! {
    static IDX: Cell<Option<Idx>> = const { Cell::new(None) };
}

fn idx() -> Idx {
    IDX.with(|c| c.get()).expect("dev:: primitive called outside an emulated launch")
}
fn block() -> &'static Block {
    // SAFETY: set by `launch` for the lifetime of the emulated thread; the block outlives it.
    unsafe { &*idx().block }
}
fn abort_flag() -> &'static AtomicBool {
    // SAFETY: as `block()`.
    unsafe { &(*idx().launch).abort }
}
fn warp() -> &'static Warp {
    &block().warps[(idx().tid / WARP_SIZE) as usize]
}

struct AssertSend<T>(T);
// SAFETY: used only to move pointers to launch-scoped state into scoped threads.
unsafe impl<T> Send for AssertSend<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for AssertSend<T> {}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// Emulated `kernel<<<grid, block_dim, dyn_smem_bytes>>>`: calls `f` once per thread, all
/// blocks concurrently, and returns when every thread has finished.
///
/// Returns `Err(message)` for a bad launch shape (`block_dim` not a positive multiple of
/// 32, too many threads) or when an emulated thread panicked.
///
/// # Safety
/// The contract of a CUDA launch: the memory `f` touches is valid for the kernel's accesses
/// and the kernel is data-race free under the PTX memory model.
pub unsafe fn launch<F: Fn() + Sync>(grid: u32, block_dim: u32, dyn_smem_bytes: u32, f: F) -> Result<(), String> {
    if grid == 0 || block_dim == 0 || !block_dim.is_multiple_of(WARP_SIZE) {
        return Err(format!("bad launch shape: grid {grid}, block {block_dim} (a positive multiple of 32)"));
    }
    if grid.saturating_mul(block_dim) > EMU_MAX_THREADS_PER_LAUNCH {
        return Err(format!(
            "emulated launch too large: {grid} x {block_dim} threads (max {EMU_MAX_THREADS_PER_LAUNCH})"
        ));
    }
    let state = LaunchState { abort: AtomicBool::new(false), first_panic: Mutex::new(None) };
    let blocks: Vec<Block> = (0..grid)
        .map(|_| Block {
            barrier: Barrier::new(block_dim as usize),
            warps: (0..block_dim / WARP_SIZE)
                .map(|_| Warp {
                    barrier: Barrier::new(WARP_SIZE as usize),
                    slots: std::array::from_fn(|_| AtomicU32::new(0)),
                })
                .collect(),
            static_smem: vec![U4::default(); STATIC_SMEM_BYTES / 16].into_boxed_slice(),
            dyn_smem: vec![U4::default(); (dyn_smem_bytes as usize).div_ceil(16)].into_boxed_slice(),
            dyn_bytes: dyn_smem_bytes,
        })
        .collect();
    let f = AssertSend(&f);
    let mut spawn_error = None;
    std::thread::scope(|s| {
        for bid in 0..grid {
            for tid in 0..block_dim {
                let ctx = AssertSend(Idx {
                    tid,
                    bid,
                    bdim: block_dim,
                    gdim: grid,
                    block: &blocks[bid as usize] as *const Block,
                    launch: &state as *const LaunchState,
                });
                let (f, state) = (&f, &state);
                let spawned = std::thread::Builder::new().stack_size(EMU_STACK_BYTES).spawn_scoped(s, move || {
                    let ctx = ctx;
                    IDX.with(|c| c.set(Some(ctx.0)));
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (f.0)()));
                    if let Err(p) = r {
                        let mut first = state.first_panic.lock().unwrap_or_else(|e| e.into_inner());
                        if first.is_none() {
                            *first = Some(panic_message(&*p));
                        }
                        state.abort.store(true, Ordering::Relaxed);
                    }
                    IDX.with(|c| c.set(None));
                });
                if let Err(e) = spawned {
                    spawn_error = Some(format!("cannot start emulated thread: {e}"));
                    state.abort.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    if let Some(e) = spawn_error {
        return Err(e);
    }
    match state.first_panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(msg) => Err(format!("emulated kernel panicked: {msg}")),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------ indices
/// `%tid.x`.
pub fn thread_idx_x() -> u32 {
    idx().tid
}
/// `%ctaid.x`.
pub fn block_idx_x() -> u32 {
    idx().bid
}
/// `%ntid.x`.
pub fn block_dim_x() -> u32 {
    idx().bdim
}
/// `%nctaid.x`.
pub fn grid_dim_x() -> u32 {
    idx().gdim
}
/// `%laneid`.
pub fn lane_id() -> u32 {
    idx().tid % WARP_SIZE
}

// ------------------------------------------------------------------ barriers
/// `bar.sync 0`.
pub fn sync_threads() {
    block().barrier.wait(abort_flag());
}
/// `bar.red.or.pred` (`__syncthreads_or`): a block barrier that returns whether any thread's
/// `pred` was true.
pub fn sync_threads_or(pred: bool) -> bool {
    block().barrier.wait_or(abort_flag(), pred)
}
/// `bar.warp.sync` (the emulator always syncs the whole warp).
pub fn sync_warp(_mask: u32) {
    warp().barrier.wait(abort_flag());
}

// ------------------------------------------------------------------ shared memory
/// The block's static shared array.
pub fn static_smem<T>() -> *mut T {
    block().static_smem.as_ptr() as *mut T
}
/// The block's dynamic shared memory.
pub fn dyn_smem<T>() -> *mut T {
    block().dyn_smem.as_ptr() as *mut T
}
/// `%dynamic_smem_size`.
pub fn dyn_smem_bytes() -> u32 {
    block().dyn_bytes
}
/// `atom.shared.add.u32`.
///
/// # Safety
/// `p` points into this block's shared memory, 4-byte aligned.
pub unsafe fn atom_add_shared_u32(p: *mut u32, v: u32) -> u32 {
    // SAFETY: caller's contract.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Relaxed)
}

// ------------------------------------------------------------------ address-space check
/// Panics when a `.global` operation gets an address inside this block's shared memory:
/// on the GPU that faults with `CUDA_ERROR_INVALID_ADDRESS_SPACE`, so the emulator must not
/// let it pass silently.
fn check_global<T>(p: *const T) {
    let a = p as usize;
    let b = block();
    for (base, len) in
        [(b.static_smem.as_ptr() as usize, STATIC_SMEM_BYTES), (b.dyn_smem.as_ptr() as usize, b.dyn_smem.len() * 16)]
    {
        if a >= base && a < base + len {
            panic!("a .global memory operation was given a shared-memory address ({a:#x})");
        }
    }
}

/// Host ranges registered as "page-locked host memory mapped into the device".
static HOST_MAPPED: std::sync::RwLock<Vec<(usize, usize)>> = std::sync::RwLock::new(Vec::new());

/// Marks `[start, start+len)` as host memory mapped into the device (the CPU back end does
/// this for its `HostMapped` buffers), so that atomics on it are caught as they are on a GPU.
pub fn register_host_mapped(start: usize, len: usize) {
    HOST_MAPPED.write().unwrap_or_else(|e| e.into_inner()).push((start, len));
}

/// Forgets a range registered with [`register_host_mapped`].
pub fn unregister_host_mapped(start: usize) {
    HOST_MAPPED.write().unwrap_or_else(|e| e.into_inner()).retain(|&(s, _)| s != start);
}

/// Panics when an atomic read-modify-write targets host memory: GPUs attached over PCIe
/// can't perform them (compute-sanitizer: "Invalid __global__ system-scoped atomic"), and a
/// kernel that does faults with `CUDA_ERROR_ILLEGAL_ADDRESS`.
fn check_device_atomic<T>(p: *const T) {
    check_global(p);
    let a = p as usize;
    let ranges = HOST_MAPPED.read().unwrap_or_else(|e| e.into_inner());
    if ranges.iter().any(|&(s, l)| a >= s && a < s + l) {
        panic!("an atomic was given a host-memory address ({a:#x}); GPUs on PCIe can't do that");
    }
}

// ------------------------------------------------------------------ loads / stores with semantics
macro_rules! ld_st {
    ($ld:ident, $st:ident, $t:ty, $a:ty, $lo:expr, $so:expr) => {
        /// See the nvptx back end.
        ///
        /// # Safety
        /// `p` is valid and aligned.
        pub unsafe fn $ld(p: *const $t) -> $t {
            check_global(p);
            // SAFETY: caller's contract.
            unsafe { <$a>::from_ptr(p as *mut $t) }.load($lo)
        }
        /// See the nvptx back end.
        ///
        /// # Safety
        /// `p` is valid and aligned.
        pub unsafe fn $st(p: *mut $t, v: $t) {
            check_global(p);
            // SAFETY: caller's contract.
            unsafe { <$a>::from_ptr(p) }.store(v, $so)
        }
    };
}
ld_st!(ld_acquire_sys_u32, st_release_sys_u32, u32, AtomicU32, Ordering::Acquire, Ordering::Release);
ld_st!(ld_acquire_sys_u64, st_release_sys_u64, u64, AtomicU64, Ordering::Acquire, Ordering::Release);
ld_st!(ld_relaxed_sys_u32, st_relaxed_sys_u32, u32, AtomicU32, Ordering::Relaxed, Ordering::Relaxed);
ld_st!(ld_relaxed_sys_u64, st_relaxed_sys_u64, u64, AtomicU64, Ordering::Relaxed, Ordering::Relaxed);

/// `atom.relaxed.gpu.global.add.u32`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn atom_add_relaxed_gpu_u32(p: *mut u32, v: u32) -> u32 {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Relaxed)
}
/// `atom.relaxed.gpu.global.add.u64`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn atom_add_relaxed_gpu_u64(p: *mut u64, v: u64) -> u64 {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, Ordering::Relaxed)
}
/// `atom.relaxed.sys.global.add.u32`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn atom_add_relaxed_sys_u32(p: *mut u32, v: u32) -> u32 {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Relaxed)
}
/// `atom.release.gpu.global.add.u32`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn atom_add_release_gpu_u32(p: *mut u32, v: u32) -> u32 {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Release)
}
/// `atom.acq_rel.sys.global.cas.b32`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn atom_cas_acq_rel_sys_u32(p: *mut u32, cmp: u32, new: u32) -> u32 {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    match unsafe { AtomicU32::from_ptr(p) }.compare_exchange(cmp, new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(v) | Err(v) => v,
    }
}
/// `red.release.sys.global.add.u32`.
///
/// # Safety
/// `p` is valid and aligned.
pub unsafe fn red_add_release_sys_u32(p: *mut u32, v: u32) {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Release);
}
/// `red.release.sys.global.add.u64`.
///
/// # Safety
/// `p` is valid and 8-aligned.
pub unsafe fn red_add_release_sys_u64(p: *mut u64, v: u64) {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, Ordering::Release);
}

/// `red.relaxed.gpu.global.add.u64`.
///
/// # Safety
/// `p` is valid and 8-aligned.
pub unsafe fn red_add_relaxed_gpu_u64(p: *mut u64, v: u64) {
    check_device_atomic(p);
    // SAFETY: caller's contract.
    unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, Ordering::Relaxed);
}

// ------------------------------------------------------------------ fences
/// `fence.acq_rel.gpu`.
pub fn fence_acq_rel_gpu() {
    fence(Ordering::AcqRel)
}
/// `fence.acq_rel.sys`.
pub fn fence_acq_rel_sys() {
    fence(Ordering::AcqRel)
}
/// `fence.sc.sys`.
pub fn fence_sc_sys() {
    fence(Ordering::SeqCst)
}

// ------------------------------------------------------------------ 16-byte data moves
/// `ld.global.nc.v4.u32`.
///
/// # Safety
/// `p` is valid and 16-aligned.
pub unsafe fn ld_nc_v4(p: *const U4) -> U4 {
    check_global(p);
    // SAFETY: caller's contract.
    unsafe { p.read_volatile() }
}
/// `ld.global.v4.u32`.
///
/// # Safety
/// `p` is valid and 16-aligned.
pub unsafe fn ld_v4(p: *const U4) -> U4 {
    check_global(p);
    // SAFETY: caller's contract.
    unsafe { p.read_volatile() }
}
/// `st.global.v4.u32`.
///
/// # Safety
/// `p` is valid and 16-aligned.
pub unsafe fn st_v4(p: *mut U4, v: U4) {
    check_global(p);
    // SAFETY: caller's contract.
    unsafe { p.write_volatile(v) }
}

// ------------------------------------------------------------------ warp collectives
fn exchange<R>(v: u32, read: impl FnOnce(&[AtomicU32; 32]) -> R) -> R {
    let w = warp();
    w.slots[lane_id() as usize].store(v, Ordering::Relaxed);
    w.barrier.wait(abort_flag()); // every lane has published
    let r = read(&w.slots);
    w.barrier.wait(abort_flag()); // every lane has read before the slots are reused
    r
}
/// `shfl.sync.bfly.b32`.
pub fn shfl_bfly_u32(v: u32, lane_mask: u32) -> u32 {
    exchange(v, |s| s[((lane_id() ^ lane_mask) & 31) as usize].load(Ordering::Relaxed))
}
/// `shfl.sync.idx.b32`.
pub fn shfl_idx_u32(v: u32, src_lane: u32) -> u32 {
    exchange(v, |s| s[(src_lane & 31) as usize].load(Ordering::Relaxed))
}
/// `match.any.sync.b32`.
pub fn match_any_u32(v: u32) -> u32 {
    exchange(v, |s| (0..32).fold(0u32, |acc, i| acc | ((s[i].load(Ordering::Relaxed) == v) as u32) << i))
}
/// `vote.sync.ballot.b32`.
pub fn ballot(pred: bool) -> u32 {
    exchange(pred as u32, |s| (0..32).fold(0u32, |acc, i| acc | ((s[i].load(Ordering::Relaxed) & 1) << i)))
}

// ------------------------------------------------------------------ arithmetic
/// `fma.rn.f32`.
pub fn fma_rn_f32(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// `cvt.rn.satfinite.e4m3x2.f32`.
pub fn cvt_e4m3x2(lo: f32, hi: f32) -> u16 {
    crate::num::f32_to_e4m3(lo) as u16 | (crate::num::f32_to_e4m3(hi) as u16) << 8
}

// ------------------------------------------------------------------ time
/// Nanoseconds since the emulator's first use (monotonic, like `%globaltimer`).
pub fn globaltimer_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
/// `%clock64`: the emulator's cycle is a nanosecond of [`globaltimer_ns`] (monotonic).
pub fn clock64() -> u64 {
    globaltimer_ns()
}
/// `nanosleep.u32`.
pub fn nanosleep_ns(ns: u32) {
    std::thread::sleep(Duration::from_nanos(ns as u64));
}
/// Polling back-off. The emulator has far more threads than cores, so waiting threads
/// yield their core at once and sleep when the wait drags on.
pub fn backoff(spins: u32) {
    if abort_flag().load(Ordering::Relaxed) {
        panic!("emulated launch aborted by another thread");
    }
    if spins < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}
