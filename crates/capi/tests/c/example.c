// SPDX-License-Identifier: MIT OR Apache-2.0
// The example of docs/c.md: two ranks (threads here; processes or nodes work the same)
// dispatch tokens to the ranks of their experts and combine them back, through moe-ep's
// NCCL EP-compatible C API. Runs on the CPU emulator (host memory stands in for device
// memory), so it needs no GPU: cc -I include example.c -L lib -lnccl_ep -lpthread
#include <nccl_ep.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

enum { RANKS = 2, EXPERTS = 4, TOKENS = 3, TOPK = 2, HIDDEN = 16, SLOTS = RANKS * TOKENS };

#define TRY(call)                                                                         \
    do {                                                                                  \
        ncclResult_t r_ = (call);                                                         \
        if (r_ != ncclSuccess) {                                                          \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)r_, moeEpGetLastError()); \
            return (void*)1;                                                              \
        }                                                                                 \
    } while (0)

static moeEpUniqueId id;  // made by rank 0, shared with the others (file, MPI, ...)

static void* rank_main(void* arg) {
    int rank = (int)(size_t)arg;
    // 1. The group: collective. With NCCL: ncclEpCreateGroup(&group, comm, &cfg).
    ncclEpGroupConfig_t cfg = NCCL_EP_GROUP_CONFIG_INIT;
    cfg.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
    cfg.num_experts = EXPERTS;
    cfg.max_dispatch_tokens_per_rank = TOKENS;
    cfg.max_recv_tokens_per_rank = SLOTS;
    cfg.max_token_bytes = HIDDEN * 2;  // bf16 rows
    ncclEpGroup_t group;
    TRY(moeEpCreateGroup(&group, &id, rank, RANKS, -1, &cfg));

    // 2. The routing: token t goes to experts t and t+1 (experts 0-1 on rank 0, 2-3 on rank 1).
    int64_t topk_idx[TOKENS][TOPK];
    float weights[TOKENS][TOPK];
    uint16_t x[TOKENS][HIDDEN], recv[SLOTS][HIDDEN], y[TOKENS][HIDDEN];
    float recv_weights[SLOTS][TOPK];
    int64_t recv_idx[SLOTS][TOPK];
    for (int t = 0; t < TOKENS; t++) {
        topk_idx[t][0] = t, topk_idx[t][1] = t + 1, weights[t][0] = weights[t][1] = 0.5f;
        for (int h = 0; h < HIDDEN; h++) x[t][h] = 0x3f80 + rank;  // bf16 1.0 (rank 0), 1.0078125 (rank 1)
    }
    size_t idx_dims[] = {TOKENS, TOPK}, x_dims[] = {TOKENS, HIDDEN}, recv_dims[] = {SLOTS, HIDDEN}, rk_dims[] = {SLOTS, TOPK};
    ncclEpTensor_t t_idx = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclInt64, .data = topk_idx, .sizes = idx_dims};
    ncclEpTensor_t t_w = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclFloat32, .data = weights, .sizes = idx_dims};
    ncclEpTensor_t t_x = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclBfloat16, .data = x, .sizes = x_dims};
    ncclEpTensor_t t_recv = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclBfloat16, .data = recv, .sizes = recv_dims};
    ncclEpTensor_t t_recv_w = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclFloat32, .data = recv_weights, .sizes = rk_dims};
    ncclEpTensor_t t_recv_idx = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclInt64, .data = recv_idx, .sizes = rk_dims};
    ncclEpTensor_t t_y = {NCCL_EP_TENSOR_INIT_INLINE, .ndim = 2, .datatype = ncclBfloat16, .data = y, .sizes = x_dims};

    // 3. A handle for this routing (collective: the ranks exchange their counts).
    ncclEpHandle_t handle;
    TRY(ncclEpCreateHandle(&handle, group, NCCL_EP_LAYOUT_FLAT, &t_idx, NULL, NULL, NULL));

    // 4. Dispatch: every token reaches each rank holding one of its experts, once.
    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x, in.topk_weights = &t_w;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_recv, out.topk_weights = &t_recv_w, out.topk_idx = &t_recv_idx;
    TRY(ncclEpDispatch(handle, &in, &out, NULL, NULL, NULL));

    // 5. The experts would run here, on the received rows; identity experts keep them.
    // 6. Combine: each token's rows come home and are summed.
    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_recv;
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_y;
    TRY(ncclEpCombine(handle, &cin, &cout, NULL, NULL));

    // Token 1 (experts 1 and 2) reached both ranks, so it comes back doubled; tokens 0 and 2
    // stayed on one rank each (experts 0-1 on rank 0, experts 2-3 on rank 1).
    for (int t = 0; t < TOKENS; t++) {
        uint16_t want = t == 1 ? x[t][0] + 0x80 : x[t][0];  // doubling adds 1 to the exponent
        if (y[t][0] != want) {
            fprintf(stderr, "rank %d: token %d came back as %#x, expected %#x\n", rank, t, y[t][0], want);
            return (void*)1;
        }
    }
    TRY(ncclEpHandleDestroy(handle));
    TRY(ncclEpGroupDestroy(group));
    return NULL;
}

int main(void) {
    if (moeEpGetUniqueId(&id) != ncclSuccess) return 1;
    pthread_t threads[RANKS];
    void* failed[RANKS];
    for (size_t r = 0; r < RANKS; r++) pthread_create(&threads[r], NULL, rank_main, (void*)r);
    for (int r = 0; r < RANKS; r++) pthread_join(threads[r], &failed[r]);
    for (int r = 0; r < RANKS; r++)
        if (failed[r]) return 1;
    printf("example: ok\n");
    return 0;
}
