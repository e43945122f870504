// Matrix-vector products for CPU decode: y[b, n] = scale[n] * sum_k x[b, k] * W[n, k], for a few rows
// of x (b < B, decode batch) and weights stored [N, K] in fp32, bf16 or int8 (one scale per output row).
//
// Why our own: decode reads every weight once per token, so it is bound by memory bandwidth. torch's
// fp32 GEMV here reaches about half of the DRAM read rate, its bf16 path converts slowly, and its CPU
// int8 weight-only matmul is slower than fp32. These loops stream each weight row once, widen it to
// fp32 in registers (bf16: a 16-bit shift; int8: sign-extend and convert), and multiply it with every
// row of x while it sits in L1, accumulating in fp32. AVX2 + FMA; compiled at first use
// (rwkv_zoo/cpu_kernels.py), called through ctypes, no torch headers.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));  // bf16 is the top half of an fp32
}
inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
inline float widen(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// R weight rows times BT rows of x: R * BT independent accumulators hide the FMA latency.
template <int R, int BT, typename WT>
inline void tile(const float* x, int64_t ldx, const WT* W, int64_t K, const float* scale, int64_t n, float* y,
                 int64_t ldy) {
    __m256 acc[R][BT];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_ps();
    const int64_t K8 = K & ~int64_t(7);
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 xs[BT];
        for (int b = 0; b < BT; ++b) xs[b] = _mm256_loadu_ps(x + b * ldx + k);
        for (int r = 0; r < R; ++r) {
            __m256 w = load8(W + (n + r) * K + k);
            for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_fmadd_ps(w, xs[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float s = scale ? scale[n + r] : 1.0f;
        for (int b = 0; b < BT; ++b) {
            float sum = hsum(acc[r][b]);
            for (int64_t k = K8; k < K; ++k) sum += widen(W[(n + r) * K + k]) * x[b * ldx + k];
            y[b * ldy + n + r] = sum * s;
        }
    }
}

// Rows [n0, n1) of the output for BT rows of x.
template <int BT, typename WT>
void rows(const float* x, int64_t ldx, const WT* W, int64_t K, const float* scale, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
    constexpr int R = BT <= 2 ? 4 : (BT <= 4 ? 2 : 1);
    int64_t n = n0;
    for (; n + R <= n1; n += R) tile<R, BT>(x, ldx, W, K, scale, n, y, ldy);
    for (; n < n1; ++n) tile<1, BT>(x, ldx, W, K, scale, n, y, ldy);
}

template <typename WT>
void gemv(const float* x, int64_t B, int64_t K, int64_t ldx, const WT* W, const float* scale, int64_t N, float* y,
          int64_t ldy, int nthreads) {
    // Static split of the output rows: each thread streams one contiguous slab of W (prefetch-friendly),
    // and a slab is a multiple of 8 rows so tiles do not straddle threads.
    const int64_t blocks = (N + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * 8, n1 = n0 + 8 < N ? n0 + 8 : N;
        for (int64_t b = 0; b < B; b += 8) {
            const int64_t bt = B - b < 8 ? B - b : 8;
            const float* xb = x + b * ldx;
            float* yb = y + b * ldy;
            switch (bt) {
                case 1: rows<1>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 2: rows<2>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 3: rows<3>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 4: rows<4>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 5: rows<5>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 6: rows<6>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                case 7: rows<7>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
                default: rows<8>(xb, ldx, W, K, scale, n0, n1, yb, ldy); break;
            }
        }
    }
}

}  // namespace

extern "C" {

int rz_abi_version() { return 1; }

void rz_gemv_f32(const float* x, int64_t B, int64_t K, int64_t ldx, const float* W, int64_t N, float* y, int64_t ldy,
                 int nthreads) {
    gemv(x, B, K, ldx, W, nullptr, N, y, ldy, nthreads);
}

void rz_gemv_bf16(const float* x, int64_t B, int64_t K, int64_t ldx, const uint16_t* W, int64_t N, float* y,
                  int64_t ldy, int nthreads) {
    gemv(x, B, K, ldx, W, nullptr, N, y, ldy, nthreads);
}

void rz_gemv_i8(const float* x, int64_t B, int64_t K, int64_t ldx, const int8_t* W, const float* scale, int64_t N,
                float* y, int64_t ldy, int nthreads) {
    gemv(x, B, K, ldx, W, scale, N, y, ldy, nthreads);
}

}  // extern "C"
