"""Triton kernels of the ``triton`` backend (recurrent mode). Imported only when a kernel runs.

This module imports ``triton`` at the top; ``rwkv_zoo.backends.triton`` imports it lazily, so the
backend registers (and explains itself) where Triton is missing. ``@triton.jit`` decides between the
compiler and the interpreter when this module is first imported, so ``TRITON_INTERPRET=1`` must be
set before the first kernel runs (the backend's availability check reads it at every call).

Layouts (all contiguous): ``r, k, v, w, a, b, y`` [B, T, H, N]; states [B, H, K, V] fp32; wkv4 ``k, v, y``
[B, T, C] and its state ``a, b, p`` [B, C] fp32. Every kernel computes in fp32 and loads/stores the
input dtype; offsets are int64 (state buffers can exceed 2^31 elements at training shapes).

Recurrent kernels, one program per (batch, head) holding the [K, V] state in registers (wkv4: per
(batch, block of channels)), looping over t. Backward of wkv5-7: the forward stores only the state
entering every ``CK``-th step (checkpoints, ``[B, H, ceil(T / CK), K, V]`` fp32) when a gradient is
needed; the backward walks blocks of ``CK`` steps from the end, recomputes the states entering the
block's steps from its checkpoint into a per-program scratch (``[B, H, CK, K, V]`` fp32, rewritten by
every block), then runs the per-step reverse pass over them, carrying the state gradient. Memory is
(T / CK + CK) states per head instead of T, so gradients have no length limit; the price is one more
forward pass of the state update. No inversion of the decay (which would divide by exp(w) and blow up
under strong decay): recomputation only runs forwards. wkv4's state is three [C] vectors, so its
forward stores all of them per step (``[B, T, C]``, the size of its inputs) and nothing is recomputed.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # the combine function of tl.sum: Triton's interpreter reduces with numpy when it sees this one
    from triton.language.standard import _sum_combine as _add
except ImportError:  # a Triton without it: the same reduction, element by element in the interpreter

    @triton.jit
    def _add(a, b):
        return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum (like tl.zeros) is itself a @triton.jit function of triton.language, created when triton
    # was imported: if that happened before TRITON_INTERPRET=1 was set (importing torch can import
    # triton), the interpreter cannot call it. So these kernels use builtins only (tl.reduce, tl.full)
    # and helpers defined here, which take the mode in force when this module is first imported.
    return tl.reduce(x, axis, _add)


@triton.jit
def wkv6_fwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, y_ptr, sT_ptr, ck_ptr, T,
                    H: tl.constexpr, N: tl.constexpr, CK: tl.constexpr, SAVE: tl.constexpr):
    # With SAVE, the state entering steps 0, CK, 2 CK, ... goes to ck_ptr ([B, H, ceil(T / CK), K, V]).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    sidx = ik[:, None] * N + ik[None, :]
    S = tl.load(s0_ptr + pid * N * N + sidx)
    uu = tl.load(u_ptr + h * N + ik).to(tl.float32)
    nc = (T + CK - 1) // CK
    for c in range(nc):
        if SAVE:
            tl.store(ck_ptr + (pid * nc + c) * N * N + sidx, S)
        for t in range(c * CK, tl.minimum(c * CK + CK, T)):
            base = ((b * T + t) * H + h) * N
            rt = tl.load(r_ptr + base + ik).to(tl.float32)
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            kv = kt[:, None] * vt[None, :]
            yt = _sum(rt[:, None] * (uu[:, None] * kv + S), axis=0)
            tl.store(y_ptr + base + ik, yt.to(y_ptr.dtype.element_ty))
            S = tl.exp(wt)[:, None] * S + kv
    tl.store(sT_ptr + pid * N * N + sidx, S)


@triton.jit
def wkv6_bwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, ck_ptr, scr_ptr, dy_ptr, dsT_ptr,
                    dr_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr, ds0_ptr, T,
                    H: tl.constexpr, N: tl.constexpr, CK: tl.constexpr):
    # y_t = r^T (diag(u) k v^T + S_{t-1}),  S_t = diag(e^w) S_{t-1} + k v^T;  dS holds dL/dS_t.
    # Blocks of CK steps from the end: the states entering the block's steps are recomputed from its
    # checkpoint (the same arithmetic as the forward) into scr_ptr ([B, H, CK, K, V], this program's
    # slice), then read back step by step in reverse.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    sidx = ik[:, None] * N + ik[None, :]
    scr = scr_ptr + pid * CK * N * N
    dS = tl.load(dsT_ptr + pid * N * N + sidx)
    uu = tl.load(u_ptr + h * N + ik).to(tl.float32)
    du = tl.full([N], 0.0, tl.float32)
    nc = (T + CK - 1) // CK
    for i in range(nc):
        c = nc - 1 - i
        t0 = c * CK
        t1 = tl.minimum(t0 + CK, T)
        S = tl.load(ck_ptr + (pid * nc + c) * N * N + sidx)
        tl.store(scr + sidx, S)
        for t in range(t0, t1 - 1):
            base = ((b * T + t) * H + h) * N
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            S = tl.exp(wt)[:, None] * S + kt[:, None] * vt[None, :]
            tl.store(scr + (t + 1 - t0) * N * N + sidx, S)
        # The scratch is written and read by different threads of this program: make the writes
        # visible before reading, and (below) finish reading before the next block overwrites it.
        tl.debug_barrier()
        for j in range(t1 - t0):
            t = t1 - 1 - j
            base = ((b * T + t) * H + h) * N
            rt = tl.load(r_ptr + base + ik).to(tl.float32)
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            dyt = tl.load(dy_ptr + base + ik).to(tl.float32)
            Sp = tl.load(scr + (t - t0) * N * N + sidx)
            vdy = _sum(vt * dyt, axis=0)
            ew = tl.exp(wt)
            drt = uu * kt * vdy + _sum(Sp * dyt[None, :], axis=1)
            du += rt * kt * vdy
            dkt = rt * uu * vdy + _sum(dS * vt[None, :], axis=1)
            dvt = _sum(rt * uu * kt, axis=0) * dyt + _sum(dS * kt[:, None], axis=0)
            dwt = ew * _sum(dS * Sp, axis=1)
            tl.store(dr_ptr + base + ik, drt)
            tl.store(dk_ptr + base + ik, dkt)
            tl.store(dv_ptr + base + ik, dvt)
            tl.store(dw_ptr + base + ik, dwt)
            dS = rt[:, None] * dyt[None, :] + ew[:, None] * dS
        tl.debug_barrier()
    tl.store(ds0_ptr + pid * N * N + sidx, dS)
    tl.store(du_ptr + pid * N + ik, du)


@triton.jit
def _wkv7_step(S, wt, kt, vt, at, bt):
    # S_t = diag(e^w) S_{t-1} + b (a^T S_{t-1}) + k v^T; shared by the forward and the backward's
    # recomputation, so both produce the same states.
    sa = _sum(at[:, None] * S, axis=0)
    return tl.exp(wt)[:, None] * S + bt[:, None] * sa[None, :] + kt[:, None] * vt[None, :]


@triton.jit
def wkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, ck_ptr, T,
                    H: tl.constexpr, N: tl.constexpr, CK: tl.constexpr, SAVE: tl.constexpr):
    # With SAVE, the state entering steps 0, CK, 2 CK, ... goes to ck_ptr ([B, H, ceil(T / CK), K, V]).
    pid = tl.program_id(0).to(tl.int64)
    bb = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    sidx = ik[:, None] * N + ik[None, :]
    S = tl.load(s0_ptr + pid * N * N + sidx)
    nc = (T + CK - 1) // CK
    for c in range(nc):
        if SAVE:
            tl.store(ck_ptr + (pid * nc + c) * N * N + sidx, S)
        for t in range(c * CK, tl.minimum(c * CK + CK, T)):
            base = ((bb * T + t) * H + h) * N
            rt = tl.load(r_ptr + base + ik).to(tl.float32)
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            at = tl.load(a_ptr + base + ik).to(tl.float32)
            bt = tl.load(b_ptr + base + ik).to(tl.float32)
            S = _wkv7_step(S, wt, kt, vt, at, bt)
            yt = _sum(rt[:, None] * S, axis=0)
            tl.store(y_ptr + base + ik, yt.to(y_ptr.dtype.element_ty))
    tl.store(sT_ptr + pid * N * N + sidx, S)


@triton.jit
def wkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, ck_ptr, scr_ptr, dy_ptr, dsT_ptr,
                    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr, T,
                    H: tl.constexpr, N: tl.constexpr, CK: tl.constexpr):
    # S_t = diag(e^w) S_{t-1} + b (a^T S_{t-1}) + k v^T,  y_t = S_t^T r;  dS holds dL/dS_t (from later steps).
    # Blocks of CK steps from the end, the states entering them recomputed from the block's checkpoint
    # into this program's scratch, as in wkv6_bwd_kernel.
    pid = tl.program_id(0).to(tl.int64)
    bb = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    sidx = ik[:, None] * N + ik[None, :]
    scr = scr_ptr + pid * CK * N * N
    dS = tl.load(dsT_ptr + pid * N * N + sidx)
    nc = (T + CK - 1) // CK
    for i in range(nc):
        c = nc - 1 - i
        t0 = c * CK
        t1 = tl.minimum(t0 + CK, T)
        S = tl.load(ck_ptr + (pid * nc + c) * N * N + sidx)
        tl.store(scr + sidx, S)
        for t in range(t0, t1 - 1):
            base = ((bb * T + t) * H + h) * N
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            at = tl.load(a_ptr + base + ik).to(tl.float32)
            bt = tl.load(b_ptr + base + ik).to(tl.float32)
            S = _wkv7_step(S, wt, kt, vt, at, bt)
            tl.store(scr + (t + 1 - t0) * N * N + sidx, S)
        tl.debug_barrier()  # scratch written by other threads of this program: see wkv6_bwd_kernel
        for j in range(t1 - t0):
            t = t1 - 1 - j
            base = ((bb * T + t) * H + h) * N
            rt = tl.load(r_ptr + base + ik).to(tl.float32)
            wt = tl.load(w_ptr + base + ik).to(tl.float32)
            kt = tl.load(k_ptr + base + ik).to(tl.float32)
            vt = tl.load(v_ptr + base + ik).to(tl.float32)
            at = tl.load(a_ptr + base + ik).to(tl.float32)
            bt = tl.load(b_ptr + base + ik).to(tl.float32)
            dyt = tl.load(dy_ptr + base + ik).to(tl.float32)
            Sp = tl.load(scr + (t - t0) * N * N + sidx)
            ew = tl.exp(wt)
            sa = _sum(at[:, None] * Sp, axis=0)
            S = ew[:, None] * Sp + bt[:, None] * sa[None, :] + kt[:, None] * vt[None, :]
            drt = _sum(S * dyt[None, :], axis=1)
            G = dS + rt[:, None] * dyt[None, :]
            dkt = _sum(G * vt[None, :], axis=1)
            dvt = _sum(G * kt[:, None], axis=0)
            dwt = ew * _sum(G * Sp, axis=1)
            dbt = _sum(G * sa[None, :], axis=1)
            dsa = _sum(G * bt[:, None], axis=0)
            dat = _sum(Sp * dsa[None, :], axis=1)
            tl.store(dr_ptr + base + ik, drt)
            tl.store(dw_ptr + base + ik, dwt)
            tl.store(dk_ptr + base + ik, dkt)
            tl.store(dv_ptr + base + ik, dvt)
            tl.store(da_ptr + base + ik, dat)
            tl.store(db_ptr + base + ik, dbt)
            dS = ew[:, None] * G + at[:, None] * dsa[None, :]
        tl.debug_barrier()
    tl.store(ds0_ptr + pid * N * N + sidx, dS)


@triton.jit
def _tie_weight(x, y):
    # d max(x, y) / dx as torch.maximum defines it: 1, 0, or 0.5 on a tie.
    return tl.where(x > y, 1.0, tl.where(x < y, 0.0, 0.5))


@triton.jit
def wkv4_fwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, a0_ptr, b0_ptr, p0_ptr, y_ptr, aT_ptr, bT_ptr, pT_ptr,
                    sa_ptr, sb_ptr, sp_ptr, T, C, BLOCK: tl.constexpr, SAVE: tl.constexpr):
    pb = tl.program_id(0).to(tl.int64)
    ic = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = ic < C
    ww = tl.load(w_ptr + ic, mask=m, other=0.0).to(tl.float32)
    uu = tl.load(u_ptr + ic, mask=m, other=0.0).to(tl.float32)
    aa = tl.load(a0_ptr + pb * C + ic, mask=m, other=0.0)
    bb = tl.load(b0_ptr + pb * C + ic, mask=m, other=1.0)
    pp = tl.load(p0_ptr + pb * C + ic, mask=m, other=0.0)
    for t in range(T):
        base = (pb * T + t) * C
        kt = tl.load(k_ptr + base + ic, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + ic, mask=m, other=0.0).to(tl.float32)
        if SAVE:
            tl.store(sa_ptr + base + ic, aa, mask=m)
            tl.store(sb_ptr + base + ic, bb, mask=m)
            tl.store(sp_ptr + base + ic, pp, mask=m)
        q = tl.maximum(pp, uu + kt)
        e1 = tl.exp(pp - q)
        e2 = tl.exp(uu + kt - q)
        yt = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        tl.store(y_ptr + base + ic, yt.to(y_ptr.dtype.element_ty), mask=m)
        q2 = tl.maximum(pp + ww, kt)
        f1 = tl.exp(pp + ww - q2)
        f2 = tl.exp(kt - q2)
        aa = f1 * aa + f2 * vt
        bb = f1 * bb + f2
        pp = q2
    tl.store(aT_ptr + pb * C + ic, aa, mask=m)
    tl.store(bT_ptr + pb * C + ic, bb, mask=m)
    tl.store(pT_ptr + pb * C + ic, pp, mask=m)


@triton.jit
def wkv4_bwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, sa_ptr, sb_ptr, sp_ptr, dy_ptr, daT_ptr, dbT_ptr, dpT_ptr,
                    dk_ptr, dv_ptr, dw_ptr, du_ptr, da0_ptr, db0_ptr, dp0_ptr, T, C,
                    BLOCK: tl.constexpr):
    # Reverse mode through the exact operations of the reference step, the running maxima included
    # (their gradient follows torch.maximum's convention), so the state gradients match autograd's.
    pb = tl.program_id(0).to(tl.int64)
    ic = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = ic < C
    ww = tl.load(w_ptr + ic, mask=m, other=0.0).to(tl.float32)
    uu = tl.load(u_ptr + ic, mask=m, other=0.0).to(tl.float32)
    ga = tl.load(daT_ptr + pb * C + ic, mask=m, other=0.0)
    gb = tl.load(dbT_ptr + pb * C + ic, mask=m, other=0.0)
    gp = tl.load(dpT_ptr + pb * C + ic, mask=m, other=0.0)
    dw = tl.full([BLOCK], 0.0, tl.float32)
    du = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(T):
        t = T - 1 - i
        base = (pb * T + t) * C
        kt = tl.load(k_ptr + base + ic, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + ic, mask=m, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + base + ic, mask=m, other=0.0).to(tl.float32)
        aa = tl.load(sa_ptr + base + ic, mask=m, other=0.0)
        bb = tl.load(sb_ptr + base + ic, mask=m, other=1.0)
        pp = tl.load(sp_ptr + base + ic, mask=m, other=0.0)
        # State update: (a, b, p) -> (f1 a + f2 v, f1 b + f2, q2).
        q2 = tl.maximum(pp + ww, kt)
        f1 = tl.exp(pp + ww - q2)
        f2 = tl.exp(kt - q2)
        l1 = (ga * aa + gb * bb) * f1
        l2 = (ga * vt + gb) * f2
        dvt = ga * f2
        na = ga * f1
        nb = gb * f1
        dq2 = gp - l1 - l2
        c2 = _tie_weight(pp + ww, kt)
        np_ = l1 + c2 * dq2
        dw += l1 + c2 * dq2
        dkt = l2 + (1.0 - c2) * dq2
        # Output: y = (e1 a + e2 v) / (e1 b + e2).
        q = tl.maximum(pp, uu + kt)
        e1 = tl.exp(pp - q)
        e2 = tl.exp(uu + kt - q)
        num = e1 * aa + e2 * vt
        den = e1 * bb + e2
        dnum = dyt / den
        dden = -dyt * num / (den * den)
        na += dnum * e1
        nb += dden * e1
        o1 = (dnum * aa + dden * bb) * e1
        o2 = (dnum * vt + dden) * e2
        dvt += dnum * e2
        dq = -o1 - o2
        c1 = _tie_weight(pp, uu + kt)
        np_ += o1 + c1 * dq
        dkt += o2 + (1.0 - c1) * dq
        du += o2 + (1.0 - c1) * dq
        tl.store(dk_ptr + base + ic, dkt, mask=m)
        tl.store(dv_ptr + base + ic, dvt, mask=m)
        ga = na
        gb = nb
        gp = np_
    tl.store(da0_ptr + pb * C + ic, ga, mask=m)
    tl.store(db0_ptr + pb * C + ic, gb, mask=m)
    tl.store(dp0_ptr + pb * C + ic, gp, mask=m)
    tl.store(dw_ptr + pb * C + ic, dw, mask=m)
    tl.store(du_ptr + pb * C + ic, du, mask=m)


@triton.jit
def _span_sums(wc):
    """Chunk-local decay sums of a chunk's log decay ``wc`` [L, K], each summed over its own span.

    Returns ``a_exc`` [L, K] (sum_{m<t} w_m), ``tail`` [L, K] (sum_{m>s} w_m) and ``a_last`` [K] (the
    whole chunk). Spans are summed directly (scans), not as differences of prefix sums, so strong decay
    elsewhere in the chunk costs no digits, and each w_m gets gradient only from the spans holding it.
    Every channel k is independent, so a block of channels gives that block's sums.
    """
    a_exc = tl.associative_scan(wc, 0, _add) - wc
    tail = tl.associative_scan(wc, 0, _add, reverse=True) - wc
    return a_exc, tail, _sum(wc, 0)


@triton.jit
def _pair_decays(wc, strict):
    """``E`` [L, L, K] = exp(sum_{s<m<t} w_m) for s < t, exactly 0 elsewhere (per channel, as above)."""
    X = tl.where(strict[:, :, None], wc[None, :, :], 0.0)  # [t, m]: w_m for m < t
    R = tl.associative_scan(X, 1, _add, reverse=True)  # [t, s]: sum_{s<=m<t} w_m
    return tl.exp(tl.where(strict[:, :, None], R - X, float("-inf")))


@triton.jit
def wkv6_chunk_fwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, y_ptr, sT_ptr, sc_ptr, T,
                          H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, SAVE: tl.constexpr):
    # Chunked wkv6 forward, one program per (batch, head, block of BV value columns), chunks of L tokens
    # in order; with SAVE, the state entering every chunk goes to sc_ptr ([B, H, n_chunks, K, V]).
    # Within a chunk, with the chunk-local span sums of _span_sums / _pair_decays (all <= 0):
    #   y_t = sum_{s<t} (sum_k r_t k_s e^{sum_{s<m<t} w_m}) v_s + (r_t . u k_t) v_t + (r_t e^{a_exc[t]}) S
    #   S' = diag(e^{a_last}) S + sum_s (k_s e^{tail[s]}) v_s^T
    # Every exponent is a decay over a span inside the chunk (<= 0, masked to -inf before exp where
    # unused): nothing overflows however strong the decay. Products accumulate in fp32 (ieee dots).
    # Value columns are independent (y[:, cols] and S[:, cols] need only v[:, cols]), so a program
    # holds the [K, BV] columns of the state; the pairwise-decay tile is [L, L, BK], P summed over
    # blocks of BK keys (reloaded from memory) so the tile never grows with the head size.
    pid = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    b = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    iv = pv * BV + tl.arange(0, BV)
    il = tl.arange(0, L)
    sidx = ik[:, None] * N + iv[None, :]
    S = tl.load(s0_ptr + pid * N * N + sidx)
    uu = tl.load(u_ptr + h * N + ik).to(tl.float32)
    strict = il[:, None] > il[None, :]  # (t, s): s < t
    nc = (T + L - 1) // L
    for c in range(nc):
        tt = c * L + il
        mt = (tt < T)[:, None]
        rows = ((b * T + tt) * H + h)[:, None] * N
        rc = tl.load(r_ptr + rows + ik[None, :], mask=mt, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + rows + ik[None, :], mask=mt, other=0.0).to(tl.float32)
        # padded tokens: no decay, no input
        wc = tl.load(w_ptr + rows + ik[None, :], mask=mt, other=0.0).to(tl.float32)
        vc = tl.load(v_ptr + rows + iv[None, :], mask=mt, other=0.0).to(tl.float32)
        if SAVE:
            tl.store(sc_ptr + (pid * nc + c) * N * N + sidx, S)
        a_exc, tail, a_last = _span_sums(wc)
        if BK == N:
            P = _sum(rc[:, None, :] * kc[None, :, :] * _pair_decays(wc, strict), 2)
        else:
            P = tl.full([L, L], 0.0, tl.float32)
            for k0 in range(0, N, BK):
                pk = rows + k0 + tl.arange(0, BK)[None, :]
                rb = tl.load(r_ptr + pk, mask=mt, other=0.0).to(tl.float32)
                kb = tl.load(k_ptr + pk, mask=mt, other=0.0).to(tl.float32)
                wb = tl.load(w_ptr + pk, mask=mt, other=0.0).to(tl.float32)
                P += _sum(rb[:, None, :] * kb[None, :, :] * _pair_decays(wb, strict), 2)
        yc = tl.dot(P, vc, input_precision="ieee")
        yc += _sum(rc * uu[None, :] * kc, 1)[:, None] * vc
        yc += tl.dot(rc * tl.exp(a_exc), S, input_precision="ieee")
        tl.store(y_ptr + rows + iv[None, :], yc.to(y_ptr.dtype.element_ty), mask=mt)
        kd = kc * tl.exp(tail)
        S = tl.exp(a_last)[:, None] * S + tl.dot(tl.trans(kd), vc, input_precision="ieee")
    tl.store(sT_ptr + pid * N * N + sidx, S)


@triton.jit
def wkv6_chunk_bwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, sc_ptr, dy_ptr, dsT_ptr,
                          dr_ptr, dk_ptr, dvp_ptr, dw_ptr, du_ptr, ds0_ptr, T,
                          H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    # Reverse mode of wkv6_chunk_fwd_kernel, chunks in reverse order, dS = dL/d(state leaving the chunk).
    # Per chunk, with E[t,s,k] = e^{sum_{s<m<t} w_m} (s < t), P = sum_k r_t k_s E, q_t = r_t e^{a_exc[t]},
    # kd_s = k_s e^{tail[s]}, beta_t = r_t . u k_t:
    #   dv = P^T dy + beta dy + kd dS;   dP = (dy v^T) on s < t;   dq = dy S^T;   dS_in = q^T dy + e^{a_last} dS
    #   and the decay gradients through each span sum (scans), never through differences of prefix sums.
    # One program per (batch, head, block of BK keys): the key rows of S and dS are independent (dS_in
    # rows need only their own q, e^{a_last}, dS rows), and so are dr, dk, dw, du of those keys; only dv
    # sums over keys, so each program writes its block's share of dv (P, beta and kd dS restricted to
    # its keys) to dvp_ptr[key block] ([NK, B, T, H, V]) and the wrapper adds the shares.
    pid = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1).to(tl.int64)
    b = pid // H
    h = pid % H
    ib = pk * BK + tl.arange(0, BK)
    iv = tl.arange(0, N)
    il = tl.arange(0, L)
    sidx = ib[:, None] * N + iv[None, :]
    dvp_ptr += pk * tl.num_programs(0).to(tl.int64) * T * N  # this key block's share of dv
    dS = tl.load(dsT_ptr + pid * N * N + sidx)
    uu = tl.load(u_ptr + h * N + ib).to(tl.float32)
    du = tl.full([BK], 0.0, tl.float32)
    strict = il[:, None] > il[None, :]
    nc = (T + L - 1) // L
    for i in range(nc):
        c = nc - 1 - i
        tt = c * L + il
        mt = (tt < T)[:, None]
        rows = ((b * T + tt) * H + h)[:, None] * N
        ko = rows + ib[None, :]
        vo = rows + iv[None, :]
        rc = tl.load(r_ptr + ko, mask=mt, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + ko, mask=mt, other=0.0).to(tl.float32)
        wc = tl.load(w_ptr + ko, mask=mt, other=0.0).to(tl.float32)
        vc = tl.load(v_ptr + vo, mask=mt, other=0.0).to(tl.float32)
        dyc = tl.load(dy_ptr + vo, mask=mt, other=0.0).to(tl.float32)
        S = tl.load(sc_ptr + (pid * nc + c) * N * N + sidx)
        a_exc, tail, a_last = _span_sums(wc)
        E = _pair_decays(wc, strict)
        P = _sum(rc[:, None, :] * kc[None, :, :] * E, 2)
        beta = _sum(rc * uu[None, :] * kc, 1)
        e_exc = tl.exp(a_exc)
        q = rc * e_exc
        e_tail = tl.exp(tail)
        kd = kc * e_tail
        e_last = tl.exp(a_last)
        dP = tl.where(strict, tl.dot(dyc, tl.trans(vc), input_precision="ieee"), 0.0)
        dv = (tl.dot(tl.trans(P), dyc, input_precision="ieee") + beta[:, None] * dyc
              + tl.dot(kd, dS, input_precision="ieee"))
        dbeta = _sum(dyc * vc, 1)
        dq = tl.dot(dyc, tl.trans(S), input_precision="ieee")
        dkd = tl.dot(vc, tl.trans(dS), input_precision="ieee")
        dD = _sum(dS * S, 1)
        W = dP[:, :, None] * E
        dr = _sum(W * kc[None, :, :], 1) + dbeta[:, None] * uu[None, :] * kc + dq * e_exc
        dk = _sum(W * rc[:, None, :], 0) + dbeta[:, None] * uu[None, :] * rc + dkd * e_tail
        du += _sum(dbeta[:, None] * rc * kc, 0)
        # Decay gradients, each through its own span sum: w_m is in the span (s, t) of E[t, s] for
        # s < m < t, in a_exc[t] for t > m, in tail[s] for s < m, and in a_last.
        G = W * rc[:, None, :] * kc[None, :, :]  # dL/d(span exponent)[t, s], zero unless s < t
        C = tl.associative_scan(G, 1, _add) - G  # C[t, m] = sum_{s<m} G[t, s]
        dw = _sum(tl.where(strict[:, :, None], C, 0.0), 0)
        da_exc = dq * q
        dw += tl.associative_scan(da_exc, 0, _add, reverse=True) - da_exc
        dtail = dkd * kd
        dw += tl.associative_scan(dtail, 0, _add) - dtail
        dw += (dD * e_last)[None, :]
        tl.store(dr_ptr + ko, dr, mask=mt)
        tl.store(dk_ptr + ko, dk, mask=mt)
        tl.store(dvp_ptr + vo, dv, mask=mt)
        tl.store(dw_ptr + ko, dw, mask=mt)
        dS = tl.dot(tl.trans(q), dyc, input_precision="ieee") + e_last[:, None] * dS
    tl.store(ds0_ptr + pid * N * N + sidx, dS)
    tl.store(du_ptr + pid * N + ib, du)
