// CUDA-only helpers shared by the kernel files: fp32 conversions of the input dtypes and the
// dtype x head-size dispatch of the launchers.
#pragma once

#if defined(RWKV_HOST_THREADS)
// kernels_host.cpp compiles the kernel files with g++, a CPU thread per CUDA thread (host_threads.h):
// fp32 only, no launchers.
#include "host_threads.h"
#include "wkv_math.cuh"

namespace rwkv_zoo_cuda {
template <typename T> inline float to_f(T x) { return x; }
template <typename T> inline T from_f(float x) { return x; }
}  // namespace rwkv_zoo_cuda
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "wkv_launch.h"
#include "wkv_math.cuh"

namespace rwkv_zoo_cuda {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

}  // namespace rwkv_zoo_cuda
#endif

// Calls BODY with `using scalar_t = <element type>` for the runtime dtype; unknown dtypes are an error.
#define RWKV_DISPATCH_DTYPE(dtype, ...)                                   \
  switch (dtype) {                                                        \
    case kF32: { using scalar_t = float; __VA_ARGS__; break; }                  \
    case kBF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }         \
    case kF16: { using scalar_t = __half; __VA_ARGS__; break; }                 \
    default: return cudaErrorInvalidValue;                               \
  }

// Calls BODY with `constexpr int NN = <head size>` for the head sizes the kernels are built for.
#define RWKV_DISPATCH_N(n, ...)                                           \
  switch (n) {                                                            \
    case 32: { constexpr int NN = 32; __VA_ARGS__; break; }              \
    case 64: { constexpr int NN = 64; __VA_ARGS__; break; }              \
    case 128: { constexpr int NN = 128; __VA_ARGS__; break; }            \
    default: return cudaErrorInvalidValue;                               \
  }
