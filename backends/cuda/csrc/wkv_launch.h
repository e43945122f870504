// Launchers of the rwkv_zoo CUDA WKV kernels: plain C++ declarations over raw pointers, so the kernel
// files compile with nvcc alone and the torch binding (binding.cpp) needs no kernel code.
//
// Layouts (all contiguous): activations [B, T, H, N] (wkv4: [B, T, C]) in the run dtype; log decay w and
// bonus u fp32; states fp32 with the key index first ([B, H, K, V]); gradients come out fp32.
// Each launcher returns cudaSuccess, the launch error, or cudaErrorInvalidValue for a dtype or head
// size it was not built for.
#pragma once

#include <cuda_runtime.h>

namespace rwkv_zoo_cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// wkv4: w, u [C]; state a, b, p [B, C]. With save, the state entering every step goes to sa, sb, sp
// [B, T, C] for the backward (no recomputation, no length limit). dw, du come out per batch row [B, C].
cudaError_t wkv4_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                         const void* v, const float* a0, const float* b0, const float* p0, void* y, float* aT,
                         float* bT, float* pT, float* sa, float* sb, float* sp, bool save, cudaStream_t stream);
cudaError_t wkv4_backward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                          const void* v, const float* sa, const float* sb, const float* sp, const float* dy,
                          const float* daT, const float* dbT, const float* dpT, float* dk, float* dv, float* dw,
                          float* du, float* da0, float* db0, float* dp0, cudaStream_t stream);

// wkv5 / wkv6: w is read at w[b * w_sb + t * w_st + h * N + j] (wkv6: T*H*N, H*N; wkv5: 0, 0); u [H, N].
// dw comes out per token [B, T, H, N] and du per batch row [B, H, N]; the caller sums what is shared.
// ck is backward scratch, [B, H, ceil(T / 16), N, N] fp32.
cudaError_t wkv6_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                         const float* w, long w_sb, long w_st, const float* u, const float* s0, void* y, float* sT,
                         cudaStream_t stream);
cudaError_t wkv6_backward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                          const float* w, long w_sb, long w_st, const float* u, const float* s0, const float* dy,
                          const float* dsT, float* dr, float* dk, float* dv, float* dw, float* du, float* ds0,
                          float* ck, cudaStream_t stream);

// wkv7 recurrent: w fp32 [B, T, H, N]. With save, sa = a_t^T S_{t-1} goes to sa [B, T, H, N] fp32 and the
// state entering every WKV7_CK-th step to ck [B, H, ceil(T / WKV7_CK), K, V] for the backward.
cudaError_t wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                         const void* v, const void* a, const void* b, const float* s0, void* y, float* sT, float* sa,
                         float* ck, bool save, cudaStream_t stream);
cudaError_t wkv7_backward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                          const void* v, const void* a, const void* b, const float* sa, const float* ck,
                          const float* sT, const float* dy, const float* dsT, float* dr, float* dw, float* dk,
                          float* dv, float* da, float* db, float* ds0, cudaStream_t stream);

}  // namespace rwkv_zoo_cuda

namespace rwkv_zoo_cuda {

// wkv7 chunked forward on tensor cores (sm_80+; cudaErrorNotSupported below), head sizes 32 and 64.
// Assumes v7's decay bound, w >= -exp(-0.5) (see wkv7_chunk.cuh). With ck non-null it stores the state
// entering every 16-step chunk there ([B, H, ceil(T / 16), K, V]) for the backward.
cudaError_t wkv7_chunk_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                               const void* v, const void* a, const void* b, const float* s0, void* y, float* sT,
                               float* ck, cudaStream_t stream);
// Its backward (wkv7_chunk_bwd.cuh): gradients fp32, dw per token; needs up to ~150 KiB of shared memory.
cudaError_t wkv7_chunk_backward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                                const void* v, const void* a, const void* b, const float* ck, const float* dy,
                                const float* dsT, float* dr, float* dw, float* dk, float* dv, float* da, float* db,
                                float* ds0, cudaStream_t stream);

}  // namespace rwkv_zoo_cuda
