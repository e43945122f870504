"""Chunked (matrix-form) Triton kernels for wkv7, forward and backward. Imported only when a kernel runs.

Layouts as in ``_kernels.py``: ``r, w, k, v, a, b, y`` [B, T, H, N] contiguous, states [B, H, K, V] fp32,
int64 offsets. One program per (batch, head) walks the chunks of ``L`` tokens in order with the fp32
[K, V] state ``Z`` in registers. With chunk-local log-decay spans (``w`` is the log decay, <= 0)

    Es[t, s] = exp(sum_{s<m<t} w_m)  (s < t, else 0)      Ei[t, s] = exp(sum_{s<m<=t} w_m)  (s <= t, else 0)

(each a [L, L, K] tile, built BK channels at a time: ``_pair_sums``) the step
``Z_t = diag(e^{w_t}) Z_{t-1} + b_t u_t^T + k_t v_t^T`` with the removal read ``u_t = Z_{t-1}^T a_t``
unrolls over a chunk entered with state ``Z`` into

    u_t = (a_t e^{g_exc[t]})^T Z + sum_{s<t} A_b[t, s] u_s + A_k[t, s] v_s,   A_x[t, s] = sum_k a_t Es[t, s] x_s
    y_t = (r_t e^{g_inc[t]})^T Z + sum_{s<=t} R_b[t, s] u_s + R_k[t, s] v_s,  R_x[t, s] = sum_k r_t Ei[t, s] x_s
    Z'  = diag(e^{last}) Z + sum_s (b_s e^{tail[s]}) u_s^T + (k_s e^{tail[s]}) v_s^T

where ``g_exc[t] = sum_{m<t} w_m``, ``g_inc[t] = sum_{m<=t} w_m``, ``tail[s] = sum_{m>s} w_m``, ``last`` the
whole chunk. The reads solve the unit-lower-triangular system ``(I - A_b) U = W Z + A_k V`` (W = a e^{g_exc}):
``X = (I - A_b)^{-1}`` comes from forward substitution over the chunk's rows, then ``U = X (W Z + A_k V)``.

Numerics: every exponent is the sum of ``w`` over its own span inside the chunk, so it is <= 0 whatever
the decay (nothing overflows, no sub-chunking or guard is needed) and unused entries are -inf before
``exp`` (exactly 0, and so are their gradients). Spans are summed directly from shifted copies of ``w``
(``w_{t-1}`` and ``w_{t+1}`` are loaded from memory), never as differences of prefix sums, which would
lose digits to the size of the prefix sums under strong decay. Products accumulate in fp32 (ieee dots).

The backward walks the chunks in reverse, reading the state that entered each chunk (stored by the
forward: ``[B, H, n_chunks, K, V]`` fp32), recomputing the chunk's tiles and carrying dL/dZ.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import _add, _sum  # builtins-only reductions (see the note on _sum there)


@triton.jit
def _load_chunk(ptr, ptrs, mask):
    return tl.load(ptr + ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _spans(w_ptr, ptrs, tt, T, il, HN: tl.constexpr, L: tl.constexpr):
    """The chunk's log-decay spans of the channels in ``ptrs``: g_exc, g_inc, tail [L, K] and last [K].

    Padded tokens (t >= T) load w = 0: no decay, and their inputs are 0, so they change nothing.
    """
    valid = (tt < T)[:, None]
    wc = _load_chunk(w_ptr, ptrs, valid)
    # w_{t-1} and w_{t+1} inside the chunk (0 across its edges): shifted copies, so that every span
    # is a sum of its own terms (a scan of a shifted input), not a prefix sum minus another.
    wp = _load_chunk(w_ptr, ptrs - HN, (il > 0)[:, None] & valid)
    wn = _load_chunk(w_ptr, ptrs + HN, (il < L - 1)[:, None] & (tt + 1 < T)[:, None])
    g_exc = tl.associative_scan(wp, 0, _add)
    g_inc = tl.associative_scan(wc, 0, _add)
    tail = tl.associative_scan(wn, 0, _add, reverse=True)
    return g_exc, g_inc, tail, _sum(wc, 0)


@triton.jit
def _pair_decays(w_ptr, ptrs, tt, T, il, HN: tl.constexpr, L: tl.constexpr):
    """Es and Ei [L, L, BK] for the block of channels in ``ptrs`` ([L, BK] offsets)."""
    wn = _load_chunk(w_ptr, ptrs + HN, (il < L - 1)[:, None] & (tt + 1 < T)[:, None])
    t3 = il[:, None, None]
    s3 = il[None, :, None]
    # [t, s]: reverse scans over s of w_{s+1} give sum_{s<m<t} w_m (strict) and sum_{s<m<=t} w_m.
    xs = tl.associative_scan(tl.where(s3 + 1 < t3, wn[None, :, :], 0.0), 1, _add, reverse=True)
    Es = tl.exp(tl.where(s3 < t3, xs, float("-inf")))
    xi = tl.associative_scan(tl.where(s3 + 1 <= t3, wn[None, :, :], 0.0), 1, _add, reverse=True)
    Ei = tl.exp(tl.where(s3 <= t3, xi, float("-inf")))
    return Es, Ei


@triton.jit
def _pair_sums(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, rows, tt, T, il, mt,
               HN: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """A_b, A_k, R_b, R_k [L, L] of a chunk (``rows`` [L, 1]: offsets of its tokens' channel 0).

    Summed over blocks of BK channels, each block's inputs reloaded from memory (cached), so the
    [L, L, BK] decay tiles stay the same size whatever the head size.
    """
    A_b = tl.full([L, L], 0.0, tl.float32)
    A_k = tl.full([L, L], 0.0, tl.float32)
    R_b = tl.full([L, L], 0.0, tl.float32)
    R_k = tl.full([L, L], 0.0, tl.float32)
    for k0 in range(0, N, BK):
        pk = rows + k0 + tl.arange(0, BK)[None, :]
        Es, Ei = _pair_decays(w_ptr, pk, tt, T, il, HN, L)
        ab = _load_chunk(a_ptr, pk, mt)
        bb = _load_chunk(b_ptr, pk, mt)
        kb = _load_chunk(k_ptr, pk, mt)
        rb = _load_chunk(r_ptr, pk, mt)
        aE = ab[:, None, :] * Es
        A_b += _sum(aE * bb[None, :, :], 2)
        A_k += _sum(aE * kb[None, :, :], 2)
        rE = rb[:, None, :] * Ei
        R_b += _sum(rE * bb[None, :, :], 2)
        R_k += _sum(rE * kb[None, :, :], 2)
    return A_b, A_k, R_b, R_k


@triton.jit
def _unit_lower_inverse(A, il, L: tl.constexpr):
    """(I - A)^{-1} for a strictly lower triangular [L, L] ``A``, by forward substitution over rows.

    Row i of X = (I - A)^{-1} is e_i + sum_{j<i} A[i, j] X[j, :]; rows j < i are final when row i is
    formed. Rows are picked with masks (register tiles cannot be indexed).
    """
    rows = il[:, None]
    X = tl.where(rows == il[None, :], 1.0, 0.0)
    for i in tl.static_range(1, L):
        a_i = _sum(tl.where(rows == i, A, 0.0), 0)  # A[i, :] (zero from column i on)
        X = tl.where(rows == i, X + _sum(a_i[:, None] * X, 0)[None, :], X)
    return X


@triton.jit
def wkv7_chunk_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, sc_ptr, T,
                          H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, SAVE: tl.constexpr):
    # One program per (batch, head, block of BV value columns): columns are independent (U, y and the
    # state's columns need only their own columns of v and of the state), while every program builds
    # the key-side [L, L] products and the solve. With SAVE, the state entering every chunk goes to
    # sc_ptr ([B, H, n_chunks, K, V]) for the backward.
    pid = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    bb = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    iv = pv * BV + tl.arange(0, BV)
    il = tl.arange(0, L)
    sidx = ik[:, None] * N + iv[None, :]
    Z = tl.load(s0_ptr + pid * N * N + sidx)  # [K, BV]
    nc = (T + L - 1) // L
    for c in range(nc):
        tt = c * L + il
        mt = (tt < T)[:, None]
        rows = ((bb * T + tt) * H + h)[:, None] * N
        ptrs = rows + ik[None, :]
        vptrs = rows + iv[None, :]
        if SAVE:
            tl.store(sc_ptr + (pid * nc + c) * N * N + sidx, Z)
        A_b, A_k, R_b, R_k = _pair_sums(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, rows, tt, T, il, mt, H * N, N, L, BK)
        X = _unit_lower_inverse(A_b, il, L)
        g_exc, g_inc, tail, last = _spans(w_ptr, ptrs, tt, T, il, H * N, L)
        vc = _load_chunk(v_ptr, vptrs, mt)
        ac = _load_chunk(a_ptr, ptrs, mt)
        rhs = (tl.dot(ac * tl.exp(g_exc), Z, input_precision="ieee")
               + tl.dot(A_k, vc, input_precision="ieee"))
        U = tl.dot(X, rhs, input_precision="ieee")  # u_t for every token of the chunk, [L, BV]
        rc = _load_chunk(r_ptr, ptrs, mt)
        yc = (tl.dot(rc * tl.exp(g_inc), Z, input_precision="ieee") + tl.dot(R_b, U, input_precision="ieee")
              + tl.dot(R_k, vc, input_precision="ieee"))
        tl.store(y_ptr + vptrs, yc.to(y_ptr.dtype.element_ty), mask=mt)
        et = tl.exp(tail)
        bc = _load_chunk(b_ptr, ptrs, mt)
        kc = _load_chunk(k_ptr, ptrs, mt)
        Z = (tl.exp(last)[:, None] * Z + tl.dot(tl.trans(bc * et), U, input_precision="ieee")
             + tl.dot(tl.trans(kc * et), vc, input_precision="ieee"))
    tl.store(sT_ptr + pid * N * N + sidx, Z)


@triton.jit
def wkv7_chunk_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, sc_ptr, dy_ptr, dsT_ptr,
                          dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr, T,
                          H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr):
    # Reverse mode of wkv7_chunk_fwd_kernel, chunks in reverse order; dZ = dL/d(state leaving the chunk).
    # Through U = X rhs with X = (I - A_b)^{-1}: d rhs = X^T dU and dA_b = (d rhs) U^T (strictly lower).
    # The decay gradient goes through each span sum: w_m is in Es[t, s] for s < m < t, in Ei[t, s] for
    # s < m <= t, in g_exc[t] for t > m, in g_inc[t] for t >= m, in tail[s] for s < m, and in last.
    # Per chunk: (1) the [L, L] pairwise sums, by key blocks; (2) every [L, N] and [N, N] product, whose
    # parts of dr, dw, dk, da, db go to the (fp32) output rows; (3) by key blocks again, the parts that
    # go through the [L, L, BK] decay tiles, added to what (2) stored for the block's columns.
    # One program per (batch, head, block of BV value columns), as in the forward: dv and the state
    # gradient's columns are the block's own; the key-side gradients (dr, dw, dk, da, db) are linear in
    # sums over value columns (dA_b, dR_b, d_er, ...), so each program writes its block's share of them
    # to its own slice of those buffers ([NV, B, T, H, K]) and the wrapper adds the shares.
    pid = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    share = pv * tl.num_programs(0).to(tl.int64) * T * N
    dr_ptr += share
    dw_ptr += share
    dk_ptr += share
    da_ptr += share
    db_ptr += share
    bb = pid // H
    h = pid % H
    ik = tl.arange(0, N)
    iv = pv * BV + tl.arange(0, BV)
    il = tl.arange(0, L)
    sidx = ik[:, None] * N + iv[None, :]
    strict = il[:, None] > il[None, :]  # (t, s): s < t
    incl = il[:, None] >= il[None, :]
    # Row shifts inside a chunk: (up @ x)[t] = x[t+1], (down @ x)[t] = x[t-1], 0 past the edges.
    up = tl.where(il[None, :] == il[:, None] + 1, 1.0, 0.0)
    down = tl.where(il[None, :] + 1 == il[:, None], 1.0, 0.0)
    dZ = tl.load(dsT_ptr + pid * N * N + sidx)
    nc = (T + L - 1) // L
    for i in range(nc):
        c = nc - 1 - i
        tt = c * L + il
        mt = (tt < T)[:, None]
        rows = ((bb * T + tt) * H + h)[:, None] * N
        ptrs = rows + ik[None, :]
        vptrs = rows + iv[None, :]
        # (1), (2): recompute the forward's chunk quantities, then everything outside the decay tiles.
        A_b, A_k, R_b, R_k = _pair_sums(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, rows, tt, T, il, mt, H * N, N, L, BK)
        X = _unit_lower_inverse(A_b, il, L)
        g_exc, g_inc, tail, last = _spans(w_ptr, ptrs, tt, T, il, H * N, L)
        Z = tl.load(sc_ptr + (pid * nc + c) * N * N + sidx)
        vc = _load_chunk(v_ptr, vptrs, mt)
        e_exc = tl.exp(g_exc)
        Wc = _load_chunk(a_ptr, ptrs, mt) * e_exc
        rhs = tl.dot(Wc, Z, input_precision="ieee") + tl.dot(A_k, vc, input_precision="ieee")
        U = tl.dot(X, rhs, input_precision="ieee")
        e_inc = tl.exp(g_inc)
        er = _load_chunk(r_ptr, ptrs, mt) * e_inc
        et = tl.exp(tail)
        bt = _load_chunk(b_ptr, ptrs, mt) * et
        kt = _load_chunk(k_ptr, ptrs, mt) * et
        el = tl.exp(last)
        dyc = _load_chunk(dy_ptr, vptrs, mt)

        # y = er Z + R_b U + R_k V;  Z' = el Z + bt^T U + kt^T V.
        d_er = tl.dot(dyc, tl.trans(Z), input_precision="ieee")
        dR_b = tl.where(incl, tl.dot(dyc, tl.trans(U), input_precision="ieee"), 0.0)
        dR_k = tl.where(incl, tl.dot(dyc, tl.trans(vc), input_precision="ieee"), 0.0)
        dU = tl.dot(tl.trans(R_b), dyc, input_precision="ieee") + tl.dot(bt, dZ, input_precision="ieee")
        dv = tl.dot(tl.trans(R_k), dyc, input_precision="ieee") + tl.dot(kt, dZ, input_precision="ieee")
        d_bt = tl.dot(U, tl.trans(dZ), input_precision="ieee")
        d_kt = tl.dot(vc, tl.trans(dZ), input_precision="ieee")
        d_el = _sum(dZ * Z, 1)
        # U = X rhs, rhs = Wc Z + A_k V.
        d_rhs = tl.dot(tl.trans(X), dU, input_precision="ieee")
        dA_b = tl.where(strict, tl.dot(d_rhs, tl.trans(U), input_precision="ieee"), 0.0)
        dA_k = tl.where(strict, tl.dot(d_rhs, tl.trans(vc), input_precision="ieee"), 0.0)
        dWc = tl.dot(d_rhs, tl.trans(Z), input_precision="ieee")
        dv += tl.dot(tl.trans(A_k), d_rhs, input_precision="ieee")
        dZ = (el[:, None] * dZ + tl.dot(tl.trans(er), dyc, input_precision="ieee")
              + tl.dot(tl.trans(Wc), d_rhs, input_precision="ieee"))
        # Decay through g_exc[t] (spans m < t), g_inc[t] (m <= t), tail[s] (m > s) and last (every m).
        dg = tl.dot(up, dWc * Wc, input_precision="ieee") + d_er * er
        dw = tl.associative_scan(dg, 0, _add, reverse=True)
        dtail = d_bt * bt + d_kt * kt
        dw += tl.associative_scan(tl.dot(down, dtail, input_precision="ieee"), 0, _add)
        dw += (d_el * el)[None, :]
        tl.store(dv_ptr + vptrs, dv, mask=mt)
        tl.store(dw_ptr + ptrs, dw, mask=mt)
        tl.store(da_ptr + ptrs, dWc * e_exc, mask=mt)
        tl.store(dr_ptr + ptrs, d_er * e_inc, mask=mt)
        tl.store(db_ptr + ptrs, d_bt * et, mask=mt)
        tl.store(dk_ptr + ptrs, d_kt * et, mask=mt)
        # (3) reads back the columns other threads stored above.
        tl.debug_barrier()
        for k0 in range(0, N, BK):
            pk = rows + k0 + tl.arange(0, BK)[None, :]
            Es, Ei = _pair_decays(w_ptr, pk, tt, T, il, H * N, L)
            ab = _load_chunk(a_ptr, pk, mt)
            bk = _load_chunk(b_ptr, pk, mt)
            kb = _load_chunk(k_ptr, pk, mt)
            rb = _load_chunk(r_ptr, pk, mt)
            # The pairwise tiles: A_x = sum_k a_t Es x_s, R_x = sum_k r_t Ei x_s.
            GA = (dA_b[:, :, None] * bk[None, :, :] + dA_k[:, :, None] * kb[None, :, :]) * Es
            GR = (dR_b[:, :, None] * bk[None, :, :] + dR_k[:, :, None] * kb[None, :, :]) * Ei
            aE = ab[:, None, :] * Es
            rE = rb[:, None, :] * Ei
            tl.store(da_ptr + pk, tl.load(da_ptr + pk, mask=mt) + _sum(GA, 1), mask=mt)
            tl.store(dr_ptr + pk, tl.load(dr_ptr + pk, mask=mt) + _sum(GR, 1), mask=mt)
            db_p = _sum(dA_b[:, :, None] * aE + dR_b[:, :, None] * rE, 0)
            tl.store(db_ptr + pk, tl.load(db_ptr + pk, mask=mt) + db_p, mask=mt)
            dk_p = _sum(dA_k[:, :, None] * aE + dR_k[:, :, None] * rE, 0)
            tl.store(dk_ptr + pk, tl.load(dk_ptr + pk, mask=mt) + dk_p, mask=mt)
            # Decay: dL/d(span exponent) of each pairwise entry (gs for Es, gi for Ei), then summed over
            # the spans that hold w_m. Es[t, s] spans (s, t-1], the same span as Ei[t-1, s], so gs moves
            # up one row and joins gi: dw_m = sum_{s<m} sum_{t>=m} (gi[t, s] + gs[t+1, s]). Exclusive sums
            # are scans of inputs shifted by one row (an exact dot with a 0/1 shift matrix), never a scan
            # minus its own term: under strong decay that difference is all rounding of the large nearby
            # terms, while the true value (the far, decayed terms) is tiny.
            gs = GA * ab[:, None, :]
            gi = GR * rb[:, None, :]
            gs_up = tl.reshape(tl.dot(up, tl.reshape(gs, (L, L * BK)), input_precision="ieee"), (L, L, BK))
            q = tl.associative_scan(gi + gs_up, 0, _add, reverse=True)  # [m, s]: sum_{t>=m}
            dw_p = _sum(tl.where(il[None, :, None] < il[:, None, None], q, 0.0), 1)
            tl.store(dw_ptr + pk, tl.load(dw_ptr + pk, mask=mt) + dw_p, mask=mt)
    tl.store(ds0_ptr + pid * N * N + sidx, dZ)
