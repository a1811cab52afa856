// SPDX-License-Identifier: MIT OR Apache-2.0
// moe-ep: NCCL EP API v2 compatible header.
//
// Layout test for <nccl_ep.h>: struct sizes, field offsets, frozen V1/V2
// boundaries, enum values, magics and the *_INIT macros (LP64). It calls
// nothing in the library, so it needs no linking against it.
//
//   cc -std=c11 -Wall -Wextra -Werror -pedantic -DMOE_EP_NO_NCCL_H
//      -I crates/capi/include crates/capi/tests/c/abi_sizes.c -o abi_sizes
//   ./abi_sizes

#include <nccl_ep.h>

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* ---- compile-time checks ------------------------------------------------ */

#define SA(cond) _Static_assert((cond), #cond)

SA(sizeof(void*) == 8);
SA(sizeof(size_t) == 8);
SA(sizeof(unsigned long int) == 8);

/* NCCL / CUDA types (stand-ins or the real thing). */
SA(sizeof(ncclResult_t) == 4);
SA(sizeof(ncclDataType_t) == 4);
SA(sizeof(cudaError_t) == 4);
SA(sizeof(ncclComm_t) == 8);
SA(sizeof(ncclWindow_t) == 8);
SA(sizeof(cudaStream_t) == 8);

/* Enums are int-sized. */
SA(sizeof(ncclEpAlgorithm_t) == 4);
SA(sizeof(ncclEpOverflowPolicy_t) == 4);
SA(sizeof(ncclEpLayout_t) == 4);
SA(sizeof(ncclEpPassDir_t) == 4);
SA(sizeof(ncclEpZeroCopyMode_t) == 4);
SA(sizeof(ncclEpExpertIdKind_t) == 4);
SA(sizeof(ncclEpDispQuant_t) == 4);
SA(sizeof(ncclEpCombQuant_t) == 4);

/* Struct sizes. */
SA(sizeof(ncclEpTensor_t) == 48);
SA(sizeof(ncclEpTensorAllocConfig_t) == 8);
SA(sizeof(ncclEpAllocConfig_t) == 24);
SA(sizeof(ncclEpGroupConfig_t) == 112);
SA(sizeof(ncclEpLayoutInfo_t) == 48);
SA(sizeof(ncclEpDispatchInputs_t) == 32);
SA(sizeof(ncclEpDispatchOutputs_t) == 40);
SA(sizeof(ncclEpCombineInputs_t) == 32);
SA(sizeof(ncclEpCombineOutputs_t) == 24);
SA(sizeof(ncclEpHandleConfig_t) == 16);
SA(sizeof(ncclEpDispatchConfig_t) == 24);
SA(sizeof(ncclEpCombineConfig_t) == 20);
SA(sizeof(ncclEpCompleteConfig_t) == 8);
SA(sizeof(moeEpUniqueId) == 128);

/* Versioned size constants. */
SA(NCCL_EP_TENSOR_V1_SIZE == 48u);
SA(NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE == 8u);
SA(NCCL_EP_GROUP_CONFIG_V1_SIZE == 96u);
SA(NCCL_EP_GROUP_CONFIG_V2_SIZE == 112u);
SA(NCCL_EP_LAYOUT_INFO_V1_SIZE == 40u);
SA(NCCL_EP_LAYOUT_INFO_V2_SIZE == 48u);
SA(NCCL_EP_DISPATCH_INPUTS_V1_SIZE == 32u);
SA(NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE == 40u);
SA(NCCL_EP_COMBINE_INPUTS_V1_SIZE == 24u);
SA(NCCL_EP_COMBINE_INPUTS_V2_SIZE == 32u);
SA(NCCL_EP_COMBINE_OUTPUTS_V1_SIZE == 24u);
SA(NCCL_EP_HANDLE_CONFIG_V1_SIZE == 16u);
SA(NCCL_EP_DISPATCH_CONFIG_V1_SIZE == 20u);
SA(NCCL_EP_DISPATCH_CONFIG_V2_SIZE == 24u);
SA(NCCL_EP_COMBINE_CONFIG_V1_SIZE == 16u);
SA(NCCL_EP_COMBINE_CONFIG_V2_SIZE == 20u);
SA(NCCL_EP_COMPLETE_CONFIG_V1_SIZE == 8u);

SA(NCCL_EP_TENSOR_CURRENT_VERSION == 1);
SA(NCCL_EP_TENSOR_ALLOC_CONFIG_CURRENT_VERSION == 1);
SA(NCCL_EP_GROUP_CONFIG_CURRENT_VERSION == 2);
SA(NCCL_EP_LAYOUT_INFO_CURRENT_VERSION == 2);
SA(NCCL_EP_DISPATCH_INPUTS_CURRENT_VERSION == 1);
SA(NCCL_EP_DISPATCH_OUTPUTS_CURRENT_VERSION == 1);
SA(NCCL_EP_COMBINE_INPUTS_CURRENT_VERSION == 2);
SA(NCCL_EP_COMBINE_OUTPUTS_CURRENT_VERSION == 1);
SA(NCCL_EP_HANDLE_CONFIG_CURRENT_VERSION == 1);
SA(NCCL_EP_DISPATCH_CONFIG_CURRENT_VERSION == 2);
SA(NCCL_EP_COMBINE_CONFIG_CURRENT_VERSION == 2);
SA(NCCL_EP_COMPLETE_CONFIG_CURRENT_VERSION == 1);

/* Frozen boundaries: end of the last field of each version. */
SA(NCCL_EP_FIELD_END(ncclEpTensor_t, sizes) == 48u);
SA(NCCL_EP_FIELD_END(ncclEpTensorAllocConfig_t, magic) == 8u);
SA(NCCL_EP_FIELD_END(ncclEpGroupConfig_t, timeout_ns) == 96u);
SA(NCCL_EP_FIELD_END(ncclEpGroupConfig_t, padding_v2) == 112u);
SA(NCCL_EP_FIELD_END(ncclEpLayoutInfo_t, recv_total_counter) == 40u);
SA(NCCL_EP_FIELD_END(ncclEpLayoutInfo_t, padding_v2) == 48u);
SA(NCCL_EP_FIELD_END(ncclEpDispatchInputs_t, scales) == 32u);
SA(NCCL_EP_FIELD_END(ncclEpDispatchOutputs_t, topk_idx) == 40u);
SA(NCCL_EP_FIELD_END(ncclEpCombineInputs_t, topk_weights) == 24u);
SA(NCCL_EP_FIELD_END(ncclEpCombineInputs_t, scales) == 32u);
SA(NCCL_EP_FIELD_END(ncclEpCombineOutputs_t, topk_weights) == 24u);
SA(NCCL_EP_FIELD_END(ncclEpHandleConfig_t, dispatch_output_per_expert_alignment) == 16u);
SA(NCCL_EP_FIELD_END(ncclEpDispatchConfig_t, pass_direction) == 20u);
SA(NCCL_EP_FIELD_END(ncclEpDispatchConfig_t, quant_recipe) == 24u);
SA(NCCL_EP_FIELD_END(ncclEpCombineConfig_t, pass_direction) == 16u);
SA(NCCL_EP_FIELD_END(ncclEpCombineConfig_t, quant_recipe) == 20u);
SA(NCCL_EP_FIELD_END(ncclEpCompleteConfig_t, magic) == 8u);

/* The *_LAST_FIELD macros name those same fields. */
SA(NCCL_EP_FIELD_END(ncclEpTensor_t, NCCL_EP_TENSOR_V1_LAST_FIELD) == NCCL_EP_TENSOR_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpGroupConfig_t, NCCL_EP_GROUP_CONFIG_V1_LAST_FIELD) == NCCL_EP_GROUP_CONFIG_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpGroupConfig_t, NCCL_EP_GROUP_CONFIG_V2_LAST_FIELD) == NCCL_EP_GROUP_CONFIG_V2_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpLayoutInfo_t, NCCL_EP_LAYOUT_INFO_V1_LAST_FIELD) == NCCL_EP_LAYOUT_INFO_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpLayoutInfo_t, NCCL_EP_LAYOUT_INFO_V2_LAST_FIELD) == NCCL_EP_LAYOUT_INFO_V2_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpCombineInputs_t, NCCL_EP_COMBINE_INPUTS_V1_LAST_FIELD) == NCCL_EP_COMBINE_INPUTS_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpCombineInputs_t, NCCL_EP_COMBINE_INPUTS_V2_LAST_FIELD) == NCCL_EP_COMBINE_INPUTS_V2_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpDispatchConfig_t, NCCL_EP_DISPATCH_CONFIG_V1_LAST_FIELD) == NCCL_EP_DISPATCH_CONFIG_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpDispatchConfig_t, NCCL_EP_DISPATCH_CONFIG_V2_LAST_FIELD) == NCCL_EP_DISPATCH_CONFIG_V2_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpCombineConfig_t, NCCL_EP_COMBINE_CONFIG_V1_LAST_FIELD) == NCCL_EP_COMBINE_CONFIG_V1_SIZE);
SA(NCCL_EP_FIELD_END(ncclEpCombineConfig_t, NCCL_EP_COMBINE_CONFIG_V2_LAST_FIELD) == NCCL_EP_COMBINE_CONFIG_V2_SIZE);

/* Version and magic constants. */
SA(NCCL_EP_MAJOR == 0 && NCCL_EP_MINOR == 1 && NCCL_EP_PATCH == 0);
SA(NCCL_EP_VERSION_CODE == 100);
SA(NCCL_EP_API_VERSION == 2);
SA(NCCL_EP_MAGIC == 0xC00FFFEEu);
SA(NCCL_EP_TENSOR_MAGIC == 0xCAFECAFEu);
SA(NCCL_EP_AUTO == 0);
SA(MOE_EP_UNIQUE_ID_BYTES == 128);

/* NCCL enum values. */
SA(ncclSuccess == 0 && ncclUnhandledCudaError == 1 && ncclSystemError == 2);
SA(ncclInternalError == 3 && ncclInvalidArgument == 4 && ncclInvalidUsage == 5);
SA(ncclRemoteError == 6 && ncclInProgress == 7);
SA(ncclInt8 == 0 && ncclChar == 0 && ncclUint8 == 1);
SA(ncclInt32 == 2 && ncclInt == 2 && ncclUint32 == 3);
SA(ncclInt64 == 4 && ncclUint64 == 5);
SA(ncclFloat16 == 6 && ncclHalf == 6 && ncclFloat32 == 7 && ncclFloat == 7);
SA(ncclFloat64 == 8 && ncclDouble == 8 && ncclBfloat16 == 9);
SA(ncclFloat8e4m3 == 10 && ncclFloat8e5m2 == 11);
SA(ncclFloat4x2 == 12);
SA(cudaSuccess == 0);

/* NCCL EP enum values. */
SA(NCCL_EP_ALGO_LOW_LATENCY == 0 && NCCL_EP_ALGO_HIGH_THROUGHPUT == 1);
SA(NCCL_EP_OVERFLOW_AUTO == 0 && NCCL_EP_OVERFLOW_TRAP == 1 && NCCL_EP_OVERFLOW_DROP == 2);
SA(NCCL_EP_LAYOUT_UNSET == 0 && NCCL_EP_LAYOUT_EXPERT_MAJOR == 1);
SA(NCCL_EP_LAYOUT_RANK_MAJOR == 2 && NCCL_EP_LAYOUT_FLAT == 3);
SA(NCCL_EP_FWD_PASS == 0 && NCCL_EP_BWD_PASS == 1);
SA(NCCL_EP_ZERO_COPY_AUTO == 0 && NCCL_EP_ZERO_COPY_OFF == 1 && NCCL_EP_ZERO_COPY_ON == 2);
SA(NCCL_EP_EXPERT_ID_AUTO == 0 && NCCL_EP_EXPERT_ID_LOCAL == 1 && NCCL_EP_EXPERT_ID_GLOBAL == 2);
SA(NCCL_EP_DISP_QUANT_NONE == 0 && NCCL_EP_DISP_QUANT_FWD == 1 && NCCL_EP_DISP_QUANT_DS_FP8E3M4 == 2);
SA(NCCL_EP_COMB_QUANT_NONE == 0 && NCCL_EP_COMB_QUANT_NVFP4 == 1);

/* ---- run-time checks ---------------------------------------------------- */

static int failures;

static void check_(int ok, const char* what, unsigned long got, unsigned long want) {
    if (!ok) {
        fprintf(stderr, "abi_sizes: MISMATCH %s: got %lu, want %lu\n", what, got, want);
        failures++;
    }
}

#define EQ(expr, want) \
    check_((unsigned long)(expr) == (unsigned long)(want), #expr, \
           (unsigned long)(expr), (unsigned long)(want))
#define OFF(type, field, want) EQ(offsetof(type, field), want)

static int all_zero(const void* p, size_t from, size_t to) {
    const unsigned char* b = (const unsigned char*)p;
    for (size_t i = from; i < to; i++) {
        if (b[i] != 0) return 0;
    }
    return 1;
}

/* size/magic prefix shared by the simple structs. */
#define CHECK_PREFIX(type, value, magic_want)                                 \
    do {                                                                       \
        EQ((value).size, sizeof(type));                                        \
        EQ((value).magic, (magic_want));                                       \
        EQ(all_zero(&(value), 8, sizeof(type)), 1);                            \
        EQ(NCCL_EP_HAS_FIELD(&(value), type, magic), 1);                       \
    } while (0)

static void check_offsets(void) {
    OFF(ncclEpTensor_t, size, 0);
    OFF(ncclEpTensor_t, magic, 4);
    OFF(ncclEpTensor_t, ndim, 8);
    OFF(ncclEpTensor_t, datatype, 12);
    OFF(ncclEpTensor_t, data, 16);
    OFF(ncclEpTensor_t, win_hdl, 24);
    OFF(ncclEpTensor_t, win_offset, 32);
    OFF(ncclEpTensor_t, sizes, 40);
    EQ(sizeof(ncclEpTensor_t), 48);

    OFF(ncclEpTensorAllocConfig_t, size, 0);
    OFF(ncclEpTensorAllocConfig_t, magic, 4);
    EQ(sizeof(ncclEpTensorAllocConfig_t), 8);

    OFF(ncclEpAllocConfig_t, alloc_fn, 0);
    OFF(ncclEpAllocConfig_t, free_fn, 8);
    OFF(ncclEpAllocConfig_t, context, 16);
    EQ(sizeof(ncclEpAllocConfig_t), 24);

    OFF(ncclEpGroupConfig_t, size, 0);
    OFF(ncclEpGroupConfig_t, magic, 4);
    OFF(ncclEpGroupConfig_t, version, 8);
    OFF(ncclEpGroupConfig_t, algorithm, 12);
    OFF(ncclEpGroupConfig_t, num_experts, 16);
    OFF(ncclEpGroupConfig_t, max_dispatch_tokens_per_rank, 20);
    OFF(ncclEpGroupConfig_t, max_recv_tokens_per_rank, 24);
    OFF(ncclEpGroupConfig_t, max_token_bytes, 28);
    OFF(ncclEpGroupConfig_t, rdma_buffer_size, 32);
    OFF(ncclEpGroupConfig_t, num_qp_per_rank, 40);
    OFF(ncclEpGroupConfig_t, num_channels, 44);
    OFF(ncclEpGroupConfig_t, max_num_sms, 48);
    OFF(ncclEpGroupConfig_t, alloc, 56);
    OFF(ncclEpGroupConfig_t, alloc.alloc_fn, 56);
    OFF(ncclEpGroupConfig_t, alloc.free_fn, 64);
    OFF(ncclEpGroupConfig_t, alloc.context, 72);
    OFF(ncclEpGroupConfig_t, enable_mask, 80);
    OFF(ncclEpGroupConfig_t, timeout_ns, 88);
    OFF(ncclEpGroupConfig_t, zero_copy, 96);
    OFF(ncclEpGroupConfig_t, overflow_policy, 100);
    OFF(ncclEpGroupConfig_t, num_topk, 104);
    OFF(ncclEpGroupConfig_t, padding_v2, 108);
    EQ(sizeof(ncclEpGroupConfig_t), 112);

    OFF(ncclEpLayoutInfo_t, size, 0);
    OFF(ncclEpLayoutInfo_t, magic, 4);
    OFF(ncclEpLayoutInfo_t, expert_counters, 8);
    OFF(ncclEpLayoutInfo_t, src_rank_counters, 16);
    OFF(ncclEpLayoutInfo_t, expert_offsets, 24);
    OFF(ncclEpLayoutInfo_t, recv_total_counter, 32);
    OFF(ncclEpLayoutInfo_t, recv_topk_idx_kind, 40);
    OFF(ncclEpLayoutInfo_t, padding_v2, 44);
    EQ(sizeof(ncclEpLayoutInfo_t), 48);

    OFF(ncclEpDispatchInputs_t, size, 0);
    OFF(ncclEpDispatchInputs_t, magic, 4);
    OFF(ncclEpDispatchInputs_t, tokens, 8);
    OFF(ncclEpDispatchInputs_t, topk_weights, 16);
    OFF(ncclEpDispatchInputs_t, scales, 24);
    EQ(sizeof(ncclEpDispatchInputs_t), 32);

    OFF(ncclEpDispatchOutputs_t, size, 0);
    OFF(ncclEpDispatchOutputs_t, magic, 4);
    OFF(ncclEpDispatchOutputs_t, tokens, 8);
    OFF(ncclEpDispatchOutputs_t, topk_weights, 16);
    OFF(ncclEpDispatchOutputs_t, scales, 24);
    OFF(ncclEpDispatchOutputs_t, topk_idx, 32);
    EQ(sizeof(ncclEpDispatchOutputs_t), 40);

    OFF(ncclEpCombineInputs_t, size, 0);
    OFF(ncclEpCombineInputs_t, magic, 4);
    OFF(ncclEpCombineInputs_t, tokens, 8);
    OFF(ncclEpCombineInputs_t, topk_weights, 16);
    OFF(ncclEpCombineInputs_t, scales, 24);
    EQ(sizeof(ncclEpCombineInputs_t), 32);

    OFF(ncclEpCombineOutputs_t, size, 0);
    OFF(ncclEpCombineOutputs_t, magic, 4);
    OFF(ncclEpCombineOutputs_t, tokens, 8);
    OFF(ncclEpCombineOutputs_t, topk_weights, 16);
    EQ(sizeof(ncclEpCombineOutputs_t), 24);

    OFF(ncclEpHandleConfig_t, size, 0);
    OFF(ncclEpHandleConfig_t, magic, 4);
    OFF(ncclEpHandleConfig_t, dispatch_output_per_expert_alignment, 8);
    EQ(sizeof(ncclEpHandleConfig_t), 16);

    OFF(ncclEpDispatchConfig_t, size, 0);
    OFF(ncclEpDispatchConfig_t, magic, 4);
    OFF(ncclEpDispatchConfig_t, send_only, 8);
    OFF(ncclEpDispatchConfig_t, round_scales, 12);
    OFF(ncclEpDispatchConfig_t, pass_direction, 16);
    OFF(ncclEpDispatchConfig_t, quant_recipe, 20);
    EQ(sizeof(ncclEpDispatchConfig_t), 24);

    OFF(ncclEpCombineConfig_t, size, 0);
    OFF(ncclEpCombineConfig_t, magic, 4);
    OFF(ncclEpCombineConfig_t, send_only, 8);
    OFF(ncclEpCombineConfig_t, pass_direction, 12);
    OFF(ncclEpCombineConfig_t, quant_recipe, 16);
    EQ(sizeof(ncclEpCombineConfig_t), 20);

    OFF(ncclEpCompleteConfig_t, size, 0);
    OFF(ncclEpCompleteConfig_t, magic, 4);
    EQ(sizeof(ncclEpCompleteConfig_t), 8);

    OFF(moeEpUniqueId, internal, 0);
    EQ(sizeof(moeEpUniqueId), MOE_EP_UNIQUE_ID_BYTES);

    /* *_SIZE macros equal sizeof. */
    EQ(NCCL_EP_TENSOR_SIZE, sizeof(ncclEpTensor_t));
    EQ(NCCL_EP_TENSOR_ALLOC_CONFIG_SIZE, sizeof(ncclEpTensorAllocConfig_t));
    EQ(NCCL_EP_GROUP_CONFIG_SIZE, sizeof(ncclEpGroupConfig_t));
    EQ(NCCL_EP_LAYOUT_INFO_SIZE, sizeof(ncclEpLayoutInfo_t));
    EQ(NCCL_EP_DISPATCH_INPUTS_SIZE, sizeof(ncclEpDispatchInputs_t));
    EQ(NCCL_EP_DISPATCH_OUTPUTS_SIZE, sizeof(ncclEpDispatchOutputs_t));
    EQ(NCCL_EP_COMBINE_INPUTS_SIZE, sizeof(ncclEpCombineInputs_t));
    EQ(NCCL_EP_COMBINE_OUTPUTS_SIZE, sizeof(ncclEpCombineOutputs_t));
    EQ(NCCL_EP_HANDLE_CONFIG_SIZE, sizeof(ncclEpHandleConfig_t));
    EQ(NCCL_EP_DISPATCH_CONFIG_SIZE, sizeof(ncclEpDispatchConfig_t));
    EQ(NCCL_EP_COMBINE_CONFIG_SIZE, sizeof(ncclEpCombineConfig_t));
    EQ(NCCL_EP_COMPLETE_CONFIG_SIZE, sizeof(ncclEpCompleteConfig_t));
}

static void check_inits(void) {
    ncclEpTensor_t t = NCCL_EP_TENSOR_INIT;
    EQ(t.size, 48);
    EQ(t.magic, NCCL_EP_TENSOR_MAGIC);
    EQ(t.ndim, 0);
    EQ(t.data == NULL && t.win_hdl == NULL && t.sizes == NULL && t.win_offset == 0, 1);

    size_t dims[2] = {4, 8};
    ncclEpTensor_t t2 = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclBfloat16, .sizes = dims};
    EQ(t2.size, 48);
    EQ(t2.magic, NCCL_EP_TENSOR_MAGIC);
    EQ(t2.ndim, 2);
    EQ(t2.datatype, ncclBfloat16);
    EQ(t2.sizes[1], 8);

    ncclEpGroupConfig_t g = NCCL_EP_GROUP_CONFIG_INIT;
    EQ(g.size, 112);
    EQ(g.magic, NCCL_EP_MAGIC);
    EQ(g.version, NCCL_EP_API_VERSION);
    /* Named fields only: the struct has implicit padding (52..56, 84..88). */
    EQ(g.num_experts == 0 && g.max_dispatch_tokens_per_rank == 0 && g.max_recv_tokens_per_rank == 0, 1);
    EQ(g.max_token_bytes == 0 && g.rdma_buffer_size == 0 && g.num_qp_per_rank == 0, 1);
    EQ(g.num_channels == 0 && g.max_num_sms == 0 && g.enable_mask == 0 && g.timeout_ns == 0, 1);
    EQ(g.alloc.alloc_fn == NULL && g.alloc.free_fn == NULL && g.alloc.context == NULL, 1);
    EQ(g.num_topk == 0 && all_zero(g.padding_v2, 0, sizeof g.padding_v2), 1);
    EQ(NCCL_EP_HAS_FIELD(&g, ncclEpGroupConfig_t, num_topk), 1);
    g.size = NCCL_EP_GROUP_CONFIG_V1_SIZE; /* as an old caller would send it */
    EQ(NCCL_EP_HAS_FIELD(&g, ncclEpGroupConfig_t, timeout_ns), 1);
    EQ(NCCL_EP_HAS_FIELD(&g, ncclEpGroupConfig_t, zero_copy), 0);
    EQ(NCCL_EP_HAS_FIELD((const ncclEpGroupConfig_t*)NULL, ncclEpGroupConfig_t, size), 0);

    ncclEpTensorAllocConfig_t tac = NCCL_EP_TENSOR_ALLOC_CONFIG_INIT;
    CHECK_PREFIX(ncclEpTensorAllocConfig_t, tac, NCCL_EP_MAGIC);
    ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
    CHECK_PREFIX(ncclEpLayoutInfo_t, li, NCCL_EP_MAGIC);
    ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
    CHECK_PREFIX(ncclEpDispatchInputs_t, di, NCCL_EP_MAGIC);
    ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    CHECK_PREFIX(ncclEpDispatchOutputs_t, dout, NCCL_EP_MAGIC);
    ncclEpCombineInputs_t ci = NCCL_EP_COMBINE_INPUTS_INIT;
    CHECK_PREFIX(ncclEpCombineInputs_t, ci, NCCL_EP_MAGIC);
    ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
    CHECK_PREFIX(ncclEpCombineOutputs_t, co, NCCL_EP_MAGIC);
    ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
    CHECK_PREFIX(ncclEpHandleConfig_t, hc, NCCL_EP_MAGIC);
    ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
    CHECK_PREFIX(ncclEpDispatchConfig_t, dc, NCCL_EP_MAGIC);
    ncclEpCombineConfig_t cc = NCCL_EP_COMBINE_CONFIG_INIT;
    CHECK_PREFIX(ncclEpCombineConfig_t, cc, NCCL_EP_MAGIC);
    ncclEpCompleteConfig_t cpl = NCCL_EP_COMPLETE_CONFIG_INIT;
    CHECK_PREFIX(ncclEpCompleteConfig_t, cpl, NCCL_EP_MAGIC);

    /* INIT also works as an assignment (reset). */
    dc.send_only = 1;
    dc = NCCL_EP_DISPATCH_CONFIG_INIT;
    EQ(dc.send_only, 0);
    EQ(dc.size, 24);

    /* Zero defaults are the AUTO / NONE / FWD enumerators. */
    EQ(g.algorithm, NCCL_EP_ALGO_LOW_LATENCY);
    EQ(g.zero_copy, NCCL_EP_ZERO_COPY_AUTO);
    EQ(g.overflow_policy, NCCL_EP_OVERFLOW_AUTO);
    EQ(li.recv_topk_idx_kind, NCCL_EP_EXPERT_ID_AUTO);
    EQ(dc.pass_direction, NCCL_EP_FWD_PASS);
    EQ(dc.quant_recipe, NCCL_EP_DISP_QUANT_NONE);
    EQ(cc.quant_recipe, NCCL_EP_COMB_QUANT_NONE);
}

int main(void) {
    check_offsets();
    check_inits();
    if (failures != 0) {
        fprintf(stderr, "abi_sizes: %d mismatch(es)\n", failures);
        return 1;
    }
    printf("abi_sizes: ok\n");
    return 0;
}
