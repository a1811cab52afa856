// SPDX-License-Identifier: MIT OR Apache-2.0
// moe-ep: NCCL EP API v2 compatible header.
//
// Enumerations shared by the NCCL EP compatible C API. Included by
// <nccl_ep.h>; may also be included on its own.

#pragma once
#ifndef NCCL_EP_ENUMS_H_
#define NCCL_EP_ENUMS_H_

/* Zero value meaning "let the library choose" for sizes, counts and the
 * AUTO enumerators below. */
#define NCCL_EP_AUTO 0

/* Which communication algorithm a group runs. */
typedef enum {
    /* Low-latency (LL): fixed-capacity buffers, small batches. */
    NCCL_EP_ALGO_LOW_LATENCY = 0,
    /* High-throughput (HT): exact routing metadata, large batches. */
    NCCL_EP_ALGO_HIGH_THROUGHPUT = 1
} ncclEpAlgorithm_t;

/* What HT dispatch does when a rank would receive more tokens than
 * ncclEpGroupConfig_t::max_recv_tokens_per_rank. LL ignores it. */
typedef enum {
    /* Zero default; currently means TRAP. */
    NCCL_EP_OVERFLOW_AUTO = NCCL_EP_AUTO,
    /* Abort on the device. */
    NCCL_EP_OVERFLOW_TRAP = 1,
    /* Discard the excess tokens; the undropped total is still reported
     * through ncclEpLayoutInfo_t::recv_total_counter if given. */
    NCCL_EP_OVERFLOW_DROP = 2
} ncclEpOverflowPolicy_t;

/* Shape of the dispatch output tensors (and so of the combine inputs,
 * which have the same shape as the dispatch outputs).
 * HT accepts FLAT and EXPERT_MAJOR; LL accepts EXPERT_MAJOR and RANK_MAJOR. */
typedef enum {
    /* Zero default, not a valid layout: callers must pick one of the
     * values below before creating a handle. */
    NCCL_EP_LAYOUT_UNSET = NCCL_EP_AUTO,

    /* Grouped by local expert.
     *   LL: tokens [num_local_experts, num_ranks * max_dispatch_tokens_per_rank, hidden];
     *       topk_weights and topk_idx not produced (weights are applied in combine).
     *   HT: tokens [num_recv_slots, hidden], one slot per (source token, local
     *       expert), each expert's run starting at a multiple of
     *       ncclEpHandleConfig_t::dispatch_output_per_expert_alignment;
     *       topk_weights [num_recv_slots]; topk_idx not produced.
     *       The caller applies the weights before HT combine. */
    NCCL_EP_LAYOUT_EXPERT_MAJOR = 1,

    /* LL only: grouped by source rank.
     *   tokens       [num_ranks, max_dispatch_tokens_per_rank, hidden]
     *   topk_weights [num_ranks, max_dispatch_tokens_per_rank, num_topk]
     *   topk_idx     [num_ranks, max_dispatch_tokens_per_rank, num_topk]
     * The caller reduces each slot over its local experts (weighted) and
     * combine sums one contribution per expert rank. */
    NCCL_EP_LAYOUT_RANK_MAJOR = 2,

    /* HT only: one contiguous run of received tokens.
     *   tokens       [num_recv_slots, hidden]
     *   topk_weights [num_recv_slots, num_topk]
     *   topk_idx     [num_recv_slots, num_topk]
     * num_recv_slots is chosen by the caller and must cover the received
     * count (a worst-case bound, or the count read back from
     * ncclEpLayoutInfo_t::recv_total_counter). The caller reduces each
     * slot (weighted) before combine. */
    NCCL_EP_LAYOUT_FLAT = 3,
} ncclEpLayout_t;

/* Training pass a dispatch / combine belongs to (HT only; LL ignores it).
 * FWD is the zero default. */
typedef enum {
    NCCL_EP_FWD_PASS = 0,
    NCCL_EP_BWD_PASS = 1,
} ncclEpPassDir_t;

/* Whether dispatch / combine may skip the library's staging buffers and
 * move tokens straight into window-backed tensors. */
typedef enum {
    /* Zero default: staging kept, direct paths used when possible. */
    NCCL_EP_ZERO_COPY_AUTO = NCCL_EP_AUTO,
    /* Staging kept available. */
    NCCL_EP_ZERO_COPY_OFF = 1,
    /* Window-backed tensors required where a direct path exists. */
    NCCL_EP_ZERO_COPY_ON = 2
} ncclEpZeroCopyMode_t;

/* Numbering of the expert ids written to the dispatch topk_idx output
 * (layouts that produce it: LL RANK_MAJOR, HT FLAT). Slots not routed to
 * this rank hold -1 in every mode. */
typedef enum {
    /* Zero default: the library's choice (currently LOCAL). */
    NCCL_EP_EXPERT_ID_AUTO = NCCL_EP_AUTO,
    /* Ids in [0, num_local_experts). */
    NCCL_EP_EXPERT_ID_LOCAL = 1,
    /* Global ids, i.e. local id + rank * num_local_experts. */
    NCCL_EP_EXPERT_ID_GLOBAL = 2,
} ncclEpExpertIdKind_t;

#endif /* NCCL_EP_ENUMS_H_ */
