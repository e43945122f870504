// WKV forward and backward for training on the CPU, fp32: wkv7, wkv6 and wkv5 (wkv5 is wkv6 with one
// log decay per head, w_per_token = 0).
//
// Why the sequential recurrence and not the chunked matrix form: at the sizes people train on a CPU
// (head size 16-64, a few heads, T up to a few thousand) one (batch, head) task walking t with its
// [K, V] state in L1 does ~4 N^2 flops per token forward and ~20 N^2 backward, all of it in loops the
// compiler vectorizes, with no pairwise-decay tensors, no exp of pairwise spans and no scratch beyond
// a few states. Measured against the PyTorch chunk kernels (tests/benchmarks/bench_cpu_train.py) the
// WKV part then costs a few percent of a training step at 4 x 256; the model's GEMMs dominate.
//
// Backward needs the state before every token, read in reverse. Storing all T states would cost
// T * N^2 floats per (batch, head); instead the forward stores the state entering every chunk of
// `L` tokens (ckpt [B, H, ceil(T / L), K, V]) and the backward walks the chunks last to first,
// recomputes the chunk's states from its checkpoint into a per-thread buffer ((L + 1) states, L2
// sized), then walks the chunk's tokens backwards. The gradient of the final state (dsT, may be null)
// seeds the running state gradient, and what is left of it at t = 0 is the initial state's gradient.
//
// Layouts: r, k, v, w, a, b, y and their gradients [B, T, H, N]; states [B, H, K, V] key-first, V
// contiguous. Parameters shared across the batch (u [H, N]; wkv5's w [H, N]) get per-(batch, head)
// partial gradients [B, H, N] that the caller sums over B: no atomics, one writer per element.
// Formulas: backends/reference/recurrent.py (the oracle).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

// N fixed at compile time for the common head sizes (full unrolling, vectors in registers); NN = 0
// takes it from the call.
template <int NN>
struct Dim {
    int64_t n;
    explicit Dim(int64_t n_) : n(NN ? NN : n_) {}
    inline int64_t operator()() const { return NN ? NN : n; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// wkv6 / wkv5: y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

template <int NN>
void wkv6_fwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
              const float* s0, float* y, float* sT, float* ckpt, int64_t B, int64_t T, int64_t H, int64_t N_,
              int64_t L, int nthreads) {
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> Sv(N * N), accv(N), decayv(N);
        float* S = Sv.data();
        float* acc = accv.data();
        float* decay = decayv.data();
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            memcpy(S, s0 + bh * N * N, N * N * sizeof(float));
            const float* uh = u + h * N;
            if (!w_per_token)
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(w[h * N + i]);
            for (int64_t t = 0; t < T; ++t) {
                if (t % L == 0) memcpy(ckpt + (bh * nc + t / L) * N * N, S, N * N * sizeof(float));
                const int64_t base = ((b * T + t) * H + h) * N;
                const float *rt = r + base, *kt = k + base, *vt = v + base;
                if (w_per_token) {
                    const float* wt = w + base;
#pragma omp simd
                    for (int64_t i = 0; i < N; ++i) decay[i] = expf(wt[i]);
                }
                for (int64_t j = 0; j < N; ++j) acc[j] = 0.f;
                for (int64_t i = 0; i < N; ++i) {
                    const float ri = rt[i], ki = kt[i], uki = uh[i] * ki, di = decay[i];
                    float* row = S + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) {
                        acc[j] += ri * (row[j] + uki * vt[j]);
                        row[j] = row[j] * di + ki * vt[j];
                    }
                }
                memcpy(y + base, acc, N * sizeof(float));
            }
            memcpy(sT + bh * N * N, S, N * N * sizeof(float));
        }
    }
}

// dw: [B, T, H, N] when w_per_token, else partial sums [B, H, N]; du: partial sums [B, H, N].
template <int NN>
void wkv6_bwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
              const float* ckpt, const float* dy, const float* dsT, float* dr, float* dk, float* dv, float* dw,
              float* du, float* ds0, int64_t B, int64_t T, int64_t H, int64_t N_, int64_t L, int nthreads) {
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> bufv(L * N * N), dSv(N * N), dvv(N), duv(N), dwv(N), decayv(N);
        float *buf = bufv.data(), *dS = dSv.data(), *dvacc = dvv.data(), *duacc = duv.data(), *dwacc = dwv.data();
        float* decay = decayv.data();
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const float* uh = u + h * N;
            if (dsT)
                memcpy(dS, dsT + bh * N * N, N * N * sizeof(float));
            else
                memset(dS, 0, N * N * sizeof(float));
            for (int64_t i = 0; i < N; ++i) duacc[i] = 0.f, dwacc[i] = 0.f;
            if (!w_per_token)
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(w[h * N + i]);
            for (int64_t c = nc - 1; c >= 0; --c) {
                const int64_t t0 = c * L, len = (T - t0 < L) ? T - t0 : L;
                // Recompute the states entering each token of the chunk: buf[m] = S_{t0 + m - 1}.
                memcpy(buf, ckpt + (bh * nc + c) * N * N, N * N * sizeof(float));
                for (int64_t m = 0; m + 1 < len; ++m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    const float *kt = k + base, *vt = v + base;
                    const float* prev = buf + m * N * N;
                    float* next = buf + (m + 1) * N * N;
                    for (int64_t i = 0; i < N; ++i) {
                        const float di = w_per_token ? expf(w[base + i]) : decay[i], ki = kt[i];
#pragma omp simd
                        for (int64_t j = 0; j < N; ++j) next[i * N + j] = prev[i * N + j] * di + ki * vt[j];
                    }
                }
                for (int64_t m = len - 1; m >= 0; --m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    const float *rt = r + base, *kt = k + base, *vt = v + base, *dyt = dy + base;
                    const float* S0 = buf + m * N * N;
                    if (w_per_token) {
                        const float* wt = w + base;
#pragma omp simd
                        for (int64_t i = 0; i < N; ++i) decay[i] = expf(wt[i]);
                    }
                    float vdy = 0.f, ruk = 0.f;
#pragma omp simd reduction(+ : vdy)
                    for (int64_t j = 0; j < N; ++j) vdy += vt[j] * dyt[j];
                    for (int64_t j = 0; j < N; ++j) dvacc[j] = 0.f;
                    for (int64_t i = 0; i < N; ++i) {
                        const float ri = rt[i], ki = kt[i], di = decay[i];
                        const float* s0r = S0 + i * N;
                        float* g = dS + i * N;  // gradient of S_t, row i
                        float s_dy = 0.f, g_v = 0.f, g_s = 0.f;
#pragma omp simd reduction(+ : s_dy, g_v, g_s)
                        for (int64_t j = 0; j < N; ++j) {
                            s_dy += s0r[j] * dyt[j];
                            g_v += g[j] * vt[j];
                            g_s += g[j] * s0r[j];
                            dvacc[j] += ki * g[j];
                            g[j] = di * g[j] + ri * dyt[j];  // now the gradient of S_{t-1}
                        }
                        const float uk = uh[i] * ki;
                        dr[base + i] = s_dy + uk * vdy;
                        dk[base + i] = ri * uh[i] * vdy + g_v;
                        duacc[i] += ri * ki * vdy;
                        ruk += ri * uk;
                        if (w_per_token)
                            dw[base + i] = di * g_s;
                        else
                            dwacc[i] += di * g_s;
                    }
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) dv[base + j] = dvacc[j] + ruk * dyt[j];
                }
            }
            memcpy(ds0 + bh * N * N, dS, N * N * sizeof(float));
            memcpy(du + bh * N, duacc, N * sizeof(float));
            if (!w_per_token) memcpy(dw + bh * N, dwacc, N * sizeof(float));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// wkv7: S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T, y_t = S_t^T r_t

// One step: next = diag(d) prev + b sa^T + k v^T with sa = prev^T a (written to sa).
template <int NN>
inline void wkv7_step(const float* prev, float* next, const float* d, const float* a, const float* bb,
                      const float* kt, const float* vt, float* sa, int64_t N_) {
    const int64_t N = Dim<NN>(N_)();
    for (int64_t j = 0; j < N; ++j) sa[j] = 0.f;
    for (int64_t i = 0; i < N; ++i) {
        const float ai = a[i];
        const float* row = prev + i * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) sa[j] += ai * row[j];
    }
    for (int64_t i = 0; i < N; ++i) {
        const float di = d[i], bi = bb[i], ki = kt[i];
        const float* row = prev + i * N;
        float* out = next + i * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) out[j] = row[j] * di + bi * sa[j] + ki * vt[j];
    }
}

template <int NN>
void wkv7_fwd(const float* r, const float* w, const float* k, const float* v, const float* a, const float* bb,
              const float* s0, float* y, float* sT, float* ckpt, int64_t B, int64_t T, int64_t H, int64_t N_,
              int64_t L, int nthreads) {
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> Sv(N * N), sav(N), accv(N), decayv(N);
        float *S = Sv.data(), *sa = sav.data(), *acc = accv.data(), *decay = decayv.data();
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            memcpy(S, s0 + bh * N * N, N * N * sizeof(float));
            for (int64_t t = 0; t < T; ++t) {
                if (t % L == 0) memcpy(ckpt + (bh * nc + t / L) * N * N, S, N * N * sizeof(float));
                const int64_t base = ((b * T + t) * H + h) * N;
                const float *rt = r + base, *wt = w + base, *kt = k + base, *vt = v + base, *at = a + base,
                            *bt = bb + base;
#pragma omp simd
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(wt[i]);
                for (int64_t j = 0; j < N; ++j) sa[j] = 0.f, acc[j] = 0.f;
                for (int64_t i = 0; i < N; ++i) {
                    const float ai = at[i];
                    const float* row = S + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) sa[j] += ai * row[j];
                }
                for (int64_t i = 0; i < N; ++i) {
                    const float di = decay[i], bi = bt[i], ki = kt[i], ri = rt[i];
                    float* row = S + i * N;
#pragma omp simd
                    for (int64_t j = 0; j < N; ++j) {
                        const float s = row[j] * di + bi * sa[j] + ki * vt[j];
                        row[j] = s;
                        acc[j] += ri * s;
                    }
                }
                memcpy(y + base, acc, N * sizeof(float));
            }
            memcpy(sT + bh * N * N, S, N * N * sizeof(float));
        }
    }
}

// With G = dS_t + r_t dy_t^T (the gradient reaching S_t), sa = S_{t-1}^T a_t, d = exp(w_t):
//   dr = S_t dy, dk = G v, dv = G^T k, db = G sa, dsa = G^T b, dw = d * rowsum(G o S_{t-1}),
//   da = S_{t-1} dsa, dS_{t-1} = diag(d) G + a dsa^T.
template <int NN>
void wkv7_bwd(const float* r, const float* w, const float* k, const float* v, const float* a, const float* bb,
              const float* ckpt, const float* dy, const float* dsT, float* dr, float* dw, float* dk, float* dv,
              float* da, float* db, float* ds0, int64_t B, int64_t T, int64_t H, int64_t N_, int64_t L,
              int nthreads) {
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
#pragma omp parallel num_threads(nthreads)
    {
        // buf[m] = S_{t0 + m - 1}; the state after the chunk's last token is buf[len].
        std::vector<float> bufv((L + 1) * N * N), dSv(N * N), sav(L * N), decv(L * N), dvv(N), dsav(N);
        float *buf = bufv.data(), *dS = dSv.data(), *saall = sav.data(), *decall = decv.data();
        float *dvacc = dvv.data(), *dsa = dsav.data();
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            if (dsT)
                memcpy(dS, dsT + bh * N * N, N * N * sizeof(float));
            else
                memset(dS, 0, N * N * sizeof(float));
            for (int64_t c = nc - 1; c >= 0; --c) {
                const int64_t t0 = c * L, len = (T - t0 < L) ? T - t0 : L;
                memcpy(buf, ckpt + (bh * nc + c) * N * N, N * N * sizeof(float));
                for (int64_t m = 0; m < len; ++m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    float* d = decall + m * N;
#pragma omp simd
                    for (int64_t i = 0; i < N; ++i) d[i] = expf(w[base + i]);
                    wkv7_step<NN>(buf + m * N * N, buf + (m + 1) * N * N, d, a + base, bb + base, k + base,
                                  v + base, saall + m * N, N);
                }
                for (int64_t m = len - 1; m >= 0; --m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    const float *rt = r + base, *kt = k + base, *vt = v + base, *at = a + base, *bt = bb + base;
                    const float* dyt = dy + base;
                    const float *S0 = buf + m * N * N, *S1 = buf + (m + 1) * N * N;
                    const float *sa = saall + m * N, *d = decall + m * N;
                    for (int64_t j = 0; j < N; ++j) dvacc[j] = 0.f, dsa[j] = 0.f;
                    for (int64_t i = 0; i < N; ++i) {
                        const float ri = rt[i], ki = kt[i], bi = bt[i];
                        const float *s0r = S0 + i * N, *s1r = S1 + i * N;
                        float* g = dS + i * N;
                        float s_dy = 0.f, g_v = 0.f, g_sa = 0.f, g_s = 0.f;
#pragma omp simd reduction(+ : s_dy, g_v, g_sa, g_s)
                        for (int64_t j = 0; j < N; ++j) {
                            const float gij = g[j] + ri * dyt[j];
                            s_dy += s1r[j] * dyt[j];
                            g_v += gij * vt[j];
                            g_sa += gij * sa[j];
                            g_s += gij * s0r[j];
                            dvacc[j] += ki * gij;
                            dsa[j] += bi * gij;
                            g[j] = gij;
                        }
                        dr[base + i] = s_dy;
                        dk[base + i] = g_v;
                        db[base + i] = g_sa;
                        dw[base + i] = d[i] * g_s;
                    }
                    memcpy(dv + base, dvacc, N * sizeof(float));
                    for (int64_t i = 0; i < N; ++i) {
                        const float di = d[i], ai = at[i];
                        const float* s0r = S0 + i * N;
                        float* g = dS + i * N;
                        float s_dsa = 0.f;
#pragma omp simd reduction(+ : s_dsa)
                        for (int64_t j = 0; j < N; ++j) {
                            s_dsa += s0r[j] * dsa[j];
                            g[j] = di * g[j] + ai * dsa[j];
                        }
                        da[base + i] = s_dsa;
                    }
                }
            }
            memcpy(ds0 + bh * N * N, dS, N * N * sizeof(float));
        }
    }
}

}  // namespace

#define RZ_BY_N(FN, ...)                         \
    switch (N) {                                 \
        case 16: FN<16>(__VA_ARGS__); break;     \
        case 32: FN<32>(__VA_ARGS__); break;     \
        case 64: FN<64>(__VA_ARGS__); break;     \
        default: FN<0>(__VA_ARGS__); break;      \
    }

extern "C" {

int rz_wkv_train_abi_version() { return 1; }

void rz_wkv6_fwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
                 const float* s0, float* y, float* sT, float* ckpt, int64_t B, int64_t T, int64_t H, int64_t N,
                 int64_t L, int nthreads) {
    RZ_BY_N(wkv6_fwd, r, k, v, w, w_per_token, u, s0, y, sT, ckpt, B, T, H, N, L, nthreads)
}

void rz_wkv6_bwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
                 const float* ckpt, const float* dy, const float* dsT, float* dr, float* dk, float* dv, float* dw,
                 float* du, float* ds0, int64_t B, int64_t T, int64_t H, int64_t N, int64_t L, int nthreads) {
    RZ_BY_N(wkv6_bwd, r, k, v, w, w_per_token, u, ckpt, dy, dsT, dr, dk, dv, dw, du, ds0, B, T, H, N, L, nthreads)
}

void rz_wkv7_fwd(const float* r, const float* w, const float* k, const float* v, const float* a, const float* bb,
                 const float* s0, float* y, float* sT, float* ckpt, int64_t B, int64_t T, int64_t H, int64_t N,
                 int64_t L, int nthreads) {
    RZ_BY_N(wkv7_fwd, r, w, k, v, a, bb, s0, y, sT, ckpt, B, T, H, N, L, nthreads)
}

void rz_wkv7_bwd(const float* r, const float* w, const float* k, const float* v, const float* a, const float* bb,
                 const float* ckpt, const float* dy, const float* dsT, float* dr, float* dw, float* dk, float* dv,
                 float* da, float* db, float* ds0, int64_t B, int64_t T, int64_t H, int64_t N, int64_t L,
                 int nthreads) {
    RZ_BY_N(wkv7_bwd, r, w, k, v, a, bb, ckpt, dy, dsT, dr, dw, dk, dv, da, db, ds0, B, T, H, N, L, nthreads)
}

}  // extern "C"
