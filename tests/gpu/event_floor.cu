// What an op costs when R "ranks" (host threads, one stream each) share one GPU, each
// replaying one CUDA graph of N kernels: empty kernels, or a rendezvous of all ranks (each
// kernel waits until every rank's kernel of the same index has started). With a timing
// event between kernels, or only around the graph. Why the LL bench times whole replays
// (docs/benchmarks.md, 2026-12-01). On the GPU machine:
//   nvcc -O2 -arch=sm_90 -std=c++17 event_floor.cu -o event_floor && ./event_floor
#include <cstdio>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t err_ = (x); if (err_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); exit(1); } } while (0)
__global__ void empty_k(int) {}
__global__ void rendezvous(unsigned* arrive, int R, int op) {
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) atomicAdd(arrive, 1);
    unsigned want = (unsigned)R * op;
    unsigned long long t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    while (true) {
      unsigned v; asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(arrive) : "memory");
      if (v >= want) break;
      unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      if (t - t0 > 2000000000ull) { printf("timeout\n"); break; }
    }
  }
  __syncthreads();
}
int main(int argc, char** argv) {
  int N = 200;
  for (int mode = 0; mode < 4; mode++) for (int R : {1, 2, 4, 8}) for (int blocks : {16}) {
    bool inner = mode < 2; // timing events between kernels (else only around the whole graph)
    unsigned* arrive; CK(cudaMalloc(&arrive, 4));
    std::vector<double> per(R);
    std::atomic<int> ready{0}, go{0};
    std::vector<std::thread> th;
    for (int r = 0; r < R; r++) th.emplace_back([&, r] {
      cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      std::vector<cudaEvent_t> ev(N + 1);
      for (auto& e : ev) CK(cudaEventCreate(&e));
      cudaGraph_t g; cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      CK(cudaEventRecordWithFlags(ev[0], s, cudaEventRecordExternal));
      for (int i = 0; i < N; i++) {
        if (mode % 2 == 0) empty_k<<<blocks, 256, 0, s>>>(i); else rendezvous<<<blocks, 256, 0, s>>>(arrive, R, i + 1);
        if (inner || i == N - 1) CK(cudaEventRecordWithFlags(ev[i + 1], s, cudaEventRecordExternal));
      }
      CK(cudaStreamEndCapture(s, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphUpload(ge, s));
      CK(cudaStreamSynchronize(s));
      ready++; while (ready < R) {}
      if (r == 0) { CK(cudaMemset(arrive, 0, 4)); CK(cudaDeviceSynchronize()); go = 1; }
      while (!go) {}
      CK(cudaGraphLaunch(ge, s));
      CK(cudaStreamSynchronize(s));
      if (inner) {
        std::vector<float> t(N);
        for (int i = 0; i < N; i++) CK(cudaEventElapsedTime(&t[i], ev[i], ev[i + 1]));
        std::sort(t.begin(), t.end());
        per[r] = t[N / 2] * 1e3;
      } else {
        float t; CK(cudaEventElapsedTime(&t, ev[0], ev[N])); per[r] = t * 1e3 / N;
      }
    });
    for (auto& t : th) t.join();
    double m = 0; for (double x : per) m += x / R;
    printf("%-10s %-14s ranks %d blocks %2d: per op %.1f us\n", mode % 2 ? "rendezvous" : "empty", inner ? "events between" : "events around", R, blocks, m);
    CK(cudaFree(arrive));
  }
}
