// SPDX-License-Identifier: MIT OR Apache-2.0
// moe-ep: NCCL EP API v2 compatible header.
//
//! Raw Rust mirror of the C types in `include/nccl_ep.h` (and
//! `include/nccl_ep/ep_enums.h`): `#[repr(C)]` structs with the C names and
//! field order, C enums as `i32` type aliases plus one constant per
//! enumerator, and every versioning constant. Layouts assume LP64 (64-bit
//! Linux) and are checked at compile time below.
//!
//! Opaque C handles (`ncclComm_t`, `ncclWindow_t`, `cudaStream_t`,
//! `ncclEpGroup_t`, `ncclEpHandle_t`) are plain `*mut c_void` here.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, missing_docs)]

use core::mem::{offset_of, size_of};
use std::ffi::c_void;
use std::os::raw::c_char;

// ---------------------------------------------------------------------------
// NCCL / CUDA types
// ---------------------------------------------------------------------------

/// NCCL status code (`ncclResult_t`).
pub type ncclResult_t = i32;
pub const ncclSuccess: ncclResult_t = 0;
pub const ncclUnhandledCudaError: ncclResult_t = 1;
pub const ncclSystemError: ncclResult_t = 2;
pub const ncclInternalError: ncclResult_t = 3;
pub const ncclInvalidArgument: ncclResult_t = 4;
pub const ncclInvalidUsage: ncclResult_t = 5;
pub const ncclRemoteError: ncclResult_t = 6;
pub const ncclInProgress: ncclResult_t = 7;
pub const ncclTimeout: ncclResult_t = 8;
pub const ncclNumResults: ncclResult_t = 9;

/// NCCL element type (`ncclDataType_t`).
pub type ncclDataType_t = i32;
pub const ncclInt8: ncclDataType_t = 0;
pub const ncclChar: ncclDataType_t = 0;
pub const ncclUint8: ncclDataType_t = 1;
pub const ncclInt32: ncclDataType_t = 2;
pub const ncclInt: ncclDataType_t = 2;
pub const ncclUint32: ncclDataType_t = 3;
pub const ncclInt64: ncclDataType_t = 4;
pub const ncclUint64: ncclDataType_t = 5;
pub const ncclFloat16: ncclDataType_t = 6;
pub const ncclHalf: ncclDataType_t = 6;
pub const ncclFloat32: ncclDataType_t = 7;
pub const ncclFloat: ncclDataType_t = 7;
pub const ncclFloat64: ncclDataType_t = 8;
pub const ncclDouble: ncclDataType_t = 8;
pub const ncclBfloat16: ncclDataType_t = 9;
pub const ncclFloat8e4m3: ncclDataType_t = 10;
pub const ncclFloat8e5m2: ncclDataType_t = 11;
pub const ncclNumTypes: ncclDataType_t = 12;
/// Two packed FP4 values per byte (NCCL's reserved value 12).
pub const ncclFloat4x2: ncclDataType_t = 12;

/// CUDA runtime status code (`cudaError_t`); only the values used here.
pub type cudaError_t = i32;
pub const cudaSuccess: cudaError_t = 0;
pub const cudaErrorMemoryAllocation: cudaError_t = 2;

/// `struct ncclComm*`.
pub type ncclComm_t = *mut c_void;
/// `struct ncclWindow_vidmem*`.
pub type ncclWindow_t = *mut c_void;
/// `struct CUstream_st*`.
pub type cudaStream_t = *mut c_void;

// ---------------------------------------------------------------------------
// Enums (ep_enums.h and nccl_ep.h)
// ---------------------------------------------------------------------------

/// "Let the library choose".
pub const NCCL_EP_AUTO: u32 = 0;

/// Communication algorithm of a group.
pub type ncclEpAlgorithm_t = i32;
pub const NCCL_EP_ALGO_LOW_LATENCY: ncclEpAlgorithm_t = 0;
pub const NCCL_EP_ALGO_HIGH_THROUGHPUT: ncclEpAlgorithm_t = 1;

/// HT receive-overflow policy.
pub type ncclEpOverflowPolicy_t = i32;
pub const NCCL_EP_OVERFLOW_AUTO: ncclEpOverflowPolicy_t = 0;
pub const NCCL_EP_OVERFLOW_TRAP: ncclEpOverflowPolicy_t = 1;
pub const NCCL_EP_OVERFLOW_DROP: ncclEpOverflowPolicy_t = 2;

/// Dispatch output layout.
pub type ncclEpLayout_t = i32;
pub const NCCL_EP_LAYOUT_UNSET: ncclEpLayout_t = 0;
pub const NCCL_EP_LAYOUT_EXPERT_MAJOR: ncclEpLayout_t = 1;
pub const NCCL_EP_LAYOUT_RANK_MAJOR: ncclEpLayout_t = 2;
pub const NCCL_EP_LAYOUT_FLAT: ncclEpLayout_t = 3;

/// Forward or backward pass.
pub type ncclEpPassDir_t = i32;
pub const NCCL_EP_FWD_PASS: ncclEpPassDir_t = 0;
pub const NCCL_EP_BWD_PASS: ncclEpPassDir_t = 1;

/// Staging / zero-copy policy.
pub type ncclEpZeroCopyMode_t = i32;
pub const NCCL_EP_ZERO_COPY_AUTO: ncclEpZeroCopyMode_t = 0;
pub const NCCL_EP_ZERO_COPY_OFF: ncclEpZeroCopyMode_t = 1;
pub const NCCL_EP_ZERO_COPY_ON: ncclEpZeroCopyMode_t = 2;

/// Numbering of expert ids in the dispatch `topk_idx` output.
pub type ncclEpExpertIdKind_t = i32;
pub const NCCL_EP_EXPERT_ID_AUTO: ncclEpExpertIdKind_t = 0;
pub const NCCL_EP_EXPERT_ID_LOCAL: ncclEpExpertIdKind_t = 1;
pub const NCCL_EP_EXPERT_ID_GLOBAL: ncclEpExpertIdKind_t = 2;

/// Dispatch quantization recipe.
pub type ncclEpDispQuant_t = i32;
pub const NCCL_EP_DISP_QUANT_NONE: ncclEpDispQuant_t = 0;
pub const NCCL_EP_DISP_QUANT_FWD: ncclEpDispQuant_t = 1;
pub const NCCL_EP_DISP_QUANT_DS_FP8E3M4: ncclEpDispQuant_t = 2;

/// Combine quantization recipe.
pub type ncclEpCombQuant_t = i32;
pub const NCCL_EP_COMB_QUANT_NONE: ncclEpCombQuant_t = 0;
pub const NCCL_EP_COMB_QUANT_NVFP4: ncclEpCombQuant_t = 1;

// ---------------------------------------------------------------------------
// Versions and magics
// ---------------------------------------------------------------------------

pub const NCCL_EP_MAJOR: i32 = 0;
pub const NCCL_EP_MINOR: i32 = 1;
pub const NCCL_EP_PATCH: i32 = 0;
/// MAJOR * 10000 + MINOR * 100 + PATCH, as returned by `ncclEpGetVersion`.
pub const NCCL_EP_VERSION_CODE: i32 = NCCL_EP_MAJOR * 10000 + NCCL_EP_MINOR * 100 + NCCL_EP_PATCH;
/// API (struct feature set) version; goes in `ncclEpGroupConfig_t::version`.
pub const NCCL_EP_API_VERSION: u32 = 2;
/// `magic` of every versioned struct except the tensor descriptor.
pub const NCCL_EP_MAGIC: u32 = 0xC00F_FFEE;
/// `magic` of a caller-initialised `ncclEpTensor_t`.
pub const NCCL_EP_TENSOR_MAGIC: u32 = 0xCAFE_CAFE;

// ---------------------------------------------------------------------------
// Opaque handles and callbacks
// ---------------------------------------------------------------------------

/// `struct ncclEpGroup*`.
pub type ncclEpGroup_t = *mut c_void;
/// `struct ncclEpHandle*`.
pub type ncclEpHandle_t = *mut c_void;

/// Device allocation callback: `(ptr, size, context) -> cudaError_t`.
pub type ncclEpAllocFn_t =
    Option<unsafe extern "C" fn(ptr: *mut *mut c_void, size: usize, context: *mut c_void) -> cudaError_t>;
/// Device free callback: `(ptr, context) -> cudaError_t`.
pub type ncclEpFreeFn_t = Option<unsafe extern "C" fn(ptr: *mut c_void, context: *mut c_void) -> cudaError_t>;

// ---------------------------------------------------------------------------
// Structs
// ---------------------------------------------------------------------------

/// N-dimensional device tensor descriptor (`struct ncclEpTensor`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpTensor_t {
    /// `sizeof(ncclEpTensor_t)`.
    pub size: u32,
    /// `NCCL_EP_TENSOR_MAGIC`, or a library value for allocated descriptors.
    pub magic: u32,
    /// Number of dimensions.
    pub ndim: u32,
    /// Element type.
    pub datatype: ncclDataType_t,
    /// Device address, or null when window-backed.
    pub data: *mut c_void,
    /// NCCL window, or null.
    pub win_hdl: ncclWindow_t,
    /// Byte offset inside `win_hdl`.
    pub win_offset: u64,
    /// `ndim` extents, outermost first.
    pub sizes: *mut usize,
}

/// Options for `ncclEpTensorAlloc` (none yet).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpTensorAllocConfig_t {
    pub size: u32,
    pub magic: u32,
}

/// Custom device allocator of a group; all null = library default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpAllocConfig_t {
    pub alloc_fn: ncclEpAllocFn_t,
    pub free_fn: ncclEpFreeFn_t,
    /// Passed to both callbacks.
    pub context: *mut c_void,
}

/// Group parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpGroupConfig_t {
    pub size: u32,
    pub magic: u32,
    /// Caller's `NCCL_EP_API_VERSION`.
    pub version: u32,
    pub algorithm: ncclEpAlgorithm_t,
    /// Experts over all ranks.
    pub num_experts: u32,
    pub max_dispatch_tokens_per_rank: u32,
    /// HT receive bound, or `NCCL_EP_AUTO`.
    pub max_recv_tokens_per_rank: u32,
    /// Bytes per token row (tokens plus scales).
    pub max_token_bytes: u32,
    /// C `unsigned long int` (64-bit on LP64).
    pub rdma_buffer_size: u64,
    pub num_qp_per_rank: u32,
    pub num_channels: u32,
    pub max_num_sms: u32,
    pub alloc: ncclEpAllocConfig_t,
    pub enable_mask: u32,
    pub timeout_ns: u64,
    // --- V2 ---
    pub zero_copy: ncclEpZeroCopyMode_t,
    pub overflow_policy: ncclEpOverflowPolicy_t,
    pub num_topk: u32,
    /// Reserved, zero.
    pub padding_v2: [u8; 4],
}

/// Optional counter tensors filled at handle or dispatch time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpLayoutInfo_t {
    pub size: u32,
    pub magic: u32,
    pub expert_counters: *mut ncclEpTensor_t,
    pub src_rank_counters: *mut ncclEpTensor_t,
    pub expert_offsets: *mut ncclEpTensor_t,
    pub recv_total_counter: *mut ncclEpTensor_t,
    // --- V2 ---
    pub recv_topk_idx_kind: ncclEpExpertIdKind_t,
    /// Reserved, zero.
    pub padding_v2: [u8; 4],
}

/// Tensors read by `ncclEpDispatch`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpDispatchInputs_t {
    pub size: u32,
    pub magic: u32,
    pub tokens: *mut ncclEpTensor_t,
    pub topk_weights: *mut ncclEpTensor_t,
    pub scales: *mut ncclEpTensor_t,
}

/// Tensors written by `ncclEpDispatch`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpDispatchOutputs_t {
    pub size: u32,
    pub magic: u32,
    pub tokens: *mut ncclEpTensor_t,
    pub topk_weights: *mut ncclEpTensor_t,
    pub scales: *mut ncclEpTensor_t,
    pub topk_idx: *mut ncclEpTensor_t,
}

/// Tensors read by `ncclEpCombine`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpCombineInputs_t {
    pub size: u32,
    pub magic: u32,
    pub tokens: *mut ncclEpTensor_t,
    pub topk_weights: *mut ncclEpTensor_t,
    // --- V2 ---
    pub scales: *mut ncclEpTensor_t,
}

/// Tensors written by `ncclEpCombine`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpCombineOutputs_t {
    pub size: u32,
    pub magic: u32,
    pub tokens: *mut ncclEpTensor_t,
    pub topk_weights: *mut ncclEpTensor_t,
}

/// Per-handle options.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpHandleConfig_t {
    pub size: u32,
    pub magic: u32,
    /// HT expert-major slot alignment per expert (power of two; 0/1 = none).
    pub dispatch_output_per_expert_alignment: usize,
}

/// Per-call dispatch options.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpDispatchConfig_t {
    pub size: u32,
    pub magic: u32,
    pub send_only: u32,
    pub round_scales: u32,
    pub pass_direction: ncclEpPassDir_t,
    // --- V2 ---
    pub quant_recipe: ncclEpDispQuant_t,
}

/// Per-call combine options.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpCombineConfig_t {
    pub size: u32,
    pub magic: u32,
    pub send_only: u32,
    pub pass_direction: ncclEpPassDir_t,
    // --- V2 ---
    pub quant_recipe: ncclEpCombQuant_t,
}

/// Options for `ncclEpComplete` (none yet; `struct ncclEpCompleteConfig`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ncclEpCompleteConfig_t {
    pub size: u32,
    pub magic: u32,
}

/// moe-ep extension: bytes of a bootstrap id.
pub const MOE_EP_UNIQUE_ID_BYTES: usize = 128;

/// moe-ep extension: opaque bootstrap id for `moeEpCreateGroup`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct moeEpUniqueId {
    pub internal: [c_char; MOE_EP_UNIQUE_ID_BYTES],
}

// ---------------------------------------------------------------------------
// All-zero constructors
// ---------------------------------------------------------------------------

impl ncclEpTensor_t {
    /// Every field zero / null (size and magic too).
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            ndim: 0,
            datatype: 0,
            data: core::ptr::null_mut(),
            win_hdl: core::ptr::null_mut(),
            win_offset: 0,
            sizes: core::ptr::null_mut(),
        }
    }
}

impl ncclEpTensorAllocConfig_t {
    /// Every field zero.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0 }
    }
}

impl ncclEpAllocConfig_t {
    /// No callbacks, null context.
    pub const fn zeroed() -> Self {
        Self { alloc_fn: None, free_fn: None, context: core::ptr::null_mut() }
    }
}

impl ncclEpGroupConfig_t {
    /// Every field zero / null (size, magic and version too).
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            version: 0,
            algorithm: 0,
            num_experts: 0,
            max_dispatch_tokens_per_rank: 0,
            max_recv_tokens_per_rank: 0,
            max_token_bytes: 0,
            rdma_buffer_size: 0,
            num_qp_per_rank: 0,
            num_channels: 0,
            max_num_sms: 0,
            alloc: ncclEpAllocConfig_t::zeroed(),
            enable_mask: 0,
            timeout_ns: 0,
            zero_copy: 0,
            overflow_policy: 0,
            num_topk: 0,
            padding_v2: [0; 4],
        }
    }
}

impl ncclEpLayoutInfo_t {
    /// Every field zero / null.
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            expert_counters: core::ptr::null_mut(),
            src_rank_counters: core::ptr::null_mut(),
            expert_offsets: core::ptr::null_mut(),
            recv_total_counter: core::ptr::null_mut(),
            recv_topk_idx_kind: 0,
            padding_v2: [0; 4],
        }
    }
}

impl ncclEpDispatchInputs_t {
    /// Every field zero / null.
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            tokens: core::ptr::null_mut(),
            topk_weights: core::ptr::null_mut(),
            scales: core::ptr::null_mut(),
        }
    }
}

impl ncclEpDispatchOutputs_t {
    /// Every field zero / null.
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            tokens: core::ptr::null_mut(),
            topk_weights: core::ptr::null_mut(),
            scales: core::ptr::null_mut(),
            topk_idx: core::ptr::null_mut(),
        }
    }
}

impl ncclEpCombineInputs_t {
    /// Every field zero / null.
    pub const fn zeroed() -> Self {
        Self {
            size: 0,
            magic: 0,
            tokens: core::ptr::null_mut(),
            topk_weights: core::ptr::null_mut(),
            scales: core::ptr::null_mut(),
        }
    }
}

impl ncclEpCombineOutputs_t {
    /// Every field zero / null.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0, tokens: core::ptr::null_mut(), topk_weights: core::ptr::null_mut() }
    }
}

impl ncclEpHandleConfig_t {
    /// Every field zero.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0, dispatch_output_per_expert_alignment: 0 }
    }
}

impl ncclEpDispatchConfig_t {
    /// Every field zero.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0, send_only: 0, round_scales: 0, pass_direction: 0, quant_recipe: 0 }
    }
}

impl ncclEpCombineConfig_t {
    /// Every field zero.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0, send_only: 0, pass_direction: 0, quant_recipe: 0 }
    }
}

impl ncclEpCompleteConfig_t {
    /// Every field zero.
    pub const fn zeroed() -> Self {
        Self { size: 0, magic: 0 }
    }
}

impl moeEpUniqueId {
    /// All bytes zero.
    pub const fn zeroed() -> Self {
        Self { internal: [0; MOE_EP_UNIQUE_ID_BYTES] }
    }
}

// ---------------------------------------------------------------------------
// Current sizes, frozen version sizes, and the C *_INIT values
// ---------------------------------------------------------------------------

pub const NCCL_EP_TENSOR_SIZE: u32 = size_of::<ncclEpTensor_t>() as u32;
pub const NCCL_EP_TENSOR_V1_SIZE: u32 = 48;
pub const NCCL_EP_TENSOR_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_TENSOR_ALLOC_CONFIG_SIZE: u32 = size_of::<ncclEpTensorAllocConfig_t>() as u32;
pub const NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE: u32 = 8;
pub const NCCL_EP_TENSOR_ALLOC_CONFIG_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_GROUP_CONFIG_SIZE: u32 = size_of::<ncclEpGroupConfig_t>() as u32;
pub const NCCL_EP_GROUP_CONFIG_V1_SIZE: u32 = 96;
pub const NCCL_EP_GROUP_CONFIG_V2_SIZE: u32 = 112;
pub const NCCL_EP_GROUP_CONFIG_CURRENT_VERSION: u32 = 2;

pub const NCCL_EP_LAYOUT_INFO_SIZE: u32 = size_of::<ncclEpLayoutInfo_t>() as u32;
pub const NCCL_EP_LAYOUT_INFO_V1_SIZE: u32 = 40;
pub const NCCL_EP_LAYOUT_INFO_V2_SIZE: u32 = 48;
pub const NCCL_EP_LAYOUT_INFO_CURRENT_VERSION: u32 = 2;

pub const NCCL_EP_DISPATCH_INPUTS_SIZE: u32 = size_of::<ncclEpDispatchInputs_t>() as u32;
pub const NCCL_EP_DISPATCH_INPUTS_V1_SIZE: u32 = 32;
pub const NCCL_EP_DISPATCH_INPUTS_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_DISPATCH_OUTPUTS_SIZE: u32 = size_of::<ncclEpDispatchOutputs_t>() as u32;
pub const NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE: u32 = 40;
pub const NCCL_EP_DISPATCH_OUTPUTS_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_COMBINE_INPUTS_SIZE: u32 = size_of::<ncclEpCombineInputs_t>() as u32;
pub const NCCL_EP_COMBINE_INPUTS_V1_SIZE: u32 = 24;
pub const NCCL_EP_COMBINE_INPUTS_V2_SIZE: u32 = 32;
pub const NCCL_EP_COMBINE_INPUTS_CURRENT_VERSION: u32 = 2;

pub const NCCL_EP_COMBINE_OUTPUTS_SIZE: u32 = size_of::<ncclEpCombineOutputs_t>() as u32;
pub const NCCL_EP_COMBINE_OUTPUTS_V1_SIZE: u32 = 24;
pub const NCCL_EP_COMBINE_OUTPUTS_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_HANDLE_CONFIG_SIZE: u32 = size_of::<ncclEpHandleConfig_t>() as u32;
pub const NCCL_EP_HANDLE_CONFIG_V1_SIZE: u32 = 16;
pub const NCCL_EP_HANDLE_CONFIG_CURRENT_VERSION: u32 = 1;

pub const NCCL_EP_DISPATCH_CONFIG_SIZE: u32 = size_of::<ncclEpDispatchConfig_t>() as u32;
pub const NCCL_EP_DISPATCH_CONFIG_V1_SIZE: u32 = 20;
pub const NCCL_EP_DISPATCH_CONFIG_V2_SIZE: u32 = 24;
pub const NCCL_EP_DISPATCH_CONFIG_CURRENT_VERSION: u32 = 2;

pub const NCCL_EP_COMBINE_CONFIG_SIZE: u32 = size_of::<ncclEpCombineConfig_t>() as u32;
pub const NCCL_EP_COMBINE_CONFIG_V1_SIZE: u32 = 16;
pub const NCCL_EP_COMBINE_CONFIG_V2_SIZE: u32 = 20;
pub const NCCL_EP_COMBINE_CONFIG_CURRENT_VERSION: u32 = 2;

pub const NCCL_EP_COMPLETE_CONFIG_SIZE: u32 = size_of::<ncclEpCompleteConfig_t>() as u32;
pub const NCCL_EP_COMPLETE_CONFIG_V1_SIZE: u32 = 8;
pub const NCCL_EP_COMPLETE_CONFIG_CURRENT_VERSION: u32 = 1;

/// Same value as C `NCCL_EP_TENSOR_INIT`.
pub const NCCL_EP_TENSOR_INIT: ncclEpTensor_t =
    ncclEpTensor_t { size: NCCL_EP_TENSOR_SIZE, magic: NCCL_EP_TENSOR_MAGIC, ..ncclEpTensor_t::zeroed() };
/// Same value as C `NCCL_EP_TENSOR_ALLOC_CONFIG_INIT`.
pub const NCCL_EP_TENSOR_ALLOC_CONFIG_INIT: ncclEpTensorAllocConfig_t =
    ncclEpTensorAllocConfig_t { size: NCCL_EP_TENSOR_ALLOC_CONFIG_SIZE, magic: NCCL_EP_MAGIC };
/// Same value as C `NCCL_EP_GROUP_CONFIG_INIT` (size, magic and version set).
pub const NCCL_EP_GROUP_CONFIG_INIT: ncclEpGroupConfig_t = ncclEpGroupConfig_t {
    size: NCCL_EP_GROUP_CONFIG_SIZE,
    magic: NCCL_EP_MAGIC,
    version: NCCL_EP_API_VERSION,
    ..ncclEpGroupConfig_t::zeroed()
};
/// Same value as C `NCCL_EP_LAYOUT_INFO_INIT`.
pub const NCCL_EP_LAYOUT_INFO_INIT: ncclEpLayoutInfo_t =
    ncclEpLayoutInfo_t { size: NCCL_EP_LAYOUT_INFO_SIZE, magic: NCCL_EP_MAGIC, ..ncclEpLayoutInfo_t::zeroed() };
/// Same value as C `NCCL_EP_DISPATCH_INPUTS_INIT`.
pub const NCCL_EP_DISPATCH_INPUTS_INIT: ncclEpDispatchInputs_t = ncclEpDispatchInputs_t {
    size: NCCL_EP_DISPATCH_INPUTS_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpDispatchInputs_t::zeroed()
};
/// Same value as C `NCCL_EP_DISPATCH_OUTPUTS_INIT`.
pub const NCCL_EP_DISPATCH_OUTPUTS_INIT: ncclEpDispatchOutputs_t = ncclEpDispatchOutputs_t {
    size: NCCL_EP_DISPATCH_OUTPUTS_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpDispatchOutputs_t::zeroed()
};
/// Same value as C `NCCL_EP_COMBINE_INPUTS_INIT`.
pub const NCCL_EP_COMBINE_INPUTS_INIT: ncclEpCombineInputs_t = ncclEpCombineInputs_t {
    size: NCCL_EP_COMBINE_INPUTS_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpCombineInputs_t::zeroed()
};
/// Same value as C `NCCL_EP_COMBINE_OUTPUTS_INIT`.
pub const NCCL_EP_COMBINE_OUTPUTS_INIT: ncclEpCombineOutputs_t = ncclEpCombineOutputs_t {
    size: NCCL_EP_COMBINE_OUTPUTS_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpCombineOutputs_t::zeroed()
};
/// Same value as C `NCCL_EP_HANDLE_CONFIG_INIT`.
pub const NCCL_EP_HANDLE_CONFIG_INIT: ncclEpHandleConfig_t =
    ncclEpHandleConfig_t { size: NCCL_EP_HANDLE_CONFIG_SIZE, magic: NCCL_EP_MAGIC, ..ncclEpHandleConfig_t::zeroed() };
/// Same value as C `NCCL_EP_DISPATCH_CONFIG_INIT`.
pub const NCCL_EP_DISPATCH_CONFIG_INIT: ncclEpDispatchConfig_t = ncclEpDispatchConfig_t {
    size: NCCL_EP_DISPATCH_CONFIG_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpDispatchConfig_t::zeroed()
};
/// Same value as C `NCCL_EP_COMBINE_CONFIG_INIT`.
pub const NCCL_EP_COMBINE_CONFIG_INIT: ncclEpCombineConfig_t = ncclEpCombineConfig_t {
    size: NCCL_EP_COMBINE_CONFIG_SIZE,
    magic: NCCL_EP_MAGIC,
    ..ncclEpCombineConfig_t::zeroed()
};
/// Same value as C `NCCL_EP_COMPLETE_CONFIG_INIT`.
pub const NCCL_EP_COMPLETE_CONFIG_INIT: ncclEpCompleteConfig_t =
    ncclEpCompleteConfig_t { size: NCCL_EP_COMPLETE_CONFIG_SIZE, magic: NCCL_EP_MAGIC };

// ---------------------------------------------------------------------------
// Layout checks (LP64)
// ---------------------------------------------------------------------------

const _: () = assert!(size_of::<usize>() == 8 && size_of::<*mut c_void>() == 8);
const _: () = assert!(size_of::<ncclEpAllocFn_t>() == 8 && size_of::<ncclEpFreeFn_t>() == 8);

// ncclEpTensor_t
const _: () = assert!(offset_of!(ncclEpTensor_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpTensor_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpTensor_t, ndim) == 8);
const _: () = assert!(offset_of!(ncclEpTensor_t, datatype) == 12);
const _: () = assert!(offset_of!(ncclEpTensor_t, data) == 16);
const _: () = assert!(offset_of!(ncclEpTensor_t, win_hdl) == 24);
const _: () = assert!(offset_of!(ncclEpTensor_t, win_offset) == 32);
const _: () = assert!(offset_of!(ncclEpTensor_t, sizes) == 40);
const _: () = assert!(offset_of!(ncclEpTensor_t, sizes) + size_of::<*mut usize>() == NCCL_EP_TENSOR_V1_SIZE as usize);
const _: () = assert!(size_of::<ncclEpTensor_t>() == 48);
const _: () = assert!(NCCL_EP_TENSOR_SIZE == NCCL_EP_TENSOR_V1_SIZE);

// ncclEpTensorAllocConfig_t
const _: () = assert!(offset_of!(ncclEpTensorAllocConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpTensorAllocConfig_t, magic) == 4);
const _: () = assert!(
    offset_of!(ncclEpTensorAllocConfig_t, magic) + size_of::<u32>() == NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpTensorAllocConfig_t>() == 8);
const _: () = assert!(NCCL_EP_TENSOR_ALLOC_CONFIG_SIZE == NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE);

// ncclEpAllocConfig_t (embedded, unversioned)
const _: () = assert!(offset_of!(ncclEpAllocConfig_t, alloc_fn) == 0);
const _: () = assert!(offset_of!(ncclEpAllocConfig_t, free_fn) == 8);
const _: () = assert!(offset_of!(ncclEpAllocConfig_t, context) == 16);
const _: () = assert!(size_of::<ncclEpAllocConfig_t>() == 24);

// ncclEpGroupConfig_t
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, version) == 8);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, algorithm) == 12);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, num_experts) == 16);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, max_dispatch_tokens_per_rank) == 20);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, max_recv_tokens_per_rank) == 24);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, max_token_bytes) == 28);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, rdma_buffer_size) == 32);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, num_qp_per_rank) == 40);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, num_channels) == 44);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, max_num_sms) == 48);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, alloc) == 56);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, alloc.alloc_fn) == 56);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, alloc.free_fn) == 64);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, alloc.context) == 72);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, enable_mask) == 80);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, timeout_ns) == 88);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, zero_copy) == 96);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, overflow_policy) == 100);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, num_topk) == 104);
const _: () = assert!(offset_of!(ncclEpGroupConfig_t, padding_v2) == 108);
const _: () =
    assert!(offset_of!(ncclEpGroupConfig_t, timeout_ns) + size_of::<u64>() == NCCL_EP_GROUP_CONFIG_V1_SIZE as usize);
const _: () = assert!(
    offset_of!(ncclEpGroupConfig_t, padding_v2) + size_of::<[u8; 4]>() == NCCL_EP_GROUP_CONFIG_V2_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpGroupConfig_t>() == 112);
const _: () = assert!(NCCL_EP_GROUP_CONFIG_SIZE == NCCL_EP_GROUP_CONFIG_V2_SIZE);

// ncclEpLayoutInfo_t
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, expert_counters) == 8);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, src_rank_counters) == 16);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, expert_offsets) == 24);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, recv_total_counter) == 32);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, recv_topk_idx_kind) == 40);
const _: () = assert!(offset_of!(ncclEpLayoutInfo_t, padding_v2) == 44);
const _: () = assert!(
    offset_of!(ncclEpLayoutInfo_t, recv_total_counter) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_LAYOUT_INFO_V1_SIZE as usize
);
const _: () =
    assert!(offset_of!(ncclEpLayoutInfo_t, padding_v2) + size_of::<[u8; 4]>() == NCCL_EP_LAYOUT_INFO_V2_SIZE as usize);
const _: () = assert!(size_of::<ncclEpLayoutInfo_t>() == 48);
const _: () = assert!(NCCL_EP_LAYOUT_INFO_SIZE == NCCL_EP_LAYOUT_INFO_V2_SIZE);

// ncclEpDispatchInputs_t
const _: () = assert!(offset_of!(ncclEpDispatchInputs_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpDispatchInputs_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpDispatchInputs_t, tokens) == 8);
const _: () = assert!(offset_of!(ncclEpDispatchInputs_t, topk_weights) == 16);
const _: () = assert!(offset_of!(ncclEpDispatchInputs_t, scales) == 24);
const _: () = assert!(
    offset_of!(ncclEpDispatchInputs_t, scales) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_DISPATCH_INPUTS_V1_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpDispatchInputs_t>() == 32);
const _: () = assert!(NCCL_EP_DISPATCH_INPUTS_SIZE == NCCL_EP_DISPATCH_INPUTS_V1_SIZE);

// ncclEpDispatchOutputs_t
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, tokens) == 8);
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, topk_weights) == 16);
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, scales) == 24);
const _: () = assert!(offset_of!(ncclEpDispatchOutputs_t, topk_idx) == 32);
const _: () = assert!(
    offset_of!(ncclEpDispatchOutputs_t, topk_idx) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpDispatchOutputs_t>() == 40);
const _: () = assert!(NCCL_EP_DISPATCH_OUTPUTS_SIZE == NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE);

// ncclEpCombineInputs_t
const _: () = assert!(offset_of!(ncclEpCombineInputs_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpCombineInputs_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpCombineInputs_t, tokens) == 8);
const _: () = assert!(offset_of!(ncclEpCombineInputs_t, topk_weights) == 16);
const _: () = assert!(offset_of!(ncclEpCombineInputs_t, scales) == 24);
const _: () = assert!(
    offset_of!(ncclEpCombineInputs_t, topk_weights) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_COMBINE_INPUTS_V1_SIZE as usize
);
const _: () = assert!(
    offset_of!(ncclEpCombineInputs_t, scales) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_COMBINE_INPUTS_V2_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpCombineInputs_t>() == 32);
const _: () = assert!(NCCL_EP_COMBINE_INPUTS_SIZE == NCCL_EP_COMBINE_INPUTS_V2_SIZE);

// ncclEpCombineOutputs_t
const _: () = assert!(offset_of!(ncclEpCombineOutputs_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpCombineOutputs_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpCombineOutputs_t, tokens) == 8);
const _: () = assert!(offset_of!(ncclEpCombineOutputs_t, topk_weights) == 16);
const _: () = assert!(
    offset_of!(ncclEpCombineOutputs_t, topk_weights) + size_of::<*mut ncclEpTensor_t>()
        == NCCL_EP_COMBINE_OUTPUTS_V1_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpCombineOutputs_t>() == 24);
const _: () = assert!(NCCL_EP_COMBINE_OUTPUTS_SIZE == NCCL_EP_COMBINE_OUTPUTS_V1_SIZE);

// ncclEpHandleConfig_t
const _: () = assert!(offset_of!(ncclEpHandleConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpHandleConfig_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpHandleConfig_t, dispatch_output_per_expert_alignment) == 8);
const _: () = assert!(
    offset_of!(ncclEpHandleConfig_t, dispatch_output_per_expert_alignment) + size_of::<usize>()
        == NCCL_EP_HANDLE_CONFIG_V1_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpHandleConfig_t>() == 16);
const _: () = assert!(NCCL_EP_HANDLE_CONFIG_SIZE == NCCL_EP_HANDLE_CONFIG_V1_SIZE);

// ncclEpDispatchConfig_t
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, send_only) == 8);
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, round_scales) == 12);
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, pass_direction) == 16);
const _: () = assert!(offset_of!(ncclEpDispatchConfig_t, quant_recipe) == 20);
const _: () = assert!(
    offset_of!(ncclEpDispatchConfig_t, pass_direction) + size_of::<ncclEpPassDir_t>()
        == NCCL_EP_DISPATCH_CONFIG_V1_SIZE as usize
);
const _: () = assert!(
    offset_of!(ncclEpDispatchConfig_t, quant_recipe) + size_of::<ncclEpDispQuant_t>()
        == NCCL_EP_DISPATCH_CONFIG_V2_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpDispatchConfig_t>() == 24);
const _: () = assert!(NCCL_EP_DISPATCH_CONFIG_SIZE == NCCL_EP_DISPATCH_CONFIG_V2_SIZE);

// ncclEpCombineConfig_t
const _: () = assert!(offset_of!(ncclEpCombineConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpCombineConfig_t, magic) == 4);
const _: () = assert!(offset_of!(ncclEpCombineConfig_t, send_only) == 8);
const _: () = assert!(offset_of!(ncclEpCombineConfig_t, pass_direction) == 12);
const _: () = assert!(offset_of!(ncclEpCombineConfig_t, quant_recipe) == 16);
const _: () = assert!(
    offset_of!(ncclEpCombineConfig_t, pass_direction) + size_of::<ncclEpPassDir_t>()
        == NCCL_EP_COMBINE_CONFIG_V1_SIZE as usize
);
const _: () = assert!(
    offset_of!(ncclEpCombineConfig_t, quant_recipe) + size_of::<ncclEpCombQuant_t>()
        == NCCL_EP_COMBINE_CONFIG_V2_SIZE as usize
);
const _: () = assert!(size_of::<ncclEpCombineConfig_t>() == 20);
const _: () = assert!(NCCL_EP_COMBINE_CONFIG_SIZE == NCCL_EP_COMBINE_CONFIG_V2_SIZE);

// ncclEpCompleteConfig_t
const _: () = assert!(offset_of!(ncclEpCompleteConfig_t, size) == 0);
const _: () = assert!(offset_of!(ncclEpCompleteConfig_t, magic) == 4);
const _: () =
    assert!(offset_of!(ncclEpCompleteConfig_t, magic) + size_of::<u32>() == NCCL_EP_COMPLETE_CONFIG_V1_SIZE as usize);
const _: () = assert!(size_of::<ncclEpCompleteConfig_t>() == 8);
const _: () = assert!(NCCL_EP_COMPLETE_CONFIG_SIZE == NCCL_EP_COMPLETE_CONFIG_V1_SIZE);

// moeEpUniqueId
const _: () = assert!(offset_of!(moeEpUniqueId, internal) == 0);
const _: () = assert!(size_of::<moeEpUniqueId>() == MOE_EP_UNIQUE_ID_BYTES);

// Constants that C code compares against.
const _: () = assert!(NCCL_EP_VERSION_CODE == 100);
const _: () = assert!(NCCL_EP_GROUP_CONFIG_INIT.version == NCCL_EP_API_VERSION);
const _: () = assert!(NCCL_EP_TENSOR_INIT.size == 48 && NCCL_EP_TENSOR_INIT.magic == 0xCAFE_CAFE);
