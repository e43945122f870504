// The fused decode step (csrc/cpu_decode.cpp's rz_decode) of one ISA build against the portable build,
// on two random hybrids (C = 64, 4 heads of 16): "fp32", three layers (v7, v7, v4 time-mix and
// channel-mix) with fp32 weights; "mixed", two layers (v7, v4) whose projections use every weight
// format (int4 v7 r/k/v and v4 key, int8 channel-mix and v4 output, bf16 v7 output and v4 receptance,
// fp32 LoRA, v4 value and head). Each runs a prefill of 2 sequences x 29 tokens from a fresh state, then
// one decode step from the state it returned. Compared: both calls' logits and every output state.
// The structs mirror cpu_decode.cpp's Lin and LayerP (every field 8 bytes, as the ctypes mirror in
// backends/cpu/kernels.py).
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <memory>
#include <string>
#include <vector>

namespace {

struct Lin {
    const void* w;
    const float* scale;
    int64_t kind, N, K;
};

struct LayerP {
    int64_t att_kind, ffn_kind, H, N, halve;
    double ln0_eps, ln1_eps, ln2_eps, lnx_eps;
    const float *ln0_w, *ln0_b, *ln1_w, *ln1_b, *ln2_w, *ln2_b, *lnx_w, *lnx_b;
    const float* mix;
    const float* w;
    const float* u;
    const float *a0, *v0, *k_k, *k_a, *r_k;
    Lin r, k, v, o, g;
    Lin l1[5], l2[5];
    Lin fk, fv, fr;
    const float *f_mk, *f_mr;
};
static_assert(sizeof(Lin) == 40 && sizeof(LayerP) == 8 * (25 + 5 * 5 + 10 * 5 + 3 * 5 + 2), "mirror of cpu_decode.cpp");

using DecodeFn = void (*)(const LayerP*, int64_t, int64_t, int64_t, int64_t, float*, float* const*, float* const*,
                          const float*, const float*, double, const Lin*, int64_t, float*, float, int);

struct Rng {
    uint64_t s;
    float normal() {
        auto next = [this] {
            uint64_t z = (s += 0x9E3779B97F4A7C15ull);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            return z ^ (z >> 31);
        };
        const double u1 = ((next() >> 11) + 0.5) / 9007199254740992.0, u2 = ((next() >> 11) + 0.5) / 9007199254740992.0;
        return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
};

uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Owns every buffer of the model; vectors of floats / bytes that the Lin and LayerP structs point into.
struct Model {
    std::vector<std::unique_ptr<std::vector<float>>> floats;
    std::vector<std::unique_ptr<std::vector<uint8_t>>> bytes;
    Rng rng{12345};
    int64_t C = 64, H = 4, Nh = 16, F = 256, D = 32, V = 252;
    bool mixed;  // false: every matrix fp32 (only summation order and libmvec may differ between builds)
    std::vector<LayerP> layers;
    Lin head{};
    const float *lnout_w = nullptr, *lnout_b = nullptr;

    const float* vec(int64_t n, float mean, float stdev) {
        floats.emplace_back(new std::vector<float>(n));
        for (auto& v : *floats.back()) v = mean + stdev * rng.normal();
        return floats.back()->data();
    }
    const float* uniform01(int64_t n) {
        floats.emplace_back(new std::vector<float>(n));
        for (auto& v : *floats.back()) v = 0.5f + 0.15f * rng.normal();
        return floats.back()->data();
    }
    // A random [N, K] matrix (std 1 / sqrt(K)) packed as kind (same layouts as harness.cpp's make_packed).
    Lin lin(int kind, int64_t N, int64_t K) {
        if (!mixed) kind = 0;
        std::vector<float> w(N * K);
        for (auto& v : w) v = rng.normal() / sqrtf((float)K);
        const int64_t Np = (N + 3) / 4 * 4, n4 = Np / 4;
        Lin L{nullptr, nullptr, kind, Np, K};
        bytes.emplace_back(new std::vector<uint8_t>());
        auto& out = *bytes.back();
        if (kind == 0 || kind == 1 || kind == 2) {
            const int64_t esize = kind == 0 ? 4 : kind == 1 ? 2 : 1, lanes = kind == 1 ? 16 : 8;
            out.assign(Np * K * esize, 0);
            std::vector<float> sc(Np, 0.f);
            if (kind == 2)
                for (int64_t n = 0; n < N; ++n) {
                    float m = 0.f;
                    for (int64_t k = 0; k < K; ++k) m = fmaxf(m, fabsf(w[n * K + k]));
                    sc[n] = m > 0 ? m / 127.f : 1.f;
                }
            for (int64_t n = 0; n < N; ++n)
                for (int64_t k = 0; k < K; ++k) {
                    int64_t lane = k % lanes;
                    if (kind == 1) lane = 2 * (k % 8) + (k % 16) / 8;
                    const int64_t idx = ((n / 4 * (K / lanes) + k / lanes) * 4 + n % 4) * lanes + lane;
                    if (kind == 0) {
                        memcpy(&out[idx * 4], &w[n * K + k], 4);
                    } else if (kind == 1) {
                        const uint16_t h = to_bf16(w[n * K + k]);
                        memcpy(&out[idx * 2], &h, 2);
                    } else {
                        out[idx] = (uint8_t)(int8_t)lrintf(fminf(fmaxf(w[n * K + k] / sc[n], -127.f), 127.f));
                    }
                }
            if (kind == 2) {
                floats.emplace_back(new std::vector<float>(sc));
                L.scale = floats.back()->data();
            }
        } else {
            const int64_t G = K / 64;
            std::vector<uint8_t> u(Np * K, 8);
            floats.emplace_back(new std::vector<float>(n4 * G * 4, 0.f));
            auto& sc = *floats.back();
            for (int64_t n = 0; n < N; ++n)
                for (int64_t g = 0; g < G; ++g) {
                    float m = 0.f;
                    for (int64_t k = g * 64; k < g * 64 + 64; ++k) m = fmaxf(m, fabsf(w[n * K + k]));
                    const float s = m > 0 ? m / 8.f : 1.f;
                    sc[(n / 4 * G + g) * 4 + n % 4] = s;
                    for (int64_t k = g * 64; k < g * 64 + 64; ++k)
                        u[n * K + k] = (uint8_t)(lrintf(fminf(fmaxf(w[n * K + k] / s, -8.f), 7.f)) + 8);
                }
            out.assign(Np * K / 2, 0);
            for (int64_t n = 0; n < Np; ++n)
                for (int64_t kb = 0; kb < K / 8; ++kb)
                    for (int j = 0; j < 4; ++j)
                        out[((n / 4 * (K / 8) + kb) * 4 + n % 4) * 4 + j] =
                            (uint8_t)(u[n * K + 8 * kb + j] | (u[n * K + 8 * kb + j + 4] << 4));
            L.scale = sc.data();
        }
        L.w = out.data();
        return L;
    }

    void common(LayerP& P, bool first) {
        P.H = H, P.N = Nh, P.halve = 0;
        P.ln0_eps = P.ln1_eps = P.ln2_eps = 1e-5, P.lnx_eps = 64e-5;
        if (first) P.ln0_w = vec(C, 1, 0.1f), P.ln0_b = vec(C, 0, 0.1f);
        P.ln1_w = vec(C, 1, 0.1f), P.ln1_b = vec(C, 0, 0.1f);
        P.ln2_w = vec(C, 1, 0.1f), P.ln2_b = vec(C, 0, 0.1f);
        P.fk = lin(2, F, C), P.fv = lin(2, C, F);
        P.f_mk = uniform01(C);
    }

    LayerP v7(bool first) {
        LayerP P{};
        P.att_kind = P.ffn_kind = 7;
        common(P, first);
        P.lnx_w = vec(C, 1, 0.1f), P.lnx_b = vec(C, 0, 0.1f);
        P.mix = uniform01(6 * C);
        P.w = vec(C, -0.5f, 0.5f), P.a0 = vec(C, 0, 0.5f), P.v0 = vec(C, 0, 0.5f);
        P.k_k = vec(C, 0.85f, 0.1f), P.k_a = vec(C, 1, 0.1f), P.r_k = vec(C, 0, 0.1f);
        P.r = lin(3, C, C), P.k = lin(3, C, C), P.v = lin(3, C, C), P.o = lin(1, C, C);
        for (int i = 0; i < 4; ++i) P.l1[i] = lin(0, D, C), P.l2[i] = lin(0, C, D);
        return P;
    }

    LayerP v4() {
        LayerP P{};
        P.att_kind = P.ffn_kind = 4;
        common(P, false);
        P.mix = uniform01(3 * C);
        floats.emplace_back(new std::vector<float>(C));
        for (int64_t i = 0; i < C; ++i) (*floats.back())[i] = -expf(-1.f + 0.5f * rng.normal());
        P.w = floats.back()->data();
        P.u = vec(C, 0, 0.5f);
        P.k = lin(3, C, C), P.v = lin(0, C, C), P.r = lin(1, C, C), P.o = lin(2, C, C);
        P.fr = lin(0, C, C);
        P.f_mr = uniform01(C);
        return P;
    }

    explicit Model(bool mixed_) : mixed(mixed_) {
        // mixed: the layout of test_cpu_isa.py's _mixed_model (v7 + v4); fp32: one more v7 layer, whose
        // time-mix takes the v_first path (l1[2] / l2[2]).
        if (mixed) layers = {v7(true), v4()};
        else layers = {v7(true), v7(false), v4()};
        head = lin(0, V, C);
        lnout_w = vec(C, 1, 0.1f), lnout_b = vec(C, 0, 0.1f);
    }
};

struct Run {
    std::vector<float> logits;                   // both calls, concatenated
    std::vector<std::vector<float>> states;      // the decode call's output states
};

Run run(DecodeFn fn, const Model& m, int threads) {
    // B x T = 58 prefill rows: the row-group tails of every tile kernel (the fused step keeps them at any row count).
    const int64_t L = (int64_t)m.layers.size(), B = 2, T = 29, C = m.C;
    Rng rng{777};
    std::vector<float> x(B * T * C), x1(B * C);
    for (auto& v : x) v = rng.normal();
    for (auto& v : x1) v = rng.normal();
    // per layer: att shift [B, C], ffn shift [B, C], WKV state ([B, H, N, N], or v4's a [B, C]), b, p
    auto sizes = [&](const LayerP& P, int j) -> int64_t {
        if (j < 2) return B * C;
        if (P.att_kind == 4) return B * C;
        return j == 2 ? B * m.H * m.Nh * m.Nh : 0;
    };
    std::vector<std::vector<float>> zeros(5 * L), s1(5 * L), s2(5 * L);
    std::vector<float*> in0(5 * L), out1(5 * L), out2(5 * L);
    for (int64_t l = 0; l < L; ++l)
        for (int j = 0; j < 5; ++j) {
            const int64_t n = sizes(m.layers[l], j);
            zeros[5 * l + j].assign(n, 0.f), s1[5 * l + j].assign(n, NAN), s2[5 * l + j].assign(n, NAN);
            in0[5 * l + j] = j < 2 ? zeros[5 * l + j].data() : nullptr;  // a fresh sequence: no WKV state
            out1[5 * l + j] = n ? s1[5 * l + j].data() : nullptr;
            out2[5 * l + j] = n ? s2[5 * l + j].data() : nullptr;
        }
    Run r;
    std::vector<float> lg1(B * m.head.N, NAN), lg2(B * m.head.N, NAN);
    fn(m.layers.data(), L, B, T, C, x.data(), in0.data(), out1.data(), m.lnout_w, m.lnout_b, 1e-5, &m.head, 1,
       lg1.data(), -1e38f, threads);
    fn(m.layers.data(), L, B, 1, C, x1.data(), out1.data(), out2.data(), m.lnout_w, m.lnout_b, 1e-5, &m.head, 1,
       lg2.data(), -1e38f, threads);
    r.logits = lg1;
    r.logits.insert(r.logits.end(), lg2.begin(), lg2.end());
    r.states = s2;
    return r;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

}  // namespace

bool run_decode(const char* isa, void* port_lib, void* lib, int threads, bool mixed, std::string& detail) {
    auto fp = reinterpret_cast<DecodeFn>(dlsym(port_lib, "rz_decode"));
    auto fi = reinterpret_cast<DecodeFn>(dlsym(lib, "rz_decode"));
    const Model m(mixed);
    const Run ref = run(fp, m, threads), got = run(fi, m, threads);
    // fp32 weights: 1e-4, the test's bound for the fused step against the modules (the builds differ in
    // summation order and in libmvec's vector exp); mixed formats: the test's 1e-2 (activation rounding).
    const double tol = !strcmp(isa, "portable") ? 1e-6 : mixed ? 1e-2 : 1e-4;
    double e = rel(got.logits, ref.logits), es = 0;
    bool finite = true;
    for (float v : ref.logits) finite = finite && std::isfinite(v);
    for (size_t i = 0; i < ref.states.size(); ++i) es = fmax(es, rel(got.states[i], ref.states[i]));
    char buf[256];
    snprintf(buf, sizeof buf, "%s, prefill B=2 T=29 + 1 step: logits rel err %.2e, states %.2e (tol %.0e)%s",
             mixed ? "v7/v4 int4+int8+bf16+fp32" : "v7/v7/v4 fp32", e, es, tol, finite ? "" : ", portable logits not finite");
    detail = buf;
    return finite && e < tol && es < tol;  // NaN fails
}
