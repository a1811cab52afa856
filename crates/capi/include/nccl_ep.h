// SPDX-License-Identifier: MIT OR Apache-2.0
// moe-ep: NCCL EP API v2 compatible header.
//
// C interface to moe-ep, source- and ABI-compatible with NCCL EP's public
// API (NCCL_EP_API_VERSION 2), followed by a few moe-ep extensions.
//
// NCCL and CUDA types: when <nccl.h> is on the include path it is used
// (with <cuda.h> and <cuda_runtime.h>). Otherwise, or when MOE_EP_NO_NCCL_H
// is defined, small ABI-identical stand-ins are declared instead. Each
// stand-in is skipped when the real header was already included, so include
// <nccl.h> / <cuda_runtime.h> before this file if you use both. Define
// MOE_EP_NO_NCCL_H only in code that includes neither of them.

#pragma once
#ifndef NCCL_EP_H_
#define NCCL_EP_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__has_include)
#  if __has_include(<nccl.h>) && !defined(MOE_EP_NO_NCCL_H)
#    define MOE_EP_HAVE_NCCL_H 1
#  endif
#endif

#ifdef MOE_EP_HAVE_NCCL_H
#  include <cuda.h>
#  include <cuda_runtime.h>
#  include <nccl.h>
#else
/* Minimal, ABI-identical stand-ins for the NCCL / CUDA runtime types used
 * here. Values and struct tags match NCCL 2.30 and the CUDA runtime. */
#  ifndef NCCL_H_
typedef enum {
    ncclSuccess            = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError        = 2,
    ncclInternalError      = 3,
    ncclInvalidArgument    = 4,
    ncclInvalidUsage       = 5,
    ncclRemoteError        = 6,
    ncclInProgress         = 7,
    ncclTimeout            = 8,
    ncclNumResults         = 9
} ncclResult_t;

typedef enum {
    ncclInt8       = 0, ncclChar   = 0,
    ncclUint8      = 1,
    ncclInt32      = 2, ncclInt    = 2,
    ncclUint32     = 3,
    ncclInt64      = 4,
    ncclUint64     = 5,
    ncclFloat16    = 6, ncclHalf   = 6,
    ncclFloat32    = 7, ncclFloat  = 7,
    ncclFloat64    = 8, ncclDouble = 8,
    ncclBfloat16   = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes   = 12
} ncclDataType_t;

typedef struct ncclComm* ncclComm_t;
typedef struct ncclWindow_vidmem* ncclWindow_t;
#  endif /* NCCL_H_ */

#  if !defined(__DRIVER_TYPES_H__) && !defined(__CUDA_RUNTIME_API_H__)
typedef struct CUstream_st* cudaStream_t;
/* Only the two codes an allocator callback needs; the values are CUDA's. */
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorMemoryAllocation = 2
} cudaError_t;
#  endif
#endif /* MOE_EP_HAVE_NCCL_H */

#include "nccl_ep/ep_enums.h"

/* Packed 4-bit float pair (two FP4 values per byte). NCCL reserves data type
 * value 12 for it; defined here when the NCCL headers in use do not. EP only
 * moves such tensors as bytes. */
#ifndef ncclFloat4x2
#define ncclFloat4x2 ((ncclDataType_t)12)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ========================================================================
 * Versions
 * ======================================================================== */

/* Release version of this API surface. */
#define NCCL_EP_MAJOR 0
#define NCCL_EP_MINOR 1
#define NCCL_EP_PATCH 0

/* MAJOR * 10000 + MINOR * 100 + PATCH. */
#define NCCL_EP_VERSION_CODE (NCCL_EP_MAJOR * 10000 + NCCL_EP_MINOR * 100 + NCCL_EP_PATCH)

/* Struct versioning.
 *
 * Each public struct begins with `unsigned int size; unsigned int magic;`
 * (ncclEpGroupConfig_t adds `unsigned int version`). Structs only ever grow
 * at the end. The library accepts any size at least the V1 size, reads only
 * the fields that fit in `size`, and ignores bytes past what it knows. The
 * NCCL_EP_<NAME>_Vn_SIZE constants freeze the size of each released
 * version; padding_vN members fill tail padding so it stays unused.
 *
 * Always start from the matching NCCL_EP_<NAME>_INIT compound literal (it
 * sets size and magic and zeroes the rest), then assign fields:
 *
 *     ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
 *     in.tokens = &tokens;
 */
#define NCCL_EP_API_VERSION 2
#define NCCL_EP_MAGIC 0xC00FFFEEu

/* Compound literal of type_ with size and magic set, other fields zero. */
#define NCCL_EP_STRUCT_INIT(type_, magic_) \
    ((type_){ \
        .size = (unsigned int)sizeof(type_), \
        .magic = (magic_) \
    })

/* Byte offset just past field_ in type_. */
#define NCCL_EP_FIELD_END(type_, field_) \
    ((unsigned int)(offsetof(type_, field_) + sizeof(((type_*)0)->field_)))

/* True when ptr_ is non-NULL and its size covers field_. */
#define NCCL_EP_HAS_FIELD(ptr_, type_, field_) \
    ((ptr_) != NULL && (ptr_)->size >= NCCL_EP_FIELD_END(type_, field_))

#if defined(__cplusplus)
#define NCCL_EP_STATIC_ASSERT(cond_, msg_) static_assert((cond_), msg_)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define NCCL_EP_STATIC_ASSERT(cond_, msg_) _Static_assert((cond_), msg_)
#else
#define NCCL_EP_STATIC_ASSERT(cond_, msg_)
#endif

/* Compile-time layout checks used after every versioned struct. */
#define NCCL_EP_STATIC_ASSERT_STRUCT_ABI_IMPL_(type_, base_, current_version_) \
    NCCL_EP_STATIC_ASSERT( \
        (current_version_) <= NCCL_EP_API_VERSION, \
        #base_ "_CURRENT_VERSION is newer than NCCL_EP_API_VERSION (needs " #current_version_ ")"); \
    NCCL_EP_STATIC_ASSERT( \
        offsetof(type_, size) == 0, \
        #type_ ": size must be at offset 0"); \
    NCCL_EP_STATIC_ASSERT( \
        offsetof(type_, magic) == NCCL_EP_FIELD_END(type_, size), \
        #type_ ": magic must come right after size"); \
    NCCL_EP_STATIC_ASSERT( \
        sizeof(type_) == base_ ## _V ## current_version_ ## _SIZE, \
        #type_ ": sizeof differs from its current versioned size")

#define NCCL_EP_STATIC_ASSERT_STRUCT_ABI_EXPAND_(type_, base_, current_version_) \
    NCCL_EP_STATIC_ASSERT_STRUCT_ABI_IMPL_(type_, base_, current_version_)

#define NCCL_EP_STATIC_ASSERT_STRUCT_ABI(type_, base_) \
    NCCL_EP_STATIC_ASSERT_STRUCT_ABI_EXPAND_( \
        type_, base_, base_ ## _CURRENT_VERSION)

#define NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(type_, base_, version_) \
    NCCL_EP_STATIC_ASSERT( \
        (version_) <= NCCL_EP_API_VERSION, \
        #type_ ": V" #version_ " is newer than NCCL_EP_API_VERSION"); \
    NCCL_EP_STATIC_ASSERT( \
        (version_) <= base_ ## _CURRENT_VERSION, \
        #type_ ": V" #version_ " is newer than " #base_ "_CURRENT_VERSION"); \
    NCCL_EP_STATIC_ASSERT( \
        NCCL_EP_FIELD_END( \
            type_, \
            base_ ## _V ## version_ ## _LAST_FIELD) == \
            base_ ## _V ## version_ ## _SIZE, \
        #type_ ": frozen V" #version_ " size changed")

/*
 * Report the version of the linked library.
 *
 * Notes: local, host only; enqueues no GPU work.
 *
 * Arguments:
 *   version - [OUT] Receives the library's NCCL_EP_VERSION_CODE.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpGetVersion(int* version);

/* ========================================================================
 * Tensor descriptors
 * ======================================================================== */

/* Descriptor of an N-dimensional device tensor. It owns nothing: the data
 * (or window) and the `sizes` array belong to the caller and must stay valid
 * for as long as a call may read the descriptor. Declare it anywhere
 * (stack, struct, static) starting from NCCL_EP_TENSOR_INIT, or obtain a
 * heap one from ncclEpTensorAlloc. Exactly one of data / win_hdl is used. */
#define NCCL_EP_TENSOR_MAGIC 0xCAFECAFE
typedef struct ncclEpTensor {
    unsigned int size;        /* sizeof(ncclEpTensor_t); set by the INIT macro */
    unsigned int magic;       /* NCCL_EP_TENSOR_MAGIC, or a library value for
                                 ncclEpTensorAlloc results; 0 is rejected */
    unsigned int ndim;        /* number of dimensions */
    ncclDataType_t datatype;  /* element type */
    void* data;               /* device address, or NULL when window-backed */
    ncclWindow_t win_hdl;     /* NCCL window, or NULL for a plain pointer */
    uint64_t win_offset;      /* byte offset of the tensor inside win_hdl */
    size_t* sizes;            /* ndim extents, outermost first */
} ncclEpTensor_t;

/* Designators for size and magic, for use inside a braced initialiser:
 *     ncclEpTensor_t t = { NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, ... }; */
#define NCCL_EP_TENSOR_INIT_INLINE .size = (unsigned int)sizeof(ncclEpTensor_t), .magic = NCCL_EP_TENSOR_MAGIC
#define NCCL_EP_TENSOR_INIT ((ncclEpTensor_t){NCCL_EP_TENSOR_INIT_INLINE})

#define NCCL_EP_TENSOR_SIZE ((unsigned int)sizeof(ncclEpTensor_t))

#define NCCL_EP_TENSOR_V1_LAST_FIELD sizes
#define NCCL_EP_TENSOR_V1_SIZE 48u

#define NCCL_EP_TENSOR_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpTensor_t, NCCL_EP_TENSOR);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpTensor_t, NCCL_EP_TENSOR, 1);

/* Options for ncclEpTensorAlloc; none defined yet. Pass NULL or
 * NCCL_EP_TENSOR_ALLOC_CONFIG_INIT. */
typedef struct {
    unsigned int size;   /* sizeof this struct */
    unsigned int magic;  /* NCCL_EP_MAGIC */
} ncclEpTensorAllocConfig_t;

#define NCCL_EP_TENSOR_ALLOC_CONFIG_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpTensorAllocConfig_t, NCCL_EP_MAGIC)

#define NCCL_EP_TENSOR_ALLOC_CONFIG_SIZE ((unsigned int)sizeof(ncclEpTensorAllocConfig_t))

#define NCCL_EP_TENSOR_ALLOC_CONFIG_V1_LAST_FIELD magic
#define NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE 8u

#define NCCL_EP_TENSOR_ALLOC_CONFIG_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpTensorAllocConfig_t, NCCL_EP_TENSOR_ALLOC_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpTensorAllocConfig_t, NCCL_EP_TENSOR_ALLOC_CONFIG, 1);

/*
 * Create a heap tensor descriptor with its own copy of the shape.
 *
 * Notes: local, host only; enqueues no GPU work. Only the descriptor is
 * allocated: data starts NULL and the caller supplies the device buffer or
 * window. Release with ncclEpTensorDestroy.
 *
 * Arguments:
 *   tensor   - [OUT] Receives the new descriptor.
 *   ndim     - [IN]  Number of dimensions, at least 1.
 *   datatype - [IN]  Element type.
 *   sizes    - [IN]  ndim extents; copied, so it may be freed afterwards.
 *   config   - [IN]  Options, or NULL for defaults.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpTensorAlloc(
    ncclEpTensor_t** tensor,
    unsigned int ndim,
    ncclDataType_t datatype,
    const size_t* sizes,
    const ncclEpTensorAllocConfig_t* config);

/*
 * Free a descriptor made by ncclEpTensorAlloc.
 *
 * Notes: local, host only. The data buffer / window it refers to is not
 * freed.
 *
 * Arguments:
 *   tensor - [IN] Descriptor from ncclEpTensorAlloc; NULL is a no-op.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpTensorDestroy(ncclEpTensor_t* tensor);

/* ========================================================================
 * Groups
 * ======================================================================== */

/* Device memory callbacks. context is ncclEpAllocConfig_t::context, passed
 * through untouched. Return cudaSuccess or a CUDA error code. */
typedef cudaError_t (*ncclEpAllocFn_t)(void** ptr, size_t size, void* context);
typedef cudaError_t (*ncclEpFreeFn_t)(void* ptr, void* context);

/* Custom allocator for the group's device memory (all NULL = library
 * default). */
typedef struct {
    ncclEpAllocFn_t alloc_fn;  /* allocate, or NULL for the default */
    ncclEpFreeFn_t free_fn;    /* free, or NULL for the default */
    void* context;             /* handed to both callbacks */
} ncclEpAllocConfig_t;

/* Parameters of an EP group. Start from NCCL_EP_GROUP_CONFIG_INIT. */
typedef struct {
    unsigned int size;        /* sizeof this struct */
    unsigned int magic;       /* NCCL_EP_MAGIC */
    unsigned int version;     /* NCCL_EP_API_VERSION the caller was built with */
    ncclEpAlgorithm_t algorithm;
    unsigned int num_experts; /* total experts over all ranks (required) */
    /* Upper bound on tokens one rank sends per dispatch; same on all ranks;
     * required (> 0). */
    unsigned int max_dispatch_tokens_per_rank;
    /* Upper bound on tokens one rank receives (HT). An explicit value must be
     * >= max_dispatch_tokens_per_rank and, for EXPERT_MAJOR, count a token
     * once per local expert it goes to. NCCL_EP_AUTO: receive buffers are
     * sized per step from recv_total_counter (no DROP policy, no graph
     * capture of dispatch). LL: pass NCCL_EP_AUTO. */
    unsigned int max_recv_tokens_per_rank;
    /* Upper bound on bytes per token row (tokens plus any scales), for
     * dispatch and combine. HT: multiple of 16. */
    unsigned int max_token_bytes;
    /* LL communication buffer bytes. NCCL_EP_AUTO: sized (and possibly
     * regrown) by ncclEpInitHandle. > 0: allocated once by
     * ncclEpCreateGroup; a handle that does not fit fails. */
    unsigned long int rdma_buffer_size;
    unsigned int num_qp_per_rank;  /* queue pairs per peer, or NCCL_EP_AUTO */
    unsigned int num_channels;     /* channels per rank, or NCCL_EP_AUTO */
    unsigned int max_num_sms;      /* SM budget for EP kernels, or NCCL_EP_AUTO */
    ncclEpAllocConfig_t alloc;     /* device allocator; zero = default */
    /* Non-zero enables the per-rank active mask (LL): a peer that times out
     * is masked instead of trapping, and the async error flag is raised.
     * See ncclEpMask* and ncclEpGetAsyncError. */
    unsigned int enable_mask;
    /* Device wait timeout in ns; 0 = library default. */
    uint64_t timeout_ns;
    /* --- V2 --- */
    ncclEpZeroCopyMode_t zero_copy;          /* staging policy */
    ncclEpOverflowPolicy_t overflow_policy;  /* HT receive overflow policy */
    /* Upper bound on top-k over all handles; 0 = unset. Needed for HT with
     * max_recv_tokens_per_rank = AUTO and EXPERT_MAJOR. */
    unsigned int num_topk;
    unsigned char padding_v2[4];             /* reserved, keep zero */
} ncclEpGroupConfig_t;

#define NCCL_EP_GROUP_CONFIG_INIT \
    ((ncclEpGroupConfig_t){ \
        .size = (unsigned int)sizeof(ncclEpGroupConfig_t), \
        .magic = NCCL_EP_MAGIC, \
        .version = NCCL_EP_API_VERSION \
    })

#define NCCL_EP_GROUP_CONFIG_SIZE ((unsigned int)sizeof(ncclEpGroupConfig_t))

#define NCCL_EP_GROUP_CONFIG_V1_LAST_FIELD timeout_ns
#define NCCL_EP_GROUP_CONFIG_V1_SIZE 96u
#define NCCL_EP_GROUP_CONFIG_V2_LAST_FIELD padding_v2
#define NCCL_EP_GROUP_CONFIG_V2_SIZE 112u

#define NCCL_EP_GROUP_CONFIG_CURRENT_VERSION 2

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpGroupConfig_t, NCCL_EP_GROUP_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpGroupConfig_t, NCCL_EP_GROUP_CONFIG, 1);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpGroupConfig_t, NCCL_EP_GROUP_CONFIG, 2);

/* Opaque EP group. */
typedef struct ncclEpGroup* ncclEpGroup_t;

/*
 * Create an EP group on top of an NCCL communicator.
 *
 * Notes: collective over every rank of comm. Host call that allocates and
 * exchanges buffers; do not call during graph capture.
 *
 * Arguments:
 *   ep_group - [OUT] Receives the new group.
 *   comm     - [IN]  NCCL communicator spanning the EP ranks.
 *   config   - [IN]  Group parameters (from NCCL_EP_GROUP_CONFIG_INIT).
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpCreateGroup(ncclEpGroup_t* ep_group, ncclComm_t comm, const ncclEpGroupConfig_t* config);

/*
 * Destroy an EP group and free its resources.
 *
 * Notes: host call; do not call during graph capture. All work and handles
 * using the group must be finished / destroyed first.
 *
 * Arguments:
 *   ep_group - [IN] Group to destroy.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpGroupDestroy(ncclEpGroup_t ep_group);

/* ========================================================================
 * Dispatch / combine argument structs
 * ======================================================================== */

/* Optional counter tensors filled by ncclEpCreateHandle / ncclEpUpdateHandle
 * (HT) or ncclEpDispatch (LL). Any pointer may be NULL. */
typedef struct {
    unsigned int size;   /* sizeof this struct */
    unsigned int magic;  /* NCCL_EP_MAGIC */
    /* [num_local_experts] received tokens per local expert. HT FLAT: int32,
     * unpadded; HT EXPERT_MAJOR: int32/int64, padded; LL EXPERT_MAJOR: int32,
     * written by dispatch. */
    ncclEpTensor_t* expert_counters;
    /* [num_ranks] int32 tokens received from each rank (LL RANK_MAJOR,
     * written by dispatch). */
    ncclEpTensor_t* src_rank_counters;
    /* [num_local_experts] int32/int64 start slot of each expert (HT
     * EXPERT_MAJOR; exclusive prefix sum of padded counts). */
    ncclEpTensor_t* expert_offsets;
    /* [1] int32/int64 total received slots (HT; padded for EXPERT_MAJOR). */
    ncclEpTensor_t* recv_total_counter;
    /* --- V2 --- */
    ncclEpExpertIdKind_t recv_topk_idx_kind;  /* numbering of dispatch topk_idx */
    unsigned char padding_v2[4];              /* reserved, keep zero */
} ncclEpLayoutInfo_t;

#define NCCL_EP_LAYOUT_INFO_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpLayoutInfo_t, NCCL_EP_MAGIC)

#define NCCL_EP_LAYOUT_INFO_SIZE ((unsigned int)sizeof(ncclEpLayoutInfo_t))

#define NCCL_EP_LAYOUT_INFO_V1_LAST_FIELD recv_total_counter
#define NCCL_EP_LAYOUT_INFO_V1_SIZE 40u
#define NCCL_EP_LAYOUT_INFO_V2_LAST_FIELD padding_v2
#define NCCL_EP_LAYOUT_INFO_V2_SIZE 48u

#define NCCL_EP_LAYOUT_INFO_CURRENT_VERSION 2

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpLayoutInfo_t, NCCL_EP_LAYOUT_INFO);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpLayoutInfo_t, NCCL_EP_LAYOUT_INFO, 1);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpLayoutInfo_t, NCCL_EP_LAYOUT_INFO, 2);

/* Tensors read by ncclEpDispatch. Only tokens is always required. */
typedef struct {
    unsigned int size;            /* sizeof this struct */
    unsigned int magic;           /* NCCL_EP_MAGIC */
    ncclEpTensor_t* tokens;       /* [num_tokens, hidden] */
    ncclEpTensor_t* topk_weights; /* [num_tokens, num_topk] float32; LL
                                     RANK_MAJOR and HT forward */
    ncclEpTensor_t* scales;       /* per-token scales, NCCL_EP_DISP_QUANT_FWD */
} ncclEpDispatchInputs_t;

#define NCCL_EP_DISPATCH_INPUTS_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpDispatchInputs_t, NCCL_EP_MAGIC)

#define NCCL_EP_DISPATCH_INPUTS_SIZE ((unsigned int)sizeof(ncclEpDispatchInputs_t))

#define NCCL_EP_DISPATCH_INPUTS_V1_LAST_FIELD scales
#define NCCL_EP_DISPATCH_INPUTS_V1_SIZE 32u

#define NCCL_EP_DISPATCH_INPUTS_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpDispatchInputs_t, NCCL_EP_DISPATCH_INPUTS);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpDispatchInputs_t, NCCL_EP_DISPATCH_INPUTS, 1);

/* Preallocated tensors written by ncclEpDispatch; shapes follow the layout
 * (see ncclEpLayout_t). Only tokens is always required. */
typedef struct {
    unsigned int size;            /* sizeof this struct */
    unsigned int magic;           /* NCCL_EP_MAGIC */
    ncclEpTensor_t* tokens;       /* received tokens */
    ncclEpTensor_t* topk_weights; /* received weights (LL RANK_MAJOR, HT) */
    ncclEpTensor_t* scales;       /* received scales, for quantized recipes */
    ncclEpTensor_t* topk_idx;     /* received expert ids (LL RANK_MAJOR,
                                     HT FLAT); -1 = not for this rank */
} ncclEpDispatchOutputs_t;

#define NCCL_EP_DISPATCH_OUTPUTS_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpDispatchOutputs_t, NCCL_EP_MAGIC)

#define NCCL_EP_DISPATCH_OUTPUTS_SIZE ((unsigned int)sizeof(ncclEpDispatchOutputs_t))

#define NCCL_EP_DISPATCH_OUTPUTS_V1_LAST_FIELD topk_idx
#define NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE 40u

#define NCCL_EP_DISPATCH_OUTPUTS_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpDispatchOutputs_t, NCCL_EP_DISPATCH_OUTPUTS);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpDispatchOutputs_t, NCCL_EP_DISPATCH_OUTPUTS, 1);

/* Tensors read by ncclEpCombine; same shapes as the matching dispatch
 * outputs. Only tokens is always required. */
typedef struct {
    unsigned int size;            /* sizeof this struct */
    unsigned int magic;           /* NCCL_EP_MAGIC */
    ncclEpTensor_t* tokens;       /* expert outputs */
    ncclEpTensor_t* topk_weights; /* [num_recv, num_topk] float32; HT backward */
    /* --- V2 --- */
    ncclEpTensor_t* scales;       /* float32 per-row scales for
                                     NCCL_EP_COMB_QUANT_NVFP4 */
} ncclEpCombineInputs_t;

#define NCCL_EP_COMBINE_INPUTS_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpCombineInputs_t, NCCL_EP_MAGIC)

#define NCCL_EP_COMBINE_INPUTS_SIZE ((unsigned int)sizeof(ncclEpCombineInputs_t))

#define NCCL_EP_COMBINE_INPUTS_V1_LAST_FIELD topk_weights
#define NCCL_EP_COMBINE_INPUTS_V1_SIZE 24u
#define NCCL_EP_COMBINE_INPUTS_V2_LAST_FIELD scales
#define NCCL_EP_COMBINE_INPUTS_V2_SIZE 32u

#define NCCL_EP_COMBINE_INPUTS_CURRENT_VERSION 2

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpCombineInputs_t, NCCL_EP_COMBINE_INPUTS);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCombineInputs_t, NCCL_EP_COMBINE_INPUTS, 1);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCombineInputs_t, NCCL_EP_COMBINE_INPUTS, 2);

/* Preallocated tensors written by ncclEpCombine. Only tokens is always
 * required. */
typedef struct {
    unsigned int size;            /* sizeof this struct */
    unsigned int magic;           /* NCCL_EP_MAGIC */
    ncclEpTensor_t* tokens;       /* [num_tokens, hidden], original order */
    ncclEpTensor_t* topk_weights; /* [num_tokens, num_topk] float32; LL
                                     EXPERT_MAJOR weights, HT backward result */
} ncclEpCombineOutputs_t;

#define NCCL_EP_COMBINE_OUTPUTS_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpCombineOutputs_t, NCCL_EP_MAGIC)

#define NCCL_EP_COMBINE_OUTPUTS_SIZE ((unsigned int)sizeof(ncclEpCombineOutputs_t))

#define NCCL_EP_COMBINE_OUTPUTS_V1_LAST_FIELD topk_weights
#define NCCL_EP_COMBINE_OUTPUTS_V1_SIZE 24u

#define NCCL_EP_COMBINE_OUTPUTS_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpCombineOutputs_t, NCCL_EP_COMBINE_OUTPUTS);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCombineOutputs_t, NCCL_EP_COMBINE_OUTPUTS, 1);

/* ========================================================================
 * Handles
 * ======================================================================== */

/* Opaque routing handle: one layout, reused for dispatch/combine pairs. */
typedef struct ncclEpHandle* ncclEpHandle_t;

/* Per-handle options. NULL means defaults. */
typedef struct {
    unsigned int size;   /* sizeof this struct */
    unsigned int magic;  /* NCCL_EP_MAGIC */
    /* HT EXPERT_MAJOR: each expert's run of output slots starts at a
     * multiple of this (power of two; 0 or 1 = none). Pad slots are
     * zero-filled. */
    size_t dispatch_output_per_expert_alignment;
} ncclEpHandleConfig_t;

#define NCCL_EP_HANDLE_CONFIG_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpHandleConfig_t, NCCL_EP_MAGIC)

#define NCCL_EP_HANDLE_CONFIG_SIZE ((unsigned int)sizeof(ncclEpHandleConfig_t))

#define NCCL_EP_HANDLE_CONFIG_V1_LAST_FIELD dispatch_output_per_expert_alignment
#define NCCL_EP_HANDLE_CONFIG_V1_SIZE 16u

#define NCCL_EP_HANDLE_CONFIG_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpHandleConfig_t, NCCL_EP_HANDLE_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpHandleConfig_t, NCCL_EP_HANDLE_CONFIG, 1);

/*
 * Compute the device bytes a handle needs for its routing state, for use
 * as handle_mem in ncclEpInitHandle.
 *
 * Notes: local, host only; enqueues no GPU work.
 *
 * Arguments:
 *   ep_group - [IN]  Group the handle will belong to.
 *   layout   - [IN]  Output layout; not NCCL_EP_LAYOUT_UNSET.
 *   config   - [IN]  Handle options, or NULL for defaults.
 *   size_out - [OUT] Receives the byte count.
 *   num_topk - [IN]  Experts per token; required (> 0) for LL, optional
 *                    for HT.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpHandleMemSize(
    ncclEpGroup_t ep_group,
    ncclEpLayout_t layout,
    const ncclEpHandleConfig_t* config,
    size_t* size_out,
    int num_topk);

/*
 * Create a handle without routing it yet; call ncclEpUpdateHandle before
 * the first dispatch.
 *
 * Notes: local when the group has an explicit rdma_buffer_size. With
 * rdma_buffer_size = NCCL_EP_AUTO it may grow the group's buffer, so it is
 * then collective: every rank calls it in the same order with the same
 * (layout, num_topk), with no EP operation in flight. Never call it during
 * graph capture; graphs captured before a regrow must be recaptured.
 *
 * Arguments:
 *   handle     - [OUT] Receives the new handle.
 *   ep_group   - [IN]  Owning group.
 *   layout     - [IN]  Output layout; not NCCL_EP_LAYOUT_UNSET.
 *   config     - [IN]  Handle options, or NULL for defaults.
 *   num_topk   - [IN]  Experts per token; > 0 for LL, -1 for HT.
 *   handle_mem - [IN]  NULL: the library allocates the routing state and
 *                      frees it with the handle. Otherwise a caller-owned
 *                      1D ncclUint8 device tensor of at least
 *                      ncclEpHandleMemSize bytes that outlives the handle.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpInitHandle(
    ncclEpHandle_t* handle,
    ncclEpGroup_t ep_group,
    ncclEpLayout_t layout,
    const ncclEpHandleConfig_t* config,
    int num_topk,
    const ncclEpTensor_t* handle_mem);

/*
 * Load this step's routing (top-k expert choice per token) into a handle.
 *
 * Notes: collective, every rank once per step, before ncclEpDispatch.
 * Enqueued on stream; may be captured in a CUDA graph.
 *
 * Arguments:
 *   handle      - [IN]     Handle from ncclEpInitHandle / ncclEpCreateHandle.
 *   topk_idx    - [IN]     [num_tokens, num_topk] ncclInt32 or ncclInt64
 *                          global expert ids.
 *   layout_info - [IN,OUT] Counters to fill (see ncclEpLayoutInfo_t), or
 *                          NULL. Must be NULL for LL.
 *   stream      - [IN]     CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpUpdateHandle(
    ncclEpHandle_t handle,
    const ncclEpTensor_t* topk_idx,
    const ncclEpLayoutInfo_t* layout_info,
    cudaStream_t stream);

/*
 * ncclEpInitHandle followed by ncclEpUpdateHandle, in one call.
 *
 * Notes: collective (every rank). Enqueued on stream. The same capture and
 * ordering rules as ncclEpInitHandle apply.
 *
 * Arguments:
 *   handle      - [OUT]    Receives the new, routed handle.
 *   ep_group    - [IN]     Owning group.
 *   layout      - [IN]     Output layout; not NCCL_EP_LAYOUT_UNSET.
 *   topk_idx    - [IN]     [num_tokens, num_topk] ncclInt32 or ncclInt64
 *                          global expert ids.
 *   layout_info - [IN,OUT] Counters to fill, or NULL. Must be NULL for LL.
 *   config      - [IN]     Handle options, or NULL for defaults.
 *   stream      - [IN]     CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpCreateHandle(
    ncclEpHandle_t* handle,
    ncclEpGroup_t ep_group,
    ncclEpLayout_t layout,
    const ncclEpTensor_t* topk_idx,
    const ncclEpLayoutInfo_t* layout_info,
    const ncclEpHandleConfig_t* config,
    cudaStream_t stream);

/*
 * Destroy a handle and free what it owns.
 *
 * Notes: host call; work using the handle must be finished. A caller-owned
 * handle_mem is not freed.
 *
 * Arguments:
 *   handle - [IN] Handle to destroy.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpHandleDestroy(ncclEpHandle_t handle);

/* ========================================================================
 * Dispatch and combine
 * ======================================================================== */

/* Quantization recipe for dispatch.
 *   NONE: tokens travel in their own type; no scales tensors.
 *   QUANT_FWD: tokens (float32/16, bf16, fp8 or ncclFloat4x2) and 2D scales
 *     (float types or ncclUint8 bytes) are both moved bit-for-bit; outputs use
 *     the same types and row widths; rows and bases 16-byte aligned;
 *     round_scales must be 0. For ncclFloat4x2, sizes[1] is hidden / 2.
 *   DS_FP8E3M4: LL only; bf16 tokens are quantized to 8-bit floats with one
 *     float32 scale per 128 elements, returned in outputs->scales (hidden a
 *     multiple of 512; inputs->scales must be NULL). */
typedef enum {
    NCCL_EP_DISP_QUANT_NONE = 0,
    NCCL_EP_DISP_QUANT_FWD = 1,
    NCCL_EP_DISP_QUANT_DS_FP8E3M4 = 2,
} ncclEpDispQuant_t;

/* Quantization recipe for combine.
 *   NONE: expert outputs travel in their own type.
 *   NVFP4: experimental, LL only; bf16 expert outputs travel as packed FP4
 *     using the float32 scales in inputs->scales. */
typedef enum {
    NCCL_EP_COMB_QUANT_NONE = 0,
    NCCL_EP_COMB_QUANT_NVFP4 = 1,
} ncclEpCombQuant_t;

/* Per-call dispatch options. NULL means defaults. */
typedef struct {
    unsigned int size;               /* sizeof this struct */
    unsigned int magic;              /* NCCL_EP_MAGIC */
    unsigned int send_only;          /* non-zero: start sends only, finish with
                                        ncclEpComplete (LL) */
    unsigned int round_scales;       /* non-zero: round scales to powers of 2 */
    ncclEpPassDir_t pass_direction;  /* FWD or BWD (HT) */
    /* --- V2 --- */
    ncclEpDispQuant_t quant_recipe;  /* quantization; NONE by default */
} ncclEpDispatchConfig_t;

#define NCCL_EP_DISPATCH_CONFIG_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpDispatchConfig_t, NCCL_EP_MAGIC)

#define NCCL_EP_DISPATCH_CONFIG_SIZE ((unsigned int)sizeof(ncclEpDispatchConfig_t))

#define NCCL_EP_DISPATCH_CONFIG_V1_LAST_FIELD pass_direction
#define NCCL_EP_DISPATCH_CONFIG_V1_SIZE 20u
#define NCCL_EP_DISPATCH_CONFIG_V2_LAST_FIELD quant_recipe
#define NCCL_EP_DISPATCH_CONFIG_V2_SIZE 24u

#define NCCL_EP_DISPATCH_CONFIG_CURRENT_VERSION 2

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpDispatchConfig_t, NCCL_EP_DISPATCH_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpDispatchConfig_t, NCCL_EP_DISPATCH_CONFIG, 1);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpDispatchConfig_t, NCCL_EP_DISPATCH_CONFIG, 2);

/*
 * Send each token to the ranks holding its chosen experts.
 *
 * Notes: collective (every rank). Enqueued on stream; may be captured in a
 * CUDA graph when receive buffers are statically sized (HT: explicit
 * max_recv_tokens_per_rank). If stream differs from the one used to route
 * the handle, the caller orders the two streams.
 *
 * Arguments:
 *   handle      - [IN,OUT] Routed handle.
 *   inputs      - [IN]     Tokens, plus topk_weights (LL RANK_MAJOR, HT
 *                          forward) and scales as the recipe requires.
 *   outputs     - [IN,OUT] Preallocated outputs shaped for the layout (see
 *                          ncclEpLayout_t); HT sizes them by num_recv_slots.
 *   layout_info - [IN,OUT] LL: counters to fill (expert_counters required
 *                          for EXPERT_MAJOR, src_rank_counters optional for
 *                          RANK_MAJOR). HT: NULL.
 *   config      - [IN]     Options, or NULL for defaults.
 *   stream      - [IN]     CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpDispatch(
    ncclEpHandle_t handle,
    const ncclEpDispatchInputs_t* inputs,
    const ncclEpDispatchOutputs_t* outputs,
    const ncclEpLayoutInfo_t* layout_info,
    const ncclEpDispatchConfig_t* config,
    cudaStream_t stream);

/* Per-call combine options. NULL means defaults. */
typedef struct {
    unsigned int size;               /* sizeof this struct */
    unsigned int magic;              /* NCCL_EP_MAGIC */
    unsigned int send_only;          /* non-zero: start sends only, finish with
                                        ncclEpComplete (LL) */
    ncclEpPassDir_t pass_direction;  /* FWD or BWD (HT) */
    /* --- V2 --- */
    ncclEpCombQuant_t quant_recipe;  /* quantization; NONE by default */
} ncclEpCombineConfig_t;

#define NCCL_EP_COMBINE_CONFIG_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpCombineConfig_t, NCCL_EP_MAGIC)

#define NCCL_EP_COMBINE_CONFIG_SIZE ((unsigned int)sizeof(ncclEpCombineConfig_t))

#define NCCL_EP_COMBINE_CONFIG_V1_LAST_FIELD pass_direction
#define NCCL_EP_COMBINE_CONFIG_V1_SIZE 16u
#define NCCL_EP_COMBINE_CONFIG_V2_LAST_FIELD quant_recipe
#define NCCL_EP_COMBINE_CONFIG_V2_SIZE 20u

#define NCCL_EP_COMBINE_CONFIG_CURRENT_VERSION 2

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpCombineConfig_t, NCCL_EP_COMBINE_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCombineConfig_t, NCCL_EP_COMBINE_CONFIG, 1);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCombineConfig_t, NCCL_EP_COMBINE_CONFIG, 2);

/*
 * Return expert outputs to the tokens' home ranks and sum them there, in
 * the original token order.
 *
 * Notes: collective (every rank). Enqueued on stream; may be captured in a
 * CUDA graph. If stream differs from the one used to route the handle, the
 * caller orders the two streams.
 *
 * Arguments:
 *   handle  - [IN,OUT] Handle used by the matching ncclEpDispatch.
 *   inputs  - [IN]     Expert outputs shaped like the dispatch outputs;
 *                      topk_weights required for HT backward.
 *   outputs - [IN,OUT] Preallocated tokens [num_tokens, hidden]; plus
 *                      topk_weights for LL EXPERT_MAJOR or HT backward.
 *   config  - [IN]     Options, or NULL for defaults.
 *   stream  - [IN]     CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpCombine(
    ncclEpHandle_t handle,
    const ncclEpCombineInputs_t* inputs,
    const ncclEpCombineOutputs_t* outputs,
    const ncclEpCombineConfig_t* config,
    cudaStream_t stream);

/* Options for ncclEpComplete; none defined yet. Pass NULL or
 * NCCL_EP_COMPLETE_CONFIG_INIT. */
typedef struct ncclEpCompleteConfig {
    unsigned int size;   /* sizeof this struct */
    unsigned int magic;  /* NCCL_EP_MAGIC */
} ncclEpCompleteConfig_t;

#define NCCL_EP_COMPLETE_CONFIG_INIT \
    NCCL_EP_STRUCT_INIT(ncclEpCompleteConfig_t, NCCL_EP_MAGIC)

#define NCCL_EP_COMPLETE_CONFIG_SIZE ((unsigned int)sizeof(ncclEpCompleteConfig_t))

#define NCCL_EP_COMPLETE_CONFIG_V1_LAST_FIELD magic
#define NCCL_EP_COMPLETE_CONFIG_V1_SIZE 8u

#define NCCL_EP_COMPLETE_CONFIG_CURRENT_VERSION 1

NCCL_EP_STATIC_ASSERT_STRUCT_ABI(ncclEpCompleteConfig_t, NCCL_EP_COMPLETE_CONFIG);
NCCL_EP_STATIC_ASSERT_STRUCT_ABI_BOUNDARY(ncclEpCompleteConfig_t, NCCL_EP_COMPLETE_CONFIG, 1);

/*
 * Finish a dispatch or combine that was started with send_only set.
 *
 * Notes: collective (every rank), LL only. Enqueued on stream; may be
 * captured in a CUDA graph. If stream differs from the one the operation
 * was started on, the caller orders the two streams.
 *
 * Arguments:
 *   handle - [IN,OUT] Handle of the pending operation.
 *   config - [IN]     Options, or NULL for defaults.
 *   stream - [IN]     CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpComplete(ncclEpHandle_t handle, const ncclEpCompleteConfig_t* config, cudaStream_t stream);

/* ========================================================================
 * Fault tolerance (groups created with enable_mask != 0)
 * ======================================================================== */

/*
 * Copy the active mask of every rank into device memory.
 *
 * Notes: local. Enqueued on stream.
 *
 * Arguments:
 *   ep_group    - [IN]  Group with masking enabled.
 *   mask_status - [OUT] Device int[num_ranks]: 1 = active, 0 = masked.
 *   stream      - [IN]  CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpMaskQuery(ncclEpGroup_t ep_group, int* mask_status, cudaStream_t stream);

/*
 * Replace the active mask of every rank.
 *
 * Notes: local. Enqueued on stream.
 *
 * Arguments:
 *   ep_group - [IN] Group with masking enabled.
 *   mask     - [IN] Host int[num_ranks]: 1 = active, 0 = masked.
 *   stream   - [IN] CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpMaskUpdate(ncclEpGroup_t ep_group, const int* mask, cudaStream_t stream);

/*
 * Mark every rank active again and reset the communication buffers, so a
 * late rank of the same communicator can rejoin.
 *
 * Notes: collective over all surviving ranks. Enqueued on stream. Leaves
 * the async error flag set (see ncclEpErrorClear).
 *
 * Arguments:
 *   ep_group - [IN] Group with masking enabled.
 *   stream   - [IN] CUDA stream.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpMaskClean(ncclEpGroup_t ep_group, cudaStream_t stream);

/*
 * Read the group's async error flag (raised when a peer times out and is
 * masked).
 *
 * Notes: local, host only; does not synchronize the GPU.
 *
 * Arguments:
 *   ep_group  - [IN]  Group with masking enabled.
 *   error_out - [OUT] 0 = no error, 1 = a timeout has occurred.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpGetAsyncError(ncclEpGroup_t ep_group, int* error_out);

/*
 * Reset the group's async error flag to 0.
 *
 * Notes: local, host only.
 *
 * Arguments:
 *   ep_group - [IN] Group with masking enabled.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t ncclEpErrorClear(ncclEpGroup_t ep_group);

/* ========================================================================
 * moe-ep extensions (not part of NCCL EP)
 * ======================================================================== */

#define MOE_EP_UNIQUE_ID_BYTES 128

/* Opaque bootstrap id for moeEpCreateGroup. */
typedef struct { char internal[MOE_EP_UNIQUE_ID_BYTES]; } moeEpUniqueId;

/*
 * Make a fresh bootstrap id.
 *
 * Notes: local, host only. Rank 0 calls it and hands the bytes to the
 * other ranks out of band (a file, MPI, ...).
 *
 * Arguments:
 *   id - [OUT] Receives the id.
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t moeEpGetUniqueId(moeEpUniqueId* id);

/*
 * Create an EP group without NCCL; ranks meet through moe-ep's own
 * bootstrap.
 *
 * Notes: collective over ranks 0..nranks-1 sharing id. Host call; do not
 * call during graph capture.
 *
 * Arguments:
 *   ep_group - [OUT] Receives the new group.
 *   id       - [IN]  Id from moeEpGetUniqueId on rank 0.
 *   rank     - [IN]  This rank, in [0, nranks).
 *   nranks   - [IN]  Number of ranks.
 *   device   - [IN]  CUDA device ordinal, or -1 for the default device
 *                    (MOE_EP_DEVICE, else GPU 0, else the CPU emulator).
 *   config   - [IN]  Group parameters (from NCCL_EP_GROUP_CONFIG_INIT).
 *
 * Returns: ncclSuccess, or an error code.
 */
ncclResult_t moeEpCreateGroup(ncclEpGroup_t* ep_group, const moeEpUniqueId* id, int rank, int nranks,
                              int device, const ncclEpGroupConfig_t* config);

/*
 * Message for the last failed call on this thread.
 *
 * Notes: local, host only. "" after a successful call. The string stays
 * valid until this thread's next call into the library.
 *
 * Arguments: none.
 *
 * Returns: a NUL-terminated string, never NULL.
 */
const char* moeEpGetLastError(void);

#ifdef __cplusplus
}
#endif

#endif /* NCCL_EP_H_ */
