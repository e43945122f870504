// wkv7 recurrent kernels (fp32 state): one block per (batch, head), N threads.
//
// Forward: thread i owns value column i of S [K, V] in registers; each step stages r, exp(w), k, a, b in
// shared memory. With save it also writes sa = a_t^T S_{t-1} (fp32) and the state entering every
// WKV7_CK-th step, which is all the backward needs.
// Backward, backward in time: thread x owns key row x of S_t and of dS, and value column x of dS (3N
// registers). S_{t-1} comes from a checkpoint at chunk starts and otherwise from inverting the update
// (S_{t-1} = (S_t - k v^T - b sa^T) diag(exp(-w))), so rounding is amplified over at most WKV7_CK - 1
// steps by at most exp(-w) per step: tame for v7's decay (>= 0.545), not for arbitrarily strong decay.
#include "wkv_cuda_common.cuh"

namespace rwkv_zoo_cuda {
namespace {

template <typename T, int N>
__global__ void __launch_bounds__(N) wkv7_fwd_kernel(int T_, int H, const T* __restrict__ r, const float* __restrict__ w,
                                                     const T* __restrict__ k, const T* __restrict__ v,
                                                     const T* __restrict__ a, const T* __restrict__ b_,
                                                     const float* __restrict__ s0, T* __restrict__ y,
                                                     float* __restrict__ sT, float* __restrict__ sa,
                                                     float* __restrict__ ck, bool save) {
  constexpr int CK = WKV7_CK;
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  // A chunk of CK steps is staged at once (the loads of CK steps in flight together, one pair of
  // barriers per chunk); chunks coincide with the backward's checkpoints. 6 * CK * N floats: 48 KiB at N = 128.
  __shared__ float cr[CK][N], cew[CK][N], ck_[CK][N], ca[CK][N], cb[CK][N], cv[CK][N];
  const long so = (long)bh * N * N;
  const int nck = (T_ + CK - 1) / CK;
  float s[N];
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) s[j] = s0[so + j * N + i];
  for (int c0 = 0; c0 < T_; c0 += CK) {
    const int len = min(CK, T_ - c0);
    if (save) {  // the state entering step c0
      float* c = ck + ((long)bh * nck + c0 / CK) * N * N;
      RWKV_UNROLL
      for (int j = 0; j < N; ++j) c[j * N + i] = s[j];
    }
    __syncthreads();  // every thread is done with the previous chunk
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + i;
      cr[q][i] = to_f(r[o]);
      cew[q][i] = expf(w[o]);
      ck_[q][i] = to_f(k[o]);
      ca[q][i] = to_f(a[o]);
      cb[q][i] = to_f(b_[o]);
      cv[q][i] = to_f(v[o]);
    }
    __syncthreads();
#pragma unroll 1
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + i;
      float sai;
      y[o] = from_f<T>(wkv7_fwd_step<N>(s, cr[q], cew[q], ck_[q], ca[q], cb[q], cv[q][i], sai));
      if (save) sa[o] = sai;
    }
  }
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) sT[so + j * N + i] = s[j];
}

template <typename T, int N>
__global__ void __launch_bounds__(N) wkv7_bwd_kernel(int T_, int H, const T* __restrict__ r, const float* __restrict__ w,
                                                     const T* __restrict__ k, const T* __restrict__ v,
                                                     const T* __restrict__ a, const T* __restrict__ b_,
                                                     const float* __restrict__ sa, const float* __restrict__ ck,
                                                     const float* __restrict__ sT, const float* __restrict__ dy,
                                                     const float* __restrict__ dsT, float* __restrict__ dr,
                                                     float* __restrict__ dw, float* __restrict__ dk,
                                                     float* __restrict__ dv, float* __restrict__ da,
                                                     float* __restrict__ db, float* __restrict__ ds0) {
  // Staged blocks of SL steps (9 * SL * N floats of shared memory: 36 KiB for N = 64 and N = 128).
  constexpr int SL = N <= 64 ? 16 : 8;
  const int bh = blockIdx.x, b = bh / H, h = bh % H, x = threadIdx.x;
  __shared__ float cr[SL][N], cew[SL][N], ciew[SL][N], ck_[SL][N], ca[SL][N], cb[SL][N], cv[SL][N], cdy[SL][N],
      csa[SL][N];
  __shared__ float sdsa[2][N];  // double-buffered by step parity: one barrier per step instead of two
  const long so = (long)bh * N * N;
  const int nck = (T_ + WKV7_CK - 1) / WKV7_CK;
  float skr[N], dsk[N], dsv[N];
  RWKV_UNROLL
  for (int q = 0; q < N; ++q) {
    skr[q] = sT[so + x * N + q];
    dsk[q] = dsT[so + x * N + q];
    dsv[q] = dsT[so + q * N + x];
  }
  for (int c0 = ((T_ - 1) / SL) * SL; c0 >= 0; c0 -= SL) {
    const int len = min(SL, T_ - c0);
    __syncthreads();  // every thread is done with the previous block's staged steps
    for (int q = 0; q < len; ++q) {
      const long o = ((long)(b * T_ + c0 + q) * H + h) * N + x;
      const float wx = w[o];
      cr[q][x] = to_f(r[o]);
      cew[q][x] = expf(wx);
      ciew[q][x] = expf(-wx);
      ck_[q][x] = to_f(k[o]);
      ca[q][x] = to_f(a[o]);
      cb[q][x] = to_f(b_[o]);
      cv[q][x] = to_f(v[o]);
      cdy[q][x] = dy[o];
      csa[q][x] = sa[o];
    }
    __syncthreads();
#pragma unroll 1
    for (int q = len - 1; q >= 0; --q) {
      const int t = c0 + q;
      const long o = ((long)(b * T_ + t) * H + h) * N + x;
      float dr_j, dv_i, dsa_i;
      wkv7_bwd_step1<N>(skr, dsk, dsv, x, cr[q], ck_[q], cb[q], cdy[q], dr_j, dv_i, dsa_i);
      dr[o] = dr_j;
      dv[o] = dv_i;
      sdsa[t & 1][x] = dsa_i;
      __syncthreads();
      const bool have = t % WKV7_CK == 0;
      const float* prev = ck + (((long)bh * nck + t / WKV7_CK) * N + x) * N;
      float dk_j, dw_j, da_j, db_j;
      wkv7_bwd_step2<N>(skr, prev, have, dsk, dsv, x, cew[q], ciew[q], ck_[q], cv[q], ca[q], cb[q], csa[q],
                        sdsa[t & 1], dk_j, dw_j, da_j, db_j);
      dk[o] = dk_j;
      dw[o] = dw_j;
      da[o] = da_j;
      db[o] = db_j;
    }
  }
  RWKV_UNROLL
  for (int q = 0; q < N; ++q) ds0[so + x * N + q] = dsk[q];
}

}  // namespace

#ifndef RWKV_HOST_THREADS  // the launchers: CUDA only

cudaError_t wkv7_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                         const void* v, const void* a, const void* b, const float* s0, void* y, float* sT, float* sa,
                         float* ck, bool save, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, RWKV_DISPATCH_N(N, (wkv7_fwd_kernel<scalar_t, NN><<<B * H, NN, 0, stream>>>(
      T, H, (const scalar_t*)r, w, (const scalar_t*)k, (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b,
      s0, (scalar_t*)y, sT, sa, ck, save))))
  return cudaGetLastError();
}

cudaError_t wkv7_backward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                          const void* v, const void* a, const void* b, const float* sa, const float* ck,
                          const float* sT, const float* dy, const float* dsT, float* dr, float* dw, float* dk,
                          float* dv, float* da, float* db, float* ds0, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, RWKV_DISPATCH_N(N, (wkv7_bwd_kernel<scalar_t, NN><<<B * H, NN, 0, stream>>>(
      T, H, (const scalar_t*)r, w, (const scalar_t*)k, (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b,
      sa, ck, sT, dy, dsT, dr, dw, dk, dv, da, db, ds0))))
  return cudaGetLastError();
}

#endif

}  // namespace rwkv_zoo_cuda
