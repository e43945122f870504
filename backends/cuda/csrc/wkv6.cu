// wkv5 / wkv6 recurrent kernels: one block per (batch, head), N threads, fp32 state in registers.
//
// Forward: thread i owns value column i of S [K, V] (N floats); each step the block stages r, k and
// exp(w) in shared memory. wkv5 is the same kernel with the decay's batch and time strides 0.
// Backward: one kernel, two passes, no division by the decay (exact under any decay strength):
//   pass 1, forward in time, thread j owns key row j of S, rebuilt from s0: dr, du, and the row at the
//           start of every 16-step chunk into a scratch buffer (the backward's only extra memory);
//   pass 2, backward in time, thread x owns key row x and value column x of dS: dk, dv, ds0, and
//           dw_t = exp(w_t) (dS_t . S_{t-1}) per key row, S_{t-1} rebuilt forward from the chunk's
//           checkpoint (at most 15 row updates, on average 7.5: the price of exactness in O(T / 16) memory).
#include "wkv_cuda_common.cuh"

namespace rwkv_zoo_cuda {
namespace {

template <typename T, int N>
__global__ void __launch_bounds__(N) wkv6_fwd_kernel(int T_, int H, const T* __restrict__ r, const T* __restrict__ k,
                                                     const T* __restrict__ v, const float* __restrict__ w, long w_sb,
                                                     long w_st, const float* __restrict__ u,
                                                     const float* __restrict__ s0, T* __restrict__ y,
                                                     float* __restrict__ sT) {
  constexpr int CK = WKV6_CK;
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  // A chunk of CK steps is staged at once: one pair of barriers per chunk, and the loads of CK steps
  // in flight together instead of one step's. (Not unrolled over the chunk: compile time and code size.)
  __shared__ float cr[CK][N], ck_[CK][N], cew[CK][N], cv[CK][N], su[N];
  const long so = (long)bh * N * N;
  float s[N];
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) s[j] = s0[so + j * N + i];
  su[i] = u[h * N + i];
  const float* wp = w + (long)b * w_sb + h * N + i;
  for (int c0 = 0; c0 < T_; c0 += CK) {
    const int len = min(CK, T_ - c0);
    __syncthreads();  // every thread is done with the previous chunk
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + i;
      cr[q][i] = to_f(r[o]);
      ck_[q][i] = to_f(k[o]);
      cew[q][i] = expf(wp[(long)(c0 + q) * w_st]);
      cv[q][i] = to_f(v[o]);
    }
    __syncthreads();
#pragma unroll 1
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + i;
      y[o] = from_f<T>(wkv6_fwd_step<N>(s, cr[q], ck_[q], cew[q], su, cv[q][i]));
    }
  }
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) sT[so + j * N + i] = s[j];
}

// ck: scratch [B, H, ceil(T / CK), K, V] for the key rows of the state entering every CK-th step.
template <typename T, int N>
__global__ void __launch_bounds__(N) wkv6_bwd_kernel(int T_, int H, const T* __restrict__ r, const T* __restrict__ k,
                                                     const T* __restrict__ v, const float* __restrict__ w, long w_sb,
                                                     long w_st, const float* __restrict__ u,
                                                     const float* __restrict__ s0, const float* __restrict__ dy,
                                                     const float* __restrict__ dsT, float* __restrict__ dr,
                                                     float* __restrict__ dk, float* __restrict__ dv,
                                                     float* __restrict__ dw, float* __restrict__ du,
                                                     float* __restrict__ ds0, float* __restrict__ ck) {
  constexpr int CK = WKV6_CK;
  const int bh = blockIdx.x, b = bh / H, h = bh % H, tid = threadIdx.x;
  __shared__ float cr[CK][N], ckk[CK][N], cv[CK][N], cdy[CK][N], cew[CK][N], su[N];
  const long so = (long)bh * N * N;
  const int nck = (T_ + CK - 1) / CK;
  const float* wp = w + (long)b * w_sb + h * N + tid;
  su[tid] = u[h * N + tid];
  {
    // Pass 1: key row tid of S, forward in time, a staged chunk at a time; the row at every chunk
    // start goes to the checkpoint scratch.
    float s[N];
    RWKV_UNROLL
    for (int x = 0; x < N; ++x) s[x] = s0[so + tid * N + x];
    const float uj = u[h * N + tid];
    float du_j = 0.f;
    for (int c = 0; c < nck; ++c) {
      const int c0 = c * CK, len = min(CK, T_ - c0);
      float* row = ck + (((long)bh * nck + c) * N + tid) * N;
      RWKV_UNROLL
      for (int x = 0; x < N; ++x) row[x] = s[x];
      __syncthreads();
      for (int q = 0; q < len; ++q) {
        const long o = ((long)(b * T_ + c0 + q) * H + h) * N + tid;
        cr[q][tid] = to_f(r[o]);
        ckk[q][tid] = to_f(k[o]);
        cv[q][tid] = to_f(v[o]);
        cdy[q][tid] = dy[o];
        cew[q][tid] = expf(wp[(long)(c0 + q) * w_st]);
      }
      __syncthreads();
#pragma unroll 1
      for (int q = 0; q < len; ++q) {
        float dr_j;
        wkv6_bwd_fwd_step<N>(s, cr[q][tid], ckk[q][tid], cew[q][tid], uj, cv[q], cdy[q], dr_j, du_j);
        dr[((long)(b * T_ + c0 + q) * H + h) * N + tid] = dr_j;
      }
    }
    du[(long)bh * N + tid] = du_j;
  }
  // Pass 2: key row and value column tid of dS, backward in time, one staged chunk at a time.
  float dsk[N], dsv[N], p[N];
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) {
    dsk[x] = dsT[so + tid * N + x];
    dsv[x] = dsT[so + x * N + tid];
  }
  for (int c = nck - 1; c >= 0; --c) {
    const int c0 = c * CK, len = min(CK, T_ - c0);
    __syncthreads();
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + tid;
      cr[q][tid] = to_f(r[o]);
      ckk[q][tid] = to_f(k[o]);
      cv[q][tid] = to_f(v[o]);
      cdy[q][tid] = dy[o];
      cew[q][tid] = expf(wp[(long)(c0 + q) * w_st]);
    }
    __syncthreads();
    const float* row = ck + (((long)bh * nck + c) * N + tid) * N;
#pragma unroll 1
    for (int q = len - 1; q >= 0; --q) {
      // S_{t-1}[tid, :]: the chunk's checkpoint advanced through the chunk's earlier steps.
      RWKV_UNROLL
      for (int x = 0; x < N; ++x) p[x] = row[x];
#pragma unroll 1
      for (int e = 0; e < q; ++e) wkv6_advance_row<N>(p, cew[e][tid], ckk[e][tid], cv[e]);
      float dk_j, dv_i, dw_j;
      wkv6_bwd_back_step<N>(dsk, dsv, p, tid, cr[q], ckk[q], cew[q], su, cv[q], cdy[q], dk_j, dv_i, dw_j);
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + tid;
      dk[o] = dk_j;
      dv[o] = dv_i;
      dw[o] = dw_j;
    }
  }
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) ds0[so + tid * N + x] = dsk[x];
}

}  // namespace

#ifndef RWKV_HOST_THREADS  // the launchers: CUDA only

cudaError_t wkv6_forward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                         const float* w, long w_sb, long w_st, const float* u, const float* s0, void* y, float* sT,
                         cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, RWKV_DISPATCH_N(N, (wkv6_fwd_kernel<scalar_t, NN><<<B * H, NN, 0, stream>>>(
      T, H, (const scalar_t*)r, (const scalar_t*)k, (const scalar_t*)v, w, w_sb, w_st, u, s0, (scalar_t*)y, sT))))
  return cudaGetLastError();
}

cudaError_t wkv6_backward(int dtype, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                          const float* w, long w_sb, long w_st, const float* u, const float* s0, const float* dy,
                          const float* dsT, float* dr, float* dk, float* dv, float* dw, float* du, float* ds0,
                          float* ck, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, RWKV_DISPATCH_N(N, (wkv6_bwd_kernel<scalar_t, NN><<<B * H, NN, 0, stream>>>(
      T, H, (const scalar_t*)r, (const scalar_t*)k, (const scalar_t*)v, w, w_sb, w_st, u, s0, dy, dsT, dr, dk, dv, dw, du, ds0, ck))))
  return cudaGetLastError();
}

#endif

}  // namespace rwkv_zoo_cuda
