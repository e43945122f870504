// Matrix-vector products for CPU decode: y[b, n] = scale[n] * sum_k x[b, k] * W[n, k], for a few rows
// of x (b < B, decode batch) and weights in fp32, bf16, int8 (one scale per output row) or int4 (one
// scale per output row and group of 64 columns).
//
// Why our own: decode reads every weight once per token, so it is bound by memory bandwidth. torch's
// fp32 GEMV here reaches about half of the DRAM read rate, its bf16 path converts slowly, and its CPU
// int8 weight-only matmul is slower than fp32. These loops stream the weights once, widen them to fp32
// in registers (bf16: a 16-bit shift; int8: sign-extend and convert), and multiply them with every
// row of x while they sit in L1, accumulating in fp32. Built once per instruction set (cpu_tiles.h:
// portable, AVX2, AVX-512, VNNI, BF16; the x86 builds multiply int8 / int4 weights with activations
// quantized to int8 once per call, in integer dots, and the BF16 build bf16 weights with bf16 ones); compiled at first use (backends/cpu/kernels.py), called
// through ctypes, no torch headers.
//
// Layout: weights are packed in tiles of 4 output rows, [N / 4, K / 8, 4, 8] (bf16: [N / 4, K / 16, 4,
// 16], interleaved, see cpu_tiles.h; N padded to a multiple of 4 with zero rows): a tile is one contiguous run that the kernel reads strictly
// in order, which the hardware prefetcher follows much better than four interleaved row streams
// (int8: 1.6x faster on one core here). rwkv_zoo.inference packs them once when a model is prepared.
//
// fp32 weights with many rows (prefill, B >= rz::DOT_MIN_ROWS) take cpu_tiles.h's dot_gemm instead:
// the same tile kernels' sums (a row's result does not depend on the rows beside it), blocked so that
// x and the weights are read from the caches.
#include "cpu_tiles.h"

#include <memory>

namespace {

void gemv(int64_t kind, const float* x, int64_t B, int64_t K, int64_t ldx, const void* W, const float* scale,
          int64_t N, float* y, int64_t ldy, int nthreads) {
    if (kind == rz::F32 && B >= rz::DOT_MIN_ROWS) {
        // fp32 with many rows (prefill): the blocked form of the tile kernels (cpu_tiles.h's dot_gemm). Its
        // scratch (packed x, 1.6 MiB at 512 x 768) is kept across calls of this thread rather than
        // allocated and faulted in per call.
        static thread_local std::unique_ptr<float[]> buf;
        static thread_local int64_t have = 0;
        const int64_t need = rz::dot_scratch_floats(B, K, nthreads);
        if (need > have) buf.reset(new float[need]), have = need;
        const rz::DotJob job = {x, ldx, static_cast<const float*>(W), K, N, y, ldy};
        float* scratch = buf.get();  // thread_local: the pointer, not the name, goes into the parallel region
#pragma omp parallel num_threads(nthreads)
        rz::dot_gemm(&job, 1, B, scratch, [] {
#pragma omp barrier
        });
        return;
    }
    const int64_t tiles = N / 4;
    // Many rows of bf16 / int8 / int4 weights: blocks of rows (~2 MiB of inputs, most of a core's share of L3), each
    // multiplied with every tile, so a tile's weights are read from memory once per block. Measured at
    // 512 x 768 and 512 x 3072 inputs: L2-sized blocks (192 KiB) ran 10-20 % slower than 1-2 MiB ones,
    // which ran as fast as no blocking at all.
    int64_t rb = (2 * 1024 * 1024 / 4) / K;
    rb = rb < 3 ? 3 : rb - rb % 3;
    // Builds whose kernels take quantized activations (cpu_tiles.h's needs_prep) convert every row once.
    const bool prep = rz::needs_prep(kind, K);
    const int64_t ldq = prep ? rz::prep_row_bytes(kind, K) : 0;
    std::unique_ptr<uint8_t[]> xq(prep ? new uint8_t[B * ldq + 64] : nullptr);
    uint8_t* q = prep ? xq.get() + (64 - reinterpret_cast<uintptr_t>(xq.get()) % 64) % 64 : nullptr;
#pragma omp parallel num_threads(nthreads)
    {
        if (prep) {
#pragma omp for
            for (int64_t b = 0; b < B; ++b) rz::prep_row(kind, x + b * ldx, K, q + b * ldq);
        }
        for (int64_t b0 = 0; b0 < B; b0 += rb) {
            const int64_t nb = B - b0 < rb ? B - b0 : rb;
            // Dynamic chunks of tiles: on a shared machine one thread can lose its core for a time slice,
            // and a static split would make the other wait for it at the end.
#pragma omp for schedule(dynamic, 16)
            for (int64_t t = 0; t < tiles; ++t)
                rz::tile_rows(kind, x + b0 * ldx, nb, ldx, prep ? q + b0 * ldq : nullptr, ldq, W, t, K, scale,
                              y + b0 * ldy + 4 * t, ldy);
        }
    }
}

}  // namespace

extern "C" {

int rz_abi_version() { return 6; }

// The instruction set this build was compiled for (cpu_tiles.h's isa_name).
const char* rz_isa() { return rz::isa_name(); }

// x [B, K] (row stride ldx), W packed as backends/cpu/kernels.py's pack does, y [B, N] (row stride ldy);
// N % 4 == 0. kind: 0 fp32, 1 bf16, 2 int8 (scale [N]), 3 int4 (scale [N / 4, K / 64, 4]).
void rz_gemv(int64_t kind, const float* x, int64_t B, int64_t K, int64_t ldx, const void* W, const float* scale,
             int64_t N, float* y, int64_t ldy, int nthreads) {
    gemv(kind, x, B, K, ldx, W, scale, N, y, ldy, nthreads);
}

}  // extern "C"
