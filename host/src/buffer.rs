//! One rank's expert-parallel session, what every interface (Python's `moe_ep.Buffer`, the C
//! ABI, Rust programs) drives: DeepEP's `Buffer` semantics over [`HtBuffer`] and [`LlBuffer`].
//!
//! * Memory is allocated when the [`Buffer`] is made (collectively), as DeepEP's is: HT gets
//!   `nvl_bytes`, LL `rdma_bytes`. Each mode is laid out in its memory at its first call for
//!   that call's shapes, and laid out again (collectively, without allocating) when a later
//!   call needs larger ones; handles carry the generation of the layout they were made with
//!   and are refused after a relayout.
//! * Every op runs on the rank's own stream (DeepEP's comm stream), ordered after the caller's
//!   stream or an event ([`CallStream`]); then the caller's stream waits for it, or, with
//!   `async_finish`, the op returns an event to wait on later.
//! * Outputs are [`Output`]s: memory that stays valid while referenced and is released only
//!   after the caller's stream is done with it (what torch's `record_stream` does for DeepEP).
//!
//! ```
//! use moe_ep::buffer::{Buffer, BufferConfig, CallStream, LayoutCall};
//! use moe_ep::layout::IndexType;
//! use moe_ep::{Device, Group};
//!
//! let groups = Group::in_process(&vec![Device::cpu(); 2])?;
//! std::thread::scope(|s| -> moe_ep::Result<()> {
//!     let ranks: Vec<_> = groups
//!         .into_iter()
//!         .map(|group| {
//!             s.spawn(move || -> moe_ep::Result<Vec<i32>> {
//!                 let buffer = Buffer::new(group, BufferConfig { nvl_bytes: 8 << 20, heap_bytes: None, rdma_bytes: 0 })?;
//!                 let dev = buffer.group().device();
//!                 let topk_idx = dev.alloc(4 * 8)?; // 4 tokens, top-2, int32
//!                 topk_idx.write(buffer.group().stream(), 0, &[0i32, 1, 2, 3, 0, 3, 1, 2])?;
//!                 let call = LayoutCall { topk_idx: &topk_idx, index_type: IndexType::I32, num_tokens: 4, num_topk: 2, num_experts: 4 };
//!                 let (layout, _) = buffer.layout(&CallStream::default(), &call, None)?;
//!                 layout.expect("outputs").num_tokens_per_rank.to_vec(buffer.group())
//!             })
//!         })
//!         .collect();
//!     for rank in ranks {
//!         // token 0 goes to rank 0 only, token 1 to rank 1 only, tokens 2 and 3 to both
//!         assert_eq!(rank.join().expect("a rank panicked")?, vec![3, 3]);
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), moe_ep::Error>(())
//! ```

use crate::group::{Sharing, SymmetricBuffer};
use crate::intranode::{
    HtBuffer, HtCombineOutputs, HtConfig, HtDispatchArgs, HtDispatchBuffers, HtDispatchOutputs, HtHandle, HtMaps,
    HtMemory,
};
use crate::layout::{DispatchLayout, IndexType, drop_overflow, get_dispatch_layout, get_dispatch_layout_into};
use crate::limits::MAX_TOPK;
use crate::low_latency::{
    LlBuffer, LlCombineOutputs, LlConfig, LlDispatchOptions, LlDispatchOutputs, LlRankMajorInput, LlRankMajorOutputs,
    LlStats, copy_counted_rows, scales_token_major,
};
use crate::{DeviceBuffer, Error, Event, Group, Result, Stream};
use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

/// The memory of a [`Buffer`], allocated when it is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct BufferConfig {
    /// HT memory (DeepEP's `num_nvl_bytes`; 0 = no HT). The rings take what the first call's
    /// shapes need and the rest is the output heap, unless `heap_bytes` is given.
    pub nvl_bytes: usize,
    /// A heap of its own (0 = none) beside rings that may use all of `nvl_bytes`.
    pub heap_bytes: Option<usize>,
    /// LL memory (DeepEP's `num_rdma_bytes`; 0 = no LL): [`LlBuffer::size_hint`].
    pub rdma_bytes: usize,
}

/// The caller's side of an op: the stream it runs after and waits for it (`caller`, None on
/// the CPU back end or for the legacy default stream's semantics of "nothing to order"), an
/// event to run after instead (`previous`), and whether to return an event instead of making
/// the caller wait (`async_finish`).
#[derive(Clone, Default)]
pub struct CallStream {
    /// The caller's stream.
    pub caller: Option<Arc<Stream>>,
    /// Run after this event instead of after `caller`'s current work.
    pub previous: Option<Arc<Event>>,
    /// Return an event (the caller waits for it later) instead of making `caller` wait.
    pub async_finish: bool,
}

impl CallStream {
    /// Ops ordered after `caller`'s work so far, and `caller` after them.
    pub fn on(caller: Arc<Stream>) -> CallStream {
        CallStream { caller: Some(caller), ..CallStream::default() }
    }

    fn capturing(&self) -> bool {
        self.caller.as_ref().is_some_and(|s| s.capturing())
    }
}

/// Holds an output's memory; on drop, first makes the rank's stream wait for the stream that
/// consumed the output (so a stream-ordered free on the rank's stream can't overtake the
/// consumer's reads), then frees.
struct Guarded<T> {
    value: Option<T>,
    release_after: Option<(Arc<Stream>, Arc<Group>)>,
}

impl<T> Guarded<T> {
    fn value(&self) -> Result<&T> {
        self.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        // While the consumer captures a graph, its work runs only at replays: there is
        // nothing to wait for now (and a wait would pull the rank's stream into the capture).
        if let Some((consumer, group)) = &self.release_after
            && !consumer.capturing()
            && let Ok(ev) = consumer.record_event()
        {
            // Errors here can't be reported (a destructor); the driver keeps its state.
            let _ = group.stream().wait_event(&ev);
        }
        drop(self.value.take());
    }
}

type Owner = Arc<dyn Any + Send + Sync>;

/// Memory an op returns (device memory, or host memory on the CPU back end): valid while this
/// value (or a clone) lives; released after the stream of the call that made it is done.
#[derive(Clone)]
pub struct Output {
    _owner: Owner,
    ptr: u64,
    len: usize,
}

impl Output {
    /// Address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first `len / size_of::<T>()` elements to the host (waits for `stream`).
    pub fn to_vec<T: bytemuck::Pod + Default>(&self, group: &Group) -> Result<Vec<T>> {
        // SAFETY: the memory is this output's, alive while `self` is.
        let view = unsafe { DeviceBuffer::borrowed(group.device(), self.ptr, self.len) };
        view.to_vec(group.stream())
    }
}

/// The state of the HT and LL buffers.
struct State {
    /// HT memory not laid out yet.
    ht_mem: Option<HtMemory>,
    ht: Option<HtBuffer>,
    ht_generation: u64,
    /// LL memory not laid out yet.
    ll_mem: Option<Arc<SymmetricBuffer>>,
    ll: Option<LlBuffer>,
    ll_generation: u64,
    config: BufferConfig,
}

impl State {
    /// HT's memory, laid out or not.
    fn ht_memory(&self) -> Option<&HtMemory> {
        self.ht.as_ref().map(|b| b.memory()).or(self.ht_mem.as_ref())
    }

    /// LL's memory, laid out or not.
    fn ll_memory(&self) -> Option<&Arc<SymmetricBuffer>> {
        self.ll.as_ref().map(|b| b.memory()).or(self.ll_mem.as_ref())
    }
}

/// One rank's communication buffers (DeepEP's `Buffer`): see the module docs. Calls are
/// collective (every rank makes the same ones, in the same order); a rank's calls may come
/// from any thread, one at a time.
pub struct Buffer {
    group: Arc<Group>,
    state: Mutex<State>,
}

/// The handle of an HT dispatch: pass it to [`Buffer::ht_combine`] or a cached dispatch.
#[derive(Clone)]
pub struct HtDispatchHandle {
    inner: Arc<Guarded<HtHandle>>,
    generation: u64,
    /// Rows of the dispatch outputs (the exact count, or `num_worst_tokens`).
    pub num_rows: usize,
    /// Tokens of this rank.
    pub num_tokens: usize,
    num_ranks: usize,
}

impl HtDispatchHandle {
    fn view(&self, pick: fn(&HtHandle) -> &DeviceBuffer, len: usize) -> Result<Output> {
        let buf = pick(self.inner.value()?);
        Ok(Output { _owner: self.inner.clone(), ptr: buf.ptr(), len: len.min(buf.len()) })
    }

    /// `[R, R]` i32 (DeepEP's `rank_prefix_matrix`).
    pub fn rank_prefix_matrix(&self) -> Result<Output> {
        self.view(|h| &h.rank_prefix_matrix, 4 * self.num_ranks * self.num_ranks)
    }

    /// `[R, C + 1]` i32: the first row of each (source rank, channel) in this rank's outputs,
    /// and each source rank's end.
    pub fn channel_prefix_matrix(&self) -> Result<Output> {
        let c = self.num_channels()?;
        self.view(|h| &h.channel_prefix_matrix, 4 * self.num_ranks * (c + 1))
    }

    /// Channels of the dispatch.
    pub fn num_channels(&self) -> Result<usize> {
        Ok(self.inner.value()?.num_channels())
    }

    /// `[T, R]` bool.
    pub fn is_token_in_rank(&self) -> Result<Output> {
        self.view(|h| &h.is_token_in_rank, self.num_tokens * self.num_ranks)
    }

    /// `[T, R]` i32.
    pub fn send_head(&self) -> Result<Output> {
        self.view(|h| &h.send_head, 4 * self.num_tokens * self.num_ranks)
    }
}

/// DeepEP's `get_dispatch_layout` of `topk_idx` (`[num_tokens, num_topk]`, -1 = none).
#[derive(Clone, Copy)]
pub struct LayoutCall<'a> {
    /// `[num_tokens, num_topk]`.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// T.
    pub num_tokens: usize,
    /// K.
    pub num_topk: usize,
    /// E.
    pub num_experts: usize,
}

/// Outputs of [`Buffer::layout`] (DeepEP's `get_dispatch_layout`).
pub struct LayoutOutputs {
    /// `[R]` i32.
    pub num_tokens_per_rank: Output,
    /// `[E]` i32.
    pub num_tokens_per_expert: Output,
    /// `[T, R]` bool.
    pub is_token_in_rank: Output,
}

/// A (not cached) HT dispatch: [`HtDispatchArgs`] plus what lays the buffer out.
pub struct HtDispatchCall<'a> {
    /// The rows, scales, top-k, layout and options.
    pub args: HtDispatchArgs<'a>,
    /// Row size in bf16 elements (`hidden_bytes / 2`; fp8: `hidden_bytes`): what the rings
    /// are sized for.
    pub hidden: usize,
    /// Experts in all.
    pub num_experts: usize,
    /// Channels wanted (DeepEP's `num_sms / 2`; 0 = the default); fixed by the first call.
    pub num_channels: usize,
}

/// Outputs of [`Buffer::ht_dispatch`] (DeepEP's names).
pub struct HtDispatchResult {
    /// `[N, hidden_bytes]`.
    pub recv_x: Output,
    /// `[N, S]` f32 (fp8 dispatch).
    pub recv_x_scales: Option<Output>,
    /// `[N, K]` i64 (with top-k).
    pub recv_topk_idx: Option<Output>,
    /// `[N, K]` f32 (with top-k).
    pub recv_topk_weights: Option<Output>,
    /// `[N]` i32: source token of each row (-1 on padding).
    pub recv_src_idx: Output,
    /// `[L]` i32.
    pub num_recv_tokens_per_expert: Output,
    /// The same on the host (exact-size dispatches only).
    pub num_recv_tokens_per_expert_list: Option<Vec<i32>>,
    /// For combine and cached dispatches.
    pub handle: HtDispatchHandle,
}

/// Outputs and handle of an LL dispatch: pass it to [`Buffer::ll_combine`] (and, after
/// a `send_only` dispatch, to [`Buffer::ll_complete_dispatch`] first).
#[derive(Clone)]
pub struct LlDispatch {
    inner: Arc<Guarded<Mutex<LlDispatchOutputs>>>,
    generation: u64,
    call: CallStream,
    views: [(u64, usize); 5],
    recv_into: Option<Arc<LlRecvInto>>,
}

/// The views of an [`LlDispatch`]'s outputs.
pub struct LlDispatchViews {
    /// `[L, R*M, H]` bf16, or fp8 with `use_fp8`.
    pub packed_recv_x: Output,
    /// `[L, H/128, R*M]` f32 or `[L, H/512, R*M]` UE8M0 words (fp8).
    pub packed_recv_x_scales: Option<Output>,
    /// `[L]` i32.
    pub packed_recv_count: Output,
    /// `[L, R*M]` i32.
    pub packed_recv_src_info: Output,
    /// `[L, R]` i64 `begin << 32 | count`.
    pub packed_recv_layout_range: Output,
}

impl LlDispatch {
    /// The layout generation of the LL buffer its outputs are views into.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Its outputs (views into the LL buffer, or the caller's memory for the counts).
    pub fn views(&self) -> LlDispatchViews {
        let out = |(ptr, len): (u64, usize)| Output { _owner: self.inner.clone(), ptr, len };
        let [x, scales, count, src_info, layout_range] = self.views;
        LlDispatchViews {
            packed_recv_x: out(x),
            packed_recv_x_scales: (scales.0 != 0).then(|| out(scales)),
            packed_recv_count: out(count),
            packed_recv_src_info: out(src_info),
            packed_recv_layout_range: out(layout_range),
        }
    }
}

/// An LL dispatch (DeepEP's `low_latency_dispatch`, expert-major).
pub struct LlDispatchCall<'a> {
    /// `[T, H]` bf16.
    pub x: &'a DeviceBuffer,
    /// Tokens of this rank (T <= `max_tokens`).
    pub num_tokens: usize,
    /// H.
    pub hidden: usize,
    /// `[T, K]`.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// K.
    pub num_topk: usize,
    /// M (DeepEP's `num_max_dispatch_tokens_per_rank`).
    pub max_tokens: usize,
    /// E.
    pub num_experts: usize,
    /// fp8, scales, `send_only`.
    pub options: LlDispatchOptions<'a>,
    /// The caller's memory for `packed_recv_count [L]`, `packed_recv_layout_range [L, R]` and
    /// the call's epoch (8 bytes), so a CUDA-graph capture owns them; None: the rank's pool.
    pub small: Option<[DeviceBuffer; 3]>,
    /// DeepEP's statistics.
    pub stats: LlStats<'a>,
    /// Caller memory the rows (and fp8 scales) are copied into once received (NCCL EP's
    /// outputs, which are the caller's, not views).
    pub recv_into: Option<LlRecvInto>,
}

/// Where an LL dispatch's received rows go besides the buffer ([`LlDispatchCall::recv_into`]).
pub struct LlRecvInto {
    /// `[L, R*M, H]` rows (bf16, or fp8 bytes).
    pub x: DeviceBuffer,
    /// fp8 without UE8M0: `[L, R*M, H/128]` f32 scales, token-major.
    pub x_scales: Option<DeviceBuffer>,
}

/// An LL combine (DeepEP's `low_latency_combine`).
pub struct LlCombineCall<'a> {
    /// `[L, R*M, H]` bf16 rows as the dispatch packed them.
    pub x: &'a DeviceBuffer,
    /// T (the dispatch's).
    pub num_tokens: usize,
    /// `[T, K]`.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// `[T, K]` f32.
    pub topk_weights: &'a DeviceBuffer,
    /// K.
    pub num_topk: usize,
    /// Return once the sends are out ([`Buffer::ll_complete_combine`] receives).
    pub send_only: bool,
    /// `[R]` i64 `combine_wait_recv_cost_stats`.
    pub wait_stats: Option<&'a DeviceBuffer>,
}

/// The pending receive half of a `send_only` LL combine.
pub struct LlCombinePending {
    inner: Arc<Guarded<Mutex<LlCombineOutputs>>>,
    generation: u64,
    call: CallStream,
}

/// A rank-major LL dispatch (NCCL EP's `RANK_MAJOR`) into the caller's outputs.
pub struct LlRankMajorCall<'a> {
    /// `[T, H]` bf16, or e4m3 bytes with `x_scales`.
    pub x: &'a DeviceBuffer,
    /// `[T, H/128]` f32: `x` is fp8 already (NCCL EP's `QUANT_FWD`); the outputs then need
    /// `recv_x_scales`.
    pub x_scales: Option<&'a DeviceBuffer>,
    /// T (<= `max_tokens`).
    pub num_tokens: usize,
    /// H.
    pub hidden: usize,
    /// `[T, K]`.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// `[T, K]` f32.
    pub topk_weights: &'a DeviceBuffer,
    /// K.
    pub num_topk: usize,
    /// M.
    pub max_tokens: usize,
    /// E.
    pub num_experts: usize,
    /// Return once the sends are out ([`Buffer::ll_complete_rank_major`] receives).
    pub send_only: bool,
    /// Where the rows land ([`LlRankMajorOutputs::in_memory`]).
    pub outputs: LlRankMajorOutputs,
}

/// A rank-major LL dispatch's outputs and handle: pass it to [`Buffer::ll_combine_rank_major`].
#[derive(Clone)]
pub struct LlRankMajor {
    inner: Arc<Guarded<Mutex<LlRankMajorOutputs>>>,
    generation: u64,
    call: CallStream,
}

/// A rank-major LL combine ([`Buffer::ll_combine_rank_major`]).
pub struct LlRankMajorCombineCall<'a> {
    /// `[R, M, H]` bf16: one pre-reduced row per received row.
    pub x: &'a DeviceBuffer,
    /// T (the dispatch's).
    pub num_tokens: usize,
    /// `[T, K]`, the dispatch's.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// K.
    pub num_topk: usize,
    /// Return once the sends are out ([`Buffer::ll_complete_combine`] receives).
    pub send_only: bool,
}

/// An HT combine (DeepEP's `combine`).
pub struct HtCombineCall<'a> {
    /// `[N, hidden]` bf16 rows as dispatched.
    pub x: &'a DeviceBuffer,
    /// hidden (bf16 elements).
    pub hidden: usize,
    /// `[N, K]` f32 and K.
    pub topk_weights: Option<(&'a DeviceBuffer, usize)>,
    /// Up to two `[T, hidden]` bf16 biases.
    pub bias: [Option<&'a DeviceBuffer>; 2],
}

/// The largest shapes HT calls will use, to lay the buffer out before the first call
/// ([`Buffer::ht_prepare`]).
#[derive(Clone, Copy, Debug)]
pub struct HtShapes {
    /// Experts in all.
    pub num_experts: usize,
    /// Largest row size in bf16 elements (dispatch rows of up to `2 * hidden` bytes).
    pub hidden: usize,
    /// Largest top-k.
    pub num_topk: usize,
    /// Largest number of f32 scales per token (0 = `hidden / 128`).
    pub num_scales: usize,
    /// Channels wanted (0 = the default); fixed by the first layout.
    pub num_channels: usize,
}

/// A routing to prepare for dispatches ([`Buffer::ht_route`]).
pub struct HtRouteCall<'a> {
    /// `[num_tokens, num_topk]`, -1 = no expert. Copied: the caller may reuse it at once.
    pub topk_idx: &'a DeviceBuffer,
    /// Its type.
    pub index_type: IndexType,
    /// T.
    pub num_tokens: usize,
    /// K.
    pub num_topk: usize,
    /// Round each local expert's receive count up to this (>= 1).
    pub expert_alignment: usize,
    /// The shapes the buffer is laid out for (at the first call).
    pub shapes: HtShapes,
    /// Memory for the route's state ([`Buffer::ht_route_bytes`]), or None for the rank's pool.
    pub memory: Option<DeviceBuffer>,
    /// NCCL EP's overflow policy DROP: each rank receives at most this many rows; the
    /// (token, rank) pairs past it are dropped at the sender ([`crate::layout::drop_overflow`]:
    /// the lowest source ranks' first tokens are kept), at the cost of a second count
    /// exchange. Combines then leave the dropped ranks' contributions out. None: every row
    /// is sent, and more rows than a dispatch's outputs hold is a device-side error.
    pub recv_budget: Option<usize>,
}

/// A routing whose counts were exchanged (NCCL EP's HT handle after `ncclEpUpdateHandle`):
/// dispatches go along it ([`Buffer::ht_dispatch_routed`]) any number of times.
#[derive(Clone)]
pub struct HtRoute {
    inner: Arc<Guarded<RouteState>>,
    generation: u64,
    /// T.
    pub num_tokens: usize,
    /// K.
    pub num_topk: usize,
    /// The type of the copied `topk_idx`.
    pub index_type: IndexType,
    /// As given to [`Buffer::ht_route`].
    pub expert_alignment: usize,
    num_local_experts: usize,
}

struct RouteState {
    topk_idx: DeviceBuffer,
    layout: DispatchLayout,
    maps: HtMaps,
    /// With a `recv_budget`: `[1]` i32 and `[L]` i32, the rows and per-expert counts
    /// before the drop.
    routed: Option<(DeviceBuffer, DeviceBuffer)>,
    _memory: Option<DeviceBuffer>,
}

impl HtRoute {
    fn view(&self, pick: fn(&RouteState) -> &DeviceBuffer, len: usize) -> Result<Output> {
        Ok(self.output_of(pick(self.inner.value()?), len))
    }

    fn output_of(&self, buf: &DeviceBuffer, len: usize) -> Output {
        Output { _owner: self.inner.clone(), ptr: buf.ptr(), len: len.min(buf.len()) }
    }

    /// `[1]` i32 on the device: rows this rank receives (after the route's stream work).
    pub fn num_recv_tokens(&self) -> Result<Output> {
        self.view(|r| &r.maps.num_recv_tokens, 4)
    }

    /// `[1]` i32 on the device: rows this rank would receive without the route's
    /// `recv_budget` (NCCL EP's `recv_total_counter` under the DROP policy); without one,
    /// the same as [`HtRoute::num_recv_tokens`].
    pub fn num_routed_tokens(&self) -> Result<Output> {
        match &self.inner.value()?.routed {
            Some((total, _)) => Ok(self.output_of(total, 4)),
            None => self.num_recv_tokens(),
        }
    }

    /// `[L]` i32 on the device: [`HtRoute::num_recv_tokens_per_expert`] without the route's
    /// `recv_budget`.
    pub fn num_routed_tokens_per_expert(&self) -> Result<Output> {
        match &self.inner.value()?.routed {
            Some((_, per_expert)) => Ok(self.output_of(per_expert, 4 * self.num_local_experts)),
            None => self.num_recv_tokens_per_expert(),
        }
    }

    /// `[L]` i32 on the device: rows per local expert, rounded up to the alignment.
    pub fn num_recv_tokens_per_expert(&self) -> Result<Output> {
        self.view(|r| &r.maps.num_recv_tokens_per_expert, 4 * self.num_local_experts)
    }
}

/// A dispatch along an [`HtRoute`] into the caller's memory (`rows` rows, at least what
/// arrives: more is a device-side error).
pub struct HtRoutedDispatch<'a> {
    /// `[T, hidden_bytes]`.
    pub x: &'a DeviceBuffer,
    /// Bytes per row, a multiple of 16.
    pub hidden_bytes: usize,
    /// `[T, S]` f32 and S.
    pub x_scales: Option<(&'a DeviceBuffer, usize)>,
    /// `[T, K]` f32.
    pub topk_weights: &'a DeviceBuffer,
    /// Output rows.
    pub rows: usize,
    /// `[rows, hidden_bytes]`, 16-aligned.
    pub recv_x: DeviceBuffer,
    /// `[rows, S]` f32 (with `x_scales`).
    pub recv_x_scales: Option<DeviceBuffer>,
    /// `[rows, K]` i64: local expert ids, -1 elsewhere.
    pub recv_topk_idx: DeviceBuffer,
    /// `[rows, K]` f32.
    pub recv_topk_weights: DeviceBuffer,
}

/// LL outputs whose receive half may still be pending (`send_only`).
trait LlPending {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()>;
    fn pending(&self) -> bool;
}

impl LlPending for LlDispatchOutputs {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlDispatchOutputs::complete(self, group, buf)
    }

    fn pending(&self) -> bool {
        self.recv_hook.is_some()
    }
}

impl LlPending for LlCombineOutputs {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlCombineOutputs::complete(self, group, buf)
    }

    fn pending(&self) -> bool {
        self.recv_hook.is_some()
    }
}

impl LlPending for LlRankMajorOutputs {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> Result<()> {
        LlRankMajorOutputs::complete(self, group, buf)
    }

    fn pending(&self) -> bool {
        self.recv_hook.is_some()
    }
}

/// Copies an LL dispatch's received rows and scales (views into the buffer) into the
/// caller's memory, the scales token-major.
fn deliver(group: &Group, into: &LlRecvInto, out: &LlDispatchOutputs, cfg: &LlConfig) -> Result<()> {
    let rows = &out.packed_recv_x;
    if into.x.len() < rows.len() {
        return Err(Error::invalid("recv_x", format!("{} bytes needed, got {}", rows.len(), into.x.len())));
    }
    // Only the rows that arrived (each expert's count): the rest of `into` is left as it is.
    let (l, per_expert) = (cfg.num_experts / group.num_ranks(), group.num_ranks() * cfg.max_tokens);
    let counts = &out.packed_recv_count;
    copy_counted_rows(group, rows, &into.x, counts, l, per_expert, rows.len() / (l * per_expert).max(1))?;
    match (&into.x_scales, &out.packed_recv_x_scales) {
        (None, _) => Ok(()),
        (Some(dst), Some(src)) => scales_token_major(group, src, dst, Some(counts), l, per_expert, cfg.hidden / 128),
        (Some(_), None) => Err(Error::invalid("recv_x_scales", "given for a dispatch without fp8")),
    }
}

impl Buffer {
    /// Allocates the memory of both modes (collective), as DeepEP's constructor does.
    pub fn new(group: impl Into<Arc<Group>>, config: BufferConfig) -> Result<Buffer> {
        let group = group.into();
        group.ranks_on_device()?; // collective the first time: not inside a later call
        let ht_mem = match config.nvl_bytes {
            0 => None,
            n => Some(HtMemory::alloc(&group, n, config.heap_bytes)?),
        };
        let ll_mem = match config.rdma_bytes {
            0 => None,
            n => Some(Arc::new(group.alloc_symmetric(n, Sharing::Auto)?)),
        };
        let state = State { ht_mem, ht: None, ht_generation: 0, ll_mem, ll: None, ll_generation: 0, config };
        Ok(Buffer { group, state: Mutex::new(state) })
    }

    /// The rank's group (device, stream, bootstrap).
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::KernelFault("a previous call panicked".into()))
    }

    /// Orders the rank's stream after the caller (or `previous`), and surfaces errors that
    /// kernels reported since the last call.
    fn begin(&self, call: &CallStream) -> Result<()> {
        self.group.take_device_error("an earlier op")?;
        let comm = self.group.stream();
        match (&call.previous, &call.caller) {
            (Some(ev), _) => comm.wait_event(ev),
            (None, Some(caller)) => comm.wait_event(&caller.record_event()?),
            (None, None) => Ok(()),
        }
    }

    /// The caller's stream waits for the rank's stream, or gets an event to wait on later.
    fn finish(&self, call: &CallStream, kernel: &'static str) -> Result<Option<Arc<Event>>> {
        if self.group.device().is_cpu() {
            self.group.take_device_error(kernel)?; // the work is done: report bad input now
        }
        let ev = self.group.stream().record_event()?;
        if call.async_finish {
            return Ok(Some(Arc::new(ev)));
        }
        if let Some(caller) = &call.caller {
            caller.wait_event(&ev)?;
        }
        Ok(None)
    }

    fn guard<T: Send + Sync + 'static>(&self, call: &CallStream, value: T) -> Arc<Guarded<T>> {
        // Whatever `allocate_on_comm_stream` says, the caller's stream may read the output
        // (DeepEP records both streams too).
        let release_after = call.caller.clone().map(|caller| (caller, self.group.clone()));
        Arc::new(Guarded { value: Some(value), release_after })
    }

    /// An output of its own.
    fn output(&self, call: &CallStream, buf: DeviceBuffer, len: usize) -> Output {
        let (ptr, have) = (buf.ptr(), buf.len());
        Output { _owner: self.guard(call, buf), ptr, len: len.min(have) }
    }

    /// Makes sure the HT buffer fits `want`: lays the memory out at the first call (nothing
    /// collective), again (collectively, no allocation) when a call has larger shapes. The
    /// channel count is fixed by the first call.
    fn ensure_ht(&self, st: &mut State, want: HtConfig, call: &CallStream) -> Result<()> {
        let old = st.ht.as_ref().map(|b| *b.config());
        if old.is_some_and(|c| {
            c.num_experts == want.num_experts
                && c.hidden >= want.hidden
                && c.num_topk >= want.num_topk
                && c.num_scales >= want.num_scales
        }) {
            return Ok(());
        }
        // Keep room for what earlier calls needed, and for any top-k when it fits, so that
        // alternating calls (with and without top-k, bf16 and fp8) keep one layout.
        let kept = old.filter(|o| o.num_experts == want.num_experts);
        let exact = HtConfig {
            hidden: want.hidden.max(kept.map_or(0, |o| o.hidden)),
            num_topk: want.num_topk.max(kept.map_or(0, |o| o.num_topk)),
            num_scales: want.num_scales.max(kept.map_or(0, |o| o.num_scales)),
            num_channels: old.map_or(want.num_channels, |o| o.num_channels),
            ..want
        };
        let roomy = HtConfig { num_topk: MAX_TOPK, ..exact };
        let ring_bytes = st.ht_memory().map_or(0, |m| m.ring_bytes());
        let need = HtBuffer::bytes_needed(&self.group, &exact)?;
        let cfg = if HtBuffer::bytes_needed(&self.group, &roomy)? <= ring_bytes {
            roomy
        } else if need <= ring_bytes {
            exact
        } else {
            return Err(Error::invalid(
                "num_nvl_bytes",
                format!(
                    "Buffer(num_nvl_bytes={}) is too small for HT with hidden {}, top-{} and {} experts: pass at least {need}",
                    st.config.nvl_bytes, exact.hidden, exact.num_topk, exact.num_experts
                ),
            ));
        };
        match (st.ht.as_mut(), st.ht_mem.take()) {
            (Some(_), _) if call.capturing() => return Err(no_relayout_in_capture("HT")),
            (Some(buf), _) => buf.relayout(&self.group, cfg)?,
            (None, Some(mem)) => st.ht = Some(HtBuffer::in_memory(&self.group, cfg, mem)?),
            (None, None) => return Err(Error::KernelFault("HT memory missing".into())),
        }
        st.ht_generation += 1;
        Ok(())
    }

    /// Makes sure the LL buffer is laid out for `cfg` (as `ensure_ht`).
    fn ensure_ll(&self, st: &mut State, cfg: LlConfig, call: &CallStream) -> Result<()> {
        if st.ll.as_ref().is_some_and(|b| *b.config() == cfg) {
            return Ok(());
        }
        let need = LlBuffer::size_hint(self.group.num_ranks(), &cfg);
        let have = st.ll_memory().map_or(0, |m| m.len());
        if need > have {
            return Err(Error::invalid(
                "num_rdma_bytes",
                format!(
                    "Buffer(num_rdma_bytes={}) is too small for LL with {} tokens per rank, hidden {} and {} experts: \
                     pass at least {need} (Buffer.get_low_latency_rdma_size_hint)",
                    st.config.rdma_bytes, cfg.max_tokens, cfg.hidden, cfg.num_experts
                ),
            ));
        }
        match (st.ll.as_mut(), st.ll_mem.take()) {
            (Some(_), _) if call.capturing() => return Err(no_relayout_in_capture("LL")),
            (Some(buf), _) => buf.relayout(&self.group, cfg)?,
            (None, Some(mem)) => st.ll = Some(LlBuffer::in_memory(&self.group, cfg, mem)?),
            (None, None) => return Err(Error::KernelFault("LL memory missing".into())),
        }
        st.ll_generation += 1;
        Ok(())
    }

    /// Returns once no rank uses its buffers any more (before one is dropped: peers write
    /// into each other's).
    fn quiesce(&self) -> Result<()> {
        self.group.stream().synchronize()?;
        self.group.bootstrap().barrier()
    }

    /// This rank's whole HT (`rdma` false) or LL memory from byte `offset` (DeepEP's
    /// `get_local_buffer_tensor`), or None when that memory is absent.
    pub fn local_buffer(&self, offset: usize, rdma: bool) -> Result<Option<Output>> {
        let st = self.lock()?;
        let local = if rdma { st.ll_memory().cloned() } else { st.ht_memory().map(|m| m.shared()) };
        let Some(sym) = local else { return Ok(None) };
        let len = sym.len();
        if offset > len {
            return Err(Error::invalid("offset", format!("{offset} bytes is past the buffer's {len}")));
        }
        let ptr = sym.local().ptr() + offset as u64;
        Ok(Some(Output { _owner: sym, ptr, len: len - offset }))
    }

    /// `(rings, heap, ll)` bytes (0 = none).
    pub fn memory_bytes(&self) -> Result<(usize, usize, usize)> {
        let st = self.lock()?;
        let (rings, heap) = st.ht_memory().map_or((0, 0), |m| (m.ring_bytes(), m.heap_bytes()));
        Ok((rings, heap, st.ll_memory().map_or(0, |m| m.len())))
    }

    /// `nbytes` from the HT buffer's heap for work ordered on `call`'s stream, or None (no HT
    /// buffer yet, no heap, or no room).
    pub fn ht_alloc_output(&self, call: &CallStream, nbytes: usize) -> Result<Option<Output>> {
        let st = self.lock()?;
        let Some(buf) = st.ht.as_ref() else { return Ok(None) };
        // A block comes back only once the work queued before its release has run, so the
        // caller may write it at once; its own release waits for the caller's stream.
        Ok(buf.alloc_output(&self.group, nbytes).map(|b| self.output(call, b, nbytes)))
    }

    /// Runs `work` (copies, fills) on the rank's stream, ordered after the caller as ops
    /// are, with the caller then ordered after it.
    pub fn run(&self, call: &CallStream, work: impl FnOnce(&Stream) -> Result<()>) -> Result<()> {
        self.begin(call)?;
        work(self.group.stream())?;
        self.finish(call, "a copy").map(|_| ())
    }

    /// Waits for the rank's stream, then reports what its kernels reported.
    pub fn synchronize(&self) -> Result<()> {
        self.group.stream().synchronize()?;
        self.group.take_device_error("an earlier op")
    }

    /// Drops the buffers (collective: every rank calls it); handles made before are refused.
    pub fn destroy(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.ht.is_some() || st.ll.is_some() || st.ht_mem.is_some() || st.ll_mem.is_some() {
            self.quiesce()?;
        }
        (st.ht, st.ht_mem, st.ll, st.ll_mem) = (None, None, None, None);
        st.ht_generation += 1;
        st.ll_generation += 1;
        Ok(())
    }

    /// DeepEP's `get_dispatch_layout`. With `out`, the caller's buffers are written (e.g.
    /// inside a CUDA-graph capture) and no outputs are returned.
    pub fn layout(
        &self,
        call: &CallStream,
        c: &LayoutCall<'_>,
        out: Option<DispatchLayout>,
    ) -> Result<(Option<LayoutOutputs>, Option<Arc<Event>>)> {
        self.begin(call)?;
        let (idx, ty, t, k, e) = (c.topk_idx, c.index_type, c.num_tokens, c.num_topk, c.num_experts);
        let l = match out {
            Some(into) => {
                get_dispatch_layout_into(&self.group, idx, ty, t, k, e, into)?;
                None
            }
            None => Some(get_dispatch_layout(&self.group, idx, ty, t, k, e)?),
        };
        let ev = self.finish(call, "get_dispatch_layout")?;
        let r = self.group.num_ranks();
        let outputs = l.map(|l| LayoutOutputs {
            num_tokens_per_rank: self.output(call, l.num_tokens_per_rank, 4 * r),
            num_tokens_per_expert: self.output(call, l.num_tokens_per_expert, 4 * c.num_experts),
            is_token_in_rank: self.output(call, l.is_token_in_rank, c.num_tokens * r),
        });
        Ok((outputs, ev))
    }

    /// Lays the HT buffer out for `c` and runs `run` (a dispatch) on the rank's stream.
    fn run_ht_dispatch(
        &self,
        call: &CallStream,
        c: &HtDispatchCall<'_>,
        run: impl FnOnce(&mut HtBuffer) -> Result<HtDispatchOutputs>,
    ) -> Result<(HtDispatchOutputs, u64, Option<Arc<Event>>)> {
        let shapes = HtShapes {
            num_experts: c.num_experts,
            hidden: c.hidden,
            num_topk: c.args.topk.map_or(0, |t| t.3),
            num_scales: c.args.x_scales.map_or(0, |s| s.1),
            num_channels: c.num_channels,
        };
        let want = self.ht_config(&shapes)?;
        let mut st = self.lock()?;
        self.ensure_ht(&mut st, want, call)?;
        let generation = st.ht_generation;
        let buf = st.ht.as_mut().ok_or_else(|| Error::KernelFault("HT buffer missing".into()))?;
        self.begin(call)?;
        let out = run(buf)?;
        let ev = self.finish(call, "ht_dispatch")?;
        Ok((out, generation, ev))
    }

    fn ht_handle(&self, call: &CallStream, handle: HtHandle, generation: u64, num_tokens: usize) -> HtDispatchHandle {
        HtDispatchHandle {
            num_rows: handle.num_rows,
            num_tokens,
            num_ranks: self.group.num_ranks(),
            inner: self.guard(call, handle),
            generation,
        }
    }

    /// DeepEP's `dispatch` without a handle: exact-size outputs, or `num_worst_tokens` rows.
    pub fn ht_dispatch(
        &self,
        call: &CallStream,
        c: &HtDispatchCall<'_>,
    ) -> Result<(HtDispatchResult, Option<Arc<Event>>)> {
        let (out, generation, ev) = self.run_ht_dispatch(call, c, |buf| buf.dispatch(&self.group, &c.args))?;
        let rows = out.handle.num_rows;
        let num_scales = c.args.x_scales.map_or(0, |s| s.1);
        let num_topk = c.args.topk.map_or(0, |t| t.3);
        let num_local = c.num_experts / self.group.num_ranks().max(1);
        let with_topk = c.args.topk.is_some();
        let result = HtDispatchResult {
            recv_x: self.output(call, out.recv_x, rows * c.args.hidden_bytes),
            recv_x_scales: (num_scales > 0).then(|| self.output(call, out.recv_x_scales, rows * num_scales * 4)),
            recv_topk_idx: with_topk.then(|| self.output(call, out.recv_topk_idx, rows * num_topk * 8)),
            recv_topk_weights: with_topk.then(|| self.output(call, out.recv_topk_weights, rows * num_topk * 4)),
            recv_src_idx: self.output(call, out.recv_src_idx, rows * 4),
            num_recv_tokens_per_expert: self.output(call, out.num_recv_tokens_per_expert, num_local * 4),
            num_recv_tokens_per_expert_list: out.num_recv_tokens_per_expert_list,
            handle: self.ht_handle(call, out.handle, generation, c.args.num_tokens),
        };
        Ok((result, ev))
    }

    /// An HT dispatch with `num_worst_tokens` into the caller's buffers (what a CUDA-graph
    /// capture needs: memory the graph owns).
    pub fn ht_dispatch_into(
        &self,
        call: &CallStream,
        c: &HtDispatchCall<'_>,
        into: HtDispatchBuffers,
    ) -> Result<(HtDispatchHandle, Option<Arc<Event>>)> {
        if c.args.num_worst_tokens.is_none() {
            return Err(Error::invalid("num_worst_tokens", "needed to dispatch into the caller's buffers"));
        }
        let (out, generation, ev) =
            self.run_ht_dispatch(call, c, |buf| buf.dispatch_into(&self.group, &c.args, into))?;
        Ok((self.ht_handle(call, out.handle, generation, c.args.num_tokens), ev))
    }

    /// A dispatch reusing `handle`'s routes (DeepEP's cached mode): `(recv_x, recv_x_scales)`;
    /// with `out`, the caller's buffers are written and nothing is returned.
    #[allow(clippy::type_complexity)]
    pub fn ht_dispatch_cached(
        &self,
        call: &CallStream,
        handle: &HtDispatchHandle,
        x: &DeviceBuffer,
        hidden_bytes: usize,
        x_scales: Option<(&DeviceBuffer, usize)>,
        out: Option<(DeviceBuffer, Option<DeviceBuffer>)>,
    ) -> Result<(Option<(Output, Option<Output>)>, Option<Arc<Event>>)> {
        let mut st = self.lock()?;
        check_generation(st.ht_generation, handle.generation)?;
        let buf = st.ht.as_mut().ok_or_else(|| Error::invalid("handle", "no HT buffer"))?;
        let h = handle.inner.value()?;
        self.begin(call)?;
        let recv = match out {
            Some((rx, rs)) => {
                buf.dispatch_cached_into(&self.group, h, x, hidden_bytes, x_scales, &rx, rs.as_ref())?;
                None
            }
            None => Some(buf.dispatch_cached(&self.group, h, x, hidden_bytes, x_scales)?),
        };
        let ev = self.finish(call, "ht_dispatch")?;
        let rows = handle.num_rows;
        let num_scales = x_scales.map_or(0, |s| s.1);
        let recv = recv.map(|(recv_x, recv_scales)| {
            (
                self.output(call, recv_x, rows * hidden_bytes),
                (num_scales > 0).then(|| self.output(call, recv_scales, rows * num_scales * 4)),
            )
        });
        Ok((recv, ev))
    }

    /// DeepEP's `combine`: `(combined_x, combined_topk_weights)`; with `out`, the caller's
    /// buffers are written and nothing is returned.
    #[allow(clippy::type_complexity)]
    pub fn ht_combine(
        &self,
        call: &CallStream,
        handle: &HtDispatchHandle,
        c: &HtCombineCall<'_>,
        out: Option<HtCombineOutputs>,
    ) -> Result<(Option<(Output, Option<Output>)>, Option<Arc<Event>>)> {
        let mut st = self.lock()?;
        check_generation(st.ht_generation, handle.generation)?;
        let h = handle.inner.value()?;
        let (hidden, k) = (c.hidden, c.topk_weights.map_or(0, |w| w.1));
        let fits = st.ht.as_ref().is_some_and(|b| b.config().hidden >= hidden && b.config().num_topk >= k);
        if !fits {
            return Err(Error::invalid(
                "x",
                format!(
                    "combine of hidden {hidden} / top-{k} after a dispatch sized for less; dispatch with these shapes first"
                ),
            ));
        }
        let buf = st.ht.as_mut().ok_or_else(|| Error::invalid("handle", "no HT buffer"))?;
        self.begin(call)?;
        let combined = match out {
            Some(into) => {
                buf.combine_into(&self.group, h, c.x, hidden, c.topk_weights, c.bias, into)?;
                None
            }
            None => Some(buf.combine(&self.group, h, c.x, hidden, c.topk_weights, c.bias)?),
        };
        let ev = self.finish(call, "ht_combine")?;
        let t = handle.num_tokens;
        let combined = combined.map(|o| {
            (
                self.output(call, o.combined_x, t * hidden * 2),
                o.combined_topk_weights.map(|w| self.output(call, w, t * k * 4)),
            )
        });
        Ok((combined, ev))
    }

    /// Lays the HT buffer out for `shapes` now (nothing collective the first time) rather
    /// than at the first call; later calls within these shapes keep the layout.
    pub fn ht_prepare(&self, shapes: &HtShapes) -> Result<()> {
        let mut st = self.lock()?;
        self.ensure_ht(&mut st, self.ht_config(shapes)?, &CallStream::default())
    }

    /// The [`HtConfig`] a call of `shapes` wants.
    fn ht_config(&self, shapes: &HtShapes) -> Result<HtConfig> {
        // `Config.num_sms / 2` channels, but no more than the rank's share of the GPU's
        // SMs: all ranks' blocks must be resident at once when ranks share a GPU.
        let num_channels = match shapes.num_channels {
            0 => 0,
            n => n.min((self.group.device().num_sms()? as usize / (2 * self.group.ranks_on_device()?)).max(1)),
        };
        Ok(HtConfig {
            num_experts: shapes.num_experts,
            hidden: shapes.hidden,
            num_topk: shapes.num_topk,
            // Scales for fp8 rows of this hidden always fit, so bf16 and fp8 share a buffer.
            num_scales: shapes.num_scales.max(shapes.hidden / 128),
            num_channels,
            warps_per_peer: 0,
            num_slots: 0,
            heap_bytes: 0,
        })
    }

    /// Bytes of an [`HtRouteCall::memory`] for `num_tokens` tokens of top-`num_topk`
    /// `index_type` ids once the HT buffer is laid out ([`Buffer::ht_prepare`]).
    pub fn ht_route_bytes(&self, num_tokens: usize, num_topk: usize, index_type: IndexType) -> Result<usize> {
        let st = self.lock()?;
        let buf = st.ht.as_ref().ok_or_else(|| Error::invalid("buffer", "HT is not laid out yet (ht_prepare)"))?;
        let (r, e) = (self.group.num_ranks(), buf.config().num_experts);
        Ok(route_bytes(r, e, num_tokens, num_topk * index_type.bytes()) + buf.maps_bytes(&self.group, num_tokens))
    }

    /// Collective: prepares `c`'s routing for dispatches (NCCL EP's `ncclEpUpdateHandle`):
    /// copies `topk_idx`, computes its layout and exchanges the counts, on the rank's stream.
    /// The route's counts are then readable on the device.
    pub fn ht_route(&self, call: &CallStream, c: HtRouteCall<'_>) -> Result<HtRoute> {
        let (t, k, ty) = (c.num_tokens, c.num_topk, c.index_type);
        if c.topk_idx.len() < t * k * ty.bytes() {
            return Err(Error::invalid("topk_idx", format!("[{t}, {k}] needs {} bytes", t * k * ty.bytes())));
        }
        if c.shapes.num_topk < k {
            return Err(Error::invalid("num_topk", format!("top-{k} > the shapes' top-{}", c.shapes.num_topk)));
        }
        let want = self.ht_config(&c.shapes)?;
        let mut st = self.lock()?;
        self.ensure_ht(&mut st, want, call)?;
        let generation = st.ht_generation;
        let buf = st.ht.as_mut().ok_or_else(|| Error::KernelFault("HT buffer missing".into()))?;
        let (r, e, dev) = (self.group.num_ranks(), buf.config().num_experts, self.group.device());
        let stream = self.group.stream();
        let (topk_idx, layout, maps, routed) = match &c.memory {
            Some(mem) => {
                let need = route_bytes(r, e, t, k * ty.bytes()) + buf.maps_bytes(&self.group, t);
                if mem.len() < need || !mem.ptr().is_multiple_of(16) {
                    return Err(Error::invalid(
                        "memory",
                        format!("{need} bytes (16-aligned) needed, got {}", mem.len()),
                    ));
                }
                let mut at = mem.ptr();
                let mut next = |bytes: usize| {
                    // SAFETY: `mem` holds all of these (checked above); the route keeps it.
                    let b = unsafe { DeviceBuffer::borrowed(dev, at, bytes) };
                    at += bytes.next_multiple_of(16) as u64;
                    b
                };
                let topk_idx = next((t * k * ty.bytes()).max(1));
                let layout = DispatchLayout {
                    num_tokens_per_rank: next(4 * r),
                    num_tokens_per_expert: next(4 * e),
                    is_token_in_rank: next((t * r).max(1)),
                };
                let routed = (next(4), next(4 * e)); // (carved whether used or not)
                let routed = c.recv_budget.map(|_| routed);
                // SAFETY: the rest of `mem`, 16-aligned, sized by maps_bytes (checked above).
                let maps = unsafe { buf.maps_at(&self.group, at, t) };
                (topk_idx, Some(layout), maps, routed)
            }
            None => {
                let maps = buf.alloc_maps(&self.group, t)?;
                let routed = match c.recv_budget {
                    Some(_) => Some((stream.alloc_uninit(16)?, stream.alloc_uninit(4 * e)?)),
                    None => None,
                };
                (stream.alloc_uninit((t * k * ty.bytes()).max(16))?, None, maps, routed)
            }
        };
        self.begin(call)?;
        if t * k > 0 {
            topk_idx.copy_from_async(stream, c.topk_idx, t * k * ty.bytes())?;
        }
        let layout = match layout {
            Some(into) => into,
            None => get_dispatch_layout(&self.group, &topk_idx, ty, t, k, e)?,
        };
        // SAFETY: views of the layout's own buffers, which outlive the calls.
        let again = || unsafe {
            DispatchLayout {
                num_tokens_per_rank: DeviceBuffer::borrowed(dev, layout.num_tokens_per_rank.ptr(), 4 * r),
                num_tokens_per_expert: DeviceBuffer::borrowed(dev, layout.num_tokens_per_expert.ptr(), 4 * e),
                is_token_in_rank: DeviceBuffer::borrowed(dev, layout.is_token_in_rank.ptr(), (t * r).max(1)),
            }
        };
        if c.memory.is_some() {
            get_dispatch_layout_into(&self.group, &topk_idx, ty, t, k, e, again())?;
        }
        buf.notify(&self.group, &layout, t, c.expert_alignment, &maps)?;
        if let (Some(budget), Some((routed_total, routed_per_expert))) = (c.recv_budget, &routed) {
            let (in_rank, prefix) = (&layout.is_token_in_rank, &maps.rank_prefix_matrix);
            drop_overflow(&self.group, &topk_idx, ty, t, k, e, in_rank, prefix, budget, Some(routed_total))?;
            routed_per_expert.copy_from_async(stream, &maps.num_recv_tokens_per_expert, 4 * (e / r))?;
            get_dispatch_layout_into(&self.group, &topk_idx, ty, t, k, e, again())?;
            buf.notify(&self.group, &layout, t, c.expert_alignment, &maps)?;
        }
        self.finish(call, "ht_notify")?;
        let state = RouteState { topk_idx, layout, maps, routed, _memory: c.memory };
        Ok(HtRoute {
            inner: self.guard(call, state),
            generation,
            num_tokens: t,
            num_topk: k,
            index_type: ty,
            expert_alignment: c.expert_alignment,
            num_local_experts: e / r,
        })
    }

    /// Collective: a dispatch along `route` (NCCL EP's `ncclEpDispatch`, forward, after
    /// `ncclEpUpdateHandle`) into the caller's memory. Its handle serves combines and cached
    /// dispatches (the backward passes) as a handle of [`Buffer::ht_dispatch`] does.
    pub fn ht_dispatch_routed(
        &self,
        call: &CallStream,
        route: &HtRoute,
        d: HtRoutedDispatch<'_>,
    ) -> Result<(HtDispatchHandle, Option<Arc<Event>>)> {
        let mut st = self.lock()?;
        check_generation(st.ht_generation, route.generation)?;
        let buf = st.ht.as_mut().ok_or_else(|| Error::invalid("route", "no HT buffer"))?;
        let state = route.inner.value()?;
        let (dev, t, k) = (self.group.device(), route.num_tokens, route.num_topk);
        // The dispatch's handle takes views of the route's maps that keep the route alive.
        let owner: Owner = route.inner.clone();
        let lend = |b: &DeviceBuffer| {
            let keep = owner.clone();
            // SAFETY: `b` lies in the route's memory, which `keep` holds until the view drops.
            unsafe { DeviceBuffer::lent(dev, b.ptr(), b.len(), Box::new(move || drop(keep))) }
        };
        let m = &state.maps;
        let maps = HtMaps {
            num_recv_tokens_per_expert: lend(&m.num_recv_tokens_per_expert),
            rank_prefix_matrix: lend(&m.rank_prefix_matrix),
            channel_prefix_matrix: lend(&m.channel_prefix_matrix),
            num_recv_tokens: lend(&m.num_recv_tokens),
            remote_row0: lend(&m.remote_row0),
            send_head: lend(&m.send_head),
            is_token_in_rank: lend(&m.is_token_in_rank),
        };
        let stream = self.group.stream();
        let recv_x_scales = match d.recv_x_scales {
            Some(b) => b,
            // SAFETY: not written without scales (HtDispatchBuffers' contract).
            None => unsafe { DeviceBuffer::borrowed(dev, d.recv_x.ptr(), d.recv_x.len()) },
        };
        let out = HtDispatchBuffers {
            recv_x: d.recv_x,
            recv_x_scales,
            recv_topk_idx: d.recv_topk_idx,
            recv_topk_weights: d.recv_topk_weights,
            recv_src_idx: stream.alloc_uninit((4 * d.rows).max(16))?,
            maps,
        };
        let args = HtDispatchArgs {
            x: d.x,
            hidden_bytes: d.hidden_bytes,
            num_tokens: t,
            x_scales: d.x_scales,
            topk: Some((&state.topk_idx, route.index_type, d.topk_weights, k)),
            layout: &state.layout,
            expert_alignment: route.expert_alignment,
            num_worst_tokens: Some(d.rows),
        };
        self.begin(call)?;
        let out = buf.dispatch_notified(&self.group, &args, out)?;
        let ev = self.finish(call, "ht_dispatch")?;
        Ok((self.ht_handle(call, out.handle, route.generation, t), ev))
    }

    /// DeepEP's `low_latency_dispatch` (expert-major); with `options.send_only` the receive
    /// is left to [`Buffer::ll_complete_dispatch`].
    pub fn ll_dispatch(&self, call: &CallStream, c: LlDispatchCall<'_>) -> Result<(LlDispatch, Option<Arc<Event>>)> {
        let mut st = self.lock()?;
        let cfg = LlConfig { num_experts: c.num_experts, hidden: c.hidden, max_tokens: c.max_tokens };
        self.ensure_ll(&mut st, cfg, call)?;
        let generation = st.ll_generation;
        let buf = st.ll.as_mut().ok_or_else(|| Error::KernelFault("LL buffer missing".into()))?;
        self.begin(call)?;
        let (x, t, idx, ty, k, o) = (c.x, c.num_tokens, c.topk_idx, c.index_type, c.num_topk, c.options);
        let out = match c.small {
            // The caller's memory for the counts, ranges and epoch (graph-capturable).
            Some(small) => buf.dispatch_with(&self.group, x, t, idx, ty, k, o, small, c.stats)?,
            None => buf.dispatch(&self.group, x, t, idx, ty, k, o, c.stats)?,
        };
        let recv_into = c.recv_into;
        if let Some(into) = &recv_into
            && !o.send_only
        {
            deliver(&self.group, into, &out, buf.config())?;
        }
        let ev = self.finish(call, "ll_dispatch")?;
        let (r, hidden, use_fp8) = (self.group.num_ranks(), c.hidden, o.use_fp8);
        let l = c.num_experts / r;
        let rows = l * r * c.max_tokens;
        let scales_ptr = out.packed_recv_x_scales.as_ref().map_or(0, |b| b.ptr());
        let scales = match (use_fp8, o.use_ue8m0) {
            (false, _) => (0, 0),
            (true, true) => (scales_ptr, rows * (hidden / 512) * 4),
            (true, false) => (scales_ptr, rows * (hidden / 128) * 4),
        };
        let views = [
            (out.packed_recv_x.ptr(), rows * if use_fp8 { hidden } else { 2 * hidden }),
            scales,
            (out.packed_recv_count.ptr(), 4 * l),
            (out.handle.packed_recv_src_info.ptr(), 4 * rows),
            (out.handle.packed_recv_layout_range.ptr(), 8 * l * r),
        ];
        let d = LlDispatch {
            inner: self.guard(call, Mutex::new(out)),
            generation,
            call: call.clone(),
            views,
            recv_into: recv_into.map(Arc::new),
        };
        Ok((d, ev))
    }

    /// The zero-copy combine input of `d`'s buffer set ([`LlBuffer::combine_buffer`]):
    /// `[L, R*M, hidden]` bf16; a combine given it reads the rows in place.
    pub fn ll_combine_buffer(&self, call: &CallStream, d: &LlDispatch) -> Result<Output> {
        let st = self.lock()?;
        check_generation(st.ll_generation, d.generation)?;
        let buf = st.ll.as_ref().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
        let outs = d.inner.value()?.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
        let view = buf.combine_buffer(&outs.handle);
        let len = view.len();
        Ok(self.output(call, view, len))
    }

    /// Runs the pending receive half of an LL op (`send_only`), on the op's stream context.
    fn complete_pending<T: LlPending + Send>(
        &self,
        inner: &Guarded<Mutex<T>>,
        generation: u64,
        call: &CallStream,
        kernel: &'static str,
        then: impl FnOnce(&T) -> Result<()>,
    ) -> Result<()> {
        let st = self.lock()?;
        check_generation(st.ll_generation, generation)?;
        let buf = st.ll.as_ref().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
        let mut out = inner.value()?.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
        let call = CallStream { previous: None, async_finish: false, ..call.clone() };
        self.begin(&call)?;
        let pending = out.pending();
        out.complete(&self.group, buf)?;
        if pending {
            then(&out)?;
        }
        self.finish(&call, kernel).map(|_| ())
    }

    /// Runs the receive half of a `send_only` LL dispatch (DeepEP's hook; no-op when done).
    pub fn ll_complete_dispatch(&self, d: &LlDispatch) -> Result<()> {
        let cfg = *self.lock()?.ll.as_ref().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?.config();
        self.complete_pending(&d.inner, d.generation, &d.call, "ll_dispatch", |out| match &d.recv_into {
            Some(into) => deliver(&self.group, into, out, &cfg),
            None => Ok(()),
        })
    }

    /// Runs the receive half of a `send_only` LL combine.
    pub fn ll_complete_combine(&self, c: &LlCombinePending) -> Result<()> {
        self.complete_pending(&c.inner, c.generation, &c.call, "ll_combine", |_| Ok(()))
    }

    /// NCCL EP's rank-major LL dispatch into `c.outputs`; with `send_only` the receive is
    /// left to [`Buffer::ll_complete_rank_major`].
    pub fn ll_dispatch_rank_major(&self, call: &CallStream, c: LlRankMajorCall<'_>) -> Result<LlRankMajor> {
        let mut st = self.lock()?;
        let cfg = LlConfig { num_experts: c.num_experts, hidden: c.hidden, max_tokens: c.max_tokens };
        self.ensure_ll(&mut st, cfg, call)?;
        let generation = st.ll_generation;
        let buf = st.ll.as_mut().ok_or_else(|| Error::KernelFault("LL buffer missing".into()))?;
        self.begin(call)?;
        let mut out = c.outputs;
        let input = LlRankMajorInput {
            x: c.x,
            x_scales: c.x_scales,
            num_tokens: c.num_tokens,
            topk_idx: c.topk_idx,
            index_type: c.index_type,
            topk_weights: c.topk_weights,
            num_topk: c.num_topk,
        };
        buf.dispatch_rank_major_into(&self.group, &mut out, &input, c.send_only)?;
        self.finish(call, "ll_dispatch_rank_major")?;
        Ok(LlRankMajor { inner: self.guard(call, Mutex::new(out)), generation, call: call.clone() })
    }

    /// Runs the receive half of a `send_only` rank-major dispatch (no-op when done).
    pub fn ll_complete_rank_major(&self, d: &LlRankMajor) -> Result<()> {
        self.complete_pending(&d.inner, d.generation, &d.call, "ll_dispatch_rank_major", |_| Ok(()))
    }

    /// NCCL EP's rank-major LL combine of `d` into `combined_x` (`[T, hidden]` bf16): the
    /// pending receive of a `send_only` call, if any.
    pub fn ll_combine_rank_major(
        &self,
        call: &CallStream,
        d: &LlRankMajor,
        c: &LlRankMajorCombineCall<'_>,
        combined_x: DeviceBuffer,
    ) -> Result<Option<LlCombinePending>> {
        let mut st = self.lock()?;
        check_generation(st.ll_generation, d.generation)?;
        let buf = st.ll.as_mut().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
        let outs = d.inner.value()?.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
        self.begin(call)?;
        let (t, idx, ty, k) = (c.num_tokens, c.topk_idx, c.index_type, c.num_topk);
        let hook = buf.combine_rank_major(&self.group, &outs, c.x, &combined_x, t, idx, ty, k, c.send_only)?;
        self.finish(call, "ll_combine_rank_major")?;
        let pending = hook.is_some();
        let keep = self.guard(call, Mutex::new(LlCombineOutputs { combined_x, recv_hook: hook }));
        Ok(pending.then(|| LlCombinePending { inner: keep, generation: d.generation, call: call.clone() }))
    }

    /// DeepEP's `low_latency_combine` of `d`'s rows: `(combined_x [T, hidden] bf16 unless
    /// written to `out`, the pending receive of a `send_only` call, event)`.
    #[allow(clippy::type_complexity)]
    pub fn ll_combine(
        &self,
        call: &CallStream,
        d: &LlDispatch,
        c: &LlCombineCall<'_>,
        out: Option<DeviceBuffer>,
    ) -> Result<(Option<Output>, Option<LlCombinePending>, Option<Arc<Event>>)> {
        let mut st = self.lock()?;
        check_generation(st.ll_generation, d.generation)?;
        let buf = st.ll.as_mut().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
        let hidden = buf.config().hidden;
        let outs = d.inner.value()?.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
        if outs.recv_hook.is_some() {
            return Err(Error::invalid("handle", "its dispatch's receive hook has not been called yet"));
        }
        let stats = LlStats { combine_wait_recv_cost_stats: c.wait_stats, ..LlStats::default() };
        let (t, ty, k, send_only) = (c.num_tokens, c.index_type, c.num_topk, c.send_only);
        self.begin(call)?;
        let written = out.is_some();
        let combined = match out {
            Some(target) => {
                let hook = buf.combine_into(
                    &self.group,
                    &outs.handle,
                    c.x,
                    &target,
                    t,
                    c.topk_idx,
                    ty,
                    c.topk_weights,
                    k,
                    send_only,
                    stats,
                )?;
                LlCombineOutputs { combined_x: target, recv_hook: hook }
            }
            None => {
                buf.combine(&self.group, &outs.handle, c.x, t, c.topk_idx, ty, c.topk_weights, k, send_only, stats)?
            }
        };
        let ev = self.finish(call, "ll_combine")?;
        let (ptr, len) = (combined.combined_x.ptr(), combined.combined_x.len());
        let pending = combined.recv_hook.is_some();
        let keep = self.guard(call, Mutex::new(combined));
        let combined_x = (!written).then(|| Output { _owner: keep.clone(), ptr, len: (t * hidden * 2).min(len) });
        let hook = pending.then(|| LlCombinePending { inner: keep, generation: d.generation, call: call.clone() });
        Ok((combined_x, hook, ev))
    }
}

/// Bytes of a route's `topk_idx` copy (`idx_row_bytes` per token) and layout, each rounded
/// to 16, before its maps.
fn route_bytes(num_ranks: usize, num_experts: usize, num_tokens: usize, idx_row_bytes: usize) -> usize {
    let (r, t) = (num_ranks, num_tokens);
    [t * idx_row_bytes, 4 * r, 4 * num_experts, t * r, 4, 4 * num_experts]
        .iter()
        .map(|b| b.max(&1).next_multiple_of(16))
        .sum()
}

/// A relayout synchronises and exchanges with peers: not inside a capture.
fn no_relayout_in_capture(mode: &str) -> Error {
    Error::invalid(
        "x",
        format!(
            "this call needs the {mode} buffer laid out for larger shapes, which can't happen inside a CUDA-graph \
             capture: make one call with the largest shapes before capturing"
        ),
    )
}

fn check_generation(current: u64, generation: u64) -> Result<()> {
    if generation != current {
        return Err(Error::invalid(
            "handle",
            "was made before the buffer was rebuilt for larger shapes; dispatch again",
        ));
    }
    Ok(())
}
