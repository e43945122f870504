// One whole model step (every layer, the final norm and the head) in one call and one OpenMP parallel
// region: decode (B sequences, T = 1) and prefill (B sequences of T tokens; the WKV recurrences walk
// the tokens, everything else works on the B * T rows at once).
//
// Why: a decode step on a CPU is bound by reading the weights, but run as ~40 tensor ops and ~10 GEMV
// calls per layer it pays two costs that are not memory: Python/dispatcher overhead per op, and
// waking the second OpenMP thread for every GEMV (measured: with OMP_WAIT_POLICY=active the GEMVs
// alone ran 30-40 % faster, i.e. the wake-ups were a third of their time). Here the threads start once
// per call and meet at barriers; matrices that read the same input (r, k, v and the first LoRA
// halves) share one work-sharing loop, so a layer has a handful of barriers and no idle thread.
//
// The maths is rwkv_zoo/inference.py's DecodeStep (itself checked against the model's modules), for
// every version's time-mix and channel-mix so hybrids work: v4 (stable running-max WKV), v5/v6
// (matrix state, per-channel decay, bonus u), v7 (delta-rule state with kk/a, v_first). Activations
// and state are fp32; weights are fp32/bf16/int8/int4 packed in the tile layout of cpu_tiles.h (whose
// build for this CPU's instruction set does the products). The LoRA matrices are packed fp32 as well
// (transposed to [out, in] by the caller).
// Built with -ffast-math so the exp/tanh/sigmoid loops vectorize; every input is finite.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <sched.h>

#include <atomic>
#include <climits>
#include <initializer_list>
#include <memory>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_tiles.h"

namespace {

// All fields are 8 bytes wide so the ctypes mirror in rwkv_zoo/cpu_kernels.py has no padding to get wrong.
struct Lin {
    const void* w;       // packed (rwkv_zoo.cpu_kernels.pack); null: absent
    const float* scale;  // int8: [N] per output row; int4: [N / 4, K / 64, 4]
    int64_t kind;        // 0 fp32, 1 bf16, 2 int8, 3 int4 (rz::Kind)
    int64_t N;           // output rows (a multiple of 4: packed rows)
    int64_t K;           // input width (a multiple of 8; bf16: of 16)
};

struct LayerP {
    int64_t att_kind, ffn_kind;  // 4, 5, 6, 7
    int64_t H, N, halve;         // halve: x /= 2 after this layer (rescale_every)
    double ln0_eps, ln1_eps, ln2_eps, lnx_eps;
    const float *ln0_w, *ln0_b, *ln1_w, *ln1_b, *ln2_w, *ln2_b, *lnx_w, *lnx_b;
    // Token-shift mixes, rows of [C]. v4/v5: k, v, r, g, applied as xx + m * (x - xx); v6: maa_x, then
    // w, k, v, r, g, as x + (xx - x) * (m + LoRA); v7: r, w, k, v, a, g, as x + (xx - x) * m.
    const float* mix;
    const float* w;        // v4: -exp(time_decay) [C]; v5: log decay [H * N]; v6: decay0 [C]; v7: w0 [C]
    const float* u;        // v4: time_first [C]; v5/v6: time_faaaa [H * N]
    const float *a0, *v0, *k_k, *k_a, *r_k;  // v7
    Lin r, k, v, o, g;     // g: v5/v6 gate
    // LoRA matrices as [out, in]. v6: l1[0] maa_w1 (out 5 D), l2[0..4] maa_w2 per mix, l1[1] time_decay_w1,
    // l1[2] time_decay_w2. v7: l1[0..3] w1, a1, v1, g1 and l2[0..3] w2, a2, v2, g2.
    Lin l1[5], l2[5];
    Lin fk, fv, fr;        // channel mix; fr absent for v7
    const float *f_mk, *f_mr;
};

inline float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// y = LayerNorm(x) over C, for one row.
inline void layer_norm(const float* x, const float* w, const float* b, double eps, int64_t C, float* y) {
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t i = 0; i < C; ++i) mean += x[i];
    mean /= C;
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < C; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / sqrtf(var / C + (float)eps);
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}


// An uninitialized float buffer (every element is written before it is read; zeroing a prefill's
// buffers would cost a pass over them).
struct Buf {
    std::unique_ptr<float[]> p;
    void resize(int64_t n) { p.reset(new float[n]); }
    float* data() { return p.get(); }
    float& operator[](int64_t i) { return p[i]; }
};

// The barrier after each work-sharing loop of a step (the loops are `nowait`). Why not OpenMP's own:
// libgomp's barrier spins up to GOMP_SPINCOUNT (300,000) pauses, ~9 ms on this Zen 3 VM (30 ns a pause),
// before it sleeps. On a machine with other work, the thread it waits for is often off its core, and the
// spinning thread holds a core that thread could run on for that whole time: a 2-thread fp32 decode
// step of v7-0.1B took a median 900 ms instead of 35 under a load of ~2.5 on 2 cores (OMP_WAIT_POLICY=
// passive, no spinning: 55-65 ms; one thread: ~50). The environment variables would change torch's
// OpenMP too (it is the same libgomp), so the step synchronizes itself: a waiting thread spins for at
// most `budget` pauses (60 us at most), then sleeps on a futex until the last thread arrives. The budget
// adapts per thread: it halves when a wait outlasts it (a partner off its core: sleep early) and doubles
// when the partner comes within it (a quiet machine: no futex wake-up latency, ~a dozen per layer).
#ifndef RZ_SPIN_MAX  // pauses (30 ns each here); tests build with 0 to make every wait sleep
#define RZ_SPIN_MAX 2048
#endif
#ifndef RZ_SPIN_MIN
#define RZ_SPIN_MIN (RZ_SPIN_MAX < 16 ? RZ_SPIN_MAX : 16)
#endif
struct TeamBarrier {
    static constexpr int SPIN_MIN = RZ_SPIN_MIN, SPIN_MAX = RZ_SPIN_MAX;
    alignas(64) std::atomic<int> arrived{0};
    alignas(64) std::atomic<int> phase{0};
    std::atomic<int> sleepers{0};
    // threads in the team (may be fewer than asked for): every thread stores the same value at the
    // region's start, before its first wait, so no OpenMP barrier is needed to publish it
    std::atomic<int> n{1};

    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    void sleep(int seen) {
#if defined(__linux__)
        syscall(SYS_futex, reinterpret_cast<int*>(&phase), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
        (void)seen;
        sched_yield();
#endif
    }
    void wake_all() {
#if defined(__linux__)
        syscall(SYS_futex, reinterpret_cast<int*>(&phase), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#endif
    }
    void wait() {
        const int team = n.load(std::memory_order_relaxed);
        if (team == 1) return;
        // read before arriving: once this thread has arrived, the last one may advance the phase
        const int seen = phase.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
            arrived.store(0, std::memory_order_relaxed);
            // seq_cst store then load, against the sleeper's increment then load: one side sees the other
            phase.store(seen + 1, std::memory_order_seq_cst);
            if (sleepers.load(std::memory_order_seq_cst) > 0) wake_all();
            return;
        }
        static thread_local int budget = SPIN_MAX;
        for (int i = 0; i < budget; ++i) {
            if (phase.load(std::memory_order_acquire) != seen) {
                budget = budget * 2 < SPIN_MAX ? budget * 2 : SPIN_MAX;
                return;
            }
            pause();
        }
        budget = budget / 2 > SPIN_MIN ? budget / 2 : SPIN_MIN;
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        while (phase.load(std::memory_order_seq_cst) == seen) sleep(seen);
        sleepers.fetch_sub(1, std::memory_order_seq_cst);
    }
};

// Per-row buffers for M = nseq * T token rows ([nseq, T, C] flattened). q: the activations of one
// gemvs call prepared for this build's int8/bf16 kernels (rz::needs_prep; null where none are), 64-byte
// aligned, qbytes per row of M (an upper bound over the calls: allocated, but only touched where used).
struct Scratch {
    int64_t nseq, T, M, C;
    Buf xa, xf, xx, mixed, r, k, v, g, w, a, y, h, lo, ff, vfirst, kk;
    std::unique_ptr<uint8_t[]> qbuf;
    uint8_t* q = nullptr;
    Buf dot;  // rz::dot_gemm's scratch (packed x) where M >= rz::DOT_MIN_ROWS, else empty
    TeamBarrier bar;
    Scratch(int64_t nseq_, int64_t T_, int64_t C_, int64_t F, int64_t D, int64_t qbytes, int64_t dot_floats)
        : nseq(nseq_), T(T_), M(nseq_ * T_), C(C_) {
        if (dot_floats) dot.resize(dot_floats);
        for (auto* vec : {&xa, &xf, &xx, &r, &k, &v, &g, &w, &a, &y, &vfirst, &kk}) vec->resize(M * C);
        mixed.resize(6 * M * C);
        lo.resize(5 * M * C);
        h.resize(M * D);
        ff.resize(M * F);
        if (qbytes) {
            qbuf.reset(new uint8_t[M * qbytes + 64]);
            q = qbuf.get() + (64 - reinterpret_cast<uintptr_t>(qbuf.get()) % 64) % 64;
        }
    }
};

struct Job {
    const Lin* lin;
    const float* x;
    int64_t ldx;
    float* y;
    int64_t ldy;
};

// Several independent GEMVs in one work-sharing loop (called inside the parallel region; ends with
// the loop's barrier). Tiles are handed out in dynamic chunks: on a shared machine one thread can lose
// its core for a while, and the other then takes over its share. Where this build's kernels take
// prepared activations (VNNI int8, BF16 dot), every job's rows are converted first, in one loop.
void gemvs(Scratch& s, const Job* jobs, int n, int64_t B) {
    // fp32 weights with many rows (prefill): the blocked form of the tile kernels (cpu_tiles.h's
    // dot_gemm, bitwise the same sums, so a row's result still does not depend on the batch), for calls
    // whose matrices are all fp32 (an fp32 model's; the LoRA-up call of any v6/v7 model). A call that
    // mixes in int8 / int4 / bf16 ones stays on the tile kernels: splitting it would cost two more
    // barriers for the small LoRAs.
    bool all32 = s.dot.data() && B >= rz::DOT_MIN_ROWS;
    for (int i = 0; i < n && all32; ++i) all32 = jobs[i].lin->kind == rz::F32;
    if (all32) {
        rz::DotJob dj[8];
        for (int i = 0; i < n; ++i) {
            const Lin& L = *jobs[i].lin;
            dj[i] = {jobs[i].x, jobs[i].ldx, static_cast<const float*>(L.w), L.K, L.N, jobs[i].y, jobs[i].ldy};
        }
        rz::dot_gemm(dj, n, B, s.dot.data(), [&] { s.bar.wait(); });
        return;
    }
    int64_t start[8], ldq[8], total = 0, off = 0;
    uint8_t* xq[8];
    bool any = false;
    for (int i = 0; i < n; ++i) {
        start[i] = total, total += jobs[i].lin->N / 4;
        const int64_t kind = jobs[i].lin->kind;
        xq[i] = nullptr, ldq[i] = 0;
        if (s.q && rz::needs_prep(kind, jobs[i].lin->K)) {
            ldq[i] = rz::prep_row_bytes(kind, jobs[i].lin->K);
            xq[i] = s.q + off;
            off += B * ldq[i];
            any = true;
        }
    }
    if (any) {
#pragma omp for nowait
        for (int64_t ib = 0; ib < n * B; ++ib) {
            const int64_t i = ib / B, b = ib % B;
            if (xq[i]) rz::prep_row(jobs[i].lin->kind, jobs[i].x + b * jobs[i].ldx, jobs[i].lin->K, xq[i] + b * ldq[i]);
        }
        s.bar.wait();
    }
#pragma omp for schedule(dynamic, 8) nowait
    for (int64_t t = 0; t < total; ++t) {
        int i = n - 1;
        while (start[i] > t) --i;
        const Job& j = jobs[i];
        const Lin& L = *j.lin;
        const int64_t lt = t - start[i];
        rz::tile_rows(L.kind, j.x, B, j.ldx, xq[i], ldq[i], L.w, lt, L.K, L.scale, j.y + 4 * lt, j.ldy);
    }
    s.bar.wait();
}

// The most one call of gemvs can need of something: the max over the head (when given) and each layer
// (all its matrices at once, the widest call) of the sum of f(matrix).
template <typename F>
int64_t most_per_call(const LayerP* layers, int64_t L, const Lin* head, F&& f) {
    int64_t most = head ? f(*head) : 0;
    for (int64_t i = 0; i < L; ++i) {
        const LayerP& P = layers[i];
        int64_t sum = 0;
        for (const Lin* l : {&P.r, &P.k, &P.v, &P.o, &P.g, &P.fk, &P.fv, &P.fr}) sum += f(*l);
        for (int j = 0; j < 5; ++j) sum += f(P.l1[j]) + f(P.l2[j]);
        most = sum > most ? sum : most;
    }
    return most;
}

// Bytes per token row that gemvs may need for prepared activations in one call (0: this build needs none).
int64_t prep_bytes_bound(const LayerP* layers, int64_t L, const Lin* head) {
    return most_per_call(layers, L, head, [](const Lin& l) {
        return l.w && rz::needs_prep(l.kind, l.K) ? rz::prep_row_bytes(l.kind, l.K) : 0;
    });
}

// xx[b, t] = src[b, t - 1], and the carried shift for t = 0; the last token's row becomes the next shift.
void shift_rows(Scratch& s, const float* src, const float* carried, float* xx, float* next) {
    const int64_t C = s.C, T = s.T;
#pragma omp for nowait
    for (int64_t m = 0; m < s.M; ++m) {
        const int64_t b = m / T, t = m % T;
        memcpy(xx + m * C, t ? src + (m - 1) * C : carried + b * C, C * sizeof(float));
        if (t == T - 1) memcpy(next + b * C, src + m * C, C * sizeof(float));
    }
    s.bar.wait();
}

// GroupNorm over heads for one row (in place): each head's N channels normalized like a LayerNorm.
inline void group_norm(float* y, int64_t H, int64_t N, const float* w, const float* b, double eps) {
    for (int64_t h = 0; h < H; ++h) layer_norm(y + h * N, w + h * N, b + h * N, eps, N, y + h * N);
}

// One head's one-step matrix-state update. S0 may be null (a fresh sequence: zeros).
// v5/v6 (a == null): y = r^T (S + diag(u) k v^T), S' = diag(e^w) S + k v^T.
// v7: S' = diag(e^w) S + b (a^T S) + k v^T, y = S'^T r.
inline void wkv_head(const float* S0, float* S1, const float* r, const float* k, const float* v, const float* logw,
                     const float* u, const float* a, const float* bb, float* y, int64_t N) {
    float sa[256], acc[256];
    for (int64_t j = 0; j < N; ++j) sa[j] = 0.f, acc[j] = 0.f;
    if (a && S0) {
        for (int64_t i = 0; i < N; ++i) {
            const float ai = a[i];
            const float* row = S0 + i * N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) sa[j] += ai * row[j];
        }
    }
    for (int64_t i = 0; i < N; ++i) {
        const float di = expf(logw[i]), ki = k[i], ri = r[i];
        float* out = S1 + i * N;
        if (a) {
            const float bi = bb[i];
            if (S0) {
                const float* row = S0 + i * N;
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) {
                    const float s = row[j] * di + bi * sa[j] + ki * v[j];
                    out[j] = s;
                    acc[j] += ri * s;
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) {
                    const float s = ki * v[j];
                    out[j] = s;
                    acc[j] += ri * s;
                }
            }
        } else {
            const float uki = u[i] * ki;
            if (S0) {
                const float* row = S0 + i * N;
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) {
                    acc[j] += ri * (row[j] + uki * v[j]);
                    out[j] = row[j] * di + ki * v[j];
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) {
                    acc[j] += ri * uki * v[j];
                    out[j] = ki * v[j];
                }
            }
        }
    }
    memcpy(y, acc, N * sizeof(float));
}

// out = xx + m * (x - xx); swapping x and xx gives v7's x + m * (xx - x).
inline void mix_row(const float* x, const float* xx, const float* m, int64_t C, float* out) {
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) out[i] = xx[i] + m[i] * (x[i] - xx[i]);
}

// v4/v5: the first n of the k, v, r, g mixes (xx + m * (x - xx)) and their projections into s.k, s.v,
// s.r, s.g.
void mix_kvrg(const LayerP& P, Scratch& s, const float* x, const float* xx, int n) {
    const int64_t B = s.M, C = s.C;
    float* mixed = s.mixed.data();
#pragma omp for nowait
    for (int64_t b = 0; b < B; ++b)
        for (int m = 0; m < n; ++m) mix_row(x + b * C, xx + b * C, P.mix + m * C, C, mixed + (m * B + b) * C);
    s.bar.wait();
    const Lin* lins[4] = {&P.k, &P.v, &P.r, &P.g};
    float* outs[4] = {s.k.data(), s.v.data(), s.r.data(), s.g.data()};
    Job jobs[4];
    for (int m = 0; m < n; ++m) jobs[m] = {lins[m], mixed + m * B * C, C, outs[m], C};
    gemvs(s, jobs, n, B);
}

void time_mix(const LayerP& P, Scratch& s, const float* xx, float* const* st_in, float* const* st_out, bool& have_vfirst,
              float p_init) {
    const int64_t B = s.M, C = s.C, H = P.H, N = P.N;  // B: rows (tokens), s.nseq * s.T
    const float* x = s.xa.data();
    float* mixed = s.mixed.data();
    if (P.att_kind == 4) {
        mix_kvrg(P, s, x, xx, 3);
        const float *a0 = st_in[2], *b0 = st_in[3], *p0 = st_in[4];
        float *a1 = st_out[2], *b1 = st_out[3], *p1 = st_out[4];
        // One task per (sequence, block of 64 channels); the state lives in the output arrays.
        const int64_t nblk = (C + 63) / 64;
#pragma omp for nowait
        for (int64_t task = 0; task < s.nseq * nblk; ++task) {
            const int64_t b = task / nblk, c0 = (task % nblk) * 64, n = C - c0 < 64 ? C - c0 : 64;
            const int64_t so = b * C + c0;
            float *A = a1 + so, *Bs = b1 + so, *Pm = p1 + so;
            for (int64_t i = 0; i < n; ++i) {
                A[i] = a0 ? a0[so + i] : 0.f;
                Bs[i] = b0 ? b0[so + i] : 0.f;
                Pm[i] = p0 ? p0[so + i] : p_init;
            }
            const float *uc = P.u + c0, *wc = P.w + c0;
            for (int64_t t = 0; t < s.T; ++t) {
                const int64_t o = (b * s.T + t) * C + c0;
                const float *kt = s.k.data() + o, *vt = s.v.data() + o, *rt = s.r.data() + o;
                float* yt = s.y.data() + o;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const float a = A[i], bs = Bs[i], p = Pm[i];
                    const float kk = kt[i], vv = vt[i];
                    const float ww = uc[i] + kk;
                    const float q = p > ww ? p : ww;
                    const float e1 = expf(p - q), e2 = expf(ww - q);
                    yt[i] = sigmoidf(rt[i]) * (e1 * a + e2 * vv) / (e1 * bs + e2);
                    const float pw = p + wc[i];
                    const float q2 = pw > kk ? pw : kk;
                    const float f1 = expf(pw - q2), f2 = expf(kk - q2);
                    A[i] = f1 * a + f2 * vv;
                    Bs[i] = f1 * bs + f2;
                    Pm[i] = q2;
                }
            }
        }
        s.bar.wait();
        const Job out = {&P.o, s.y.data(), C, s.g.data(), C};  // g reused as the output buffer
        gemvs(s, &out, 1, B);
        return;
    }
    const float* S0 = st_in[2];
    float* S1 = st_out[2];
    const float* logw = nullptr;  // [B, C] per token (v6/v7) or [H * N] (v5)
    if (P.att_kind == 5) {
        mix_kvrg(P, s, x, xx, 4);
    } else if (P.att_kind == 6) {
        const int64_t D5 = P.l1[0].N;  // 5 * D
        const int64_t D = D5 / 5;
        // xxx = x + (xx - x) * maa_x, then h = tanh(xxx @ maa_w1)
#pragma omp for nowait
        for (int64_t b = 0; b < B; ++b) {
            const float *xb = x + b * C, *xxb = xx + b * C;
            float* o = mixed + b * C;
#pragma omp simd
            for (int64_t i = 0; i < C; ++i) o[i] = xb[i] + (xxb[i] - xb[i]) * P.mix[i];
        }
        s.bar.wait();
        const Job j1 = {&P.l1[0], mixed, C, s.h.data(), D5};
        gemvs(s, &j1, 1, B);
#pragma omp for nowait
        for (int64_t i = 0; i < B * D5; ++i) s.h[i] = tanhf(s.h[i]);
        s.bar.wait();
        Job j2[5];
        for (int m = 0; m < 5; ++m) j2[m] = {&P.l2[m], s.h.data() + m * D, D5, s.lo.data() + m * B * C, C};
        gemvs(s, j2, 5, B);
        // mixed[m] = x + (xx - x) * (maa[m] + lora[m]), m = w, k, v, r, g
#pragma omp for nowait
        for (int64_t mb = 0; mb < 5 * B; ++mb) {
            const int64_t m = mb / B, b = mb % B;
            const float *xb = x + b * C, *xxb = xx + b * C, *mm = P.mix + (m + 1) * C;
            const float* lo = s.lo.data() + mb * C;
            float* o = mixed + mb * C;
#pragma omp simd
            for (int64_t i = 0; i < C; ++i) o[i] = xb[i] + (xxb[i] - xb[i]) * (mm[i] + lo[i]);
        }
        s.bar.wait();
        const int64_t Dw = P.l1[1].N;
        const Job jobs[5] = {{&P.k, mixed + B * C, C, s.k.data(), C},
                             {&P.v, mixed + 2 * B * C, C, s.v.data(), C},
                             {&P.r, mixed + 3 * B * C, C, s.r.data(), C},
                             {&P.g, mixed + 4 * B * C, C, s.g.data(), C},
                             {&P.l1[1], mixed, C, s.h.data(), Dw}};
        gemvs(s, jobs, 5, B);
#pragma omp for nowait
        for (int64_t i = 0; i < B * Dw; ++i) s.h[i] = tanhf(s.h[i]);
        s.bar.wait();
        const Job jd = {&P.l1[2], s.h.data(), Dw, s.w.data(), C};
        gemvs(s, &jd, 1, B);
#pragma omp for nowait
        for (int64_t i = 0; i < B * C; ++i) s.w[i] = -expf(P.w[i % C] + s.w[i]);
        s.bar.wait();
        logw = s.w.data();
    } else {  // v7
#pragma omp for nowait
        for (int64_t b = 0; b < B; ++b)
            for (int m = 0; m < 6; ++m) mix_row(xx + b * C, x + b * C, P.mix + m * C, C, mixed + (m * B + b) * C);
        s.bar.wait();
        // r, k, v and the first LoRA halves (w, a, v, g) all read the mixes: one loop.
        const int64_t Dw = P.l1[0].N, Da = P.l1[1].N, Dv = P.l1[2].N, Dg = P.l1[3].N;
        float* hw = s.h.data();
        float* ha = hw + B * Dw;
        float* hv = ha + B * Da;
        float* hg = hv + B * Dv;
        Job jobs[7] = {{&P.r, mixed, C, s.r.data(), C},
                       {&P.k, mixed + 2 * B * C, C, s.k.data(), C},
                       {&P.v, mixed + 3 * B * C, C, s.v.data(), C},
                       {&P.l1[0], mixed + B * C, C, hw, Dw},
                       {&P.l1[1], mixed + 4 * B * C, C, ha, Da},
                       {&P.l1[3], mixed + 5 * B * C, C, hg, Dg},
                       {&P.l1[2], mixed + 3 * B * C, C, hv, Dv}};
        gemvs(s, jobs, have_vfirst ? 7 : 6, B);
#pragma omp for nowait
        for (int64_t i = 0; i < B * Dw; ++i) hw[i] = tanhf(hw[i]);
        s.bar.wait();
#pragma omp for nowait
        for (int64_t i = 0; i < B * Dg; ++i) hg[i] = sigmoidf(hg[i]);
        s.bar.wait();
        float* lo_w = s.lo.data();
        float* lo_a = lo_w + B * C;
        float* lo_v = lo_a + B * C;
        Job j2[4] = {{&P.l2[0], hw, Dw, lo_w, C}, {&P.l2[1], ha, Da, lo_a, C}, {&P.l2[3], hg, Dg, s.g.data(), C},
                     {&P.l2[2], hv, Dv, lo_v, C}};
        gemvs(s, j2, have_vfirst ? 4 : 3, B);
        const float DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5), as rwkv_zoo/versions/v7.py
#pragma omp for nowait
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H, o = b * C + h * N;
            float *kt = s.k.data() + o, *vt = s.v.data() + o, *wt = s.w.data() + o, *at = s.a.data() + o;
            float* kkt = s.kk.data() + o;
            const float* kk_w = P.k_k + h * N;
            const float* ka = P.k_a + h * N;
            float nrm = 0.f;
            for (int64_t i = 0; i < N; ++i) {
                const int64_t c = h * N + i;
                wt[i] = -DECAY_SCALE * sigmoidf(P.w[c] + lo_w[o + i]);
                at[i] = sigmoidf(P.a0[c] + lo_a[o + i]);
                kkt[i] = kt[i] * kk_w[i];
                nrm += kkt[i] * kkt[i];
            }
            const float inv = 1.f / fmaxf(sqrtf(nrm), 1e-12f);
            for (int64_t i = 0; i < N; ++i) {
                kkt[i] *= inv;
                kt[i] = kt[i] * (1.f + (at[i] - 1.f) * ka[i]);
            }
            float* vf = s.vfirst.data() + o;
            if (!have_vfirst) {
                memcpy(vf, vt, N * sizeof(float));
            } else {
                for (int64_t i = 0; i < N; ++i) {
                    const float t = sigmoidf(P.v0[h * N + i] + lo_v[o + i]);
                    vt[i] = vt[i] + (vf[i] - vt[i]) * t;
                }
            }
        }
        s.bar.wait();
        have_vfirst = true;
        logw = s.w.data();
    }
    // The WKV recurrence, one task per (sequence, head) walking its tokens; the head's state (16 KiB at
    // N = 64) is updated in place in the output state and stays in L1.
#pragma omp for nowait
    for (int64_t bh = 0; bh < s.nseq * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        float* S1h = S1 + bh * N * N;
        for (int64_t t = 0; t < s.T; ++t) {
            const int64_t o = (b * s.T + t) * C + h * N;
            const float* Sh = t ? S1h : (S0 ? S0 + bh * N * N : nullptr);
            float* yt = s.y.data() + o;
            const float* lw = P.att_kind == 5 ? P.w + h * N : logw + o;
            if (P.att_kind == 7) {
                float na[256], nb[256];
                const float *kkt = s.kk.data() + o, *at = s.a.data() + o;
                for (int64_t i = 0; i < N; ++i) na[i] = -kkt[i], nb[i] = kkt[i] * at[i];
                wkv_head(Sh, S1h, s.r.data() + o, s.k.data() + o, s.v.data() + o, lw, nullptr, na, nb, yt, N);
            } else {
                wkv_head(Sh, S1h, s.r.data() + o, s.k.data() + o, s.v.data() + o, lw, P.u + h * N, nullptr, nullptr,
                         yt, N);
            }
        }
    }
    s.bar.wait();
    // GroupNorm, then the gate (v5/v6: silu(g); v7: + the r k bonus, times g).
#pragma omp for nowait
    for (int64_t b = 0; b < B; ++b) {
        float* yb = s.y.data() + b * C;
        group_norm(yb, H, N, P.lnx_w, P.lnx_b, P.lnx_eps);
        const float* gb = s.g.data() + b * C;
        if (P.att_kind == 7) {
            const float *rb = s.r.data() + b * C, *kb = s.k.data() + b * C, *vb = s.v.data() + b * C;
            for (int64_t h = 0; h < H; ++h) {
                float dot = 0.f;
                for (int64_t i = 0; i < N; ++i) dot += rb[h * N + i] * kb[h * N + i] * P.r_k[h * N + i];
                for (int64_t i = 0; i < N; ++i) yb[h * N + i] = (yb[h * N + i] + dot * vb[h * N + i]) * gb[h * N + i];
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < C; ++i) yb[i] *= gb[i] * sigmoidf(gb[i]);
        }
    }
    s.bar.wait();
    const Job out = {&P.o, s.y.data(), C, s.g.data(), C};  // the gate is spent: its buffer takes the output
    gemvs(s, &out, 1, B);
}

void channel_mix(const LayerP& P, Scratch& s, const float* xx) {
    const int64_t B = s.M, C = s.C, F = P.fk.N;  // B: rows (tokens)
    const float* x = s.xf.data();
    float* mixed = s.mixed.data();
    const bool rec = P.ffn_kind != 7;
#pragma omp for nowait
    for (int64_t b = 0; b < B; ++b) {
        mix_row(x + b * C, xx + b * C, P.f_mk, C, mixed + b * C);
        if (rec) mix_row(x + b * C, xx + b * C, P.f_mr, C, mixed + (B + b) * C);
    }
    s.bar.wait();
    const Job jobs[2] = {{&P.fk, mixed, C, s.ff.data(), F}, {&P.fr, mixed + B * C, C, s.r.data(), C}};
    gemvs(s, jobs, rec ? 2 : 1, B);
#pragma omp for nowait
    for (int64_t i = 0; i < B * F; ++i) {
        const float t = s.ff[i] > 0.f ? s.ff[i] : 0.f;
        s.ff[i] = t * t;
    }
    s.bar.wait();
    const Job jv = {&P.fv, s.ff.data(), F, s.v.data(), C};
    gemvs(s, &jv, 1, B);
}

}  // namespace

extern "C" {

int rz_decode_abi_version() { return 6; }

// The instruction set this build was compiled for (cpu_tiles.h's isa_name).
const char* rz_decode_isa() { return rz::isa_name(); }

// x [B, T, C]: the token embeddings (overwritten). Per layer l, st_in[5 l + j] / st_out[5 l + j] for
// j = 0 att shift [B, C], 1 ffn shift [B, C], 2 the WKV state [B, H, N, N] or v4's a, then 3 b, 4 p
// (v4, [B, C]). st_in's WKV pointers are null for a fresh sequence. logits [B, keep, head.N] for the
// last `keep` tokens of each sequence (keep = 0: no head).
void rz_decode(const LayerP* layers, int64_t L, int64_t B, int64_t T, int64_t C, float* x, float* const* st_in,
               float* const* st_out, const float* lnout_w, const float* lnout_b, double lnout_eps, const Lin* head,
               int64_t keep, float* logits, float p_init, int nthreads) {
    int64_t F = 0, D = 0;
    for (int64_t l = 0; l < L; ++l) {
        const LayerP& P = layers[l];
        F = P.fk.N > F ? P.fk.N : F;
        int64_t d = 0;
        for (int i = 0; i < 5; ++i) d += P.l1[i].w ? P.l1[i].N : 0;
        D = d > D ? d : D;
    }
    // dot_gemm's scratch: packed x for the fp32 matrices of one gemvs call (at most one layer's, or the
    // head), counted per matrix (an upper bound: matrices of one input share their copy)
    int64_t dot_floats = 0;
    if (B * T >= rz::DOT_MIN_ROWS) {
        const int64_t most = most_per_call(layers, L, keep > 0 ? head : nullptr,
                                           [](const Lin& l) { return l.w && l.kind == rz::F32 ? l.K : 0; });
        if (most) dot_floats = rz::dot_scratch_floats(B * T, most, nthreads);
    }
    Scratch s(B, T, C, F, D, prep_bytes_bound(layers, L, keep > 0 ? head : nullptr), dot_floats);
    const int64_t M = B * T;
#pragma omp parallel num_threads(nthreads)
    {
        s.bar.n.store(omp_get_num_threads(), std::memory_order_relaxed);
        bool have_vfirst = false;  // private copies agree: every thread walks the same layers
        for (int64_t l = 0; l < L; ++l) {
            const LayerP& P = layers[l];
            float* const* in = st_in + 5 * l;
            float* const* out = st_out + 5 * l;
#pragma omp for nowait
            for (int64_t m = 0; m < M; ++m) {
                float* xm = x + m * C;
                if (P.ln0_w) layer_norm(xm, P.ln0_w, P.ln0_b, P.ln0_eps, C, xm);
                layer_norm(xm, P.ln1_w, P.ln1_b, P.ln1_eps, C, s.xa.data() + m * C);
            }
            s.bar.wait();
            shift_rows(s, s.xa.data(), in[0], s.xx.data(), out[0]);
            time_mix(P, s, s.xx.data(), in, out, have_vfirst, p_init);
#pragma omp for nowait
            for (int64_t m = 0; m < M; ++m) {
                float* xm = x + m * C;
                const float* om = s.g.data() + m * C;
#pragma omp simd
                for (int64_t i = 0; i < C; ++i) xm[i] += om[i];
                layer_norm(xm, P.ln2_w, P.ln2_b, P.ln2_eps, C, s.xf.data() + m * C);
            }
            s.bar.wait();
            shift_rows(s, s.xf.data(), in[1], s.xx.data(), out[1]);
            channel_mix(P, s, s.xx.data());
#pragma omp for nowait
            for (int64_t m = 0; m < M; ++m) {
                float* xm = x + m * C;
                const float* vm = s.v.data() + m * C;
                if (P.ffn_kind == 7) {
#pragma omp simd
                    for (int64_t i = 0; i < C; ++i) xm[i] += vm[i];
                } else {
                    const float* rm = s.r.data() + m * C;
#pragma omp simd
                    for (int64_t i = 0; i < C; ++i) xm[i] += sigmoidf(rm[i]) * vm[i];
                }
                if (P.halve)
                    for (int64_t i = 0; i < C; ++i) xm[i] *= 0.5f;
            }
            s.bar.wait();
        }
        if (keep > 0) {
#pragma omp for nowait
            for (int64_t j = 0; j < B * keep; ++j) {
                const int64_t b = j / keep, t = T - keep + j % keep;
                layer_norm(x + (b * T + t) * C, lnout_w, lnout_b, lnout_eps, C, s.xa.data() + j * C);
            }
            s.bar.wait();
            const Job jh = {head, s.xa.data(), C, logits, head->N};
            gemvs(s, &jh, 1, B * keep);
        }
    }
}

}  // extern "C"
