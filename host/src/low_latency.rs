//! LL (low-latency) dispatch and combine — DeepEP's `low_latency_dispatch` /
//! `low_latency_combine`, expert-major: kernels `ll_dispatch` / `ll_combine` of
//! `moe-ep-kernels` (`low_latency.rs` states the protocol). No host synchronisation;
//! consecutive calls alternate between two buffer sets, so dispatch `N+1` may start while
//! combine `N` drains. Semantics: `reference::ll_dispatch` / `ll_combine`, bit for bit,
//! except that the row ranges of different source ranks land in arrival order.
//!
//! One pass: senders store rows straight into the receiver's buffer, so a dispatch's
//! `packed_recv_x` (and scales, source indices) are views into the buffer set of the call,
//! as are [`LlBuffer::combine_buffer`]'s zero-copy expert outputs. Like DeepEP's LL results,
//! at most two are live: a dispatch's views are overwritten once peers run the dispatch
//! after next on the same set, which they can only start after this rank's combine of
//! this dispatch (or its next dispatch on the set).
use std::sync::Arc;

use crate::device::{DeviceBuffer, LaunchConfig};
use crate::group::{Group, Sharing, SymmetricBuffer};
use crate::layout::IndexType;
use crate::limits::{MAX_EXPERTS, MAX_HIDDEN, MAX_TOPK};
use crate::{Error, Result};
use moe_ep_abi::{
    CountedRowsParams, LL_FP8, LL_FP8_INPUT, LL_RECV, LL_ROUND_SCALE, LL_SEND, LL_UE8M0, LlLayout, LlParams,
    ScalesParams,
};
use moe_ep_kernels::Kernel;
use moe_ep_kernels::low_latency::{
    LL_COMBINE, LL_COMBINE_RANK_MAJOR, LL_COPY_COUNTED_ROWS, LL_DISPATCH, LL_DISPATCH_RANK_MAJOR,
    LL_SCALES_TOKEN_MAJOR, ll_dispatch_smem_bytes,
};

/// Sizes an [`LlBuffer`] is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlConfig {
    /// Experts in all (a multiple of the rank count).
    pub num_experts: usize,
    /// Hidden size in bf16 elements (a multiple of 8, at most 16384).
    pub hidden: usize,
    /// Most tokens per rank and call (`num_max_dispatch_tokens_per_rank`).
    pub max_tokens: usize,
}

/// Options of [`LlBuffer::dispatch`] (DeepEP's `use_fp8`, `round_scale`,
/// `return_recv_hook`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LlDispatchOptions<'a> {
    /// Return once the sends are out, with the receive in `recv_hook`.
    pub send_only: bool,
    /// Cast to fp8 e4m3 in the kernel with per-128-channel f32 scales (`amax / 448`);
    /// `hidden` must be a multiple of 128.
    pub use_fp8: bool,
    /// With `use_fp8`: round each scale up to a power of two.
    pub round_scale: bool,
    /// With `use_fp8` and `round_scale`: output the scales as UE8M0 bytes (their exponent
    /// fields), four per i32: `[L, R*M, H/512]`; `hidden` a multiple of 512.
    pub use_ue8m0: bool,
    /// With `use_fp8` alone: `x` is fp8 already (`[T, H]` e4m3 bytes) and these are its
    /// `[T, H/128]` f32 scales; rows and scales are sent as they are (NCCL EP's `QUANT_FWD`)
    /// into the same outputs as the in-kernel cast's.
    pub x_scales: Option<&'a DeviceBuffer>,
}

/// DeepEP's optional LL statistics (`low_latency_dispatch`'s
/// `cumulative_local_expert_recv_stats` and `dispatch_wait_recv_cost_stats`,
/// `low_latency_combine`'s `combine_wait_recv_cost_stats`): device buffers the receive
/// halves add to on the device, in stream order, so they count asynchronous calls, the
/// receive launch of a send-only call and every replay of a captured graph. Zero them before
/// the first call. A buffer must stay alive as long as a launch may use it: a send-only
/// call's receive half, every replay of a graph that captured it. `None`: not measured.
///
/// Wait costs are `%clock64` cycles of the SM that waited (nanoseconds on the CPU emulator):
/// per wait, from its start until the flag was seen, so at least one poll even when the
/// flag was already there. They show which ranks arrive late, not how long a call took.
#[derive(Clone, Copy, Debug, Default)]
pub struct LlStats<'a> {
    /// Dispatch: `[L]` i32; each dispatch adds every local expert's received rows (what it
    /// writes to `packed_recv_count`).
    pub cumulative_local_expert_recv_stats: Option<&'a DeviceBuffer>,
    /// Dispatch: `[R]` i64; entry `s` gains the cycles the receive waited for rank `s`'s
    /// flag, summed over the local experts (one wait per local expert and source).
    pub dispatch_wait_recv_cost_stats: Option<&'a DeviceBuffer>,
    /// Combine: `[R]` i64; entry `s` gains the cycles the receive waited for expert owner
    /// `s`'s flag (one wait per combine: every block waits for the same flags at once, and
    /// block 0 measures).
    pub combine_wait_recv_cost_stats: Option<&'a DeviceBuffer>,
}

/// The address of statistics buffer `b` (0 for none), checked to hold `[n]` values of
/// `elem` bytes (`ty`), aligned to them.
fn stats_ptr(arg: &'static str, b: Option<&DeviceBuffer>, n: usize, elem: usize, ty: &str) -> Result<u64> {
    match b {
        None => Ok(0),
        Some(b) if b.len() >= n * elem && b.ptr().is_multiple_of(elem as u64) => Ok(b.ptr()),
        Some(b) => Err(Error::invalid(arg, format!("[{n}] {ty} needed ({elem}-aligned), got {} bytes", b.len()))),
    }
}

/// `[L]` i32 on the device, or an error naming `what`.
fn check_counts(counts: &DeviceBuffer, num_local_experts: usize) -> Result<()> {
    if counts.len() < 4 * num_local_experts || !counts.ptr().is_multiple_of(4) {
        return Err(Error::invalid("counts", format!("[{num_local_experts}] i32 needed")));
    }
    Ok(())
}

/// Writes an fp8 dispatch's scales (`src`, `[L, S, R*M]` f32 as the dispatch stores them)
/// token-major into `dst` (`[L, R*M, S]`, NCCL EP's layout), on the group's stream. With
/// `counts` (`[L]` i32, the dispatch's `packed_recv_count`) only the received rows.
pub fn scales_token_major(
    group: &Group,
    src: &DeviceBuffer,
    dst: &DeviceBuffer,
    counts: Option<&DeviceBuffer>,
    num_local_experts: usize,
    rows: usize,
    num_scales: usize,
) -> Result<()> {
    let n = num_local_experts * rows * num_scales;
    for (b, name) in [(src, "src"), (dst, "dst")] {
        if b.len() < 4 * n || !b.ptr().is_multiple_of(4) {
            return Err(Error::invalid(name, format!("[{num_local_experts}, {rows}, {num_scales}] f32 needed")));
        }
    }
    if let Some(c) = counts {
        check_counts(c, num_local_experts)?;
    }
    let p = ScalesParams {
        src: src.ptr(),
        dst: dst.ptr(),
        counts: counts.map_or(0, |c| c.ptr()),
        batches: num_local_experts as u32,
        rows: rows as u32,
        cols: num_scales as u32,
        reserved: 0,
    };
    let block_dim = group.device().block_dim(256);
    let grid_dim = (n as u32).div_ceil(block_dim).clamp(1, 264);
    // SAFETY: both buffers hold the n f32 the parameters describe (checked).
    unsafe {
        group.stream().launch(&LL_SCALES_TOKEN_MAJOR, LaunchConfig { grid_dim, block_dim, shared_mem_bytes: 0 }, p)
    }
}

/// Copies the first `counts[e]` rows of every local expert `e` of an expert-major dispatch's
/// rows (`src`, `[L, rows, row_bytes]`) to the same places of `dst`, on the group's stream:
/// what arrived, not the whole region (at decode sizes most of it is empty).
pub fn copy_counted_rows(
    group: &Group,
    src: &DeviceBuffer,
    dst: &DeviceBuffer,
    counts: &DeviceBuffer,
    num_local_experts: usize,
    rows: usize,
    row_bytes: usize,
) -> Result<()> {
    let n = num_local_experts * rows * row_bytes;
    if !row_bytes.is_multiple_of(16) {
        return Err(Error::invalid("row_bytes", format!("{row_bytes} is not a multiple of 16")));
    }
    for (b, name) in [(src, "src"), (dst, "dst")] {
        if b.len() < n || !b.ptr().is_multiple_of(16) {
            return Err(Error::invalid(name, format!("[{num_local_experts}, {rows}, {row_bytes} bytes] needed")));
        }
    }
    check_counts(counts, num_local_experts)?;
    let p = CountedRowsParams {
        src: src.ptr(),
        dst: dst.ptr(),
        counts: counts.ptr(),
        row_bytes: row_bytes as u64,
        batches: num_local_experts as u32,
        rows: rows as u32,
    };
    let block_dim = group.device().block_dim(256);
    let grid_dim = ((num_local_experts * rows) as u32).div_ceil(block_dim / 32).clamp(1, 264);
    // SAFETY: both regions hold the rows and `counts` the L i32 the parameters describe (checked).
    unsafe {
        group.stream().launch(&LL_COPY_COUNTED_ROWS, LaunchConfig { grid_dim, block_dim, shared_mem_bytes: 0 }, p)
    }
}

/// How to return a dispatch's rows (DeepEP's LL handle).
pub struct LlHandle {
    /// `[L, R*M]` i32: source token of each packed row (a view into the buffer).
    pub packed_recv_src_info: DeviceBuffer,
    /// `[L, R]` i64: `begin << 32 | count` of the rows from each source rank.
    pub packed_recv_layout_range: DeviceBuffer,
    /// `u64`: the call's epoch, written on the device by the dispatch.
    epoch: DeviceBuffer,
    /// The buffer set of the dispatch (0 or 1).
    set: u32,
}

impl LlHandle {
    /// The buffer set (0 or 1) the dispatch used; its outputs are views into it.
    pub fn set(&self) -> u32 {
        self.set
    }
}

/// The receive half of a send-only op (DeepEP's `return_recv_hook`, NCCL EP's
/// `ncclEpComplete`): launched by `complete`, so no SM waits between the halves.
pub struct LlRecvHook {
    kernel: &'static Kernel<LlParams>,
    params: LlParams,
    cfg: LaunchConfig,
}

impl LlRecvHook {
    /// Launches a pending hook, if any (what both outputs' `complete` do).
    fn take_and_launch(hook: &mut Option<LlRecvHook>, group: &Group, buf: &LlBuffer) -> Result<()> {
        hook.take().map_or(Ok(()), |h| h.launch(group, buf))
    }

    /// Launches the receive half on the group's stream (`buf`: the buffer of the op).
    pub fn launch(self, group: &Group, buf: &LlBuffer) -> Result<()> {
        if self.params.peer_bases != buf.sym.peer_table_ptr() {
            return Err(Error::invalid("buffer", "the hook belongs to another LlBuffer"));
        }
        // SAFETY: the parameters were built for this buffer (checked) and for the outputs
        // that own this hook (they are alive: `complete` borrows them); the caller keeps its
        // statistics buffers alive for the receive half ([`LlStats`]).
        unsafe { group.stream().launch(self.kernel, self.cfg, self.params) }
    }
}

/// Outputs of [`LlBuffer::dispatch`].
pub struct LlDispatchOutputs {
    /// `[L, R*M, H]` bf16 (fp8 e4m3 bytes with `use_fp8`): per local expert, rows packed
    /// from 0, a range per source rank (ranges in arrival order, rows in token order). A
    /// view into the buffer (module docs).
    pub packed_recv_x: DeviceBuffer,
    /// With `use_fp8`: f32 scales stored `[L, H/128, R*M]` — DeepEP's column-major
    /// `[L, R*M, H/128]` (the token index contiguous, as TMA loads want) — or, with
    /// `use_ue8m0`, i32 words stored `[L, H/512, R*M]`, four exponent bytes each (byte
    /// `g % 4` of word `g / 4` for group `g`).
    pub packed_recv_x_scales: Option<DeviceBuffer>,
    /// `[L]` i32: rows per local expert.
    pub packed_recv_count: DeviceBuffer,
    /// For [`LlBuffer::combine`].
    pub handle: LlHandle,
    /// Pending receive of a `send_only` dispatch.
    pub recv_hook: Option<LlRecvHook>,
}

impl LlDispatchOutputs {
    /// Runs the receive half of a `send_only` dispatch (no-op otherwise).
    pub fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlRecvHook::take_and_launch(&mut self.recv_hook, group, buf)
    }
}

/// The inputs of [`LlBuffer::dispatch_rank_major`].
#[derive(Clone, Copy)]
pub struct LlRankMajorInput<'a> {
    /// `[T, H]` bf16, or e4m3 bytes with `x_scales`.
    pub x: &'a DeviceBuffer,
    /// `[T, H/128]` f32: `x` is fp8 already, and rows and scales are sent as they are (NCCL
    /// EP's `QUANT_FWD`).
    pub x_scales: Option<&'a DeviceBuffer>,
    /// T (<= `max_tokens`).
    pub num_tokens: usize,
    /// `[T, K]` expert ids (-1: none).
    pub topk_idx: &'a DeviceBuffer,
    /// Their type.
    pub index_type: IndexType,
    /// `[T, K]` f32.
    pub topk_weights: &'a DeviceBuffer,
    /// K.
    pub num_topk: usize,
}

/// Outputs of [`LlBuffer::dispatch_rank_major`] (NCCL EP's `RANK_MAJOR` layout), and the
/// handle of its [`LlBuffer::combine_rank_major`].
pub struct LlRankMajorOutputs {
    /// `[R, M, H]` bf16 (e4m3 bytes for fp8 input): block `s` holds, in token order, rank
    /// `s`'s tokens with an expert here.
    pub recv_x: DeviceBuffer,
    /// `[R, M, H/128]` f32: the received rows' scales, for fp8 input (set it after
    /// [`LlRankMajorOutputs::in_memory`]; None otherwise).
    pub recv_x_scales: Option<DeviceBuffer>,
    /// `[R]` i32: rows from each source rank.
    pub recv_count: DeviceBuffer,
    /// `[R, M]` i32: source token of each row.
    pub recv_src_idx: DeviceBuffer,
    /// `[R, M, K]` local expert ids, -1 for experts elsewhere: i64, or i32 when
    /// `recv_idx_bytes` is 4.
    pub recv_topk_idx: DeviceBuffer,
    /// `[R, M, K]` f32: weights, 0 where the expert is elsewhere.
    pub recv_topk_weights: DeviceBuffer,
    /// Bytes per `recv_topk_idx` entry: 8 or 4.
    pub recv_idx_bytes: usize,
    /// Pending receive of a `send_only` dispatch.
    pub recv_hook: Option<LlRecvHook>,
    /// The call's epoch, written on the device; read by the receive half and the combine.
    epoch: DeviceBuffer,
    /// The buffer set of the call.
    set: u32,
}

impl LlRankMajorOutputs {
    /// Outputs in the caller's memory, for [`LlBuffer::dispatch_rank_major_into`] (the shapes
    /// above; `epoch`: 8 bytes, 8-aligned, kept for the combine).
    pub fn in_memory(
        [recv_x, recv_count, recv_src_idx, recv_topk_idx, recv_topk_weights, epoch]: [DeviceBuffer; 6],
        recv_idx_bytes: usize,
    ) -> LlRankMajorOutputs {
        LlRankMajorOutputs {
            recv_x,
            recv_x_scales: None,
            recv_count,
            recv_src_idx,
            recv_topk_idx,
            recv_topk_weights,
            recv_idx_bytes,
            recv_hook: None,
            epoch,
            set: 0,
        }
    }

    /// Runs the receive half of a `send_only` dispatch (no-op otherwise).
    pub fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlRecvHook::take_and_launch(&mut self.recv_hook, group, buf)
    }
}

/// Outputs of [`LlBuffer::combine`].
pub struct LlCombineOutputs {
    /// `[num_tokens, hidden]` bf16.
    pub combined_x: DeviceBuffer,
    /// Pending receive of a `send_only` combine.
    pub recv_hook: Option<LlRecvHook>,
}

impl LlCombineOutputs {
    /// Runs the receive half of a `send_only` combine (no-op otherwise).
    pub fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlRecvHook::take_and_launch(&mut self.recv_hook, group, buf)
    }
}

/// The communication buffer of LL dispatch/combine (one per rank, collective).
/// Drop it on every rank only after all ranks have finished their last op on it (views
/// handed out keep this rank's memory alive, not the peers').
pub struct LlBuffer {
    sym: Arc<SymmetricBuffer>,
    layout: LlLayout,
    cfg: LlConfig,
    grid_dim: u32,
    /// The set of the next allocating call (every rank makes the same calls, so all agree).
    next_set: u32,
}

impl LlBuffer {
    /// Bytes of the symmetric buffer for `cfg` on `num_ranks` ranks (both sets).
    pub fn size_hint(num_ranks: usize, cfg: &LlConfig) -> usize {
        LlLayout::new(num_ranks as u32, cfg.num_experts as u32, cfg.max_tokens as u32, 2 * cfg.hidden as u64)
            .total_bytes() as usize
    }

    /// Collective: allocates and shares the buffer.
    pub fn new(group: &Group, cfg: LlConfig) -> Result<LlBuffer> {
        Self::check_config(group, &cfg)?;
        let sym = group.alloc_symmetric(Self::size_hint(group.num_ranks(), &cfg), Sharing::Auto)?;
        Self::in_memory(group, cfg, Arc::new(sym))
    }

    /// The buffer for `cfg` in `sym` (zeroed, e.g. fresh from [`Group::alloc_symmetric`]
    /// at a DeepEP-style `Buffer(num_rdma_bytes)`), with no allocation or exchange of its
    /// own. Every rank makes the same call. Too little memory is an
    /// [`Error::InvalidArgument`] that names the bytes needed.
    pub fn in_memory(group: &Group, cfg: LlConfig, sym: Arc<SymmetricBuffer>) -> Result<LlBuffer> {
        Self::check_config(group, &cfg)?;
        let r = group.num_ranks();
        let layout = LlLayout::new(r as u32, cfg.num_experts as u32, cfg.max_tokens as u32, 2 * cfg.hidden as u64);
        if layout.total_bytes() as usize > sym.len() {
            return Err(Error::invalid(
                "num_rdma_bytes",
                format!(
                    "LL with {} tokens per rank, hidden {} and {} experts needs {} bytes, the buffer has {}",
                    cfg.max_tokens,
                    cfg.hidden,
                    cfg.num_experts,
                    layout.total_bytes(),
                    sym.len()
                ),
            ));
        }
        // A block per local expert (it receives that expert), at least 16 (every warp sends),
        // within the rank's share of the SMs when ranks share a GPU (all their blocks must
        // be resident at once).
        let sharing = group.ranks_on_device()?;
        let grid_dim = if group.device().is_cpu() {
            2
        } else {
            let want = (cfg.num_experts / r).max(16);
            (group.device().num_sms()? as usize / sharing).clamp(1, want) as u32
        };
        Ok(LlBuffer { sym, layout, cfg, grid_dim, next_set: 0 })
    }

    /// Collective: the same memory laid out for `cfg` instead, once every rank's earlier ops
    /// on it are done (views handed out before must no longer be used). Synchronises the
    /// stream: not while it captures a graph. Too little memory is an error that leaves
    /// the buffer as it was.
    pub fn relayout(&mut self, group: &Group, cfg: LlConfig) -> Result<()> {
        Self::check_config(group, &cfg)?;
        let need = Self::size_hint(group.num_ranks(), &cfg);
        if need > self.sym.len() {
            return Err(Error::invalid(
                "num_rdma_bytes",
                format!("{need} bytes needed, the buffer has {}", self.sym.len()),
            ));
        }
        let stream = group.stream();
        stream.synchronize()?;
        group.bootstrap().barrier()?; // no peer still reads or writes the old layout
        self.sym.local().fill(stream, 0)?;
        group.bootstrap().barrier()?; // every rank's flags are zero before any is used
        *self = Self::in_memory(group, cfg, self.sym.clone())?;
        Ok(())
    }

    /// The memory (DeepEP's `get_local_buffer_tensor(use_rdma_buffer=True)` views it).
    pub fn memory(&self) -> &Arc<SymmetricBuffer> {
        &self.sym
    }

    /// The configuration.
    pub fn config(&self) -> &LlConfig {
        &self.cfg
    }

    fn check_config(group: &Group, cfg: &LlConfig) -> Result<()> {
        let r = group.num_ranks();
        if cfg.num_experts == 0 || cfg.num_experts > MAX_EXPERTS || !cfg.num_experts.is_multiple_of(r) {
            return Err(Error::invalid(
                "num_experts",
                format!("{} must be in 1..={MAX_EXPERTS} and a multiple of {r}", cfg.num_experts),
            ));
        }
        if cfg.hidden == 0 || cfg.hidden > MAX_HIDDEN || !cfg.hidden.is_multiple_of(8) {
            return Err(Error::invalid(
                "hidden",
                format!("{} must be a positive multiple of 8 up to {MAX_HIDDEN}", cfg.hidden),
            ));
        }
        if !(1..=1024).contains(&cfg.max_tokens) {
            return Err(Error::invalid("max_tokens", format!("{} is not in 1..=1024", cfg.max_tokens)));
        }
        Ok(())
    }

    /// The address of region `offset` of set `set` in this rank's buffer.
    fn region(&self, set: u32, offset: u64) -> u64 {
        self.sym.local().ptr() + set as u64 * self.layout.set_bytes + offset
    }

    /// `bytes` at `offset` of set `set` of this rank's buffer, as a buffer that keeps it alive.
    fn view(&self, set: u32, offset: u64, bytes: usize) -> DeviceBuffer {
        let (local, keep, at) = (self.sym.local(), self.sym.clone(), self.region(set, offset));
        // SAFETY: the range lies in this rank's buffer (the layout sized it), which `keep`
        // holds until the view is dropped. Peers write it only as the module docs say.
        unsafe { DeviceBuffer::lent(local.device(), at, bytes, Box::new(move || drop(keep))) }
    }

    /// The zero-copy combine input of `handle`'s set (DeepEP's
    /// `get_next_low_latency_combine_buffer`): `[L, R*M, hidden]` bf16, rows as the dispatch
    /// packed them. Write the expert outputs here and pass it as [`LlBuffer::combine`]'s
    /// `x`: sources then read the rows in place instead of this rank sending them.
    pub fn combine_buffer(&self, handle: &LlHandle) -> DeviceBuffer {
        let l = &self.layout;
        self.view(handle.set, l.combine_x, (l.num_local_experts * l.rows_per_expert()) as usize * 2 * self.cfg.hidden)
    }

    fn params(&self, group: &Group, call_epoch: &DeviceBuffer, set: u32) -> LlParams {
        LlParams {
            peer_bases: self.sym.peer_table_ptr(),
            error: group.error_ptr(),
            epoch_word: self.sym.local().ptr() + self.layout.epoch_word(),
            call_epoch: call_epoch.ptr(),
            timeout_ns: group.timeout_ns(),
            row_bytes: 2 * self.cfg.hidden as u64,
            num_experts: self.cfg.num_experts as u32,
            max_tokens: self.cfg.max_tokens as u32,
            rank: group.rank() as u32,
            num_ranks: group.num_ranks() as u32,
            set,
            ..LlParams::default()
        }
    }

    fn launch_config(&self, group: &Group, kernel: &'static Kernel<LlParams>) -> LaunchConfig {
        let block_dim = group.device().block_dim(256).max(128);
        let shared_mem_bytes = if std::ptr::eq(kernel, &LL_DISPATCH) {
            ll_dispatch_smem_bytes(block_dim / 32, self.cfg.num_experts as u32)
        } else {
            0
        };
        LaunchConfig { grid_dim: self.grid_dim, block_dim, shared_mem_bytes }
    }

    /// Checks a dispatch's `x`: `[num_tokens, H]` bf16, or e4m3 bytes with `x_scales`
    /// (`[num_tokens, H/128]` f32, H a multiple of 128). Returns the bytes of a row of `x`.
    fn check_x(&self, x: &DeviceBuffer, x_scales: Option<&DeviceBuffer>, num_tokens: usize) -> Result<usize> {
        let h = self.cfg.hidden;
        let (x_bytes, x_type) = if x_scales.is_some() { (h, "e4m3") } else { (2 * h, "bf16") };
        if x.len() < num_tokens * x_bytes || !x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("x", format!("[{num_tokens}, {h}] {x_type} (16-aligned) needed")));
        }
        if let Some(sc) = x_scales {
            if !h.is_multiple_of(128) {
                return Err(Error::invalid("x_scales", format!("fp8 rows need hidden ({h}) a multiple of 128")));
            }
            if sc.len() < num_tokens * (h / 128) * 4 || !sc.ptr().is_multiple_of(4) {
                return Err(Error::invalid("x_scales", format!("[{num_tokens}, {}] f32 needed", h / 128)));
            }
        }
        Ok(x_bytes)
    }

    fn check_topk(&self, topk_idx: &DeviceBuffer, idx: IndexType, num_tokens: usize, num_topk: usize) -> Result<()> {
        if num_tokens > self.cfg.max_tokens {
            return Err(Error::invalid("num_tokens", format!("{num_tokens} > max_tokens {}", self.cfg.max_tokens)));
        }
        if !(1..=MAX_TOPK).contains(&num_topk) {
            return Err(Error::invalid("num_topk", format!("{num_topk} is not in 1..={MAX_TOPK}")));
        }
        if topk_idx.len() < num_tokens * num_topk * idx.bytes() {
            return Err(Error::invalid(
                "topk_idx",
                format!("[{num_tokens}, {num_topk}] needs more than {} bytes", topk_idx.len()),
            ));
        }
        Ok(())
    }

    /// Launches both halves, or only the send half with the receive kept in a hook.
    fn launch(
        &self,
        group: &Group,
        kernel: &'static Kernel<LlParams>,
        params: LlParams,
        send_only: bool,
    ) -> Result<Option<LlRecvHook>> {
        let cfg = self.launch_config(group, kernel);
        let phases = if send_only { LL_SEND } else { LL_SEND | LL_RECV };
        // SAFETY: the callers built `params` for this buffer and for outputs they return.
        unsafe { group.stream().launch(kernel, cfg, LlParams { phases, ..params })? };
        Ok(send_only.then_some(LlRecvHook { kernel, params: LlParams { phases: LL_RECV, ..params }, cfg }))
    }

    /// Collective: sends every `(token, k)` with an expert to the expert's rank. `x` is
    /// `[num_tokens, hidden]` bf16. Asynchronous; device errors surface in
    /// [`Group::take_device_error`]. `send_only`: return once the sends are out, with the
    /// receive in `recv_hook` (call [`LlDispatchOutputs::complete`]). `stats`: the
    /// dispatch statistics to add to ([`LlStats`]; a combine's is an error).
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &mut self,
        group: &Group,
        x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        num_topk: usize,
        opts: LlDispatchOptions,
        stats: LlStats<'_>,
    ) -> Result<LlDispatchOutputs> {
        let s = group.stream();
        let (l, r) = (self.layout.num_local_experts as usize, group.num_ranks());
        // The set advances only once the call is launched (errors leave it).
        let small = [s.alloc(4 * l)?, s.alloc(8 * l * r)?, s.alloc(8)?];
        self.dispatch_with(group, x, num_tokens, topk_idx, idx, num_topk, opts, small, stats)
    }

    /// [`LlBuffer::dispatch`] with the small outputs in the caller's memory:
    /// `packed_recv_count` (`[L]` i32), `packed_recv_layout_range` (`[L, R]` i64) and `epoch`
    /// (8 bytes). Nothing is allocated, so a graph capture that owns the memory
    /// (e.g. torch's, through `torch.cuda.graph`) can hold the call; the rows are views into
    /// the buffer as always.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_with(
        &mut self,
        group: &Group,
        x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        num_topk: usize,
        opts: LlDispatchOptions,
        [packed_recv_count, packed_recv_layout_range, epoch]: [DeviceBuffer; 3],
        stats: LlStats<'_>,
    ) -> Result<LlDispatchOutputs> {
        if epoch.len() < 8 || !epoch.ptr().is_multiple_of(8) {
            return Err(Error::invalid("epoch", "8 bytes (8-aligned) needed"));
        }
        let (l, h) = (self.layout.num_local_experts as usize, self.cfg.hidden);
        let rows = l * self.layout.rows_per_expert() as usize;
        let x_bytes = if opts.use_fp8 { h } else { 2 * h };
        let (set, lay) = (self.next_set, self.layout);
        let mut out = LlDispatchOutputs {
            packed_recv_x: self.view(set, lay.recv_x, rows * x_bytes),
            packed_recv_x_scales: opts.use_fp8.then(|| self.view(set, lay.recv_scales, rows * (h / 128) * 4)),
            packed_recv_count,
            handle: LlHandle {
                packed_recv_src_info: self.view(set, lay.recv_src_info, rows * 4),
                packed_recv_layout_range,
                epoch,
                set,
            },
            recv_hook: None,
        };
        out.recv_hook = self.dispatch_into(group, &out, x, num_tokens, topk_idx, idx, num_topk, opts, stats)?;
        self.next_set ^= 1;
        Ok(out)
    }

    /// [`LlBuffer::dispatch`] into the buffers of an earlier dispatch's outputs (whose
    /// handle it then describes): no allocation, the same parameters every call, so it can
    /// be captured in a CUDA graph ([`crate::Stream::begin_capture`]) and replayed.
    /// Returns the receive hook of a `send_only` call.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_into(
        &mut self,
        group: &Group,
        out: &LlDispatchOutputs,
        x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        num_topk: usize,
        opts: LlDispatchOptions,
        stats: LlStats<'_>,
    ) -> Result<Option<LlRecvHook>> {
        self.check_topk(topk_idx, idx, num_tokens, num_topk)?;
        let (l, r, h) = (self.layout.num_local_experts as usize, group.num_ranks(), self.cfg.hidden);
        if opts.x_scales.is_some() && (!opts.use_fp8 || opts.round_scale || opts.use_ue8m0) {
            return Err(Error::invalid("x_scales", "fp8 input goes with use_fp8 alone (no round_scale, no UE8M0)"));
        }
        self.check_x(x, opts.x_scales, num_tokens)?;
        if opts.use_fp8 && !h.is_multiple_of(128) {
            return Err(Error::invalid("use_fp8", format!("hidden {h} is not a multiple of 128")));
        }
        if opts.use_ue8m0 && !(opts.use_fp8 && opts.round_scale && h.is_multiple_of(512)) {
            return Err(Error::invalid(
                "use_ue8m0",
                format!("needs use_fp8, round_scale and hidden ({h}) a multiple of 512"),
            ));
        }
        let set = out.handle.set;
        let lay = &self.layout;
        let ours = |b: &DeviceBuffer, offset: u64| b.ptr() == self.region(set, offset);
        let scales_ok = match &out.packed_recv_x_scales {
            Some(sc) => opts.use_fp8 && ours(sc, lay.recv_scales),
            None => !opts.use_fp8,
        };
        if !ours(&out.packed_recv_x, lay.recv_x)
            || !ours(&out.handle.packed_recv_src_info, lay.recv_src_info)
            || !scales_ok
            || out.packed_recv_count.len() < 4 * l
            || out.handle.packed_recv_layout_range.len() < 8 * l * r
        {
            return Err(Error::invalid("out", "outputs of another buffer, or of a dispatch in another format"));
        }
        if stats.combine_wait_recv_cost_stats.is_some() {
            return Err(Error::invalid("combine_wait_recv_cost_stats", "a combine statistic, given to a dispatch"));
        }
        let recv_stats =
            stats_ptr("cumulative_local_expert_recv_stats", stats.cumulative_local_expert_recv_stats, l, 4, "i32")?;
        let wait_stats = stats_ptr("dispatch_wait_recv_cost_stats", stats.dispatch_wait_recv_cost_stats, r, 8, "i64")?;
        let params = LlParams {
            x: x.ptr(),
            x_scales: opts.x_scales.map_or(0, |b| b.ptr()),
            topk_idx: topk_idx.ptr(),
            packed_recv_layout_range: out.handle.packed_recv_layout_range.ptr(),
            packed_recv_count: out.packed_recv_count.ptr(),
            cumulative_local_expert_recv_stats: recv_stats,
            dispatch_wait_recv_cost_stats: wait_stats,
            num_tokens: num_tokens as u32,
            num_topk: num_topk as u32,
            idx_bytes: idx.bytes() as u32,
            fp8: if opts.use_fp8 {
                LL_FP8
                    | if opts.round_scale { LL_ROUND_SCALE } else { 0 }
                    | if opts.use_ue8m0 { LL_UE8M0 } else { 0 }
                    | if opts.x_scales.is_some() { LL_FP8_INPUT } else { 0 }
            } else {
                0
            },
            ..self.params(group, &out.handle.epoch, set)
        };
        // The buffer was sized by the same LlLayout; the outputs have the documented shapes
        // (checked) and inputs were checked above.
        self.launch(group, &LL_DISPATCH, params, opts.send_only)
    }

    /// Collective: rank-major dispatch — every token once to every rank holding one of its
    /// experts, with its routing (`topk_weights` `[num_tokens, K]` f32) localised there.
    pub fn dispatch_rank_major(
        &mut self,
        group: &Group,
        input: &LlRankMajorInput<'_>,
        send_only: bool,
    ) -> Result<LlRankMajorOutputs> {
        let s = group.stream();
        let (r, m, h, k) = (group.num_ranks(), self.cfg.max_tokens, self.cfg.hidden, input.num_topk);
        let fp8 = input.x_scales.is_some();
        let mut out = LlRankMajorOutputs::in_memory(
            [
                s.alloc_uninit(r * m * if fp8 { h } else { 2 * h })?,
                s.alloc(4 * r)?,
                s.alloc(4 * r * m)?,
                s.alloc(8 * r * m * k)?,
                s.alloc(4 * r * m * k)?,
                s.alloc(8)?,
            ],
            8,
        );
        if fp8 {
            out.recv_x_scales = Some(s.alloc_uninit(r * m * (h / 128) * 4)?);
        }
        self.dispatch_rank_major_into(group, &mut out, input, send_only)?;
        Ok(out)
    }

    /// [`LlBuffer::dispatch_rank_major`] into `out` (e.g. [`LlRankMajorOutputs::in_memory`]):
    /// nothing is allocated. Leaves the receive hook of a `send_only` call in `out`.
    pub fn dispatch_rank_major_into(
        &mut self,
        group: &Group,
        out: &mut LlRankMajorOutputs,
        input: &LlRankMajorInput<'_>,
        send_only: bool,
    ) -> Result<()> {
        let &LlRankMajorInput { x, x_scales, num_tokens, topk_idx, index_type, topk_weights, num_topk } = input;
        self.check_topk(topk_idx, index_type, num_tokens, num_topk)?;
        let x_bytes = self.check_x(x, x_scales, num_tokens)?;
        match (x_scales, &out.recv_x_scales) {
            (Some(_), None) => return Err(Error::invalid("recv_x_scales", "needed for fp8 input (x_scales)")),
            (None, Some(_)) => return Err(Error::invalid("recv_x_scales", "given for a bf16 dispatch")),
            _ => {}
        }
        let groups = self.cfg.hidden / 128;
        if topk_weights.len() < num_tokens * num_topk * 4 {
            return Err(Error::invalid("topk_weights", format!("[{num_tokens}, {num_topk}] f32 needed")));
        }
        let (r, m, k, ib) = (group.num_ranks(), self.cfg.max_tokens, num_topk, out.recv_idx_bytes);
        if ib != 4 && ib != 8 {
            return Err(Error::invalid("recv_topk_idx", format!("{ib}-byte ids (expected 4 or 8)")));
        }
        let scales_bytes = if x_scales.is_some() { r * m * groups * 4 } else { 0 };
        let checks: [(Option<&DeviceBuffer>, usize, u64, &'static str); 7] = [
            (Some(&out.recv_x), r * m * x_bytes, 16, "recv_x"),
            (out.recv_x_scales.as_ref(), scales_bytes, 4, "recv_x_scales"),
            (Some(&out.recv_count), 4 * r, 4, "recv_count"),
            (Some(&out.recv_src_idx), 4 * r * m, 4, "recv_src_idx"),
            (Some(&out.recv_topk_idx), ib * r * m * k, ib as u64, "recv_topk_idx"),
            (Some(&out.recv_topk_weights), 4 * r * m * k, 4, "recv_topk_weights"),
            (Some(&out.epoch), 8, 8, "epoch"),
        ];
        for (buf, bytes, align, name) in checks {
            let Some(buf) = buf else { continue };
            if buf.len() < bytes || !buf.ptr().is_multiple_of(align) {
                return Err(Error::invalid(name, format!("{bytes} bytes ({align}-aligned) needed, got {}", buf.len())));
            }
        }
        let set = self.next_set;
        let params = LlParams {
            x: x.ptr(),
            x_scales: x_scales.map_or(0, |b| b.ptr()),
            topk_idx: topk_idx.ptr(),
            topk_weights: topk_weights.ptr(),
            packed_recv_x: out.recv_x.ptr(),
            packed_recv_x_scales: out.recv_x_scales.as_ref().map_or(0, |b| b.ptr()),
            packed_recv_src_info: out.recv_src_idx.ptr(),
            packed_recv_count: out.recv_count.ptr(),
            recv_topk_idx: out.recv_topk_idx.ptr(),
            recv_topk_weights: out.recv_topk_weights.ptr(),
            num_tokens: num_tokens as u32,
            num_topk: num_topk as u32,
            idx_bytes: index_type.bytes() as u32,
            recv_idx_bytes: ib as u32,
            fp8: if x_scales.is_some() { LL_FP8 | LL_FP8_INPUT } else { 0 },
            ..self.params(group, &out.epoch, set)
        };
        // The rank-major regions of the same LlLayout; outputs checked above.
        out.recv_hook = self.launch(group, &LL_DISPATCH_RANK_MAJOR, params, send_only)?;
        out.set = set;
        self.next_set ^= 1;
        Ok(())
    }

    /// Collective: NCCL EP's rank-major combine of `d` (this buffer's rank-major dispatch,
    /// received): `x` (`[R, M, hidden]` bf16, one pre-reduced row per row of `d.recv_x`)
    /// goes back to the tokens' ranks, where each token of `topk_idx` (`[num_tokens, K]`, the
    /// dispatch's) sums the rows of the ranks holding its experts, rank ascending, in f32,
    /// into `combined_x` (`[num_tokens, hidden]` bf16). Returns the receive hook of a
    /// `send_only` call.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_rank_major(
        &mut self,
        group: &Group,
        d: &LlRankMajorOutputs,
        x: &DeviceBuffer,
        combined_x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        num_topk: usize,
        send_only: bool,
    ) -> Result<Option<LlRecvHook>> {
        self.check_topk(topk_idx, idx, num_tokens, num_topk)?;
        if d.recv_hook.is_some() {
            return Err(Error::invalid("handle", "its dispatch's receive half has not run yet"));
        }
        let (r, m, row_bytes) = (group.num_ranks(), self.cfg.max_tokens, 2 * self.cfg.hidden);
        if x.len() < r * m * row_bytes || !x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("x", format!("[{r}, {m}, {}] bf16 (16-aligned) needed", self.cfg.hidden)));
        }
        if combined_x.len() < num_tokens * row_bytes || !combined_x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("combined_x", format!("[{num_tokens}, {}] bf16 needed", self.cfg.hidden)));
        }
        let params = LlParams {
            x: x.ptr(),
            topk_idx: topk_idx.ptr(),
            packed_recv_src_info: d.recv_src_idx.ptr(),
            packed_recv_count: d.recv_count.ptr(),
            combined_x: combined_x.ptr(),
            num_tokens: num_tokens as u32,
            num_topk: num_topk as u32,
            idx_bytes: idx.bytes() as u32,
            ..self.params(group, &d.epoch, d.set)
        };
        // The counts and tokens come from a dispatch on this buffer (its set and epoch).
        self.launch(group, &LL_COMBINE_RANK_MAJOR, params, send_only)
    }

    /// Collective: returns the expert outputs `x` (`[L, R*M, hidden]` bf16, rows as the
    /// dispatch packed them) to their source ranks and sums them there, weighted by
    /// `topk_weights` (`[num_tokens, K]` f32), into `[num_tokens, hidden]` bf16. One combine
    /// per dispatch handle. `send_only` as in [`LlBuffer::dispatch`]; `stats`: the combine
    /// statistic to add to ([`LlStats`]; a dispatch's is an error).
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &mut self,
        group: &Group,
        handle: &LlHandle,
        x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        topk_weights: &DeviceBuffer,
        num_topk: usize,
        send_only: bool,
        stats: LlStats<'_>,
    ) -> Result<LlCombineOutputs> {
        let combined_x = group.stream().alloc_uninit((num_tokens * 2 * self.cfg.hidden).max(16))?;
        let recv_hook = self.combine_into(
            group,
            handle,
            x,
            &combined_x,
            num_tokens,
            topk_idx,
            idx,
            topk_weights,
            num_topk,
            send_only,
            stats,
        )?;
        Ok(LlCombineOutputs { combined_x, recv_hook })
    }

    /// [`LlBuffer::combine`] into `combined_x` (`[num_tokens, hidden]` bf16): no allocation,
    /// for graph capture. Returns the receive hook of a `send_only` call.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_into(
        &mut self,
        group: &Group,
        handle: &LlHandle,
        x: &DeviceBuffer,
        combined_x: &DeviceBuffer,
        num_tokens: usize,
        topk_idx: &DeviceBuffer,
        idx: IndexType,
        topk_weights: &DeviceBuffer,
        num_topk: usize,
        send_only: bool,
        stats: LlStats<'_>,
    ) -> Result<Option<LlRecvHook>> {
        self.check_topk(topk_idx, idx, num_tokens, num_topk)?;
        let (l, r, m, row_bytes) =
            (self.layout.num_local_experts as usize, group.num_ranks(), self.cfg.max_tokens, 2 * self.cfg.hidden);
        if x.len() < l * r * m * row_bytes {
            return Err(Error::invalid("x", format!("[{l}, {}, {}] bf16 needed", r * m, self.cfg.hidden)));
        }
        if topk_weights.len() < num_tokens * num_topk * 4 {
            return Err(Error::invalid("topk_weights", format!("[{num_tokens}, {num_topk}] f32 needed")));
        }
        if combined_x.len() < num_tokens * row_bytes {
            return Err(Error::invalid("combined_x", format!("[{num_tokens}, {}] bf16 needed", self.cfg.hidden)));
        }
        for (arg, given) in [
            ("cumulative_local_expert_recv_stats", stats.cumulative_local_expert_recv_stats),
            ("dispatch_wait_recv_cost_stats", stats.dispatch_wait_recv_cost_stats),
        ] {
            if given.is_some() {
                return Err(Error::invalid(arg, "a dispatch statistic, given to a combine"));
            }
        }
        let wait_stats = stats_ptr("combine_wait_recv_cost_stats", stats.combine_wait_recv_cost_stats, r, 8, "i64")?;
        // Pull when the expert outputs lie in this rank's zero-copy region of the handle's
        // set, unless send-only (the sends then overlap with whatever runs meanwhile).
        let pull = !send_only && x.ptr() == self.region(handle.set, self.layout.combine_x);
        let params = LlParams {
            x: x.ptr(),
            topk_idx: topk_idx.ptr(),
            topk_weights: topk_weights.ptr(),
            packed_recv_layout_range: handle.packed_recv_layout_range.ptr(),
            combined_x: combined_x.ptr(),
            combine_wait_recv_cost_stats: wait_stats,
            num_tokens: num_tokens as u32,
            num_topk: num_topk as u32,
            idx_bytes: idx.bytes() as u32,
            pull: pull as u32,
            ..self.params(group, &handle.epoch, handle.set)
        };
        // As in dispatch; the handle comes from a dispatch on this buffer.
        self.launch(group, &LL_COMBINE, params, send_only)
    }
}
