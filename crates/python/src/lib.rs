//! `moe_ep._native`: thin PyO3 shims over the `moe-ep` host crate's [`moe_ep::Buffer`] (the
//! session: memory, layouts, stream ordering, outputs). The DeepEP-compatible API
//! (`moe_ep.Buffer`, argument checks, torch/numpy handling) is Python, in `python/moe_ep/`.
//!
//! * Tensors come in as `(data pointer, byte length)` pairs and are used in place
//!   ([`DeviceBuffer::borrowed`]); Python checked dtype, shape, device and contiguity.
//! * Streams come in as raw `CUstream` integers (torch's current stream). Every op runs on the
//!   rank's own stream (DeepEP's "comm stream"), ordered after the caller's stream or
//!   `previous_event`, and, unless `async_finish`, the caller's stream waits for it.
//! * Outputs go out as [`Array`]s: a [`moe_ep::Output`] exposing `__array_interface__` (CPU)
//!   or `__cuda_array_interface__` (GPU), which Python views as numpy arrays / torch tensors
//!   without copying.
//! * Every blocking call releases the GIL: ranks of one process are Python threads.
//! * Rust errors become `ValueError` (bad arguments), `TimeoutError` (device-side timeout) or
//!   `RuntimeError`; nothing here panics on bad input.
mod array;
mod bootstrap;
mod buffer;

use array::{Array, NativeEvent, cuda_device_count, record_event};
use bootstrap::UniqueId;
use buffer::{HtHandleObj, LlCombineObj, LlDispatchObj, Rank, ht_size_hint, ll_size_hint};
use pyo3::prelude::*;

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
