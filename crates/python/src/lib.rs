//! `moe_ep._native`: thin PyO3 shims over the `moe-ep` host crate. The DeepEP-compatible API
//! (`moe_ep.Buffer`, argument checks, torch/numpy handling) is Python, in `python/moe_ep/`.
//!
//! * Tensors come in as `(data pointer, byte length)` pairs and are used in place
//!   ([`DeviceBuffer::borrowed`]); Python checked dtype, shape, device and contiguity.
//! * Streams come in as raw `CUstream` integers (torch's current stream). Every op runs on the
//!   rank's own stream (DeepEP's "comm stream"), ordered after the caller's stream or
//!   `previous_event`, and, unless `async_finish`, the caller's stream waits for it.
//! * Outputs go out as [`Array`]s: bytes exposing `__array_interface__` (CPU) or
//!   `__cuda_array_interface__` (GPU), which Python views as numpy arrays / torch tensors
//!   without copying. They keep the memory alive, and free it only after the caller's stream
//!   is done with it ([`Guarded`], what torch's `record_stream` does for DeepEP).
//! * Every blocking call releases the GIL: ranks of one process are Python threads.
//! * Rust errors become `ValueError` (bad arguments), `TimeoutError` (device-side timeout) or
//!   `RuntimeError`; nothing here panics on bad input.
use moe_ep::bootstrap::{Bootstrap, TcpBootstrap, UniqueId as RsUniqueId, default_timeout};
use moe_ep::group::{Sharing, SymmetricBuffer};
use moe_ep::intranode::{
    HtBuffer, HtCombineOutputs, HtConfig, HtDispatchArgs, HtDispatchBuffers, HtDispatchOutputs, HtHandle, HtMaps,
    HtMemory,
};
use moe_ep::layout::MAX_TOPK;
use moe_ep::layout::{DispatchLayout, IndexType, get_dispatch_layout, get_dispatch_layout_into};
use moe_ep::low_latency::{LlBuffer, LlCombineOutputs, LlConfig, LlDispatchOptions, LlDispatchOutputs, LlStats};
use moe_ep::{Device, DeviceBuffer, Error, Event, Group, Stream};
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

/// A Rust error as the Python exception a caller can act on.
fn py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument { .. } | Error::Unsupported(_) => PyValueError::new_err(e.to_string()),
        Error::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

trait OrPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> OrPy<T> for moe_ep::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(py_err)
    }
}

/// `(data pointer, bytes)` of a tensor, as Python passes it.
type Mem = (u64, usize);

fn borrow(device: &Device, (ptr, bytes): Mem) -> DeviceBuffer {
    // SAFETY: Python passes the pointer and size of a live, contiguous tensor on this device
    // (checked there) and keeps it referenced for the call, and for async calls until the
    // returned event is waited on (DeepEP's contract for inputs).
    unsafe { DeviceBuffer::borrowed(device, ptr, bytes) }
}

fn device_from(name: &str) -> PyResult<Device> {
    Device::from_name(name).py()
}

fn index_type(idx_bytes: usize) -> PyResult<IndexType> {
    match idx_bytes {
        4 => Ok(IndexType::I32),
        8 => Ok(IndexType::I64),
        _ => Err(PyValueError::new_err(format!("topk_idx: {idx_bytes}-byte integers (expected int32 or int64)"))),
    }
}

/// A [`Stream`] view of someone else's `CUstream` (torch's), made once per (GPU, stream) and
/// kept: views are needed on every call and in every output's release, and making one may
/// cost more than a handle (a memory pool of its own).
fn borrowed_stream(device: &Device, raw: usize) -> Arc<Stream> {
    type Cache = Mutex<Vec<((Option<usize>, usize), Arc<Stream>)>>;
    static CACHE: Cache = Mutex::new(Vec::new());
    let key = (device.ordinal(), raw);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, s)) = cache.iter().find(|(k, _)| *k == key) {
        return s.clone();
    }
    // SAFETY: Python passes streams of this device's primary context (torch's current
    // stream), which torch never destroys (its streams come from pools).
    let s = Arc::new(unsafe { Stream::from_raw(device, raw) });
    cache.push((key, s.clone()));
    s
}

/// Holds an output's memory; on drop, first makes the rank's stream wait for the stream that
/// consumed the output (so a stream-ordered free on the rank's stream can't overtake the
/// consumer's reads), then frees.
/// LL outputs whose receive half may still be pending (`send_only`).
trait LlPending {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> moe_ep::Result<()>;
}

impl LlPending for LlDispatchOutputs {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> moe_ep::Result<()> {
        LlDispatchOutputs::complete(self, group, buf)
    }
}

impl LlPending for LlCombineOutputs {
    fn complete(&mut self, group: &Group, buf: &LlBuffer) -> moe_ep::Result<()> {
        LlCombineOutputs::complete(self, group, buf)
    }
}

struct Guarded<T> {
    value: Option<T>,
    release_after: Option<(Arc<Stream>, Arc<Group>)>,
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

/// Bytes on a device (or host memory on the CPU back end), viewed from Python without a copy
/// through `__array_interface__` / `__cuda_array_interface__` as a flat `uint8` array.
#[pyclass(frozen, module = "moe_ep._native")]
struct Array {
    _owner: Owner,
    ptr: u64,
    nbytes: usize,
    cuda: bool,
}

impl Array {
    fn interface<'py>(&self, py: Python<'py>, version: u32) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", (self.nbytes,))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.ptr, false))?;
        d.set_item("strides", py.None())?;
        d.set_item("version", version)?;
        Ok(d)
    }
}

#[pymethods]
impl Array {
    /// numpy's array interface (CPU back end only).
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        if self.cuda {
            return Err(pyo3::exceptions::PyAttributeError::new_err("GPU memory: use __cuda_array_interface__"));
        }
        self.interface(py, 3)
    }

    /// The CUDA array interface (GPU back end only). Version 2: no stream field, the op's
    /// ordering against the caller's stream is already set up.
    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        if !self.cuda {
            return Err(pyo3::exceptions::PyAttributeError::new_err("host memory: use __array_interface__"));
        }
        self.interface(py, 2)
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Address of the first byte.
    #[getter]
    fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// A point in a stream's work (what DeepEP's `EventHandle` is).
#[pyclass(frozen, module = "moe_ep._native")]
struct NativeEvent {
    event: Arc<Event>,
    device: Device,
}

#[pymethods]
impl NativeEvent {
    /// Makes later work on `stream` (a raw `CUstream`; 0 = the legacy default stream) wait.
    fn wait(&self, py: Python<'_>, stream: usize) -> PyResult<()> {
        py.detach(|| borrowed_stream(&self.device, stream).wait_event(&self.event)).py()
    }

    /// Blocks the host until the event has happened.
    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.event.synchronize()).py()
    }
}

/// Records an event on `stream` of `device` (`Buffer.capture()`).
#[pyfunction]
fn record_event(py: Python<'_>, device: &str, stream: usize) -> PyResult<NativeEvent> {
    let device = device_from(device)?;
    let event = py.detach(|| borrowed_stream(&device, stream).record_event());
    Ok(NativeEvent { event: Arc::new(event.py()?), device })
}

/// A bootstrap whose all-gather is a Python callable `bytes -> list[bytes]` (e.g. over
/// `torch.distributed.all_gather_object`).
struct PyBootstrap {
    rank: usize,
    num_ranks: usize,
    all_gather: Py<PyAny>,
}

impl Bootstrap for PyBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    fn all_gather(&self, blob: &[u8]) -> moe_ep::Result<Vec<Vec<u8>>> {
        Python::attach(|py| -> PyResult<Vec<Vec<u8>>> {
            let out = self.all_gather.call1(py, (PyBytes::new(py, blob),))?;
            out.bind(py).extract::<Vec<Vec<u8>>>()
        })
        .map_err(|e| Error::Bootstrap(format!("the Python all-gather failed: {e}")))
        .and_then(|blobs| {
            if blobs.len() == self.num_ranks {
                Ok(blobs)
            } else {
                Err(Error::Bootstrap(format!("all-gather returned {} blobs for {} ranks", blobs.len(), self.num_ranks)))
            }
        })
    }
}

/// Bootstrap identity for ranks without torch.distributed (address + secret of rank 0's
/// TCP listener); share its bytes with every rank, then `Rank.with_unique_id`.
#[pyclass(frozen, module = "moe_ep._native")]
struct UniqueId {
    id: RsUniqueId,
}

#[pymethods]
impl UniqueId {
    #[new]
    fn new() -> PyResult<UniqueId> {
        Ok(UniqueId { id: RsUniqueId::new().py()? })
    }

    /// The id as bytes (to send to the other ranks).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.id.to_bytes())
    }

    /// The id from `to_bytes()`'s output.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<UniqueId> {
        Ok(UniqueId { id: RsUniqueId::from_bytes(data).py()? })
    }

    fn __repr__(&self) -> String {
        format!("UniqueId({})", self.id)
    }
}

/// The per-call stream context Python passes: the caller's stream, an optional event to
/// wait for instead, and whether to return an event instead of making the caller wait.
#[derive(Clone)]
struct Ctx {
    stream: usize,
    previous: Option<Arc<Event>>,
    async_finish: bool,
}

/// The communication buffers of one rank. Their memory is allocated (collectively) when the
/// `Buffer` is made, as DeepEP does; each mode's buffer is laid out in it at its first call,
/// for that call's shapes, and laid out again (collectively, no allocation) when a later
/// call has other shapes. Handles carry the generation of the layout they were made with.
struct State {
    /// Memory for HT not laid out yet.
    ht_mem: Option<HtMemory>,
    ht: Option<HtBuffer>,
    ht_generation: u64,
    /// `Buffer`'s `num_nvl_bytes`.
    nvl_bytes: usize,
    /// Memory for LL not laid out yet (`num_rdma_bytes`).
    ll_mem: Option<Arc<SymmetricBuffer>>,
    ll: Option<LlBuffer>,
    ll_generation: u64,
    rdma_bytes: usize,
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

/// One rank: its group (device, stream, bootstrap) and buffers.
#[pyclass(frozen, module = "moe_ep._native")]
struct Rank {
    group: Arc<Group>,
    state: Mutex<State>,
}

impl Rank {
    fn new(group: Group) -> Rank {
        Rank {
            group: Arc::new(group),
            state: Mutex::new(State {
                ht_mem: None,
                ht: None,
                ht_generation: 0,
                nvl_bytes: 0,
                ll_mem: None,
                ll: None,
                ll_generation: 0,
                rdma_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> moe_ep::Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::KernelFault("a previous call panicked".into()))
    }

    fn dev(&self) -> &Device {
        self.group.device()
    }

    /// The caller's stream (None on the CPU, where work runs at once).
    fn caller(&self, ctx: &Ctx) -> Option<Arc<Stream>> {
        (!self.dev().is_cpu()).then(|| borrowed_stream(self.dev(), ctx.stream))
    }

    /// Orders the comm stream after the caller (or `previous`), and surfaces errors that
    /// kernels reported since the last call.
    fn begin(&self, ctx: &Ctx) -> moe_ep::Result<()> {
        self.group.take_device_error("an earlier op")?;
        let comm = self.group.stream();
        match (&ctx.previous, self.caller(ctx)) {
            (Some(ev), _) => comm.wait_event(ev),
            (None, Some(caller)) => comm.wait_event(&caller.record_event()?),
            (None, None) => Ok(()),
        }
    }

    /// The caller's stream waits for the comm stream, or gets an event to wait on later.
    fn finish(&self, ctx: &Ctx, kernel: &'static str) -> moe_ep::Result<Option<NativeEvent>> {
        if self.dev().is_cpu() {
            self.group.take_device_error(kernel)?; // the work is done: report bad input now
        }
        let ev = self.group.stream().record_event()?;
        if ctx.async_finish {
            return Ok(Some(NativeEvent { event: Arc::new(ev), device: self.dev().clone() }));
        }
        if let Some(caller) = self.caller(ctx) {
            caller.wait_event(&ev)?;
        }
        Ok(None)
    }

    fn guard<T: Send + Sync + 'static>(&self, ctx: &Ctx, value: T) -> Arc<Guarded<T>> {
        // Whatever `allocate_on_comm_stream` says, the caller's stream may read the output
        // (DeepEP records both streams too).
        let release_after = self.caller(ctx).map(|caller| (caller, self.group.clone()));
        Arc::new(Guarded { value: Some(value), release_after })
    }

    /// An output of its own.
    fn output(&self, ctx: &Ctx, buf: DeviceBuffer, nbytes: usize) -> Array {
        let (ptr, len) = (buf.ptr(), buf.len());
        let owner: Owner = self.guard(ctx, buf);
        Array { _owner: owner, ptr, nbytes: nbytes.min(len), cuda: !self.dev().is_cpu() }
    }

    /// Makes sure the HT buffer fits `want`: lays the memory out at the first call (nothing
    /// collective), again (collectively, no allocation) when a call has larger shapes. The
    /// channel count is fixed by the first call.
    fn ensure_ht(&self, st: &mut State, want: HtConfig, ctx: &Ctx) -> moe_ep::Result<()> {
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
                    st.nvl_bytes, exact.hidden, exact.num_topk, exact.num_experts
                ),
            ));
        };
        match (st.ht.as_mut(), st.ht_mem.take()) {
            (Some(_), _) if self.capturing(ctx) => return Err(Self::no_relayout_in_capture("HT")),
            (Some(buf), _) => buf.relayout(&self.group, cfg)?,
            (None, Some(mem)) => st.ht = Some(HtBuffer::in_memory(&self.group, cfg, mem)?),
            (None, None) => return Err(Error::KernelFault("HT memory missing".into())),
        }
        st.ht_generation += 1;
        Ok(())
    }

    /// Whether the caller's stream captures a CUDA graph.
    fn capturing(&self, ctx: &Ctx) -> bool {
        self.caller(ctx).is_some_and(|s| s.capturing())
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

    /// Makes sure the LL buffer is laid out for `cfg` (as `ensure_ht`).
    fn ensure_ll(&self, st: &mut State, cfg: LlConfig, ctx: &Ctx) -> moe_ep::Result<()> {
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
                    st.rdma_bytes, cfg.max_tokens, cfg.hidden, cfg.num_experts
                ),
            ));
        }
        match (st.ll.as_mut(), st.ll_mem.take()) {
            (Some(_), _) if self.capturing(ctx) => return Err(Self::no_relayout_in_capture("LL")),
            (Some(buf), _) => buf.relayout(&self.group, cfg)?,
            (None, Some(mem)) => st.ll = Some(LlBuffer::in_memory(&self.group, cfg, mem)?),
            (None, None) => return Err(Error::KernelFault("LL memory missing".into())),
        }
        st.ll_generation += 1;
        Ok(())
    }

    /// Returns once no rank uses its buffers any more (before one is dropped: peers write
    /// into each other's).
    fn quiesce(&self) -> moe_ep::Result<()> {
        self.group.stream().synchronize()?;
        self.group.bootstrap().barrier()
    }

    /// Runs the pending receive half of an LL op (`send_only`), on the op's stream context.
    fn complete_pending<T: LlPending + Send>(
        &self,
        py: Python<'_>,
        inner: &Arc<Guarded<Mutex<T>>>,
        generation: u64,
        ctx: &Ctx,
        kernel: &'static str,
    ) -> PyResult<()> {
        let (inner, ctx) = (inner.clone(), ctx.clone());
        py.detach(|| -> moe_ep::Result<()> {
            let st = self.lock()?;
            Self::check_generation(st.ll_generation, generation)?;
            let buf = st.ll.as_ref().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
            let out = inner.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))?;
            let mut out = out.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
            let ctx = Ctx { previous: None, async_finish: false, ..ctx };
            self.begin(&ctx)?;
            out.complete(&self.group, buf)?;
            self.finish(&ctx, kernel).map(|_| ())
        })
        .py()
    }

    /// Lays the HT buffer out for `c` (`ensure_ht`) and runs `run` (a dispatch) on the comm
    /// stream: the outputs, the layout generation and the event.
    fn run_ht_dispatch(
        &self,
        ctx: &Ctx,
        c: &HtDispatchCall,
        run: impl FnOnce(&mut HtBuffer, &HtDispatchArgs) -> moe_ep::Result<HtDispatchOutputs>,
    ) -> moe_ep::Result<(HtDispatchOutputs, u64, Option<NativeEvent>)> {
        let dev = self.dev();
        let topk_ty = match c.topk {
            Some((_, b, _, _)) => Some(index_type(b).map_err(|_| Error::invalid("topk_idx", "int32 or int64"))?),
            None => None,
        };
        let mut st = self.lock()?;
        // `Config.num_sms / 2` channels, but no more than the rank's share of the GPU's
        // SMs: all ranks' blocks must be resident at once when ranks share a GPU.
        let num_channels = match c.num_channels {
            0 => 0,
            n => n.min((dev.num_sms()? as usize / (2 * self.group.ranks_on_device()?)).max(1)),
        };
        // Scales for fp8 rows of this hidden always fit, so bf16 and fp8 share a buffer.
        let want = HtConfig {
            num_experts: c.num_experts,
            hidden: c.hidden,
            num_topk: c.topk.map_or(0, |t| t.3),
            num_scales: c.x_scales.map_or(0, |s| s.1).max(c.hidden / 128),
            num_channels,
            warps_per_peer: 0,
            num_slots: 0,
            heap_bytes: 0,
        };
        self.ensure_ht(&mut st, want, ctx)?;
        let generation = st.ht_generation;
        let buf = st.ht.as_mut().ok_or_else(|| Error::KernelFault("HT buffer missing".into()))?;
        let xb = borrow(dev, c.x);
        let sb = c.x_scales.map(|(m, n)| (borrow(dev, m), n));
        let tb = c.topk.map(|(i, _, w, k)| (borrow(dev, i), borrow(dev, w), k));
        let l = DispatchLayout {
            num_tokens_per_rank: borrow(dev, c.layout.0),
            num_tokens_per_expert: borrow(dev, c.layout.1),
            is_token_in_rank: borrow(dev, c.layout.2),
        };
        let args = HtDispatchArgs {
            x: &xb,
            hidden_bytes: c.hidden_bytes,
            num_tokens: c.num_tokens,
            x_scales: sb.as_ref().map(|(b, n)| (b, *n)),
            topk: match (&tb, topk_ty) {
                (Some((i, w, k)), Some(ty)) => Some((i, ty, w, *k)),
                _ => None,
            },
            layout: &l,
            expert_alignment: c.expert_alignment,
            num_worst_tokens: c.num_worst_tokens,
        };
        self.begin(ctx)?;
        let out = run(buf, &args)?;
        let ev = self.finish(ctx, "ht_dispatch")?;
        Ok((out, generation, ev))
    }

    /// The Python object of a dispatch's handle.
    fn ht_handle(&self, ctx: &Ctx, handle: HtHandle, generation: u64, num_tokens: usize) -> HtHandleObj {
        HtHandleObj {
            num_rows: handle.num_rows,
            num_tokens,
            num_ranks: self.group.num_ranks(),
            inner: self.guard(ctx, handle),
            generation,
            cuda: !self.dev().is_cpu(),
        }
    }

    fn check_generation(current: u64, generation: u64) -> moe_ep::Result<()> {
        if generation != current {
            return Err(Error::invalid(
                "handle",
                "was made before the buffer was rebuilt for larger shapes; dispatch again",
            ));
        }
        Ok(())
    }
}

/// The handle of an HT dispatch.
#[pyclass(frozen, module = "moe_ep._native")]
struct HtHandleObj {
    inner: Arc<Guarded<HtHandle>>,
    generation: u64,
    cuda: bool,
    /// Rows of the dispatch outputs (exact count, or `num_worst_tokens`).
    #[pyo3(get)]
    num_rows: usize,
    /// Tokens of this rank.
    #[pyo3(get)]
    num_tokens: usize,
    /// Ranks.
    #[pyo3(get)]
    num_ranks: usize,
}

impl HtHandleObj {
    fn handle(&self) -> moe_ep::Result<&HtHandle> {
        self.inner.value.as_ref().ok_or_else(|| Error::KernelFault("handle already released".into()))
    }

    fn view(&self, pick: fn(&HtHandle) -> &DeviceBuffer, nbytes: usize) -> PyResult<Array> {
        let buf = pick(self.handle().py()?);
        Ok(Array { _owner: self.inner.clone(), ptr: buf.ptr(), nbytes: nbytes.min(buf.len()), cuda: self.cuda })
    }
}

#[pymethods]
impl HtHandleObj {
    /// `[R, R]` int32 (DeepEP's `rank_prefix_matrix`).
    fn rank_prefix_matrix(&self) -> PyResult<Array> {
        self.view(|h| &h.rank_prefix_matrix, 4 * self.num_ranks * self.num_ranks)
    }

    /// `[R, C + 1]` int32: the first row of each (source rank, channel) in this rank's
    /// outputs, and each source rank's end.
    fn channel_prefix_matrix(&self) -> PyResult<Array> {
        let c = self.handle().py()?.num_channels();
        self.view(|h| &h.channel_prefix_matrix, 4 * self.num_ranks * (c + 1))
    }

    /// Channels of the dispatch.
    #[getter]
    fn num_channels(&self) -> PyResult<usize> {
        Ok(self.handle().py()?.num_channels())
    }

    /// `[T, R]` bool.
    fn is_token_in_rank(&self) -> PyResult<Array> {
        self.view(|h| &h.is_token_in_rank, self.num_tokens * self.num_ranks)
    }

    /// `[T, R]` int32.
    fn send_head(&self) -> PyResult<Array> {
        self.view(|h| &h.send_head, 4 * self.num_tokens * self.num_ranks)
    }
}

/// Outputs and handle of an LL dispatch (shared, so combine and the hook can use them).
#[pyclass(frozen, module = "moe_ep._native")]
struct LlDispatchObj {
    inner: Arc<Guarded<Mutex<LlDispatchOutputs>>>,
    generation: u64,
    cuda: bool,
    ptrs: [(u64, usize); 5],
    ctx: Ctx,
}

#[pymethods]
impl LlDispatchObj {
    /// The layout generation of the LL buffer the outputs are views into.
    #[getter]
    fn generation(&self) -> u64 {
        self.generation
    }

    /// `(packed_recv_x, packed_recv_x_scales or None, packed_recv_count, packed_recv_src_info,
    /// packed_recv_layout_range)` as byte arrays.
    fn arrays(&self) -> Vec<Option<Array>> {
        self.ptrs
            .iter()
            .map(|&(ptr, nbytes)| {
                (ptr != 0).then(|| Array { _owner: self.inner.clone(), ptr, nbytes, cuda: self.cuda })
            })
            .collect()
    }
}

/// The pending receive half of a `send_only` LL combine, and its output.
#[pyclass(frozen, module = "moe_ep._native")]
struct LlCombineObj {
    inner: Arc<Guarded<Mutex<LlCombineOutputs>>>,
    generation: u64,
    ctx: Ctx,
}

fn ctx_of(stream: usize, previous: Option<PyRef<'_, NativeEvent>>, async_finish: bool) -> Ctx {
    Ctx { stream, previous: previous.map(|e| e.event.clone()), async_finish }
}

type Scales = Option<(Mem, usize)>;
type TopK = Option<(Mem, usize, Mem, usize)>;

/// The arguments of a (not cached) HT dispatch, as Python passes them.
struct HtDispatchCall {
    x: Mem,
    hidden: usize,
    hidden_bytes: usize,
    num_tokens: usize,
    x_scales: Scales,
    topk: TopK,
    layout: (Mem, Mem, Mem),
    num_experts: usize,
    expert_alignment: usize,
    num_worst_tokens: Option<usize>,
    num_channels: usize,
}

#[pymethods]
impl Rank {
    /// `devices.len()` ranks in this process ("cpu", "cuda", "cuda:N"); drive each from its
    /// own thread.
    #[staticmethod]
    fn in_process(py: Python<'_>, devices: Vec<String>) -> PyResult<Vec<Rank>> {
        let devices: Vec<Device> = devices.iter().map(|d| device_from(d)).collect::<PyResult<_>>()?;
        let groups = py.detach(|| Group::in_process(&devices)).py()?;
        Ok(groups.into_iter().map(Rank::new).collect())
    }

    /// Collective, once (the `Buffer` constructor): allocates the memory of both modes, as
    /// DeepEP does. HT gets `nvl_bytes`: the rings take what the first call's shapes need and
    /// the rest is the output heap when `heap_bytes` is None; else the rings may use all of
    /// it and a heap of `heap_bytes` (0 = none) is allocated beside. LL gets `rdma_bytes`.
    #[pyo3(signature = (nvl_bytes, heap_bytes, rdma_bytes))]
    fn allocate(&self, py: Python<'_>, nvl_bytes: usize, heap_bytes: Option<usize>, rdma_bytes: usize) -> PyResult<()> {
        py.detach(|| -> moe_ep::Result<()> {
            let mut st = self.lock()?;
            if st.ht.is_some() || st.ht_mem.is_some() || st.ll.is_some() || st.ll_mem.is_some() {
                return Err(Error::invalid("allocate", "the buffers are allocated already"));
            }
            self.group.ranks_on_device()?; // collective the first time: not inside a later call
            if nvl_bytes > 0 {
                st.ht_mem = Some(HtMemory::alloc(&self.group, nvl_bytes, heap_bytes)?);
            }
            if rdma_bytes > 0 {
                st.ll_mem = Some(Arc::new(self.group.alloc_symmetric(rdma_bytes, Sharing::Auto)?));
            }
            (st.nvl_bytes, st.rdma_bytes) = (nvl_bytes, rdma_bytes);
            Ok(())
        })
        .py()
    }

    /// This rank's whole HT (`use_rdma_buffer` false) or LL memory from byte `offset`
    /// (DeepEP's `get_local_buffer_tensor`): bytes, or None when that memory is absent.
    fn local_buffer(&self, offset: usize, use_rdma_buffer: bool) -> PyResult<Option<Array>> {
        let st = self.lock().py()?;
        let local = if use_rdma_buffer { st.ll_memory().cloned() } else { st.ht_memory().map(|m| m.shared()) };
        let Some(sym) = local else { return Ok(None) };
        let len = sym.len();
        if offset > len {
            return Err(PyValueError::new_err(format!("offset: {offset} bytes is past the buffer's {len}")));
        }
        let ptr = sym.local().ptr() + offset as u64;
        let owner: Owner = sym;
        Ok(Some(Array { _owner: owner, ptr, nbytes: len - offset, cuda: !self.dev().is_cpu() }))
    }

    /// The heap's and the LL memory's sizes: `(rings, heap, ll)` bytes (0 = none).
    fn memory_bytes(&self) -> PyResult<(usize, usize, usize)> {
        let st = self.lock().py()?;
        let (rings, heap) = st.ht_memory().map_or((0, 0), |m| (m.ring_bytes(), m.heap_bytes()));
        Ok((rings, heap, st.ll_memory().map_or(0, |m| m.len())))
    }

    /// `nbytes` from the HT buffer's heap for work ordered on `stream`, or None (no HT
    /// buffer yet, no heap, or no room).
    #[pyo3(signature = (nbytes, stream))]
    fn ht_alloc_output(&self, py: Python<'_>, nbytes: usize, stream: usize) -> PyResult<Option<Array>> {
        let ctx = Ctx { stream, previous: None, async_finish: false };
        py.detach(|| -> moe_ep::Result<Option<Array>> {
            let st = self.lock()?;
            let Some(buf) = st.ht.as_ref() else { return Ok(None) };
            // A block comes back only once the work queued before its release has run, so the
            // caller may write it at once; its own release waits for the caller's stream.
            Ok(buf.alloc_output(&self.group, nbytes).map(|b| self.output(&ctx, b, nbytes)))
        })
        .py()
    }

    /// Rank `rank` of `num_ranks` joined through rank 0's TCP listener named by `unique_id`
    /// (collective).
    #[staticmethod]
    fn with_unique_id(
        py: Python<'_>,
        device: &str,
        unique_id: &UniqueId,
        rank: usize,
        num_ranks: usize,
    ) -> PyResult<Rank> {
        let device = device_from(device)?;
        let id = unique_id.id;
        let group = py.detach(|| -> moe_ep::Result<Group> {
            let boot = TcpBootstrap::new(&id, rank, num_ranks, default_timeout())?;
            Group::new(device, Box::new(boot))
        });
        Ok(Rank::new(group.py()?))
    }

    /// Rank `rank` of `num_ranks` whose setup exchanges go through `all_gather(bytes) ->
    /// list[bytes]` (collective).
    #[staticmethod]
    fn with_all_gather(
        py: Python<'_>,
        device: &str,
        rank: usize,
        num_ranks: usize,
        all_gather: Py<PyAny>,
    ) -> PyResult<Rank> {
        if rank >= num_ranks {
            return Err(PyValueError::new_err(format!("rank {rank} is not below num_ranks {num_ranks}")));
        }
        let device = device_from(device)?;
        let boot = PyBootstrap { rank, num_ranks, all_gather };
        Ok(Rank::new(py.detach(|| Group::new(device, Box::new(boot))).py()?))
    }

    #[getter]
    fn rank(&self) -> usize {
        self.group.rank()
    }

    #[getter]
    fn num_ranks(&self) -> usize {
        self.group.num_ranks()
    }

    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        self.dev().ordinal().map_or("cpu".into(), |o| format!("cuda:{o}"))
    }

    /// The rank's own stream (DeepEP's comm stream) as a raw `CUstream` (0 on the CPU).
    #[getter]
    fn comm_stream(&self) -> usize {
        self.group.stream().raw()
    }

    /// SMs of the device (8 on the emulator).
    fn num_sms(&self) -> PyResult<u32> {
        self.dev().num_sms().py()
    }

    /// Collective host barrier.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.group.bootstrap().barrier()).py()
    }

    /// Waits for the rank's stream, then reports what its kernels reported.
    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.group.stream().synchronize()?;
            self.group.take_device_error("an earlier op")
        })
        .py()
    }

    /// `get_dispatch_layout`: `(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank,
    /// event)`; with `out` (the three) the caller's tensors are written (e.g. inside a
    /// CUDA-graph capture) and the three outputs are None.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (topk_idx, idx_bytes, num_tokens, num_topk, num_experts, out, stream, previous_event, async_finish))]
    fn layout(
        &self,
        py: Python<'_>,
        topk_idx: Mem,
        idx_bytes: usize,
        num_tokens: usize,
        num_topk: usize,
        num_experts: usize,
        out: Option<[Mem; 3]>,
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(Option<Array>, Option<Array>, Option<Array>, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let ty = index_type(idx_bytes)?;
        let r = self.group.num_ranks();
        py.detach(|| -> moe_ep::Result<_> {
            self.begin(&ctx)?;
            let dev = self.dev();
            let idx = borrow(dev, topk_idx);
            let (t, k, e) = (num_tokens, num_topk, num_experts);
            let l = match out {
                Some([a, b, c]) => {
                    let into = DispatchLayout {
                        num_tokens_per_rank: borrow(dev, a),
                        num_tokens_per_expert: borrow(dev, b),
                        is_token_in_rank: borrow(dev, c),
                    };
                    get_dispatch_layout_into(&self.group, &idx, ty, t, k, e, into)?;
                    None
                }
                None => Some(get_dispatch_layout(&self.group, &idx, ty, t, k, e)?),
            };
            let ev = self.finish(&ctx, "get_dispatch_layout")?;
            let Some(l) = l else { return Ok((None, None, None, ev)) };
            Ok((
                Some(self.output(&ctx, l.num_tokens_per_rank, 4 * r)),
                Some(self.output(&ctx, l.num_tokens_per_expert, 4 * num_experts)),
                Some(self.output(&ctx, l.is_token_in_rank, num_tokens * r)),
                ev,
            ))
        })
        .py()
    }

    /// HT dispatch (not cached). Returns `(recv_x, recv_x_scales, recv_topk_idx,
    /// recv_topk_weights, recv_src_idx, num_recv_tokens_per_expert, per-expert list or None,
    /// handle, event)`; the topk outputs are None without `topk`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (x, hidden, hidden_bytes, num_tokens, x_scales, topk, layout, num_experts, expert_alignment, num_worst_tokens, num_channels, stream, previous_event, async_finish))]
    fn ht_dispatch(
        &self,
        py: Python<'_>,
        x: Mem,
        hidden: usize,
        hidden_bytes: usize,
        num_tokens: usize,
        x_scales: Scales,
        topk: TopK,
        layout: (Mem, Mem, Mem),
        num_experts: usize,
        expert_alignment: usize,
        num_worst_tokens: Option<usize>,
        num_channels: usize,
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(
        Array,
        Option<Array>,
        Option<Array>,
        Option<Array>,
        Array,
        Array,
        Option<Vec<i32>>,
        HtHandleObj,
        Option<NativeEvent>,
    )> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let call = HtDispatchCall {
            x,
            hidden,
            hidden_bytes,
            num_tokens,
            x_scales,
            topk,
            layout,
            num_experts,
            expert_alignment,
            num_worst_tokens,
            num_channels,
        };
        let num_scales = x_scales.map_or(0, |s| s.1);
        let num_topk = topk.map_or(0, |t| t.3);
        let num_local = num_experts / self.group.num_ranks().max(1);
        py.detach(|| -> moe_ep::Result<_> {
            let (out, generation, ev) = self.run_ht_dispatch(&ctx, &call, |buf, a| buf.dispatch(&self.group, a))?;
            let rows = out.handle.num_rows;
            let with_topk = topk.is_some();
            let handle = self.ht_handle(&ctx, out.handle, generation, num_tokens);
            Ok((
                self.output(&ctx, out.recv_x, rows * hidden_bytes),
                (num_scales > 0).then(|| self.output(&ctx, out.recv_x_scales, rows * num_scales * 4)),
                with_topk.then(|| self.output(&ctx, out.recv_topk_idx, rows * num_topk * 8)),
                with_topk.then(|| self.output(&ctx, out.recv_topk_weights, rows * num_topk * 4)),
                self.output(&ctx, out.recv_src_idx, rows * 4),
                self.output(&ctx, out.num_recv_tokens_per_expert, num_local * 4),
                out.num_recv_tokens_per_expert_list,
                handle,
                ev,
            ))
        })
        .py()
    }

    /// HT dispatch with `num_worst_tokens` into the caller's tensors (what a CUDA-graph
    /// capture needs: torch's memory, owned by the graph): `rows` = `(recv_x, recv_x_scales,
    /// recv_topk_idx, recv_topk_weights, recv_src_idx)` (unused ones may repeat `recv_x`),
    /// `maps` = `(num_recv_tokens_per_expert [L], rank_prefix_matrix [R, R],
    /// channel_prefix_matrix [R, >= C + 1], num_recv_tokens [1], remote_row0 [R, >= C],
    /// send_head [T, R], is_token_in_rank [T, R])`. Returns `(handle, event)`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, hidden, hidden_bytes, num_tokens, x_scales, topk, layout, num_experts, expert_alignment, num_worst_tokens, num_channels, rows, maps, stream, previous_event, async_finish))]
    fn ht_dispatch_into(
        &self,
        py: Python<'_>,
        x: Mem,
        hidden: usize,
        hidden_bytes: usize,
        num_tokens: usize,
        x_scales: Scales,
        topk: TopK,
        layout: (Mem, Mem, Mem),
        num_experts: usize,
        expert_alignment: usize,
        num_worst_tokens: usize,
        num_channels: usize,
        rows: [Mem; 5],
        maps: [Mem; 7],
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(HtHandleObj, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let call = HtDispatchCall {
            x,
            hidden,
            hidden_bytes,
            num_tokens,
            x_scales,
            topk,
            layout,
            num_experts,
            expert_alignment,
            num_worst_tokens: Some(num_worst_tokens),
            num_channels,
        };
        let dev = self.dev().clone();
        py.detach(|| -> moe_ep::Result<_> {
            let b = |m: Mem| borrow(&dev, m);
            let into = HtDispatchBuffers {
                recv_x: b(rows[0]),
                recv_x_scales: b(rows[1]),
                recv_topk_idx: b(rows[2]),
                recv_topk_weights: b(rows[3]),
                recv_src_idx: b(rows[4]),
                maps: HtMaps {
                    num_recv_tokens_per_expert: b(maps[0]),
                    rank_prefix_matrix: b(maps[1]),
                    channel_prefix_matrix: b(maps[2]),
                    num_recv_tokens: b(maps[3]),
                    remote_row0: b(maps[4]),
                    send_head: b(maps[5]),
                    is_token_in_rank: b(maps[6]),
                },
            };
            let (out, generation, ev) =
                self.run_ht_dispatch(&ctx, &call, |buf, a| buf.dispatch_into(&self.group, a, into))?;
            Ok((self.ht_handle(&ctx, out.handle, generation, num_tokens), ev))
        })
        .py()
    }

    /// HT dispatch reusing `handle`'s layout: `(recv_x, recv_x_scales or None, event)`; with
    /// `out` = `(recv_x, recv_x_scales)` the caller's tensors are written (e.g. inside a
    /// CUDA-graph capture) and the two outputs are None.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (handle, x, hidden_bytes, x_scales, out, stream, previous_event, async_finish))]
    fn ht_dispatch_cached(
        &self,
        py: Python<'_>,
        handle: PyRef<'_, HtHandleObj>,
        x: Mem,
        hidden_bytes: usize,
        x_scales: Scales,
        out: Option<(Mem, Option<Mem>)>,
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(Option<Array>, Option<Array>, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let dev = self.dev().clone();
        let (inner, generation, rows) = (handle.inner.clone(), handle.generation, handle.num_rows);
        py.detach(|| -> moe_ep::Result<_> {
            let mut st = self.lock()?;
            Self::check_generation(st.ht_generation, generation)?;
            let buf = st.ht.as_mut().ok_or_else(|| Error::invalid("handle", "no HT buffer"))?;
            let h = inner.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))?;
            let xb = borrow(&dev, x);
            let sb = x_scales.map(|(m, n)| (borrow(&dev, m), n));
            let scales = sb.as_ref().map(|(b, n)| (b, *n));
            self.begin(&ctx)?;
            let recv = match out {
                Some((rx, rs)) => {
                    let (rx, rs) = (borrow(&dev, rx), rs.map(|m| borrow(&dev, m)));
                    buf.dispatch_cached_into(&self.group, h, &xb, hidden_bytes, scales, &rx, rs.as_ref())?;
                    None
                }
                None => Some(buf.dispatch_cached(&self.group, h, &xb, hidden_bytes, scales)?),
            };
            let ev = self.finish(&ctx, "ht_dispatch")?;
            let Some((recv_x, recv_scales)) = recv else { return Ok((None, None, ev)) };
            let num_scales = x_scales.map_or(0, |s| s.1);
            Ok((
                Some(self.output(&ctx, recv_x, rows * hidden_bytes)),
                (num_scales > 0).then(|| self.output(&ctx, recv_scales, rows * num_scales * 4)),
                ev,
            ))
        })
        .py()
    }

    /// HT combine: `(combined_x, combined_topk_weights or None, event)`; with `out` =
    /// `(combined_x, combined_topk_weights)` the caller's tensors are written (e.g. inside a
    /// CUDA-graph capture) and the two outputs are None.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (handle, x, hidden, topk_weights, bias, out, stream, previous_event, async_finish))]
    fn ht_combine(
        &self,
        py: Python<'_>,
        handle: PyRef<'_, HtHandleObj>,
        x: Mem,
        hidden: usize,
        topk_weights: Option<(Mem, usize)>,
        bias: (Option<Mem>, Option<Mem>),
        out: Option<(Mem, Option<Mem>)>,
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(Option<Array>, Option<Array>, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let dev = self.dev().clone();
        let (inner, generation, t) = (handle.inner.clone(), handle.generation, handle.num_tokens);
        py.detach(|| -> moe_ep::Result<_> {
            let mut st = self.lock()?;
            Self::check_generation(st.ht_generation, generation)?;
            let h = inner.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))?;
            let k = topk_weights.map_or(0, |w| w.1);
            let fits = st.ht.as_ref().is_some_and(|b| b.config().hidden >= hidden && b.config().num_topk >= k);
            if !fits {
                return Err(Error::invalid(
                    "x",
                    format!("combine of hidden {hidden} / top-{k} after a dispatch sized for less; dispatch with these shapes first"),
                ));
            }
            let buf = st.ht.as_mut().ok_or_else(|| Error::invalid("handle", "no HT buffer"))?;
            let xb = borrow(&dev, x);
            let wb = topk_weights.map(|(m, k)| (borrow(&dev, m), k));
            let b0 = bias.0.map(|m| borrow(&dev, m));
            let b1 = bias.1.map(|m| borrow(&dev, m));
            let (w, bias) = (wb.as_ref().map(|(b, k)| (b, *k)), [b0.as_ref(), b1.as_ref()]);
            self.begin(&ctx)?;
            let combined = match out {
                Some((cx, cw)) => {
                    let into = HtCombineOutputs { combined_x: borrow(&dev, cx), combined_topk_weights: cw.map(|m| borrow(&dev, m)) };
                    buf.combine_into(&self.group, h, &xb, hidden, w, bias, into)?;
                    None
                }
                None => Some(buf.combine(&self.group, h, &xb, hidden, w, bias)?),
            };
            let ev = self.finish(&ctx, "ht_combine")?;
            let Some(c) = combined else { return Ok((None, None, ev)) };
            Ok((
                Some(self.output(&ctx, c.combined_x, t * hidden * 2)),
                c.combined_topk_weights.map(|w| self.output(&ctx, w, t * k * 4)),
                ev,
            ))
        })
        .py()
    }

    /// LL dispatch: `(dispatch object, event)`; `send_only` leaves the receive to
    /// `ll_complete_dispatch`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (x, num_tokens, hidden, topk_idx, idx_bytes, num_topk, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, send_only, small, stats, stream, previous_event, async_finish))]
    fn ll_dispatch(
        &self,
        py: Python<'_>,
        x: Mem,
        num_tokens: usize,
        hidden: usize,
        topk_idx: Mem,
        idx_bytes: usize,
        num_topk: usize,
        max_tokens: usize,
        num_experts: usize,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        send_only: bool,
        small: Option<(Mem, Mem, Mem)>,
        stats: (Option<Mem>, Option<Mem>),
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(LlDispatchObj, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let dev = self.dev().clone();
        let ty = index_type(idx_bytes)?;
        let r = self.group.num_ranks();
        py.detach(|| -> moe_ep::Result<_> {
            let mut st = self.lock()?;
            self.ensure_ll(&mut st, LlConfig { num_experts, hidden, max_tokens }, &ctx)?;
            let generation = st.ll_generation;
            let buf = st.ll.as_mut().ok_or_else(|| Error::KernelFault("LL buffer missing".into()))?;
            let (xb, ib) = (borrow(&dev, x), borrow(&dev, topk_idx));
            let opts = LlDispatchOptions { send_only, use_fp8, round_scale, use_ue8m0 };
            self.begin(&ctx)?;
            let borrowed = |m: Option<Mem>| m.map(|m| borrow(&dev, m));
            let (recv_stats, wait_stats) = (borrowed(stats.0), borrowed(stats.1));
            let stats = LlStats {
                cumulative_local_expert_recv_stats: recv_stats.as_ref(),
                dispatch_wait_recv_cost_stats: wait_stats.as_ref(),
                combine_wait_recv_cost_stats: None,
            };
            let out = match small {
                // The caller's memory for the counts, ranges and epoch (graph-capturable).
                Some((c, lr, e)) => {
                    let small = [borrow(&dev, c), borrow(&dev, lr), borrow(&dev, e)];
                    buf.dispatch_with(&self.group, &xb, num_tokens, &ib, ty, num_topk, opts, small, stats)?
                }
                None => buf.dispatch(&self.group, &xb, num_tokens, &ib, ty, num_topk, opts, stats)?,
            };
            let ev = self.finish(&ctx, "ll_dispatch")?;
            let l = num_experts / r;
            let rows = l * r * max_tokens;
            let scales = if !use_fp8 {
                (0, 0)
            } else if use_ue8m0 {
                (out.packed_recv_x_scales.as_ref().map_or(0, |b| b.ptr()), rows * (hidden / 512) * 4)
            } else {
                (out.packed_recv_x_scales.as_ref().map_or(0, |b| b.ptr()), rows * (hidden / 128) * 4)
            };
            let ptrs = [
                (out.packed_recv_x.ptr(), rows * if use_fp8 { hidden } else { 2 * hidden }),
                scales,
                (out.packed_recv_count.ptr(), 4 * l),
                (out.handle.packed_recv_src_info.ptr(), 4 * rows),
                (out.handle.packed_recv_layout_range.ptr(), 8 * l * r),
            ];
            Ok((
                LlDispatchObj {
                    inner: self.guard(&ctx, Mutex::new(out)),
                    generation,
                    cuda: !dev.is_cpu(),
                    ptrs,
                    ctx: ctx.clone(),
                },
                ev,
            ))
        })
        .py()
    }

    /// The zero-copy combine input of `d`'s buffer set (`LlBuffer::combine_buffer`): bytes of
    /// `[L, R*M, hidden]` bf16; a combine given it reads the rows in place.
    #[pyo3(signature = (d, stream))]
    fn ll_combine_buffer(&self, py: Python<'_>, d: PyRef<'_, LlDispatchObj>, stream: usize) -> PyResult<Array> {
        let ctx = Ctx { stream, previous: None, async_finish: false };
        let (inner, generation) = (d.inner.clone(), d.generation);
        py.detach(|| -> moe_ep::Result<Array> {
            let st = self.lock()?;
            Self::check_generation(st.ll_generation, generation)?;
            let buf = st.ll.as_ref().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
            let outs = inner.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))?;
            let outs = outs.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
            let view = buf.combine_buffer(&outs.handle);
            let nbytes = view.len();
            Ok(self.output(&ctx, view, nbytes))
        })
        .py()
    }

    /// Runs the receive half of a `send_only` LL dispatch (no-op when already done).
    fn ll_complete_dispatch(&self, py: Python<'_>, d: PyRef<'_, LlDispatchObj>) -> PyResult<()> {
        self.complete_pending(py, &d.inner, d.generation, &d.ctx, "ll_dispatch")
    }

    /// LL combine: `(combined_x or None when written to `out`, pending receive or None,
    /// event)`. `x` is `[L, R*M, hidden]` bf16, rows as the dispatch packed them.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (d, x, num_tokens, topk_idx, idx_bytes, topk_weights, num_topk, out, send_only, wait_stats, stream, previous_event, async_finish))]
    fn ll_combine(
        &self,
        py: Python<'_>,
        d: PyRef<'_, LlDispatchObj>,
        x: Mem,
        num_tokens: usize,
        topk_idx: Mem,
        idx_bytes: usize,
        topk_weights: Mem,
        num_topk: usize,
        out: Option<Mem>,
        send_only: bool,
        wait_stats: Option<Mem>,
        stream: usize,
        previous_event: Option<PyRef<'_, NativeEvent>>,
        async_finish: bool,
    ) -> PyResult<(Option<Array>, Option<LlCombineObj>, Option<NativeEvent>)> {
        let ctx = ctx_of(stream, previous_event, async_finish);
        let dev = self.dev().clone();
        let ty = index_type(idx_bytes)?;
        let (inner, generation) = (d.inner.clone(), d.generation);
        py.detach(|| -> moe_ep::Result<_> {
            let mut st = self.lock()?;
            Self::check_generation(st.ll_generation, generation)?;
            let buf = st.ll.as_mut().ok_or_else(|| Error::invalid("handle", "no LL buffer"))?;
            let hidden = buf.config().hidden;
            let outs = inner.value.as_ref().ok_or_else(|| Error::invalid("handle", "released"))?;
            let outs = outs.lock().map_err(|_| Error::KernelFault("poisoned".into()))?;
            if outs.recv_hook.is_some() {
                return Err(Error::invalid("handle", "its dispatch's receive hook has not been called yet"));
            }
            let wait_stats = wait_stats.map(|m| borrow(&dev, m));
            let stats = LlStats { combine_wait_recv_cost_stats: wait_stats.as_ref(), ..LlStats::default() };
            let (xb, ib, wb) = (borrow(&dev, x), borrow(&dev, topk_idx), borrow(&dev, topk_weights));
            self.begin(&ctx)?;
            let combined = match out {
                Some(m) => {
                    let target = borrow(&dev, m);
                    let hook = buf.combine_into(
                        &self.group,
                        &outs.handle,
                        &xb,
                        &target,
                        num_tokens,
                        &ib,
                        ty,
                        &wb,
                        num_topk,
                        send_only,
                        stats,
                    )?;
                    LlCombineOutputs { combined_x: target, recv_hook: hook }
                }
                None => {
                    buf.combine(&self.group, &outs.handle, &xb, num_tokens, &ib, ty, &wb, num_topk, send_only, stats)?
                }
            };
            let ev = self.finish(&ctx, "ll_combine")?;
            let (ptr, len) = (combined.combined_x.ptr(), combined.combined_x.len());
            let pending = combined.recv_hook.is_some();
            let keep = self.guard(&ctx, Mutex::new(combined));
            let array = out.is_none().then(|| Array {
                _owner: keep.clone(),
                ptr,
                nbytes: (num_tokens * hidden * 2).min(len),
                cuda: !dev.is_cpu(),
            });
            let hook = pending.then(|| LlCombineObj { inner: keep, generation, ctx: ctx.clone() });
            Ok((array, hook, ev))
        })
        .py()
    }

    /// Runs the receive half of a `send_only` LL combine.
    fn ll_complete_combine(&self, py: Python<'_>, c: PyRef<'_, LlCombineObj>) -> PyResult<()> {
        self.complete_pending(py, &c.inner, c.generation, &c.ctx, "ll_combine")
    }

    /// Drops this rank's buffers (collective: every rank calls it).
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| -> moe_ep::Result<()> {
            let mut st = self.lock()?;
            if st.ht.is_some() || st.ll.is_some() || st.ht_mem.is_some() || st.ll_mem.is_some() {
                self.quiesce()?;
            }
            (st.ht, st.ht_mem, st.ll, st.ll_mem) = (None, None, None, None);
            st.ht_generation += 1;
            st.ll_generation += 1;
            Ok(())
        })
        .py()
    }
}

/// Bytes of the HT buffer for these sizes (`HtBuffer::size_hint`).
#[pyfunction]
#[pyo3(signature = (num_ranks, num_experts, hidden, num_topk, num_channels, num_slots))]
fn ht_size_hint(
    num_ranks: usize,
    num_experts: usize,
    hidden: usize,
    num_topk: usize,
    num_channels: usize,
    num_slots: usize,
) -> usize {
    // The GPU defaults of HtBuffer::new for what is left 0.
    let r = num_ranks.max(1);
    let warps_per_peer = (16 / r).max(1);
    let num_slots = if num_slots == 0 { (128 / warps_per_peer).max(2 * r) } else { num_slots };
    let cfg = HtConfig {
        num_experts,
        hidden,
        num_topk,
        num_scales: hidden / 128,
        num_channels,
        warps_per_peer,
        num_slots,
        heap_bytes: 0,
    };
    HtBuffer::size_hint(num_ranks.max(1), &cfg)
}

/// Bytes of the LL buffer for these sizes (`LlBuffer::size_hint`).
#[pyfunction]
fn ll_size_hint(num_max_dispatch_tokens_per_rank: usize, hidden: usize, num_ranks: usize, num_experts: usize) -> usize {
    let cfg = LlConfig { num_experts, hidden, max_tokens: num_max_dispatch_tokens_per_rank };
    LlBuffer::size_hint(num_ranks.max(1), &cfg)
}

/// Number of CUDA GPUs (0 without a driver).
#[pyfunction]
fn cuda_device_count() -> usize {
    Device::cuda_count().unwrap_or(0)
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Array>()?;
    m.add_class::<NativeEvent>()?;
    m.add_class::<UniqueId>()?;
    m.add_class::<Rank>()?;
    m.add_class::<HtHandleObj>()?;
    m.add_class::<LlDispatchObj>()?;
    m.add_class::<LlCombineObj>()?;
    m.add_function(wrap_pyfunction!(record_event, m)?)?;
    m.add_function(wrap_pyfunction!(ht_size_hint, m)?)?;
    m.add_function(wrap_pyfunction!(ll_size_hint, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add("__doc__", "moe-ep's native layer; use moe_ep.Buffer")?;
    Ok(())
}
