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
// partial gradients that are summed over B after the parallel loop: no atomics, one writer per element.
// Formulas: backends/reference/recurrent.py (the oracle).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// Software prefetch of tokens [t, t + n) of one (batch, head) in [B, T, H, N] tensors (the row of token
// t starts at ptr + t * stride). A task reads one N-float row (one cache line at N = 16) every H * N
// floats, backwards in the backward, from tensors that the rest of the training step has long evicted
// to DRAM: at the ablation shape (B = 16, T = 32, H = 4, N = 16) the wkv6 backward took 0.55 ms with
// warm caches and 1.4 ms after a cache flush, i.e. it waited on memory most of the time. Fetching the
// next chunk's rows while this chunk computes overlaps those misses with the work.
template <bool WRITE>
inline void prefetch_rows(const float* ptr, int64_t t, int64_t n, int64_t stride, int64_t N) {
    for (int64_t m = 0; m < n; ++m)
        for (int64_t off = 0; off < N; off += 16) {
            __builtin_prefetch(ptr + (t + m) * stride + off, WRITE, 3);
            // GCC 12 deletes a loop nest whose only statements are prefetches once it is inlined into
            // other code (no prefetch left in the object at -O1 and above); an empty volatile asm keeps it.
            __asm__ __volatile__("");
        }
}

// ------------------------------------------------------------------------------------------------
// wkv6 / wkv5: y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

// Per-thread scratch of n floats: on the stack when the head size is a compile-time constant (the
// compiler then keeps small accumulators such as y_t in registers: it knows no store to the state can
// reach them), else on the heap.
template <int NN>
struct Scratch {
    alignas(64) float fixed[NN ? NN : 1];
    std::vector<float> dyn;
    explicit Scratch(int64_t n) : dyn(NN ? 0 : n) {}
    inline float* get() { return NN ? fixed : dyn.data(); }
};

template <int NN>
void wkv6_fwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
              const float* s0, float* y, float* sT, float* ckpt, int64_t B, int64_t T, int64_t H, int64_t N_,
              int64_t L, int nthreads) {
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> Sv(N * N);
        Scratch<NN> accs(N), decays(N);
        float* __restrict__ S = Sv.data();
        float* __restrict__ acc = accs.get();
        float* __restrict__ decay = decays.get();
        // Tokens [t, t + n) of task bh (clipped to T) on their way into the cache.
        auto fetch = [&](int64_t bh, int64_t t, int64_t n) {
            if (bh >= B * H || t >= T) return;
            n = n < T - t ? n : T - t;
            const int64_t at = ((bh / H) * T * H + bh % H) * N, stride = H * N;
            prefetch_rows<false>(r + at, t, n, stride, N);
            prefetch_rows<false>(k + at, t, n, stride, N);
            prefetch_rows<false>(v + at, t, n, stride, N);
            if (w_per_token) prefetch_rows<false>(w + at, t, n, stride, N);
            prefetch_rows<true>(y + at, t, n, stride, N);
        };
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            memcpy(S, s0 + bh * N * N, N * N * sizeof(float));
            const float* uh = u + h * N;
            if (!w_per_token)
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(w[h * N + i]);
            fetch(bh, 0, L);
            for (int64_t t = 0; t < T; ++t) {
                if (t % L == 0) {
                    memcpy(ckpt + (bh * nc + t / L) * N * N, S, N * N * sizeof(float));
                    if (t + L < T)
                        fetch(bh, t + L, L);
                    else
                        fetch(bh + 1, 0, L);
                }
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
                float* yt = y + base;
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) yt[j] = acc[j];
            }
            memcpy(sT + bh * N * N, S, N * N * sizeof(float));
        }
    }
}

// Copy an N x N state, transposing it when TR.
template <bool TR>
inline void copy_state(float* dst, const float* src, int64_t N) {
    if (TR) {
        for (int64_t i = 0; i < N; ++i)
            for (int64_t j = 0; j < N; ++j) dst[j * N + i] = src[i * N + j];
    } else {
        memcpy(dst, src, N * N * sizeof(float));
    }
}

// Backward at N = 16 walks the states transposed (value-major: ST[j * N + i] = S[i, j]) and keeps the
// state gradient the same way (TR). Of the per-token sums, S_{t-1} dy, dS_t v and rowsum(dS_t o S_{t-1})
// then run over the rows into vector accumulators over the key index (6 AVX2 registers at N = 16) and
// only dS_t^T k needs a horizontal sum: 1 per row where the key-major walk needs 3, which were most of
// its instructions at N = 16 (the backward at the quick shape: 1.36x with warm caches). From N = 32 on
// the accumulators no longer fit in registers and the key-major walk does fewer loads and stores.
// Checkpoints (key-major, as the forward writes them), dsT and ds0 are transposed once per chunk / task.
// dw: [B, T, H, N] when w_per_token, else [H, N]; du: [H, N] (the sums over the batch are taken here,
// serially and in batch order after the parallel loop: deterministic for any thread count).
template <int NN>
void wkv6_bwd(const float* r, const float* k, const float* v, const float* w, int w_per_token, const float* u,
              const float* ckpt, const float* dy, const float* dsT, float* dr, float* dk, float* dv, float* dw,
              float* du, float* ds0, int64_t B, int64_t T, int64_t H, int64_t N_, int64_t L, int nthreads) {
    constexpr bool TR = NN == 16;
    const int64_t N = Dim<NN>(N_)();
    const int64_t nc = ceil_div(T, L);
    // Per-(batch, head) partial sums of the shared parameters' gradients: one writer per element.
    std::vector<float> dupart(B * H * N), dwpart(w_per_token ? 0 : B * H * N);
#pragma omp parallel num_threads(nthreads)
    {
        // buf[m] = S_{t0 + m - 1} (transposed when TR); decall[m]: the chunk's per-token decays exp(w),
        // computed once (vectorized) for both passes.
        std::vector<float> bufv(L * N * N), dSv(N * N), decv(L * N), dvv(N);
        float *buf = bufv.data(), *decall = decv.data();
        float* __restrict__ dS = dSv.data();  // gradient of S_t (transposed when TR)
        float* __restrict__ dvacc = dvv.data();
        Scratch<NN> sdys(N), gvs(N), gss(N), duaccs(N), dwaccs(N), decays(N);
        float *__restrict__ sdy = sdys.get(), *__restrict__ gv = gvs.get(), *__restrict__ gs = gss.get();
        float *__restrict__ duacc = duaccs.get(), *__restrict__ dwacc = dwaccs.get(), *decay = decays.get();
        // Chunk c of task bh on its way into the cache: inputs, checkpoint and the gradients' rows.
        auto fetch = [&](int64_t bh, int64_t c) {
            if (bh >= B * H) return;
            const int64_t t = c * L, n = T - t < L ? T - t : L;
            const int64_t at = ((bh / H) * T * H + bh % H) * N, stride = H * N;
            for (const float* x : {r, k, v, dy}) prefetch_rows<false>(x + at, t, n, stride, N);
            if (w_per_token) prefetch_rows<false>(w + at, t, n, stride, N);
            prefetch_rows<false>(ckpt + (bh * nc + c) * N * N, 0, 1, 0, N * N);
            for (const float* x : {dr, dk, dv}) prefetch_rows<true>(x + at, t, n, stride, N);
            if (w_per_token) prefetch_rows<true>(dw + at, t, n, stride, N);
        };
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const float* uh = u + h * N;
            fetch(bh, nc - 1);
            if (dsT)
                copy_state<TR>(dS, dsT + bh * N * N, N);
            else
                memset(dS, 0, N * N * sizeof(float));
            for (int64_t i = 0; i < N; ++i) duacc[i] = 0.f, dwacc[i] = 0.f;
            if (!w_per_token)
                for (int64_t i = 0; i < N; ++i) decay[i] = expf(w[h * N + i]);
            for (int64_t c = nc - 1; c >= 0; --c) {
                const int64_t t0 = c * L, len = (T - t0 < L) ? T - t0 : L;
                if (c)
                    fetch(bh, c - 1);
                else
                    fetch(bh + 1, nc - 1);
                // Recompute the states entering each token of the chunk.
                copy_state<TR>(buf, ckpt + (bh * nc + c) * N * N, N);
                if (w_per_token)
                    for (int64_t m = 0; m < len; ++m) {
                        const float* wt = w + ((b * T + t0 + m) * H + h) * N;
                        float* dm = decall + m * N;
#pragma omp simd
                        for (int64_t i = 0; i < N; ++i) dm[i] = expf(wt[i]);
                    }
                for (int64_t m = 0; m + 1 < len; ++m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    const float *kt = k + base, *vt = v + base;
                    const float* __restrict__ prev = buf + m * N * N;
                    float* __restrict__ next = buf + (m + 1) * N * N;
                    const float* dm = w_per_token ? decall + m * N : decay;
                    for (int64_t o = 0; o < N; ++o) {
                        const float* p = prev + o * N;
                        float* q = next + o * N;
                        if (TR) {  // row o is column o of S
                            const float vo = vt[o];
#pragma omp simd
                            for (int64_t i = 0; i < N; ++i) q[i] = p[i] * dm[i] + vo * kt[i];
                        } else {
                            const float di = dm[o], ki = kt[o];
#pragma omp simd
                            for (int64_t j = 0; j < N; ++j) q[j] = p[j] * di + ki * vt[j];
                        }
                    }
                }
                for (int64_t m = len - 1; m >= 0; --m) {
                    const int64_t base = ((b * T + t0 + m) * H + h) * N;
                    const float *rt = r + base, *kt = k + base, *vt = v + base, *dyt = dy + base;
                    const float* __restrict__ S0 = buf + m * N * N;
                    const float* d = w_per_token ? decall + m * N : decay;
                    float vdy = 0.f, ruk = 0.f;
#pragma omp simd reduction(+ : vdy)
                    for (int64_t j = 0; j < N; ++j) vdy += vt[j] * dyt[j];
#pragma omp simd reduction(+ : ruk)
                    for (int64_t i = 0; i < N; ++i) ruk += rt[i] * uh[i] * kt[i];
                    float* dvt = dv + base;
                    if (TR) {
                        for (int64_t i = 0; i < N; ++i) sdy[i] = 0.f, gv[i] = 0.f, gs[i] = 0.f;
                        for (int64_t j = 0; j < N; ++j) {
                            const float dyj = dyt[j], vj = vt[j];
                            const float* s = S0 + j * N;
                            float* g = dS + j * N;  // column j of the gradient of S_t
                            float dvj = 0.f;
#pragma omp simd reduction(+ : dvj)
                            for (int64_t i = 0; i < N; ++i) {
                                sdy[i] += s[i] * dyj;
                                gv[i] += g[i] * vj;
                                gs[i] += g[i] * s[i];
                                dvj += kt[i] * g[i];
                                g[i] = d[i] * g[i] + rt[i] * dyj;  // now the gradient of S_{t-1}
                            }
                            dvt[j] = dvj + ruk * dyj;
                        }
                    } else {
                        for (int64_t j = 0; j < N; ++j) dvacc[j] = 0.f;
                        for (int64_t i = 0; i < N; ++i) {
                            const float ri = rt[i], ki = kt[i], di = d[i];
                            const float* s = S0 + i * N;
                            float* g = dS + i * N;  // row i of the gradient of S_t
                            float s_dy = 0.f, g_v = 0.f, g_s = 0.f;
#pragma omp simd reduction(+ : s_dy, g_v, g_s)
                            for (int64_t j = 0; j < N; ++j) {
                                s_dy += s[j] * dyt[j];
                                g_v += g[j] * vt[j];
                                g_s += g[j] * s[j];
                                dvacc[j] += ki * g[j];
                                g[j] = di * g[j] + ri * dyt[j];  // now the gradient of S_{t-1}
                            }
                            sdy[i] = s_dy, gv[i] = g_v, gs[i] = g_s;
                        }
#pragma omp simd
                        for (int64_t j = 0; j < N; ++j) dvt[j] = dvacc[j] + ruk * dyt[j];
                    }
#pragma omp simd
                    for (int64_t i = 0; i < N; ++i) {
                        dr[base + i] = sdy[i] + uh[i] * kt[i] * vdy;
                        dk[base + i] = rt[i] * uh[i] * vdy + gv[i];
                        duacc[i] += rt[i] * kt[i] * vdy;
                        if (w_per_token)
                            dw[base + i] = d[i] * gs[i];
                        else
                            dwacc[i] += d[i] * gs[i];
                    }
                }
            }
            copy_state<TR>(ds0 + bh * N * N, dS, N);  // a transpose is its own inverse
            memcpy(dupart.data() + bh * N, duacc, N * sizeof(float));
            if (!w_per_token) memcpy(dwpart.data() + bh * N, dwacc, N * sizeof(float));
        }
    }
    for (int64_t hn = 0; hn < H * N; ++hn) {
        float su = 0.f, sw = 0.f;
        for (int64_t b = 0; b < B; ++b) {
            su += dupart[b * H * N + hn];
            if (!w_per_token) sw += dwpart[b * H * N + hn];
        }
        du[hn] = su;
        if (!w_per_token) dw[hn] = sw;
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

// ------------------------------------------------------------------------------------------------
// wkv4, per channel: the state (a, b, p) stands for numerator a e^p and denominator b e^p. With only
// three numbers per channel, the forward stores the state entering every token (sa, sb, sp [B, T, C])
// and the backward is reverse mode over each step's formulas as written (the running maxima
// included: a tie between the two sides of a max splits the gradient in half, as torch.maximum does).
// w, u get per-sequence partial gradients [B, C].

// One task per (sequence, block of WKV4_CB channels), walking t, the channels of the block in SIMD lanes.
constexpr int64_t WKV4_CB = 64;

// Rows ahead that the wkv4 backward prefetches: each task walks t downwards over eight [B, T, C]
// tensors (6 read, 2 written) that are cache-cold in a training step. At the quick shape (B = 16, T = 32,
// C = 64, one thread) after a cache flush: 450-600 us against 815-975 without (1.6-1.8x, alternating
// A/B). The forward walks t upwards, which the hardware prefetcher follows: the same prefetch there
// gave 0.96-1.02x, so it has none.
constexpr int64_t WKV4_AHEAD = 4;

void wkv4_fwd(const float* w, const float* u, const float* k, const float* v, const float* a0, const float* b0,
              const float* p0, float* y, float* aT, float* bT, float* pT, float* sa, float* sb, float* sp,
              int64_t B, int64_t T, int64_t C, int nthreads) {
    const int64_t nblk = ceil_div(C, WKV4_CB);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t task = 0; task < B * nblk; ++task) {
        const int64_t b = task / nblk, c0 = (task % nblk) * WKV4_CB;
        const int64_t n = C - c0 < WKV4_CB ? C - c0 : WKV4_CB;
        float A[WKV4_CB], Bs[WKV4_CB], P[WKV4_CB];
        memcpy(A, a0 + b * C + c0, n * sizeof(float));
        memcpy(Bs, b0 + b * C + c0, n * sizeof(float));
        memcpy(P, p0 + b * C + c0, n * sizeof(float));
        const float *wc = w + c0, *uc = u + c0;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t base = (b * T + t) * C + c0;
            memcpy(sa + base, A, n * sizeof(float));
            memcpy(sb + base, Bs, n * sizeof(float));
            memcpy(sp + base, P, n * sizeof(float));
            const float *kt = k + base, *vt = v + base;
            float* yt = y + base;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const float kk = kt[j], vv = vt[j], p = P[j];
                const float ww = uc[j] + kk, q = p > ww ? p : ww;
                const float e1 = expf(p - q), e2 = expf(ww - q);
                yt[j] = (e1 * A[j] + e2 * vv) / (e1 * Bs[j] + e2);
                const float pw = p + wc[j], q2 = pw > kk ? pw : kk;
                const float f1 = expf(pw - q2), f2 = expf(kk - q2);
                A[j] = f1 * A[j] + f2 * vv;
                Bs[j] = f1 * Bs[j] + f2;
                P[j] = q2;
            }
        }
        memcpy(aT + b * C + c0, A, n * sizeof(float));
        memcpy(bT + b * C + c0, Bs, n * sizeof(float));
        memcpy(pT + b * C + c0, P, n * sizeof(float));
    }
}

// The share of g that max(x, y) passes to x (torch.maximum's backward: all of it to the larger side,
// half to each on a tie).
inline float max_share(float x, float y, float g) { return x > y ? g : (x == y ? 0.5f * g : 0.f); }

// daT, dbT, dpT may be null (no gradient on the final state).
void wkv4_bwd(const float* w, const float* u, const float* k, const float* v, const float* sa, const float* sb,
              const float* sp, const float* dy, const float* daT, const float* dbT, const float* dpT, float* dw,
              float* du, float* dk, float* dv, float* da0, float* db0, float* dp0, int64_t B, int64_t T, int64_t C,
              int nthreads) {
    const int64_t nblk = ceil_div(C, WKV4_CB);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t task = 0; task < B * nblk; ++task) {
        const int64_t b = task / nblk, c0 = (task % nblk) * WKV4_CB;
        const int64_t n = C - c0 < WKV4_CB ? C - c0 : WKV4_CB, s = b * C + c0;
        float gA[WKV4_CB], gB[WKV4_CB], gP[WKV4_CB], gw[WKV4_CB], gu[WKV4_CB];
        for (int64_t j = 0; j < n; ++j) {
            gA[j] = daT ? daT[s + j] : 0.f, gB[j] = dbT ? dbT[s + j] : 0.f, gP[j] = dpT ? dpT[s + j] : 0.f;
            gw[j] = 0.f, gu[j] = 0.f;
        }
        const float *wc = w + c0, *uc = u + c0;
        for (int64_t t = T - 1; t >= 0; --t) {
            const int64_t base = (b * T + t) * C + c0;
            if (t >= WKV4_AHEAD) {
                const int64_t ahead = base - WKV4_AHEAD * C;
                for (const float* x : {sa, sb, sp, k, v, dy}) prefetch_rows<false>(x + ahead, 0, 1, 0, n);
                for (const float* x : {dk, dv}) prefetch_rows<true>(x + ahead, 0, 1, 0, n);
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const int64_t i = base + j;
                const float A = sa[i], Bs = sb[i], P = sp[i], kk = k[i], vv = v[i];
                // update: A' = f1 A + f2 v, B' = f1 B + f2, P' = q2 = max(P + w, k)
                const float pw = P + wc[j], q2 = pw > kk ? pw : kk;
                const float f1 = expf(pw - q2), f2 = expf(kk - q2);
                const float gf1 = gA[j] * A + gB[j] * Bs, gf2 = gA[j] * vv + gB[j];
                const float gq2 = gP[j] - gf1 * f1 - gf2 * f2;
                const float gpw = gf1 * f1 + max_share(pw, kk, gq2);
                float gk = gf2 * f2 + max_share(kk, pw, gq2), gv = gA[j] * f2;
                float nA = gA[j] * f1, nB = gB[j] * f1, nP = gpw;
                gw[j] += gpw;
                // output: y = (e1 A + e2 v) / (e1 B + e2), e1 = exp(P - q), e2 = exp(u + k - q), q = max(P, u + k)
                const float ww = uc[j] + kk, q = P > ww ? P : ww;
                const float e1 = expf(P - q), e2 = expf(ww - q);
                const float den = e1 * Bs + e2, yy = (e1 * A + e2 * vv) / den;
                const float gnum = dy[i] / den, gden = -gnum * yy;
                const float ge1 = gnum * A + gden * Bs, ge2 = gnum * vv + gden;
                const float gq = -ge1 * e1 - ge2 * e2;
                nA += gnum * e1;
                nB += gden * e1;
                gv += gnum * e2;
                nP += ge1 * e1 + max_share(P, ww, gq);
                const float gww = ge2 * e2 + max_share(ww, P, gq);
                gu[j] += gww;
                dk[i] = gk + gww;
                dv[i] = gv;
                gA[j] = nA, gB[j] = nB, gP[j] = nP;
            }
        }
        memcpy(da0 + s, gA, n * sizeof(float));
        memcpy(db0 + s, gB, n * sizeof(float));
        memcpy(dp0 + s, gP, n * sizeof(float));
        memcpy(dw + s, gw, n * sizeof(float));
        memcpy(du + s, gu, n * sizeof(float));
    }
}

// ------------------------------------------------------------------------------------------------
// Token shift and its lerps in one pass: out[f, b, t] = lerp of x[b, t] and prev[b, t] with weights
// m = mix[f] (+ dyn[f, b, t] when dyn is given, v6's data-dependent part), prev[b, t] = x[b, t - 1]
// (shift[b] at t = 0). form 0 (v6, v7): x + (prev - x) * m; form 1 (v4, v5): x * m + prev * (1 - m),
// the same arithmetic per element as the PyTorch expressions they replace. At the ablation shapes the
// PyTorch version was a dozen memory-bound ops over [F, B, T, C] per block, forward and backward.
// Layouts: x [B, T, C], shift [B, C], mix [F, C], dyn [F, B, T, C]; out and the backward's g are F
// separate [B, T, C] planes (pointer arrays), so the caller neither stacks the F upstream gradients nor
// unbinds the output (a copy of all F planes per call in autograd's unbind backward). The backward writes
// dx, dshift, ddyn (when dyn) and per-sequence partial sums dmix [B, F, C] that the caller sums over B.

// One (sequence, token) row of the forward: FORM 0 delta, 1 lerp; DYN: dyn given (delta only). The
// branches are template parameters so that the inner loops vectorize.
template <int FORM, bool DYN>
inline void shift_mix_row(const float* xt, const float* pt, const float* mix, const float* dyn,
                          float* const* out, int64_t o, int64_t F, int64_t stride, int64_t C) {
    for (int64_t f = 0; f < F; ++f) {
        const float* mf = mix + f * C;
        const float* df = DYN ? dyn + f * stride + o : nullptr;
        float* ot = out[f] + o;
        if (FORM == 0) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                const float m = DYN ? mf[c] + df[c] : mf[c];
                ot[c] = xt[c] + (pt[c] - xt[c]) * m;
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) ot[c] = xt[c] * mf[c] + pt[c] * (1.f - mf[c]);
        }
    }
}

template <int FORM, bool DYN>
void shift_mix_fwd_t(const float* x, const float* shift, const float* mix, const float* dyn, float* const* out,
                     int64_t F,
                     int64_t B, int64_t T, int64_t C, int nthreads) {
    const int64_t stride = B * T * C;  // between the F planes of out and dyn
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + (b * T + t) * C;
            const float* pt = t ? xt - C : shift + b * C;
            const int64_t o = (b * T + t) * C;
            shift_mix_row<FORM, DYN>(xt, pt, mix, dyn, out, o, F, stride, C);
        }
    }
}

void shift_mix_fwd(const float* x, const float* shift, const float* mix, const float* dyn, float* const* out,
                   int form,
                   int64_t F, int64_t B, int64_t T, int64_t C, int nthreads) {
    if (form == 1)
        shift_mix_fwd_t<1, false>(x, shift, mix, nullptr, out, F, B, T, C, nthreads);
    else if (dyn)
        shift_mix_fwd_t<0, true>(x, shift, mix, dyn, out, F, B, T, C, nthreads);
    else
        shift_mix_fwd_t<0, false>(x, shift, mix, nullptr, out, F, B, T, C, nthreads);
}

// Rows ahead that the backward prefetches (4: 1.3x against none for F = 5 with dyn after a flush; 2
// and 8 did no better). The forward walks t upwards, which the hardware prefetcher follows: prefetching
// there made it slower (0.84x).
constexpr int64_t SHIFT_AHEAD = 4;

template <int FORM, bool DYN>
void shift_mix_bwd_t(const float* const* g, const float* x, const float* shift, const float* mix, const float* dyn,
                     float* dx, float* dshift, float* dmix, float* ddyn, int64_t F, int64_t B, int64_t T, int64_t C,
                     int nthreads) {
    const int64_t stride = B * T * C;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> carryv(C), prevgv(C);
        float *carry = carryv.data(), *prevg = prevgv.data();  // gradient of prev[b, t + 1], of prev[b, t]
        // Row (b, t) of every plane read or written, on its way into the cache SHIFT_AHEAD rows before
        // its turn: the planes are cache-cold in a training step (F = 5 with dyn at the quick shape:
        // 95 us with warm caches, 683 us after a flush).
        auto fetch = [&](int64_t b, int64_t t) {
            if (t < 0) t += T;  // the next sequence's last rows (b was advanced by the caller)
            if (b >= B || t < 0) return;
            const int64_t o = (b * T + t) * C;
            prefetch_rows<false>(x + o, 0, 1, 0, C);
            prefetch_rows<true>(dx + o, 0, 1, 0, C);
            for (int64_t f = 0; f < F; ++f) {
                prefetch_rows<false>(g[f] + o, 0, 1, 0, C);
                if (DYN) prefetch_rows<false>(dyn + f * stride + o, 0, 1, 0, C);
                if (DYN) prefetch_rows<true>(ddyn + f * stride + o, 0, 1, 0, C);
            }
        };
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            float* dm = dmix + b * F * C;
            memset(dm, 0, F * C * sizeof(float));
            memset(carry, 0, C * sizeof(float));
            for (int64_t t = T - 1; t >= 0; --t) {
                fetch(t >= SHIFT_AHEAD ? b : b + 1, t - SHIFT_AHEAD);
                const float* xt = x + (b * T + t) * C;
                const float* pt = t ? xt - C : shift + b * C;
                float* dxt = dx + (b * T + t) * C;
                for (int64_t c = 0; c < C; ++c) dxt[c] = carry[c], prevg[c] = 0.f;
                const int64_t o = (b * T + t) * C;
                for (int64_t f = 0; f < F; ++f) {
                    const float *gt = g[f] + o, *mf = mix + f * C;
                    float* dmf = dm + f * C;
                    if (FORM == 0) {
                        const float* df = DYN ? dyn + f * stride + o : nullptr;
                        float* ddf = DYN ? ddyn + f * stride + o : nullptr;
#pragma omp simd
                        for (int64_t c = 0; c < C; ++c) {
                            const float m = DYN ? mf[c] + df[c] : mf[c];
                            const float gm = gt[c] * m, gd = gt[c] * (pt[c] - xt[c]);
                            dxt[c] += gt[c] - gm;
                            prevg[c] += gm;
                            dmf[c] += gd;
                            if (DYN) ddf[c] = gd;
                        }
                    } else {
#pragma omp simd
                        for (int64_t c = 0; c < C; ++c) {
                            dxt[c] += gt[c] * mf[c];
                            prevg[c] += gt[c] * (1.f - mf[c]);
                            dmf[c] += gt[c] * (xt[c] - pt[c]);
                        }
                    }
                }
                memcpy(carry, prevg, C * sizeof(float));
            }
            memcpy(dshift + b * C, carry, C * sizeof(float));
        }
    }
}

void shift_mix_bwd(const float* const* g, const float* x, const float* shift, const float* mix, const float* dyn, int form,
                   float* dx, float* dshift, float* dmix, float* ddyn, int64_t F, int64_t B, int64_t T, int64_t C,
                   int nthreads) {
    if (form == 1)
        shift_mix_bwd_t<1, false>(g, x, shift, mix, nullptr, dx, dshift, dmix, nullptr, F, B, T, C, nthreads);
    else if (dyn)
        shift_mix_bwd_t<0, true>(g, x, shift, mix, dyn, dx, dshift, dmix, ddyn, F, B, T, C, nthreads);
    else
        shift_mix_bwd_t<0, false>(g, x, shift, mix, nullptr, dx, dshift, dmix, nullptr, F, B, T, C, nthreads);
}

// The channel-mix activation relu(x)^2 and its gradient 2 relu(x) g, one pass each (PyTorch spent five
// ops on it: clamp, square, and in backward two multiplies and a threshold).
void relu_sq_fwd(const float* x, float* y, int64_t n, int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) {
        const float r = x[i] > 0.f ? x[i] : 0.f;
        y[i] = r * r;
    }
}

void relu_sq_bwd(const float* x, const float* g, float* dx, int64_t n, int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.f ? 2.f * x[i] * g[i] : 0.f;
}

// tanh of v6's LoRA paths and its gradient g (1 - y^2) from the saved output. torch.tanh runs MKL's vsTanh,
// which on this AMD EPYC took 410-510 us for [512, 160] (the quick shape's mix LoRA) where glibc's
// vectorized tanhf (libmvec, what `omp simd` calls here) takes 130-160 us at the same accuracy (largest
// relative error against fp64 6e-8 for both).
void tanh_fwd(const float* x, float* y, int64_t n, int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) y[i] = tanhf(x[i]);
}

void tanh_bwd(const float* y, const float* g, float* dx, int64_t n, int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) dx[i] = g[i] * (1.f - y[i] * y[i]);
}

// ------------------------------------------------------------------------------------------------
// The channel-mix of v4-v7 as one op, forward and backward:
//   xk, xr = token shift and lerps of x (FORM 0 delta, 1 lerp; see shift_mix)
//   out    = sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T)      (v7: no receptance, out = relu(xk Wk^T)^2 Wv^T)
// Why one op with its own matrix products: at the ablation shapes (512 rows of 64 channels, dim_ffn 256)
// a channel-mix forward and backward took 3.0 ms on one thread (v4, warm caches), of which its nine
// matrix products took 2.0 ms on their own; the rest was a dozen memory-bound passes (shift-mix, relu^2,
// sigmoid, products, their backward) over [512, 256] and [512, 64] tensors that the rest of a training
// step had pushed out of the caches. Here the rows go through in blocks of RB: every intermediate of a
// block (the lerps, relu^2, the gradients between the products) lives in per-thread scratch that stays
// in L1/L2, and only what the backward needs goes to memory (relu's input, sigmoid's output, the value
// product). Products are C[M, N] (+)= A[M, K] B[K, N] with A read through two strides (so A^T costs no
// copy) and B by rows: the weights' transposes for the forward, the weights themselves, the block's
// activations for the weight gradients.

constexpr int64_t FFN_ROWS = 96;  // rows per block: scratch (4 C + 2 F) * 96 floats = 192 KiB at C 64, F 256

#if defined(__AVX2__) && defined(__FMA__)
// One MR x 16 tile of C over all of K: 2 MR accumulators, B's 16 columns as two vectors, A broadcast.
// TAIL: fewer than 16 columns left (masked loads and stores).
template <int MR, bool TAIL>
inline void mm_tile(int64_t K, const float* __restrict A, int64_t sam, int64_t sak, const float* __restrict B,
                    int64_t ldb, float* C, int64_t ldc, bool acc, int64_t nr) {
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    if (TAIL) {
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nr), idx);
        m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nr - 8), idx);
    }
    const __m256 z = _mm256_setzero_ps();
    __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z,
           c51 = z;
    const float* a = A;
    for (int64_t k = 0; k < K; ++k, a += sak) {
        const float* b = B + k * ldb;
        const __m256 b0 = TAIL ? _mm256_maskload_ps(b, m0) : _mm256_loadu_ps(b);
        const __m256 b1 = TAIL ? _mm256_maskload_ps(b + 8, m1) : _mm256_loadu_ps(b + 8);
        __m256 x = _mm256_broadcast_ss(a);
        c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
        if (MR > 1) x = _mm256_broadcast_ss(a + sam), c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
        if (MR > 2) x = _mm256_broadcast_ss(a + 2 * sam), c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
        if (MR > 3) x = _mm256_broadcast_ss(a + 3 * sam), c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
        if (MR > 4) x = _mm256_broadcast_ss(a + 4 * sam), c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
        if (MR > 5) x = _mm256_broadcast_ss(a + 5 * sam), c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    const __m256 lo[6] = {c00, c10, c20, c30, c40, c50}, hi[6] = {c01, c11, c21, c31, c41, c51};
    for (int i = 0; i < MR; ++i) {
        float* ci = C + i * ldc;
        __m256 v0 = lo[i], v1 = hi[i];
        if (TAIL) {
            if (acc) v0 = _mm256_add_ps(v0, _mm256_maskload_ps(ci, m0)), v1 = _mm256_add_ps(v1, _mm256_maskload_ps(ci + 8, m1));
            _mm256_maskstore_ps(ci, m0, v0), _mm256_maskstore_ps(ci + 8, m1, v1);
        } else {
            if (acc) v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci)), v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci + 8));
            _mm256_storeu_ps(ci, v0), _mm256_storeu_ps(ci + 8, v1);
        }
    }
}

template <bool TAIL>
inline void mm_rows(int64_t mr, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool acc, int64_t nr) {
    switch (mr) {
        case 6: mm_tile<6, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
        case 5: mm_tile<5, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
        case 4: mm_tile<4, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
        case 3: mm_tile<3, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
        case 2: mm_tile<2, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
        default: mm_tile<1, TAIL>(K, A, sam, sak, B, ldb, C, ldc, acc, nr); break;
    }
}

// C[M, N] (+)= A B. Rows of C in tiles of 6 outside, its columns inside, so C is written row after row
// (written by column panels, each store of a training step's fresh, cache-cold output missed on its own
// line: 1.7x the time in a step); B in column chunks of at most 256 KiB that stay in L2 meanwhile.
void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb,
        float* C, int64_t ldc, bool acc) {
    int64_t nc = (65536 / (K > 0 ? K : 1)) / 16 * 16;
    if (nc < 16) nc = 16;
    for (int64_t j0 = 0; j0 < N; j0 += nc) {
        const int64_t j1 = j0 + nc < N ? j0 + nc : N;
        for (int64_t i = 0; i < M; i += 6) {
            const int64_t mr = M - i < 6 ? M - i : 6;
            for (int64_t j = j0; j < j1; j += 16) {
                const int64_t nr = N - j < 16 ? N - j : 16;
                if (nr == 16)
                    mm_rows<false>(mr, K, A + i * sam, sam, sak, B + j, ldb, C + i * ldc + j, ldc, acc, nr);
                else
                    mm_rows<true>(mr, K, A + i * sam, sam, sak, B + j, ldb, C + i * ldc + j, ldc, acc, nr);
            }
        }
    }
}
#else
// Builds without AVX2 + FMA (the portable one): the same product as plain loops the compiler vectorizes.
void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb,
        float* C, int64_t ldc, bool acc) {
    for (int64_t i = 0; i < M; ++i) {
        float* ci = C + i * ldc;
        if (!acc) memset(ci, 0, N * sizeof(float));
        for (int64_t k = 0; k < K; ++k) {
            const float aik = A[i * sam + k * sak];
            const float* bk = B + k * ldb;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) ci[j] += aik * bk[j];
        }
    }
}
#endif

// Per-thread scratch that outlives the call (OpenMP's threads persist), so a training step does not
// allocate and fault in fresh pages for every block.
inline float* ffn_scratch(int64_t n) {
    thread_local std::vector<float> buf;
    if ((int64_t)buf.size() < n) buf.resize(n);
    return buf.data();
}

// Rows [r0, r1) of one token-shift lerp into out [rows, C]: FORM 0 (delta) x + (prev - x) (mix + dyn), dyn
// [rows, C] or null; FORM 1 (lerp) x mix + prev (1 - mix).
template <int FORM>
inline void lerp_rows(const float* x, const float* shift, const float* mix, const float* dyn, int64_t r0, int64_t r1,
                      int64_t T, int64_t C, float* out) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* xt = x + r * C;
        const float* pt = r % T ? xt - C : shift + (r / T) * C;
        const float* d = dyn ? dyn + (r - r0) * C : nullptr;
        float* o = out + (r - r0) * C;
        if (FORM == 1) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = xt[c] * mix[c] + pt[c] * (1.f - mix[c]);
        } else if (d) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = xt[c] + (pt[c] - xt[c]) * (mix[c] + d[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = xt[c] + (pt[c] - xt[c]) * mix[c];
        }
    }
}

// The channel-mix's two lerps: xk, and xr when mr.
template <int FORM>
inline void ffn_lerps(const float* x, const float* shift, const float* mk, const float* mr, int64_t r0, int64_t r1,
                      int64_t T, int64_t C, float* xk, float* xr) {
    lerp_rows<FORM>(x, shift, mk, nullptr, r0, r1, T, C, xk);
    if (mr) lerp_rows<FORM>(x, shift, mr, nullptr, r0, r1, T, C, xr);
}

// Rows [r0, r1) of thread `tid` of `n` (contiguous shares).
inline void row_share(int64_t R, int tid, int n, int64_t& r0, int64_t& r1) {
    r0 = R * tid / n, r1 = R * (tid + 1) / n;
}

// Inside a parallel region, after a barrier: threads 1..nt-1 wrote their partial gradients to part (P
// floats each; gradient m at offs[m], offs[n] = P), thread 0 straight into outs. Sums them into outs in
// thread order (deterministic for a thread count), each thread a share of the elements.
inline void add_partials(float* const* outs, const int64_t* offs, int n, const float* part, int64_t P, int tid,
                         int nt) {
    for (int m = 0; m < n; ++m) {
        int64_t e0, e1;
        row_share(offs[m + 1] - offs[m], tid, nt, e0, e1);
        for (int p = 1; p < nt; ++p) {
            const float* src = part + (p - 1) * P + offs[m];
#pragma omp simd
            for (int64_t e = e0; e < e1; ++e) outs[m][e] += src[e];
        }
    }
}

// x [R, C] (R = B T rows), shift [B, C], mk / mr [C] (mr null: no receptance), wkT [C, F], wvT [F, C],
// wrT [C, C] (the weights transposed by the caller); out [R, C]; saved for the backward: kpre [R, F],
// r [R, C] (sigmoid's output) and kv [R, C] (only with a receptance).
template <int FORM>
void channel_mix_fwd_t(const float* x, const float* shift, const float* mk, const float* mr, const float* wkT,
                       const float* wvT, const float* wrT, float* out, float* kpre, float* rr, float* kv, int64_t B,
                       int64_t T, int64_t C, int64_t F, int nthreads) {
    const int64_t R = B * T;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        row_share(R, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
        float* s = ffn_scratch(FFN_ROWS * (2 * C + F));
        float *xk = s, *xr = s + FFN_ROWS * C, *k = s + 2 * FFN_ROWS * C;
        for (int64_t r0 = lo; r0 < hi; r0 += FFN_ROWS) {
            const int64_t r1 = r0 + FFN_ROWS < hi ? r0 + FFN_ROWS : hi, n = r1 - r0;
            ffn_lerps<FORM>(x, shift, mk, mr, r0, r1, T, C, xk, xr);
            float* kp = kpre + r0 * F;
            mm(n, F, C, xk, C, 1, wkT, F, kp, F, false);
#pragma omp simd
            for (int64_t i = 0; i < n * F; ++i) {
                const float v = kp[i] > 0.f ? kp[i] : 0.f;
                k[i] = v * v;
            }
            float* kvb = (mr ? kv : out) + r0 * C;
            mm(n, C, F, k, F, 1, wvT, C, kvb, C, false);
            if (mr) {
                float* rb = rr + r0 * C;
                mm(n, C, C, xr, C, 1, wrT, C, rb, C, false);
                float* ob = out + r0 * C;
#pragma omp simd
                for (int64_t i = 0; i < n * C; ++i) {
                    const float sg = 1.f / (1.f + expf(-rb[i]));
                    rb[i] = sg;
                    ob[i] = sg * kvb[i];
                }
            }
        }
    }
}

// g [R, C] the gradient of out; wk [F, C], wv [C, F], wr [C, C] as stored. Writes dxk, dxr [R, C] (then
// the shift-mix backward turns them into dx, dshift, dmix) and dwk [F, C], dwv [C, F], dwr [C, C]:
// per-thread partials in part (nthreads x (2 F C + C C)) summed at the end, thread 0's straight into
// the outputs.
void channel_mix_bwd_core(const float* x, const float* shift, const float* mk, const float* mr, int form,
                          const float* wk, const float* wv, const float* wr, const float* g, const float* kpre,
                          const float* rr, const float* kv, float* dxk, float* dxr, float* dwk, float* dwv,
                          float* dwr, float* part, int64_t B, int64_t T, int64_t C, int64_t F, int nthreads) {
    const int64_t R = B * T, P = 2 * F * C + (mr ? C * C : 0);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi;
        row_share(R, tid, nt, lo, hi);
        float *pwk = dwk, *pwv = dwv, *pwr = dwr;
        if (tid) pwk = part + (tid - 1) * P, pwv = pwk + F * C, pwr = pwv + F * C;
        memset(pwk, 0, F * C * sizeof(float));
        memset(pwv, 0, F * C * sizeof(float));
        if (mr) memset(pwr, 0, C * C * sizeof(float));
        float* s = ffn_scratch(FFN_ROWS * (4 * C + F));
        float *xk = s, *xr = s + FFN_ROWS * C, *dkv = s + 2 * FFN_ROWS * C, *drp = s + 3 * FFN_ROWS * C;
        float* k = s + 4 * FFN_ROWS * C;
        for (int64_t r0 = lo; r0 < hi; r0 += FFN_ROWS) {
            const int64_t r1 = r0 + FFN_ROWS < hi ? r0 + FFN_ROWS : hi, n = r1 - r0;
            const float* gb = g + r0 * C;
            const float* dk_in = gb;  // the gradient of the value product
            if (mr) {
                const float *rb = rr + r0 * C, *kvb = kv + r0 * C;
#pragma omp simd
                for (int64_t i = 0; i < n * C; ++i) {
                    dkv[i] = gb[i] * rb[i];
                    drp[i] = gb[i] * kvb[i] * rb[i] * (1.f - rb[i]);
                }
                dk_in = dkv;
            }
            const float* kp = kpre + r0 * F;
#pragma omp simd
            for (int64_t i = 0; i < n * F; ++i) {
                const float v = kp[i] > 0.f ? kp[i] : 0.f;
                k[i] = v * v;
            }
            mm(C, F, n, dk_in, 1, C, k, F, pwv, F, true);  // dWv += dkv^T k
            mm(n, F, C, dk_in, C, 1, wv, F, k, F, false);  // dk = dkv Wv (over k: no longer needed)
#pragma omp simd
            for (int64_t i = 0; i < n * F; ++i) k[i] = kp[i] > 0.f ? 2.f * kp[i] * k[i] : 0.f;
            if (form == 0)
                ffn_lerps<0>(x, shift, mk, mr, r0, r1, T, C, xk, xr);
            else
                ffn_lerps<1>(x, shift, mk, mr, r0, r1, T, C, xk, xr);
            mm(F, C, n, k, 1, F, xk, C, pwk, C, true);             // dWk += dkpre^T xk
            mm(n, C, F, k, F, 1, wk, C, dxk + r0 * C, C, false);   // dxk = dkpre Wk
            if (mr) {
                mm(C, C, n, drp, 1, C, xr, C, pwr, C, true);          // dWr += drpre^T xr
                mm(n, C, C, drp, C, 1, wr, C, dxr + r0 * C, C, false);  // dxr = drpre Wr
            }
        }
#pragma omp barrier
        float* outs[3] = {dwk, dwv, dwr};
        const int64_t offs[4] = {0, F * C, 2 * F * C, P};
        add_partials(outs, offs, 3, part, P, tid, nt);
    }
}

// ------------------------------------------------------------------------------------------------
// v6's data-dependent token shift and decay as one op (its "ddlerp"), forward and backward:
//   xx  = x + (prev - x) * maa_x,   h = tanh(xx W1)              h [R, 5 Dm], W1 [C, 5 Dm]
//   x_f = x + (prev - x) * (maa_f + h_f W2[f])                   f = w, k, v, r, g; W2 [5, Dm, C]
//   w   = -exp(decay + tanh(x_w Dw1) Dw2)                        Dw1 [C, Dd], Dw2 [Dd, C]
// Outputs w, x_k, x_v, x_r, x_g [R, C]. As PyTorch ops this was a shift-mix, two products and a tanh,
// a bmm into five [R, C] planes, a five-plane shift-mix, the decay path's products, tanh, exp, and each
// one's backward, every one a pass over tensors the step had pushed out of the caches. Here rows go
// through in blocks with every intermediate in per-thread scratch; the backward keeps h and the decay
// path's tanh (saved, [R, 5 Dm] and [R, Dd]) and w, and recomputes the lerps and h_f W2[f] per block.

inline void tanh_rows(float* a, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = tanhf(a[i]);
}

// maa: 5 pointers [C] (w, k, v, r, g); outs: 4 pointers [R, C] (k, v, r, g); saved hs [R, 5 Dm], hds [R, Dd].
void ddlerp_fwd(const float* x, const float* shift, const float* maa_x, const float* const* maa, const float* w1,
                const float* w2, const float* decay, const float* dw1, const float* dw2, float* wout,
                float* const* outs, float* hs, float* hds, int64_t B, int64_t T, int64_t C, int64_t Dm, int64_t Dd,
                int nthreads) {
    const int64_t R = B * T, Hm = 5 * Dm;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        row_share(R, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
        float* s = ffn_scratch(FFN_ROWS * (3 * C));
        float *xx = s, *m = s + FFN_ROWS * C, *xw = s + 2 * FFN_ROWS * C;
        for (int64_t r0 = lo; r0 < hi; r0 += FFN_ROWS) {
            const int64_t r1 = r0 + FFN_ROWS < hi ? r0 + FFN_ROWS : hi, n = r1 - r0;
            lerp_rows<0>(x, shift, maa_x, nullptr, r0, r1, T, C, xx);
            float* h = hs + r0 * Hm;
            mm(n, Hm, C, xx, C, 1, w1, Hm, h, Hm, false);
            tanh_rows(h, n * Hm);
            for (int f = 0; f < 5; ++f) {
                mm(n, C, Dm, h + f * Dm, Hm, 1, w2 + f * Dm * C, C, m, C, false);
                lerp_rows<0>(x, shift, maa[f], m, r0, r1, T, C, f ? outs[f - 1] + r0 * C : xw);
            }
            float* hd = hds + r0 * Dd;
            mm(n, Dd, C, xw, C, 1, dw1, Dd, hd, Dd, false);
            tanh_rows(hd, n * Dd);
            float* wo = wout + r0 * C;
            mm(n, C, Dd, hd, Dd, 1, dw2, C, wo, C, false);
            for (int64_t i = 0; i < n; ++i) {
                float* wr = wo + i * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) wr[c] = -expf(decay[c] + wr[c]);
            }
        }
    }
}

inline void transpose(const float* a, int64_t rows, int64_t cols, float* out) {
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = a[i * cols + j];
}

// gs: 5 pointers [R, C] (gradients of w, x_k, x_v, x_r, x_g). Writes dx [R, C], dshift [B, C] and the
// parameters' gradients: dmaa_x [C], dmaa [5, C], dw1 [C, 5 Dm], dw2 [5, Dm, C], ddecay [C], ddw1 [C, Dd],
// ddw2 [Dd, C]. dprev [R, C] and part ((nthreads - 1) x the parameters' size) are the caller's scratch.
void ddlerp_bwd(const float* x, const float* shift, const float* maa_x, const float* const* maa, const float* w1,
                const float* w2, const float* dw1, const float* dw2, const float* wout, const float* hs,
                const float* hds, const float* const* gs, float* dx, float* dshift, float* dprev, float* g_maa_x,
                float* g_maa, float* g_w1, float* g_w2, float* g_decay, float* g_dw1, float* g_dw2, float* part,
                int64_t B, int64_t T, int64_t C, int64_t Dm, int64_t Dd, int nthreads) {
    const int64_t R = B * T, Hm = 5 * Dm;
    // Transposes of the weights for the products by them: [5 Dm, C], [5][C, Dm], [Dd, C], [C, Dd].
    std::vector<float> tw(Hm * C + 5 * C * Dm + Dd * C + C * Dd);
    float *w1T = tw.data(), *w2T = w1T + Hm * C, *dw1T = w2T + 5 * C * Dm, *dw2T = dw1T + Dd * C;
    transpose(w1, C, Hm, w1T);
    for (int f = 0; f < 5; ++f) transpose(w2 + f * Dm * C, Dm, C, w2T + f * C * Dm);
    transpose(dw1, C, Dd, dw1T);
    transpose(dw2, Dd, C, dw2T);
    // Offsets of each parameter gradient in one thread's partial block.
    const int64_t o_maa = C, o_w1 = 6 * C, o_w2 = o_w1 + C * Hm, o_dec = o_w2 + 5 * Dm * C, o_dw1 = o_dec + C,
                  o_dw2 = o_dw1 + C * Dd, P = o_dw2 + Dd * C;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi;
        row_share(R, tid, nt, lo, hi);
        float* q = tid ? part + (tid - 1) * P : nullptr;
        float *pmx = tid ? q : g_maa_x, *pmaa = tid ? q + o_maa : g_maa, *pw1 = tid ? q + o_w1 : g_w1,
              *pw2 = tid ? q + o_w2 : g_w2, *pdec = tid ? q + o_dec : g_decay, *pdw1 = tid ? q + o_dw1 : g_dw1,
              *pdw2 = tid ? q + o_dw2 : g_dw2;
        memset(pmx, 0, C * sizeof(float)), memset(pmaa, 0, 5 * C * sizeof(float));
        memset(pw1, 0, C * Hm * sizeof(float)), memset(pw2, 0, 5 * Dm * C * sizeof(float));
        memset(pdec, 0, C * sizeof(float)), memset(pdw1, 0, C * Dd * sizeof(float));
        memset(pdw2, 0, Dd * C * sizeof(float));
        float* s = ffn_scratch(FFN_ROWS * (6 * C + Hm + Dd));
        float *xx = s, *m = s + FFN_ROWS * C, *xw = s + 2 * FFN_ROWS * C, *dww = s + 3 * FFN_ROWS * C;
        float *gx = s + 4 * FFN_ROWS * C, *dm = s + 5 * FFN_ROWS * C, *dh = s + 6 * FFN_ROWS * C;  // dm [n, C]
        float* dhd = dh + FFN_ROWS * Hm;
        for (int64_t r0 = lo; r0 < hi; r0 += FFN_ROWS) {
            const int64_t r1 = r0 + FFN_ROWS < hi ? r0 + FFN_ROWS : hi, n = r1 - r0;
            const float *h = hs + r0 * Hm, *hd = hds + r0 * Dd;
            // The decay path: w = -exp(decay + hd Dw2), so dww = gw * w.
            const float *gw = gs[0] + r0 * C, *wo = wout + r0 * C;
            for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    const float d = gw[i * C + c] * wo[i * C + c];
                    dww[i * C + c] = d;
                    pdec[c] += d;
                }
            }
            mm(Dd, C, n, hd, 1, Dd, dww, C, pdw2, C, true);        // dDw2 += hd^T dww
            mm(n, Dd, C, dww, C, 1, dw2T, Dd, dhd, Dd, false);     // dhd = dww Dw2^T
#pragma omp simd
            for (int64_t i = 0; i < n * Dd; ++i) dhd[i] *= 1.f - hd[i] * hd[i];
            mm(n, C, Dm, h, Hm, 1, w2, C, m, C, false);            // m_w again
            lerp_rows<0>(x, shift, maa[0], m, r0, r1, T, C, xw);
            mm(C, Dd, n, xw, 1, C, dhd, Dd, pdw1, Dd, true);       // dDw1 += x_w^T dhd
            mm(n, C, Dd, dhd, Dd, 1, dw1T, C, gx, C, false);       // gradient of x_w
            for (int f = 0; f < 5; ++f) {
                if (f) mm(n, C, Dm, h + f * Dm, Hm, 1, w2 + f * Dm * C, C, m, C, false);
                const float* g = f ? gs[f] + r0 * C : gx;
                const float* mf = maa[f];
                float* pm = pmaa + f * C;
                float* dmf = dm;  // [n, C] reused per f (then multiplied into dh)
                for (int64_t i = 0; i < n; ++i) {
                    const int64_t r = r0 + i;
                    const float* xt = x + r * C;
                    const float* pt = r % T ? xt - C : shift + (r / T) * C;
                    const float *gi = g + i * C, *mi = m + i * C;
                    float *dxi = dx + r * C, *dpi = dprev + r * C, *dmi = dmf + i * C;
#pragma omp simd
                    for (int64_t c = 0; c < C; ++c) {
                        const float mix = mf[c] + mi[c], d = gi[c] * (pt[c] - xt[c]);
                        dmi[c] = d;
                        pm[c] += d;
                        const float gm = gi[c] * mix;
                        if (f == 0) dxi[c] = gi[c] - gm, dpi[c] = gm;
                        else dxi[c] += gi[c] - gm, dpi[c] += gm;
                    }
                }
                mm(Dm, C, n, h + f * Dm, 1, Hm, dmf, C, pw2 + f * Dm * C, C, true);   // dW2[f] += h_f^T dm_f
                mm(n, Dm, C, dmf, C, 1, w2T + f * C * Dm, Dm, dh + f * Dm, Hm, false); // dh_f = dm_f W2[f]^T
            }
#pragma omp simd
            for (int64_t i = 0; i < n * Hm; ++i) dh[i] *= 1.f - h[i] * h[i];
            lerp_rows<0>(x, shift, maa_x, nullptr, r0, r1, T, C, xx);
            mm(C, Hm, n, xx, 1, C, dh, Hm, pw1, Hm, true);          // dW1 += xx^T dh
            mm(n, C, Hm, dh, Hm, 1, w1T, C, gx, C, false);          // gradient of xx
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = r0 + i;
                const float* xt = x + r * C;
                const float* pt = r % T ? xt - C : shift + (r / T) * C;
                const float* gi = gx + i * C;
                float *dxi = dx + r * C, *dpi = dprev + r * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    pmx[c] += gi[c] * (pt[c] - xt[c]);
                    const float gm = gi[c] * maa_x[c];
                    dxi[c] += gi[c] - gm, dpi[c] += gm;
                }
            }
        }
#pragma omp barrier
        // The previous token's share: row t's dprev belongs to row t - 1 (or to the shift state at t = 0).
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const float* dp = dprev + r * C;
            float* dst = r % T ? dx + (r - 1) * C : dshift + (r / T) * C;
            if (r % T) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) dst[c] += dp[c];
            } else {
                memcpy(dst, dp, C * sizeof(float));
            }
        }
        float* outs[7] = {g_maa_x, g_maa, g_w1, g_w2, g_decay, g_dw1, g_dw2};
        const int64_t offs[8] = {0, o_maa, o_w1, o_w2, o_dec, o_dw1, o_dw2, P};
        add_partials(outs, offs, 7, part, P, tid, nt);
    }
}

// GroupNorm over each head of the WKV output (v5-v7's ln_x): y [R, H, N] (R = B * T rows), weight and
// bias [H * N]; out [R, H * N]; mean and rstd [R, H] saved for the backward. PyTorch's GroupNorm spent
// ~1 ms forward and backward on [512, 64] with 4 groups, ~50x the memory traffic's time.
void head_norm_fwd(const float* y, const float* wt, const float* bs, float eps, float* out, float* mean,
                   float* rstd, int64_t R, int64_t H, int64_t N, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t rh = 0; rh < R * H; ++rh) {
        const int64_t h = rh % H;
        const float* x = y + rh * N;
        float* o = out + rh * N;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < N; ++i) s += x[i];
        const float mu = s / N;
        float v = 0.f;
#pragma omp simd reduction(+ : v)
        for (int64_t i = 0; i < N; ++i) v += (x[i] - mu) * (x[i] - mu);
        const float r = 1.f / sqrtf(v / N + eps);
        const float *w = wt + h * N, *b = bs + h * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) o[i] = (x[i] - mu) * r * w[i] + b[i];
        mean[rh] = mu, rstd[rh] = r;
    }
}

// dw, db: per-thread partial sums [nthreads, H * N] that the caller sums (fixed order: deterministic
// for a fixed thread count).
void head_norm_bwd(const float* y, const float* wt, const float* mean, const float* rstd, const float* g, float* dy,
                   float* dw, float* db, int64_t R, int64_t H, int64_t N, int nthreads) {
    const int64_t C = H * N;
    memset(dw, 0, nthreads * C * sizeof(float));
    memset(db, 0, nthreads * C * sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        float *pdw = dw + tid * C, *pdb = db + tid * C;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            for (int64_t h = 0; h < H; ++h) {
                const int64_t rh = r * H + h;
                const float *x = y + rh * N, *gg = g + rh * N, *w = wt + h * N;
                float* d = dy + rh * N;
                const float mu = mean[rh], rs = rstd[rh];
                float sd = 0.f, sdx = 0.f;
#pragma omp simd reduction(+ : sd, sdx)
                for (int64_t i = 0; i < N; ++i) {
                    const float xh = (x[i] - mu) * rs, dxh = gg[i] * w[i];
                    sd += dxh;
                    sdx += dxh * xh;
                }
                sd /= N, sdx /= N;
                float *qw = pdw + h * N, *qb = pdb + h * N;
#pragma omp simd
                for (int64_t i = 0; i < N; ++i) {
                    const float xh = (x[i] - mu) * rs;
                    d[i] = rs * (gg[i] * w[i] - sd - xh * sdx);
                    qw[i] += gg[i] * xh;
                    qb[i] += gg[i];
                }
            }
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

int rz_wkv_train_abi_version() { return 5; }

void rz_head_norm_fwd(const float* y, const float* wt, const float* bs, float eps, float* out, float* mean,
                      float* rstd, int64_t R, int64_t H, int64_t N, int nthreads) {
    head_norm_fwd(y, wt, bs, eps, out, mean, rstd, R, H, N, nthreads);
}

void rz_head_norm_bwd(const float* y, const float* wt, const float* mean, const float* rstd, const float* g,
                      float* dy, float* dw, float* db, int64_t R, int64_t H, int64_t N, int nthreads) {
    head_norm_bwd(y, wt, mean, rstd, g, dy, dw, db, R, H, N, nthreads);
}

void rz_channel_mix_fwd(const float* x, const float* shift, const float* mk, const float* mr, int form,
                        const float* wkT, const float* wvT, const float* wrT, float* out, float* kpre, float* r,
                        float* kv, int64_t B, int64_t T, int64_t C, int64_t F, int nthreads) {
    if (form == 0)
        channel_mix_fwd_t<0>(x, shift, mk, mr, wkT, wvT, wrT, out, kpre, r, kv, B, T, C, F, nthreads);
    else
        channel_mix_fwd_t<1>(x, shift, mk, mr, wkT, wvT, wrT, out, kpre, r, kv, B, T, C, F, nthreads);
}

// dxk, dxr [R, C] and dmix [B, 2, C]: the caller's scratch; part: (nthreads - 1) x (2 F C + C C) floats.
void rz_channel_mix_bwd(const float* x, const float* shift, const float* mk, const float* mr, int form,
                        const float* wk, const float* wv, const float* wr, const float* g, const float* kpre,
                        const float* r, const float* kv, float* dx, float* dshift, float* dmk, float* dmr,
                        float* dwk, float* dwv, float* dwr, float* part, float* dxk, float* dxr, float* dmix,
                        int64_t B, int64_t T, int64_t C, int64_t F, int nthreads) {
    channel_mix_bwd_core(x, shift, mk, mr, form, wk, wv, wr, g, kpre, r, kv, dxk, dxr, dwk, dwv, dwr, part, B, T, C,
                         F, nthreads);
    const int64_t nf = mr ? 2 : 1;
    std::vector<float> mix(nf * C);
    memcpy(mix.data(), mk, C * sizeof(float));
    if (mr) memcpy(mix.data() + C, mr, C * sizeof(float));
    const float* gs[2] = {dxk, dxr};
    shift_mix_bwd(gs, x, shift, mix.data(), nullptr, form, dx, dshift, dmix, nullptr, nf, B, T, C, nthreads);
    float* dm[2] = {dmk, dmr};
    for (int64_t f = 0; f < nf; ++f) {
        float* d = dm[f];
        memset(d, 0, C * sizeof(float));
        for (int64_t b = 0; b < B; ++b) {
            const float* src = dmix + (b * nf + f) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) d[c] += src[c];
        }
    }
}

void rz_ddlerp_fwd(const float* x, const float* shift, const float* maa_x, const float* const* maa, const float* w1,
                   const float* w2, const float* decay, const float* dw1, const float* dw2, float* wout,
                   float* const* outs, float* hs, float* hds, int64_t B, int64_t T, int64_t C, int64_t Dm, int64_t Dd,
                   int nthreads) {
    ddlerp_fwd(x, shift, maa_x, maa, w1, w2, decay, dw1, dw2, wout, outs, hs, hds, B, T, C, Dm, Dd, nthreads);
}

void rz_ddlerp_bwd(const float* x, const float* shift, const float* maa_x, const float* const* maa, const float* w1,
                   const float* w2, const float* dw1, const float* dw2, const float* wout, const float* hs,
                   const float* hds, const float* const* gs, float* dx, float* dshift, float* dprev, float* g_maa_x,
                   float* g_maa, float* g_w1, float* g_w2, float* g_decay, float* g_dw1, float* g_dw2, float* part,
                   int64_t B, int64_t T, int64_t C, int64_t Dm, int64_t Dd, int nthreads) {
    ddlerp_bwd(x, shift, maa_x, maa, w1, w2, dw1, dw2, wout, hs, hds, gs, dx, dshift, dprev, g_maa_x, g_maa, g_w1, g_w2,
               g_decay, g_dw1, g_dw2, part, B, T, C, Dm, Dd, nthreads);
}

void rz_relu_sq_fwd(const float* x, float* y, int64_t n, int nthreads) { relu_sq_fwd(x, y, n, nthreads); }

void rz_tanh_fwd(const float* x, float* y, int64_t n, int nthreads) { tanh_fwd(x, y, n, nthreads); }

void rz_tanh_bwd(const float* y, const float* g, float* dx, int64_t n, int nthreads) { tanh_bwd(y, g, dx, n, nthreads); }

void rz_relu_sq_bwd(const float* x, const float* g, float* dx, int64_t n, int nthreads) {
    relu_sq_bwd(x, g, dx, n, nthreads);
}

void rz_shift_mix_fwd(const float* x, const float* shift, const float* mix, const float* dyn, float* const* out,
                      int form,
                      int64_t F, int64_t B, int64_t T, int64_t C, int nthreads) {
    shift_mix_fwd(x, shift, mix, dyn, out, form, F, B, T, C, nthreads);
}

void rz_shift_mix_bwd(const float* const* g, const float* x, const float* shift, const float* mix, const float* dyn,
                      int form, float* dx, float* dshift, float* dmix, float* ddyn, int64_t F, int64_t B, int64_t T,
                      int64_t C, int nthreads) {
    shift_mix_bwd(g, x, shift, mix, dyn, form, dx, dshift, dmix, ddyn, F, B, T, C, nthreads);
}

void rz_wkv4_fwd(const float* w, const float* u, const float* k, const float* v, const float* a0, const float* b0,
                 const float* p0, float* y, float* aT, float* bT, float* pT, float* sa, float* sb, float* sp,
                 int64_t B, int64_t T, int64_t C, int nthreads) {
    wkv4_fwd(w, u, k, v, a0, b0, p0, y, aT, bT, pT, sa, sb, sp, B, T, C, nthreads);
}

void rz_wkv4_bwd(const float* w, const float* u, const float* k, const float* v, const float* sa, const float* sb,
                 const float* sp, const float* dy, const float* daT, const float* dbT, const float* dpT, float* dw,
                 float* du, float* dk, float* dv, float* da0, float* db0, float* dp0, int64_t B, int64_t T,
                 int64_t C, int nthreads) {
    wkv4_bwd(w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT, dw, du, dk, dv, da0, db0, dp0, B, T, C, nthreads);
}

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
