// SPDX-License-Identifier: MIT OR Apache-2.0
// A C program written against NCCL EP's nccl_ep.h, run on moe-ep's libnccl_ep: HT FLAT and
// EXPERT_MAJOR and LL EXPERT_MAJOR round trips with routings whose results are exact in bf16,
// checked against a reference computed here; LL RANK_MAJOR too; send_only + ncclEpComplete;
// the struct versioning rule; HT under NCCL_EP_OVERFLOW_DROP.
//
// Ranks (MOE_EP_TEST_RANKS, default 4):
//   default               threads of one process, groups from moe-ep's bootstrap id
//   MOE_EP_TEST_PROCS=1   one process per rank (fork), groups from moe-ep's bootstrap id
//   MOE_EP_TEST_NCCL=1    one process per rank, groups from real NCCL communicators
//                         (ncclEpCreateGroup; NCCL loaded at run time, MOE_EP_NCCL_LIBRARY
//                         or libnccl.so.2; needs MOE_EP_DEVICE=cuda). Exit status 3 when NCCL
//                         refuses the communicator itself (e.g. two ranks on one GPU).
//   MOE_EP_TEST_NCCL_HOSTID=1  with MOE_EP_TEST_NCCL: each rank sets NCCL_HOSTID to its own
//                         value, so NCCL accepts ranks that share a GPU (as if on other hosts).
//
// Memory: the CPU emulator takes host pointers; with MOE_EP_DEVICE=cuda[:N] the program
// loads libcuda at run time for device memory (no CUDA headers or link-time dependency).
// With one process per rank and plain MOE_EP_DEVICE=cuda, rank r uses GPU r % device count.
#include <nccl_ep.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NRANKS_DEFAULT 4
#define NUM_EXPERTS 8
#define HIDDEN 64
#define TOPK 2
#define MAX_TOKENS 10

static int g_nranks = NRANKS_DEFAULT;
static moeEpUniqueId g_id, g_drop_id;
static ncclComm_t g_comm;  // MOE_EP_TEST_NCCL: this process's (one rank's) communicator
static int g_failures = 0;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (!(cond)) {                                            \
            pthread_mutex_lock(&g_lock);                          \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);       \
            fprintf(stderr, __VA_ARGS__);                         \
            fprintf(stderr, "\n");                                \
            g_failures++;                                         \
            pthread_mutex_unlock(&g_lock);                        \
            return 1;                                             \
        }                                                         \
    } while (0)

#define NCCL_OK(call)                                                                  \
    do {                                                                               \
        ncclResult_t r_ = (call);                                                      \
        CHECK(r_ == ncclSuccess, "%s -> %d: %s", #call, (int)r_, moeEpGetLastError()); \
    } while (0)

// For thread bodies (which return a pointer): count the failure and go on.
#define NCCL_OK_VOID(call)                                                                           \
    do {                                                                                             \
        ncclResult_t r_ = (call);                                                                    \
        if (r_ != ncclSuccess) {                                                                     \
            pthread_mutex_lock(&g_lock);                                                             \
            fprintf(stderr, "%s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #call, (int)r_, moeEpGetLastError()); \
            g_failures++;                                                                            \
            pthread_mutex_unlock(&g_lock);                                                           \
        }                                                                                            \
    } while (0)

// ---- memory: host (emulator) or CUDA through the driver API, loaded at run time ----
static struct {
    int cuda;
    int ordinal;
    void* ctx;
    int (*init)(unsigned);
    int (*device_count)(int*);
    int (*device_get)(int*, int);
    int (*retain)(void**, int);
    int (*set_current)(void*);
    int (*stream_create)(void**, unsigned);
    int (*stream_sync)(void*);
    int (*alloc)(uint64_t*, size_t, void*);
    int (*free)(uint64_t, void*);
    int (*htod)(uint64_t, const void*, size_t, void*);
    int (*dtoh)(void*, uint64_t, size_t, void*);
} cu;

// This thread's stream (NULL on the emulator), made at first use: every copy, allocation and
// ncclEp call of a rank goes on it. Ranks that are threads of one process must not share
// the NULL (legacy) stream, nor wait for the whole context (cuCtxSynchronize) or call
// cuMemFree: each would wait for a peer's kernel, which waits for this rank, until the
// device-side timeout.
static _Thread_local void* t_stream;

static cudaStream_t rank_stream(void) {
    if (cu.cuda && t_stream == NULL) {
        cu.set_current(cu.ctx);
        if (cu.stream_create(&t_stream, 1 /* CU_STREAM_NON_BLOCKING */) != 0) {
            fprintf(stderr, "cuStreamCreate failed\n");
            exit(1);
        }
    }
    return (cudaStream_t)t_stream;
}

// Whether environment variable `name` is set to a non-zero number.
static int env_flag(const char* name) { return getenv(name) != NULL && atoi(getenv(name)) != 0; }

// Whether MOE_EP_DEVICE names a GPU (`cuda` or `cuda:N`).
static int wants_cuda(void) { return getenv("MOE_EP_DEVICE") && strncmp(getenv("MOE_EP_DEVICE"), "cuda", 4) == 0; }

// `process_rank`: the rank of a one-rank process (it picks its GPU), or -1.
static int mem_init(int process_rank) {
    if (!wants_cuda()) return 0;
    const char* dev = getenv("MOE_EP_DEVICE");
    cu.ordinal = dev[4] == ':' ? atoi(dev + 5) : 0;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == NULL) {
        fprintf(stderr, "MOE_EP_DEVICE=%s but libcuda.so.1 is missing\n", dev);
        return 1;
    }
    *(void**)&cu.init = dlsym(lib, "cuInit");
    *(void**)&cu.device_count = dlsym(lib, "cuDeviceGetCount");
    *(void**)&cu.device_get = dlsym(lib, "cuDeviceGet");
    *(void**)&cu.retain = dlsym(lib, "cuDevicePrimaryCtxRetain");
    *(void**)&cu.set_current = dlsym(lib, "cuCtxSetCurrent");
    *(void**)&cu.stream_create = dlsym(lib, "cuStreamCreate");
    *(void**)&cu.stream_sync = dlsym(lib, "cuStreamSynchronize");
    *(void**)&cu.alloc = dlsym(lib, "cuMemAllocAsync");
    *(void**)&cu.free = dlsym(lib, "cuMemFreeAsync");
    *(void**)&cu.htod = dlsym(lib, "cuMemcpyHtoDAsync_v2");
    *(void**)&cu.dtoh = dlsym(lib, "cuMemcpyDtoHAsync_v2");
    int device = 0, count = 0;
    if (cu.init(0) != 0 || cu.device_count(&count) != 0 || count < 1) {
        fprintf(stderr, "CUDA initialisation failed\n");
        return 1;
    }
    if (process_rank >= 0 && dev[4] != ':') cu.ordinal = process_rank % count;
    if (cu.device_get(&device, cu.ordinal) != 0 || cu.retain(&cu.ctx, device) != 0) {
        fprintf(stderr, "CUDA initialisation of GPU %d failed\n", cu.ordinal);
        return 1;
    }
    // Current from here on: NCCL (MOE_EP_TEST_NCCL) takes its GPU from the current context.
    cu.set_current(cu.ctx);
    cu.cuda = 1;
    return 0;
}

// Memory and copies, ordered on the rank's stream (stream-ordered allocation and free).
static void* mem_alloc(size_t bytes) {
    if (!cu.cuda) return calloc(1, bytes < 16 ? 16 : bytes);
    uint64_t p = 0;
    cu.set_current(cu.ctx);
    return cu.alloc(&p, bytes < 16 ? 16 : bytes, rank_stream()) == 0 ? (void*)(uintptr_t)p : NULL;
}

static void mem_free(void* p) {
    if (!cu.cuda) free(p);
    else cu.free((uint64_t)(uintptr_t)p, rank_stream());
}

static void mem_put(void* dst, const void* src, size_t bytes) {
    if (!cu.cuda) memcpy(dst, src, bytes);
    else {
        cu.htod((uint64_t)(uintptr_t)dst, src, bytes, rank_stream());
        cu.stream_sync(rank_stream());  // `src` may be reused at once
    }
}

// After the library's work queued on the rank's stream so far.
static void mem_get(void* dst, const void* src, size_t bytes) {
    if (!cu.cuda) memcpy(dst, src, bytes);
    else {
        cu.dtoh(dst, (uint64_t)(uintptr_t)src, bytes, rank_stream());
        cu.stream_sync(rank_stream());
    }
}

// ---- data ----
static uint16_t bf16(float v) {  // exact for the small values used here
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return (uint16_t)(bits >> 16);
}

static float from_bf16(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

static int num_tokens(int rank, int call) { return 1 + (rank * 3 + call * 5) % MAX_TOKENS; }

// Top-2 of token t of rank r in call c: two distinct experts, some entries dropped.
static int64_t expert(int r, int t, int k, int c) {
    if ((r + t + k + c) % 5 == 4) return -1;
    return (r + 3 * t + c + k * (NUM_EXPERTS / 2)) % NUM_EXPERTS;
}

static float token_value(int r, int t, int h) { return (float)((r * 13 + t * 7 + h) % 9) - 4.0f; }

static float weight(int r, int t, int k) { return k == 0 ? 0.5f : (float)((r + t) % 3) * 0.25f; }

// Rank `rank`'s routing, weights and tokens of call `call` (num_tokens(rank, call) rows).
static void make_inputs(int rank, int call, int64_t* idx, float* w, uint16_t* x) {
    for (int t = 0; t < num_tokens(rank, call); t++) {
        for (int k = 0; k < TOPK; k++) idx[t * TOPK + k] = expert(rank, t, k, call), w[t * TOPK + k] = weight(rank, t, k);
        for (int h = 0; h < HIDDEN; h++) x[t * HIDDEN + h] = bf16(token_value(rank, t, h));
    }
}

static void make_tensor(ncclEpTensor_t* t, size_t* dims, unsigned ndim, ncclDataType_t dtype, void* data) {
    *t = NCCL_EP_TENSOR_INIT;
    t->ndim = ndim;
    t->datatype = dtype;
    t->data = data;
    t->sizes = dims;
}

struct rank_arg {
    int rank;
};

static int ht_round_trip(int rank, ncclEpGroup_t group, int call) {
    const int L = NUM_EXPERTS / g_nranks, T = num_tokens(rank, call), rows = g_nranks * MAX_TOKENS;
    int64_t idx[MAX_TOKENS * TOPK];
    float w[MAX_TOKENS * TOPK];
    uint16_t x[MAX_TOKENS * HIDDEN];
    make_inputs(rank, call, idx, w, x);
    void* d_idx = mem_alloc(sizeof idx);
    void* d_w = mem_alloc(sizeof w);
    void* d_x = mem_alloc(sizeof x);
    void* d_recv = mem_alloc((size_t)rows * HIDDEN * 2);
    void* d_recv_w = mem_alloc((size_t)rows * TOPK * 4);
    void* d_recv_idx = mem_alloc((size_t)rows * TOPK * 8);
    void* d_out = mem_alloc((size_t)T * HIDDEN * 2);
    void* d_counts = mem_alloc(4 * (size_t)L);
    mem_put(d_idx, idx, sizeof idx);
    mem_put(d_w, w, sizeof w);
    mem_put(d_x, x, sizeof x);

    size_t idx_dims[2] = {(size_t)T, TOPK}, x_dims[2] = {(size_t)T, HIDDEN}, w_dims[2] = {(size_t)T, TOPK};
    size_t recv_dims[2] = {(size_t)rows, HIDDEN}, rk_dims[2] = {(size_t)rows, TOPK}, cnt_dims[1] = {(size_t)L};
    ncclEpTensor_t t_idx, t_x, t_w, t_recv, t_recv_w, t_recv_idx, t_out, t_counts;
    make_tensor(&t_idx, idx_dims, 2, ncclInt64, d_idx);
    make_tensor(&t_x, x_dims, 2, ncclBfloat16, d_x);
    make_tensor(&t_w, w_dims, 2, ncclFloat32, d_w);
    make_tensor(&t_recv, recv_dims, 2, ncclBfloat16, d_recv);
    make_tensor(&t_recv_w, rk_dims, 2, ncclFloat32, d_recv_w);
    make_tensor(&t_recv_idx, rk_dims, 2, ncclInt64, d_recv_idx);
    make_tensor(&t_out, x_dims, 2, ncclBfloat16, d_out);
    make_tensor(&t_counts, cnt_dims, 1, ncclInt32, d_counts);

    ncclEpLayoutInfo_t info = NCCL_EP_LAYOUT_INFO_INIT;
    info.expert_counters = &t_counts;
    ncclEpHandle_t handle = NULL;
    NCCL_OK(ncclEpCreateHandle(&handle, group, NCCL_EP_LAYOUT_FLAT, &t_idx, &info, NULL, rank_stream()));

    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x;
    in.topk_weights = &t_w;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_recv;
    out.topk_weights = &t_recv_w;
    out.topk_idx = &t_recv_idx;
    NCCL_OK(ncclEpDispatch(handle, &in, &out, NULL, NULL, rank_stream()));

    // Reference: rows from every source rank s in token order, for tokens with an expert here.
    uint16_t* recv = malloc((size_t)rows * HIDDEN * 2);
    int64_t* recv_idx = malloc((size_t)rows * TOPK * 8);
    float* recv_w = malloc((size_t)rows * TOPK * 4);
    int counts[NUM_EXPERTS] = {0}, got_counts[NUM_EXPERTS];
    mem_get(recv, d_recv, (size_t)rows * HIDDEN * 2);
    mem_get(recv_idx, d_recv_idx, (size_t)rows * TOPK * 8);
    mem_get(recv_w, d_recv_w, (size_t)rows * TOPK * 4);
    mem_get(got_counts, d_counts, 4 * (size_t)L);
    int row = 0;
    for (int s = 0; s < g_nranks; s++) {
        for (int t = 0; t < num_tokens(s, call); t++) {
            int here = 0;
            for (int k = 0; k < TOPK; k++) here |= expert(s, t, k, call) >= 0 && expert(s, t, k, call) / L == rank;
            if (!here) continue;
            for (int h = 0; h < HIDDEN; h++)
                CHECK(recv[row * HIDDEN + h] == bf16(token_value(s, t, h)), "rank %d: HT row %d (rank %d token %d)", rank, row, s, t);
            for (int k = 0; k < TOPK; k++) {
                int64_t e = expert(s, t, k, call);
                int local = e >= 0 && e / L == rank;
                CHECK(recv_idx[row * TOPK + k] == (local ? e - rank * L : -1), "rank %d: HT top-k id of row %d", rank, row);
                CHECK(recv_w[row * TOPK + k] == (local ? weight(s, t, k) : 0.0f), "rank %d: HT weight of row %d", rank, row);
                if (local) counts[e - rank * L]++;
            }
            row++;
        }
    }
    for (int e = 0; e < L; e++) CHECK(got_counts[e] == counts[e], "rank %d: expert %d counts %d, want %d", rank, e, got_counts[e], counts[e]);

    // Identity experts: the combine sums one copy per destination rank.
    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_recv;
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_out;
    NCCL_OK(ncclEpCombine(handle, &cin, &cout, NULL, rank_stream()));
    uint16_t y[MAX_TOKENS * HIDDEN];
    mem_get(y, d_out, (size_t)T * HIDDEN * 2);
    for (int t = 0; t < T; t++) {
        int dests = 0;
        for (int r = 0; r < g_nranks; r++) {
            int in_r = 0;
            for (int k = 0; k < TOPK; k++) in_r |= expert(rank, t, k, call) >= 0 && expert(rank, t, k, call) / L == r;
            dests += in_r;
        }
        for (int h = 0; h < HIDDEN; h++)
            CHECK(from_bf16(y[t * HIDDEN + h]) == dests * token_value(rank, t, h), "rank %d: HT combined token %d", rank, t);
    }
    NCCL_OK(ncclEpHandleDestroy(handle));
    free(recv), free(recv_idx), free(recv_w);
    void* bufs[] = {d_idx, d_w, d_x, d_recv, d_recv_w, d_recv_idx, d_out, d_counts};
    for (unsigned i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mem_free(bufs[i]);
    return 0;
}

// HT EXPERT_MAJOR with zones aligned to ALIGN slots: zone sizes and starts at update time,
// the zones (rows in source-rank, token order, then zero padding) and their weights; with
// identity experts each token comes back once per expert it has anywhere.
#define ALIGN 4
static int ht_em_round_trip(int rank, ncclEpGroup_t group, int call) {
    const int L = NUM_EXPERTS / g_nranks, T = num_tokens(rank, call);
    const int slots = 2 * g_nranks * MAX_TOKENS + NUM_EXPERTS * ALIGN;
    int64_t idx[MAX_TOKENS * TOPK];
    float w[MAX_TOKENS * TOPK];
    uint16_t x[MAX_TOKENS * HIDDEN];
    make_inputs(rank, call, idx, w, x);
    void *d_idx = mem_alloc(sizeof idx), *d_w = mem_alloc(sizeof w), *d_x = mem_alloc(sizeof x);
    void *d_zones = mem_alloc((size_t)slots * HIDDEN * 2), *d_zw = mem_alloc((size_t)slots * 4);
    void *d_counts = mem_alloc(8 * (size_t)L), *d_offsets = mem_alloc(8 * (size_t)L), *d_out = mem_alloc((size_t)T * HIDDEN * 2);
    mem_put(d_idx, idx, sizeof idx);
    mem_put(d_w, w, sizeof w);
    mem_put(d_x, x, sizeof x);
    size_t idx_dims[2] = {(size_t)T, TOPK}, x_dims[2] = {(size_t)T, HIDDEN}, z_dims[2] = {(size_t)slots, HIDDEN};
    size_t zw_dims[1] = {(size_t)slots}, l_dims[1] = {(size_t)L};
    ncclEpTensor_t t_idx, t_w, t_x, t_zones, t_zw, t_counts, t_offsets, t_out;
    make_tensor(&t_idx, idx_dims, 2, ncclInt64, d_idx);
    make_tensor(&t_w, idx_dims, 2, ncclFloat32, d_w);
    make_tensor(&t_x, x_dims, 2, ncclBfloat16, d_x);
    make_tensor(&t_zones, z_dims, 2, ncclBfloat16, d_zones);
    make_tensor(&t_zw, zw_dims, 1, ncclFloat32, d_zw);
    make_tensor(&t_counts, l_dims, 1, ncclInt64, d_counts);
    make_tensor(&t_offsets, l_dims, 1, ncclInt64, d_offsets);
    make_tensor(&t_out, x_dims, 2, ncclBfloat16, d_out);

    ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
    hc.dispatch_output_per_expert_alignment = ALIGN;
    ncclEpLayoutInfo_t info = NCCL_EP_LAYOUT_INFO_INIT;
    info.expert_counters = &t_counts;
    info.expert_offsets = &t_offsets;
    ncclEpHandle_t handle = NULL;
    NCCL_OK(ncclEpCreateHandle(&handle, group, NCCL_EP_LAYOUT_EXPERT_MAJOR, &t_idx, &info, &hc, rank_stream()));
    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x;
    in.topk_weights = &t_w;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_zones;
    out.topk_weights = &t_zw;
    NCCL_OK(ncclEpDispatch(handle, &in, &out, NULL, NULL, rank_stream()));

    int64_t counts[NUM_EXPERTS], offsets[NUM_EXPERTS];
    uint16_t* zones = malloc((size_t)slots * HIDDEN * 2);
    float* zw = malloc((size_t)slots * 4);
    mem_get(counts, d_counts, 8 * (size_t)L);
    mem_get(offsets, d_offsets, 8 * (size_t)L);
    mem_get(zones, d_zones, (size_t)slots * HIDDEN * 2);
    mem_get(zw, d_zw, (size_t)slots * 4);
    int64_t start = 0;
    for (int e = 0; e < L; e++) {
        int filled = 0;
        CHECK(offsets[e] == start, "rank %d: zone %d starts at %lld, want %lld", rank, e, (long long)offsets[e], (long long)start);
        for (int s = 0; s < g_nranks; s++)
            for (int t = 0; t < num_tokens(s, call); t++)
                for (int k = 0; k < TOPK; k++)
                    if (expert(s, t, k, call) == rank * L + e) {
                        int64_t slot = start + filled++;
                        CHECK(zones[slot * HIDDEN + 1] == bf16(token_value(s, t, 1)), "rank %d: zone %d slot %d", rank, e, filled - 1);
                        CHECK(zw[slot] == weight(s, t, k), "rank %d: zone %d weight %d", rank, e, filled - 1);
                    }
        int64_t size = (filled + ALIGN - 1) / ALIGN * ALIGN;
        CHECK(counts[e] == size, "rank %d: zone %d size %lld, want %lld", rank, e, (long long)counts[e], (long long)size);
        for (int64_t slot = start + filled; slot < start + size; slot++)
            CHECK(zones[slot * HIDDEN] == 0 && zw[slot] == 0.0f, "rank %d: zone %d padding", rank, e);
        start += size;
    }

    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_zones;  // identity experts
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_out;
    NCCL_OK(ncclEpCombine(handle, &cin, &cout, NULL, rank_stream()));
    uint16_t y[MAX_TOKENS * HIDDEN];
    mem_get(y, d_out, (size_t)T * HIDDEN * 2);
    for (int t = 0; t < T; t++) {
        int experts = 0;
        for (int k = 0; k < TOPK; k++) experts += expert(rank, t, k, call) >= 0;
        for (int h = 0; h < HIDDEN; h++)
            CHECK(from_bf16(y[t * HIDDEN + h]) == experts * token_value(rank, t, h), "rank %d: EM combined token %d", rank, t);
    }
    NCCL_OK(ncclEpHandleDestroy(handle));
    free(zones), free(zw);
    void* bufs[] = {d_idx, d_w, d_x, d_zones, d_zw, d_counts, d_offsets, d_out};
    for (unsigned i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mem_free(bufs[i]);
    return 0;
}

static int ll_round_trip(int rank, ncclEpGroup_t group, ncclEpHandle_t handle, int call) {
    const int L = NUM_EXPERTS / g_nranks, T = num_tokens(rank, call), slots = g_nranks * MAX_TOKENS;
    const int send_only = call % 2;
    int64_t idx[MAX_TOKENS * TOPK];
    float w[MAX_TOKENS * TOPK];
    uint16_t x[MAX_TOKENS * HIDDEN];
    make_inputs(rank, call, idx, w, x);
    (void)group;
    size_t recv_bytes = (size_t)L * slots * HIDDEN * 2;
    void *d_idx = mem_alloc(sizeof idx), *d_w = mem_alloc(sizeof w), *d_x = mem_alloc(sizeof x);
    void *d_recv = mem_alloc(recv_bytes), *d_counts = mem_alloc(4 * (size_t)L), *d_out = mem_alloc((size_t)T * HIDDEN * 2);
    mem_put(d_idx, idx, sizeof idx);
    mem_put(d_w, w, sizeof w);
    mem_put(d_x, x, sizeof x);
    size_t idx_dims[2] = {(size_t)T, TOPK}, x_dims[2] = {(size_t)T, HIDDEN};
    size_t recv_dims[3] = {(size_t)L, (size_t)slots, HIDDEN}, cnt_dims[1] = {(size_t)L};
    ncclEpTensor_t t_idx, t_x, t_w, t_recv, t_counts, t_out;
    make_tensor(&t_idx, idx_dims, 2, ncclInt64, d_idx);
    make_tensor(&t_x, x_dims, 2, ncclBfloat16, d_x);
    make_tensor(&t_w, idx_dims, 2, ncclFloat32, d_w);
    make_tensor(&t_recv, recv_dims, 3, ncclBfloat16, d_recv);
    make_tensor(&t_counts, cnt_dims, 1, ncclInt32, d_counts);
    make_tensor(&t_out, x_dims, 2, ncclBfloat16, d_out);

    NCCL_OK(ncclEpUpdateHandle(handle, &t_idx, NULL, rank_stream()));
    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_recv;
    ncclEpLayoutInfo_t info = NCCL_EP_LAYOUT_INFO_INIT;
    info.expert_counters = &t_counts;
    ncclEpDispatchConfig_t dcfg = NCCL_EP_DISPATCH_CONFIG_INIT;
    dcfg.send_only = (unsigned)send_only;
    NCCL_OK(ncclEpDispatch(handle, &in, &out, &info, &dcfg, rank_stream()));
    NCCL_OK(ncclEpComplete(handle, NULL, rank_stream()));  // the receive of a send-only call; else a no-op

    int counts[NUM_EXPERTS] = {0}, got[NUM_EXPERTS];
    for (int s = 0; s < g_nranks; s++)
        for (int t = 0; t < num_tokens(s, call); t++)
            for (int k = 0; k < TOPK; k++) {
                int64_t e = expert(s, t, k, call);
                if (e >= 0 && e / L == rank) counts[e - rank * L]++;
            }
    mem_get(got, d_counts, 4 * (size_t)L);
    for (int e = 0; e < L; e++) CHECK(got[e] == counts[e], "rank %d: LL expert %d count %d, want %d", rank, e, got[e], counts[e]);

    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_recv;  // identity experts
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_out;
    cout.topk_weights = &t_w;
    ncclEpCombineConfig_t ccfg = NCCL_EP_COMBINE_CONFIG_INIT;
    ccfg.send_only = (unsigned)send_only;
    NCCL_OK(ncclEpCombine(handle, &cin, &cout, &ccfg, rank_stream()));
    NCCL_OK(ncclEpComplete(handle, NULL, rank_stream()));
    uint16_t y[MAX_TOKENS * HIDDEN];
    mem_get(y, d_out, (size_t)T * HIDDEN * 2);
    for (int t = 0; t < T; t++) {
        float sum_w = 0;
        for (int k = 0; k < TOPK; k++)
            if (expert(rank, t, k, call) >= 0) sum_w += weight(rank, t, k);
        for (int h = 0; h < HIDDEN; h++)
            CHECK(from_bf16(y[t * HIDDEN + h]) == sum_w * token_value(rank, t, h), "rank %d: LL combined token %d (call %d)", rank, t, call);
    }
    void* bufs[] = {d_idx, d_w, d_x, d_recv, d_counts, d_out};
    for (unsigned i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mem_free(bufs[i]);
    return 0;
}

// Ranks holding one of token t's experts (rank s, call c), as a bit mask.
static unsigned owner_mask(int s, int t, int call) {
    unsigned mask = 0;
    for (int k = 0; k < TOPK; k++) {
        int64_t e = expert(s, t, k, call);
        if (e >= 0) mask |= 1u << (e / (NUM_EXPERTS / g_nranks));
    }
    return mask;
}

static int ll_rank_major_round_trip(int rank, ncclEpHandle_t handle, int call) {
    const int L = NUM_EXPERTS / g_nranks, T = num_tokens(rank, call), R = g_nranks, M = MAX_TOKENS;
    const int send_only = call % 2;
    int64_t idx[MAX_TOKENS * TOPK];
    float w[MAX_TOKENS * TOPK];
    uint16_t x[MAX_TOKENS * HIDDEN];
    make_inputs(rank, call, idx, w, x);
    size_t slots = (size_t)R * M;
    void *d_idx = mem_alloc(sizeof idx), *d_w = mem_alloc(sizeof w), *d_x = mem_alloc(sizeof x);
    void *d_recv = mem_alloc(slots * HIDDEN * 2), *d_rw = mem_alloc(slots * TOPK * 4), *d_ri = mem_alloc(slots * TOPK * 4);
    void *d_counts = mem_alloc(4 * (size_t)R), *d_out = mem_alloc((size_t)T * HIDDEN * 2);
    mem_put(d_idx, idx, sizeof idx);
    mem_put(d_w, w, sizeof w);
    mem_put(d_x, x, sizeof x);
    size_t idx_dims[2] = {(size_t)T, TOPK}, x_dims[2] = {(size_t)T, HIDDEN}, cnt_dims[1] = {(size_t)R};
    size_t recv_dims[3] = {(size_t)R, (size_t)M, HIDDEN}, rk_dims[3] = {(size_t)R, (size_t)M, TOPK};
    ncclEpTensor_t t_idx, t_x, t_w, t_recv, t_rw, t_ri, t_counts, t_out;
    make_tensor(&t_idx, idx_dims, 2, ncclInt64, d_idx);
    make_tensor(&t_x, x_dims, 2, ncclBfloat16, d_x);
    make_tensor(&t_w, idx_dims, 2, ncclFloat32, d_w);
    make_tensor(&t_recv, recv_dims, 3, ncclBfloat16, d_recv);
    make_tensor(&t_rw, rk_dims, 3, ncclFloat32, d_rw);
    make_tensor(&t_ri, rk_dims, 3, ncclInt32, d_ri);
    make_tensor(&t_counts, cnt_dims, 1, ncclInt32, d_counts);
    make_tensor(&t_out, x_dims, 2, ncclBfloat16, d_out);

    NCCL_OK(ncclEpUpdateHandle(handle, &t_idx, NULL, rank_stream()));
    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x;
    in.topk_weights = &t_w;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_recv;
    out.topk_weights = &t_rw;
    out.topk_idx = &t_ri;
    ncclEpLayoutInfo_t info = NCCL_EP_LAYOUT_INFO_INIT;
    info.src_rank_counters = &t_counts;
    ncclEpDispatchConfig_t dcfg = NCCL_EP_DISPATCH_CONFIG_INIT;
    dcfg.send_only = (unsigned)send_only;
    NCCL_OK(ncclEpDispatch(handle, &in, &out, &info, &dcfg, rank_stream()));
    NCCL_OK(ncclEpComplete(handle, NULL, rank_stream()));

    // Reference: block s holds rank s's tokens with an expert here, in token order.
    int counts[NUM_EXPERTS];
    int32_t* ri = malloc(slots * TOPK * 4);
    uint16_t* recv = malloc(slots * HIDDEN * 2);
    mem_get(counts, d_counts, 4 * (size_t)R);
    mem_get(ri, d_ri, slots * TOPK * 4);
    mem_get(recv, d_recv, slots * HIDDEN * 2);
    for (int s = 0; s < R; s++) {
        int row = 0;
        for (int t = 0; t < num_tokens(s, call); t++) {
            if (!(owner_mask(s, t, call) >> rank & 1)) continue;
            int slot = s * M + row++;
            CHECK(recv[(size_t)slot * HIDDEN] == bf16(token_value(s, t, 0)), "rank %d: RM row %d of rank %d", rank, row - 1, s);
            for (int k = 0; k < TOPK; k++) {
                int64_t e = expert(s, t, k, call);
                int want = e >= 0 && e / L == rank ? (int)(e - rank * L) : -1;
                CHECK(ri[slot * TOPK + k] == want, "rank %d: RM id %d of row %d from %d", rank, k, row - 1, s);
            }
        }
        CHECK(counts[s] == row, "rank %d: RM count from %d is %d, want %d", rank, s, counts[s], row);
    }

    // Identity experts: return the received rows; each token sums one per owner rank.
    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_recv;
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_out;
    ncclEpCombineConfig_t ccfg = NCCL_EP_COMBINE_CONFIG_INIT;
    ccfg.send_only = (unsigned)send_only;
    NCCL_OK(ncclEpCombine(handle, &cin, &cout, &ccfg, rank_stream()));
    NCCL_OK(ncclEpComplete(handle, NULL, rank_stream()));
    uint16_t y[MAX_TOKENS * HIDDEN];
    mem_get(y, d_out, (size_t)T * HIDDEN * 2);
    for (int t = 0; t < T; t++) {
        int owners = __builtin_popcount(owner_mask(rank, t, call));
        for (int h = 0; h < HIDDEN; h++)
            CHECK(from_bf16(y[t * HIDDEN + h]) == owners * token_value(rank, t, h), "rank %d: RM combined token %d", rank, t);
    }
    free(ri), free(recv);
    void* bufs[] = {d_idx, d_w, d_x, d_recv, d_rw, d_ri, d_counts, d_out};
    for (unsigned i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mem_free(bufs[i]);
    return 0;
}

// NCCL_EP_OVERFLOW_DROP (NCCL EP's test_ht_overflow_drop recipe): every token of every rank
// goes to expert 0 alone, rank r has MAX_TOKENS - r tokens and rank 0 keeps DROP_BUDGET
// rows: all of rank 0's and the first ones of rank 1. recv_total_counter says how many
// arrived before the drop; with identity experts only the kept tokens come back.
#define DROP_BUDGET (MAX_TOKENS + 2)
static int ht_drop_round_trip(int rank, ncclEpGroup_t group) {
    const int T = MAX_TOKENS - rank;
    int64_t idx[MAX_TOKENS * TOPK];
    float w[MAX_TOKENS * TOPK];
    uint16_t x[MAX_TOKENS * HIDDEN], y[MAX_TOKENS * HIDDEN];
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < TOPK; k++) idx[t * TOPK + k] = k == 0 ? 0 : -1, w[t * TOPK + k] = 1.0f;
        for (int h = 0; h < HIDDEN; h++) x[t * HIDDEN + h] = bf16(token_value(rank, t, h));
    }
    void* d_idx = mem_alloc(sizeof idx);
    void* d_w = mem_alloc(sizeof w);
    void* d_x = mem_alloc(sizeof x);
    void* d_recv = mem_alloc((size_t)DROP_BUDGET * HIDDEN * 2);
    void* d_recv_w = mem_alloc((size_t)DROP_BUDGET * TOPK * 4);
    void* d_recv_idx = mem_alloc((size_t)DROP_BUDGET * TOPK * 8);
    void* d_out = mem_alloc(sizeof y);
    void* d_total = mem_alloc(4);
    mem_put(d_idx, idx, sizeof idx);
    mem_put(d_w, w, sizeof w);
    mem_put(d_x, x, sizeof x);
    size_t idx_dims[2] = {(size_t)T, TOPK}, x_dims[2] = {(size_t)T, HIDDEN}, one[1] = {1};
    size_t recv_dims[2] = {DROP_BUDGET, HIDDEN}, rk_dims[2] = {DROP_BUDGET, TOPK};
    ncclEpTensor_t t_idx, t_x, t_w, t_recv, t_recv_w, t_recv_idx, t_out, t_total;
    make_tensor(&t_idx, idx_dims, 2, ncclInt64, d_idx);
    make_tensor(&t_x, x_dims, 2, ncclBfloat16, d_x);
    make_tensor(&t_w, idx_dims, 2, ncclFloat32, d_w);
    make_tensor(&t_recv, recv_dims, 2, ncclBfloat16, d_recv);
    make_tensor(&t_recv_w, rk_dims, 2, ncclFloat32, d_recv_w);
    make_tensor(&t_recv_idx, rk_dims, 2, ncclInt64, d_recv_idx);
    make_tensor(&t_out, x_dims, 2, ncclBfloat16, d_out);
    make_tensor(&t_total, one, 1, ncclInt32, d_total);

    ncclEpHandle_t h = NULL;
    NCCL_OK(ncclEpInitHandle(&h, group, NCCL_EP_LAYOUT_FLAT, NULL, TOPK, NULL));
    ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
    li.recv_total_counter = &t_total;
    NCCL_OK(ncclEpUpdateHandle(h, &t_idx, &li, rank_stream()));
    int arrived = 0, want_arrived = 0;
    for (int s = 0; s < g_nranks; s++) want_arrived += MAX_TOKENS - s;
    mem_get(&arrived, d_total, 4);
    CHECK(arrived == (rank == 0 ? want_arrived : 0), "rank %d: recv_total_counter %d before the drop", rank, arrived);

    ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
    in.tokens = &t_x;
    in.topk_weights = &t_w;
    ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    out.tokens = &t_recv;
    out.topk_weights = &t_recv_w;
    out.topk_idx = &t_recv_idx;
    NCCL_OK(ncclEpDispatch(h, &in, &out, NULL, NULL, rank_stream()));
    NCCL_OK(ncclEpComplete(h, NULL, rank_stream()));
    if (rank == 0) {
        uint16_t recv[DROP_BUDGET * HIDDEN];
        mem_get(recv, d_recv, sizeof recv);
        for (int row = 0; row < DROP_BUDGET && row < want_arrived; row++) {  // one rank: nothing to drop
            int s = row < MAX_TOKENS ? 0 : 1, t = row < MAX_TOKENS ? row : row - MAX_TOKENS;
            for (int c = 0; c < HIDDEN; c++)
                CHECK(recv[row * HIDDEN + c] == bf16(token_value(s, t, c)), "rank 0: kept row %d (rank %d token %d)", row, s, t);
        }
    }
    ncclEpCombineInputs_t cin = NCCL_EP_COMBINE_INPUTS_INIT;
    cin.tokens = &t_recv;
    ncclEpCombineOutputs_t cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
    cout.tokens = &t_out;
    NCCL_OK(ncclEpCombine(h, &cin, &cout, NULL, rank_stream()));
    mem_get(y, d_out, (size_t)T * HIDDEN * 2);
    for (int t = 0; t < T; t++) {
        int kept = rank == 0 || (rank == 1 && t < DROP_BUDGET - MAX_TOKENS);
        for (int c = 0; c < HIDDEN; c++)
            CHECK(from_bf16(y[t * HIDDEN + c]) == (kept ? token_value(rank, t, c) : 0.0f), "rank %d: combined token %d (%s)", rank, t, kept ? "kept" : "dropped");
    }
    NCCL_OK(ncclEpHandleDestroy(h));
    void* bufs[] = {d_idx, d_w, d_x, d_recv, d_recv_w, d_recv_idx, d_out, d_total};
    for (unsigned i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mem_free(bufs[i]);
    return 0;
}

static ncclEpGroupConfig_t config(ncclEpAlgorithm_t algorithm) {
    ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
    c.algorithm = algorithm;
    c.num_experts = NUM_EXPERTS;
    c.max_dispatch_tokens_per_rank = MAX_TOKENS;
    c.max_recv_tokens_per_rank = algorithm == NCCL_EP_ALGO_HIGH_THROUGHPUT ? (unsigned)(g_nranks * MAX_TOKENS) : NCCL_EP_AUTO;
    c.max_token_bytes = HIDDEN * 2;
    return c;
}

// The versioning rule on one rank's handle calls (nothing collective).
static int struct_rules(int rank, ncclEpGroup_t group) {
    ncclEpHandle_t h = NULL;
    ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
    hc.magic = 0xdead;
    CHECK(ncclEpInitHandle(&h, group, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, TOPK, NULL) == ncclInvalidArgument, "rank %d: wrong magic accepted", rank);
    CHECK(strstr(moeEpGetLastError(), "magic") != NULL, "rank %d: message '%s'", rank, moeEpGetLastError());
    hc = NCCL_EP_HANDLE_CONFIG_INIT;
    hc.size = 8;
    CHECK(ncclEpInitHandle(&h, group, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, TOPK, NULL) == ncclInvalidArgument, "rank %d: undersized accepted", rank);
    struct {
        ncclEpHandleConfig_t v1;
        uint64_t future_field;
    } bigger = {NCCL_EP_HANDLE_CONFIG_INIT, 42};
    bigger.v1.size = sizeof bigger;
    NCCL_OK(ncclEpInitHandle(&h, group, NCCL_EP_LAYOUT_EXPERT_MAJOR, &bigger.v1, TOPK, NULL));
    CHECK(strcmp(moeEpGetLastError(), "") == 0, "rank %d: message after a success", rank);
    NCCL_OK(ncclEpHandleDestroy(h));
    int version = 0;
    NCCL_OK(ncclEpGetVersion(&version));
    CHECK(version == NCCL_EP_VERSION_CODE, "rank %d: version %d", rank, version);
    return 0;
}

// This rank's group: over its NCCL communicator when there is one, else moe-ep's bootstrap.
static ncclResult_t make_group(ncclEpGroup_t* group, const moeEpUniqueId* id, int rank, const ncclEpGroupConfig_t* cfg) {
    if (g_comm != NULL) return ncclEpCreateGroup(group, g_comm, cfg);
    return moeEpCreateGroup(group, id, rank, g_nranks, cu.cuda ? cu.ordinal : -1, cfg);
}

static void* run_rank(void* p) {
    int rank = ((struct rank_arg*)p)->rank, failed = 0;
    if (cu.cuda) cu.set_current(cu.ctx);
    ncclEpGroup_t ht = NULL;
    ncclEpGroupConfig_t ht_cfg = config(NCCL_EP_ALGO_HIGH_THROUGHPUT);
    if (make_group(&ht, &g_id, rank, &ht_cfg) != ncclSuccess) {
        fprintf(stderr, "rank %d: HT group: %s\n", rank, moeEpGetLastError());
        pthread_mutex_lock(&g_lock), g_failures++, pthread_mutex_unlock(&g_lock);
        return NULL;
    }
    for (int call = 0; call < 3 && !failed; call++) failed = ht_round_trip(rank, ht, call);
    for (int call = 0; call < 2 && !failed; call++) failed = ht_em_round_trip(rank, ht, call);
    NCCL_OK_VOID(ncclEpGroupDestroy(ht));
    ncclEpGroup_t drop = NULL;
    ht_cfg.overflow_policy = NCCL_EP_OVERFLOW_DROP;
    ht_cfg.max_recv_tokens_per_rank = DROP_BUDGET;
    NCCL_OK_VOID(make_group(&drop, &g_drop_id, rank, &ht_cfg));
    if (drop != NULL) {
        if (!failed) ht_drop_round_trip(rank, drop);
        NCCL_OK_VOID(ncclEpGroupDestroy(drop));
    }
    return NULL;
}

struct ll_arg {
    int rank;
    moeEpUniqueId id;
};

static void* run_ll_rank(void* p) {
    struct ll_arg* a = p;
    if (cu.cuda) cu.set_current(cu.ctx);
    ncclEpGroup_t ll = NULL;
    ncclEpGroupConfig_t cfg = config(NCCL_EP_ALGO_LOW_LATENCY);
    if (make_group(&ll, &a->id, a->rank, &cfg) != ncclSuccess) {
        fprintf(stderr, "rank %d: LL group: %s\n", a->rank, moeEpGetLastError());
        pthread_mutex_lock(&g_lock), g_failures++, pthread_mutex_unlock(&g_lock);
        return NULL;
    }
    ncclEpHandle_t h = NULL;
    int failed = struct_rules(a->rank, ll);
    if (!failed) NCCL_OK_VOID(ncclEpInitHandle(&h, ll, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, TOPK, NULL));
    if (h != NULL) {
        for (int call = 0; call < 4 && !failed; call++) failed = ll_round_trip(a->rank, ll, h, call);
        NCCL_OK_VOID(ncclEpHandleDestroy(h));
    }
    ncclEpHandle_t rm = NULL;
    if (!failed) NCCL_OK_VOID(ncclEpInitHandle(&rm, ll, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, TOPK, NULL));
    if (rm != NULL) {
        for (int call = 0; call < 4 && !failed; call++) failed = ll_rank_major_round_trip(a->rank, rm, call);
        NCCL_OK_VOID(ncclEpHandleDestroy(rm));
    }
    NCCL_OK_VOID(ncclEpGroupDestroy(ll));
    return NULL;
}

// ---- real NCCL communicators (MOE_EP_TEST_NCCL), NCCL loaded at run time ----
typedef struct {
    char internal[128];  // NCCL_UNIQUE_ID_BYTES
} nccl_unique_id;

static struct {
    ncclResult_t (*get_unique_id)(nccl_unique_id*);
    ncclResult_t (*comm_init_rank)(ncclComm_t*, int, nccl_unique_id, int);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    const char* (*error_string)(ncclResult_t);
} nccl;

static int nccl_load(void) {
    const char* name = getenv("MOE_EP_NCCL_LIBRARY") ? getenv("MOE_EP_NCCL_LIBRARY") : "libnccl.so.2";
    void* lib = dlopen(name, RTLD_NOW);
    if (lib == NULL) {
        fprintf(stderr, "could not load %s: %s\n", name, dlerror());
        return 1;
    }
    *(void**)&nccl.get_unique_id = dlsym(lib, "ncclGetUniqueId");
    *(void**)&nccl.comm_init_rank = dlsym(lib, "ncclCommInitRank");
    *(void**)&nccl.comm_destroy = dlsym(lib, "ncclCommDestroy");
    *(void**)&nccl.error_string = dlsym(lib, "ncclGetErrorString");
    return !nccl.get_unique_id || !nccl.comm_init_rank || !nccl.comm_destroy || !nccl.error_string;
}

static int read_all(int fd, void* buf, size_t bytes) {
    for (size_t got = 0; got < bytes;) {
        ssize_t n = read(fd, (char*)buf + got, bytes - got);
        if (n <= 0) return 1;
        got += (size_t)n;
    }
    return 0;
}

// This process's communicator: rank 0 makes NCCL's id and passes a copy to every other rank
// through `pipe_fds`. Returns 0, 1 (a failure of the test) or 3 (NCCL refused the communicator).
static int nccl_comm_init(int rank, int pipe_fds[2]) {
    nccl_unique_id id;
    if (nccl_load() != 0) return 1;
    if (rank == 0) {
        ncclResult_t r = nccl.get_unique_id(&id);
        if (r != ncclSuccess) {
            fprintf(stderr, "ncclGetUniqueId: %s\n", nccl.error_string(r));
            return 1;
        }
        for (int i = 1; i < g_nranks; i++)
            if (write(pipe_fds[1], &id, sizeof id) != (ssize_t)sizeof id) return 1;
    } else if (read_all(pipe_fds[0], &id, sizeof id) != 0) {
        return 1;
    }
    if (env_flag("MOE_EP_TEST_NCCL_HOSTID")) {
        // NCCL refuses two ranks of a communicator on one GPU of one host; it tells hosts
        // apart by NCCL_HOSTID when set, so ranks sharing a GPU pose as different hosts.
        char host[32];
        snprintf(host, sizeof host, "moe-ep-rank-%d", rank);
        setenv("NCCL_HOSTID", host, 1);
    }
    ncclResult_t r = nccl.comm_init_rank(&g_comm, g_nranks, id, rank);
    if (r != ncclSuccess) {
        fprintf(stderr, "rank %d: ncclCommInitRank (%d ranks, GPU %d): %s\n", rank, g_nranks, cu.ordinal,
                nccl.error_string(r));
        return 3;
    }
    return 0;
}

// One rank in this (forked) process: its communicator if any, the HT cases, then the LL cases.
static int run_process(int rank, int use_nccl, int pipe_fds[2], moeEpUniqueId ll_id) {
    if (mem_init(rank) != 0) return 1;
    if (use_nccl) {
        int r = nccl_comm_init(rank, pipe_fds);
        if (r != 0) return r;
    }
    struct rank_arg arg = {rank};
    struct ll_arg ll_arg = {rank, ll_id};
    run_rank(&arg);
    run_ll_rank(&ll_arg);
    if (g_comm != NULL) nccl.comm_destroy(g_comm);
    return g_failures ? 1 : 0;
}

// MOE_EP_TEST_PROCS / MOE_EP_TEST_NCCL: fork a process per rank; the worst exit status wins.
static int run_processes(int use_nccl, moeEpUniqueId ll_id) {
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) return 2;
    pid_t pids[NUM_EXPERTS];
    for (int r = 0; r < g_nranks; r++) {
        pids[r] = fork();
        if (pids[r] < 0) return 2;
        if (pids[r] == 0) {
            fflush(stdout);
            _exit(run_process(r, use_nccl, pipe_fds, ll_id));
        }
    }
    int worst = 0;
    for (int r = 0; r < g_nranks; r++) {
        int status = 0;
        waitpid(pids[r], &status, 0);
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
        if (code != 0) fprintf(stderr, "rank %d (process %d) exited with %d\n", r, (int)pids[r], code);
        if (code == 1 || (code != 0 && worst == 0)) worst = code;  // a failure outranks a refusal
    }
    return worst;
}

// Ranks as threads of this process: 0, 1 (a failure) or 2 (no CUDA).
static int run_threads(moeEpUniqueId ll_id) {
    if (mem_init(-1) != 0) return 2;
    pthread_t threads[NUM_EXPERTS];
    struct rank_arg args[NUM_EXPERTS];
    struct ll_arg ll_args[NUM_EXPERTS];
    for (int r = 0; r < g_nranks; r++) args[r].rank = r, pthread_create(&threads[r], NULL, run_rank, &args[r]);
    for (int r = 0; r < g_nranks; r++) pthread_join(threads[r], NULL);
    for (int r = 0; r < g_nranks; r++) ll_args[r].rank = r, ll_args[r].id = ll_id, pthread_create(&threads[r], NULL, run_ll_rank, &ll_args[r]);
    for (int r = 0; r < g_nranks; r++) pthread_join(threads[r], NULL);
    if (g_failures) fprintf(stderr, "roundtrip: %d failure(s)\n", g_failures);
    return g_failures ? 1 : 0;
}

int main(void) {
    if (getenv("MOE_EP_TEST_RANKS")) g_nranks = atoi(getenv("MOE_EP_TEST_RANKS"));
    int use_nccl = env_flag("MOE_EP_TEST_NCCL");
    int use_procs = use_nccl || env_flag("MOE_EP_TEST_PROCS");
    if (g_nranks < 1 || NUM_EXPERTS % g_nranks != 0) return 2;
    moeEpUniqueId ll_id;
    // The ids are made before any fork, so every process knows them (rank 0's process
    // inherits the listening sockets).
    if (moeEpGetUniqueId(&g_id) != ncclSuccess || moeEpGetUniqueId(&g_drop_id) != ncclSuccess ||
        moeEpGetUniqueId(&ll_id) != ncclSuccess)
        return 2;
    const char* how = use_nccl ? "processes, NCCL communicators" : use_procs ? "processes" : "threads";
    // With processes, CUDA is initialised in the children only: a context does not survive a fork.
    int code = use_procs ? run_processes(use_nccl, ll_id) : run_threads(ll_id);
    if (code == 3) fprintf(stderr, "roundtrip: NCCL refused the communicator (%d ranks)\n", g_nranks);
    else if (code != 0) fprintf(stderr, "roundtrip: failed (%d ranks, %s)\n", g_nranks, how);
    else printf("roundtrip: ok (%d ranks, %s, %s)\n", g_nranks, how, wants_cuda() ? "GPU" : "CPU emulator");
    return code;
}
