// CPU emulator of the CUDA WKV kernels, for checking their numerics on a machine without a GPU.
//
// Every kernel here has the structure of its CUDA counterpart (wkv4.cu, wkv6.cu, wkv7.cu): one
// "block" per (batch, head), the step's vectors staged into arrays that stand in for shared memory,
// then each "thread" of the block runs, one after another, between the same barrier points; the
// per-thread arithmetic is the same functions from wkv_math.cuh. What this does not check: the CUDA
// glue itself (indexing of the loads and stores, dtype conversions, races), which only a GPU run can.
//
// Plain C++ with extern "C" entry points (fp32, contiguous arrays) so a test can build it with g++ in
// a second and call it through ctypes; no torch headers.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "wkv7_chunk.cuh"
#include "wkv_math.cuh"

using namespace rwkv_zoo_cuda;

namespace {

template <int N>
void wkv6_fwd(int B, int T, int H, const float* r, const float* k, const float* v, const float* w, long wsb,
              long wst, const float* u, const float* s0, float* y, float* sT) {
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      std::vector<float> S(N * N);  // thread i's registers: S[i * N + j] = S[j][i]
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) S[i * N + j] = s0[((long)(b * H + h) * N + j) * N + i];
      float sr[N], sk[N], sew[N], su[N], sv[N];
      for (int j = 0; j < N; ++j) su[j] = u[h * N + j];
      for (int t = 0; t < T; ++t) {
        const long o = ((long)(b * T + t) * H + h) * N;
        for (int j = 0; j < N; ++j) {  // load phase
          sr[j] = r[o + j];
          sk[j] = k[o + j];
          sv[j] = v[o + j];
          sew[j] = expf(w[b * wsb + t * wst + h * N + j]);
        }
        for (int i = 0; i < N; ++i) y[o + i] = wkv6_fwd_step<N>(&S[i * N], sr, sk, sew, su, sv[i]);
      }
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) sT[((long)(b * H + h) * N + j) * N + i] = S[i * N + j];
    }
}

template <int N>
void wkv6_bwd(int B, int T, int H, const float* r, const float* k, const float* v, const float* w, long wsb,
              long wst, const float* u, const float* s0, const float* dy, const float* dsT, float* dr, float* dk,
              float* dv, float* dw, float* du, float* ds0) {
  constexpr int CK = WKV6_CK;
  const int nck = (T + CK - 1) / CK;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const long so = (long)(b * H + h) * N * N;
      std::vector<float> S(N * N), DK(N * N), DV(N * N), ck((long)nck * N * N);
      float su[N], sv[N], sdy[N], dua[N], p[N];
      float cr[CK][N], ckk[CK][N], cv[CK][N], cdy[CK][N], cew[CK][N];
      for (int j = 0; j < N; ++j) {
        su[j] = u[h * N + j];
        dua[j] = 0.f;
      }
      // Pass 1, forward in time: thread j owns key row j of S; checkpoints at chunk starts.
      for (int j = 0; j < N; ++j)
        for (int i = 0; i < N; ++i) S[j * N + i] = s0[so + j * N + i];
      for (int t = 0; t < T; ++t) {
        const long o = ((long)(b * T + t) * H + h) * N;
        if (t % CK == 0)
          for (int x = 0; x < N * N; ++x) ck[(long)(t / CK) * N * N + x] = S[x];
        for (int j = 0; j < N; ++j) {
          sv[j] = v[o + j];
          sdy[j] = dy[o + j];
        }
        for (int j = 0; j < N; ++j)
          wkv6_bwd_fwd_step<N>(&S[j * N], r[o + j], k[o + j], expf(w[b * wsb + t * wst + h * N + j]), su[j], sv,
                               sdy, dr[o + j], dua[j]);
      }
      for (int j = 0; j < N; ++j) du[(b * H + h) * N + j] = dua[j];
      // Pass 2, backward in time, a staged chunk at a time: thread x owns key row x (DK) and value
      // column x (DV) of dS, and rebuilds S_{t-1}[x, :] from the chunk's checkpoint.
      for (int x = 0; x < N; ++x)
        for (int y2 = 0; y2 < N; ++y2) {
          DK[x * N + y2] = dsT[so + x * N + y2];
          DV[x * N + y2] = dsT[so + y2 * N + x];
        }
      for (int c = nck - 1; c >= 0; --c) {
        const int c0 = c * CK, len = std::min(CK, T - c0);
        for (int q = 0; q < len; ++q) {
          const long o = ((long)(b * T + c0 + q) * H + h) * N;
          for (int j = 0; j < N; ++j) {
            cr[q][j] = r[o + j];
            ckk[q][j] = k[o + j];
            cv[q][j] = v[o + j];
            cdy[q][j] = dy[o + j];
            cew[q][j] = expf(w[b * wsb + (c0 + q) * wst + h * N + j]);
          }
        }
        for (int q = len - 1; q >= 0; --q) {
          const long o = ((long)(b * T + c0 + q) * H + h) * N;
          for (int x = 0; x < N; ++x) {
            const float* row = &ck[((long)c * N + x) * N];
            for (int i = 0; i < N; ++i) p[i] = row[i];
            for (int e = 0; e < q; ++e) wkv6_advance_row<N>(p, cew[e][x], ckk[e][x], cv[e]);
            wkv6_bwd_back_step<N>(&DK[x * N], &DV[x * N], p, x, cr[q], ckk[q], cew[q], su, cv[q], cdy[q], dk[o + x],
                                  dv[o + x], dw[o + x]);
          }
        }
      }
      for (int j = 0; j < N; ++j)
        for (int i = 0; i < N; ++i) ds0[so + j * N + i] = DK[j * N + i];
    }
}

template <int N>
void wkv7_fwd(int B, int T, int H, const float* r, const float* w, const float* k, const float* v, const float* a,
              const float* bb, const float* s0, float* y, float* sT, float* sa, float* ck, int save) {
  const int nck = (T + WKV7_CK - 1) / WKV7_CK;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const long so = (long)(b * H + h) * N * N;
      std::vector<float> S(N * N);
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) S[i * N + j] = s0[so + j * N + i];
      float sr[N], sew[N], sk[N], sa_[N], sb[N], sv[N];
      for (int t = 0; t < T; ++t) {
        const long o = ((long)(b * T + t) * H + h) * N;
        if (save && t % WKV7_CK == 0) {
          float* c = ck + ((long)(b * H + h) * nck + t / WKV7_CK) * N * N;
          for (int i = 0; i < N; ++i)
            for (int j = 0; j < N; ++j) c[j * N + i] = S[i * N + j];
        }
        for (int j = 0; j < N; ++j) {
          sr[j] = r[o + j];
          sew[j] = expf(w[o + j]);
          sk[j] = k[o + j];
          sa_[j] = a[o + j];
          sb[j] = bb[o + j];
          sv[j] = v[o + j];
        }
        for (int i = 0; i < N; ++i) {
          float sai;
          y[o + i] = wkv7_fwd_step<N>(&S[i * N], sr, sew, sk, sa_, sb, sv[i], sai);
          if (save) sa[o + i] = sai;
        }
      }
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) sT[so + j * N + i] = S[i * N + j];
    }
}

template <int N>
void wkv7_bwd(int B, int T, int H, const float* r, const float* w, const float* k, const float* v, const float* a,
              const float* bb, const float* sa, const float* ck, const float* sT, const float* dy, const float* dsT,
              float* dr, float* dw, float* dk, float* dv, float* da, float* db, float* ds0) {
  const int nck = (T + WKV7_CK - 1) / WKV7_CK;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const long so = (long)(b * H + h) * N * N;
      std::vector<float> SK(N * N), DK(N * N), DV(N * N);
      for (int x = 0; x < N; ++x)
        for (int y2 = 0; y2 < N; ++y2) {
          SK[x * N + y2] = sT[so + x * N + y2];
          DK[x * N + y2] = dsT[so + x * N + y2];
          DV[x * N + y2] = dsT[so + y2 * N + x];
        }
      float sr[N], sew[N], siew[N], sk[N], sa_[N], sb[N], sv[N], sdy[N], ssa[N], sdsa[N];
      for (int t = T - 1; t >= 0; --t) {
        const long o = ((long)(b * T + t) * H + h) * N;
        for (int j = 0; j < N; ++j) {
          sr[j] = r[o + j];
          sew[j] = expf(w[o + j]);
          siew[j] = expf(-w[o + j]);
          sk[j] = k[o + j];
          sa_[j] = a[o + j];
          sb[j] = bb[o + j];
          sv[j] = v[o + j];
          sdy[j] = dy[o + j];
          ssa[j] = sa[o + j];
        }
        for (int x = 0; x < N; ++x)
          wkv7_bwd_step1<N>(&SK[x * N], &DK[x * N], &DV[x * N], x, sr, sk, sb, sdy, dr[o + x], dv[o + x], sdsa[x]);
        const bool have = t % WKV7_CK == 0;
        const float* c = ck + ((long)(b * H + h) * nck + t / WKV7_CK) * N * N;
        for (int x = 0; x < N; ++x)
          wkv7_bwd_step2<N>(&SK[x * N], c + x * N, have, &DK[x * N], &DV[x * N], x, sew, siew, sk, sv, sa_, sb, ssa,
                            sdsa, dk[o + x], dw[o + x], da[o + x], db[o + x]);
      }
      for (int x = 0; x < N * N; ++x) ds0[so + x] = DK[x];
    }
}

// The chunked wkv7 forward: phases 1, 2, 4, 5 are wkv7_chunk.cuh's; phases 3 and 6 (tensor cores on
// the GPU) are loops here over the same operands, fp16 ones as stored, fp32 ones rounded to tf32 as
// the tensor cores round them. Summation order inside a tile product differs from the hardware's.
template <int N>
void wkv7_chunk_fwd(int B, int T, int H, const float* r, const float* w, const float* k, const float* v,
                    const float* a, const float* bb, const float* s0, float* y, float* sT, float* ck) {
  using Sm = Chunk7Smem<N, _Float16>;
  auto sm_ptr = std::make_unique<Sm>();
  Sm& sm = *sm_ptr;
  const int L = C7_L;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const long so = (long)(b * H + h) * N * N;
      for (int x = 0; x < N * N; ++x) sm.S[x / N][x % N] = s0[so + x];
      for (int c0 = 0; c0 < T; c0 += L) {
        const int len = std::min(L, T - c0);
        if (ck != nullptr)
          for (int x = 0; x < N * N; ++x) ck[((long)(b * H + h) * ((T + L - 1) / L) + c0 / L) * N * N + x] = sm.S[x / N][x % N];
        for (int t = 0; t < L; ++t)
          for (int j = 0; j < N; ++j) {
            const bool in = t < len;
            const long o = ((long)(b * T + c0 + t) * H + h) * N + j;
            sm.r0[t][j] = in ? r[o] : 0.f;
            sm.a0[t][j] = in ? a[o] : 0.f;
            sm.bend[t][j] = in ? bb[o] : 0.f;
            sm.kend[t][j] = in ? k[o] : 0.f;
            sm.v[t][j] = in ? v[o] : 0.f;
            sm.g[t][j] = in ? w[o] : 0.f;
          }
        for (int tid = 0; tid < C7_THREADS; ++tid) c7_cumsum<N, _Float16>(tid, sm);
        for (int tid = 0; tid < C7_THREADS; ++tid) c7_scale<N, _Float16>(tid, C7_THREADS, sm);
        // phase 3
        const _Float16* As[4] = {&sm.aq[0][0], &sm.aq[0][0], &sm.rq[0][0], &sm.rq[0][0]};
        const _Float16* Bs[4] = {&sm.bq[0][0], &sm.kq[0][0], &sm.bq[0][0], &sm.kq[0][0]};
        for (int p = 0; p < 4; ++p)
          for (int t = 0; t < L; ++t)
            for (int s2 = 0; s2 < L; ++s2) {
              float acc = 0.f;
              for (int j = 0; j < N; ++j) acc += (float)As[p][t * N + j] * (float)Bs[p][s2 * N + j];
              sm.P[p][t][s2] = acc;
            }
        for (int t = 0; t < L; ++t)
          for (int i = 0; i < N; ++i) {
            float x = 0.f, yq = 0.f;
            for (int j = 0; j < N; ++j) {
              const float sji = c7_round_tf32(sm.S[j][i]);
              x += c7_round_tf32(sm.a0[t][j]) * sji;
              yq += c7_round_tf32(sm.r0[t][j]) * sji;
            }
            sm.X[t][i] = x;
            sm.Yq[t][i] = yq;
          }
        for (int tid = 0; tid < C7_THREADS; ++tid) c7_solve<N, _Float16>(tid, sm);
        for (int tid = 0; tid < C7_THREADS; ++tid) c7_output<N, _Float16>(tid, C7_THREADS, sm);
        for (int t = 0; t < len; ++t)
          for (int i = 0; i < N; ++i) y[((long)(b * T + c0 + t) * H + h) * N + i] = sm.Yq[t][i];
        // phase 6
        for (int j = 0; j < N; ++j)
          for (int i = 0; i < N; ++i) {
            float acc = sm.S[j][i];
            for (int s2 = 0; s2 < L; ++s2)
              acc += c7_round_tf32(sm.bend[s2][j]) * c7_round_tf32(sm.U[s2][i]) +
                     c7_round_tf32(sm.kend[s2][j]) * c7_round_tf32(sm.v[s2][i]);
            sm.S[j][i] = acc;
          }
      }
      for (int x = 0; x < N * N; ++x) sT[so + x] = sm.S[x / N][x % N];
    }
}

}  // namespace

#define RWKV_EMU_SWITCH(N, CALL)                                \
  switch (N) {                                                  \
    case 16: { constexpr int NN = 16; CALL; } return 0;         \
    case 32: { constexpr int NN = 32; CALL; } return 0;         \
    case 64: { constexpr int NN = 64; CALL; } return 0;         \
    default: return 1;                                          \
  }

extern "C" {

int emu_wkv6_fwd(int B, int T, int H, int N, const float* r, const float* k, const float* v, const float* w,
                 long wsb, long wst, const float* u, const float* s0, float* y, float* sT) {
  RWKV_EMU_SWITCH(N, (wkv6_fwd<NN>(B, T, H, r, k, v, w, wsb, wst, u, s0, y, sT)))
}

int emu_wkv6_bwd(int B, int T, int H, int N, const float* r, const float* k, const float* v, const float* w,
                 long wsb, long wst, const float* u, const float* s0, const float* dy, const float* dsT, float* dr,
                 float* dk, float* dv, float* dw, float* du, float* ds0) {
  RWKV_EMU_SWITCH(N, (wkv6_bwd<NN>(B, T, H, r, k, v, w, wsb, wst, u, s0, dy, dsT, dr, dk, dv, dw, du, ds0)))
}

int emu_wkv7_fwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                 const float* a, const float* b, const float* s0, float* y, float* sT, float* sa, float* ck,
                 int save) {
  RWKV_EMU_SWITCH(N, (wkv7_fwd<NN>(B, T, H, r, w, k, v, a, b, s0, y, sT, sa, ck, save)))
}

int emu_wkv7_chunk_fwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                       const float* a, const float* b, const float* s0, float* y, float* sT, float* ck) {
  RWKV_EMU_SWITCH(N, (wkv7_chunk_fwd<NN>(B, T, H, r, w, k, v, a, b, s0, y, sT, ck)))
}

int emu_wkv7_bwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                 const float* a, const float* b, const float* sa, const float* ck, const float* sT, const float* dy,
                 const float* dsT, float* dr, float* dw, float* dk, float* dv, float* da, float* db, float* ds0) {
  RWKV_EMU_SWITCH(N, (wkv7_bwd<NN>(B, T, H, r, w, k, v, a, b, sa, ck, sT, dy, dsT, dr, dw, dk, dv, da, db, ds0)))
}

// wkv4: one "thread" per (batch, channel); the forward saves the state entering every step for the
// backward when `save` (the CUDA kernel does the same).
int emu_wkv4_fwd(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                 const float* a0, const float* b0, const float* p0, float* y, float* aT, float* bT, float* pT,
                 float* sa, float* sb, float* sp, int save) {
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < C; ++c) {
      float A = a0[b * C + c], Bs = b0[b * C + c], P = p0[b * C + c];
      for (int t = 0; t < T; ++t) {
        const long o = (long)(b * T + t) * C + c;
        if (save) {
          sa[o] = A;
          sb[o] = Bs;
          sp[o] = P;
        }
        y[o] = wkv4_fwd_step(A, Bs, P, w[c], u[c], k[o], v[o]);
      }
      aT[b * C + c] = A;
      bT[b * C + c] = Bs;
      pT[b * C + c] = P;
    }
  return 0;
}

int emu_wkv4_bwd(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                 const float* sa, const float* sb, const float* sp, const float* dy, const float* daT,
                 const float* dbT, const float* dpT, float* dk, float* dv, float* dw, float* du, float* da0,
                 float* db0, float* dp0) {
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < C; ++c) {
      float ga = daT[b * C + c], gb = dbT[b * C + c], gp = dpT[b * C + c], gw = 0.f, gu = 0.f;
      for (int t = T - 1; t >= 0; --t) {
        const long o = (long)(b * T + t) * C + c;
        wkv4_bwd_step(sa[o], sb[o], sp[o], w[c], u[c], k[o], v[o], dy[o], ga, gb, gp, gw, gu, dk[o], dv[o]);
      }
      da0[b * C + c] = ga;
      db0[b * C + c] = gb;
      dp0[b * C + c] = gp;
      dw[b * C + c] = gw;
      du[b * C + c] = gu;
    }
  return 0;
}

}  // extern "C"
