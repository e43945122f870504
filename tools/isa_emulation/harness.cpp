// Runs every ISA build of the cpu backend's kernels (backends/cpu/csrc) on random inputs and compares
// each with the portable build, without torch or Python, so that it can run as /init of an initramfs
// on an emulated CPU (bochs: AVX-512, VNNI) that the development machine does not have.
//
// usage: isa_harness [LIBDIR [NTHREADS]]   (LIBDIR default /rz, the initramfs layout of run.sh)
// LIBDIR holds cpu_gemv-<isa>.so and cpu_decode-<isa>.so for isa in ISAS below, built by run.sh with
// backends/cpu/kernels.py's flags (and avx512_bf16_sw: the avx512_bf16 build with its BF16 / VNNI
// instructions replaced by sw_bf16.h, checked bit for bit against avx512_bf16 where both run). Each library is dlopen'ed RTLD_LOCAL, as ctypes does, so the inline
// tile functions that every build defines stay private to their build.
//
// Prints one line per (ISA, kernel family): PASS, FAIL (with shape and error) or SKIP (the CPU lacks a
// feature the build needs, judged by CPUID), then "ISA-HARNESS-END failures=<n> ran=<isa,...>". Run as
// PID 1 it mounts /proc (for the cpuinfo flags line) and powers the machine off at the end.
//
// Tolerances are tests/kernels/test_cpu_isa.py's: relative error (Frobenius norm) against the portable
// build 1e-5, or 1e-2 where a build rounds the activations on purpose (int8 / int4 weights through the
// integer dots of every x86 build when K % 32 == 0; bf16 weights through vdpbf16ps); those lossy paths
// are also checked exactly (1e-6 of the largest output) against the same rounding done here in double.
#include <cpuid.h>
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: every x86-64)
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/klog.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace {

struct Isa {
    const char* name;                // the libraries' file names: cpu_gemv-<name>.so
    std::vector<const char*> needs;  // CPUID features (__builtin_cpu_supports names)
    const char* reports;             // what rz_isa must answer (null: the name)
    const char* note;                // printed once before its lines (null: nothing)
};

const Isa ISAS[] = {
    {"portable", {}, nullptr, nullptr},
    {"avx2", {"avx2", "fma"}, nullptr, nullptr},
    {"avx512", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, nullptr, nullptr},
    {"avx512_vnni", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, nullptr, nullptr},
    {"avx512_bf16", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16"}, nullptr, nullptr},
    // run.sh's software-instruction build (sw_bf16.h): the avx512_bf16 sources and flags with vdpbf16ps
    // and vpdpbusd replaced by exact AVX-512F / AVX2 code, so it runs on any AVX-512 F/BW/VL CPU.
    {"avx512_bf16_sw", {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, "avx512_bf16",
     "NOTE avx512_bf16_sw: the avx512_bf16 build with its bf16 (vdpbf16ps) and VNNI (vpdpbusd) instructions "
     "emulated in software (tools/isa_emulation/sw_bf16.h)"},
};

bool cpu_has(const char* f) {
    // __builtin_cpu_supports needs a string literal.
#define RZ_F(s) if (!strcmp(f, s)) return __builtin_cpu_supports(s);
    RZ_F("avx2") RZ_F("fma") RZ_F("avx512f") RZ_F("avx512bw") RZ_F("avx512vl") RZ_F("avx512vnni")
    RZ_F("avx512bf16")
#undef RZ_F
    return false;
}

// ---- random numbers (splitmix64, Box-Muller) ----------------------------------------------------
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
    float normal() { return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform())); }
};

uint16_t to_bf16(float f) {  // round to nearest even, as cpu_tiles.h and torch do
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

enum Kind { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };
const char* KIND_NAMES[] = {"fp32", "bf16", "int8", "int4"};
constexpr int QBLK = 32, I4_GROUP = 64;

// One matrix [N, K] in one weight format: the values it stands for (deq, row-major [N, K]), the codes
// where quantized, and the kernels' packed tile layout (backends/cpu/kernels.py pack / pack_int4).
struct Packed {
    int kind;
    int64_t N, K, Np;
    std::vector<double> deq;      // [N, K]
    std::vector<int8_t> codes;    // int8 / int4: [N, K]
    std::vector<float> wscale;    // int8: [N] per row; int4: [N, K / 64]
    std::vector<uint8_t> data;    // packed weights (raw bytes)
    std::vector<float> scale;     // packed scales: int8 [Np]; int4 [Np / 4, K / 64, 4]
    const float* scale_ptr() const { return scale.empty() ? nullptr : scale.data(); }
};

Packed make_packed(int kind, const std::vector<float>& w, int64_t N, int64_t K) {
    Packed p;
    p.kind = kind, p.N = N, p.K = K, p.Np = (N + 3) / 4 * 4;
    const int64_t n4 = p.Np / 4;
    p.deq.assign(N * K, 0.0);
    if (kind == F32) {
        std::vector<float> out(p.Np * K, 0.f);
        for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < K; ++k) {
                out[((n / 4 * (K / 8) + k / 8) * 4 + n % 4) * 8 + k % 8] = w[n * K + k];
                p.deq[n * K + k] = w[n * K + k];
            }
        p.data.resize(out.size() * 4);
        memcpy(p.data.data(), out.data(), p.data.size());
    } else if (kind == BF16) {
        // [N' / 4, K / 16, 4, 16] with lanes (w0, w8, w1, w9, ..., w7, w15)
        std::vector<uint16_t> out(p.Np * K, 0);
        for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < K; ++k) {
                const uint16_t h = to_bf16(w[n * K + k]);
                const int64_t j = k % 8, half = (k % 16) / 8;
                out[((n / 4 * (K / 16) + k / 16) * 4 + n % 4) * 16 + 2 * j + half] = h;
                p.deq[n * K + k] = from_bf16(h);
            }
        p.data.resize(out.size() * 2);
        memcpy(p.data.data(), out.data(), p.data.size());
    } else if (kind == I8) {
        // one scale per row: max|w| / 127 (rwkv_zoo.inference.quantize_int8's convention)
        p.codes.assign(N * K, 0);
        p.wscale.assign(N, 0.f);
        p.scale.assign(p.Np, 0.f);
        std::vector<int8_t> out(p.Np * K, 0);
        for (int64_t n = 0; n < N; ++n) {
            float m = 0.f;
            for (int64_t k = 0; k < K; ++k) m = fmaxf(m, fabsf(w[n * K + k]));
            const float s = m > 0.f ? m / 127.f : 1.f;
            p.wscale[n] = p.scale[n] = s;
            for (int64_t k = 0; k < K; ++k) {
                const int8_t q = (int8_t)lrintf(fminf(fmaxf(w[n * K + k] / s, -127.f), 127.f));
                p.codes[n * K + k] = q;
                out[((n / 4 * (K / 8) + k / 8) * 4 + n % 4) * 8 + k % 8] = q;
                p.deq[n * K + k] = (double)q * s;
            }
        }
        p.data.resize(out.size());
        memcpy(p.data.data(), out.data(), p.data.size());
    } else {
        // group scales max|w| / 8 per 64 columns, codes in [-8, 7]; packed [N' / 4, K / 8, 4, 4] bytes
        // (columns j and j + 4 of each step as code + 8 in the low and high nibble), scales [N' / 4, K / 64, 4]
        const int64_t G = K / I4_GROUP;
        p.codes.assign(N * K, 0);
        p.wscale.assign(N * G, 0.f);
        p.scale.assign(n4 * G * 4, 0.f);
        std::vector<uint8_t> u(p.Np * K, 8);
        for (int64_t n = 0; n < N; ++n)
            for (int64_t g = 0; g < G; ++g) {
                float m = 0.f;
                for (int64_t k = g * I4_GROUP; k < (g + 1) * I4_GROUP; ++k) m = fmaxf(m, fabsf(w[n * K + k]));
                const float s = m > 0.f ? m / 8.f : 1.f;
                p.wscale[n * G + g] = s;
                p.scale[(n / 4 * G + g) * 4 + n % 4] = s;
                for (int64_t k = g * I4_GROUP; k < (g + 1) * I4_GROUP; ++k) {
                    const int q = (int)lrintf(fminf(fmaxf(w[n * K + k] / s, -8.f), 7.f));
                    p.codes[n * K + k] = (int8_t)q;
                    u[n * K + k] = (uint8_t)(q + 8);
                    p.deq[n * K + k] = (double)q * s;
                }
            }
        p.data.assign(p.Np * K / 2, 0);
        for (int64_t n = 0; n < p.Np; ++n)
            for (int64_t kb = 0; kb < K / 8; ++kb)
                for (int j = 0; j < 4; ++j)
                    p.data[((n / 4 * (K / 8) + kb) * 4 + n % 4) * 4 + j] =
                        (uint8_t)(u[n * K + 8 * kb + j] | (u[n * K + 8 * kb + j + 4] << 4));
    }
    return p;
}

// x [M, K] times the values the weights stand for, in double.
std::vector<double> exact(const std::vector<float>& x, int64_t M, const Packed& p) {
    std::vector<double> y(M * p.N, 0.0);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < p.N; ++n) {
            double s = 0;
            for (int64_t k = 0; k < p.K; ++k) s += (double)x[m * p.K + k] * p.deq[n * p.K + k];
            y[m * p.N + n] = s;
        }
    return y;
}

// What the lossy builds compute, in double: int8 / int4 weights -> activations rounded to int8 per
// block of 32 columns exactly as cpu_tiles.h's prep_row does (float arithmetic), exact integer dots,
// scales afterwards; bf16 -> activations rounded to bf16.
std::vector<double> rounded_reference(const std::vector<float>& x, int64_t M, const Packed& p) {
    const int64_t K = p.K, N = p.N;
    std::vector<double> y(M * N, 0.0);
    if (p.kind == BF16) {
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
                double s = 0;
                for (int64_t k = 0; k < K; ++k) s += (double)from_bf16(to_bf16(x[m * K + k])) * p.deq[n * K + k];
                y[m * N + n] = s;
            }
        return y;
    }
    std::vector<int> q(K);
    std::vector<float> sx(K / QBLK);
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
            float mx = 0.f;
            for (int64_t k = k0; k < k0 + QBLK; ++k) mx = fmaxf(mx, fabsf(x[m * K + k]));
            const float s = mx > 0.f ? mx / 127.f : 1.f, inv = 1.f / s;
            sx[k0 / QBLK] = s;
            for (int64_t k = k0; k < k0 + QBLK; ++k) q[k] = (int)nearbyintf(x[m * K + k] * inv);
        }
        for (int64_t n = 0; n < N; ++n) {
            double acc = 0;
            for (int64_t k0 = 0; k0 < K; k0 += QBLK) {
                int64_t dot = 0;
                for (int64_t k = k0; k < k0 + QBLK; ++k) dot += (int64_t)q[k] * p.codes[n * K + k];
                const double ws = p.kind == I8 ? p.wscale[n] : p.wscale[n * (K / I4_GROUP) + k0 / I4_GROUP];
                acc += (double)dot * sx[k0 / QBLK] * ws;
            }
            y[m * N + n] = acc;
        }
    }
    return y;
}

template <typename A, typename B>
double rel_err(const A& a, const B& b) {  // ||a - b|| / ||b||
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += ((double)a[i] - (double)b[i]) * ((double)a[i] - (double)b[i]);
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
template <typename A, typename B>
double max_err(const A& a, const B& b, double* max_ref) {  // max |a - b|, and max |b|
    double e = 0, r = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        e = fmax(e, fabs((double)a[i] - (double)b[i]));
        r = fmax(r, fabs((double)b[i]));
    }
    *max_ref = r;
    return e;
}

// ---- the libraries ------------------------------------------------------------------------------
using GemvFn = void (*)(int64_t, const float*, int64_t, int64_t, int64_t, const void*, const float*, int64_t, float*,
                        int64_t, int);
using NameFn = const char* (*)();
using AbiFn = int (*)();

struct Lib {
    void* h = nullptr;
    std::string err;
};

Lib open_lib(const std::string& dir, const char* name, const char* isa) {
    Lib l;
    const std::string path = dir + "/" + name + "-" + isa + ".so";
    l.h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!l.h) l.err = dlerror();
    return l;
}

template <typename F>
F sym(const Lib& l, const char* s) {
    return reinterpret_cast<F>(dlsym(l.h, s));
}

struct Gemv {
    GemvFn fn;
    int threads;
    std::vector<float> operator()(const Packed& p, const std::vector<float>& x, int64_t M) const {
        std::vector<float> y(M * p.Np, NAN);
        fn(p.kind, x.data(), M, p.K, p.K, p.data.data(), p.scale_ptr(), p.Np, y.data(), p.Np, threads);
        std::vector<float> out(M * p.N);
        for (int64_t m = 0; m < M; ++m) memcpy(&out[m * p.N], &y[m * p.Np], p.N * sizeof(float));
        return out;
    }
};

struct Case {
    int64_t N, K, M;
    bool extremes;  // the saturation corners of test_integer_dots_equal_their_quantization
};

// (N, K, M): M = 1 (decode GEMV) and M > 1 (prefill; 13 = 8 + 4 + 1 walks every row group of the
// widest build); N not a multiple of 4 (padded tile); K = 48 (int8: not a multiple of the 32-column
// activation block, so the x86 builds take the fp32-widening path instead of the integer dot).
std::vector<Case> cases_for(int kind) {
    std::vector<Case> c = {{37, 128, 1, false}, {8, 64, 5, false}, {20, 192, 13, false}, {64, 256, 9, false}};
    if (kind != I4) c.push_back({13, 48, 3, false});
    if (kind == I8 || kind == I4) c.push_back({12, 256, 7, true});
    // Rows >= rz::DOT_MIN_ROWS (48): fp32 takes dot_gemm (24-row panels, 384-column K-blocks);
    // 58 = 2 x 24 + a 10-row tail, K = 392 = 384 + a K-block tail, N = 37 a padded tile.
    c.push_back({20, 256, 58, false});
    if (kind == F32 || kind == I8) c.push_back({37, 392, 50, false});  // bf16 / int4 tiles need K % 16 / 64
    return c;
}

void fill_case(const Case& c, int kind, Rng& rng, std::vector<float>& w, std::vector<float>& x) {
    w.resize(c.N * c.K);
    x.resize(c.M * c.K);
    for (auto& v : w) v = rng.normal();
    for (auto& v : x) v = rng.normal();
    if (!c.extremes) return;
    for (int64_t k = 0; k < c.K; ++k) {
        w[k] = -1.0f;                              // row 0: every code -127 (int8) or -8 (int4)
        w[c.K + k] = k % 2 ? -1.0f : 1.0f;         // row 1: alternating extremes
        x[k] = 3.0f;                               // input row 0: every activation code 127
        if (k < QBLK) x[c.K + k] = 0.0f;           // input row 1: a block of zeros (scale 0)
        if (k % 2 == 0) x[2 * c.K + k] = -5.0f;
    }
    (void)kind;
}

bool lossy(const char* isa, int kind, int64_t K) {
    if (!strcmp(isa, "portable")) return false;
    if ((kind == I8 || kind == I4) && K % QBLK == 0) return true;
    return kind == BF16 && !strncmp(isa, "avx512_bf16", 11);  // avx512_bf16 and avx512_bf16_sw
}

int failures = 0;

// PID 1 only: when the CPU has XSAVE but the kernel left it off (CR4.OSXSAVE clear: Linux rejects the
// XSAVE layout bochs describes and disables AVX with it), load rz_xcr0.ko from the libraries' folder
// to turn the state on, then start again (exec) so that glibc and libgcc detect the CPU anew.
void enable_xsave_state(char** argv) {
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (getenv("RZ_XCR0") || !(c & (1u << 26)) || (c & (1u << 27))) return;
    const int fd = open("/rz/rz_xcr0.ko", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("xcr0: the kernel disabled XSAVE and /rz/rz_xcr0.ko is missing: AVX builds will be skipped\n");
        return;
    }
    if (syscall(SYS_finit_module, fd, "", 0) != 0) {
        printf("xcr0: loading rz_xcr0.ko failed: %s\n", strerror(errno));
        close(fd);
        return;
    }
    close(fd);
    char env0[] = "RZ_XCR0=1";
    char* envp[] = {env0, nullptr};
    fflush(stdout);
    execve("/init", argv, envp);
    printf("xcr0: exec /init failed: %s\n", strerror(errno));
}

// PID 1 at the end: let the serial port send what is queued (the power-off does not wait for it), then
// power the machine off (ACPI; bochs quits on it).
void power_off() {
    fflush(stdout);
    tcdrain(1);
    sleep(1);
    sync();
    reboot(RB_POWER_OFF);
}

void report(bool ok, const char* isa, const std::string& kernel, const std::string& detail) {
    printf("%s %-14s %-12s %s\n", ok ? "PASS" : "FAIL", isa, kernel.c_str(), detail.c_str());
    fflush(stdout);
    if (!ok) ++failures;
}

// One (ISA, weight kind): every case against the portable build (and the portable build against double).
void check_gemv(const char* isa, const Gemv& port, const Gemv& g, int kind) {
    Rng rng(1000 + kind);
    double worst = 0, worst_exact = 0;
    std::string fail;
    for (const Case& c : cases_for(kind)) {
        std::vector<float> w, x;
        fill_case(c, kind, rng, w, x);
        const Packed p = make_packed(kind, w, c.N, c.K);
        const std::vector<float> ref = port(p, x, c.M);
        const std::vector<float> y = g(p, x, c.M);
        char shape[96];
        snprintf(shape, sizeof shape, "N=%lld K=%lld M=%lld%s", (long long)c.N, (long long)c.K, (long long)c.M,
                 c.extremes ? " (extremes)" : "");
        const double e_port = rel_err(ref, exact(x, c.M, p));
        if (!(e_port < 1e-5) && fail.empty()) fail = std::string(shape) + ": portable vs double rel " + std::to_string(e_port);
        const bool lo = lossy(isa, kind, c.K);
        const double tol = lo ? 1e-2 : 1e-5;
        const double e = rel_err(y, ref);
        worst = fmax(worst, e);
        char buf[256];
        if (!(e < tol) && fail.empty()) {  // also catches NaN
            double mref;
            const double me = max_err(y, ref, &mref);
            snprintf(buf, sizeof buf, "%s: rel err %.3g vs portable (tol %.0e), max abs err %.3g (max |ref| %.3g)",
                     shape, e, tol, me, mref);
            fail = buf;
        }
        if (lo) {
            double mref;
            const double me = max_err(y, rounded_reference(x, c.M, p), &mref);
            worst_exact = fmax(worst_exact, me / mref);
            if (!(me <= 1e-6 * mref) && fail.empty()) {
                snprintf(buf, sizeof buf, "%s: max err %.3g vs its own activation rounding (max |ref| %.3g, tol 1e-6 rel)",
                         shape, me, mref);
                fail = buf;
            }
        }
    }
    char detail[256], own[64];
    snprintf(own, sizeof own, ", vs own rounding %.2e", worst_exact);
    if (fail.empty()) {
        snprintf(detail, sizeof detail, "%zu shapes, max rel err vs portable %.2e%s", cases_for(kind).size(), worst,
                 worst_exact > 0 || lossy(isa, kind, 256) ? own : "");
        report(true, isa, std::string("gemv-") + KIND_NAMES[kind], detail);
    } else {
        report(false, isa, std::string("gemv-") + KIND_NAMES[kind], fail);
    }
}

// fp32 with many rows (dot_gemm, from 48 rows) keeps the tile kernels' sums: every row of a call equals,
// bit for bit, the same row alone (the tile kernel) and in a call of 47 rows (the tile kernels' row
// groups), in this build. Shapes: a 10-row tail panel with a K-block tail (K = 392) and a padded tile;
// two full K-blocks and a tail (K = 776) with a 1-row tail panel.
void check_fp32_rows(const char* isa, const Gemv& g) {
    Rng rng(77);
    std::string fail;
    const int64_t shapes[][3] = {{37, 392, 58}, {20, 776, 49}};
    for (const auto& sh : shapes) {
        const int64_t N = sh[0], K = sh[1], M = sh[2];
        std::vector<float> w(N * K), x(M * K);
        for (auto& v : w) v = rng.normal();
        for (auto& v : x) v = rng.normal();
        const Packed p = make_packed(F32, w, N, K);
        const std::vector<float> all = g(p, x, M), first47 = g(p, x, 47);
        for (int64_t m = 0; m < M && fail.empty(); ++m) {
            const std::vector<float> row(x.begin() + m * K, x.begin() + (m + 1) * K);
            const std::vector<float> alone = g(p, row, 1);
            const bool same = !memcmp(alone.data(), &all[m * N], N * sizeof(float)) &&
                              (m >= 47 || !memcmp(alone.data(), &first47[m * N], N * sizeof(float)));
            if (!same) {
                char buf[128];
                snprintf(buf, sizeof buf, "N=%lld K=%lld M=%lld: row %lld differs from the row alone / in 47 rows",
                         (long long)N, (long long)K, (long long)M, (long long)m);
                fail = buf;
            }
        }
    }
    report(fail.empty(), isa, "fp32-rows", fail.empty() ? "58 and 49 rows: every row bitwise as alone" : fail);
}

// When the CPU runs both: the software build (sw_bf16.h) against the real instructions, bit for bit,
// on the shapes above and on bf16 inputs scaled towards the denormal range (2^-120, 2^-126: many
// activations denormal, outputs near the smallest normal), where vdpbf16ps flushes inputs and outputs
// to zero. The same rows through both builds: any difference is the stand-in's. It runs on this
// thread only, with MXCSR's FTZ / DAZ cleared: the -ffast-math decode libraries set both when they are
// loaded (GCC links crtfastmath.o into them), and that alone would flush the stand-in's denormals and
// hide a missing flush in sw_bf16.h.
void check_sw_vs_hw(const Gemv& hw_threads, const Gemv& sw_threads) {
    const Gemv hw{hw_threads.fn, 1}, sw{sw_threads.fn, 1};
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x8040u);  // FTZ (bit 15), DAZ (bit 6)
    Rng rng(4242);
    int64_t values = 0, differ = 0;
    std::string first;
    for (int kind = 0; kind < 4; ++kind)
        for (const Case& c : cases_for(kind))
            for (const float scale : {1.0f, 0x1p-120f, 0x1p-126f}) {
                if (scale != 1.0f && kind != BF16) continue;
                std::vector<float> w, x;
                fill_case(c, kind, rng, w, x);
                for (auto& v : x) v *= scale;
                const Packed p = make_packed(kind, w, c.N, c.K);
                const std::vector<float> a = hw(p, x, c.M), b = sw(p, x, c.M);
                for (size_t i = 0; i < a.size(); ++i) {
                    ++values;
                    if (memcmp(&a[i], &b[i], sizeof(float)) == 0) continue;
                    if (++differ == 1) {
                        char buf[192];
                        snprintf(buf, sizeof buf, "%s N=%lld K=%lld M=%lld x*%g: [%zu] hw %.9g sw %.9g",
                                 KIND_NAMES[kind], (long long)c.N, (long long)c.K, (long long)c.M, (double)scale,
                                 i, (double)a[i], (double)b[i]);
                        first = buf;
                    }
                }
            }
    _mm_setcsr(csr);
    char detail[320];
    if (differ == 0)
        snprintf(detail, sizeof detail, "%lld outputs of the 4 formats bit-identical to avx512_bf16's (bf16 also at "
                 "inputs x 2^-120, 2^-126)", (long long)values);
    else
        snprintf(detail, sizeof detail, "%lld of %lld outputs differ from avx512_bf16's; first: %s", (long long)differ,
                 (long long)values, first.c_str());
    report(differ == 0, "avx512_bf16_sw", "vs-hw-bits", detail);
}

}  // namespace

bool run_decode(const char* isa, void* port_lib, void* lib, int threads, bool mixed, std::string& detail);

int main(int argc, char** argv) {
    const bool pid1 = getpid() == 1;
    if (pid1) {
        // An initramfs without device nodes leaves init without a console: mount devtmpfs and take the
        // kernel's console (console=ttyS0, the serial port bochs writes to a file) as stdin/out/err.
        mkdir("/dev", 0755);
        mount("devtmpfs", "/dev", "devtmpfs", 0, nullptr);
        const int fd = open("/dev/console", O_RDWR);
        if (fd >= 0) dup2(fd, 0), dup2(fd, 1), dup2(fd, 2);
        mkdir("/proc", 0755);
        mount("proc", "/proc", "proc", 0, nullptr);
        enable_xsave_state(argv);  // returns only when it is not needed or failed
    }
    // As PID 1 the arguments are kernel command-line words (e.g. "nokaslr"): ignore them.
    const std::string dir = argc > 1 && !pid1 ? argv[1] : "/rz";
    // With the register state enabled behind the kernel's back (enable_xsave_state) the kernel does not
    // save AVX registers per thread: one thread only.
    const bool xcr0_module = getenv("RZ_XCR0") != nullptr;
    const int threads = argc > 2 && !pid1 ? atoi(argv[2]) : xcr0_module ? 1 : 2;
    setvbuf(stdout, nullptr, _IOLBF, 0);
    printf("ISA-HARNESS-BEGIN libdir=%s threads=%d\n", dir.c_str(), threads);
    {
        unsigned a, b, c, d;
        __cpuid(1, a, b, c, d);
        unsigned long long xcr0 = 0;
        if (c & (1u << 27)) {
            unsigned lo, hi;
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            xcr0 = ((unsigned long long)hi << 32) | lo;
        }
        printf("xsave=%d osxsave=%d xcr0=%#llx%s\n", (c >> 26) & 1, (c >> 27) & 1, xcr0,
               xcr0_module ? " (set by rz_xcr0.ko: the kernel had disabled XSAVE, see xcr0/rz_xcr0.c)" : "");
    }
    printf("cpuid:");
    for (const char* f : {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16"})
        printf(" %s=%d", f, cpu_has(f) ? 1 : 0);
    printf("\n");
    if (FILE* f = fopen("/proc/cpuinfo", "r")) {
        char line[8192];
        while (fgets(line, sizeof line, f)) {
            if (!strncmp(line, "model name", 10)) printf("cpuinfo %s", line);
            if (!strncmp(line, "flags", 5)) {
                printf("cpuinfo avx/xsave flags:");
                for (char* t = strtok(strchr(line, ':') + 1, " \n"); t; t = strtok(nullptr, " \n"))
                    if (!strncmp(t, "avx", 3) || !strncmp(t, "xsave", 5) || !strcmp(t, "fma")) printf(" %s", t);
                printf("\n");
                break;
            }
        }
        fclose(f);
    }
    if (pid1) {
        // The kernel enables AVX / AVX-512 state (XCR0) only when it trusts the CPU's XSAVE description:
        // its x86/fpu lines say what it enabled (run.sh boots with "quiet", so they are not on the console).
        static char klog[1 << 17];
        const int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, klog, sizeof klog - 1);
        if (n > 0) {
            klog[n] = 0;
            for (char* l = strtok(klog, "\n"); l; l = strtok(nullptr, "\n"))
                if (strstr(l, "fpu") || strstr(l, "xstate") || strstr(l, "XSAVE") || strstr(l, "xsave"))
                    printf("kernel %s\n", l);
        }
    }
    fflush(stdout);

    Lib pg = open_lib(dir, "cpu_gemv", "portable"), pd = open_lib(dir, "cpu_decode", "portable");
    if (!pg.h || !pd.h) {
        printf("FAIL portable     load        %s%s\n", pg.err.c_str(), pd.err.c_str());
        printf("ISA-HARNESS-END failures=1 ran=\n");
        fflush(stdout);
        if (pid1) power_off();
        return 1;
    }
    const Gemv port{sym<GemvFn>(pg, "rz_gemv"), threads};
    printf("mxcsr=%#x after loading the portable libraries (FTZ %d, DAZ %d)\n", _mm_getcsr(),
           (_mm_getcsr() >> 15) & 1, (_mm_getcsr() >> 6) & 1);
    std::string ran;
    std::vector<std::pair<std::string, Gemv>> ran_gemv;
    for (const Isa& isa : ISAS) {
        std::string lacks;
        for (const char* f : isa.needs)
            if (!cpu_has(f)) lacks += std::string(lacks.empty() ? "" : ",") + f;
        if (!lacks.empty()) {
            printf("SKIP %-14s %-12s this CPU lacks %s\n", isa.name, "all", lacks.c_str());
            continue;
        }
        if (isa.reports && access((dir + "/cpu_gemv-" + isa.name + ".so").c_str(), F_OK) != 0) {
            printf("SKIP %-14s %-12s not built (run.sh builds it)\n", isa.name, "all");
            continue;
        }
        Lib g = open_lib(dir, "cpu_gemv", isa.name), d = open_lib(dir, "cpu_decode", isa.name);
        if (!g.h || !d.h) {
            report(false, isa.name, "load", g.err + d.err);
            continue;
        }
        if (isa.note) printf("%s\n", isa.note);
        ran += std::string(ran.empty() ? "" : ",") + isa.name;
        const char* want = isa.reports ? isa.reports : isa.name;
        const char* n1 = sym<NameFn>(g, "rz_isa")();
        const char* n2 = sym<NameFn>(d, "rz_decode_isa")();
        report(!strcmp(n1, want) && !strcmp(n2, want), isa.name, "isa-name",
               std::string("builds report ") + n1 + " / " + n2);
        const Gemv gv{sym<GemvFn>(g, "rz_gemv"), threads};
        ran_gemv.emplace_back(isa.name, gv);
        for (int kind = 0; kind < 4; ++kind) check_gemv(isa.name, port, gv, kind);
        check_fp32_rows(isa.name, gv);
        for (bool mixed : {false, true}) {
            std::string detail;
            const bool ok = run_decode(isa.name, pd.h, d.h, threads, mixed, detail);
            report(ok, isa.name, mixed ? "decode-mixed" : "decode-fp32", detail);
        }
    }
    const Gemv* hw = nullptr;
    const Gemv* sw = nullptr;
    for (const auto& [name, gv] : ran_gemv) {
        if (name == "avx512_bf16") hw = &gv;
        if (name == "avx512_bf16_sw") sw = &gv;
    }
    if (hw && sw) check_sw_vs_hw(*hw, *sw);
    printf("ISA-HARNESS-END failures=%d ran=%s\n", failures, ran.c_str());
    fflush(stdout);
    if (pid1) power_off();
    return failures ? 1 : 0;
}
