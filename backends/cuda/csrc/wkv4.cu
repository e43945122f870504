// wkv4 kernels: one thread per (batch, channel), the numerically stable running-maximum recurrence.
// The state (a, b, p) comes in and goes out in fp32; nothing depends on T at compile time. With save,
// the forward writes the state entering every step ([B, T, C] x 3, fp32), and the backward walks back
// through it with the exact chain rule of the forward's operations (wkv_math.cuh, wkv4_bwd_step).
#include "wkv_cuda_common.cuh"

namespace rwkv_zoo_cuda {
namespace {

constexpr int kThreads4 = 128;

template <typename T>
__global__ void wkv4_fwd_kernel(int B, int T_, int C, const float* __restrict__ w, const float* __restrict__ u,
                                const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ a0,
                                const float* __restrict__ b0, const float* __restrict__ p0, T* __restrict__ y,
                                float* __restrict__ aT, float* __restrict__ bT, float* __restrict__ pT,
                                float* __restrict__ sa, float* __restrict__ sb, float* __restrict__ sp, bool save) {
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long)B * C) return;
  const int b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float A = a0[idx], Bs = b0[idx], P = p0[idx];
  for (int t = 0; t < T_; ++t) {
    const long o = ((long)b * T_ + t) * C + c;  // consecutive threads read consecutive channels
    if (save) {
      sa[o] = A;
      sb[o] = Bs;
      sp[o] = P;
    }
    y[o] = from_f<T>(wkv4_fwd_step(A, Bs, P, wc, uc, to_f(k[o]), to_f(v[o])));
  }
  aT[idx] = A;
  bT[idx] = Bs;
  pT[idx] = P;
}

template <typename T>
__global__ void wkv4_bwd_kernel(int B, int T_, int C, const float* __restrict__ w, const float* __restrict__ u,
                                const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ sa,
                                const float* __restrict__ sb, const float* __restrict__ sp,
                                const float* __restrict__ dy, const float* __restrict__ daT,
                                const float* __restrict__ dbT, const float* __restrict__ dpT, float* __restrict__ dk,
                                float* __restrict__ dv, float* __restrict__ dw, float* __restrict__ du,
                                float* __restrict__ da0, float* __restrict__ db0, float* __restrict__ dp0) {
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long)B * C) return;
  const int b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float ga = daT[idx], gb = dbT[idx], gp = dpT[idx], gw = 0.f, gu = 0.f;
  for (int t = T_ - 1; t >= 0; --t) {
    const long o = ((long)b * T_ + t) * C + c;
    float dk_t, dv_t;
    wkv4_bwd_step(sa[o], sb[o], sp[o], wc, uc, to_f(k[o]), to_f(v[o]), dy[o], ga, gb, gp, gw, gu, dk_t, dv_t);
    dk[o] = dk_t;
    dv[o] = dv_t;
  }
  da0[idx] = ga;
  db0[idx] = gb;
  dp0[idx] = gp;
  dw[idx] = gw;
  du[idx] = gu;
}

unsigned blocks4(int B, int C) { return (unsigned)(((long)B * C + kThreads4 - 1) / kThreads4); }

}  // namespace

#ifndef RWKV_HOST_THREADS  // the launchers: CUDA only

cudaError_t wkv4_forward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                         const void* v, const float* a0, const float* b0, const float* p0, void* y, float* aT,
                         float* bT, float* pT, float* sa, float* sb, float* sp, bool save, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, (wkv4_fwd_kernel<scalar_t><<<blocks4(B, C), kThreads4, 0, stream>>>(
      B, T, C, w, u, (const scalar_t*)k, (const scalar_t*)v, a0, b0, p0, (scalar_t*)y, aT, bT, pT, sa, sb, sp,
      save)))
  return cudaGetLastError();
}

cudaError_t wkv4_backward(int dtype, int B, int T, int C, const float* w, const float* u, const void* k,
                          const void* v, const float* sa, const float* sb, const float* sp, const float* dy,
                          const float* daT, const float* dbT, const float* dpT, float* dk, float* dv, float* dw,
                          float* du, float* da0, float* db0, float* dp0, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, (wkv4_bwd_kernel<scalar_t><<<blocks4(B, C), kThreads4, 0, stream>>>(
      B, T, C, w, u, (const scalar_t*)k, (const scalar_t*)v, sa, sb, sp, dy, daT, dbT, dpT, dk, dv, dw, du, da0,
      db0, dp0)))
  return cudaGetLastError();
}

#endif

}  // namespace rwkv_zoo_cuda
