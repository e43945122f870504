// The GEMV tile kernels shared by csrc/cpu_gemv.cpp (one matrix per call) and csrc/cpu_decode.cpp
// (a whole decode step per call). Layout and reasoning: the comment at the top of cpu_gemv.cpp.
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <type_traits>

namespace rz {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
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

// bf16 tiles hold 16 columns per row and step, interleaved by rwkv_zoo.cpu_kernels.pack: the low
// halves of the 32-bit lanes are columns k..k+7, the high halves k+8..k+15. A shift and a mask widen
// them to fp32 (one instruction each, against two for a zero-extending load plus the shift), which
// is what limits a bf16 GEMV here, not memory.
template <int BT>
inline void tile_bf16(const float* x, int64_t ldx, const uint16_t* p, int64_t K, float* y, int64_t ldy) {
    __m256 acc[4][BT];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t k = 0; k < K; k += 16, p += 64) {
        __m256 xl[BT], xh[BT];
        for (int b = 0; b < BT; ++b) {
            xl[b] = _mm256_loadu_ps(x + b * ldx + k);
            xh[b] = _mm256_loadu_ps(x + b * ldx + k + 8);
        }
        for (int r = 0; r < 4; ++r) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * r));
            const __m256 wl = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            const __m256 wh = _mm256_castsi256_ps(_mm256_and_si256(w, high));
            for (int b = 0; b < BT; ++b) {
                acc[r][b] = _mm256_fmadd_ps(wl, xl[b], acc[r][b]);
                acc[r][b] = _mm256_fmadd_ps(wh, xh[b], acc[r][b]);
            }
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) y[b * ldy + r] = hsum(acc[r][b]);
}

// One tile against B rows of x. Rows go in triples (12 accumulators + 3 inputs + 1 weight = the 16
// AVX registers), then a pair or a single; the tile (4 x K weights) stays in L1/L2 between them.
// bf16 goes in pairs (its two input halves per row take the registers a third row would need).
template <typename WT>
inline void tile_rows(const float* x, int64_t B, int64_t ldx, const WT* p, int64_t K, const float* s, float* y,
                      int64_t ldy) {
    int64_t b = 0;
    if constexpr (std::is_same<WT, uint16_t>::value) {
        for (; b + 2 <= B; b += 2) tile_bf16<2>(x + b * ldx, ldx, p, K, y + b * ldy, ldy);
        if (b < B) tile_bf16<1>(x + b * ldx, ldx, p, K, y + b * ldy, ldy);
    } else {
        for (; b + 3 <= B; b += 3) tile<3>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
        if (B - b == 2) tile<2>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
        if (B - b == 1) tile<1>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
    }
}

}  // namespace rz
