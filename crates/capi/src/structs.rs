//! The public structs' versioning rule: each starts with `size` and `magic`, grows only by
//! appending, and a library reads the fields the caller's `size` covers (the rest keep their
//! zero defaults). Smaller than the frozen V1 size or a wrong magic: `ncclInvalidArgument`.
use crate::error::{Failure, Result};
use crate::sys::*;

/// A public struct under the versioning rule.
pub trait Versioned: Copy {
    /// Its C name.
    const NAME: &'static str;
    /// The magic the `*_INIT` macro writes.
    const MAGIC: u32;
    /// The frozen V1 size: anything smaller is refused.
    const V1_SIZE: u32;
    /// All fields zero (the defaults), `size` and `magic` included.
    fn zeroed() -> Self;
}

macro_rules! versioned {
    ($($t:ident: $magic:expr, $v1:expr;)*) => {$(
        impl Versioned for $t {
            const NAME: &'static str = stringify!($t);
            const MAGIC: u32 = $magic;
            const V1_SIZE: u32 = $v1;
            fn zeroed() -> Self {
                $t::zeroed()
            }
        }
    )*};
}

versioned! {
    ncclEpTensorAllocConfig_t: NCCL_EP_MAGIC, NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE;
    ncclEpGroupConfig_t: NCCL_EP_MAGIC, NCCL_EP_GROUP_CONFIG_V1_SIZE;
    ncclEpLayoutInfo_t: NCCL_EP_MAGIC, NCCL_EP_LAYOUT_INFO_V1_SIZE;
    ncclEpDispatchInputs_t: NCCL_EP_MAGIC, NCCL_EP_DISPATCH_INPUTS_V1_SIZE;
    ncclEpDispatchOutputs_t: NCCL_EP_MAGIC, NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE;
    ncclEpCombineInputs_t: NCCL_EP_MAGIC, NCCL_EP_COMBINE_INPUTS_V1_SIZE;
    ncclEpCombineOutputs_t: NCCL_EP_MAGIC, NCCL_EP_COMBINE_OUTPUTS_V1_SIZE;
    ncclEpHandleConfig_t: NCCL_EP_MAGIC, NCCL_EP_HANDLE_CONFIG_V1_SIZE;
    ncclEpDispatchConfig_t: NCCL_EP_MAGIC, NCCL_EP_DISPATCH_CONFIG_V1_SIZE;
    ncclEpCombineConfig_t: NCCL_EP_MAGIC, NCCL_EP_COMBINE_CONFIG_V1_SIZE;
    ncclEpCompleteConfig_t: NCCL_EP_MAGIC, NCCL_EP_COMPLETE_CONFIG_V1_SIZE;
}

/// The caller's `*ptr` as this library's version of `T`: the fields its `size` covers, the
/// rest zero. NULL is `None` (the defaults).
///
/// # Safety
/// `ptr` is NULL or points to at least `size` readable bytes (the struct the caller made).
pub unsafe fn read<T: Versioned>(ptr: *const T) -> Result<Option<T>> {
    if ptr.is_null() {
        return Ok(None);
    }
    let head = ptr.cast::<u32>();
    // SAFETY: every public struct starts with two u32 (`size`, `magic`); the caller's
    // struct has at least those.
    let (size, magic) = unsafe { (head.read_unaligned(), head.add(1).read_unaligned()) };
    if magic != T::MAGIC {
        return Err(Failure::invalid(format!(
            "{}: magic {magic:#x}, expected {:#x} (initialise it with its _INIT macro)",
            T::NAME,
            T::MAGIC
        )));
    }
    if size < T::V1_SIZE {
        return Err(Failure::invalid(format!("{}: size {size} is below its V1 size {}", T::NAME, T::V1_SIZE)));
    }
    let mut value = T::zeroed();
    let covered = (size as usize).min(size_of::<T>());
    // SAFETY: the caller's struct holds `size` bytes, `value` holds size_of::<T>(); all
    // fields are plain data (integers, pointers, enums read as integers).
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut value).cast::<u8>(), covered) };
    Ok(Some(value))
}

/// [`read`], with `T`'s defaults for NULL.
///
/// # Safety
/// As [`read`].
pub unsafe fn read_or_default<T: Versioned>(ptr: *const T) -> Result<T> {
    // SAFETY: forwarded.
    Ok(unsafe { read(ptr) }?.unwrap_or_else(T::zeroed))
}
