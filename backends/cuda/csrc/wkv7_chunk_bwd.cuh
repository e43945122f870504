// Chunked wkv7 backward: every phase as plain per-thread code (block-strided loops, fp32 CUDA cores),
// shared verbatim by the CUDA kernel (wkv7_chunk.cu), the CPU emulator and the threaded host build.
// No tensor cores yet: correctness first, the products are the place to add wmma later.
//
// Per chunk, in reverse order, the forward's phases 1-4 are recomputed from the state entering the
// chunk (checkpointed by the forward) to get G, the scaled operands, P and U; then with dY the chunk's
// output gradient and dS the gradient of the state after the chunk (notation of wkv7_chunk.cuh):
//   dU = Bend dS + P_rb^T dY,  dV = Kend dS + P_rk^T dY,  dBend = U dS^T,  dKend = V dS^T
//   Z = (I - P_ab)^{-T} dU  (the solve's adjoint),  dV += P_ak^T Z
//   dP_rb = tril(dY U^T), dP_rk = tril(dY V^T), dP_ab = stril(Z U^T), dP_ak = stril(Z V^T)
//   dA0 = Z S^T,  dR0 = dY S^T,  dS <- diag(e^{G_{L-1}}) dS + A0^T Z + R0^T dY
//   dAq = dP_ab Bq + dP_ak Kq, dRq = dP_rb Bq + dP_rk Kq, dBq = dP_ab^T Aq + dP_rb^T Rq, dKq = dP_ak^T Aq + dP_rk^T Rq
// and the elementwise factors e^{...} of the scaled operands give dr, da, db, dk and the gradient of
// each cumulative decay G, whose reverse cumulative sum down the chunk is dw.
#pragma once

#include "wkv7_chunk.cuh"

namespace rwkv_zoo_cuda {

template <int N>
struct Chunk7Grad {
  float dS[N][N];                          // dL/d(state after the chunk), then before it
  float dY[C7_L][N], dU[C7_L][N], dV[C7_L][N], Z[C7_L][N];
  float dP[4][C7_L][C7_L];                 // ab, ak, rb, rk
  float dq[4][C7_L][N];                    // d aq, d bq, d rq, d kq
  float d0[4][C7_L][N];                    // d a0, d bend, d r0, d kend
  float raw[4][C7_L][N];                   // the chunk's raw r, a, b, k; then their gradients
  float dG[C7_L][N];
  float dgL[N];
};

// C[m][n] (+)= sum_k A(m, k) B(k, n) over a block: A(m, k) = A[m * sam + k * sak], B likewise; with
// tf32, the operands rounded as the tensor cores round them (the CPU model of the wmma path).
RWKV_HD void c7_gemm(int tid, int nthr, int M, int Nn, int K, const float* A, int sam, int sak, const float* B,
                     int sbk, int sbn, float* C, int ldc, bool accumulate, bool tf32 = false) {
  for (int idx = tid; idx < M * Nn; idx += nthr) {
    const int m = idx / Nn, n = idx % Nn;
    float acc = accumulate ? C[m * ldc + n] : 0.f;
    for (int k = 0; k < K; ++k) {
      const float x = A[m * sam + k * sak], y = B[k * sbk + n * sbn];
      acc += tf32 ? c7_round_tf32(x) * c7_round_tf32(y) : x * y;
    }
    C[m * ldc + n] = acc;
  }
}

// The block products (the kernel runs them, on CUDA cores or tensor cores, in the phase named):
//   B1: dU = Bend dS, dV = Kend dS, dBend = U dS^T, dKend = V dS^T     ([L, N] = [L, N] [N, N])
//   B3: dA0 = Z S^T, dR0 = dY S^T                                      ([L, N] = [L, N] [N, N])
//   B4b (after B4a): dS += A0^T Z + R0^T dY                            ([N, N] = [N, L] [L, N])

// Phase B1 (besides its products): the dY pairwise gradients and dgL.
template <int N, typename Half>
RWKV_HD void c7b_from_outputs(int tid, int nthr, Chunk7Smem<N, Half>& sm, Chunk7Grad<N>& gd) {
  constexpr int L = C7_L;
  for (int idx = tid; idx < L * L; idx += nthr) {
    const int t = idx / L, s = idx % L;
    float pu = 0.f, pv = 0.f;
    if (s <= t)
      for (int i = 0; i < N; ++i) {
        pu += gd.dY[t][i] * sm.U[s][i];
        pv += gd.dY[t][i] * sm.v[s][i];
      }
    gd.dP[2][t][s] = pu;
    gd.dP[3][t][s] = pv;
  }
  for (int j = tid; j < N; j += nthr) {
    float acc = 0.f;
    for (int i = 0; i < N; ++i) acc += gd.dS[j][i] * sm.S[j][i];
    gd.dgL[j] = acc * sm.gL[j];
  }
}

// Phase B2 (threads i < N, one value column each): Y's share of dU, dV, then the solve's adjoint Z.
template <int N, typename Half>
RWKV_HD void c7b_solve(int tid, Chunk7Smem<N, Half>& sm, Chunk7Grad<N>& gd) {
  constexpr int L = C7_L;
  if (tid >= N) return;
  const int i = tid;
  for (int s = 0; s < L; ++s) {
    float du = gd.dU[s][i], dv = gd.dV[s][i];
    for (int t = s; t < L; ++t) {
      du += sm.P[2][t][s] * gd.dY[t][i];
      dv += sm.P[3][t][s] * gd.dY[t][i];
    }
    gd.dU[s][i] = du;
    gd.dV[s][i] = dv;
  }
  for (int t = L - 1; t >= 0; --t) {
    float z = gd.dU[t][i];
    for (int s = t + 1; s < L; ++s) z += sm.P[0][s][t] * gd.Z[s][i];
    gd.Z[t][i] = z;
  }
  for (int s = 0; s < L; ++s) {
    float dv = gd.dV[s][i];
    for (int t = s + 1; t < L; ++t) dv += sm.P[1][t][s] * gd.Z[t][i];
    gd.dV[s][i] = dv;
  }
}

// Phase B3 (besides its products): the solve's pairwise gradients.
template <int N, typename Half>
RWKV_HD void c7b_pairs(int tid, int nthr, Chunk7Smem<N, Half>& sm, Chunk7Grad<N>& gd) {
  constexpr int L = C7_L;
  for (int idx = tid; idx < L * L; idx += nthr) {
    const int t = idx / L, s = idx % L;
    float pu = 0.f, pv = 0.f;
    if (s < t)
      for (int i = 0; i < N; ++i) {
        pu += gd.Z[t][i] * sm.U[s][i];
        pv += gd.Z[t][i] * sm.v[s][i];
      }
    gd.dP[0][t][s] = pu;
    gd.dP[1][t][s] = pv;
  }
}

// Phase B4a: the state gradient's decay over the chunk (B4b adds the products), and the gradients of
// the fp16 operands.
template <int N, typename Half>
RWKV_HD void c7b_state_and_operands(int tid, int nthr, Chunk7Smem<N, Half>& sm, Chunk7Grad<N>& gd) {
  constexpr int L = C7_L;
  for (int idx = tid; idx < N * N; idx += nthr) gd.dS[idx / N][idx % N] *= sm.gL[idx / N];
  for (int idx = tid; idx < L * N; idx += nthr) {
    const int t = idx / N, j = idx % N;
    float daq = 0.f, drq = 0.f, dbq = 0.f, dkq = 0.f;
    for (int s = 0; s < L; ++s) {
      daq += gd.dP[0][t][s] * (float)sm.bq[s][j] + gd.dP[1][t][s] * (float)sm.kq[s][j];
      drq += gd.dP[2][t][s] * (float)sm.bq[s][j] + gd.dP[3][t][s] * (float)sm.kq[s][j];
      dbq += gd.dP[0][s][t] * (float)sm.aq[s][j] + gd.dP[2][s][t] * (float)sm.rq[s][j];
      dkq += gd.dP[1][s][t] * (float)sm.aq[s][j] + gd.dP[3][s][t] * (float)sm.rq[s][j];
    }
    gd.dq[0][t][j] = daq;
    gd.dq[1][t][j] = dbq;
    gd.dq[2][t][j] = drq;
    gd.dq[3][t][j] = dkq;
  }
}

// Phase B5 (all threads, strided): input gradients of r, a, b, k (into d0: r, a, b, k order below)
// and each step's own share of dG. raw[] are the chunk's raw r, a, b, k values.
template <int N, typename Half>
RWKV_HD void c7b_elementwise(int tid, int nthr, Chunk7Smem<N, Half>& sm, Chunk7Grad<N>& gd, const float* raw_r,
                             const float* raw_a, const float* raw_b, const float* raw_k, float* dr, float* da,
                             float* db, float* dk, float* dGp, float* dGm, float* dGL) {
  constexpr int L = C7_L;
  for (int idx = tid; idx < L * N; idx += nthr) {
    const int t = idx / N, j = idx % N;
    const float G = sm.g[t][j], Gp = t ? sm.g[t - 1][j] : 0.f, Gm = sm.g[C7_MID][j], GL = sm.g[L - 1][j];
    const float r = raw_r[idx], a = raw_a[idx], b = raw_b[idx], k = raw_k[idx];
    const float frq = expf(G - Gm), fr0 = expf(G), faq = expf(Gp - Gm), fa0 = expf(Gp), fbq = expf(Gm - G),
                fbe = expf(GL - G);
    const float drq = gd.dq[2][t][j], dr0 = gd.d0[2][t][j], daq = gd.dq[0][t][j], da0 = gd.d0[0][t][j];
    const float dbq = gd.dq[1][t][j], dbe = gd.d0[1][t][j], dkq = gd.dq[3][t][j], dke = gd.d0[3][t][j];
    dr[idx] = drq * frq + dr0 * fr0;
    da[idx] = daq * faq + da0 * fa0;
    db[idx] = dbq * fbq + dbe * fbe;
    dk[idx] = dkq * fbq + dke * fbe;
    const float tr_q = drq * r * frq, tr_0 = dr0 * r * fr0, ta_q = daq * a * faq, ta_0 = da0 * a * fa0;
    const float tb_q = dbq * b * fbq, tb_e = dbe * b * fbe, tk_q = dkq * k * fbq, tk_e = dke * k * fbe;
    gd.dG[t][j] = tr_q + tr_0 - tb_q - tb_e - tk_q - tk_e;
    dGp[idx] = ta_q + ta_0;
    dGm[idx] = -tr_q - ta_q + tb_q + tk_q;
    dGL[idx] = tb_e + tk_e;
  }
}

// Phase B6 (threads j < N): dw down each key column, the reverse cumulative sum of dG.
template <int N, typename Half>
RWKV_HD void c7b_decay(int tid, Chunk7Grad<N>& gd, const float* dGp, const float* dGm, const float* dGL, float* dw) {
  constexpr int L = C7_L;
  if (tid >= N) return;
  const int j = tid;
  float sm_ = 0.f, sl = gd.dgL[j];
  for (int t = 0; t < L; ++t) {
    sm_ += dGm[t * N + j];
    sl += dGL[t * N + j];
  }
  float acc = 0.f;
  for (int t = L - 1; t >= 0; --t) {
    float g = gd.dG[t][j];
    if (t + 1 < L) g += dGp[(t + 1) * N + j];
    if (t == C7_MID) g += sm_;
    if (t == L - 1) g += sl;
    acc += g;
    dw[t * N + j] = acc;
  }
}

}  // namespace rwkv_zoo_cuda
