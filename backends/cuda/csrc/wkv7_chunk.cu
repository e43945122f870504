// Chunked wkv7 forward on tensor cores (sm_80+): fp16 m16n16k16 for the pairwise products inside a
// chunk, tf32 m16n16k8 for the products with the fp32 state; the algorithm and its other phases are in
// wkv7_chunk.cuh. One block of four warps per (batch, head); state in shared memory across chunks.
// The backward (wkv7_chunk_bwd_kernel) recomputes each chunk's forward phases from the state the forward
// stored at its start, then runs wkv7_chunk_bwd.cuh's phases (fp32, CUDA cores). Inputs bf16/fp16
// (fp32 accepted), head sizes 32 and 64.
// Under RWKV_HOST_THREADS (kernels_host.cpp) the two tensor-core phases are replaced by loops with the
// same work split (lane 0 of each warp does the warp's tiles) and the same operand rounding, so the
// rest of the kernel (staging, padding, phases, barriers, output) runs on a CPU.
#include <type_traits>

#ifndef RWKV_HOST_THREADS
#include <mma.h>
#endif

#include "wkv7_chunk.cuh"
#include "wkv7_chunk_bwd.cuh"
#include "wkv_cuda_common.cuh"

namespace rwkv_zoo_cuda {
namespace {

#ifdef RWKV_HOST_THREADS
using half_t = _Float16;
#else
using half_t = __half;
using namespace nvcuda;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define RWKV_C7_TC 1
#endif
#endif

template <int N>
using Smem7 = Chunk7Smem<N, half_t>;

#ifdef RWKV_HOST_THREADS
template <int N>
void c7_products(int warp, Smem7<N>& sm) {
  if (threadIdx.x % 32 != 0) return;
  {
    const half_t* A = (warp < 2) ? &sm.aq[0][0] : &sm.rq[0][0];
    const half_t* Bm = (warp % 2 == 0) ? &sm.bq[0][0] : &sm.kq[0][0];
    for (int t = 0; t < C7_L; ++t)
      for (int s = 0; s < C7_L; ++s) {
        float acc = 0.f;
        for (int j = 0; j < N; ++j) acc += (float)A[t * N + j] * (float)Bm[s * N + j];
        sm.P[warp][t][s] = acc;
      }
  }
  for (int q = warp; q < 2 * (N / 16); q += 4) {
    const int which = q / (N / 16), col = q % (N / 16);
    const float* A = which ? &sm.r0[0][0] : &sm.a0[0][0];
    float* out = which ? &sm.Yq[0][0] : &sm.X[0][0];
    for (int t = 0; t < C7_L; ++t)
      for (int i = 16 * col; i < 16 * col + 16; ++i) {
        float acc = 0.f;
        for (int j = 0; j < N; ++j) acc += c7_round_tf32(A[t * N + j]) * c7_round_tf32(sm.S[j][i]);
        out[t * N + i] = acc;
      }
  }
}

template <int N>
void c7_state_update(int warp, Smem7<N>& sm) {
  if (threadIdx.x % 32 != 0) return;
  for (int q = warp; q < (N / 16) * (N / 16); q += 4) {
    const int rt = q / (N / 16), ct = q % (N / 16);
    for (int j = 16 * rt; j < 16 * rt + 16; ++j)
      for (int i = 16 * ct; i < 16 * ct + 16; ++i) {
        float acc = sm.S[j][i];
        for (int s = 0; s < C7_L; ++s)
          acc += c7_round_tf32(sm.bend[s][j]) * c7_round_tf32(sm.U[s][i]) +
                 c7_round_tf32(sm.kend[s][j]) * c7_round_tf32(sm.v[s][i]);
        sm.S[j][i] = acc;
      }
  }
}
#else

// Phase 3: warp w computes pairwise product w and its share of the X = a0 S, Yq = r0 S tiles.
template <int N>
__device__ void c7_products(int warp, Smem7<N>& sm) {
#ifdef RWKV_C7_TC
  {
    const __half* A = (warp < 2) ? &sm.aq[0][0] : &sm.rq[0][0];
    const __half* Bm = (warp % 2 == 0) ? &sm.bq[0][0] : &sm.kq[0][0];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < N / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;  // Bm^T
      wmma::load_matrix_sync(fa, A + 16 * kk, N);
      wmma::load_matrix_sync(fb, Bm + 16 * kk, N);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(&sm.P[warp][0][0], acc, C7_L, wmma::mem_row_major);
  }
  for (int q = warp; q < 2 * (N / 16); q += 4) {
    const int which = q / (N / 16), col = q % (N / 16);
    const float* A = which ? &sm.r0[0][0] : &sm.a0[0][0];
    float* out = which ? &sm.Yq[0][0] : &sm.X[0][0];
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < N / 8; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, A + 8 * kk, N);
      wmma::load_matrix_sync(fb, &sm.S[8 * kk][16 * col], N);
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + 16 * col, acc, N, wmma::mem_row_major);
  }
#endif
}

// Phase 6: S += bend^T U + kend^T V, tile by tile (S already scaled by e^{G_{L-1}} in phase 5).
template <int N>
__device__ void c7_state_update(int warp, Smem7<N>& sm) {
#ifdef RWKV_C7_TC
  for (int q = warp; q < (N / 16) * (N / 16); q += 4) {
    const int rt = q / (N / 16), ct = q % (N / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::load_matrix_sync(acc, &sm.S[16 * rt][16 * ct], N, wmma::mem_row_major);
    for (int part = 0; part < 2; ++part) {
      const float* L = part ? &sm.kend[0][0] : &sm.bend[0][0];  // [s][j], read as its transpose
      const float* R = part ? &sm.v[0][0] : &sm.U[0][0];        // [s][i]
      for (int kk = 0; kk < C7_L / 8; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, L + 8 * kk * N + 16 * rt, N);
        wmma::load_matrix_sync(fb, R + 8 * kk * N + 16 * ct, N);
        for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
    wmma::store_matrix_sync(&sm.S[16 * rt][16 * ct], acc, N, wmma::mem_row_major);
  }
#endif
}
#endif  // RWKV_HOST_THREADS

template <typename T, int N>
__global__ void __launch_bounds__(C7_THREADS) wkv7_chunk_fwd_kernel(
    int T_, int H, const T* __restrict__ r, const float* __restrict__ w, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b_, const float* __restrict__ s0,
    T* __restrict__ y, float* __restrict__ sT, float* __restrict__ ck) {
#ifdef RWKV_HOST_THREADS
  alignas(128) static unsigned char smem_raw[sizeof(Smem7<N>)];
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
#endif
  Smem7<N>& sm = *reinterpret_cast<Smem7<N>*>(smem_raw);
  const int bh = blockIdx.x, b = bh / H, h = bh % H, tid = threadIdx.x, warp = tid / 32;
  const long so = (long)bh * N * N;
  for (int idx = tid; idx < N * N; idx += C7_THREADS) sm.S[idx / N][idx % N] = s0[so + idx];
  for (int c0 = 0; c0 < T_; c0 += C7_L) {
    const int len = min(C7_L, T_ - c0);
    __syncthreads();
    if (ck != nullptr) {  // the state entering the chunk, for the backward
      float* c = ck + ((long)bh * ((T_ + C7_L - 1) / C7_L) + c0 / C7_L) * N * N;
      for (int idx = tid; idx < N * N; idx += C7_THREADS) c[idx] = sm.S[idx / N][idx % N];
    }
    for (int idx = tid; idx < C7_L * N; idx += C7_THREADS) {
      const int t = idx / N, j = idx % N;
      const bool in = t < len;
      const long o = ((long)(b * T_ + c0 + t) * H + h) * N + j;
      sm.r0[t][j] = in ? to_f(r[o]) : 0.f;
      sm.a0[t][j] = in ? to_f(a[o]) : 0.f;
      sm.bend[t][j] = in ? to_f(b_[o]) : 0.f;
      sm.kend[t][j] = in ? to_f(k[o]) : 0.f;
      sm.v[t][j] = in ? to_f(v[o]) : 0.f;
      sm.g[t][j] = in ? w[o] : 0.f;
    }
    __syncthreads();
    c7_cumsum<N, half_t>(tid, sm);
    __syncthreads();
    c7_scale<N, half_t>(tid, C7_THREADS, sm);
    __syncthreads();
    c7_products<N>(warp, sm);
    __syncthreads();
    c7_solve<N, half_t>(tid, sm);
    __syncthreads();
    c7_output<N, half_t>(tid, C7_THREADS, sm);
    __syncthreads();
    for (int idx = tid; idx < len * N; idx += C7_THREADS) {
      const int t = idx / N, i = idx % N;
      y[((long)(b * T_ + c0 + t) * H + h) * N + i] = from_f<T>(sm.Yq[t][i]);
    }
    c7_state_update<N>(warp, sm);
  }
  __syncthreads();
  for (int idx = tid; idx < N * N; idx += C7_THREADS) sT[so + idx] = sm.S[idx / N][idx % N];
}


// The chunk backward's block products, C[M][Nn] (+)= A B with row- or column-major operands (lda, ldb
// their leading dimensions, ldc = Nn's row stride N). Built with RWKV_C7_BWD_TC=1 they run on tensor
// cores (tf32 m16n16k8, one 16x16 output tile per warp at a time); by default, and always in the CPU
// builds, on CUDA cores (c7_gemm; with RWKV_C7_BWD_TC=1 the CPU build rounds operands to tf32 too).
#ifndef RWKV_C7_BWD_TC
#define RWKV_C7_BWD_TC 0
#endif
template <bool AROW, bool BROW>
__device__ void c7_bwd_gemm(int tid, int M, int Nn, int K, const float* A, int lda, const float* B, int ldb, float* C,
                            int ldc, bool accumulate) {
#if RWKV_C7_BWD_TC && defined(RWKV_C7_TC)
  using LA = typename std::conditional<AROW, wmma::row_major, wmma::col_major>::type;
  using LB = typename std::conditional<BROW, wmma::row_major, wmma::col_major>::type;
  const int warp = tid / 32;
  for (int q = warp; q < (M / 16) * (Nn / 16); q += C7_THREADS / 32) {
    const int mt = q / (Nn / 16), nt = q % (Nn / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    if (accumulate)
      wmma::load_matrix_sync(acc, C + 16 * mt * ldc + 16 * nt, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < K / 8; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> fb;
      wmma::load_matrix_sync(fa, AROW ? A + 16 * mt * lda + 8 * kk : A + 16 * mt + 8 * kk * lda, lda);
      wmma::load_matrix_sync(fb, BROW ? B + 8 * kk * ldb + 16 * nt : B + 8 * kk + 16 * nt * ldb, ldb);
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(C + 16 * mt * ldc + 16 * nt, acc, ldc, wmma::mem_row_major);
  }
#else
  c7_gemm(tid, C7_THREADS, M, Nn, K, A, AROW ? lda : 1, AROW ? 1 : lda, B, BROW ? ldb : 1, BROW ? 1 : ldb, C, ldc,
          accumulate, RWKV_C7_BWD_TC != 0);
#endif
}

// The chunked backward (wkv7_chunk_bwd.cuh): per chunk in reverse, recompute the forward's phases 1-4
// from the checkpointed state, then the backward phases. Scratch reuse: X <- dG of the previous step's
// G, Yq <- dG of the middle step, dU <- dG of the last step, Z <- dw.
template <int N>
struct Smem7Bwd {
  Smem7<N> f;
  Chunk7Grad<N> g;
};

template <typename T, int N>
__global__ void __launch_bounds__(C7_THREADS) wkv7_chunk_bwd_kernel(
    int T_, int H, const T* __restrict__ r, const float* __restrict__ w, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b_, const float* __restrict__ ck,
    const float* __restrict__ dy, const float* __restrict__ dsT, float* __restrict__ dr, float* __restrict__ dw,
    float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ da, float* __restrict__ db,
    float* __restrict__ ds0) {
#ifdef RWKV_HOST_THREADS
  alignas(128) static unsigned char smem_raw[sizeof(Smem7Bwd<N>)];
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
#endif
  Smem7Bwd<N>& all = *reinterpret_cast<Smem7Bwd<N>*>(smem_raw);
  Smem7<N>& sm = all.f;
  Chunk7Grad<N>& gd = all.g;
  const int bh = blockIdx.x, b = bh / H, h = bh % H, tid = threadIdx.x, warp = tid / 32;
  const long so = (long)bh * N * N;
  const int nck = (T_ + C7_L - 1) / C7_L;
  for (int idx = tid; idx < N * N; idx += C7_THREADS) gd.dS[idx / N][idx % N] = dsT[so + idx];
  for (int c = nck - 1; c >= 0; --c) {
    const int c0 = c * C7_L, len = min(C7_L, T_ - c0);
    __syncthreads();
    const float* cks = ck + ((long)bh * nck + c) * N * N;
    for (int idx = tid; idx < N * N; idx += C7_THREADS) sm.S[idx / N][idx % N] = cks[idx];
    for (int idx = tid; idx < C7_L * N; idx += C7_THREADS) {
      const int t = idx / N, j = idx % N;
      const bool in = t < len;
      const long o = ((long)(b * T_ + c0 + t) * H + h) * N + j;
      const float rr = in ? to_f(r[o]) : 0.f, aa = in ? to_f(a[o]) : 0.f, bb = in ? to_f(b_[o]) : 0.f,
                  kk = in ? to_f(k[o]) : 0.f;
      sm.r0[t][j] = gd.raw[0][t][j] = rr;
      sm.a0[t][j] = gd.raw[1][t][j] = aa;
      sm.bend[t][j] = gd.raw[2][t][j] = bb;
      sm.kend[t][j] = gd.raw[3][t][j] = kk;
      sm.v[t][j] = in ? to_f(v[o]) : 0.f;
      sm.g[t][j] = in ? w[o] : 0.f;
      gd.dY[t][j] = in ? dy[o] : 0.f;
    }
    __syncthreads();
    c7_cumsum<N, half_t>(tid, sm);
    __syncthreads();
    c7_scale<N, half_t>(tid, C7_THREADS, sm);
    __syncthreads();
    c7_products<N>(warp, sm);
    __syncthreads();
    c7_solve<N, half_t>(tid, sm);
    __syncthreads();
    c7_bwd_gemm<true, true>(tid, C7_L, N, N, &sm.bend[0][0], N, &gd.dS[0][0], N, &gd.dU[0][0], N, false);
    c7_bwd_gemm<true, true>(tid, C7_L, N, N, &sm.kend[0][0], N, &gd.dS[0][0], N, &gd.dV[0][0], N, false);
    c7_bwd_gemm<true, false>(tid, C7_L, N, N, &sm.U[0][0], N, &gd.dS[0][0], N, &gd.d0[1][0][0], N, false);
    c7_bwd_gemm<true, false>(tid, C7_L, N, N, &sm.v[0][0], N, &gd.dS[0][0], N, &gd.d0[3][0][0], N, false);
    c7b_from_outputs<N, half_t>(tid, C7_THREADS, sm, gd);
    __syncthreads();
    c7b_solve<N, half_t>(tid, sm, gd);
    __syncthreads();
    c7b_pairs<N, half_t>(tid, C7_THREADS, sm, gd);
    c7_bwd_gemm<true, false>(tid, C7_L, N, N, &gd.Z[0][0], N, &sm.S[0][0], N, &gd.d0[0][0][0], N, false);
    c7_bwd_gemm<true, false>(tid, C7_L, N, N, &gd.dY[0][0], N, &sm.S[0][0], N, &gd.d0[2][0][0], N, false);
    __syncthreads();
    c7b_state_and_operands<N, half_t>(tid, C7_THREADS, sm, gd);
    __syncthreads();
    c7_bwd_gemm<false, true>(tid, N, N, C7_L, &sm.a0[0][0], N, &gd.Z[0][0], N, &gd.dS[0][0], N, true);
    c7_bwd_gemm<false, true>(tid, N, N, C7_L, &sm.r0[0][0], N, &gd.dY[0][0], N, &gd.dS[0][0], N, true);
    __syncthreads();
    c7b_elementwise<N, half_t>(tid, C7_THREADS, sm, gd, &gd.raw[0][0][0], &gd.raw[1][0][0], &gd.raw[2][0][0],
                               &gd.raw[3][0][0], &gd.raw[0][0][0], &gd.raw[1][0][0], &gd.raw[2][0][0],
                               &gd.raw[3][0][0], &sm.X[0][0], &sm.Yq[0][0], &gd.dU[0][0]);
    __syncthreads();
    c7b_decay<N, half_t>(tid, gd, &sm.X[0][0], &sm.Yq[0][0], &gd.dU[0][0], &gd.Z[0][0]);
    __syncthreads();
    for (int idx = tid; idx < len * N; idx += C7_THREADS) {
      const int t = idx / N, j = idx % N;
      const long o = ((long)(b * T_ + c0 + t) * H + h) * N + j;
      dr[o] = gd.raw[0][t][j];
      da[o] = gd.raw[1][t][j];
      db[o] = gd.raw[2][t][j];
      dk[o] = gd.raw[3][t][j];
      dv[o] = gd.dV[t][j];
      dw[o] = gd.Z[t][j];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < N * N; idx += C7_THREADS) ds0[so + idx] = gd.dS[idx / N][idx % N];
}

}  // namespace

#ifndef RWKV_HOST_THREADS  // the launcher: CUDA only

cudaError_t wkv7_chunk_forward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                               const void* v, const void* a, const void* b, const float* s0, void* y, float* sT,
                               float* ck, cudaStream_t stream) {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < 8) return cudaErrorNotSupported;  // tf32 / this wmma use needs sm_80
  RWKV_DISPATCH_DTYPE(dtype, switch (N) {
    case 32: {
      constexpr int NN = 32;
      auto kern = wkv7_chunk_fwd_kernel<scalar_t, NN>;
      const int bytes = sizeof(Smem7<NN>);
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      kern<<<B * H, C7_THREADS, bytes, stream>>>(T, H, (const scalar_t*)r, w, (const scalar_t*)k,
                                                 (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b, s0,
                                                 (scalar_t*)y, sT, ck);
      break;
    }
    case 64: {
      constexpr int NN = 64;
      auto kern = wkv7_chunk_fwd_kernel<scalar_t, NN>;
      const int bytes = sizeof(Smem7<NN>);
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      kern<<<B * H, C7_THREADS, bytes, stream>>>(T, H, (const scalar_t*)r, w, (const scalar_t*)k,
                                                 (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b, s0,
                                                 (scalar_t*)y, sT, ck);
      break;
    }
    default:
      return cudaErrorInvalidValue;
  })
  return cudaGetLastError();
}


cudaError_t wkv7_chunk_backward(int dtype, int B, int T, int H, int N, const void* r, const float* w, const void* k,
                                const void* v, const void* a, const void* b, const float* ck, const float* dy,
                                const float* dsT, float* dr, float* dw, float* dk, float* dv, float* da, float* db,
                                float* ds0, cudaStream_t stream) {
  RWKV_DISPATCH_DTYPE(dtype, switch (N) {
    case 32: {
      constexpr int NN = 32;
      auto kern = wkv7_chunk_bwd_kernel<scalar_t, NN>;
      const int bytes = sizeof(Smem7Bwd<NN>);
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      kern<<<B * H, C7_THREADS, bytes, stream>>>(T, H, (const scalar_t*)r, w, (const scalar_t*)k,
                                                 (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b, ck, dy,
                                                 dsT, dr, dw, dk, dv, da, db, ds0);
      break;
    }
    case 64: {
      constexpr int NN = 64;
      auto kern = wkv7_chunk_bwd_kernel<scalar_t, NN>;
      const int bytes = sizeof(Smem7Bwd<NN>);
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      kern<<<B * H, C7_THREADS, bytes, stream>>>(T, H, (const scalar_t*)r, w, (const scalar_t*)k,
                                                 (const scalar_t*)v, (const scalar_t*)a, (const scalar_t*)b, ck, dy,
                                                 dsT, dr, dw, dk, dv, da, db, ds0);
      break;
    }
    default:
      return cudaErrorInvalidValue;
  })
  return cudaGetLastError();
}

#endif

}  // namespace rwkv_zoo_cuda
