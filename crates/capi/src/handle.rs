//! EP handles: one routing (`topk_idx`) in one layout, and the ops along it.
//!
//! * HT FLAT: `ncclEpUpdateHandle` copies the routing and exchanges its counts
//!   ([`Buffer::ht_route`]); `ncclEpDispatch` sends along it into the caller's outputs
//!   (forward) or along the last forward dispatch's routes (backward, DeepEP's cached
//!   dispatch); `ncclEpCombine` returns rows along the last forward dispatch.
//! * LL expert-major: `ncclEpUpdateHandle` copies the routing; dispatch and combine are
//!   DeepEP's low-latency ops, optionally split by `send_only` + `ncclEpComplete`. The rows
//!   land in the LL buffer and are copied into the caller's `[L, R*M, H]` output once
//!   received (NCCL EP's staged, non-window outputs).
use crate::error::{Failure, Result};
use crate::group::{Algorithm, EpGroup, GroupConfig};
use crate::sys::*;
use crate::tensor::Tensor;
use moe_ep::buffer::{
    HtCombineCall, HtDispatchHandle, HtRoute, HtRouteCall, HtRoutedDispatch, LlCombineCall, LlCombinePending,
    LlDispatch, LlDispatchCall, LlRankMajor, LlRankMajorCall, LlRankMajorCombineCall, LlRecvInto,
};
use moe_ep::expert_major::{ExpertMajorIo, zone_counts};
use moe_ep::intranode::HtCombineOutputs;
use moe_ep::layout::{IndexType, global_expert_ids};
use moe_ep::low_latency::{LlDispatchOptions, LlRankMajorOutputs, LlStats};
use moe_ep::{Buffer, CallStream, Device, DeviceBuffer, Stream};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The layouts this release runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    HtFlat,
    /// Zones per local expert, each a multiple of the alignment.
    HtExpertMajor,
    LlExpertMajor,
    LlRankMajor,
}

impl Layout {
    /// The layout of `raw` for a group of `algorithm`.
    pub fn of(raw: ncclEpLayout_t, algorithm: Algorithm) -> Result<Layout> {
        match (algorithm, raw) {
            (_, NCCL_EP_LAYOUT_UNSET) => Err(Failure::invalid("layout is NCCL_EP_LAYOUT_UNSET: pick one")),
            (Algorithm::HighThroughput, NCCL_EP_LAYOUT_FLAT) => Ok(Layout::HtFlat),
            (Algorithm::LowLatency, NCCL_EP_LAYOUT_EXPERT_MAJOR) => Ok(Layout::LlExpertMajor),
            (Algorithm::LowLatency, NCCL_EP_LAYOUT_RANK_MAJOR) => Ok(Layout::LlRankMajor),
            (Algorithm::HighThroughput, NCCL_EP_LAYOUT_EXPERT_MAJOR) => Ok(Layout::HtExpertMajor),
            (Algorithm::HighThroughput, _) => {
                Err(Failure::invalid(format!("layout {raw}: HT takes FLAT or EXPERT_MAJOR")))
            }
            (Algorithm::LowLatency, _) => {
                Err(Failure::invalid(format!("layout {raw}: LL takes EXPERT_MAJOR or RANK_MAJOR")))
            }
        }
    }
}

/// Where a handle's device memory comes from.
enum Memory {
    /// The caller's (`handle_mem`): never freed here.
    Caller(DeviceBuffer),
    /// The group's `alloc_fn`: `free_fn` on destroy.
    Allocated { buffer: DeviceBuffer, free: ncclEpFreeFn_t, context: usize },
    /// moe-ep's own allocations.
    Own,
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Allocated { buffer, free: Some(free), context } = self {
            // SAFETY: the pointer came from the group's alloc_fn with this context; the
            // handle is being destroyed, so nothing uses it any more. Errors can't be reported.
            let _ = unsafe { free(buffer.ptr() as *mut c_void, *context as *mut c_void) };
        }
    }
}

/// An LL routing: the copy of `topk_idx` the ops read.
struct LlRouting {
    topk_idx: DeviceBuffer,
    index_type: IndexType,
    num_tokens: usize,
}

/// What a handle holds between calls.
#[derive(Default)]
struct State {
    ht_route: Option<HtRoute>,
    ht_dispatch: Option<HtDispatchHandle>,
    /// HT expert-major: the last forward dispatch's flat ids and slot map.
    ht_zones: Option<Zones>,
    /// HT FLAT: write global expert ids (the routing's `recv_topk_idx_kind`).
    ht_global_ids: bool,
    ll_routing: Option<LlRouting>,
    ll_dispatch: Option<LlDispatch>,
    ll_rank_major: Option<LlRankMajor>,
    ll_dispatch_pending: bool,
    /// Rank-major: the caller's `src_rank_counters`, filled when the receive has run.
    ll_counts_to: Option<Tensor>,
    /// Rank-major: the caller's `recv_topk_idx`, made global when the receive has run.
    ll_global_ids: Option<Tensor>,
    ll_combine_pending: Option<LlCombinePending>,
}

/// The flat side of an HT expert-major dispatch, kept for its combine and backward passes:
/// `[rows, K]` i64 local expert ids and `[rows, K]` i32 slots.
struct Zones {
    flat_topk_idx: DeviceBuffer,
    slot_map: DeviceBuffer,
    rows: usize,
}

/// What `ncclEpHandle_t` points to.
pub struct EpHandle {
    buffer: Arc<Buffer>,
    config: GroupConfig,
    layout: Layout,
    /// HT expert-major zone alignment (1: none).
    alignment: usize,
    /// K (LL: fixed at init; HT: from the routing when not given).
    num_topk: Option<usize>,
    memory: Memory,
    /// LL, in `memory` or own ([`ll_sizes`] after the routing copy): expert-major
    /// `packed_recv_layout_range [L, R]` i64 and the epoch word; rank-major `recv_count [R]`
    /// i32, `recv_src_idx [R, M]` i32 and the epoch word.
    ll_small: Vec<DeviceBuffer>,
    state: Mutex<State>,
}

/// The stream context of a call on `stream` (a `cudaStream_t`; ignored on the CPU emulator).
///
/// # Safety
/// `stream` is NULL or a live stream of the group's GPU.
unsafe fn call_on(device: &Device, stream: cudaStream_t) -> CallStream {
    CallStream {
        // SAFETY: forwarded.
        caller: (!device.is_cpu()).then(|| unsafe { Stream::from_raw_shared(device, stream as usize) }),
        ..CallStream::default()
    }
}

/// Bytes of the parts of an LL handle's memory: the routing copy, then [`EpHandle`]'s
/// `ll_small` (none for HT).
fn ll_sizes(cfg: &GroupConfig, layout: Layout, num_ranks: usize, num_topk: usize) -> Vec<usize> {
    let (r, m) = (num_ranks, cfg.max_dispatch_tokens_per_rank);
    let idx = m * num_topk * 8;
    match layout {
        Layout::HtFlat | Layout::HtExpertMajor => vec![],
        Layout::LlExpertMajor => vec![idx, 8 * (cfg.num_experts / r) * r, 8],
        Layout::LlRankMajor => vec![idx, 4 * r, 4 * r * m, 8],
    }
}

/// A view of `b` (no ownership).
///
/// # Safety
/// `b` outlives every use of the view.
unsafe fn lend(dev: &Device, b: &DeviceBuffer) -> DeviceBuffer {
    // SAFETY: forwarded.
    unsafe { DeviceBuffer::borrowed(dev, b.ptr(), b.len()) }
}

/// An LL op may start only once the handle's send-only op (if any) is complete.
fn no_pending(st: &State) -> Result<()> {
    if st.ll_dispatch_pending || st.ll_combine_pending.is_some() {
        return Err(Failure::usage("a send-only op of this handle awaits ncclEpComplete"));
    }
    Ok(())
}

/// Whether `recv_topk_idx_kind` asks for global expert ids (AUTO means LOCAL, as in NCCL EP).
fn id_kind(kind: ncclEpExpertIdKind_t) -> Result<bool> {
    match kind {
        NCCL_EP_EXPERT_ID_AUTO | NCCL_EP_EXPERT_ID_LOCAL => Ok(false),
        NCCL_EP_EXPERT_ID_GLOBAL => Ok(true),
        other => Err(Failure::invalid(format!("layout_info->recv_topk_idx_kind {other} is unknown"))),
    }
}

/// Whether `pass_direction` says backward.
fn backward(pass_direction: ncclEpPassDir_t) -> Result<bool> {
    match pass_direction {
        NCCL_EP_FWD_PASS => Ok(false),
        NCCL_EP_BWD_PASS => Ok(true),
        other => Err(Failure::invalid(format!("config.pass_direction {other} is unknown"))),
    }
}

fn index_type(t: &Tensor) -> Result<IndexType> {
    match t.dtype {
        ncclInt32 => Ok(IndexType::I32),
        ncclInt64 => Ok(IndexType::I64),
        _ => Err(Failure::invalid(format!("{}: ncclInt32 or ncclInt64 expected", t.name))),
    }
}

impl EpHandle {
    fn group(&self) -> &moe_ep::Group {
        self.buffer.group()
    }

    fn device(&self) -> &Device {
        self.group().device()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Failure::usage("the handle was left inconsistent by a failed call"))
    }

    /// Bytes `ncclEpHandleMemSize` reports.
    pub fn memory_bytes(group: &EpGroup, layout: Layout, num_topk: usize) -> Result<usize> {
        let r = group.buffer.group().num_ranks();
        match layout {
            Layout::HtFlat | Layout::HtExpertMajor => {
                Ok(group.buffer.ht_route_bytes(group.config.max_dispatch_tokens_per_rank, num_topk, IndexType::I64)?)
            }
            Layout::LlExpertMajor | Layout::LlRankMajor => {
                Ok(ll_sizes(&group.config, layout, r, num_topk).iter().map(|b| b.next_multiple_of(16)).sum())
            }
        }
    }

    /// `ncclEpInitHandle`: `handle_mem` is the caller's memory (at least `memory_bytes`).
    pub fn new(
        group: &EpGroup,
        layout: Layout,
        alignment: usize,
        num_topk: Option<usize>,
        handle_mem: Option<Tensor>,
    ) -> Result<EpHandle> {
        let (cfg, buffer) = (group.config, group.buffer.clone());
        let device = buffer.group().device().clone();
        let k = match (layout, num_topk) {
            (Layout::LlExpertMajor | Layout::LlRankMajor, None) => {
                return Err(Failure::invalid("num_topk: LL handles need it (> 0)"));
            }
            (_, k) => k,
        };
        if let Some(k) = k
            && (k == 0 || k > moe_ep::limits::MAX_TOPK || (cfg.num_topk > 0 && k > cfg.num_topk))
        {
            let most = if cfg.num_topk > 0 { cfg.num_topk } else { moe_ep::limits::MAX_TOPK };
            return Err(Failure::invalid(format!("num_topk {k} is outside 1..={most}")));
        }
        let need = EpHandle::memory_bytes(group, layout, k.unwrap_or(moe_ep::limits::MAX_TOPK))?;
        let memory = match handle_mem {
            Some(t) => {
                t.expect(&[ncclUint8, ncclInt8], &[None])?;
                if t.bytes() < need || !t.data.is_multiple_of(16) {
                    return Err(Failure::invalid(format!(
                        "handle_mem: {need} bytes (16-aligned) needed (ncclEpHandleMemSize), got {}",
                        t.bytes()
                    )));
                }
                // SAFETY: the caller's memory of the group's GPU, which it keeps until the
                // handle is destroyed (ncclEpInitHandle's contract).
                Memory::Caller(unsafe { t.buffer(&device) })
            }
            None => match cfg.alloc.alloc_fn {
                Some(alloc) => {
                    let mut ptr: *mut c_void = std::ptr::null_mut();
                    // SAFETY: the caller's allocator, called as its type says.
                    let err = unsafe { alloc(&mut ptr, need, cfg.alloc.context) };
                    if err != 0 || ptr.is_null() || !(ptr as u64).is_multiple_of(16) {
                        return Err(Failure {
                            code: ncclUnhandledCudaError,
                            message: format!("alloc_fn({need}) failed: {err}"),
                        });
                    }
                    // SAFETY: `need` bytes just allocated on the group's GPU.
                    let buffer = unsafe { DeviceBuffer::borrowed(&device, ptr as u64, need) };
                    Memory::Allocated { buffer, free: cfg.alloc.free_fn, context: cfg.alloc.context as usize }
                }
                None => Memory::Own,
            },
        };
        let sizes = ll_sizes(&cfg, layout, buffer.group().num_ranks(), k.unwrap_or(1));
        let mut ll_small = Vec::new();
        let mut at = match &memory {
            Memory::Caller(b) | Memory::Allocated { buffer: b, .. } => Some(b.ptr()),
            Memory::Own => None,
        };
        for (i, &bytes) in sizes.iter().enumerate() {
            if let Some(a) = at.as_mut() {
                if i > 0 {
                    // SAFETY: inside the handle's memory (sized by ll_sizes).
                    ll_small.push(unsafe { DeviceBuffer::borrowed(&device, *a, bytes) });
                }
                *a += bytes.next_multiple_of(16) as u64;
            } else if i > 0 {
                ll_small.push(device.alloc(bytes.next_multiple_of(16))?);
            }
        }
        let state = Mutex::new(State::default());
        Ok(EpHandle { buffer, config: cfg, layout, alignment, num_topk: k, memory, ll_small, state })
    }

    /// The handle's memory, or None for moe-ep's own.
    fn caller_memory(&self) -> Option<DeviceBuffer> {
        match &self.memory {
            Memory::Caller(b) | Memory::Allocated { buffer: b, .. } => {
                // SAFETY: the handle's memory outlives what is made from it (the handle).
                Some(unsafe { lend(self.device(), b) })
            }
            Memory::Own => None,
        }
    }

    /// `ncclEpUpdateHandle`: a new routing (collective for HT).
    ///
    /// # Safety
    /// `stream` is NULL or a live stream of the group's GPU; tensors in `layout_info` are
    /// the caller's live memory.
    pub unsafe fn update(
        &self,
        topk_idx: &Tensor,
        layout_info: Option<&ncclEpLayoutInfo_t>,
        stream: cudaStream_t,
    ) -> Result<()> {
        // SAFETY: forwarded.
        let call = unsafe { call_on(self.device(), stream) };
        let ty = index_type(topk_idx)?;
        topk_idx.expect(&[topk_idx.dtype], &[None, self.num_topk])?;
        let (t, k) = (topk_idx.dims[0], topk_idx.dims[1]);
        if t > self.config.max_dispatch_tokens_per_rank {
            return Err(Failure::invalid(format!(
                "topk_idx: {t} tokens > max_dispatch_tokens_per_rank {}",
                self.config.max_dispatch_tokens_per_rank
            )));
        }
        // SAFETY: the caller's tensor on the group's GPU, alive for the call.
        let idx = unsafe { topk_idx.buffer(self.device()) };
        let mut st = self.lock()?;
        match self.layout {
            Layout::HtFlat | Layout::HtExpertMajor => {
                let info = HtLayoutInfo::read(layout_info)?;
                let call_ = HtRouteCall {
                    topk_idx: &idx,
                    index_type: ty,
                    num_tokens: t,
                    num_topk: k,
                    expert_alignment: self.alignment,
                    shapes: self.config.ht_shapes(),
                    memory: self.caller_memory(),
                    recv_budget: self.config.drop_overflow.then_some(self.config.max_recv_tokens_per_rank),
                };
                (st.ht_dispatch, st.ht_route, st.ht_zones) = (None, None, None);
                // Expert-major writes no ids: the kind applies to FLAT only.
                st.ht_global_ids = info.global_ids && self.layout == Layout::HtFlat;
                let route = self.buffer.ht_route(&call, call_)?;
                info.write(&self.buffer, &call, &route, self.layout, self.cut_at())?;
                st.ht_route = Some(route);
            }
            Layout::LlExpertMajor | Layout::LlRankMajor => {
                if let Some(info) = layout_info
                    && [info.expert_counters, info.src_rank_counters, info.expert_offsets, info.recv_total_counter]
                        .iter()
                        .any(|p| !p.is_null())
                {
                    return Err(Failure::invalid("layout_info: LL handles take none at update (pass NULL)"));
                }
                let bytes = t * k * ty.bytes();
                let copy = match self.caller_memory() {
                    Some(m) => m,
                    None => match st.ll_routing.take() {
                        Some(old) if old.topk_idx.len() >= bytes.max(16) => old.topk_idx,
                        _ => self.device().alloc((self.config.max_dispatch_tokens_per_rank * k * 8).max(16))?,
                    },
                };
                self.buffer.run(&call, |s| if bytes > 0 { copy.copy_from_async(s, &idx, bytes) } else { Ok(()) })?;
                st.ll_dispatch = None;
                st.ll_rank_major = None;
                st.ll_dispatch_pending = false;
                st.ll_counts_to = None;
                st.ll_global_ids = None;
                st.ll_combine_pending = None;
                st.ll_routing = Some(LlRouting { topk_idx: copy, index_type: ty, num_tokens: t });
            }
        }
        Ok(())
    }

    /// `ncclEpDispatch`.
    ///
    /// # Safety
    /// As [`EpHandle::update`], for every tensor the structs name.
    pub unsafe fn dispatch(
        &self,
        inputs: &ncclEpDispatchInputs_t,
        outputs: &ncclEpDispatchOutputs_t,
        layout_info: Option<&ncclEpLayoutInfo_t>,
        cfg: &ncclEpDispatchConfig_t,
        stream: cudaStream_t,
    ) -> Result<()> {
        // SAFETY: (whole body) the caller's descriptors and memory (this fn's contract).
        unsafe {
            let call = call_on(self.device(), stream);
            let x = Tensor::required("inputs->tokens", inputs.tokens)?;
            let weights = Tensor::from_ptr("inputs->topk_weights", inputs.topk_weights)?;
            let scales = Tensor::from_ptr("inputs->scales", inputs.scales)?;
            let recv_x = Tensor::required("outputs->tokens", outputs.tokens)?;
            let recv_weights = Tensor::from_ptr("outputs->topk_weights", outputs.topk_weights)?;
            let recv_scales = Tensor::from_ptr("outputs->scales", outputs.scales)?;
            let recv_idx = Tensor::from_ptr("outputs->topk_idx", outputs.topk_idx)?;
            let quant = cfg.quant_recipe;
            if cfg.round_scales != 0 && quant != NCCL_EP_DISP_QUANT_DS_FP8E3M4 {
                return Err(Failure::invalid("config.round_scales applies to the DS_FP8E3M4 recipe only"));
            }
            match quant {
                NCCL_EP_DISP_QUANT_NONE if scales.is_some() || recv_scales.is_some() => {
                    return Err(Failure::invalid("scales given without the QUANT_FWD recipe"));
                }
                NCCL_EP_DISP_QUANT_NONE => {}
                NCCL_EP_DISP_QUANT_FWD => {}
                NCCL_EP_DISP_QUANT_DS_FP8E3M4 if self.layout == Layout::LlExpertMajor => {
                    if scales.is_some() || recv_scales.is_none() {
                        return Err(Failure::invalid(
                            "DS_FP8E3M4 makes the scales: outputs->scales is required, inputs->scales is not taken",
                        ));
                    }
                }
                NCCL_EP_DISP_QUANT_DS_FP8E3M4 => {
                    return Err(Failure::usage(format!(
                        "quant_recipe {quant} is not supported by this release for this layout"
                    )));
                }
                other => return Err(Failure::invalid(format!("config.quant_recipe {other} is unknown"))),
            }
            let mut st = self.lock()?;
            match self.layout {
                Layout::HtFlat | Layout::HtExpertMajor => {
                    if cfg.send_only != 0 {
                        return Err(Failure::usage("config.send_only is for LL; HT dispatches complete on their own"));
                    }
                    if HtLayoutInfo::read(layout_info)?.any() {
                        return Err(Failure::invalid(
                            "layout_info: HT counters come from ncclEpUpdateHandle (pass NULL)",
                        ));
                    }
                    let bwd = backward(cfg.pass_direction)?;
                    self.ht_dispatch(
                        &mut st,
                        &call,
                        bwd,
                        [Some(x), weights, scales],
                        [Some(recv_x), recv_weights, recv_scales, recv_idx],
                    )
                }
                Layout::LlExpertMajor => {
                    for (t, what) in [
                        (&weights, "inputs->topk_weights"),
                        (&recv_weights, "outputs->topk_weights"),
                        (&recv_idx, "outputs->topk_idx"),
                    ] {
                        if t.is_some() {
                            return Err(Failure::invalid(format!(
                                "{what}: not used by the LL expert-major layout (pass NULL)"
                            )));
                        }
                    }
                    let counters = layout_info
                        .and_then(|i| Tensor::from_ptr("layout_info->expert_counters", i.expert_counters).transpose())
                        .transpose()?;
                    let Some(counters) = counters else {
                        return Err(Failure::invalid(
                            "layout_info->expert_counters is required by the LL expert-major layout",
                        ));
                    };
                    // DS_FP8E3M4 casts in the kernel; QUANT_FWD sends fp8 rows and their scales.
                    let fp8 = match (quant, scales, recv_scales) {
                        (NCCL_EP_DISP_QUANT_FWD, Some(s), Some(rs)) => Some((rs, false, Some(s))),
                        (NCCL_EP_DISP_QUANT_FWD, ..) => {
                            return Err(Failure::invalid("QUANT_FWD needs both inputs->scales and outputs->scales"));
                        }
                        (_, _, rs) => rs.map(|rs| (rs, cfg.round_scales != 0, None)),
                    };
                    self.ll_dispatch(&mut st, &call, &x, &recv_x, fp8, &counters, cfg.send_only != 0)
                }
                Layout::LlRankMajor => {
                    let (Some(w), Some(rw), Some(ri)) = (weights, recv_weights, recv_idx) else {
                        return Err(Failure::invalid(
                            "the LL rank-major layout needs inputs->topk_weights, outputs->topk_weights and outputs->topk_idx",
                        ));
                    };
                    let counts = match layout_info {
                        Some(i) => {
                            if !i.expert_counters.is_null()
                                || !i.expert_offsets.is_null()
                                || !i.recv_total_counter.is_null()
                            {
                                return Err(Failure::invalid(
                                    "layout_info: the LL rank-major layout fills src_rank_counters only",
                                ));
                            }
                            Tensor::from_ptr("layout_info->src_rank_counters", i.src_rank_counters)?
                        }
                        None => None,
                    };
                    st.ll_global_ids = match layout_info {
                        Some(i) if id_kind(i.recv_topk_idx_kind)? => Some(ri.clone()),
                        _ => None,
                    };
                    // QUANT_FWD: e4m3 rows and their scales, sent as they are.
                    let fp8 = match (quant, scales, recv_scales) {
                        (NCCL_EP_DISP_QUANT_FWD, Some(s), Some(rs)) => Some([s, rs]),
                        (NCCL_EP_DISP_QUANT_FWD, ..) => {
                            return Err(Failure::invalid("QUANT_FWD needs both inputs->scales and outputs->scales"));
                        }
                        _ => None,
                    };
                    self.ll_dispatch_rank_major(
                        &mut st,
                        &call,
                        [&x, &w],
                        [&recv_x, &rw, &ri],
                        fp8,
                        counts,
                        cfg.send_only != 0,
                    )
                }
            }
        }
    }

    /// HT dispatch: forward along the route, or backward along the last forward dispatch.
    fn ht_dispatch(
        &self,
        st: &mut State,
        call: &CallStream,
        bwd: bool,
        [x, weights, scales]: [Option<Tensor>; 3],
        [recv_x, recv_weights, recv_scales, recv_idx]: [Option<Tensor>; 4],
    ) -> Result<()> {
        let (x, recv_x) = (x.expect("required"), recv_x.expect("required"));
        let dev = self.device().clone();
        const TOKEN_TYPES: [ncclDataType_t; 5] =
            [ncclBfloat16, ncclFloat16, ncclFloat32, ncclFloat8e4m3, ncclFloat8e5m2];
        x.expect(&TOKEN_TYPES, &[None, None])?;
        let hidden_bytes = x.bytes() / x.dims[0].max(1);
        let hidden_bytes =
            if x.dims[0] == 0 { x.dims[1] * crate::tensor::element_bytes(x.dtype).unwrap_or(1) } else { hidden_bytes };
        if hidden_bytes > self.config.max_token_bytes || !hidden_bytes.is_multiple_of(16) {
            return Err(Failure::invalid(format!(
                "inputs->tokens: {hidden_bytes} bytes per token must be a multiple of 16 up to max_token_bytes {}",
                self.config.max_token_bytes
            )));
        }
        let rows = recv_x.dims.first().copied().unwrap_or(0);
        recv_x.expect(&[x.dtype], &[None, Some(x.dims[1])])?;
        let max_recv = self.config.max_recv_tokens_per_rank;
        if rows < max_recv {
            return Err(Failure::invalid(format!(
                "outputs->tokens: {rows} rows, fewer than the group's max_recv_tokens_per_rank {max_recv}"
            )));
        }
        let s = match (&scales, &recv_scales) {
            (Some(s), Some(rs)) => {
                s.expect(&[ncclFloat32], &[Some(x.dims[0]), None])?;
                rs.expect(&[ncclFloat32], &[Some(rows), Some(s.dims[1])])?;
                Some(s.dims[1])
            }
            (None, None) => None,
            _ => return Err(Failure::invalid("QUANT_FWD needs both inputs->scales and outputs->scales")),
        };
        if let Some(s) = s
            && self.layout == Layout::HtExpertMajor
            && !s.is_multiple_of(4)
        {
            return Err(Failure::invalid(format!(
                "HT EXPERT_MAJOR QUANT_FWD: {s} scales per token; the zones move 16-byte rows, so it must be a multiple of 4"
            )));
        }
        // SAFETY: (views below) the caller's live memory on the group's GPU, as described.
        let buf = |t: &Tensor| unsafe { t.buffer(&dev) };
        let (xb, sb) = (buf(&x), scales.as_ref().map(buf));
        if bwd {
            for (t, what) in [
                (&weights, "inputs->topk_weights"),
                (&recv_weights, "outputs->topk_weights"),
                (&recv_idx, "outputs->topk_idx"),
            ] {
                if t.is_some() {
                    return Err(Failure::invalid(format!("{what}: a backward dispatch takes none")));
                }
            }
            let Some(h) = &st.ht_dispatch else {
                return Err(Failure::usage("a backward dispatch follows a forward dispatch of the handle"));
            };
            x.expect(&TOKEN_TYPES, &[Some(h.num_tokens), None])?;
            if rows != h.num_rows {
                return Err(Failure::invalid(format!(
                    "outputs->tokens: {rows} rows given, the forward dispatch had {}",
                    h.num_rows
                )));
            }
            if self.layout == Layout::HtExpertMajor {
                // Along the routes into flat rows, then into the zones of the forward pass.
                let Some(z) = &st.ht_zones else {
                    return Err(Failure::usage("a backward dispatch follows a forward dispatch of the handle"));
                };
                let stream = self.group().stream();
                let flat = stream.alloc_uninit((h.num_rows * hidden_bytes).max(16))?;
                let flat_scales = s.map(|s| stream.alloc_uninit((h.num_rows * 4 * s).max(16))).transpose()?;
                // SAFETY: the staging lives until after the permutes are queued (stream-ordered free).
                let out = unsafe { (lend(&dev, &flat), flat_scales.as_ref().map(|b| lend(&dev, b))) };
                self.buffer.ht_dispatch_cached(call, h, &xb, hidden_bytes, sb.as_ref().zip(s), Some(out))?;
                let em_x = buf(&recv_x);
                let (idx, map) = (&z.flat_topk_idx, &z.slot_map);
                self.ht_permute(st, call, [&flat, idx], None, [&em_x, map], None, hidden_bytes, rows)?;
                if let (Some(from), Some(to), Some(s)) = (&flat_scales, &recv_scales, s) {
                    self.ht_permute(st, call, [from, idx], None, [&buf(to), map], None, 4 * s, rows)?;
                }
                return Ok(());
            }
            let out = (buf(&recv_x), recv_scales.as_ref().map(buf));
            self.buffer.ht_dispatch_cached(call, h, &xb, hidden_bytes, sb.as_ref().zip(s), Some(out))?;
            return Ok(());
        }
        let Some(route) = &st.ht_route else {
            return Err(Failure::usage("ncclEpUpdateHandle must run before the handle's first dispatch"));
        };
        let (t, k) = (route.num_tokens, route.num_topk);
        x.expect(&TOKEN_TYPES, &[Some(t), None])?;
        let Some(weights) = weights else {
            return Err(Failure::invalid("inputs->topk_weights is required by a forward HT dispatch"));
        };
        weights.expect(&[ncclFloat32], &[Some(t), Some(k)])?;
        if self.layout == Layout::HtExpertMajor {
            let (Some(recv_weights), None) = (recv_weights, &recv_idx) else {
                return Err(Failure::invalid(
                    "HT EXPERT_MAJOR: outputs->topk_weights ([slots]) is required; outputs->topk_idx is not taken",
                ));
            };
            recv_weights.expect(&[ncclFloat32], &[Some(rows)])?;
            // A FLAT dispatch into staging (each received row needs at least one slot, so
            // `rows` flat rows always fit), then the rows into their zones.
            let stream = self.group().stream();
            let flat = [
                stream.alloc_uninit((rows * hidden_bytes).max(16))?,
                stream.alloc(rows * k * 8 + 16)?,
                stream.alloc_uninit(rows * k * 4 + 16)?,
            ];
            let flat_scales = s.map(|s| stream.alloc_uninit((rows * 4 * s).max(16))).transpose()?;
            let wb = buf(&weights);
            // SAFETY: the staging lives until after the permutes are queued (stream-ordered free).
            let d = unsafe {
                HtRoutedDispatch {
                    x: &xb,
                    hidden_bytes,
                    x_scales: sb.as_ref().zip(s),
                    topk_weights: &wb,
                    rows,
                    recv_x: lend(&dev, &flat[0]),
                    recv_x_scales: flat_scales.as_ref().map(|b| lend(&dev, b)),
                    recv_topk_idx: lend(&dev, &flat[1]),
                    recv_topk_weights: lend(&dev, &flat[2]),
                }
            };
            let (handle, _) = self.buffer.ht_dispatch_routed(call, route, d)?;
            st.ht_dispatch = Some(handle);
            let slot_map = stream.alloc(rows * k * 4 + 16)?;
            let [flat_x, flat_idx, flat_w] = flat;
            let em = [buf(&recv_x), buf(&recv_weights)];
            self.ht_permute(
                st,
                call,
                [&flat_x, &flat_idx],
                Some(&flat_w),
                [&em[0], &slot_map],
                Some(&em[1]),
                hidden_bytes,
                rows,
            )?;
            // QUANT_FWD: the scales rows into the same slots (the slot map comes out the same).
            if let (Some(from), Some(to), Some(s)) = (&flat_scales, &recv_scales, s) {
                self.ht_permute(st, call, [from, &flat_idx], None, [&buf(to), &slot_map], None, 4 * s, rows)?;
            }
            st.ht_zones = Some(Zones { flat_topk_idx: flat_idx, slot_map, rows });
            return Ok(());
        }
        let (Some(recv_weights), Some(recv_idx)) = (recv_weights, recv_idx) else {
            return Err(Failure::invalid(
                "outputs->topk_weights and outputs->topk_idx are required by the HT FLAT layout",
            ));
        };
        recv_weights.expect(&[ncclFloat32], &[Some(rows), Some(k)])?;
        recv_idx.expect(&[ncclInt64], &[Some(rows), Some(k)])?;
        let wb = buf(&weights);
        let d = HtRoutedDispatch {
            x: &xb,
            hidden_bytes,
            x_scales: sb.as_ref().zip(s),
            topk_weights: &wb,
            rows,
            recv_x: buf(&recv_x),
            recv_x_scales: recv_scales.as_ref().map(buf),
            recv_topk_idx: buf(&recv_idx),
            recv_topk_weights: buf(&recv_weights),
        };
        let (handle, _) = self.buffer.ht_dispatch_routed(call, route, d)?;
        st.ht_dispatch = Some(handle);
        if st.ht_global_ids {
            let (ids, l) = (buf(&recv_idx), self.config.num_experts / self.group().num_ranks());
            self.buffer.run(call, |_| global_expert_ids(self.group(), &ids, None, 1, rows, k, 8, l))?;
        }
        Ok(())
    }

    /// Queues the permute of a dispatch's flat rows into the zones `em_x` (`rows` slots).
    #[allow(clippy::too_many_arguments)]
    fn ht_permute(
        &self,
        st: &State,
        call: &CallStream,
        [flat_x, flat_topk_idx]: [&DeviceBuffer; 2],
        flat_topk_weights: Option<&DeviceBuffer>,
        [em_x, slot_map]: [&DeviceBuffer; 2],
        em_weights: Option<&DeviceBuffer>,
        row_bytes: usize,
        slots: usize,
    ) -> Result<()> {
        let route = st.ht_route.as_ref().ok_or_else(|| Failure::usage("no routing (ncclEpUpdateHandle)"))?;
        let (num_rows, counts) = self.route_counts(route)?;
        let io = ExpertMajorIo {
            flat_x,
            flat_topk_idx,
            flat_topk_weights,
            num_rows: &num_rows,
            expert_counts: &counts,
            em_x,
            em_weights,
            slot_map,
            row_bytes,
            max_rows: flat_x.len() / row_bytes,
            num_slots: self.cut_at().map_or(slots, |c| c.min(slots)),
            num_topk: route.num_topk,
            num_local_experts: counts.len() / 4,
            drop_overflow: self.cut_at().is_some(),
        };
        Ok(self.buffer.run(call, |_| io.permute(self.group()))?)
    }

    /// Queues the reduce of the zones `em_x` (`slots` bf16 rows of `hidden`, and their
    /// weights) back to one flat row (and `[rows, K]` weights) per dispatched row.
    fn ht_reduce(
        &self,
        st: &State,
        call: &CallStream,
        em_x: &DeviceBuffer,
        em_weights: Option<&DeviceBuffer>,
        slots: usize,
        hidden: usize,
    ) -> Result<(DeviceBuffer, Option<DeviceBuffer>)> {
        let (Some(route), Some(z)) = (&st.ht_route, &st.ht_zones) else {
            return Err(Failure::usage("a combine follows a forward dispatch of the handle"));
        };
        let (num_rows, counts) = self.route_counts(route)?;
        let stream = self.group().stream();
        let k = route.num_topk;
        let flat = stream.alloc_uninit((z.rows * 2 * hidden).max(16))?;
        let flat_w = em_weights.map(|_| stream.alloc_uninit(z.rows * k * 4 + 16)).transpose()?;
        let io = ExpertMajorIo {
            flat_x: &flat,
            flat_topk_idx: &z.flat_topk_idx,
            flat_topk_weights: flat_w.as_ref(),
            num_rows: &num_rows,
            expert_counts: &counts,
            em_x,
            em_weights,
            slot_map: &z.slot_map,
            row_bytes: 2 * hidden,
            max_rows: z.rows,
            num_slots: self.cut_at().map_or(slots, |c| c.min(slots)),
            num_topk: k,
            num_local_experts: counts.len() / 4,
            drop_overflow: self.cut_at().is_some(),
        };
        self.buffer.run(call, |_| io.reduce(self.group()))?;
        Ok((flat, flat_w))
    }

    /// Under the DROP policy, the slots HT expert-major zones are cut at (the group's
    /// `max_recv_tokens_per_rank`, which counts slots there, as in NCCL EP).
    fn cut_at(&self) -> Option<usize> {
        self.config.drop_overflow.then_some(self.config.max_recv_tokens_per_rank)
    }

    /// Views of a route's received-row count (`[1]` i32) and zone sizes (`[L]` i32).
    fn route_counts(&self, route: &HtRoute) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let (rows, counts) = (route.num_recv_tokens()?, route.num_recv_tokens_per_expert()?);
        let dev = self.device();
        // SAFETY: the route's memory, alive while the handle holds the route (every use is
        // queued before the route can be replaced).
        Ok(unsafe {
            (
                DeviceBuffer::borrowed(dev, rows.ptr(), rows.len()),
                DeviceBuffer::borrowed(dev, counts.ptr(), counts.len()),
            )
        })
    }

    /// What every LL dispatch checks first: nothing pending, a routing, and `x` `[T, H]` of
    /// `x_type` with `H` within the group's rows. Returns the routing, `T` and `H`.
    fn ll_dispatch_start<'s>(
        &self,
        st: &'s State,
        x: &Tensor,
        x_type: ncclDataType_t,
    ) -> Result<(&'s LlRouting, usize, usize)> {
        no_pending(st)?;
        let Some(routing) = &st.ll_routing else {
            return Err(Failure::usage("ncclEpUpdateHandle must run before the handle's first dispatch"));
        };
        let t = routing.num_tokens;
        x.expect(&[x_type], &[Some(t), None])?;
        let (h, most) = (x.dims[1], self.config.hidden());
        if h > most {
            return Err(Failure::invalid(format!("inputs->tokens: hidden {h} > max_token_bytes / 2 = {most}")));
        }
        Ok((routing, t, h))
    }

    /// LL expert-major dispatch; the rows reach `recv_x` when the receive has run. `fp8`:
    /// the output scales, `round_scales`, and for QUANT_FWD the input's scales (`x` is then
    /// e4m3).
    #[allow(clippy::too_many_arguments)]
    fn ll_dispatch(
        &self,
        st: &mut State,
        call: &CallStream,
        x: &Tensor,
        recv_x: &Tensor,
        fp8: Option<(Tensor, bool, Option<Tensor>)>,
        counters: &Tensor,
        send_only: bool,
    ) -> Result<()> {
        let forward = fp8.as_ref().and_then(|f| f.2.as_ref());
        let x_type = if forward.is_some() { ncclFloat8e4m3 } else { ncclBfloat16 };
        let (routing, t, h) = self.ll_dispatch_start(st, x, x_type)?;
        let (r, cfg) = (self.group().num_ranks(), &self.config);
        let (l, m) = (cfg.num_experts / r, cfg.max_dispatch_tokens_per_rank);
        // DS_FP8E3M4: e4m3 rows and their f32 scales, one per 128 channels, token-major.
        let row_type = if fp8.is_some() { ncclFloat8e4m3 } else { ncclBfloat16 };
        recv_x.expect(&[row_type], &[Some(l), Some(r * m), Some(h)])?;
        if let Some((scales, _, x_scales)) = &fp8 {
            if !h.is_multiple_of(128) {
                return Err(Failure::invalid(format!("fp8 rows: hidden {h} is not a multiple of 128")));
            }
            scales.expect(&[ncclFloat32], &[Some(l), Some(r * m), Some(h / 128)])?;
            if let Some(xs) = x_scales {
                xs.expect(&[ncclFloat32], &[Some(t), Some(h / 128)])?;
            }
        }
        counters.expect(&[ncclInt32], &[Some(l)])?;
        let dev = self.device();
        let [ranges, epoch] = &self.ll_small[..] else { return Err(Failure::usage("not an LL expert-major handle")) };
        // SAFETY: (views) the caller's live tensors and the handle's memory, on its GPU.
        let (xb, counts, into) = unsafe { (x.buffer(dev), counters.buffer(dev), recv_x.buffer(dev)) };
        // SAFETY: the caller's scales tensor, alive for the call (the send reads it).
        let x_scales = forward.map(|s| unsafe { s.buffer(dev) });
        // SAFETY: the handle's memory (ll_small), alive as long as the handle.
        let small = unsafe { [counts, lend(dev, ranges), lend(dev, epoch)] };
        let c = LlDispatchCall {
            x: &xb,
            num_tokens: t,
            hidden: h,
            topk_idx: &routing.topk_idx,
            index_type: routing.index_type,
            num_topk: self.num_topk.unwrap_or(0),
            max_tokens: m,
            num_experts: cfg.num_experts,
            options: LlDispatchOptions {
                send_only,
                use_fp8: fp8.is_some(),
                round_scale: fp8.as_ref().is_some_and(|f| f.1),
                use_ue8m0: false,
                x_scales: x_scales.as_ref(),
            },
            small: Some(small),
            stats: LlStats::default(),
            // SAFETY: the caller's scales tensor, alive until the receive has run.
            recv_into: Some(LlRecvInto { x: into, x_scales: fp8.as_ref().map(|(s, ..)| unsafe { s.buffer(dev) }) }),
        };
        let (d, _) = self.buffer.ll_dispatch(call, c)?;
        st.ll_dispatch = Some(d);
        st.ll_dispatch_pending = send_only;
        Ok(())
    }

    /// LL rank-major dispatch into the caller's `[R, M, H]` rows, `[R, M, K]` weights and
    /// ids; the per-source counts stay in the handle (the combine reads them) and are copied
    /// to `counts` when the receive has run. `fp8` (QUANT_FWD): the input's `[T, H/128]` and
    /// the output's `[R, M, H/128]` f32 scales; the rows are then e4m3.
    #[allow(clippy::too_many_arguments)]
    fn ll_dispatch_rank_major(
        &self,
        st: &mut State,
        call: &CallStream,
        [x, weights]: [&Tensor; 2],
        [recv_x, recv_weights, recv_idx]: [&Tensor; 3],
        fp8: Option<[Tensor; 2]>,
        counts: Option<Tensor>,
        send_only: bool,
    ) -> Result<()> {
        let row_type = if fp8.is_some() { ncclFloat8e4m3 } else { ncclBfloat16 };
        let (routing, t, h) = self.ll_dispatch_start(st, x, row_type)?;
        let (r, cfg, k) = (self.group().num_ranks(), &self.config, self.num_topk.unwrap_or(0));
        let m = cfg.max_dispatch_tokens_per_rank;
        weights.expect(&[ncclFloat32], &[Some(t), Some(k)])?;
        recv_x.expect(&[row_type], &[Some(r), Some(m), Some(h)])?;
        if let Some([x_scales, recv_scales]) = &fp8 {
            if !h.is_multiple_of(128) {
                return Err(Failure::invalid(format!("fp8 rows: hidden {h} is not a multiple of 128")));
            }
            x_scales.expect(&[ncclFloat32], &[Some(t), Some(h / 128)])?;
            recv_scales.expect(&[ncclFloat32], &[Some(r), Some(m), Some(h / 128)])?;
        }
        recv_weights.expect(&[ncclFloat32], &[Some(r), Some(m), Some(k)])?;
        recv_idx.expect(&[ncclInt32, ncclInt64], &[Some(r), Some(m), Some(k)])?;
        if let Some(c) = &counts {
            c.expect(&[ncclInt32], &[Some(r)])?;
        }
        let [count, src_idx, epoch] = &self.ll_small[..] else {
            return Err(Failure::usage("not an LL rank-major handle"));
        };
        let dev = self.device();
        // SAFETY: the caller's live tensors on the group's GPU.
        let (xb, wb) = unsafe { (x.buffer(dev), weights.buffer(dev)) };
        let [x_scales, recv_scales] = match &fp8 {
            // SAFETY: the caller's scales tensors, alive for the call (checked above).
            Some([xs, rs]) => unsafe { [Some(xs.buffer(dev)), Some(rs.buffer(dev))] },
            None => [None, None],
        };
        // SAFETY: the caller's live tensors, and the handle's memory, alive as long as the
        // handle (and what it holds).
        let mut outputs = unsafe {
            LlRankMajorOutputs::in_memory(
                [
                    recv_x.buffer(dev),
                    lend(dev, count),
                    lend(dev, src_idx),
                    recv_idx.buffer(dev),
                    recv_weights.buffer(dev),
                    lend(dev, epoch),
                ],
                if recv_idx.dtype == ncclInt32 { 4 } else { 8 },
            )
        };
        outputs.recv_x_scales = recv_scales;
        let c = LlRankMajorCall {
            x: &xb,
            x_scales: x_scales.as_ref(),
            num_tokens: t,
            hidden: h,
            topk_idx: &routing.topk_idx,
            index_type: routing.index_type,
            topk_weights: &wb,
            num_topk: k,
            max_tokens: m,
            num_experts: cfg.num_experts,
            send_only,
            outputs,
        };
        st.ll_rank_major = Some(self.buffer.ll_dispatch_rank_major(call, c)?);
        st.ll_dispatch_pending = send_only;
        st.ll_counts_to = counts;
        if !send_only {
            self.copy_counts(st, call)?;
        }
        Ok(())
    }

    /// After a rank-major dispatch's receive: its counts to the caller's
    /// `src_rank_counters`, its ids made global when asked.
    fn copy_counts(&self, st: &mut State, call: &CallStream) -> Result<()> {
        let [count, ..] = &self.ll_small[..] else { return Ok(()) };
        let dev = self.device();
        if let Some(to) = st.ll_counts_to.take() {
            // SAFETY: the caller's tensor (checked [R] i32 at dispatch) and the handle's counts.
            let into = unsafe { to.buffer(dev) };
            self.buffer.run(call, |s| into.copy_from_async(s, count, into.len()))?;
        }
        if let Some(ids) = st.ll_global_ids.take() {
            let (r, l, width) = (
                self.group().num_ranks(),
                self.config.num_experts / self.group().num_ranks(),
                ids.bytes() / ids.numel().max(1),
            );
            // SAFETY: the caller's recv_topk_idx (checked [R, M, K] at dispatch).
            let b = unsafe { ids.buffer(dev) };
            let (m, k) = (ids.dims[1], ids.dims[2]);
            self.buffer.run(call, |_| global_expert_ids(self.group(), &b, Some(count), r, m, k, width, l))?;
        }
        Ok(())
    }

    /// `ncclEpCombine`.
    ///
    /// # Safety
    /// As [`EpHandle::dispatch`].
    pub unsafe fn combine(
        &self,
        inputs: &ncclEpCombineInputs_t,
        outputs: &ncclEpCombineOutputs_t,
        cfg: &ncclEpCombineConfig_t,
        stream: cudaStream_t,
    ) -> Result<()> {
        // SAFETY: (whole body) the caller's descriptors and memory (this fn's contract).
        unsafe {
            let call = call_on(self.device(), stream);
            let x = Tensor::required("inputs->tokens", inputs.tokens)?;
            let weights = Tensor::from_ptr("inputs->topk_weights", inputs.topk_weights)?;
            let out = Tensor::required("outputs->tokens", outputs.tokens)?;
            let out_weights = Tensor::from_ptr("outputs->topk_weights", outputs.topk_weights)?;
            if !inputs.scales.is_null() || cfg.quant_recipe != NCCL_EP_COMB_QUANT_NONE {
                return Err(Failure::usage("combine quantization (NVFP4) is not supported by this release"));
            }
            let dev = self.device().clone();
            let buf = |t: &Tensor| t.buffer(&dev);
            let mut st = self.lock()?;
            match self.layout {
                Layout::HtFlat | Layout::HtExpertMajor => {
                    if cfg.send_only != 0 {
                        return Err(Failure::usage("config.send_only is for LL; HT combines complete on their own"));
                    }
                    let bwd = backward(cfg.pass_direction)?;
                    let Some(h) = &st.ht_dispatch else {
                        return Err(Failure::usage("a combine follows a forward dispatch of the handle"));
                    };
                    let em = self.layout == Layout::HtExpertMajor;
                    // Expert-major: the slots of the dispatch (its output's rows); FLAT: its rows.
                    let slots = if em { x.dims.first().copied().unwrap_or(0) } else { h.num_rows };
                    x.expect(&[ncclBfloat16], &[Some(slots), None])?;
                    let hidden = x.dims[1];
                    out.expect(&[ncclBfloat16], &[Some(h.num_tokens), Some(hidden)])?;
                    let k = st.ht_route.as_ref().map_or(0, |r| r.num_topk);
                    let w_rows = if em { None } else { Some(h.num_rows) };
                    let weights = match (bwd, weights, out_weights) {
                        (false, None, None) => None,
                        (false, _, _) => {
                            return Err(Failure::invalid(
                                "topk_weights: a forward HT combine takes none (apply them before)",
                            ));
                        }
                        (true, Some(w), Some(ow)) => {
                            match w_rows {
                                Some(rows) => w.expect(&[ncclFloat32], &[Some(rows), Some(k)])?,
                                None => w.expect(&[ncclFloat32], &[Some(slots)])?, // one per slot
                            };
                            ow.expect(&[ncclFloat32], &[Some(h.num_tokens), Some(k)])?;
                            Some((buf(&w), buf(&ow)))
                        }
                        (true, _, _) => {
                            return Err(Failure::invalid(
                                "a backward HT combine needs inputs->topk_weights and outputs->topk_weights",
                            ));
                        }
                    };
                    let (mut xb, (mut w_in, w_out)) = (buf(&x), weights.unzip());
                    let _keep; // expert-major: the flat rows (and weights) the zones reduce to
                    if em {
                        let (flat, flat_w) = self.ht_reduce(&st, &call, &xb, w_in.as_ref(), slots, hidden)?;
                        // Views of the staging, kept alive below until after the combine.
                        (xb, w_in) = (lend(&dev, &flat), flat_w.as_ref().map(|b| lend(&dev, b)));
                        _keep = (flat, flat_w);
                    }
                    let c = HtCombineCall {
                        x: &xb,
                        hidden,
                        topk_weights: w_in.as_ref().map(|w| (w, k)),
                        bias: [None, None],
                    };
                    let into = HtCombineOutputs { combined_x: buf(&out), combined_topk_weights: w_out };
                    self.buffer.ht_combine(&call, h, &c, Some(into))?;
                    Ok(())
                }
                Layout::LlRankMajor => {
                    if weights.is_some() || out_weights.is_some() {
                        return Err(Failure::invalid(
                            "topk_weights: the LL rank-major combine takes none (rows come pre-reduced)",
                        ));
                    }
                    no_pending(&st)?;
                    let (Some(d), Some(routing)) = (&st.ll_rank_major, &st.ll_routing) else {
                        return Err(Failure::usage("a combine follows a dispatch of the handle"));
                    };
                    let (r, m, t) =
                        (self.group().num_ranks(), self.config.max_dispatch_tokens_per_rank, routing.num_tokens);
                    x.expect(&[ncclBfloat16], &[Some(r), Some(m), None])?;
                    out.expect(&[ncclBfloat16], &[Some(t), Some(x.dims[2])])?;
                    let xb = buf(&x);
                    let c = LlRankMajorCombineCall {
                        x: &xb,
                        num_tokens: t,
                        topk_idx: &routing.topk_idx,
                        index_type: routing.index_type,
                        num_topk: self.num_topk.unwrap_or(0),
                        send_only: cfg.send_only != 0,
                    };
                    st.ll_combine_pending = self.buffer.ll_combine_rank_major(&call, d, &c, buf(&out))?;
                    Ok(())
                }
                Layout::LlExpertMajor => {
                    if weights.is_some() {
                        return Err(Failure::invalid(
                            "inputs->topk_weights: LL takes the weights in outputs->topk_weights",
                        ));
                    }
                    no_pending(&st)?;
                    let (Some(d), Some(routing)) = (&st.ll_dispatch, &st.ll_routing) else {
                        return Err(Failure::usage("a combine follows a dispatch of the handle"));
                    };
                    let (r, cfg_) = (self.group().num_ranks(), &self.config);
                    let (l, m, t, k) = (
                        cfg_.num_experts / r,
                        cfg_.max_dispatch_tokens_per_rank,
                        routing.num_tokens,
                        self.num_topk.unwrap_or(0),
                    );
                    x.expect(&[ncclBfloat16], &[Some(l), Some(r * m), None])?;
                    let h = x.dims[2];
                    out.expect(&[ncclBfloat16], &[Some(t), Some(h)])?;
                    let Some(w) = out_weights else {
                        return Err(Failure::invalid(
                            "outputs->topk_weights (the routing weights) is required by an LL combine",
                        ));
                    };
                    w.expect(&[ncclFloat32], &[Some(t), Some(k)])?;
                    let (xb, wb) = (buf(&x), buf(&w));
                    let send_only = cfg.send_only != 0;
                    let c = LlCombineCall {
                        x: &xb,
                        num_tokens: t,
                        topk_idx: &routing.topk_idx,
                        index_type: routing.index_type,
                        topk_weights: &wb,
                        num_topk: k,
                        send_only,
                        wait_stats: None,
                    };
                    let (_, pending, _) = self.buffer.ll_combine(&call, d, &c, Some(buf(&out)))?;
                    st.ll_combine_pending = pending;
                    Ok(())
                }
            }
        }
    }

    /// `ncclEpComplete`: the receive half of a send-only LL op (nothing otherwise). The
    /// half runs in its op's stream context; follow-up copies are ordered on `stream`.
    ///
    /// # Safety
    /// `stream` is NULL or a live stream of the group's GPU.
    pub unsafe fn complete(&self, stream: cudaStream_t) -> Result<()> {
        // SAFETY: forwarded.
        let call = unsafe { call_on(self.device(), stream) };
        let mut st = self.lock()?;
        if let Some(p) = st.ll_combine_pending.take() {
            self.buffer.ll_complete_combine(&p)?;
        }
        if std::mem::take(&mut st.ll_dispatch_pending) {
            if let Some(d) = &st.ll_dispatch {
                self.buffer.ll_complete_dispatch(d)?;
            }
            if let Some(d) = &st.ll_rank_major {
                self.buffer.ll_complete_rank_major(d)?;
                self.copy_counts(&mut st, &call)?;
            }
        }
        Ok(())
    }
}

/// The handle-time tensors of an HT `ncclEpLayoutInfo_t`.
struct HtLayoutInfo {
    expert_counters: Option<Tensor>,
    expert_offsets: Option<Tensor>,
    recv_total_counter: Option<Tensor>,
    src_rank_counters: bool,
    /// `recv_topk_idx_kind` is GLOBAL.
    global_ids: bool,
}

impl HtLayoutInfo {
    fn read(info: Option<&ncclEpLayoutInfo_t>) -> Result<HtLayoutInfo> {
        let Some(i) = info else {
            return Ok(HtLayoutInfo {
                expert_counters: None,
                expert_offsets: None,
                recv_total_counter: None,
                src_rank_counters: false,
                global_ids: false,
            });
        };
        let global_ids = id_kind(i.recv_topk_idx_kind)?;
        // SAFETY: the caller's descriptors.
        unsafe {
            Ok(HtLayoutInfo {
                expert_counters: Tensor::from_ptr("layout_info->expert_counters", i.expert_counters)?,
                expert_offsets: Tensor::from_ptr("layout_info->expert_offsets", i.expert_offsets)?,
                recv_total_counter: Tensor::from_ptr("layout_info->recv_total_counter", i.recv_total_counter)?,
                src_rank_counters: !i.src_rank_counters.is_null(),
                global_ids,
            })
        }
    }

    fn any(&self) -> bool {
        self.expert_counters.is_some()
            || self.expert_offsets.is_some()
            || self.recv_total_counter.is_some()
            || self.src_rank_counters
    }

    /// Writes the route's counts into the caller's tensors (after the count exchange): FLAT
    /// gets the per-expert counts (i32) and rows received; expert-major the zone sizes,
    /// starts and slots in all (i32 or i64 each). Under the DROP policy the totals are those
    /// before the drop, and expert-major zones are cut at `cut_at` slots.
    fn write(
        &self,
        buffer: &Buffer,
        call: &CallStream,
        route: &HtRoute,
        layout: Layout,
        cut_at: Option<usize>,
    ) -> Result<()> {
        if self.src_rank_counters {
            return Err(Failure::invalid("layout_info->src_rank_counters is for the LL rank-major layout"));
        }
        // Under the DROP policy the totals are those before the drop, so callers see what was lost.
        let (per_expert, routed, total) =
            (route.num_recv_tokens_per_expert()?, route.num_routed_tokens_per_expert()?, route.num_routed_tokens()?);
        let l = per_expert.len() / 4;
        let dev = buffer.group().device();
        // SAFETY: the route's outputs, alive as long as the route (the call is ordered before
        // anything frees them).
        let (per_expert, routed, total) = unsafe {
            let view = |o: &moe_ep::buffer::Output, len| DeviceBuffer::borrowed(dev, o.ptr(), len);
            (view(&per_expert, 4 * l), view(&routed, 4 * l), view(&total, 4))
        };
        let ints = [ncclInt32, ncclInt64];
        if layout == Layout::HtExpertMajor {
            for (t, n) in [(&self.expert_counters, l), (&self.expert_offsets, l), (&self.recv_total_counter, 1)] {
                if let Some(t) = t {
                    t.expect(&ints, &[Some(n)])?;
                }
            }
            // SAFETY: the caller's tensors (checked), alive for the call.
            let bufs = [&self.expert_counters, &self.expert_offsets, &self.recv_total_counter]
                .map(|t| t.as_ref().map(|t| (unsafe { t.buffer(dev) }, t.dtype == ncclInt64)));
            return Ok(buffer.run(call, |_| {
                for (i, b) in bufs.iter().enumerate() {
                    if let Some((b, wide)) = b {
                        let mut outs = [None, None, None];
                        outs[i] = Some(b);
                        let counts = if i == 2 { &routed } else { &per_expert };
                        zone_counts(buffer.group(), counts, l, outs, *wide, cut_at)?;
                    }
                }
                Ok(())
            })?);
        }
        if self.expert_offsets.is_some() {
            return Err(Failure::invalid("layout_info->expert_offsets is for the expert-major layout"));
        }
        if let Some(c) = &self.expert_counters {
            c.expect(&[ncclInt32], &[Some(l)])?;
        }
        if let Some(c) = &self.recv_total_counter {
            c.expect(&ints, &[Some(1)])?;
        }
        buffer.run(call, |s| {
            // SAFETY: (views) the caller's tensors, alive for the call.
            unsafe {
                if let Some(c) = &self.expert_counters {
                    c.buffer(dev).copy_from_async(s, &per_expert, 4 * l)?;
                }
                if let Some(c) = &self.recv_total_counter {
                    let into = c.buffer(dev);
                    if c.dtype == ncclInt64 {
                        into.fill_async(s, 0)?; // the count is >= 0: the i32's bytes, zero-extended
                    }
                    into.copy_from_async(s, &total, 4)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}
