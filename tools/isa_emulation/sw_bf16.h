// Software stand-ins for the AVX-512 BF16 and VNNI instructions that backends/cpu/csrc uses, so that
// the avx512_bf16 build's code (bf16 prep, tile_bf16dot's loops and tails, the fused decode step) can
// run on a CPU (or an emulated one) with AVX-512 F/BW/VL but neither extension. run.sh builds the
// `avx512_bf16_sw` libraries with the avx512_bf16 build's flags unchanged plus `-include` this file:
// it includes <immintrin.h> first (its include guard makes the sources' own #include a no-op), then
// redefines the intrinsic names, so every later call in the sources lands here. Results printed for
// that build are "bf16 instructions emulated in software", not a run of vdpbf16ps.
//
// Exactness (Intel SDM, VDPBF16PS): per fp32 lane i, with DAZ on every input, FTZ on every output,
// round-to-nearest-even and MXCSR neither read nor written,
//     dst[i] += fp32(a.bf16[2i+1]) * fp32(b.bf16[2i+1])     (the odd / high halves first)
//     dst[i] += fp32(a.bf16[2i])   * fp32(b.bf16[2i])
// The flushes are explicit, not MXCSR's FTZ / DAZ (which the caller may or may not have set).
// A product of two bf16 (8-bit significands) is exact in fp32, so one FMA per step rounds exactly
// once, as the instruction does (the harness runs with MXCSR's default round-to-nearest-even). The
// one corner where this may differ from hardware: a sum that rounds to exactly the smallest normal
// magnitude (2^-126), where the flush decision can depend on detecting tininess before or after
// rounding; the kernels' values are many orders of magnitude away from it.
//
// VPDPBUSD (AVX512_VNNI, the 256-bit EVEX form the sources use): per 32-bit lane, the sum of the four
// products unsigned byte of a x signed byte of b, added to dst with wrap-around (no saturation).
// vpmaddubsw would saturate its 16-bit pair sums, so the stand-in widens to 16 bits and uses
// vpmaddwd, whose 32-bit pair sums cannot overflow (|255 * -128| * 2 < 2^31): exact.
#ifndef RZ_ISA_EMULATION_SW_BF16_H
#define RZ_ISA_EMULATION_SW_BF16_H

#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX2__)
#error "sw_bf16.h is for the avx512_bf16 build (AVX-512F and AVX2 flags)"
#endif

namespace rz_sw {

// DAZ / FTZ: a lane whose exponent field is 0 (zero or denormal) becomes a zero of the same sign.
static inline __attribute__((always_inline)) __m512i flush_denormals(__m512i v) {
    const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
    const __mmask16 normal = _mm512_test_epi32_mask(v, exp_mask);
    return _mm512_mask_mov_epi32(_mm512_and_si512(v, _mm512_set1_epi32((int)0x80000000u)), normal, v);
}

static inline __attribute__((always_inline)) __m512 dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    // bf16 -> fp32 is the 16 bits shifted to the top of the lane; a bf16 denormal stays a denormal.
    const __m512 a_hi = _mm512_castsi512_ps(flush_denormals(_mm512_and_si512(a, hi)));
    const __m512 b_hi = _mm512_castsi512_ps(flush_denormals(_mm512_and_si512(b, hi)));
    const __m512 a_lo = _mm512_castsi512_ps(flush_denormals(_mm512_slli_epi32(a, 16)));
    const __m512 b_lo = _mm512_castsi512_ps(flush_denormals(_mm512_slli_epi32(b, 16)));
    __m512i d = flush_denormals(_mm512_castps_si512(acc));
    d = flush_denormals(_mm512_castps_si512(_mm512_fmadd_ps(a_hi, b_hi, _mm512_castsi512_ps(d))));
    d = flush_denormals(_mm512_castps_si512(_mm512_fmadd_ps(a_lo, b_lo, _mm512_castsi512_ps(d))));
    return _mm512_castsi512_ps(d);
}

static inline __attribute__((always_inline)) __m256i dpbusd_epi32(__m256i acc, __m256i a, __m256i b) {
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    const __m256i a_even = _mm256_and_si256(a, lo8);                       // unsigned bytes 0, 2
    const __m256i a_odd = _mm256_srli_epi16(a, 8);                         // unsigned bytes 1, 3
    const __m256i b_even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8);  // signed bytes 0, 2
    const __m256i b_odd = _mm256_srai_epi16(b, 8);                         // signed bytes 1, 3
    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(a_even, b_even), _mm256_madd_epi16(a_odd, b_odd));
    return _mm256_add_epi32(acc, s);
}

}  // namespace rz_sw

// The casts accept what the sources pass (__m512bh / __m512i / __m256i values): same-size vectors.
// GCC defines some intrinsics as macros (when not optimizing, or always, per header): drop those first.
#undef _mm512_dpbf16_ps
#undef _mm256_dpbusd_epi32
#define _mm512_dpbf16_ps(acc, a, b) ::rz_sw::dpbf16_ps((acc), (__m512i)(a), (__m512i)(b))
#define _mm256_dpbusd_epi32(acc, a, b) ::rz_sw::dpbusd_epi32((acc), (__m256i)(a), (__m256i)(b))

#endif  // RZ_ISA_EMULATION_SW_BF16_H
