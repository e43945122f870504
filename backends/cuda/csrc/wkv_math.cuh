// Per-thread arithmetic of the rwkv_zoo CUDA WKV kernels, shared by the CUDA kernels (wkv*.cu) and the
// CPU emulator (emulate.cpp), so the numbers the emulator checks against the reference are produced by
// exactly this code. Plain C++: no torch and no CUDA headers; with nvcc the functions are
// __host__ __device__, with g++ they are ordinary inline functions.
//
// Conventions (rwkv_zoo.ops): log-space decay w (the step decay is exp(w)), matrix state S [K, V] with
// the key index first, fp32 state. A block serves one (batch, head) with N threads. "Value column i"
// means S[:, i] (thread i in the forward kernels); "key row j" means S[j, :].
//
// Each function is one thread's work between two barriers: the callers load the step's vectors into
// shared memory (the emulator: into arrays), synchronize, call the function for every thread, and
// synchronize again before the vectors are overwritten.
#pragma once

#if defined(__CUDACC__)
#define RWKV_HD __host__ __device__ __forceinline__
#define RWKV_UNROLL _Pragma("unroll")
#else
#define RWKV_HD inline
#define RWKV_UNROLL
#endif

#include <math.h>

namespace rwkv_zoo_cuda {

// State checkpoint interval of the backward kernels. wkv7 rebuilds at most CK-1 states by inverting the
// update between two stored ones, so rounding grows over at most CK-1 divisions by the decay; wkv5/6
// rebuild them forward from the checkpoint (exact), at most CK-1 row updates per step.
constexpr int WKV7_CK = 16;
constexpr int WKV6_CK = 16;

// ------------------------------------------------------------------------------------------------
// wkv5 / wkv6: y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

// Forward step, thread i owns value column i (s[j] = S[j][i]). ew = exp(w_t). Returns y_t[i].
template <int N>
RWKV_HD float wkv6_fwd_step(float* s, const float* r, const float* k, const float* ew, const float* u, float v_i) {
  float y = 0.f;
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) {
    const float kv = k[j] * v_i;
    y += r[j] * (u[j] * kv + s[j]);  // read before the update, bonus u on the current token
    s[j] = ew[j] * s[j] + kv;
  }
  return y;
}

// Backward, pass 1 (forward in time), thread j owns key row j of S (s[i] = S[j][i]), starting from s0.
// Gives dr_t[j] and adds to du_j.
template <int N>
RWKV_HD void wkv6_bwd_fwd_step(float* s, float r_j, float k_j, float ew_j, float u_j, const float* v,
                               const float* dy, float& dr_j, float& du_j) {
  float sdy = 0.f, vdy = 0.f;
  RWKV_UNROLL
  for (int i = 0; i < N; ++i) {
    sdy += s[i] * dy[i];
    vdy += v[i] * dy[i];
    s[i] = ew_j * s[i] + k_j * v[i];
  }
  dr_j = sdy + u_j * k_j * vdy;
  du_j += r_j * k_j * vdy;
}

// One forward step of key row j alone: rebuilds S_{t-1}[j, :] in pass 2 from the checkpoint that pass 1
// stored at the start of the chunk (exact under any decay strength: no division by the decay).
template <int N>
RWKV_HD void wkv6_advance_row(float* p, float ew_j, float k_j, const float* v) {
  RWKV_UNROLL
  for (int i = 0; i < N; ++i) p[i] = ew_j * p[i] + k_j * v[i];
}

// Backward, pass 2 (backward in time). The thread owns key row j = tid of dS (dsk[i] = dS[j][i]) and
// value column i = tid (dsv[j'] = dS[j'][i]); on entry both hold dL/dS_t, on return dL/dS_{t-1}.
// prev = S_{t-1}[j, :]. Gives dk_t[j], dv_t[i] and dw_t[j] = exp(w_t[j]) (dS_t[j, :] . S_{t-1}[j, :]).
template <int N>
RWKV_HD void wkv6_bwd_back_step(float* dsk, float* dsv, const float* prev, int tid, const float* r, const float* k,
                                const float* ew, const float* u, const float* v, const float* dy, float& dk_j,
                                float& dv_i, float& dw_j) {
  const int j = tid, i = tid;
  float dkk = 0.f, vdy = 0.f, dvv = 0.f, ruk = 0.f, dw = 0.f;
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) {
    dkk += dsk[x] * v[x];
    dw += dsk[x] * prev[x];
    vdy += v[x] * dy[x];
    dvv += dsv[x] * k[x];
    ruk += r[x] * u[x] * k[x];
  }
  dk_j = dkk + r[j] * u[j] * vdy;
  dv_i = dvv + ruk * dy[i];
  dw_j = ew[j] * dw;
  // dS_{t-1} = diag(exp(w_t)) dS_t + r_t dy_t^T  (y_t reads S_{t-1})
  const float ewj = ew[j], rj = r[j], dyi = dy[i];
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) {
    dsk[x] = ewj * dsk[x] + rj * dy[x];
    dsv[x] = ew[x] * dsv[x] + r[x] * dyi;
  }
}

// ------------------------------------------------------------------------------------------------
// wkv7: sa = a_t^T S_{t-1},  S_t = diag(exp(w_t)) S_{t-1} + b_t sa^T + k_t v_t^T,  y_t = S_t^T r_t

// Forward step, thread i owns value column i. Returns y_t[i]; sa_i (needed by the backward) via sa_i.
template <int N>
RWKV_HD float wkv7_fwd_step(float* s, const float* r, const float* ew, const float* k, const float* a,
                            const float* b, float v_i, float& sa_i) {
  float sa = 0.f;
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) sa += a[j] * s[j];
  float y = 0.f;
  RWKV_UNROLL
  for (int j = 0; j < N; ++j) {
    s[j] = ew[j] * s[j] + b[j] * sa + k[j] * v_i;
    y += r[j] * s[j];
  }
  sa_i = sa;
  return y;
}

// Backward step, phase 1 (backward in time). The thread owns key row j = tid of S_t (sk), of dS (dsk)
// and value column i = tid of dS (dsv). On entry dS = dL/dS_t from later steps; this adds y_t's
// readout (r_t dy_t^T), then gives dr_t[j], dv_t[i] and dsa_i = (dS_t[:, i] . b_t) for phase 2.
template <int N>
RWKV_HD void wkv7_bwd_step1(const float* sk, float* dsk, float* dsv, int tid, const float* r, const float* k,
                            const float* b, const float* dy, float& dr_j, float& dv_i, float& dsa_i) {
  const int j = tid, i = tid;
  const float rj = r[j], dyi = dy[i];
  float dr = 0.f, dv = 0.f, dsa = 0.f;
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) {
    dsk[x] += rj * dy[x];
    dsv[x] += r[x] * dyi;
    dr += sk[x] * dy[x];
    dv += dsv[x] * k[x];
    dsa += dsv[x] * b[x];
  }
  dr_j = dr;
  dv_i = dv;
  dsa_i = dsa;
}

// Phase 2, after every thread's dsa_i is in shared memory. `prev` is S_{t-1}[j, :]; when
// `have_prev` is false it is rebuilt in place from S_t by inverting the update,
// S_{t-1}[j, :] = (S_t[j, :] - k_j v_t - b_j sa) * exp(-w_j), else copied from a checkpoint. sk ends
// holding S_{t-1}, dsk / dsv hold dL/dS_{t-1} = diag(exp(w_t)) dS_t + a_t dsa^T.
template <int N>
RWKV_HD void wkv7_bwd_step2(float* sk, const float* prev, bool have_prev, float* dsk, float* dsv, int tid,
                            const float* ew, const float* inv_ew, const float* k, const float* v, const float* a,
                            const float* b, const float* sa, const float* dsa, float& dk_j, float& dw_j,
                            float& da_j, float& db_j) {
  const int j = tid, i = tid;
  const float ewj = ew[j], iewj = inv_ew[j], kj = k[j], bj = b[j], aj = a[j], dsai = dsa[i];
  float dk = 0.f, dw = 0.f, da = 0.f, db = 0.f;
  RWKV_UNROLL
  for (int x = 0; x < N; ++x) {
    const float p = have_prev ? prev[x] : (sk[x] - kj * v[x] - bj * sa[x]) * iewj;
    const float g = dsk[x];
    dk += g * v[x];
    db += g * sa[x];
    dw += g * p;
    da += p * dsa[x];
    sk[x] = p;
    dsk[x] = ewj * g + aj * dsa[x];
    dsv[x] = ew[x] * dsv[x] + a[x] * dsai;
  }
  dk_j = dk;
  db_j = db;
  dw_j = ewj * dw;  // d exp(w)/dw = exp(w)
  da_j = da;
}

// ------------------------------------------------------------------------------------------------
// wkv4: one thread per (batch, channel), the stable running-maximum recurrence of rwkv_zoo.ops.wkv4.
// State (a, b, p): numerator and denominator scaled by exp(-p), p the running maximum exponent.

RWKV_HD float wkv4_fwd_step(float& a, float& b, float& p, float w, float u, float k, float v) {
  float q = fmaxf(p, u + k);
  float e1 = expf(p - q), e2 = expf(u + k - q);
  const float y = (e1 * a + e2 * v) / (e1 * b + e2);
  q = fmaxf(p + w, k);
  e1 = expf(p + w - q);
  e2 = expf(k - q);
  a = e1 * a + e2 * v;
  b = e1 * b + e2;
  p = q;
  return y;
}

// Backward of one step. (a, b, p) is the state entering the step (saved by the forward); (ga, gb, gp)
// is dL/d(state after the step) on entry and dL/d(state entering it) on return. Adds to dw, du; gives
// dk, dv. This is the chain rule through every operation of wkv4_fwd_step, the maxima included (the
// gradient of max goes to the larger argument, half to each on a tie, as torch.maximum does).
RWKV_HD void wkv4_bwd_step(float a, float b, float p, float w, float u, float k, float v, float gy, float& ga,
                           float& gb, float& gp, float& dw, float& du, float& dk, float& dv) {
  float gk = 0.f, gv = 0.f, gpa = 0.f, gaa, gbb;
  // Update: a' = f1 a + f2 v, b' = f1 b + f2, p' = q2 = max(p + w, k), f1 = exp(p + w - q2), f2 = exp(k - q2).
  {
    const float q2 = fmaxf(p + w, k);
    const float f1 = expf(p + w - q2), f2 = expf(k - q2);
    const float df1 = ga * a + gb * b, df2 = ga * v + gb;
    gaa = ga * f1;
    gbb = gb * f1;
    gv += ga * f2;
    const float t1 = df1 * f1, t2 = df2 * f2;
    float gq = gp - t1 - t2;
    float gpw = t1;
    gk += t2;
    if (p + w > k) {
      gpw += gq;
    } else if (p + w < k) {
      gk += gq;
    } else {
      gpw += 0.5f * gq;
      gk += 0.5f * gq;
    }
    gpa += gpw;
    dw += gpw;
  }
  // Output: y = (e1 a + e2 v) / (e1 b + e2), q = max(p, u + k), e1 = exp(p - q), e2 = exp(u + k - q).
  {
    const float q = fmaxf(p, u + k);
    const float e1 = expf(p - q), e2 = expf(u + k - q);
    const float num = e1 * a + e2 * v, den = e1 * b + e2;
    const float y = num / den;
    const float gn = gy / den, gd = -gy * y / den;
    const float de1 = gn * a + gd * b, de2 = gn * v + gd;
    gaa += gn * e1;
    gbb += gd * e1;
    gv += gn * e2;
    const float t1 = de1 * e1, t2 = de2 * e2;
    const float gq = -t1 - t2;
    float guk = t2;
    gpa += t1;
    if (p > u + k) {
      gpa += gq;
    } else if (p < u + k) {
      guk += gq;
    } else {
      gpa += 0.5f * gq;
      guk += 0.5f * gq;
    }
    gk += guk;
    du += guk;
  }
  ga = gaa;
  gb = gbb;
  gp = gpa;
  dk = gk;
  dv = gv;
}

}  // namespace rwkv_zoo_cuda
