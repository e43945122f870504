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
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ float sr[N], sew[N], sk[N], sa_[N], sb[N];
  const long so = (long)bh * N * N;
  const int nck = (T_ + WKV7_CK - 1) / WKV7_CK;
  float s[N];
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) s[j] = s0[so + j * N + i];
  for (int t = 0; t < T_; ++t) {
    const long o = ((long)(b * T_ + t) * H + h) * N + i;
    if (save && t % WKV7_CK == 0) {
      float* c = ck + ((long)bh * nck + t / WKV7_CK) * N * N;
      RWKV_UNROLL
      for (int j = 0; j < N; ++j) c[j * N + i] = s[j];
    }
    __syncthreads();
    sr[i] = to_f(r[o]);
    sew[i] = expf(w[o]);
    sk[i] = to_f(k[o]);
    sa_[i] = to_f(a[o]);
    sb[i] = to_f(b_[o]);
    const float vi = to_f(v[o]);
    __syncthreads();
    float sai;
    y[o] = from_f<T>(wkv7_fwd_step<N>(s, sr, sew, sk, sa_, sb, vi, sai));
    if (save) sa[o] = sai;
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
  const int bh = blockIdx.x, b = bh / H, h = bh % H, x = threadIdx.x;
  __shared__ float sr[N], sew[N], siew[N], sk[N], sa_[N], sb[N], sv[N], sdy[N], ssa[N], sdsa[N];
  const long so = (long)bh * N * N;
  const int nck = (T_ + WKV7_CK - 1) / WKV7_CK;
  float skr[N], dsk[N], dsv[N];
  RWKV_UNROLL
  for (int q = 0; q < N; ++q) {
    skr[q] = sT[so + x * N + q];
    dsk[q] = dsT[so + x * N + q];
    dsv[q] = dsT[so + q * N + x];
  }
  for (int t = T_ - 1; t >= 0; --t) {
    const long o = ((long)(b * T_ + t) * H + h) * N + x;
    __syncthreads();
    sr[x] = to_f(r[o]);
    const float wx = w[o];
    sew[x] = expf(wx);
    siew[x] = expf(-wx);
    sk[x] = to_f(k[o]);
    sa_[x] = to_f(a[o]);
    sb[x] = to_f(b_[o]);
    sv[x] = to_f(v[o]);
    sdy[x] = dy[o];
    ssa[x] = sa[o];
    __syncthreads();
    float dr_j, dv_i, dsa_i;
    wkv7_bwd_step1<N>(skr, dsk, dsv, x, sr, sk, sb, sdy, dr_j, dv_i, dsa_i);
    dr[o] = dr_j;
    dv[o] = dv_i;
    sdsa[x] = dsa_i;
    __syncthreads();
    const bool have = t % WKV7_CK == 0;
    const float* prev = ck + (((long)bh * nck + t / WKV7_CK) * N + x) * N;
    float dk_j, dw_j, da_j, db_j;
    wkv7_bwd_step2<N>(skr, prev, have, dsk, dsv, x, sew, siew, sk, sv, sa_, sb, ssa, sdsa, dk_j, dw_j, da_j, db_j);
    dk[o] = dk_j;
    dw[o] = dw_j;
    da[o] = da_j;
    db[o] = db_j;
  }
  RWKV_UNROLL
  for (int q = 0; q < N; ++q) ds0[so + x * N + q] = dsk[q];
}

}  // namespace

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

}  // namespace rwkv_zoo_cuda
