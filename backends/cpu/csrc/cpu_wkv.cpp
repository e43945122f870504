// Forward-only WKV recurrences for the CPU (inference: prefill and decode), fp32, state in and out.
//
// Why not the chunked matrix form here: at inference sizes on a CPU the literal recurrence, written as
// loops the compiler vectorizes, does far less work than the chunk form's pairwise-decay tensors (for
// wkv4 the chunk form spends more time in exp than the whole model spends in GEMMs), and it needs no
// scratch. One OpenMP task per (batch, head) (wkv4: per batch and block of channels); the [K, V] state of a
// head (16 KiB at N = 64) stays in L1 while the task walks t. Formulas: rwkv_zoo/ops.py, and the
// reference recurrences in backends/reference/recurrent.py; state is key-first [B, H, K, V].
// Built with -ffast-math so expf vectorizes through libmvec; inputs are finite (the v4 running maximum
// starts at -1e30, not -inf).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" {

int rz_wkv_abi_version() { return 1; }

// wkv4: w, u [C]; k, v [B, T, C]; state a, b, p [B, C] (read from *_0, written to *_T); y [B, T, C].
void rz_wkv4(const float* w, const float* u, const float* k, const float* v, const float* a0, const float* b0,
             const float* p0, float* y, float* aT, float* bT, float* pT, int64_t B, int64_t T, int64_t C,
             int nthreads) {
    const int64_t CB = 64;
    const int64_t nblk = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t task = 0; task < B * nblk; ++task) {
        const int64_t b = task / nblk, c0 = (task % nblk) * CB;
        const int64_t n = C - c0 < CB ? C - c0 : CB;
        float A[64], Bs[64], P[64];
        memcpy(A, a0 + b * C + c0, n * sizeof(float));
        memcpy(Bs, b0 + b * C + c0, n * sizeof(float));
        memcpy(P, p0 + b * C + c0, n * sizeof(float));
        const float* wc = w + c0;
        const float* uc = u + c0;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t base = (b * T + t) * C + c0;
            const float* kt = k + base;
            const float* vt = v + base;
            float* yt = y + base;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
                const float kk = kt[i], vv = vt[i], p = P[i];
                // output: the current token with the bonus u, the past with its running maximum p
                const float ww = uc[i] + kk;
                const float q = p > ww ? p : ww;
                const float e1 = expf(p - q), e2 = expf(ww - q);
                yt[i] = (e1 * A[i] + e2 * vv) / (e1 * Bs[i] + e2);
                // update: decay the past by exp(w), add the current token without the bonus
                const float pw = p + wc[i];
                const float q2 = pw > kk ? pw : kk;
                const float f1 = expf(pw - q2), f2 = expf(kk - q2);
                A[i] = f1 * A[i] + f2 * vv;
                Bs[i] = f1 * Bs[i] + f2;
                P[i] = q2;
            }
        }
        memcpy(aT + b * C + c0, A, n * sizeof(float));
        memcpy(bT + b * C + c0, Bs, n * sizeof(float));
        memcpy(pT + b * C + c0, P, n * sizeof(float));
    }
}

// wkv5/wkv6: r, k, v [B, T, H, N]; w log decay [B, T, H, N] (w_per_token) or [H, N]; u [H, N];
// s0, sT [B, H, N, N]; y [B, T, H, N]. y_t = r_t^T (S + diag(u) k_t v_t^T), S = diag(e^w_t) S + k_t v_t^T.
void rz_wkv6(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
             const float* s0, float* y, float* sT, int64_t B, int64_t T, int64_t H, int64_t N, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> S(N * N), acc(N), decay(N);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            memcpy(S.data(), s0 + bh * N * N, N * N * sizeof(float));
            const float* uh = u + h * N;
            for (int64_t t = 0; t < T; ++t) {
                const int64_t base = ((b * T + t) * H + h) * N;
                const float* rt = r + base;
                const float* kt = k + base;
                const float* vt = v + base;
                const float* wt = w_per_token ? w + base : w + h * N;
#pragma omp simd
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(wt[i]);
                for (int64_t j = 0; j < N; ++j) acc[j] = 0.f;
                for (int64_t i = 0; i < N; ++i) {
                    const float ri = rt[i], ki = kt[i], uki = uh[i] * ki, di = decay[i];
                    float* row = S.data() + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) {
                        acc[j] += ri * (row[j] + uki * vt[j]);
                        row[j] = row[j] * di + ki * vt[j];
                    }
                }
                memcpy(y + base, acc.data(), N * sizeof(float));
            }
            memcpy(sT + bh * N * N, S.data(), N * N * sizeof(float));
        }
    }
}

// wkv7: r, w, k, v, a, b [B, T, H, N]; S_t = diag(e^w_t) S + b_t (a_t^T S) + k_t v_t^T; y_t = S_t^T r_t.
void rz_wkv7(const float* r, const float* w, const float* k, const float* v, const float* a, const float* bb,
             const float* s0, float* y, float* sT, int64_t B, int64_t T, int64_t H, int64_t N, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> S(N * N), sa(N), acc(N), decay(N);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            memcpy(S.data(), s0 + bh * N * N, N * N * sizeof(float));
            for (int64_t t = 0; t < T; ++t) {
                const int64_t base = ((b * T + t) * H + h) * N;
                const float* rt = r + base;
                const float* kt = k + base;
                const float* vt = v + base;
                const float* at = a + base;
                const float* bt = bb + base;
                const float* wt = w + base;
#pragma omp simd
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(wt[i]);
                // every term of the update reads the previous state: a^T S first
                for (int64_t j = 0; j < N; ++j) sa[j] = 0.f, acc[j] = 0.f;
                for (int64_t i = 0; i < N; ++i) {
                    const float ai = at[i];
                    const float* row = S.data() + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) sa[j] += ai * row[j];
                }
                for (int64_t i = 0; i < N; ++i) {
                    const float di = decay[i], bi = bt[i], ki = kt[i], ri = rt[i];
                    float* row = S.data() + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) {
                        const float s = row[j] * di + bi * sa[j] + ki * vt[j];
                        row[j] = s;
                        acc[j] += ri * s;
                    }
                }
                memcpy(y + base, acc.data(), N * sizeof(float));
            }
            memcpy(sT + bh * N * N, S.data(), N * N * sizeof(float));
        }
    }
}

}  // extern "C"
