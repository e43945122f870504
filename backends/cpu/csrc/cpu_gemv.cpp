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
// Layout: weights are packed in tiles of 4 output rows, [N / 4, K / 8, 4, 8] (bf16: [N / 4, K / 16, 4,
// 16], interleaved, see cpu_tiles.h; N padded to a multiple of 4 with zero rows): a tile is one contiguous run that the kernel reads strictly
// in order, which the hardware prefetcher follows much better than four interleaved row streams
// (int8: 1.6x faster on one core here). rwkv_zoo.inference packs them once when a model is prepared.
#include "cpu_tiles.h"

namespace {

template <typename WT>
void gemv(const float* x, int64_t B, int64_t K, int64_t ldx, const WT* W, const float* scale, int64_t N, float* y,
          int64_t ldy, int nthreads) {
    const int64_t tiles = N / 4;
    // Many rows (prefill): blocks of rows (~2 MiB of inputs, most of a core's share of L3), each
    // multiplied with every tile, so a tile's weights are read from memory once per block. Measured at
    // 512 x 768 and 512 x 3072 inputs: L2-sized blocks (192 KiB) ran 10-20 % slower than 1-2 MiB ones,
    // which ran as fast as no blocking at all.
    int64_t rb = (2 * 1024 * 1024 / 4) / K;
    rb = rb < 3 ? 3 : rb - rb % 3;
#pragma omp parallel num_threads(nthreads)
    for (int64_t b0 = 0; b0 < B; b0 += rb) {
        const int64_t nb = B - b0 < rb ? B - b0 : rb;
        // Dynamic chunks of tiles: on a shared machine one thread can lose its core for a time slice,
        // and a static split would make the other wait for it at the end.
#pragma omp for schedule(dynamic, 16)
        for (int64_t t = 0; t < tiles; ++t) {
            const WT* p = W + t * 4 * K;
            const float* s = scale ? scale + 4 * t : nullptr;
            rz::tile_rows(x + b0 * ldx, nb, ldx, p, K, s, y + b0 * ldy + 4 * t, ldy);
        }
    }
}

}  // namespace

extern "C" {

int rz_abi_version() { return 3; }

// x [B, K] (row stride ldx), W packed as rwkv_zoo.cpu_kernels.pack does, y [B, N] (row stride ldy); N % 4 == 0.
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
