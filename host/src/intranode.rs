//! HT (high-throughput) dispatch and combine inside one NVLink domain — DeepEP's "normal"
//! intranode mode. Kernels: `ht_notify`, `ht_dispatch`, `ht_combine` in `moe-ep-kernels`
//! (`intranode.rs`, whose docs state the ring protocol). Semantics: `reference::ht_dispatch`
//! and `reference::ht_combine`, bit for bit.
use crate::device::Stream;
use crate::device::{DeviceBuffer, HostMapped, LaunchConfig};
use crate::group::{Group, Sharing, SymmetricBuffer};
use crate::heap::SymHeap;
use crate::layout::{DispatchLayout, IndexType, MAX_EXPERTS, MAX_TOPK};
use crate::limits::{MAX_HT_BLOCK_WARPS, MAX_HT_RANKS};
use crate::{Error, Result};
use moe_ep_abi::{HtCombineParams, HtDispatchParams, HtLayout, HtNotifyParams};
use moe_ep_kernels::intranode::{HT_COMBINE, HT_DISPATCH, HT_NOTIFY};
use std::sync::Arc;

pub use crate::limits::MAX_HIDDEN;

/// Sizes an [`HtBuffer`] is built for (every call must fit them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtConfig {
    /// Experts in all (a multiple of the rank count).
    pub num_experts: usize,
    /// Largest hidden size in bf16 elements (combine rows; dispatch rows of `2 * hidden` bytes).
    pub hidden: usize,
    /// Largest top-k.
    pub num_topk: usize,
    /// Largest number of f32 scales per token (fp8 dispatch: `hidden / 128`).
    pub num_scales: usize,
    /// Channels: each is one sender and one receiver block, so `2 * num_channels` SMs.
    /// 0 = 10 on a GPU (DeepEP's default 20 SMs), or the GPU's SMs / (2 * ranks on it) when
    /// ranks share a GPU; 2 on the emulator.
    pub num_channels: usize,
    /// Warps per peer in each block (0 = 16 / ranks on a GPU, i.e. 512 threads, 1 on the
    /// emulator). Each is a ring of its own, so `num_channels * warps_per_peer` rings per
    /// pair of ranks: more warps keep more bytes in flight per SM. At most
    /// `HT_MAX_BLOCK_WARPS` (16) warps per block in all.
    pub warps_per_peer: usize,
    /// Slots per ring (0 = 128 / `warps_per_peer` on a GPU, 16 on the emulator).
    pub num_slots: usize,
    /// Bytes of the output heap (0 = none). Dispatch outputs that fit in it are stored into
    /// by the senders directly (one pass over the data); the rest go through the rings (two
    /// passes). Size it for the dispatch outputs alive at once: `rows * (hidden_bytes +
    /// 4 * num_scales + 4 + 12 * num_topk)` per call, rounded up to 256 per tensor.
    pub heap_bytes: usize,
}

/// What every DeepEP-style op returns besides its tensors: how to undo a dispatch.
pub struct HtHandle {
    /// `[R, R]` i32, DeepEP's `rank_prefix_matrix`.
    pub rank_prefix_matrix: DeviceBuffer,
    /// `[R, C + 1]` i32: first row of each (source rank, channel).
    pub channel_prefix_matrix: DeviceBuffer,
    /// `[T, R]` bool bytes (a copy of the layout's).
    pub is_token_in_rank: DeviceBuffer,
    /// `[T, R]` i32: each token's position in its channel's stream to each rank.
    pub send_head: DeviceBuffer,
    /// Tokens of this rank.
    pub num_tokens: usize,
    /// Rows of the dispatch outputs (`num_worst_tokens` when padded).
    pub num_rows: usize,
    /// `[1]` i32 on the device: rows actually received.
    pub num_recv_tokens: DeviceBuffer,
    /// Whether the outputs are padded to `num_rows`.
    pub padded: bool,
    /// `[R, C]` i32: where this rank's tokens of each channel start in each peer's rows
    /// (what a pulling combine reads).
    pub remote_row0: DeviceBuffer,
    num_channels: usize,
}

impl HtHandle {
    /// Channels (rings per pair of ranks) of the dispatch: `channel_prefix_matrix` is
    /// `[R, num_channels + 1]`.
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }
}

/// Inputs of [`HtBuffer::dispatch`].
pub struct HtDispatchArgs<'a> {
    /// `[num_tokens, hidden_bytes]` (bf16 rows: `2 * hidden` bytes; fp8: `hidden`).
    pub x: &'a DeviceBuffer,
    /// Bytes per token, a multiple of 16.
    pub hidden_bytes: usize,
    /// Tokens of this rank.
    pub num_tokens: usize,
    /// `[num_tokens, num_scales]` f32 (fp8 dispatch) and `num_scales`.
    pub x_scales: Option<(&'a DeviceBuffer, usize)>,
    /// `topk_idx [num_tokens, K]`, its type, `topk_weights [num_tokens, K]` f32, and `K`.
    pub topk: Option<(&'a DeviceBuffer, IndexType, &'a DeviceBuffer, usize)>,
    /// From [`crate::layout::get_dispatch_layout`].
    pub layout: &'a DispatchLayout,
    /// Round per-expert receive counts up to this (>= 1).
    pub expert_alignment: usize,
    /// Fixed output rows (no host synchronisation) instead of exact-size outputs.
    pub num_worst_tokens: Option<usize>,
}

/// Outputs of [`HtBuffer::dispatch`] (DeepEP's names).
pub struct HtDispatchOutputs {
    /// `[rows, hidden_bytes]`.
    pub recv_x: DeviceBuffer,
    /// `[rows, num_scales]` f32 (empty without scales).
    pub recv_x_scales: DeviceBuffer,
    /// `[rows, K]` i64: local expert id or -1.
    pub recv_topk_idx: DeviceBuffer,
    /// `[rows, K]` f32.
    pub recv_topk_weights: DeviceBuffer,
    /// `[rows]` i32: source token index (-1 on padding rows).
    pub recv_src_idx: DeviceBuffer,
    /// `[L]` i32 on the device.
    pub num_recv_tokens_per_expert: DeviceBuffer,
    /// Host copy of the per-expert counts (exact-size mode only; `None` when padded).
    pub num_recv_tokens_per_expert_list: Option<Vec<i32>>,
    /// Rows received (exact-size mode); `None` when padded (the count is on the device).
    pub num_recv_tokens: Option<usize>,
    /// For combine.
    pub handle: HtHandle,
    /// Whether the outputs came from the heap, so senders stored into them directly.
    pub one_pass: bool,
}

/// The memory a dispatch writes besides its rows: the handle's maps and the per-expert
/// counts (`T` tokens, `R` ranks, `C` channels = [`HtBuffer::num_channels`], `L` local experts).
pub struct HtMaps {
    /// `[L]` i32.
    pub num_recv_tokens_per_expert: DeviceBuffer,
    /// `[R, R]` i32.
    pub rank_prefix_matrix: DeviceBuffer,
    /// `[R, C + 1]` i32.
    pub channel_prefix_matrix: DeviceBuffer,
    /// `[1]` i32.
    pub num_recv_tokens: DeviceBuffer,
    /// `[R, C]` i32.
    pub remote_row0: DeviceBuffer,
    /// `[T, R]` i32.
    pub send_head: DeviceBuffer,
    /// `[T, R]` bool bytes (the dispatch copies the layout's here).
    pub is_token_in_rank: DeviceBuffer,
}

/// The caller's memory for [`HtBuffer::dispatch_into`] (rows = `num_worst_tokens`, `S`
/// scales, `K` top-k); a buffer the call doesn't write (scales without `x_scales`, top-k
/// without `topk`) may be any, e.g. `recv_x` again.
pub struct HtDispatchBuffers {
    /// `[rows, hidden_bytes]`, 16-aligned.
    pub recv_x: DeviceBuffer,
    /// `[rows, S]` f32.
    pub recv_x_scales: DeviceBuffer,
    /// `[rows, K]` i64.
    pub recv_topk_idx: DeviceBuffer,
    /// `[rows, K]` f32.
    pub recv_topk_weights: DeviceBuffer,
    /// `[rows]` i32.
    pub recv_src_idx: DeviceBuffer,
    /// The rest.
    pub maps: HtMaps,
}

/// Outputs of [`HtBuffer::combine`].
pub struct HtCombineOutputs {
    /// `[num_tokens, hidden]` bf16.
    pub combined_x: DeviceBuffer,
    /// `[num_tokens, K]` f32 when weights were given.
    pub combined_topk_weights: Option<DeviceBuffer>,
}

/// A cached dispatch's outputs (`src_idx`: `None` = not written) and whether they lie in
/// the heap.
struct Recv<'a> {
    x: &'a DeviceBuffer,
    x_scales: &'a DeviceBuffer,
    src_idx: Option<&'a DeviceBuffer>,
    direct: bool,
}

/// Everything one `ht_dispatch` launch reads and writes.
struct DispatchIo<'a> {
    x: &'a DeviceBuffer,
    hidden_bytes: usize,
    num_tokens: usize,
    x_scales: Option<(&'a DeviceBuffer, usize)>,
    topk: Option<(&'a DeviceBuffer, IndexType, &'a DeviceBuffer, usize)>,
    is_token_in_rank: &'a DeviceBuffer,
    channel_prefix_matrix: &'a DeviceBuffer,
    num_recv_tokens: &'a DeviceBuffer,
    recv_x: &'a DeviceBuffer,
    recv_x_scales: &'a DeviceBuffer,
    recv_topk: Option<(&'a DeviceBuffer, &'a DeviceBuffer)>,
    /// `None`: not written (`dispatch_cached_into`).
    recv_src_idx: Option<&'a DeviceBuffer>,
    send_head: &'a DeviceBuffer,
    /// Written by a full dispatch (`None` for cached ones: the handle has it).
    remote_row0: Option<&'a DeviceBuffer>,
    num_worst_tokens: Option<usize>,
    /// The `recv_*` buffers lie in the heap.
    direct: bool,
}

/// The memory an [`HtBuffer`] lives in, made once (collectively) and laid out for a call's
/// shapes by [`HtBuffer::in_memory`] — again, without allocating, by [`HtBuffer::relayout`].
/// This is how a DeepEP-style `Buffer(num_nvl_bytes)` allocates everything at construction.
pub struct HtMemory {
    /// The rings, counters and mailboxes from offset 0 (zero before they are laid out);
    /// after them, when carved, the heap.
    all: Arc<SymmetricBuffer>,
    /// Bytes the rings may use.
    ring_limit: usize,
    heap: Option<SymHeap>,
    /// For a heap carved from what the first layout leaves (its peer table, made up front).
    heap_table: Option<HostMapped>,
    /// Received-count read-back of exact-size dispatches (room for any expert count).
    host_counts: HostMapped,
}

impl HtMemory {
    /// Collective: `bytes` of symmetric memory on every rank. With `heap_bytes` None the
    /// first layout takes what it needs from the start and the rest becomes the output heap
    /// (DeepEP's `num_nvl_bytes`, spent on the fast path); with `Some(n)` the rings may use
    /// all of `bytes` and a heap of `n` bytes (0: none) is allocated beside.
    pub fn alloc(group: &Group, bytes: usize, heap_bytes: Option<usize>) -> Result<HtMemory> {
        let bytes = bytes.next_multiple_of(256);
        // Before the collective allocations, which end with a barrier (see there).
        let host_counts = group.device().alloc_host_mapped(4 * (1 + MAX_EXPERTS))?;
        let heap_table = match heap_bytes {
            None => Some(group.device().alloc_host_mapped(8 * group.num_ranks())?),
            Some(_) => None,
        };
        let all = Arc::new(group.alloc_symmetric(bytes, Sharing::Auto)?);
        let heap = match heap_bytes {
            Some(n) if n > 0 => Some(SymHeap::new(group, n)?),
            _ => None,
        };
        Ok(HtMemory { all, ring_limit: bytes, heap, heap_table, host_counts })
    }

    /// Most bytes the rings could ever use (moving into the carved heap while it is idle).
    pub fn ring_bytes(&self) -> usize {
        if self.heap_table.is_some() || self.carved() { self.all.len() } else { self.ring_limit }
    }

    /// The output heap, if any.
    pub fn heap(&self) -> Option<&SymHeap> {
        self.heap.as_ref()
    }

    /// Bytes of the output heap (0: none).
    pub fn heap_bytes(&self) -> usize {
        self.heap.as_ref().map_or(0, |h| h.capacity() as usize)
    }

    /// The whole allocation, shared (DeepEP's `get_local_buffer_tensor` views this rank's).
    pub fn shared(&self) -> Arc<SymmetricBuffer> {
        self.all.clone()
    }

    /// Fixes the rings' part for a layout of `ring_bytes` (with as much again to grow into)
    /// and makes the heap of the rest, once.
    fn carve(&mut self, ring_bytes: usize) -> Result<()> {
        let Some(table) = self.heap_table.take() else { return Ok(()) };
        let split = (2 * ring_bytes).next_multiple_of(256).min(self.all.len());
        let rest = self.all.len() - split;
        self.ring_limit = split;
        if rest >= 1 << 20 {
            self.heap = Some(SymHeap::in_buffer(self.all.slice(split, rest, table)?));
        }
        Ok(())
    }

    /// Whether a layout of `ring_bytes` fits, moving the split first when the carved heap
    /// holds no block.
    fn can_fit(&self, ring_bytes: usize) -> bool {
        ring_bytes <= self.ring_limit
            || (self.carved() && ring_bytes <= self.all.len() && self.heap.as_ref().is_none_or(|h| h.is_idle()))
    }

    fn carved(&self) -> bool {
        self.heap_table.is_none() && self.ring_limit < self.all.len()
    }

    /// Room for a layout of `ring_bytes` (`can_fit` said so): moves the split if needed.
    /// Allocates the heap's new peer table then: not while capturing.
    fn make_room(&mut self, group: &Group, ring_bytes: usize) -> Result<()> {
        if ring_bytes <= self.ring_limit {
            return Ok(());
        }
        self.heap = None;
        self.heap_table = Some(group.device().alloc_host_mapped(8 * group.num_ranks())?);
        self.ring_limit = self.all.len();
        self.carve(ring_bytes)
    }

    /// The rings' part (what a relayout zeroes).
    fn rings(&self) -> DeviceBuffer {
        let local = self.all.local();
        // SAFETY: the first `ring_limit` bytes of this rank's allocation, which `self` keeps.
        unsafe { DeviceBuffer::borrowed(local.device(), local.ptr(), self.ring_limit) }
    }
}

/// The communication buffer of HT intranode dispatch/combine (one per rank, collective).
///
/// Drop it on every rank only after all ranks have finished their last op on it (e.g. after
/// a `group.bootstrap().barrier()`): peers write into each other's buffers. After a
/// device-side timeout the rings' counters are out of step; make a new buffer.
pub struct HtBuffer {
    mem: HtMemory,
    layout: HtLayout,
    cfg: HtConfig,
    poison: Option<u8>,
}

impl HtBuffer {
    /// Collective: allocates and shares the buffer for `cfg` across the group's ranks.
    pub fn new(group: &Group, cfg: HtConfig) -> Result<HtBuffer> {
        let cfg = Self::resolve(group, cfg)?;
        let mem = HtMemory::alloc(group, Self::size_hint(group.num_ranks(), &cfg), Some(cfg.heap_bytes))?;
        Self::in_memory(group, cfg, mem)
    }

    /// The buffer for `cfg` in `mem` (zeroed, as it comes from [`HtMemory::alloc`]), with no
    /// allocation or exchange of its own (so also inside a CUDA-graph capture). Every rank
    /// makes the same call. `cfg.heap_bytes` is ignored: the heap is `mem`'s. Too little
    /// memory for `cfg` is an [`Error::InvalidArgument`] that names the bytes needed.
    pub fn in_memory(group: &Group, cfg: HtConfig, mut mem: HtMemory) -> Result<HtBuffer> {
        let mut cfg = Self::resolve(group, cfg)?;
        let layout = Self::layout_for(group.num_ranks(), &cfg);
        Self::check_room(&layout, mem.ring_limit)?;
        mem.carve(layout.total_bytes as usize)?;
        cfg.heap_bytes = mem.heap_bytes();
        Ok(HtBuffer { mem, layout, cfg, poison: None })
    }

    fn check_room(layout: &HtLayout, ring_bytes: usize) -> Result<()> {
        if layout.total_bytes as usize > ring_bytes {
            return Err(Error::invalid(
                "num_nvl_bytes",
                format!("the rings need {} bytes, the buffer has {ring_bytes}", layout.total_bytes),
            ));
        }
        Ok(())
    }

    /// Collective: the same memory laid out for `cfg` instead (other shapes), once every
    /// rank's earlier ops on it are done; blocks of the heap stay valid, handles of earlier
    /// dispatches do not. Synchronises the stream: not while it captures a graph. Too little
    /// memory is an error that leaves the buffer as it was.
    pub fn relayout(&mut self, group: &Group, cfg: HtConfig) -> Result<()> {
        let mut cfg = Self::resolve(group, cfg)?;
        let layout = Self::layout_for(group.num_ranks(), &cfg);
        let need = layout.total_bytes as usize;
        Self::check_room(&layout, self.mem.ring_bytes())?;
        let stream = group.stream();
        stream.synchronize()?; // blocks of earlier calls come back to the heap
        // Decided together (it depends on which heap blocks each rank still holds); also
        // no peer still reads or writes the old layout after this.
        let fits = group.bootstrap().all_gather(&[self.mem.can_fit(need) as u8])?;
        if fits.iter().any(|f| f.first() != Some(&1)) {
            return Err(Error::invalid(
                "num_nvl_bytes",
                format!(
                    "the rings need {need} bytes, {} are free of heap blocks on every rank: drop earlier dispatch outputs first",
                    self.mem.ring_limit
                ),
            ));
        }
        self.mem.make_room(group, need)?;
        self.mem.rings().fill(stream, 0)?;
        group.bootstrap().barrier()?; // every rank's counters are zero before any is used
        cfg.heap_bytes = self.mem.heap_bytes();
        (self.layout, self.cfg) = (layout, cfg);
        Ok(())
    }

    /// The memory (its heap, this rank's whole allocation).
    pub fn memory(&self) -> &HtMemory {
        &self.mem
    }

    /// Bytes of ring memory `cfg` needs on this group (defaults filled in as `new` would).
    pub fn bytes_needed(group: &Group, cfg: &HtConfig) -> Result<usize> {
        Ok(Self::size_hint(group.num_ranks(), &Self::resolve(group, *cfg)?))
    }

    /// `cfg` with its defaults filled in, checked against the group.
    fn resolve(group: &Group, mut cfg: HtConfig) -> Result<HtConfig> {
        let num_ranks = group.num_ranks();
        if num_ranks > MAX_HT_RANKS {
            return Err(Error::Unsupported(format!("{num_ranks} ranks in one NVLink domain (at most {MAX_HT_RANKS})")));
        }
        if cfg.num_experts == 0 || cfg.num_experts > MAX_EXPERTS || !cfg.num_experts.is_multiple_of(num_ranks) {
            return Err(Error::invalid(
                "num_experts",
                format!("{} must be in 1..={MAX_EXPERTS} and a multiple of {num_ranks}", cfg.num_experts),
            ));
        }
        if cfg.hidden == 0 || cfg.hidden > MAX_HIDDEN || !cfg.hidden.is_multiple_of(8) {
            return Err(Error::invalid(
                "hidden",
                format!("{} must be a positive multiple of 8 up to {MAX_HIDDEN}", cfg.hidden),
            ));
        }
        if cfg.num_topk > MAX_TOPK {
            return Err(Error::invalid("num_topk", format!("{} > {MAX_TOPK}", cfg.num_topk)));
        }
        let cpu = group.device().is_cpu();
        let sharing = group.ranks_on_device()?;
        if cfg.num_channels == 0 {
            // 10 (DeepEP's 20 SMs); ranks sharing a GPU split its SMs, as the kernels of all
            // of them must be resident at once (a combine block may take a whole SM).
            let sms = group.device().num_sms()? as usize;
            cfg.num_channels = if cpu { 2 } else { (sms / (2 * sharing)).clamp(1, 10) };
        }
        let max_warps = MAX_HT_BLOCK_WARPS;
        if cfg.warps_per_peer == 0 {
            cfg.warps_per_peer = if cpu { 1 } else { (max_warps / num_ranks).max(1) };
        }
        if cfg.warps_per_peer * num_ranks > max_warps {
            return Err(Error::invalid(
                "warps_per_peer",
                format!("{} x {num_ranks} ranks > {max_warps} warps per block", cfg.warps_per_peer),
            ));
        }
        if cfg.num_slots == 0 {
            cfg.num_slots = if cpu { 16 } else { (128 / cfg.warps_per_peer).max(2 * num_ranks) };
        }
        if cfg.num_slots < 2 * num_ranks {
            return Err(Error::invalid(
                "num_slots",
                format!("{} < {} (two per receiving warp of a channel)", cfg.num_slots, 2 * num_ranks),
            ));
        }
        if cfg.num_channels * cfg.warps_per_peer * num_ranks > 1024 {
            return Err(Error::invalid(
                "num_channels",
                format!(
                    "{} channels x {} warps per peer x {num_ranks} ranks > 1024",
                    cfg.num_channels, cfg.warps_per_peer
                ),
            ));
        }
        Ok(cfg)
    }

    fn layout_for(num_ranks: usize, cfg: &HtConfig) -> HtLayout {
        HtLayout::new(
            num_ranks as u32,
            (cfg.num_channels * cfg.warps_per_peer.max(1)) as u32,
            cfg.num_slots as u32,
            (cfg.num_experts / num_ranks) as u32,
            HtLayout::dispatch_slot_bytes(2 * cfg.hidden as u64, cfg.num_scales as u64, cfg.num_topk as u64),
            HtLayout::combine_slot_bytes(cfg.hidden as u64, cfg.num_topk as u64),
        )
    }

    /// Bytes of the symmetric buffer `cfg` needs on each of `num_ranks` ranks (after defaults
    /// are applied, so pass explicit channels, warps per peer and slots).
    pub fn size_hint(num_ranks: usize, cfg: &HtConfig) -> usize {
        Self::layout_for(num_ranks, cfg).total_bytes as usize
    }

    /// Rings per pair of ranks: `num_channels * warps_per_peer`.
    fn rings(&self) -> usize {
        self.cfg.num_channels * self.cfg.warps_per_peer
    }

    /// Channels of a dispatch's maps (rings per pair of ranks, [`HtHandle::num_channels`]):
    /// `channel_prefix_matrix` is `[R, num_channels + 1]`, `remote_row0` `[R, num_channels]`.
    pub fn num_channels(&self) -> usize {
        self.rings()
    }

    /// The dispatch/combine launch: a sender and a receiver block per channel, a warp per
    /// (ring, peer) in each.
    fn launch_config(&self, num_ranks: usize) -> LaunchConfig {
        let block_dim = 32 * (num_ranks * self.cfg.warps_per_peer) as u32;
        LaunchConfig { grid_dim: 2 * self.cfg.num_channels as u32, block_dim, shared_mem_bytes: 0 }
    }

    /// Fill every dispatch output with `byte` (in stream order, before the kernel) from now
    /// on, or stop (`None`). A test aid: heap blocks are reused, so an earlier call's rows
    /// could otherwise pass for this one's.
    pub fn set_poison(&mut self, byte: Option<u8>) {
        self.poison = byte;
    }

    /// The configuration (defaults filled in).
    pub fn config(&self) -> &HtConfig {
        &self.cfg
    }

    /// Collective: sends every token to every rank that holds one of its experts.
    /// Exact-size mode synchronises once (to size the outputs); with `num_worst_tokens` the
    /// whole op is asynchronous. Device-side errors surface in [`Group::take_device_error`].
    pub fn dispatch(&mut self, group: &Group, a: &HtDispatchArgs) -> Result<HtDispatchOutputs> {
        let num_scales = self.check_dispatch(group, a)?;
        let stream = group.stream();
        if let Some(rows) = a.num_worst_tokens {
            // Before the first kernel: once peers spin in the notify kernel, a driver call
            // that waits for the device (allocation may) would stall this rank's own launch.
            let out = self.alloc_dispatch_buffers(group, a, rows, num_scales)?;
            return self.dispatch_into(group, a, out);
        }
        if stream.capturing() {
            return Err(Error::invalid(
                "num_worst_tokens",
                "exact-size outputs need a host synchronisation, which a CUDA-graph capture can't make: pass num_worst_tokens",
            ));
        }
        let maps = self.alloc_maps(group, a.num_tokens)?;
        self.launch_notify(group, a.layout, a.num_tokens, a.expert_alignment, &maps, true)?;
        stream.synchronize()?;
        group.take_device_error(HT_NOTIFY.name)?;
        let rows = self.mem.host_counts.read::<u32>(0)? as usize;
        let num_local = self.cfg.num_experts / group.num_ranks();
        let per: Vec<i32> =
            (0..num_local).map(|e| self.mem.host_counts.read::<i32>(4 * (1 + e))).collect::<Result<_>>()?;
        let out = self.alloc_rows(group, a, rows, num_scales, maps)?;
        let mut outputs = self.launch_full_dispatch(group, a, out, rows, false)?;
        (outputs.num_recv_tokens, outputs.num_recv_tokens_per_expert_list) = (Some(rows), Some(per));
        Ok(outputs)
    }

    /// [`HtBuffer::dispatch`] with `num_worst_tokens` into the caller's memory: nothing is
    /// allocated, so a CUDA-graph capture of the call owns all of it (the outputs and the
    /// handle's maps live as long as `out`'s memory). Outputs in this buffer's heap
    /// ([`HtBuffer::alloc_output`]) are stored into by the senders directly.
    pub fn dispatch_into(
        &mut self,
        group: &Group,
        a: &HtDispatchArgs,
        out: HtDispatchBuffers,
    ) -> Result<HtDispatchOutputs> {
        let rows = self.check_padded(group, a, &out)?;
        self.launch_notify(group, a.layout, a.num_tokens, a.expert_alignment, &out.maps, false)?;
        self.launch_full_dispatch(group, a, out, rows, true)
    }

    /// Checks a padded dispatch into `out`; returns its rows.
    fn check_padded(&self, group: &Group, a: &HtDispatchArgs, out: &HtDispatchBuffers) -> Result<usize> {
        let num_scales = self.check_dispatch(group, a)?;
        let Some(rows) = a.num_worst_tokens else {
            return Err(Error::invalid("num_worst_tokens", "a dispatch into given buffers writes padded outputs"));
        };
        self.check_buffers(group, a, rows, num_scales, out)?;
        Ok(rows)
    }

    /// Collective: the count exchange of a padded dispatch on its own (NCCL EP's handle
    /// time): fills `maps` for `layout` (`num_tokens` tokens; per-expert counts rounded up to
    /// `expert_alignment`) with what [`HtBuffer::dispatch_notified`] then sends along, any
    /// number of times. Asynchronous.
    pub fn notify(
        &mut self,
        group: &Group,
        layout: &DispatchLayout,
        num_tokens: usize,
        expert_alignment: usize,
        maps: &HtMaps,
    ) -> Result<()> {
        let (t, r, c) = (num_tokens, group.num_ranks(), self.rings());
        if layout.is_token_in_rank.len() < t * r || layout.num_tokens_per_expert.len() < 4 * self.cfg.num_experts {
            return Err(Error::invalid("layout", "does not match num_tokens / num_experts"));
        }
        if expert_alignment == 0 {
            return Err(Error::invalid("expert_alignment", "must be at least 1"));
        }
        let checks: [(&DeviceBuffer, usize, &'static str); 4] = [
            (&maps.num_recv_tokens_per_expert, 4 * (self.cfg.num_experts / r), "num_recv_tokens_per_expert"),
            (&maps.rank_prefix_matrix, 4 * r * r, "rank_prefix_matrix"),
            (&maps.channel_prefix_matrix, 4 * r * (c + 1), "channel_prefix_matrix"),
            (&maps.num_recv_tokens, 4, "num_recv_tokens"),
        ];
        for (buf, bytes, name) in checks {
            if buf.len() < bytes || !buf.ptr().is_multiple_of(4) {
                return Err(Error::invalid(name, format!("{bytes} bytes (4-aligned) needed, got {}", buf.len())));
            }
        }
        self.launch_notify(group, layout, t, expert_alignment, maps, false)
    }

    /// Collective: a padded dispatch (`a.num_worst_tokens` rows) into `out` along the counts
    /// an earlier [`HtBuffer::notify`] of `a.layout` left in `out.maps` (`a.expert_alignment`
    /// as given there). Every rank dispatches after the same notify.
    pub fn dispatch_notified(
        &mut self,
        group: &Group,
        a: &HtDispatchArgs,
        out: HtDispatchBuffers,
    ) -> Result<HtDispatchOutputs> {
        let rows = self.check_padded(group, a, &out)?;
        self.launch_full_dispatch(group, a, out, rows, true)
    }

    /// The maps of a dispatch of `num_tokens` as [`HtBuffer::notify`] and
    /// [`HtBuffer::dispatch_notified`] need them, in one allocation of
    /// [`HtBuffer::maps_bytes`] bytes at `base` (e.g. a caller's handle memory).
    ///
    /// # Safety
    /// `base` is device memory of this buffer's device, 16-aligned, at least
    /// `maps_bytes(group, num_tokens)` long, valid while the maps (and handles made from them)
    /// are used.
    pub unsafe fn maps_at(&self, group: &Group, base: u64, num_tokens: usize) -> HtMaps {
        let (r, c, l) = (group.num_ranks(), self.rings(), self.cfg.num_experts / group.num_ranks());
        let sizes = Self::maps_sizes(r, c, l, num_tokens);
        let mut at = base;
        let mut next = |bytes: usize| {
            // SAFETY: the caller's region holds all of them (maps_bytes sums these sizes).
            let b = unsafe { DeviceBuffer::borrowed(group.device(), at, bytes) };
            at += bytes.next_multiple_of(16) as u64;
            b
        };
        HtMaps {
            num_recv_tokens_per_expert: next(sizes[0]),
            rank_prefix_matrix: next(sizes[1]),
            channel_prefix_matrix: next(sizes[2]),
            num_recv_tokens: next(sizes[3]),
            remote_row0: next(sizes[4]),
            send_head: next(sizes[5]),
            is_token_in_rank: next(sizes[6]),
        }
    }

    /// Bytes of [`HtBuffer::maps_at`]'s region for `num_tokens` tokens.
    pub fn maps_bytes(&self, group: &Group, num_tokens: usize) -> usize {
        let (r, l) = (group.num_ranks(), self.cfg.num_experts / group.num_ranks());
        Self::maps_sizes(r, self.rings(), l, num_tokens).iter().map(|b| b.next_multiple_of(16)).sum()
    }

    /// Sizes of the maps in [`HtMaps`] order.
    fn maps_sizes(r: usize, c: usize, l: usize, t: usize) -> [usize; 7] {
        [4 * l, 4 * r * r, 4 * r * (c + 1), 4, 4 * r * c, (4 * t * r).max(4), (t * r).max(1)]
    }

    /// Checks a dispatch's inputs; returns the scale count.
    fn check_dispatch(&self, group: &Group, a: &HtDispatchArgs) -> Result<usize> {
        let (t, num_ranks) = (a.num_tokens, group.num_ranks());
        let num_scales = self.check_x(a.x, a.hidden_bytes, t, a.x_scales)?;
        let num_topk = a.topk.map_or(0, |(_, _, _, k)| k);
        if num_topk > self.cfg.num_topk {
            return Err(Error::invalid("topk_idx", format!("top-{num_topk} > the buffer's {}", self.cfg.num_topk)));
        }
        if let Some((idx, ty, w, k)) = a.topk
            && (idx.len() < t * k * ty.bytes() || w.len() < t * k * 4)
        {
            return Err(Error::invalid("topk_idx", format!("[{t}, {k}] topk_idx/topk_weights are too small")));
        }
        if a.layout.is_token_in_rank.len() < t * num_ranks
            || a.layout.num_tokens_per_expert.len() < 4 * self.cfg.num_experts
        {
            return Err(Error::invalid("layout", "does not match num_tokens / num_experts"));
        }
        if a.expert_alignment == 0 {
            return Err(Error::invalid("expert_alignment", "must be at least 1"));
        }
        Ok(num_scales)
    }

    /// Checks the sizes and alignment of a [`HtBuffer::dispatch_into`]'s memory.
    fn check_buffers(
        &self,
        group: &Group,
        a: &HtDispatchArgs,
        rows: usize,
        num_scales: usize,
        out: &HtDispatchBuffers,
    ) -> Result<()> {
        let (t, r, c) = (a.num_tokens, group.num_ranks(), self.rings());
        let k = a.topk.map_or(0, |(_, _, _, k)| k);
        let m = &out.maps;
        let checks: [(&DeviceBuffer, usize, u64, &'static str, bool); 12] = [
            (&out.recv_x, rows * a.hidden_bytes, 16, "recv_x", true),
            (&out.recv_x_scales, rows * num_scales * 4, 4, "recv_x_scales", num_scales > 0),
            (&out.recv_topk_idx, rows * k * 8, 8, "recv_topk_idx", k > 0),
            (&out.recv_topk_weights, rows * k * 4, 4, "recv_topk_weights", k > 0),
            (&out.recv_src_idx, rows * 4, 4, "recv_src_idx", true),
            (&m.num_recv_tokens_per_expert, 4 * (self.cfg.num_experts / r), 4, "num_recv_tokens_per_expert", true),
            (&m.rank_prefix_matrix, 4 * r * r, 4, "rank_prefix_matrix", true),
            (&m.channel_prefix_matrix, 4 * r * (c + 1), 4, "channel_prefix_matrix", true),
            (&m.num_recv_tokens, 4, 4, "num_recv_tokens", true),
            (&m.remote_row0, 4 * r * c, 4, "remote_row0", true),
            (&m.send_head, 4 * t * r, 4, "send_head", true),
            (&m.is_token_in_rank, t * r, 1, "is_token_in_rank", true),
        ];
        for (buf, bytes, align, name, used) in checks {
            if used && (buf.len() < bytes || !buf.ptr().is_multiple_of(align)) {
                return Err(Error::invalid(name, format!("{bytes} bytes ({align}-aligned) needed, got {}", buf.len())));
            }
        }
        Ok(())
    }

    /// The handle's maps of a dispatch of `num_tokens`, from the stream's pool.
    pub fn alloc_maps(&self, group: &Group, num_tokens: usize) -> Result<HtMaps> {
        let (stream, r, c) = (group.stream(), group.num_ranks(), self.rings());
        Ok(HtMaps {
            num_recv_tokens_per_expert: stream.alloc(4 * (self.cfg.num_experts / r))?,
            rank_prefix_matrix: stream.alloc(4 * r * r)?,
            channel_prefix_matrix: stream.alloc(4 * r * (c + 1))?,
            num_recv_tokens: stream.alloc(4)?,
            remote_row0: stream.alloc(4 * r * c)?,
            send_head: stream.alloc_uninit((num_tokens * r * 4).max(4))?,
            is_token_in_rank: stream.alloc_uninit((num_tokens * r).max(1))?,
        })
    }

    /// The row outputs of a dispatch (from the heap when they all fit) beside `maps`.
    fn alloc_rows(
        &self,
        group: &Group,
        a: &HtDispatchArgs,
        rows: usize,
        num_scales: usize,
        maps: HtMaps,
    ) -> Result<HtDispatchBuffers> {
        let k = a.topk.map_or(0, |(_, _, _, k)| k);
        let sizes = [rows * a.hidden_bytes, rows * num_scales * 4, rows * k * 8, rows * k * 4, rows * 4];
        let ([recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx], _) =
            self.alloc_recv(group.stream(), sizes)?;
        Ok(HtDispatchBuffers { recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, maps })
    }

    /// Everything a padded dispatch writes.
    fn alloc_dispatch_buffers(
        &self,
        group: &Group,
        a: &HtDispatchArgs,
        rows: usize,
        num_scales: usize,
    ) -> Result<HtDispatchBuffers> {
        let maps = self.alloc_maps(group, a.num_tokens)?;
        self.alloc_rows(group, a, rows, num_scales, maps)
    }

    /// The count exchange of a dispatch into `maps` (and, `exact`, the host's copy).
    fn launch_notify(
        &mut self,
        group: &Group,
        layout: &DispatchLayout,
        num_tokens: usize,
        expert_alignment: usize,
        maps: &HtMaps,
        exact: bool,
    ) -> Result<()> {
        let num_ranks = group.num_ranks();
        let notify = HtNotifyParams {
            peer_bases: self.mem.all.peer_table_ptr(),
            num_tokens_per_rank: layout.num_tokens_per_rank.ptr(),
            num_tokens_per_expert: layout.num_tokens_per_expert.ptr(),
            is_token_in_rank: layout.is_token_in_rank.ptr(),
            rank_prefix_matrix: maps.rank_prefix_matrix.ptr(),
            channel_prefix_matrix: maps.channel_prefix_matrix.ptr(),
            num_recv_tokens_per_expert: maps.num_recv_tokens_per_expert.ptr(),
            num_recv_tokens: maps.num_recv_tokens.ptr(),
            host_counts: if exact { self.mem.host_counts.device_ptr() } else { 0 },
            error: group.error_ptr(),
            epoch: 0, // the kernel's (HtLayout::epochs)
            timeout_ns: group.timeout_ns(),
            num_tokens: num_tokens as u32,
            num_experts: self.cfg.num_experts as u32,
            num_channels: self.rings() as u32,
            expert_alignment: expert_alignment as u32,
            rank: group.rank() as u32,
            num_ranks: num_ranks as u32,
        };
        let block_dim = group.device().block_dim(256).max(32 * num_ranks as u32);
        // SAFETY: every region comes from the layout the buffer was sized with; the maps
        // hold the documented shapes (allocated or checked).
        unsafe {
            group.stream().launch(&HT_NOTIFY, LaunchConfig { grid_dim: 1, block_dim, shared_mem_bytes: 0 }, notify)
        }
    }

    /// The `ht_dispatch` of a full (not cached) dispatch into `out`, after its notify.
    fn launch_full_dispatch(
        &mut self,
        group: &Group,
        a: &HtDispatchArgs,
        out: HtDispatchBuffers,
        rows: usize,
        padded: bool,
    ) -> Result<HtDispatchOutputs> {
        let (t, stream) = (a.num_tokens, group.stream());
        let HtDispatchBuffers { recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, maps } = out;
        if t > 0 {
            maps.is_token_in_rank.copy_from_async(stream, &a.layout.is_token_in_rank, t * group.num_ranks())?;
        }
        let num_scales = a.x_scales.map_or(0, |(_, n)| n);
        let with_topk = a.topk.is_some();
        let direct = self.in_heap(&recv_x)
            && (num_scales == 0 || self.in_heap(&recv_x_scales))
            && (!with_topk || (self.in_heap(&recv_topk_idx) && self.in_heap(&recv_topk_weights)))
            && self.in_heap(&recv_src_idx);
        let io = DispatchIo {
            x: a.x,
            hidden_bytes: a.hidden_bytes,
            num_tokens: t,
            x_scales: a.x_scales,
            topk: a.topk,
            is_token_in_rank: &a.layout.is_token_in_rank,
            channel_prefix_matrix: &maps.channel_prefix_matrix,
            num_recv_tokens: &maps.num_recv_tokens,
            recv_x: &recv_x,
            recv_x_scales: &recv_x_scales,
            recv_topk: Some((&recv_topk_idx, &recv_topk_weights)),
            recv_src_idx: Some(&recv_src_idx),
            send_head: &maps.send_head,
            remote_row0: Some(&maps.remote_row0),
            num_worst_tokens: padded.then_some(rows),
            direct,
        };
        self.launch_dispatch(group, &io)?;
        let HtMaps {
            num_recv_tokens_per_expert,
            rank_prefix_matrix,
            channel_prefix_matrix,
            num_recv_tokens,
            remote_row0,
            send_head,
            is_token_in_rank,
        } = maps;
        let handle = HtHandle {
            rank_prefix_matrix,
            channel_prefix_matrix,
            is_token_in_rank,
            send_head,
            num_tokens: t,
            num_rows: rows,
            num_recv_tokens,
            padded,
            remote_row0,
            num_channels: self.rings(),
        };
        Ok(HtDispatchOutputs {
            recv_x,
            recv_x_scales,
            recv_topk_idx,
            recv_topk_weights,
            recv_src_idx,
            num_recv_tokens_per_expert,
            num_recv_tokens_per_expert_list: None,
            num_recv_tokens: None,
            handle,
            one_pass: direct,
        })
    }

    /// The receive buffers of one dispatch, `sizes` bytes each (at least 16): from the heap
    /// when all of them fit (senders then store into them directly), else from the stream's
    /// pool. True for the heap.
    fn alloc_recv<const N: usize>(&self, stream: &Stream, sizes: [usize; N]) -> Result<([DeviceBuffer; N], bool)> {
        if let Some(heap) = &self.mem.heap {
            // Waiting for blocks still in use keeps a host that runs ahead on the fast path;
            // a graph being captured can't wait (its blocks are taken once, at capture).
            let capturing = stream.capturing();
            let take = |b: usize| if capturing { heap.alloc(stream, b) } else { heap.alloc_waiting(stream, b) };
            let blocks: Vec<DeviceBuffer> = sizes.iter().map_while(|&b| take(b.max(16))).collect();
            if let Ok(blocks) = <[DeviceBuffer; N]>::try_from(blocks) {
                return Ok((blocks, true));
            }
        }
        let mut blocks = Vec::with_capacity(N);
        for b in sizes {
            blocks.push(stream.alloc_uninit(b.max(16))?);
        }
        match <[DeviceBuffer; N]>::try_from(blocks) {
            Ok(blocks) => Ok((blocks, false)),
            Err(_) => Err(Error::invalid("sizes", "internal: wrong buffer count")),
        }
    }

    /// Collective: a dispatch that reuses `handle`'s layout (DeepEP's cached mode): no count
    /// exchange and no host synchronisation. Moves `x` (and its scales) along the same routes,
    /// into `[handle.num_rows, hidden_bytes]` (padding rows, if any, untouched). This is also
    /// the backward pass of a combine.
    pub fn dispatch_cached(
        &mut self,
        group: &Group,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
    ) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let num_scales = self.check_cached(handle, x, hidden_bytes, x_scales)?;
        let stream = group.stream();
        let rows = handle.num_rows;
        let ([recv_x, recv_x_scales, recv_src_idx], direct) =
            self.alloc_recv(stream, [rows * hidden_bytes, rows * num_scales * 4, rows * 4])?;
        let recv = Recv { x: &recv_x, x_scales: &recv_x_scales, src_idx: Some(&recv_src_idx), direct };
        self.launch_cached(group, handle, x, hidden_bytes, x_scales, recv)?;
        Ok((recv_x, recv_x_scales))
    }

    /// [`HtBuffer::dispatch_cached`] into the caller's `recv_x` (`[handle.num_rows,
    /// hidden_bytes]`) and `recv_x_scales` (`[handle.num_rows, num_scales]` f32, with
    /// `x_scales`), e.g. buffers reused call after call. When they lie in this buffer's
    /// heap ([`HtBuffer::alloc_output`]), senders store into them directly (one pass).
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_cached_into(
        &mut self,
        group: &Group,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
        recv_x: &DeviceBuffer,
        recv_x_scales: Option<&DeviceBuffer>,
    ) -> Result<()> {
        let num_scales = self.check_cached(handle, x, hidden_bytes, x_scales)?;
        let rows = handle.num_rows;
        if recv_x.len() < rows * hidden_bytes || !recv_x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("recv_x", format!("[{rows}, {hidden_bytes}] bytes (16-aligned) needed")));
        }
        let recv_x_scales = match (num_scales, recv_x_scales) {
            (0, _) => recv_x, // not written
            (_, Some(s)) if s.len() >= rows * num_scales * 4 && s.ptr().is_multiple_of(4) => s,
            _ => return Err(Error::invalid("recv_x_scales", format!("[{rows}, {num_scales}] f32 needed"))),
        };
        let direct = self.in_heap(recv_x) && (num_scales == 0 || self.in_heap(recv_x_scales));
        let recv = Recv { x: recv_x, x_scales: recv_x_scales, src_idx: None, direct };
        self.launch_cached(group, handle, x, hidden_bytes, x_scales, recv)
    }

    /// A cached dispatch along `handle`'s routes into `recv`.
    fn launch_cached(
        &mut self,
        group: &Group,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
        recv: Recv,
    ) -> Result<()> {
        let (t, num_ranks) = (handle.num_tokens, group.num_ranks());
        let send_head = group.stream().alloc_uninit((t * num_ranks * 4).max(4))?;
        let io = DispatchIo {
            x,
            hidden_bytes,
            num_tokens: t,
            x_scales,
            topk: None,
            is_token_in_rank: &handle.is_token_in_rank,
            channel_prefix_matrix: &handle.channel_prefix_matrix,
            num_recv_tokens: &handle.num_recv_tokens,
            recv_x: recv.x,
            recv_x_scales: recv.x_scales,
            recv_topk: None,
            recv_src_idx: recv.src_idx,
            send_head: &send_head,
            remote_row0: None,
            num_worst_tokens: handle.padded.then_some(handle.num_rows),
            direct: recv.direct,
        };
        self.launch_dispatch(group, &io)
    }

    /// A buffer of `bytes` from this buffer's heap (`None` without a heap or when it is
    /// full), for [`HtBuffer::dispatch_cached_into`]. Freed in stream order when dropped.
    pub fn alloc_output(&self, group: &Group, bytes: usize) -> Option<DeviceBuffer> {
        self.mem.heap.as_ref()?.alloc(group.stream(), bytes)
    }

    /// Whether all of `b` lies in this buffer's heap (peers can address it).
    fn in_heap(&self, b: &DeviceBuffer) -> bool {
        self.mem.heap.as_ref().is_some_and(|h| h.contains(b))
    }

    /// The output heap (`HtConfig::heap_bytes > 0`).
    pub fn heap(&self) -> Option<&SymHeap> {
        self.mem.heap.as_ref()
    }

    /// Checks a cached dispatch's handle and inputs; returns the scale count.
    fn check_cached(
        &self,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
    ) -> Result<usize> {
        if handle.num_channels != self.rings() {
            return Err(Error::invalid("handle", "comes from a buffer with another channel count"));
        }
        self.check_x(x, hidden_bytes, handle.num_tokens, x_scales)
    }

    /// Checks `x` (`[num_tokens, hidden_bytes]`) and its scales; returns the scale count.
    fn check_x(
        &self,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        num_tokens: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
    ) -> Result<usize> {
        let (t, hb) = (num_tokens, hidden_bytes);
        if hb == 0 || !hb.is_multiple_of(16) || hb > 2 * self.cfg.hidden {
            return Err(Error::invalid(
                "hidden_bytes",
                format!("{hb} must be a positive multiple of 16 up to {}", 2 * self.cfg.hidden),
            ));
        }
        if x.len() < t * hb || !x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("x", format!("{} bytes (16-aligned) needed, got {}", t * hb, x.len())));
        }
        let num_scales = x_scales.map_or(0, |(_, s)| s);
        if num_scales > self.cfg.num_scales {
            return Err(Error::invalid("x_scales", format!("{num_scales} scales per token > {}", self.cfg.num_scales)));
        }
        if let Some((s, n)) = x_scales
            && s.len() < t * n * 4
        {
            return Err(Error::invalid("x_scales", format!("[{t}, {n}] f32 needs {} bytes", t * n * 4)));
        }
        Ok(num_scales)
    }

    fn launch_dispatch(&mut self, group: &Group, io: &DispatchIo) -> Result<()> {
        let num_ranks = group.num_ranks();
        if let Some(byte) = self.poison {
            let topk = io.recv_topk.into_iter().flat_map(|(i, w)| [i, w]);
            for b in [io.recv_x, io.recv_x_scales].into_iter().chain(io.recv_src_idx).chain(topk) {
                b.fill_async(group.stream(), byte)?;
            }
        }
        let c = self.rings();
        let params = HtDispatchParams {
            peer_bases: self.mem.all.peer_table_ptr(),
            x: io.x.ptr(),
            x_scales: io.x_scales.map_or(0, |(s, _)| s.ptr()),
            topk_idx: io.topk.map_or(0, |(i, _, _, _)| i.ptr()),
            topk_weights: io.topk.map_or(0, |(_, _, w, _)| w.ptr()),
            is_token_in_rank: io.is_token_in_rank.ptr(),
            channel_prefix_matrix: io.channel_prefix_matrix.ptr(),
            num_recv_tokens: io.num_recv_tokens.ptr(),
            recv_x: io.recv_x.ptr(),
            // 0 without scales: an unused buffer may lie outside the heap (kernels take offsets).
            recv_x_scales: if io.x_scales.is_some() { io.recv_x_scales.ptr() } else { 0 },
            recv_topk_idx: io.recv_topk.map_or(0, |(i, _)| i.ptr()),
            recv_topk_weights: io.recv_topk.map_or(0, |(_, w)| w.ptr()),
            recv_src_idx: io.recv_src_idx.map_or(0, |b| b.ptr()),
            send_head: io.send_head.ptr(),
            error: group.error_ptr(),
            heap_bases: self.mem.heap.as_ref().map_or(0, |h| h.peer_table_ptr()),
            epoch: 0, // the kernel's (HtLayout::epochs)
            remote_row0: io.remote_row0.map_or(0, |b| b.ptr()),
            timeout_ns: group.timeout_ns(),
            hidden_bytes: io.hidden_bytes as u64,
            slot_bytes: self.layout.dispatch_slot_bytes,
            num_tokens: io.num_tokens as u32,
            num_scales: io.x_scales.map_or(0, |(_, n)| n as u32),
            num_topk: io.topk.map_or(0, |(_, _, _, k)| k as u32),
            idx_bytes: io.topk.map_or(8, |(_, ty, _, _)| ty.bytes() as u32),
            num_experts: self.cfg.num_experts as u32,
            num_slots: self.cfg.num_slots as u32,
            num_worst_tokens: io.num_worst_tokens.unwrap_or(0) as u32,
            rank: group.rank() as u32,
            num_ranks: num_ranks as u32,
            num_channels: c as u32,
            num_local_experts: (self.cfg.num_experts / num_ranks) as u32,
            direct: io.direct as u32,
        };
        let cfg = self.launch_config(num_ranks);
        // SAFETY: every buffer in `io` was checked or allocated with the documented shape; the
        // rings are the ones this buffer was sized for.
        unsafe { group.stream().launch(&HT_DISPATCH, cfg, params) }
    }

    /// Collective: returns every received row to its source and sums each token's copies
    /// (bf16 `x [handle.num_rows, hidden]`, f32 accumulation in rank order after the bias).
    /// Asynchronous; device-side errors surface in [`Group::take_device_error`].
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &mut self,
        group: &Group,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden: usize,
        topk_weights: Option<(&DeviceBuffer, usize)>,
        bias: [Option<&DeviceBuffer>; 2],
    ) -> Result<HtCombineOutputs> {
        self.check_combine(handle, x, hidden, topk_weights, bias)?;
        let t = handle.num_tokens;
        let stream = group.stream();
        let out = HtCombineOutputs {
            combined_x: stream.alloc_uninit((t * hidden * 2).max(16))?,
            combined_topk_weights: match topk_weights {
                Some((_, k)) => Some(stream.alloc_uninit((t * k * 4).max(4))?),
                None => None,
            },
        };
        self.combine_into(group, handle, x, hidden, topk_weights, bias, out)
    }

    /// [`HtBuffer::combine`] into the caller's `out` (`combined_x [T, hidden]` bf16,
    /// `combined_topk_weights [T, K]` f32 with weights): nothing is allocated, so a CUDA-graph
    /// capture of the call owns all its memory.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_into(
        &mut self,
        group: &Group,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden: usize,
        topk_weights: Option<(&DeviceBuffer, usize)>,
        bias: [Option<&DeviceBuffer>; 2],
        out: HtCombineOutputs,
    ) -> Result<HtCombineOutputs> {
        self.check_combine(handle, x, hidden, topk_weights, bias)?;
        let (t, num_ranks) = (handle.num_tokens, group.num_ranks());
        let num_topk = topk_weights.map_or(0, |(_, k)| k);
        let HtCombineOutputs { combined_x, combined_topk_weights } = out;
        if combined_x.len() < t * hidden * 2 || !combined_x.ptr().is_multiple_of(16) {
            return Err(Error::invalid("combined_x", format!("[{t}, {hidden}] bf16 (16-aligned) needed")));
        }
        let combined_topk_weights = match (topk_weights, combined_topk_weights) {
            (None, _) => None,
            (Some(_), Some(w)) if w.len() >= t * num_topk * 4 && w.ptr().is_multiple_of(4) => Some(w),
            (Some(_), _) => {
                return Err(Error::invalid("combined_topk_weights", format!("[{t}, {num_topk}] f32 needed")));
            }
        };
        let c = self.rings();
        // Peers pull straight from `x` (and the weights) when they lie in the heap on every
        // rank (decided on the device); otherwise rows go back through the rings.
        let pull = self.in_heap(x) && topk_weights.is_none_or(|(w, _)| self.in_heap(w));
        let params = HtCombineParams {
            peer_bases: self.mem.all.peer_table_ptr(),
            x: x.ptr(),
            topk_weights: topk_weights.map_or(0, |(w, _)| w.ptr()),
            bias_0: bias[0].map_or(0, |b| b.ptr()),
            bias_1: bias[1].map_or(0, |b| b.ptr()),
            is_token_in_rank: handle.is_token_in_rank.ptr(),
            channel_prefix_matrix: handle.channel_prefix_matrix.ptr(),
            send_head: handle.send_head.ptr(),
            combined_x: combined_x.ptr(),
            combined_topk_weights: combined_topk_weights.as_ref().map_or(0, |b| b.ptr()),
            error: group.error_ptr(),
            heap_bases: self.mem.heap.as_ref().map_or(0, |h| h.peer_table_ptr()),
            remote_row0: handle.remote_row0.ptr(),
            epoch: 0, // the kernel's (HtLayout::epochs)
            timeout_ns: group.timeout_ns(),
            slot_bytes: self.layout.combine_slot_bytes,
            dispatch_slot_bytes: self.layout.dispatch_slot_bytes,
            num_tokens: t as u32,
            hidden: hidden as u32,
            num_topk: num_topk as u32,
            num_slots: self.cfg.num_slots as u32,
            rank: group.rank() as u32,
            num_ranks: num_ranks as u32,
            num_channels: c as u32,
            num_local_experts: (self.cfg.num_experts / num_ranks) as u32,
            pull: pull as u32,
            reserved: 0,
        };
        let cfg = self.launch_config(num_ranks);
        // SAFETY: the handle's maps come from the matching dispatch; sizes checked above.
        unsafe { group.stream().launch(&HT_COMBINE, cfg, params)? };
        Ok(HtCombineOutputs { combined_x, combined_topk_weights })
    }

    /// Checks a combine's inputs.
    fn check_combine(
        &self,
        handle: &HtHandle,
        x: &DeviceBuffer,
        hidden: usize,
        topk_weights: Option<(&DeviceBuffer, usize)>,
        bias: [Option<&DeviceBuffer>; 2],
    ) -> Result<()> {
        if hidden == 0 || !hidden.is_multiple_of(8) || hidden > self.cfg.hidden {
            return Err(Error::invalid(
                "hidden",
                format!("{hidden} must be a positive multiple of 8 up to {}", self.cfg.hidden),
            ));
        }
        if handle.num_channels != self.rings() {
            return Err(Error::invalid("handle", "comes from a buffer with another channel count"));
        }
        if x.len() < handle.num_rows * hidden * 2 {
            return Err(Error::invalid("x", format!("[{}, {hidden}] bf16 needed", handle.num_rows)));
        }
        let num_topk = topk_weights.map_or(0, |(_, k)| k);
        if num_topk > self.cfg.num_topk {
            return Err(Error::invalid("topk_weights", format!("top-{num_topk} > {}", self.cfg.num_topk)));
        }
        if let Some((w, k)) = topk_weights
            && w.len() < handle.num_rows * k * 4
        {
            return Err(Error::invalid("topk_weights", "too small"));
        }
        for b in bias.iter().flatten() {
            if b.len() < handle.num_tokens * hidden * 2 {
                return Err(Error::invalid("bias", format!("[{}, {hidden}] bf16 needed", handle.num_tokens)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The HT kernels are compiled for the block size the host may launch (xtask's ptx step
    /// writes `.maxntid`; a larger block would fail for lack of registers).
    #[test]
    fn shipped_ptx_bounds_ht_blocks_at_the_host_limit() {
        let want = format!(".maxntid {}, 1, 1", 32 * crate::limits::MAX_HT_BLOCK_WARPS);
        for kernel in [super::HT_DISPATCH.symbol, super::HT_COMBINE.symbol] {
            let entry = crate::device::PTX.find(&format!(".entry {kernel}(")).expect("kernel in the PTX");
            let params_end = entry + crate::device::PTX[entry..].find("\n)\n").expect("parameter list") + 3;
            let next = crate::device::PTX[params_end..].lines().next();
            assert_eq!(next, Some(want.as_str()), "{kernel}");
        }
    }
}
