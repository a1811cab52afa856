//! The rank and its ops: [`Rank`] (group, buffer allocation, layout, the HT and LL dispatch /
//! combine calls), the handles and outputs those return, and the buffer size hints.
use crate::array::{Array, Mem, NativeEvent, OrPy, borrow, call_of, device_from, event_of, index_type, py_err};
use crate::bootstrap::{PyBootstrap, UniqueId};
use moe_ep::bootstrap::{TcpBootstrap, default_timeout};
use moe_ep::buffer::{
    HtCombineCall, HtDispatchCall, HtDispatchHandle, LayoutCall, LlCombineCall, LlCombinePending, LlDispatch,
    LlDispatchCall,
};
use moe_ep::intranode::{HtBuffer, HtCombineOutputs, HtConfig, HtDispatchArgs, HtDispatchBuffers, HtMaps};
use moe_ep::layout::{DispatchLayout, IndexType};
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlStats};
use moe_ep::{Buffer, BufferConfig, Device, DeviceBuffer, Error, Group, Output};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::{Arc, OnceLock};

type Scales = Option<(Mem, usize)>;
type TopK = Option<(Mem, usize, Mem, usize)>;

/// An HT dispatch's inputs as Python passes them, borrowed as device buffers.
struct HtInputs {
    x: DeviceBuffer,
    x_scales: Option<(DeviceBuffer, usize)>,
    topk: Option<(DeviceBuffer, IndexType, DeviceBuffer, usize)>,
    layout: DispatchLayout,
}

impl HtInputs {
    fn new(dev: &Device, x: Mem, x_scales: Scales, topk: TopK, layout: (Mem, Mem, Mem)) -> PyResult<HtInputs> {
        let topk = match topk {
            Some((i, b, w, k)) => Some((borrow(dev, i), index_type(b)?, borrow(dev, w), k)),
            None => None,
        };
        Ok(HtInputs {
            x: borrow(dev, x),
            x_scales: x_scales.map(|(m, n)| (borrow(dev, m), n)),
            topk,
            layout: DispatchLayout {
                num_tokens_per_rank: borrow(dev, layout.0),
                num_tokens_per_expert: borrow(dev, layout.1),
                is_token_in_rank: borrow(dev, layout.2),
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        hidden: usize,
        hidden_bytes: usize,
        num_tokens: usize,
        num_experts: usize,
        expert_alignment: usize,
        num_worst_tokens: Option<usize>,
        num_channels: usize,
    ) -> HtDispatchCall<'_> {
        HtDispatchCall {
            args: HtDispatchArgs {
                x: &self.x,
                hidden_bytes,
                num_tokens,
                x_scales: self.x_scales.as_ref().map(|(b, n)| (b, *n)),
                topk: self.topk.as_ref().map(|(i, ty, w, k)| (i, *ty, w, *k)),
                layout: &self.layout,
                expert_alignment,
                num_worst_tokens,
            },
            hidden,
            num_experts,
            num_channels,
        }
    }
}

/// One rank: its group (device, stream, bootstrap) and, once allocated, its [`Buffer`].
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct Rank {
    group: Arc<Group>,
    buffer: OnceLock<Buffer>,
}

impl Rank {
    fn new(group: Group) -> Rank {
        Rank { group: Arc::new(group), buffer: OnceLock::new() }
    }

    fn dev(&self) -> &Device {
        self.group.device()
    }

    fn buffer(&self) -> moe_ep::Result<&Buffer> {
        self.buffer.get().ok_or_else(|| Error::invalid("Buffer", "its memory is not allocated yet"))
    }

    fn array(&self, out: Output) -> Array {
        Array { out, cuda: !self.dev().is_cpu() }
    }

    fn opt_array(&self, out: Option<Output>) -> Option<Array> {
        out.map(|o| self.array(o))
    }
}

/// The handle of an HT dispatch.
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct HtHandleObj {
    handle: HtDispatchHandle,
    cuda: bool,
    /// Ranks.
    #[pyo3(get)]
    num_ranks: usize,
}

impl HtHandleObj {
    fn array(&self, out: moe_ep::Result<Output>) -> PyResult<Array> {
        Ok(Array { out: out.py()?, cuda: self.cuda })
    }
}

#[pymethods]
impl HtHandleObj {
    /// Rows of the dispatch outputs (exact count, or `num_worst_tokens`).
    #[getter]
    fn num_rows(&self) -> usize {
        self.handle.num_rows
    }

    /// Tokens of this rank.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.handle.num_tokens
    }

    /// `[R, R]` int32 (DeepEP's `rank_prefix_matrix`).
    fn rank_prefix_matrix(&self) -> PyResult<Array> {
        self.array(self.handle.rank_prefix_matrix())
    }

    /// `[R, C + 1]` int32: the first row of each (source rank, channel) in this rank's
    /// outputs, and each source rank's end.
    fn channel_prefix_matrix(&self) -> PyResult<Array> {
        self.array(self.handle.channel_prefix_matrix())
    }

    /// Channels of the dispatch.
    #[getter]
    fn num_channels(&self) -> PyResult<usize> {
        self.handle.num_channels().py()
    }

    /// `[T, R]` bool.
    fn is_token_in_rank(&self) -> PyResult<Array> {
        self.array(self.handle.is_token_in_rank())
    }

    /// `[T, R]` int32.
    fn send_head(&self) -> PyResult<Array> {
        self.array(self.handle.send_head())
    }
}

/// Outputs and handle of an LL dispatch (combine and the hook use it).
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct LlDispatchObj {
    d: LlDispatch,
    cuda: bool,
}

#[pymethods]
impl LlDispatchObj {
    /// The layout generation of the LL buffer the outputs are views into.
    #[getter]
    fn generation(&self) -> u64 {
        self.d.generation()
    }

    /// `(packed_recv_x, packed_recv_x_scales or None, packed_recv_count, packed_recv_src_info,
    /// packed_recv_layout_range)` as byte arrays.
    fn arrays(&self) -> Vec<Option<Array>> {
        let v = self.d.views();
        let cuda = self.cuda;
        [
            Some(v.packed_recv_x),
            v.packed_recv_x_scales,
            Some(v.packed_recv_count),
            Some(v.packed_recv_src_info),
            Some(v.packed_recv_layout_range),
        ]
        .into_iter()
        .map(|o| o.map(|out| Array { out, cuda }))
        .collect()
    }
}

/// The pending receive half of a `send_only` LL combine.
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct LlCombineObj {
    pending: LlCombinePending,
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
    /// DeepEP does ([`BufferConfig`]).
    #[pyo3(signature = (nvl_bytes, heap_bytes, rdma_bytes))]
    fn allocate(&self, py: Python<'_>, nvl_bytes: usize, heap_bytes: Option<usize>, rdma_bytes: usize) -> PyResult<()> {
        if self.buffer.get().is_some() {
            return Err(py_err(Error::invalid("allocate", "the buffers are allocated already")));
        }
        let config = BufferConfig { nvl_bytes, heap_bytes, rdma_bytes };
        let buffer = py.detach(|| Buffer::new(self.group.clone(), config)).py()?;
        self.buffer.set(buffer).map_err(|_| py_err(Error::invalid("allocate", "the buffers are allocated already")))
    }

    /// This rank's whole HT (`use_rdma_buffer` false) or LL memory from byte `offset`
    /// (DeepEP's `get_local_buffer_tensor`): bytes, or None when that memory is absent.
    fn local_buffer(&self, offset: usize, use_rdma_buffer: bool) -> PyResult<Option<Array>> {
        Ok(self.opt_array(self.buffer().and_then(|b| b.local_buffer(offset, use_rdma_buffer)).py()?))
    }

    /// The heap's and the LL memory's sizes: `(rings, heap, ll)` bytes (0 = none).
    fn memory_bytes(&self) -> PyResult<(usize, usize, usize)> {
        self.buffer().and_then(|b| b.memory_bytes()).py()
    }

    /// `nbytes` from the HT buffer's heap for work ordered on `stream`, or None (no HT
    /// buffer yet, no heap, or no room).
    #[pyo3(signature = (nbytes, stream))]
    fn ht_alloc_output(&self, py: Python<'_>, nbytes: usize, stream: usize) -> PyResult<Option<Array>> {
        let call = call_of(self.dev(), stream, None, false);
        let out = py.detach(|| self.buffer()?.ht_alloc_output(&call, nbytes)).py()?;
        Ok(self.opt_array(out))
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
        py.detach(|| self.buffer()?.synchronize()).py()
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let index_type = index_type(idx_bytes)?;
        let idx = borrow(dev, topk_idx);
        let into = out.map(|[a, b, c]| DispatchLayout {
            num_tokens_per_rank: borrow(dev, a),
            num_tokens_per_expert: borrow(dev, b),
            is_token_in_rank: borrow(dev, c),
        });
        let c = LayoutCall { topk_idx: &idx, index_type, num_tokens, num_topk, num_experts };
        let (l, ev) = py.detach(|| self.buffer()?.layout(&call, &c, into)).py()?;
        let ev = event_of(dev, ev);
        Ok(match l {
            Some(l) => (
                Some(self.array(l.num_tokens_per_rank)),
                Some(self.array(l.num_tokens_per_expert)),
                Some(self.array(l.is_token_in_rank)),
                ev,
            ),
            None => (None, None, None, ev),
        })
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let inputs = HtInputs::new(dev, x, x_scales, topk, layout)?;
        let c = inputs.call(
            hidden,
            hidden_bytes,
            num_tokens,
            num_experts,
            expert_alignment,
            num_worst_tokens,
            num_channels,
        );
        let (out, ev) = py.detach(|| self.buffer()?.ht_dispatch(&call, &c)).py()?;
        Ok((
            self.array(out.recv_x),
            self.opt_array(out.recv_x_scales),
            self.opt_array(out.recv_topk_idx),
            self.opt_array(out.recv_topk_weights),
            self.array(out.recv_src_idx),
            self.array(out.num_recv_tokens_per_expert),
            out.num_recv_tokens_per_expert_list,
            HtHandleObj { handle: out.handle, cuda: !dev.is_cpu(), num_ranks: self.group.num_ranks() },
            event_of(dev, ev),
        ))
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let inputs = HtInputs::new(dev, x, x_scales, topk, layout)?;
        let worst = Some(num_worst_tokens);
        let c = inputs.call(hidden, hidden_bytes, num_tokens, num_experts, expert_alignment, worst, num_channels);
        let b = |m: Mem| borrow(dev, m);
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
        let (handle, ev) = py.detach(|| self.buffer()?.ht_dispatch_into(&call, &c, into)).py()?;
        Ok((HtHandleObj { handle, cuda: !dev.is_cpu(), num_ranks: self.group.num_ranks() }, event_of(dev, ev)))
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let xb = borrow(dev, x);
        let sb = x_scales.map(|(m, n)| (borrow(dev, m), n));
        let into = out.map(|(rx, rs)| (borrow(dev, rx), rs.map(|m| borrow(dev, m))));
        let h = &handle.handle;
        let (recv, ev) = py
            .detach(|| {
                let scales = sb.as_ref().map(|(b, n)| (b, *n));
                self.buffer()?.ht_dispatch_cached(&call, h, &xb, hidden_bytes, scales, into)
            })
            .py()?;
        let ev = event_of(dev, ev);
        Ok(match recv {
            Some((rx, rs)) => (Some(self.array(rx)), self.opt_array(rs), ev),
            None => (None, None, ev),
        })
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let xb = borrow(dev, x);
        let wb = topk_weights.map(|(m, k)| (borrow(dev, m), k));
        let (b0, b1) = (bias.0.map(|m| borrow(dev, m)), bias.1.map(|m| borrow(dev, m)));
        let into = out.map(|(cx, cw)| HtCombineOutputs {
            combined_x: borrow(dev, cx),
            combined_topk_weights: cw.map(|m| borrow(dev, m)),
        });
        let c = HtCombineCall {
            x: &xb,
            hidden,
            topk_weights: wb.as_ref().map(|(b, k)| (b, *k)),
            bias: [b0.as_ref(), b1.as_ref()],
        };
        let h = &handle.handle;
        let (combined, ev) = py.detach(|| self.buffer()?.ht_combine(&call, h, &c, into)).py()?;
        let ev = event_of(dev, ev);
        Ok(match combined {
            Some((cx, cw)) => (Some(self.array(cx)), self.opt_array(cw), ev),
            None => (None, None, ev),
        })
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let index_type = index_type(idx_bytes)?;
        let (xb, ib) = (borrow(dev, x), borrow(dev, topk_idx));
        let (recv_stats, wait_stats) = (stats.0.map(|m| borrow(dev, m)), stats.1.map(|m| borrow(dev, m)));
        let c = LlDispatchCall {
            x: &xb,
            num_tokens,
            hidden,
            topk_idx: &ib,
            index_type,
            num_topk,
            max_tokens,
            num_experts,
            options: LlDispatchOptions { send_only, use_fp8, round_scale, use_ue8m0, x_scales: None },
            small: small.map(|(c, lr, e)| [borrow(dev, c), borrow(dev, lr), borrow(dev, e)]),
            stats: LlStats {
                cumulative_local_expert_recv_stats: recv_stats.as_ref(),
                dispatch_wait_recv_cost_stats: wait_stats.as_ref(),
                combine_wait_recv_cost_stats: None,
            },
            recv_into: None,
        };
        let (d, ev) = py.detach(|| self.buffer()?.ll_dispatch(&call, c)).py()?;
        Ok((LlDispatchObj { d, cuda: !dev.is_cpu() }, event_of(dev, ev)))
    }

    /// The zero-copy combine input of `d`'s buffer set (`LlBuffer::combine_buffer`): bytes of
    /// `[L, R*M, hidden]` bf16; a combine given it reads the rows in place.
    #[pyo3(signature = (d, stream))]
    fn ll_combine_buffer(&self, py: Python<'_>, d: PyRef<'_, LlDispatchObj>, stream: usize) -> PyResult<Array> {
        let call = call_of(self.dev(), stream, None, false);
        let d = &d.d;
        Ok(self.array(py.detach(|| self.buffer()?.ll_combine_buffer(&call, d)).py()?))
    }

    /// Runs the receive half of a `send_only` LL dispatch (no-op when already done).
    fn ll_complete_dispatch(&self, py: Python<'_>, d: PyRef<'_, LlDispatchObj>) -> PyResult<()> {
        let d = &d.d;
        py.detach(|| self.buffer()?.ll_complete_dispatch(d)).py()
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
        let dev = self.dev();
        let call = call_of(dev, stream, previous_event, async_finish);
        let index_type = index_type(idx_bytes)?;
        let (xb, ib, wb) = (borrow(dev, x), borrow(dev, topk_idx), borrow(dev, topk_weights));
        let wait_stats = wait_stats.map(|m| borrow(dev, m));
        let c = LlCombineCall {
            x: &xb,
            num_tokens,
            topk_idx: &ib,
            index_type,
            topk_weights: &wb,
            num_topk,
            send_only,
            wait_stats: wait_stats.as_ref(),
        };
        let target = out.map(|m| borrow(dev, m));
        let d = &d.d;
        let (combined, pending, ev) = py.detach(|| self.buffer()?.ll_combine(&call, d, &c, target)).py()?;
        Ok((self.opt_array(combined), pending.map(|pending| LlCombineObj { pending }), event_of(dev, ev)))
    }

    /// Runs the receive half of a `send_only` LL combine.
    fn ll_complete_combine(&self, py: Python<'_>, c: PyRef<'_, LlCombineObj>) -> PyResult<()> {
        let pending = &c.pending;
        py.detach(|| self.buffer()?.ll_complete_combine(pending)).py()
    }

    /// Drops this rank's buffers (collective: every rank calls it).
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.buffer()?.destroy()).py()
    }
}

/// Bytes of the HT buffer for these sizes (`HtBuffer::size_hint`).
#[pyfunction]
#[pyo3(signature = (num_ranks, num_experts, hidden, num_topk, num_channels, num_slots))]
pub(crate) fn ht_size_hint(
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
pub(crate) fn ll_size_hint(
    num_max_dispatch_tokens_per_rank: usize,
    hidden: usize,
    num_ranks: usize,
    num_experts: usize,
) -> usize {
    let cfg = LlConfig { num_experts, hidden, max_tokens: num_max_dispatch_tokens_per_rank };
    LlBuffer::size_hint(num_ranks.max(1), &cfg)
}
