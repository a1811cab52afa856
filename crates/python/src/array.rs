//! Memory, streams and events as Python sees them: the zero-copy [`Array`] output, borrowed
//! tensors and streams, [`NativeEvent`] and the stream context of a call, plus the mapping of
//! Rust errors to Python exceptions.
use moe_ep::layout::IndexType;
use moe_ep::{CallStream, Device, DeviceBuffer, Error, Event, Output, Stream};
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// A Rust error as the Python exception a caller can act on.
pub(crate) fn py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument { .. } | Error::Unsupported(_) => PyValueError::new_err(e.to_string()),
        Error::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

pub(crate) trait OrPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> OrPy<T> for moe_ep::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(py_err)
    }
}

/// `(data pointer, bytes)` of a tensor, as Python passes it.
pub(crate) type Mem = (u64, usize);

pub(crate) fn borrow(device: &Device, (ptr, bytes): Mem) -> DeviceBuffer {
    // SAFETY: Python passes the pointer and size of a live, contiguous tensor on this device
    // (checked there) and keeps it referenced for the call, and for async calls until the
    // returned event is waited on (DeepEP's contract for inputs).
    unsafe { DeviceBuffer::borrowed(device, ptr, bytes) }
}

pub(crate) fn device_from(name: &str) -> PyResult<Device> {
    Device::from_name(name).py()
}

pub(crate) fn index_type(idx_bytes: usize) -> PyResult<IndexType> {
    match idx_bytes {
        4 => Ok(IndexType::I32),
        8 => Ok(IndexType::I64),
        _ => Err(PyValueError::new_err(format!("topk_idx: {idx_bytes}-byte integers (expected int32 or int64)"))),
    }
}

/// A [`Stream`] view of torch's `CUstream` `raw`, kept per (GPU, stream).
pub(crate) fn borrowed_stream(device: &Device, raw: usize) -> Arc<Stream> {
    // SAFETY: Python passes streams of this device's primary context (torch's current
    // stream), which torch never destroys (its streams come from pools).
    unsafe { Stream::from_raw_shared(device, raw) }
}

/// Bytes on a device (or host memory on the CPU back end), viewed from Python without a copy
/// through `__array_interface__` / `__cuda_array_interface__` as a flat `uint8` array.
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct Array {
    pub(crate) out: Output,
    pub(crate) cuda: bool,
}

impl Array {
    fn interface<'py>(&self, py: Python<'py>, version: u32) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", (self.out.len(),))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.out.ptr(), false))?;
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
        self.out.len()
    }

    /// Address of the first byte.
    #[getter]
    fn ptr(&self) -> u64 {
        self.out.ptr()
    }
}

/// A point in a stream's work (what DeepEP's `EventHandle` is).
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct NativeEvent {
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
pub(crate) fn record_event(py: Python<'_>, device: &str, stream: usize) -> PyResult<NativeEvent> {
    let device = device_from(device)?;
    let event = py.detach(|| borrowed_stream(&device, stream).record_event());
    Ok(NativeEvent { event: Arc::new(event.py()?), device })
}

/// The stream context of a call, from what Python passes: torch's current stream, an event
/// to wait for instead, and whether to return an event.
pub(crate) fn call_of(
    device: &Device,
    stream: usize,
    previous: Option<PyRef<'_, NativeEvent>>,
    async_finish: bool,
) -> CallStream {
    CallStream {
        caller: (!device.is_cpu()).then(|| borrowed_stream(device, stream)),
        previous: previous.map(|e| e.event.clone()),
        async_finish,
    }
}

/// A native event for Python (None when the op needs no waiting).
pub(crate) fn event_of(device: &Device, ev: Option<Arc<Event>>) -> Option<NativeEvent> {
    ev.map(|event| NativeEvent { event, device: device.clone() })
}

/// Number of CUDA GPUs (0 without a driver).
#[pyfunction]
pub(crate) fn cuda_device_count() -> usize {
    Device::cuda_count().unwrap_or(0)
}
