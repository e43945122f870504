// The GEMV tile kernels shared by csrc/cpu_gemv.cpp (one matrix per call) and csrc/cpu_decode.cpp
// (a whole decode step per call). Layout and reasoning: the comment at the top of cpu_gemv.cpp.
//
// One source, several builds: rwkv_zoo.backends.cpu.kernels compiles it once per instruction set
// (portable, avx2, avx512, avx512_vnni, avx512_bf16) with that ISA's -m flags and loads the build the
// CPU can run. The code below picks its loops from the compiler's predefined macros, so a variant is
// exactly "these sources with these flags" (no run-time branches inside the kernels):
// - portable: plain C++ loops (-O3 vectorizes them for the baseline ISA, e.g. SSE2 or NEON), fp32
//   activations for every weight format (the reference the other builds are tested against);
// - avx2: 256-bit FMA loops for fp32 and bf16 weights (widened in registers); int8 and int4 weights
//   times int8-quantized activations (blocks of QBLK = 32 columns, one fp32 scale each, computed once
//   per call) with vpmaddubsw / vpmaddwd, exact int32 sums per block;
// - avx512: fp32 and bf16 with 512-bit registers holding two tile rows each; int8 / int4 as avx2;
// - avx512_vnni: the same integer dots with vpdpbusd;
// - avx512_bf16: + vnni, and bf16 weights times bf16-rounded activations with vdpbf16ps.
// int4: groups of 64 columns, one fp32 scale each, two weights per byte.
#pragma once
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RZ_AVX2 1
#endif
#if defined(RZ_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RZ_AVX512 1
#endif
#if defined(RZ_AVX512) && defined(__AVX512VNNI__)
#define RZ_VNNI 1
#endif
#if defined(RZ_VNNI) && defined(__AVX512BF16__)
#define RZ_BF16DOT 1
#endif

namespace rz {

// Weight kinds (cpu_decode.cpp's Lin.kind, rwkv_zoo.backends.cpu.kernels.KINDS).
enum Kind : int64_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };
constexpr int64_t I4_GROUP = 64;  // int4: columns per scale

inline const char* isa_name() {
#if defined(RZ_BF16DOT)
    return "avx512_bf16";
#elif defined(RZ_VNNI)
    return "avx512_vnni";
#elif defined(RZ_AVX512)
    return "avx512";
#elif defined(RZ_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

// ---- activations prepared once per call (integer dots: int8 per block of 32; BF16 dot: bf16 pairs) ----

// Activations of integer dots are quantized in blocks of QBLK columns, each with its own fp32 scale
// (as llama.cpp's Q8_0 does): per-token scales cost v7-0.1B (random weights) a next-token KL of 9.6e-4
// from fp32 against 3.5e-4 for int8 weights alone, blocks of 32 4.5e-4 (64: 5.5e-4), for one
// int32 -> fp32 conversion and FMA per block and row.
constexpr int64_t QBLK = 32;
// Software prefetch distance of the integer-dot kernels, in bytes of packed weights ahead of the one
// being read. A tile is one contiguous run, but at batch 1 the hardware prefetcher alone left the
// int8 head (65536 x 768, from DRAM) at ~10 GB/s on one core; prefetching 2-4 KiB ahead made it
// 1.15-1.3x faster (1 and 2 threads, AVX2 EPYC, under load), 0.25-0.5 KiB did nothing. Past the
// end of a tile it fetches the next one, usually this thread's next (chunks of tiles); a prefetch
// never faults, even past the end of the matrix.
#ifndef RZ_PF_BYTES
#define RZ_PF_BYTES 2048
#endif
#if defined(RZ_VNNI)
constexpr int XQ_OFFSET = 128;  // vpdpbusd takes unsigned activations: q + 128, removed with 128 * sum(w)
#else
constexpr int XQ_OFFSET = 0;    // the AVX2 dot takes signed activations (the sign trick, see tile_i8dot)
#endif

// Whether this build multiplies weights of `kind` (input width K) with prepared activations instead of
// fp32 rows: int8 weights through integer dots (AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd) when K is a
// multiple of QBLK, bf16 weights with vdpbf16ps.
inline bool needs_prep(int64_t kind, int64_t K) {
#if defined(RZ_BF16DOT)
    if (kind == BF16) return true;
#endif
#if defined(RZ_AVX2)
    if ((kind == I8 || kind == I4) && K % QBLK == 0) return true;
#endif
    (void)kind, (void)K;
    return false;
}

// Bytes of prepared activations per row of K inputs (64-byte aligned): bf16 pairs; I8: K int8 codes and
// K / QBLK fp32 scales; I4: 2 K codes (each 8 twice, see prep_row) and K / QBLK (scale, sum) pairs.
inline int64_t prep_row_bytes(int64_t kind, int64_t K) {
    const int64_t n = kind == BF16 ? 2 * K : kind == I4 ? 2 * K + 8 * (K / QBLK) : K + 4 * (K / QBLK);
    return (n + 63) / 64 * 64;
}

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One row: BF16 -> pairs (x[k + j], x[k + 8 + j]) per 16 columns, the weights' interleave; I8 -> per
// block of QBLK columns, codes q = round(x / s) (|q| <= 127, s = the block's max|x| / 127) stored as
// q + XQ_OFFSET, then the K / QBLK fp32 scales; I4 -> the same codes (signed, no offset), each run of 8
// written twice ([x0..7, x0..7, x8..15, x8..15] per 16 columns: one load meets two steps of int4
// weights, rows (0, 1) or (2, 3)), then per block the fp32 scale and the int32 4 * sum(q).
inline void prep_row(int64_t kind, const float* x, int64_t K, uint8_t* out) {
    if (kind == BF16) {
        uint16_t* q = reinterpret_cast<uint16_t*>(out);
        for (int64_t k = 0; k < K; k += 16)
            for (int j = 0; j < 8; ++j) {
                q[k + 2 * j] = to_bf16(x[k + j]);
                q[k + 2 * j + 1] = to_bf16(x[k + 8 + j]);
            }
        return;
    }
    if (kind == I4) {
        int8_t* q = reinterpret_cast<int8_t*>(out);
        for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
            float m = 0.f;
            for (int64_t k = k0; k < k0 + QBLK; ++k) m = fmaxf(m, fabsf(x[k]));
            const float s = m > 0.f ? m / 127.f : 1.f, inv = 1.f / s;
            int32_t sum = 0;
            for (int64_t k = k0; k < k0 + QBLK; ++k) {
                const int v = (int)nearbyintf(x[k] * inv);
                const int64_t j = k % 16, base = 2 * (k - j) + (j < 8 ? 0 : 16);
                q[base + j % 8] = q[base + 8 + j % 8] = (int8_t)v;
                sum += v;
            }
            sum *= 4;
            memcpy(out + 2 * K + 8 * (k0 / QBLK), &s, 4);
            memcpy(out + 2 * K + 8 * (k0 / QBLK) + 4, &sum, 4);
        }
        return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
        float m = 0.f;
        for (int64_t k = k0; k < k0 + QBLK; ++k) m = fmaxf(m, fabsf(x[k]));
        const float s = m > 0.f ? m / 127.f : 1.f, inv = 1.f / s;
        for (int64_t k = k0; k < k0 + QBLK; ++k) out[k] = (uint8_t)(int)(nearbyintf(x[k] * inv) + (float)XQ_OFFSET);
        memcpy(out + K + 4 * (k0 / QBLK), &s, 4);
    }
}

// ---- portable loops -----------------------------------------------------------------------------

inline float widen(float w) { return w; }
inline float widen(int8_t w) { return (float)w; }
inline float bf16_bits(uint32_t hi) {
    float f;
    memcpy(&f, &hi, 4);
    return f;
}

// The eight lanes of a portable fp32 accumulator, in order. Out of line so that every caller sums them
// the same way: cpu_decode.cpp is built with -ffast-math, under which an inlined copy of this loop may be
// reassociated differently in each kernel it lands in (tile_port and dot_kblock then differed in the
// last bit, and a row's result with its call's row count).
__attribute__((noinline)) inline float lanes_sum(const float* a) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += a[l];
    return s;
}

// Eight lanes per (row, input row), summed at the end: the compiler vectorizes the lane loop.
template <int BT, typename WT>
inline void tile_port(const float* x, int64_t ldx, const WT* p, int64_t K, const float* scale, float* y,
                      int64_t ldy) {
    float acc[4][BT][8] = {};
    for (int64_t k = 0; k < K; k += 8, p += 32)
        for (int r = 0; r < 4; ++r)
            for (int b = 0; b < BT; ++b)
                for (int l = 0; l < 8; ++l) acc[r][b][l] += widen(p[8 * r + l]) * x[b * ldx + k + l];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) y[b * ldy + r] = lanes_sum(acc[r][b]) * (scale ? scale[r] : 1.0f);
}

template <int BT>
inline void tile_bf16_port(const float* x, int64_t ldx, const uint16_t* p, int64_t K, float* y, int64_t ldy) {
    float acc[4][BT][8] = {};
    for (int64_t k = 0; k < K; k += 16, p += 64)
        for (int r = 0; r < 4; ++r)
            for (int b = 0; b < BT; ++b)
                for (int l = 0; l < 8; ++l)
                    acc[r][b][l] += bf16_bits((uint32_t)p[16 * r + 2 * l] << 16) * x[b * ldx + k + l] +
                                    bf16_bits((uint32_t)p[16 * r + 2 * l + 1] << 16) * x[b * ldx + k + 8 + l];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) {
            float s = 0.f;
            for (int l = 0; l < 8; ++l) s += acc[r][b][l];
            y[b * ldy + r] = s;
        }
}

// int4 tiles: per 8 columns, 16 bytes: row r's 4 bytes hold columns j (low nibble) and j + 4 (high),
// stored as q + 8 (q in [-8, 7]); scales [K / 64, 4] per tile.
template <int BT>
inline void tile_i4_port(const float* x, int64_t ldx, const uint8_t* p, int64_t K, const float* sc, float* y,
                         int64_t ldy) {
    float acc[4][BT][8] = {};
    for (int64_t g = 0; g < K; g += I4_GROUP, sc += 4)
        for (int64_t k = g; k < g + I4_GROUP; k += 8, p += 16)
            for (int r = 0; r < 4; ++r) {
                float w[8];
                for (int j = 0; j < 4; ++j) {
                    w[j] = (float)((p[4 * r + j] & 15) - 8) * sc[r];
                    w[j + 4] = (float)((p[4 * r + j] >> 4) - 8) * sc[r];
                }
                for (int b = 0; b < BT; ++b)
                    for (int l = 0; l < 8; ++l) acc[r][b][l] += w[l] * x[b * ldx + k + l];
            }
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) {
            float s = 0.f;
            for (int l = 0; l < 8; ++l) s += acc[r][b][l];
            y[b * ldy + r] = s;
        }
}

// ---- AVX2 ---------------------------------------------------------------------------------------
#if defined(RZ_AVX2)
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

// int4: the 16 bytes of a step hold all 4 rows; two masks split the nibbles, unpacks put each row's
// 8 columns together, and each row is widened and scaled by its group's scale (decode reads half the
// bytes of int8; the widening is the cost, as for bf16).
template <int BT>
inline void tile_i4(const float* x, int64_t ldx, const uint8_t* p, int64_t K, const float* sc, float* y,
                    int64_t ldy) {
    __m256 acc[4][BT];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    for (int64_t g = 0; g < K; g += I4_GROUP, sc += 4) {
        __m256 s[4];
        for (int r = 0; r < 4; ++r) s[r] = _mm256_set1_ps(sc[r]);
        for (int64_t k = g; k < g + I4_GROUP; k += 8, p += 16) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
            const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, m4), eight);
            const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m4), eight);
            const __m128i r01 = _mm_unpacklo_epi32(lo, hi), r23 = _mm_unpackhi_epi32(lo, hi);
            __m256 xs[BT];
            for (int b = 0; b < BT; ++b) xs[b] = _mm256_loadu_ps(x + b * ldx + k);
            const __m128i rows[4] = {r01, _mm_srli_si128(r01, 8), r23, _mm_srli_si128(r23, 8)};
            for (int r = 0; r < 4; ++r) {
                const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(rows[r])), s[r]);
                for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_fmadd_ps(w, xs[b], acc[r][b]);
            }
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) y[b * ldy + r] = hsum(acc[r][b]);
}

// int8 weights x int8 activations (prep_row): a step's 32 weight bytes are rows 0-3 x 8 columns, the 8
// activation codes are broadcast to the four 64-bit lanes. vpmaddubsw multiplies unsigned by signed
// bytes and adds adjacent pairs into int16, so it gets |w| and x with w's sign (vpsignb): both within
// 127 in magnitude, a pair sums to at most 2 * 127 * 127 = 32258 and never saturates; vpmaddwd with
// ones widens the pairs to int32, exact. Lanes (2r, 2r + 1) hold row r. Each block of QBLK columns
// ends with its activation scale applied in fp32; the weights' row scales come last.
template <int BT>
inline void tile_i8dot(const uint8_t* xq, int64_t ldq, const int8_t* p, int64_t K, const float* scale, float* y,
                       int64_t ldy) {
    __m256 facc[BT];
    for (int b = 0; b < BT; ++b) facc[b] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k0 = 0; k0 < K; k0 += QBLK, p += 4 * QBLK) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + RZ_PF_BYTES, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p) + RZ_PF_BYTES + 64, _MM_HINT_T0);
        // The block's 4 steps unrolled, each sum started by its first step: the rolled loop compiled to a
        // register move per row and step on top of the 4 vector instructions per 32 products (the limit
        // here: the pipes and the 6-wide dispatch of Zen 3 are busy, not memory). Same sums, 1.02x int8
        // prefill (v7-0.1B, one thread, CPU time, under load).
        __m256i iacc[BT];
#pragma GCC unroll 4
        for (int st = 0; st < QBLK / 8; ++st) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * st));
            const __m256i aw = _mm256_abs_epi8(w);
#pragma GCC unroll 8
            for (int b = 0; b < BT; ++b) {
                int64_t xv;
                memcpy(&xv, xq + b * ldq + k0 + 8 * st, 8);
                const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi64x(xv), w);
                const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                iacc[b] = st == 0 ? d : _mm256_add_epi32(iacc[b], d);
            }
        }
        for (int b = 0; b < BT; ++b) {
            float sx;
            memcpy(&sx, xq + b * ldq + K + 4 * (k0 / QBLK), 4);
            facc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[b]), _mm256_set1_ps(sx), facc[b]);
        }
    }
    alignas(32) float a[8];
    for (int b = 0; b < BT; ++b) {
        _mm256_store_ps(a, facc[b]);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = (a[2 * r] + a[2 * r + 1]) * scale[r];
    }
}

// int4 weights x int8 activations (prep_row's I4 layout): a 32-byte load is two steps (16 columns) of
// the tile. Masks and a shift split the nibbles (codes c = q + 8 in [0, 15]) and 32-bit unpacks put rows
// (0, 1) of both steps in one register and rows (2, 3) in another, each byte against the activation
// byte of its column. vpmaddubsw takes the codes as the unsigned operand: 2 * 15 * 127 never saturates
// int16, and no sign trick is needed; the +8 offset comes back out per block as 8 * sum(q) (rows show
// up in both 128-bit halves, hence 4 * sum per half). With VNNI, vpdpbusd does the three integer steps
// in one. Each block of QBLK columns is scaled by the activation scale times the weights' group scales.
template <int BT>
inline void tile_i4dot(const uint8_t* xq, int64_t ldq, const uint8_t* p, int64_t K, const float* sc, float* y,
                       int64_t ldy) {
    static_assert(I4_GROUP % QBLK == 0, "a weight group holds whole activation blocks");
    __m256 facc[BT];
    for (int b = 0; b < BT; ++b) facc[b] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#if !defined(RZ_VNNI)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 sw = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
        if (k0 % I4_GROUP == 0) sw = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(sc + 4 * (k0 / I4_GROUP)));
        __m256i acc[BT][2];
        for (int b = 0; b < BT; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_si256();
        _mm_prefetch(reinterpret_cast<const char*>(p) + RZ_PF_BYTES, _MM_HINT_T0);
        for (int64_t k = k0; k < k0 + QBLK; k += 16, p += 32) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            const __m256i w[2] = {_mm256_unpacklo_epi32(lo, hi), _mm256_unpackhi_epi32(lo, hi)};
            for (int b = 0; b < BT; ++b) {
                const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + 2 * k));
                for (int h = 0; h < 2; ++h) {
#if defined(RZ_VNNI)
                    acc[b][h] = _mm256_dpbusd_epi32(acc[b][h], w[h], xs);
#else
                    acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(_mm256_maddubs_epi16(w[h], xs), ones));
#endif
                }
            }
        }
        for (int b = 0; b < BT; ++b) {
            const uint8_t* meta = xq + b * ldq + 2 * K + 8 * (k0 / QBLK);
            float sx;
            int32_t off;
            memcpy(&sx, meta, 4);
            memcpy(&off, meta + 4, 4);
            // lanes [r0, r1, r2, r3] per 128-bit half (one step each), less the offset
            const __m256i rows = _mm256_sub_epi32(_mm256_hadd_epi32(acc[b][0], acc[b][1]), _mm256_set1_epi32(off));
            facc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows), _mm256_mul_ps(sw, _mm256_set1_ps(sx)), facc[b]);
        }
    }
    alignas(32) float a[8];
    for (int b = 0; b < BT; ++b) {
        _mm256_store_ps(a, facc[b]);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = a[r] + a[4 + r];
    }
}
#endif  // RZ_AVX2

// ---- AVX-512F: two tile rows per 512-bit register -------------------------------------------------
#if defined(RZ_AVX512)
inline __m512 dup256(__m256 v) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(v))); }
inline void hsum2(__m512 v, float* lo, float* hi) {
    *lo = hsum(_mm512_castps512_ps256(v));
    *hi = hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// fp32 / int8: a step's 32 weights (rows 0-3, 8 columns) are two registers, rows (0, 1) and (2, 3),
// against the 8 inputs broadcast to both halves.
template <int BT, typename WT>
inline void tile512(const float* x, int64_t ldx, const WT* p, int64_t K, const float* scale, float* y,
                    int64_t ldy) {
    __m512 acc[2][BT];
    for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BT; ++b) acc[h][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 8, p += 32) {
        const __m512 w0 = load16(p), w1 = load16(p + 16);
        for (int b = 0; b < BT; ++b) {
            const __m512 xs = dup256(_mm256_loadu_ps(x + b * ldx + k));
            acc[0][b] = _mm512_fmadd_ps(w0, xs, acc[0][b]);
            acc[1][b] = _mm512_fmadd_ps(w1, xs, acc[1][b]);
        }
    }
    for (int b = 0; b < BT; ++b) {
        float v[4];
        hsum2(acc[0][b], v, v + 1);
        hsum2(acc[1][b], v + 2, v + 3);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = v[r] * (scale ? scale[r] : 1.0f);
    }
}

template <int BT>
inline void tile512_bf16(const float* x, int64_t ldx, const uint16_t* p, int64_t K, float* y, int64_t ldy) {
    __m512 acc[2][BT];
    for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BT; ++b) acc[h][b] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t k = 0; k < K; k += 16, p += 64) {
        __m512 wl[2], wh[2];
        for (int h = 0; h < 2; ++h) {
            const __m512i w = _mm512_loadu_si512(p + 32 * h);
            wl[h] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            wh[h] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
        }
        for (int b = 0; b < BT; ++b) {
            const __m512 xl = dup256(_mm256_loadu_ps(x + b * ldx + k)), xh = dup256(_mm256_loadu_ps(x + b * ldx + k + 8));
            for (int h = 0; h < 2; ++h) {
                acc[h][b] = _mm512_fmadd_ps(wl[h], xl, acc[h][b]);
                acc[h][b] = _mm512_fmadd_ps(wh[h], xh, acc[h][b]);
            }
        }
    }
    for (int b = 0; b < BT; ++b) {
        float v[4];
        hsum2(acc[0][b], v, v + 1);
        hsum2(acc[1][b], v + 2, v + 3);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = v[r];
    }
}
#endif  // RZ_AVX512

// ---- AVX-512 VNNI: int8 x int8 -> int32 (vpdpbusd) -----------------------------------------------
#if defined(RZ_VNNI)
// xq: rows of prep_row (u8 = q + 128 per block of QBLK columns, then the blocks' fp32 scales), row
// stride ldq bytes. The layout logic of tile_i8dot: vpdpbusd sums 4 adjacent byte products into a
// 32-bit lane, so lanes (2r, 2r + 1) hold row r against the 8 inputs broadcast as one 64-bit value;
// unsigned activations need no vpsignb. The +128 offset is taken back out exactly, per block, with
// 128 * sum(w) accumulated by the same instruction from a constant.
template <int BT>
inline void tile_vnni(const uint8_t* xq, int64_t ldq, const int8_t* p, int64_t K, const float* scale, float* y,
                      int64_t ldy) {
    __m256 facc[BT];
    for (int b = 0; b < BT; ++b) facc[b] = _mm256_setzero_ps();
    const __m256i c128 = _mm256_set1_epi8((char)0x80);
    for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
        __m256i iacc[BT];
        for (int b = 0; b < BT; ++b) iacc[b] = _mm256_setzero_si256();
        __m256i wsum = _mm256_setzero_si256();
        _mm_prefetch(reinterpret_cast<const char*>(p) + RZ_PF_BYTES, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p) + RZ_PF_BYTES + 64, _MM_HINT_T0);
        for (int64_t k = k0; k < k0 + QBLK; k += 8, p += 32) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            wsum = _mm256_dpbusd_epi32(wsum, c128, w);
            for (int b = 0; b < BT; ++b) {
                int64_t xv;
                memcpy(&xv, xq + b * ldq + k, 8);
                iacc[b] = _mm256_dpbusd_epi32(iacc[b], _mm256_set1_epi64x(xv), w);
            }
        }
        for (int b = 0; b < BT; ++b) {
            float sx;
            memcpy(&sx, xq + b * ldq + K + 4 * (k0 / QBLK), 4);
            facc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(iacc[b], wsum)), _mm256_set1_ps(sx), facc[b]);
        }
    }
    alignas(32) float a[8];
    for (int b = 0; b < BT; ++b) {
        _mm256_store_ps(a, facc[b]);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = (a[2 * r] + a[2 * r + 1]) * scale[r];
    }
}
#endif  // RZ_VNNI

// ---- AVX-512 BF16: bf16 x bf16 -> fp32 (vdpbf16ps) -----------------------------------------------
#if defined(RZ_BF16DOT)
// xq: rows of prep_row (bf16 pairs in the weights' interleave), row stride ldq bytes. vdpbf16ps
// multiplies the two bf16 halves of each 32-bit lane and adds both products to the fp32 lane: with
// rows (0, 1) in one register and the 16 inputs of the step broadcast to both halves, one instruction
// does 32 multiply-adds.
template <int BT>
inline void tile_bf16dot(const uint8_t* xq, int64_t ldq, const uint16_t* p, int64_t K, float* y, int64_t ldy) {
    __m512 acc[2][BT];
    for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BT; ++b) acc[h][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16, p += 64) {
        const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 32);
        for (int b = 0; b < BT; ++b) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + 2 * k));
            const __m512i xs = _mm512_broadcast_i64x4(xv);
            acc[0][b] = _mm512_dpbf16_ps(acc[0][b], (__m512bh)w0, (__m512bh)xs);
            acc[1][b] = _mm512_dpbf16_ps(acc[1][b], (__m512bh)w1, (__m512bh)xs);
        }
    }
    for (int b = 0; b < BT; ++b) {
        float v[4];
        hsum2(acc[0][b], v, v + 1);
        hsum2(acc[1][b], v + 2, v + 3);
        for (int r = 0; r < 4; ++r) y[b * ldy + r] = v[r];
    }
}
#endif  // RZ_BF16DOT

// ---- one tile against B rows of x ----------------------------------------------------------------

// Calls f(integral_constant<BT>, first row) on groups of rows: groups of BIG while they fit, then at
// most one group of each smaller power of 2 (BIG is a power of 2).
template <int BIG, typename F>
inline void row_groups(int64_t B, F&& f) {
    int64_t b = 0;
    for (; b + BIG <= B; b += BIG) f(std::integral_constant<int, BIG>(), b);
    if constexpr (BIG > 1) {
        if (b < B) row_groups<BIG / 2>(B - b, [&](auto bt, int64_t o) { f(bt, b + o); });
    }
}

// ---- fp32 with many rows (prefill): the tile kernels' sums, blocked for the caches ----------------
//
// Prefill multiplies hundreds of rows and is bound by arithmetic. tile_rows there runs tile<3> (AVX2)
// for every tile over all B rows of x, which it streams from L3 once per tile (1.5 MiB at 512 x 768).
// dot_gemm computes exactly what tile_rows computes, in another order of calls: for output (b, r) the
// tile kernels' result depends only on the chain of FMAs into each of its 8 lane accumulators (lane l:
// w[r, 8 s + l] * x[b, 8 s + l] for s = 0, 1, ... in order) and on the horizontal sum at the end (hsum;
// hsum2 and lanes_sum in the other builds). So rows are blocked into panels and tiles into chunks
// freely, and K is blocked too: the accumulators of a (row, tile) pair, [4][8] floats, are saved in a
// per-thread buffer after a K-block and reloaded for the next one, so the chain goes on in the same
// order, and only the last K-block sums them. Every row of a call is then bitwise equal to the same row
// alone (B = 1) in the same build, which lm-eval's identical log-likelihoods for every batch size and
// the serving engine's batching rely on (tests/kernels/test_cpu_isa.py checks it per build; the
// outer-product GEMM this replaced, gemm_fp32, summed in another order and was ~1e-7 off).
// Blocking: x is packed per call into panels of DOT_MR rows, each K-block a dense [DOT_MR, kc] block
// (packed, a panel's rows do not share L1 sets at K = 3072, where a row is 12 KiB); work items are chunks
// of tiles (DOT_WBYTES of weights, which stay in L2 while every panel passes over them), handed out
// dynamically; per chunk, panel and K-block, each tile's K-block (6 KiB) meets the panel's block in the
// row groups of tile_rows. Each row group after a tile's first prefetches a share of the next x block
// into L2: without it 512 x 3072 x 768 ran at 0.81x tile_rows (a short stream per block that the
// hardware prefetcher does not follow), with it 1.10x; prefetching the next tile's weights into L1, as
// gemm_fp32 did, made it slower (0.67x). Chosen by measurement (one thread, medians of 7 alternating
// rounds, under load; ratios over tile_rows at 512 x 768 x 768 / 512 x 768 x 3072 / 512 x 3072 x 768):
// 24-row panels with 384-column K-blocks 1.05 / 1.02 / 1.00-1.08, 256 columns 1.00-1.02 / 0.99 /
// 0.98-1.10, 128 columns 0.9 / 0.9 / 0.5 (the acc traffic and call overhead of short blocks), no
// K-blocking 1.00-1.08 / 0.99-1.10 / 0.80-1.02 (a 12 KiB x row per pass from L2), 12- and 48-row panels
// no better. gemm_fp32 was 1.06-1.19 over tile_rows in the same runs: the dot form's 12 accumulators
// cover 3 rows x 4 outputs per pass where the outer product covered 24 x 4, so a K-block costs eight
// calls and eight saves of the accumulators instead of one.
#ifndef RZ_DOT_MR
#define RZ_DOT_MR 24
#endif
#ifndef RZ_DOT_KC
#define RZ_DOT_KC 384
#endif
#ifndef RZ_DOT_WBYTES
#define RZ_DOT_WBYTES (192 * 1024)
#endif
#ifndef RZ_DOT_MIN_ROWS
#define RZ_DOT_MIN_ROWS 48
#endif
constexpr int64_t DOT_MR = RZ_DOT_MR;          // x rows per panel
constexpr int64_t DOT_KC = RZ_DOT_KC;          // columns per K-block
constexpr int64_t DOT_WBYTES = RZ_DOT_WBYTES;  // bytes of weights per chunk of tiles (what one thread takes at a time)
constexpr int64_t DOT_NC_MAX = 32;             // tiles per chunk at most (sizes the accumulator buffer)
constexpr int64_t DOT_MIN_ROWS = RZ_DOT_MIN_ROWS;
constexpr int64_t DOT_ACC = 32;                // floats of saved accumulators per (x row, tile): [4 weight rows][8 lanes]
#if defined(RZ_AVX512)
constexpr int64_t DOT_GROUP = 4;  // rows per call of the build's widest fp32 tile kernel (tile_rows's row groups)
#elif defined(RZ_AVX2)
constexpr int64_t DOT_GROUP = 3;
#else
constexpr int64_t DOT_GROUP = 2;
#endif
static_assert(DOT_MR % 12 == 0 && DOT_KC % 8 == 0, "panels of whole row groups in every build, K-blocks of whole steps");

// One tile's K-block (kc columns: kc / 8 steps of the packed tile p) against BT rows of x (row stride
// ldx), with the accumulators of tile<BT> / tile512<BT> / tile_port<BT> continued from acc ([BT][4][8]:
// row b's lane l of weight row r at 32 b + 8 r + l) unless first, and saved back there unless last,
// where they are summed as that kernel sums them, into y (row stride ldy; the fp32 kernels' scale is
// 1). px: where to prefetch one line per step into L2 (null: nowhere).
template <int BT>
inline void dot_kblock(const float* x, int64_t ldx, const float* p, int64_t kc, float* acc, bool first, bool last,
                       float* y, int64_t ldy, const char* px) {
#if defined(RZ_AVX512)
    __m512 a[2][BT];  // weight rows (0, 1) and (2, 3), as tile512
    for (int h = 0; h < 2; ++h)
        for (int b = 0; b < BT; ++b) a[h][b] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + 32 * b + 16 * h);
    for (int64_t k = 0; k < kc; k += 8, p += 32) {
        if (px) _mm_prefetch(px + 8 * k, _MM_HINT_T1);
        const __m512 w0 = load16(p), w1 = load16(p + 16);
        for (int b = 0; b < BT; ++b) {
            const __m512 xs = dup256(_mm256_loadu_ps(x + b * ldx + k));
            a[0][b] = _mm512_fmadd_ps(w0, xs, a[0][b]);
            a[1][b] = _mm512_fmadd_ps(w1, xs, a[1][b]);
        }
    }
    for (int b = 0; b < BT; ++b) {
        if (last) {
            float v[4];
            hsum2(a[0][b], v, v + 1);
            hsum2(a[1][b], v + 2, v + 3);
            for (int r = 0; r < 4; ++r) y[b * ldy + r] = v[r];
        } else {
            for (int h = 0; h < 2; ++h) _mm512_store_ps(acc + 32 * b + 16 * h, a[h][b]);
        }
    }
#elif defined(RZ_AVX2)
    __m256 a[4][BT];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) a[r][b] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc + 32 * b + 8 * r);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k += 8, p += 32) {
        if (px) _mm_prefetch(px + 8 * k, _MM_HINT_T1);
        __m256 xs[BT];
        for (int b = 0; b < BT; ++b) xs[b] = _mm256_loadu_ps(x + b * ldx + k);
        for (int r = 0; r < 4; ++r) {
            const __m256 w = _mm256_loadu_ps(p + 8 * r);
            for (int b = 0; b < BT; ++b) a[r][b] = _mm256_fmadd_ps(w, xs[b], a[r][b]);
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) {
            if (last) y[b * ldy + r] = hsum(a[r][b]);
            else _mm256_store_ps(acc + 32 * b + 8 * r, a[r][b]);
        }
#else
    (void)px;
    float a[4][BT][8];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b)
            for (int l = 0; l < 8; ++l) a[r][b][l] = first ? 0.f : acc[32 * b + 8 * r + l];
    for (int64_t k = 0; k < kc; k += 8, p += 32)
        for (int r = 0; r < 4; ++r)
            for (int b = 0; b < BT; ++b)
                for (int l = 0; l < 8; ++l) a[r][b][l] += p[8 * r + l] * x[b * ldx + k + l];
    for (int r = 0; r < 4; ++r)
        for (int b = 0; b < BT; ++b) {
            if (last) {
                y[b * ldy + r] = lanes_sum(a[r][b]);
            } else {
                for (int l = 0; l < 8; ++l) acc[32 * b + 8 * r + l] = a[r][b][l];
            }
        }
#endif
}

// One tile's K-block against `rows` rows of x in tile_rows's row groups. The groups after the first
// prefetch consecutive shares of `pxshare` bytes from px (null: none).
inline void dot_rows(const float* x, int64_t ldx, int64_t rows, const float* p, int64_t kc, float* acc, bool first,
                     bool last, float* y, int64_t ldy, const char* px, int64_t pxshare) {
    auto run = [&](auto bt, int64_t b) {
        const char* pf = b == 0 || !px ? nullptr : px + (b / DOT_GROUP - 1) * pxshare;
        dot_kblock<decltype(bt)::value>(x + b * ldx, ldx, p, kc, acc + DOT_ACC * b, first, last, y + b * ldy, ldy, pf);
    };
#if defined(RZ_AVX512)
    row_groups<4>(rows, run);
#elif defined(RZ_AVX2)
    int64_t b = 0;
    for (; b + 3 <= rows; b += 3) run(std::integral_constant<int, 3>(), b);
    if (rows - b == 2) run(std::integral_constant<int, 2>(), b);
    if (rows - b == 1) run(std::integral_constant<int, 1>(), b);
#else
    row_groups<2>(rows, run);
#endif
}

// One fp32 product of dot_gemm: y [B, N] = x [B, K] W^T, W packed (N % 4 == 0, K % 8 == 0).
struct DotJob {
    const float* x;
    int64_t ldx;
    const float* W;
    int64_t K, N;
    float* y;
    int64_t ldy;
};

// Floats of scratch dot_gemm needs for B rows and jobs whose K sum to sumK: packed x, then per thread
// the saved accumulators of a chunk (plus 16 for aligning the start to 64 bytes).
inline int64_t dot_scratch_floats(int64_t B, int64_t sumK, int nthreads) {
    const int64_t Bp = (B + DOT_MR - 1) / DOT_MR * DOT_MR;
    return Bp * sumK + nthreads * DOT_NC_MAX * DOT_MR * DOT_ACC + 16;
}

// The jobs' products for B rows each, called by every thread of an OpenMP parallel region. scratch:
// dot_scratch_floats(B, sum of the jobs' K, threads) floats, shared. n <= 16. sync(): the team's
// barrier, after each of the two work-sharing loops (`nowait`): `#pragma omp barrier` in rz_gemv, the
// fused step's own barrier in cpu_decode.cpp (which does not spin for milliseconds on a loaded machine).
template <typename Sync>
inline void dot_gemm(const DotJob* jobs, int n, int64_t B, float* scratch, Sync&& sync) {
    const int nthreads = omp_get_num_threads();
    const int64_t panels = (B + DOT_MR - 1) / DOT_MR, Bp = panels * DOT_MR;
    float* base = scratch + (16 - reinterpret_cast<uintptr_t>(scratch) / 4 % 16) % 16;  // 64-byte aligned
    float* xps[16];
    bool packs[16];
    int64_t nc[16], chunks[17], tiles = 0;
    for (int j = 0; j < n; ++j) {
        tiles += jobs[j].N / 4;
        packs[j] = true;
        for (int i = 0; i < j && packs[j]; ++i)  // matrices of one input (r, k, v...) share its packed copy
            if (jobs[i].x == jobs[j].x && jobs[i].ldx == jobs[j].ldx && jobs[i].K == jobs[j].K) xps[j] = xps[i], packs[j] = false;
        if (packs[j]) xps[j] = base, base += Bp * jobs[j].K;
    }
    // Chunks of at most DOT_WBYTES of weights (they stay in L2 while every panel passes), and at least 8
    // per thread: the last chunk of a thread is what the other may wait for.
    int64_t most = tiles / (8 * nthreads);
    most = most < 1 ? 1 : most;
    chunks[0] = 0;
    for (int j = 0; j < n; ++j) {
        int64_t c = DOT_WBYTES / (16 * jobs[j].K);
        c = c > DOT_NC_MAX ? DOT_NC_MAX : c > most ? most : c;
        nc[j] = c < 1 ? 1 : c;
        chunks[j + 1] = chunks[j] + (jobs[j].N / 4 + nc[j] - 1) / nc[j];
    }
    // x into panels: panel p's K-block at k0 is [DOT_MR rows][kc] at p * DOT_MR * K + k0 * DOT_MR
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < n * panels; ++it) {
        const int j = (int)(it / panels);
        if (!packs[j]) continue;
        const DotJob& J = jobs[j];
        const int64_t p = it % panels, K = J.K, rows = B - p * DOT_MR < DOT_MR ? B - p * DOT_MR : DOT_MR;
        float* out = xps[j] + p * DOT_MR * K;
        for (int64_t k0 = 0; k0 < K; k0 += DOT_KC) {
            const int64_t kc = K - k0 < DOT_KC ? K - k0 : DOT_KC;
            for (int64_t i = 0; i < rows; ++i)
                memcpy(out + k0 * DOT_MR + i * kc, J.x + (p * DOT_MR + i) * J.ldx + k0, kc * sizeof(float));
        }
    }
    sync();
    float* acc = base + omp_get_thread_num() * DOT_NC_MAX * DOT_MR * DOT_ACC;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < chunks[n]; ++it) {
        int j = 0;
        while (chunks[j + 1] <= it) ++j;
        const DotJob& J = jobs[j];
        const int64_t K = J.K, t0 = (it - chunks[j]) * nc[j], t1 = t0 + nc[j] < J.N / 4 ? t0 + nc[j] : J.N / 4;
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t rows = B - p * DOT_MR < DOT_MR ? B - p * DOT_MR : DOT_MR;
            for (int64_t k0 = 0; k0 < K; k0 += DOT_KC) {
                const int64_t kc = K - k0 < DOT_KC ? K - k0 : DOT_KC;
                const float* xb = xps[j] + p * DOT_MR * K + k0 * DOT_MR;
                // the next x block (this panel's next K-block, else the next panel's first; past the
                // last a prefetch does nothing) into L2, a share per row group after each tile's first
                const char* xn = reinterpret_cast<const char*>(k0 + kc < K ? xb + DOT_MR * kc : xps[j] + (p + 1) * DOT_MR * K);
                const int64_t calls = (DOT_MR / DOT_GROUP - 1) * (t1 - t0);
                const int64_t share = (DOT_MR * kc * 4 + calls - 1) / calls;
                for (int64_t t = t0; t < t1; ++t)
                    dot_rows(xb, kc, rows, J.W + t * 4 * K + 4 * k0, kc, acc + (t - t0) * DOT_MR * DOT_ACC, k0 == 0,
                             k0 + kc >= K, J.y + p * DOT_MR * J.ldy + 4 * t, J.ldy,
                             xn + (t - t0) * (DOT_MR / DOT_GROUP - 1) * share, share);
            }
        }
    }
    sync();
}

// Rows of x for one tile `t` of the packed matrix W (kind: F32, BF16, I8, I4). xq: the prepared rows
// (needs_prep(kind, K)), with row stride ldq; else null (fp32 activations). The tile (4 x K weights) stays in L1/L2 while
// the groups of rows pass over it. Register budgets: AVX2 has 16 vector registers (fp32 in triples: 12
// accumulators + 3 inputs + 1 weight; int8 and int4 dots in fours, bf16 in pairs), AVX-512 has 32.
inline void tile_rows(int64_t kind, const float* x, int64_t B, int64_t ldx, const uint8_t* xq, int64_t ldq,
                      const void* W, int64_t t, int64_t K, const float* scale, float* y, int64_t ldy) {
    const float* s = nullptr;
    if (kind == I8) s = scale + 4 * t;
    if (kind == I4) s = scale + t * 4 * (K / I4_GROUP);
    (void)xq, (void)ldq;
#if defined(RZ_VNNI)
    if (kind == I8 && xq) {
        const int8_t* p = static_cast<const int8_t*>(W) + t * 4 * K;
        row_groups<8>(B, [&](auto bt, int64_t b) { tile_vnni<decltype(bt)::value>(xq + b * ldq, ldq, p, K, s, y + b * ldy, ldy); });
        return;
    }
#elif defined(RZ_AVX2)
    if (kind == I8 && xq) {  // the AVX2 and AVX-512F builds: the 256-bit sign-trick dot
        const int8_t* p = static_cast<const int8_t*>(W) + t * 4 * K;
        row_groups<4>(B, [&](auto bt, int64_t b) { tile_i8dot<decltype(bt)::value>(xq + b * ldq, ldq, p, K, s, y + b * ldy, ldy); });
        return;
    }
#endif
#if defined(RZ_AVX2)
    if (kind == I4 && xq) {  // every x86 build but portable (the VNNI ones with vpdpbusd)
        const uint8_t* p = static_cast<const uint8_t*>(W) + t * 2 * K;
        // 4 rows per pass: the nibble split (5 instructions per 16 columns) is shared by more rows; against
        // 2 rows, 1.08-1.10x (512 x 768 and 512 x 3072 inputs, one thread of a shared Zen 3, CPU time)
        row_groups<4>(B, [&](auto bt, int64_t b) { tile_i4dot<decltype(bt)::value>(xq + b * ldq, ldq, p, K, s, y + b * ldy, ldy); });
        return;
    }
#endif
#if defined(RZ_BF16DOT)
    if (kind == BF16 && xq) {
        const uint16_t* p = static_cast<const uint16_t*>(W) + t * 4 * K;
        row_groups<4>(B, [&](auto bt, int64_t b) { tile_bf16dot<decltype(bt)::value>(xq + b * ldq, ldq, p, K, y + b * ldy, ldy); });
        return;
    }
#endif
    switch (kind) {
        case F32:
        case I8: {
            auto run = [&](auto wt) {
                using WT = decltype(wt);
                const WT* p = static_cast<const WT*>(W) + t * 4 * K;
#if defined(RZ_AVX512)
                row_groups<4>(B, [&](auto bt, int64_t b) { tile512<decltype(bt)::value>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy); });
#elif defined(RZ_AVX2)
                int64_t b = 0;
                for (; b + 3 <= B; b += 3) tile<3>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
                if (B - b == 2) tile<2>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
                if (B - b == 1) tile<1>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy);
#else
                row_groups<2>(B, [&](auto bt, int64_t b) { tile_port<decltype(bt)::value>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy); });
#endif
            };
            if (kind == F32) run(float());
            else run(int8_t());
            return;
        }
        case BF16: {
            const uint16_t* p = static_cast<const uint16_t*>(W) + t * 4 * K;
#if defined(RZ_AVX512)
            row_groups<2>(B, [&](auto bt, int64_t b) { tile512_bf16<decltype(bt)::value>(x + b * ldx, ldx, p, K, y + b * ldy, ldy); });
#elif defined(RZ_AVX2)
            row_groups<2>(B, [&](auto bt, int64_t b) { tile_bf16<decltype(bt)::value>(x + b * ldx, ldx, p, K, y + b * ldy, ldy); });
#else
            row_groups<2>(B, [&](auto bt, int64_t b) { tile_bf16_port<decltype(bt)::value>(x + b * ldx, ldx, p, K, y + b * ldy, ldy); });
#endif
            return;
        }
        default: {
            const uint8_t* p = static_cast<const uint8_t*>(W) + t * 2 * K;
#if defined(RZ_AVX2)
            row_groups<2>(B, [&](auto bt, int64_t b) { tile_i4<decltype(bt)::value>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy); });
#else
            row_groups<2>(B, [&](auto bt, int64_t b) { tile_i4_port<decltype(bt)::value>(x + b * ldx, ldx, p, K, s, y + b * ldy, ldy); });
#endif
            return;
        }
    }
}

}  // namespace rz
