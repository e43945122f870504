// Runs CUDA kernel bodies on the CPU: one std::thread per CUDA thread of a block, __syncthreads as a
// std::barrier, __shared__ arrays as function statics (shared by the block's threads; blocks run one
// after another). Used only by kernels_host.cpp, which compiles the real kernel files (fp32, without
// their launchers) with g++ -DRWKV_HOST_THREADS, so a machine without a GPU checks the kernels' own
// indexing, staging and barrier placement, not just their arithmetic. Races show up as wrong numbers
// only when the OS happens to interleave the threads badly: this is a check, not a race detector.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>

struct RwkvHostDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local RwkvHostDim3 threadIdx, blockIdx;
inline RwkvHostDim3 blockDim;
inline std::barrier<>* rwkv_host_barrier = nullptr;

inline void __syncthreads() { rwkv_host_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
using std::max;
using std::min;

// Runs `body` for every (block, thread) of a 1-D grid.
inline void rwkv_host_launch(unsigned blocks, unsigned threads, const std::function<void()>& body) {
  blockDim.x = threads;
  for (unsigned b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    rwkv_host_barrier = &bar;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        body();
      });
    for (auto& th : pool) th.join();
  }
}
