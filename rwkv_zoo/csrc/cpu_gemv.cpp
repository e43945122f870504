// Matrix-vector products for CPU decode: y[b, n] = scale[n] * sum_k x[b, k] * W[n, k], for a few rows
// of x (b < B, decode batch) and weights in fp32, bf16 or int8 (one scale per output row).
//
// Why our own: decode reads every weight once per token, so it is bound by memory bandwidth. torch's
// fp32 GEMV here reaches about half of the DRAM read rate, its bf16 path converts slowly, and its CPU
// int8 weight-only matmul is slower than fp32. These loops stream the weights once, widen them to fp32
// in registers (bf16: a 16-bit shift; int8: sign-extend and convert), and multiply them with every
// row of x while they sit in L1, accumulating in fp32. AVX2 + FMA; compiled at first use
// (rwkv_zoo/cpu_kernels.py), called through ctypes, no torch headers.
//
// Layout: weights are packed in tiles of 4 output rows, [N / 4, K / 8, 4, 8] (N padded to a multiple
// of 4 with zero rows, K a multiple of 8): a tile is one contiguous run that the kernel reads strictly
// in order, which the hardware prefetcher follows much better than four interleaved row streams
// (int8: 1.6x faster on one core here). rwkv_zoo.inference packs them once when a model is prepared.
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

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One tile (4 output rows) times BT rows of x: 4 * BT independent accumulators.
template <int BT, typename WT>
inline void tile(const float* x, int64_t ldx, const WT* p, int64_t K, const float* scale, float* y, int64_t ldy) {
    __m256 acc[4][BT];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8, p += 32) {
        __m256 xs[BT];
        for (int b = 0; b < BT; ++b) xs[b] = _mm256_loadu_ps(x + b * ldx + k);
        for (int r = 0; r < 4; ++r) {
            const __m256 w = load8(p + 8 * r);
            for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_fmadd_ps(w, xs[b], acc[r][b]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        const float s = scale ? scale[r] : 1.0f;
        for (int b = 0; b < BT; ++b) y[b * ldy + r] = hsum(acc[r][b]) * s;
    }
}

template <typename WT>
void gemv(const float* x, int64_t B, int64_t K, int64_t ldx, const WT* W, const float* scale, int64_t N, float* y,
          int64_t ldy, int nthreads) {
    const int64_t tiles = N / 4;
    // Dynamic chunks of tiles: on a shared machine one thread can lose its core for a time slice, and
    // a static split would make the other wait for it at the end.
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t t = 0; t < tiles; ++t) {
        const WT* p = W + t * 4 * K;
        const float* s = scale ? scale + 4 * t : nullptr;
        int64_t b = 0;
        // Pairs of x rows share each weight load; the tile (4 K elements) stays in L1/L2 between pairs.
        for (; b + 2 <= B; b += 2) tile<2>(x + b * ldx, ldx, p, K, s, y + b * ldy + 4 * t, ldy);
        if (b < B) tile<1>(x + b * ldx, ldx, p, K, s, y + b * ldy + 4 * t, ldy);
    }
}

}  // namespace

extern "C" {

int rz_abi_version() { return 2; }

// x [B, K] (row stride ldx), W packed [N / 4, K / 8, 4, 8], y [B, N] (row stride ldy); N % 4 == 0, K % 8 == 0.
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
