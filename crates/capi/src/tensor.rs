//! `ncclEpTensor_t` descriptors: checked, then viewed as typed, shaped device memory.
use crate::error::{Failure, Result};
use crate::sys::*;
use moe_ep::{Device, DeviceBuffer};

/// The magic of descriptors made by `ncclEpTensorAlloc` (NCCL EP's value: either library
/// may be asked to check the other's descriptors in mixed code).
pub const TENSOR_ALLOC_DYNAMIC: u32 = 0xBEEF_BEEF;

/// Most dimensions a descriptor may have.
const MAX_NDIM: u32 = 8;

/// Bytes per element of an NCCL data type (packed fp4 pairs: one byte), or None.
pub fn element_bytes(dtype: ncclDataType_t) -> Option<usize> {
    Some(match dtype {
        ncclInt8 | ncclUint8 | ncclFloat8e4m3 | ncclFloat8e5m2 | ncclFloat4x2 => 1,
        ncclFloat16 | ncclBfloat16 => 2,
        ncclInt32 | ncclUint32 | ncclFloat32 => 4,
        ncclInt64 | ncclUint64 | ncclFloat64 => 8,
        _ => return None,
    })
}

/// NCCL's name of a data type, for messages.
pub fn dtype_name(dtype: ncclDataType_t) -> String {
    match dtype {
        ncclInt8 => "ncclInt8".into(),
        ncclUint8 => "ncclUint8".into(),
        ncclInt32 => "ncclInt32".into(),
        ncclUint32 => "ncclUint32".into(),
        ncclInt64 => "ncclInt64".into(),
        ncclUint64 => "ncclUint64".into(),
        ncclFloat16 => "ncclFloat16".into(),
        ncclFloat32 => "ncclFloat32".into(),
        ncclFloat64 => "ncclFloat64".into(),
        ncclBfloat16 => "ncclBfloat16".into(),
        ncclFloat8e4m3 => "ncclFloat8e4m3".into(),
        ncclFloat8e5m2 => "ncclFloat8e5m2".into(),
        ncclFloat4x2 => "ncclFloat4x2".into(),
        other => format!("data type {other}"),
    }
}

/// A checked descriptor: data pointer, type and shape (contiguous, row-major).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The argument it came as (for messages).
    pub name: &'static str,
    pub data: u64,
    pub dtype: ncclDataType_t,
    pub dims: Vec<usize>,
}

impl Tensor {
    /// Checks the descriptor at `ptr` (`None` for NULL).
    ///
    /// # Safety
    /// `ptr` is NULL or a descriptor the caller initialised, whose `sizes` holds `ndim`
    /// values.
    pub unsafe fn from_ptr(name: &'static str, ptr: *const ncclEpTensor_t) -> Result<Option<Tensor>> {
        if ptr.is_null() {
            return Ok(None);
        }
        // SAFETY: the caller's descriptor starts with `size` and `magic`.
        let (size, magic) = unsafe { ((*ptr).size, (*ptr).magic) };
        if magic != NCCL_EP_TENSOR_MAGIC && magic != TENSOR_ALLOC_DYNAMIC {
            return Err(Failure::invalid(format!(
                "{name}: not an initialised tensor descriptor (magic {magic:#x}; use NCCL_EP_TENSOR_INIT or ncclEpTensorAlloc)"
            )));
        }
        if size < NCCL_EP_TENSOR_V1_SIZE {
            return Err(Failure::invalid(format!("{name}: descriptor size {size} is below {NCCL_EP_TENSOR_V1_SIZE}")));
        }
        // SAFETY: at least the V1 fields are there (checked).
        let t = unsafe { *ptr };
        if !t.win_hdl.is_null() {
            return Err(Failure::usage(format!(
                "{name}: NCCL window-backed tensors are not supported by moe-ep; pass a device pointer in `data`"
            )));
        }
        if t.ndim == 0 || t.ndim > MAX_NDIM || t.sizes.is_null() {
            return Err(Failure::invalid(format!(
                "{name}: ndim {} (1..={MAX_NDIM}) with a sizes array needed",
                t.ndim
            )));
        }
        let Some(elem) = element_bytes(t.datatype) else {
            return Err(Failure::invalid(format!("{name}: unknown data type {}", t.datatype)));
        };
        // SAFETY: `sizes` holds `ndim` values (the descriptor's contract).
        let dims = unsafe { std::slice::from_raw_parts(t.sizes, t.ndim as usize) }.to_vec();
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elems.and_then(|n| n.checked_mul(elem)).is_none() {
            return Err(Failure::invalid(format!("{name}: shape {dims:?} overflows")));
        }
        let data = t.data as u64;
        let tensor = Tensor { name, data, dtype: t.datatype, dims };
        if data == 0 && tensor.bytes() > 0 {
            return Err(Failure::invalid(format!("{name}: data is NULL")));
        }
        Ok(Some(tensor))
    }

    /// [`Tensor::from_ptr`] of a descriptor that must be there.
    ///
    /// # Safety
    /// As [`Tensor::from_ptr`].
    pub unsafe fn required(name: &'static str, ptr: *const ncclEpTensor_t) -> Result<Tensor> {
        // SAFETY: forwarded.
        unsafe { Tensor::from_ptr(name, ptr) }?.ok_or_else(|| Failure::invalid(format!("{name} is required")))
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.numel() * element_bytes(self.dtype).unwrap_or(1)
    }

    /// Checks the type against `dtypes` and the shape against `dims` (`None` = any extent).
    pub fn expect(&self, dtypes: &[ncclDataType_t], dims: &[Option<usize>]) -> Result<&Tensor> {
        if !dtypes.contains(&self.dtype) {
            let want: Vec<String> = dtypes.iter().map(|&d| dtype_name(d)).collect();
            return Err(Failure::invalid(format!(
                "{}: {} given, {} expected",
                self.name,
                dtype_name(self.dtype),
                want.join(" or ")
            )));
        }
        let fits = self.dims.len() == dims.len() && self.dims.iter().zip(dims).all(|(&d, w)| w.is_none_or(|w| w == d));
        if !fits {
            let want: Vec<String> = dims.iter().map(|w| w.map_or("*".into(), |w| w.to_string())).collect();
            return Err(Failure::invalid(format!(
                "{}: shape {:?} given, [{}] expected",
                self.name,
                self.dims,
                want.join(", ")
            )));
        }
        Ok(self)
    }

    /// The memory, used in place.
    ///
    /// # Safety
    /// `data` is memory of `device` holding [`Tensor::bytes`] bytes (the caller's contract
    /// for descriptors it passes), alive while the view is used.
    pub unsafe fn buffer(&self, device: &Device) -> DeviceBuffer {
        // SAFETY: forwarded.
        unsafe { DeviceBuffer::borrowed(device, self.data, self.bytes()) }
    }
}
