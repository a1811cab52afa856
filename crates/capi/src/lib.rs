//! `libnccl_ep`: moe-ep's C ABI, source- and ABI-compatible with NCCL EP's `nccl_ep.h`
//! (API version 2; the header is `include/nccl_ep.h`). A program written against NCCL EP
//! compiles against it unchanged and links with `-lnccl_ep`. See `docs/c.md`.
//!
//! Layering: [`sys`] mirrors the C types; [`structs`] and [`tensor`] check what C passes;
//! [`group`] and [`handle`] map groups and handles onto one [`moe_ep::Buffer`] per rank;
//! this file is the `extern "C"` surface, where every body runs under
//! [`error::guard`] (no panic unwinds into C; every failure leaves a message for
//! `moeEpGetLastError`).
//!
//! Beyond NCCL EP: `moeEpGetUniqueId` + `moeEpCreateGroup` make a group through moe-ep's
//! own bootstrap, so the ABI runs without NCCL (and on the CPU emulator).
#![allow(non_snake_case, non_upper_case_globals, clippy::missing_safety_doc)]

pub mod error;
pub mod group;
pub mod handle;
pub mod nccl;
pub mod structs;
pub mod sys;
pub mod tensor;

use error::{Failure, Result, guard};
use group::{EpGroup, GroupConfig};
use handle::{EpHandle, Layout};
use moe_ep::bootstrap::{TcpBootstrap, UniqueId, default_timeout};
use moe_ep::{Device, Group};
use std::ffi::{c_char, c_int, c_uint};
use structs::{read, read_or_default};
use sys::*;
use tensor::{TENSOR_ALLOC_DYNAMIC, Tensor};

/// Writes `value` through the caller's out-pointer.
fn put<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Failure::invalid("an output pointer is NULL"));
    }
    // SAFETY: non-null; the caller passes a writable pointer (every out-parameter's contract).
    unsafe { out.write(value) };
    Ok(())
}

/// The group behind a handle value.
fn group_ref<'a>(g: ncclEpGroup_t) -> Result<&'a EpGroup> {
    // SAFETY: non-null values are groups this library made and the caller has not destroyed.
    unsafe { g.cast::<EpGroup>().as_ref() }.ok_or_else(|| Failure::invalid("ep_group is NULL"))
}

fn handle_ref<'a>(h: ncclEpHandle_t) -> Result<&'a EpHandle> {
    // SAFETY: as group_ref, for handles.
    unsafe { h.cast::<EpHandle>().as_ref() }.ok_or_else(|| Failure::invalid("handle is NULL"))
}

/// The group config at `config` (required).
fn group_config(config: *const ncclEpGroupConfig_t, num_ranks: usize) -> Result<GroupConfig> {
    // SAFETY: the caller's struct (NULL is refused by read's None).
    let raw = unsafe { read(config) }?.ok_or_else(|| Failure::invalid("config is NULL"))?;
    GroupConfig::parse(&raw, num_ranks)
}

fn new_group(out: *mut ncclEpGroup_t, group: Group, config: GroupConfig) -> Result<()> {
    if out.is_null() {
        return Err(Failure::invalid("ep_group is NULL"));
    }
    let g = Box::new(EpGroup::new(group, config)?);
    put(out, Box::into_raw(g).cast())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGetVersion(version: *mut c_int) -> ncclResult_t {
    guard("ncclEpGetVersion", || put(version, NCCL_EP_VERSION_CODE))
}

/// What `ncclEpTensorAlloc` hands out: the public descriptor first, then its sizes.
#[repr(C)]
struct AllocatedTensor {
    public: ncclEpTensor_t,
    sizes: Box<[usize]>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpTensorAlloc(
    tensor: *mut *mut ncclEpTensor_t,
    ndim: c_uint,
    datatype: ncclDataType_t,
    sizes: *const usize,
    config: *const ncclEpTensorAllocConfig_t,
) -> ncclResult_t {
    guard("ncclEpTensorAlloc", || {
        // SAFETY: the caller's struct or NULL.
        unsafe { read(config) }?;
        if tensor.is_null() || sizes.is_null() || ndim == 0 {
            return Err(Failure::invalid("tensor and sizes must be non-NULL and ndim > 0"));
        }
        if tensor::element_bytes(datatype).is_none() {
            return Err(Failure::invalid(format!("unknown data type {datatype}")));
        }
        // SAFETY: the caller passes `ndim` sizes.
        let mut dims: Box<[usize]> = unsafe { std::slice::from_raw_parts(sizes, ndim as usize) }.into();
        let mut public = NCCL_EP_TENSOR_INIT;
        (public.magic, public.ndim, public.datatype, public.sizes) =
            (TENSOR_ALLOC_DYNAMIC, ndim, datatype, dims.as_mut_ptr());
        let t = Box::into_raw(Box::new(AllocatedTensor { public, sizes: dims }));
        put(tensor, t.cast())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpTensorDestroy(tensor: *mut ncclEpTensor_t) -> ncclResult_t {
    guard("ncclEpTensorDestroy", || {
        if tensor.is_null() {
            return Ok(());
        }
        // SAFETY: a descriptor of the caller's; only ours carry the dynamic magic.
        if unsafe { (*tensor).magic } != TENSOR_ALLOC_DYNAMIC {
            return Err(Failure::invalid("not a descriptor from ncclEpTensorAlloc"));
        }
        // SAFETY: made by ncclEpTensorAlloc (the magic), destroyed once (the caller's contract).
        drop(unsafe { Box::from_raw(tensor.cast::<AllocatedTensor>()) });
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCreateGroup(
    ep_group: *mut ncclEpGroup_t,
    comm: ncclComm_t,
    config: *const ncclEpGroupConfig_t,
) -> ncclResult_t {
    guard("ncclEpCreateGroup", || {
        // SAFETY: the caller's communicator.
        let group = unsafe { nccl::group_from_comm(comm) }?;
        let cfg = group_config(config, group.num_ranks())?;
        new_group(ep_group, group, cfg)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moeEpGetUniqueId(id: *mut moeEpUniqueId) -> ncclResult_t {
    guard("moeEpGetUniqueId", || {
        let bytes = UniqueId::new()?.to_bytes();
        let mut out = moeEpUniqueId::zeroed();
        for (o, b) in out.internal.iter_mut().zip(bytes) {
            *o = b as c_char;
        }
        put(id, out)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moeEpCreateGroup(
    ep_group: *mut ncclEpGroup_t,
    id: *const moeEpUniqueId,
    rank: c_int,
    nranks: c_int,
    device: c_int,
    config: *const ncclEpGroupConfig_t,
) -> ncclResult_t {
    guard("moeEpCreateGroup", || {
        // SAFETY: the caller's id, or NULL (refused).
        let id = unsafe { id.as_ref() }.ok_or_else(|| Failure::invalid("id is NULL"))?;
        let (Ok(rank), Ok(n)) = (usize::try_from(rank), usize::try_from(nranks)) else {
            return Err(Failure::invalid(format!("rank {rank} / nranks {nranks} must be >= 0")));
        };
        if rank >= n {
            return Err(Failure::invalid(format!("rank {rank} is not below nranks {n}")));
        }
        let cfg = group_config(config, n)?;
        let device = match usize::try_from(device) {
            Ok(ordinal) => Device::cuda(ordinal)?,
            Err(_) => Device::from_env()?,
        };
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let bootstrap = TcpBootstrap::new(&UniqueId::from_bytes(&bytes)?, rank, n, default_timeout())?;
        new_group(ep_group, Group::new(device, Box::new(bootstrap))?, cfg)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn moeEpGetLastError() -> *const c_char {
    error::last_error()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGroupDestroy(ep_group: ncclEpGroup_t) -> ncclResult_t {
    guard("ncclEpGroupDestroy", || {
        let g = group_ref(ep_group)?;
        // Collective: no rank frees memory its peers may still write.
        let quiesced = g.buffer.destroy();
        // SAFETY: made by new_group; destroyed once (the caller's contract).
        drop(unsafe { Box::from_raw(ep_group.cast::<EpGroup>()) });
        Ok(quiesced?)
    })
}

/// The layout and top-k of a new handle.
fn handle_args(g: &EpGroup, layout: ncclEpLayout_t, num_topk: c_int) -> Result<(Layout, Option<usize>)> {
    let layout = Layout::of(layout, g.config.algorithm)?;
    let k = match (layout, num_topk) {
        (Layout::LlExpertMajor, k) if k <= 0 => return Err(Failure::invalid(format!("num_topk {k}: LL needs > 0"))),
        (_, k) if k <= 0 => None,
        (_, k) => Some(k as usize),
    };
    Ok((layout, k))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpHandleMemSize(
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    size_out: *mut usize,
    num_topk: c_int,
) -> ncclResult_t {
    guard("ncclEpHandleMemSize", || {
        let g = group_ref(ep_group)?;
        // SAFETY: the caller's struct or NULL.
        unsafe { read(config) }?;
        let (layout, k) = handle_args(g, layout, num_topk)?;
        put(size_out, EpHandle::memory_bytes(g, layout, k.unwrap_or(moe_ep::limits::MAX_TOPK))?)
    })
}

fn init_handle(
    handle: *mut ncclEpHandle_t,
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    num_topk: c_int,
    handle_mem: *const ncclEpTensor_t,
) -> Result<&'static EpHandle> {
    if handle.is_null() {
        return Err(Failure::invalid("handle is NULL"));
    }
    let g = group_ref(ep_group)?;
    // SAFETY: the caller's struct or NULL.
    let cfg = unsafe { read_or_default(config) }?;
    let (layout, k) = handle_args(g, layout, num_topk)?;
    let alignment = match cfg.dispatch_output_per_expert_alignment {
        0 | 1 => 1,
        a if a.is_power_of_two() && layout == Layout::HtExpertMajor => a,
        a if layout == Layout::HtExpertMajor => {
            return Err(Failure::invalid(format!("dispatch_output_per_expert_alignment {a} is not a power of two")));
        }
        _ => return Err(Failure::invalid("dispatch_output_per_expert_alignment applies to HT EXPERT_MAJOR only")),
    };
    // SAFETY: the caller's descriptor or NULL.
    let mem = unsafe { Tensor::from_ptr("handle_mem", handle_mem) }?;
    let h = Box::into_raw(Box::new(EpHandle::new(g, layout, alignment, k, mem)?));
    put(handle, h.cast())?;
    // SAFETY: just made; the caller owns it until ncclEpHandleDestroy.
    Ok(unsafe { &*h })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpInitHandle(
    handle: *mut ncclEpHandle_t,
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    num_topk: c_int,
    handle_mem: *const ncclEpTensor_t,
) -> ncclResult_t {
    guard("ncclEpInitHandle", || init_handle(handle, ep_group, layout, config, num_topk, handle_mem).map(|_| ()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpUpdateHandle(
    handle: ncclEpHandle_t,
    topk_idx: *const ncclEpTensor_t,
    layout_info: *const ncclEpLayoutInfo_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpUpdateHandle", || {
        let h = handle_ref(handle)?;
        // SAFETY: the caller's descriptors and structs, and its stream.
        unsafe {
            let idx = Tensor::required("topk_idx", topk_idx)?;
            let info = read(layout_info)?;
            h.update(&idx, info.as_ref(), stream)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCreateHandle(
    handle: *mut ncclEpHandle_t,
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    topk_idx: *const ncclEpTensor_t,
    layout_info: *const ncclEpLayoutInfo_t,
    config: *const ncclEpHandleConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpCreateHandle", || {
        // SAFETY: the caller's descriptors and structs, and its stream.
        unsafe {
            let idx = Tensor::required("topk_idx", topk_idx)?;
            let info = read(layout_info)?;
            let k = idx.dims.get(1).copied().unwrap_or(0) as c_int;
            let h = init_handle(handle, ep_group, layout, config, k, std::ptr::null())?;
            let updated = h.update(&idx, info.as_ref(), stream);
            if updated.is_err() {
                drop(Box::from_raw((h as *const EpHandle).cast_mut()));
                *handle = std::ptr::null_mut();
            }
            updated
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpHandleDestroy(handle: ncclEpHandle_t) -> ncclResult_t {
    guard("ncclEpHandleDestroy", || {
        handle_ref(handle)?;
        // SAFETY: made by init_handle; destroyed once (the caller's contract).
        drop(unsafe { Box::from_raw(handle.cast::<EpHandle>()) });
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpDispatch(
    handle: ncclEpHandle_t,
    inputs: *const ncclEpDispatchInputs_t,
    outputs: *const ncclEpDispatchOutputs_t,
    layout_info: *const ncclEpLayoutInfo_t,
    config: *const ncclEpDispatchConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpDispatch", || {
        let h = handle_ref(handle)?;
        // SAFETY: the caller's structs, descriptors and stream.
        unsafe {
            let inputs = read(inputs)?.ok_or_else(|| Failure::invalid("inputs is NULL"))?;
            let outputs = read(outputs)?.ok_or_else(|| Failure::invalid("outputs is NULL"))?;
            let info = read(layout_info)?;
            let cfg = read_or_default(config)?;
            h.dispatch(&inputs, &outputs, info.as_ref(), &cfg, stream)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCombine(
    handle: ncclEpHandle_t,
    inputs: *const ncclEpCombineInputs_t,
    outputs: *const ncclEpCombineOutputs_t,
    config: *const ncclEpCombineConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpCombine", || {
        let h = handle_ref(handle)?;
        // SAFETY: the caller's structs, descriptors and stream.
        unsafe {
            let inputs = read(inputs)?.ok_or_else(|| Failure::invalid("inputs is NULL"))?;
            let outputs = read(outputs)?.ok_or_else(|| Failure::invalid("outputs is NULL"))?;
            let cfg = read_or_default(config)?;
            h.combine(&inputs, &outputs, &cfg, stream)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpComplete(
    handle: ncclEpHandle_t,
    config: *const ncclEpCompleteConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpComplete", || {
        let h = handle_ref(handle)?;
        // SAFETY: the caller's struct or NULL, and its stream.
        unsafe {
            read(config)?;
            h.complete(stream)
        }
    })
}

/// The answer of the mask and async-error functions: groups of this release have no masks.
fn no_masks(ep_group: ncclEpGroup_t) -> Result<()> {
    group_ref(ep_group)?;
    Err(Failure::usage("needs a group created with enable_mask, which this moe-ep release does not support"))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskQuery(ep_group: ncclEpGroup_t, _mask: *mut c_int, _s: cudaStream_t) -> ncclResult_t {
    guard("ncclEpMaskQuery", || no_masks(ep_group))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskUpdate(
    ep_group: ncclEpGroup_t,
    _mask: *const c_int,
    _s: cudaStream_t,
) -> ncclResult_t {
    guard("ncclEpMaskUpdate", || no_masks(ep_group))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskClean(ep_group: ncclEpGroup_t, _s: cudaStream_t) -> ncclResult_t {
    guard("ncclEpMaskClean", || no_masks(ep_group))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGetAsyncError(ep_group: ncclEpGroup_t, _error_out: *mut c_int) -> ncclResult_t {
    guard("ncclEpGetAsyncError", || no_masks(ep_group))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpErrorClear(ep_group: ncclEpGroup_t) -> ncclResult_t {
    guard("ncclEpErrorClear", || no_masks(ep_group))
}
