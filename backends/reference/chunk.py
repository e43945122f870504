"""Chunked WKV kernels in plain PyTorch matrix form: exact to rounding, the fast default on a CPU.

The sequence is cut into chunks of ``CHUNK_LEN`` tokens (``CHUNK_LEN4`` for v4, ``CHUNK_LEN7`` for v7).
Each kernel works in three steps, with no Python loop over time:

1. **Within every chunk at once** (batched over all chunks of a segment): the chunk's own
   contribution to its outputs, how the chunk transforms a state that enters it, and what it adds
   to the state. This is where nearly all the arithmetic is, as a few large tensor ops.
2. **Across chunks, in order**: carry the state from chunk to chunk (one small update per chunk),
   keeping the state that enters each chunk.
3. **Within every chunk at once** again: add what the entering state contributes to the outputs.

Sequences are processed in segments of whole chunks, sized so the pairwise tensors stay around
``SEGMENT_ELEMENTS`` elements (memory stays bounded for long inputs); a last partial chunk is a
segment of its own, so any ``T >= 1`` works and nothing is padded.

Numerics. The decay enters in log space; a product of decays over a span is ``exp`` of a sum of log
decays. Inside a chunk the pairwise exponents (shape ``[.., L(t), L(s), K]``) are built explicitly:
for the entries that are used they are <= 0, and the others get ``-inf`` **before** ``exp``, so
nothing overflows and their gradients are exactly zero. ``exp(A_t - A_s)`` is never factored into
``exp(A_t) * exp(-A_s)``, which overflows as soon as a chunk decays by more than ``e^88`` (strong
decay gets there in a few steps). Each exponent is the sum of ``lw`` over its own span, not a
difference of two prefix sums, so strong decay elsewhere in the chunk costs no digits and the
gradient of ``lw`` is not a difference of large, nearly equal sums (see ``_pairwise_decay``).

Dtypes and conventions are those of the recurrent kernels (``recurrent.py``): arithmetic in fp64 for
fp64 inputs, else fp32; ``y`` in the input dtype; the state in fp32 (fp64). Autograd runs through
every input, the initial state included.

Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``N`` head size (K = V = N), ``C`` channels;
``n`` chunks of ``L`` tokens each inside a segment.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_zoo.opspec import state_dtype

# Tokens per chunk. The elementwise work grows with L (the pairwise [L, L, K] tensors) while the
# per-chunk state work and the sequential steps across chunks shrink with it. Measured on the 2-core
# AVX2 CPU (B=1, T=512, H=12, N=64, fp32; v4 at C=768 and 2048), fastest forward and forward+backward:
CHUNK_LEN = 8  # v5, v6
CHUNK_LEN7 = 8  # v7 (also keeps the L x L triangular solve tiny)
CHUNK_LEN4 = 4  # v4: per channel with no matrix state, so only the pairwise work matters
# Upper bound on the elements of one pairwise tensor per segment (fp32: 4 bytes each).
SEGMENT_ELEMENTS = 1 << 22

__all__ = ["CHUNK_LEN", "CHUNK_LEN4", "CHUNK_LEN7", "wkv4_chunk", "wkv5_chunk", "wkv6_chunk", "wkv7_chunk"]


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def _segments(T: int, L: int, elements_per_chunk: int) -> Iterator[tuple[int, int, int]]:
    """Split ``T`` tokens into segments ``(t0, t1, L_seg)`` of whole chunks, then the partial rest."""
    per_segment = max(1, SEGMENT_ELEMENTS // max(1, elements_per_chunk)) * L
    full = T - T % L
    for t0 in range(0, full, per_segment):
        yield t0, min(t0 + per_segment, full), L
    if full < T:
        yield full, T, T - full


def _causal_consts(L: int, inclusive: bool, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Constants for the pairwise exponents of an L-token chunk, over (target t, source s).

    - ``span`` [L*L, L]: row (t, s) has ones at the tokens m with s < m < t (s < m <= t if
      ``inclusive``), so ``span @ lw`` sums the log decay *between* s and t;
    - ``mask`` [L, L, 1]: 0 where s < t (s <= t if ``inclusive``), -inf elsewhere.

    Adding ``mask`` is ``torch.where(keep, x, -inf)`` for finite x (``x + 0 == x`` exactly) at half
    the cost on a CPU; ``exp(-inf) == 0`` makes both the value and its gradient exactly zero there.
    (Built per segment, not cached: they are tiny, and a cache would get in torch.compile's way.)
    """
    i = torch.arange(L, device=device)
    t, s, m = i[:, None, None], i[None, :, None], i[None, None, :]
    upto = m <= t if inclusive else m < t
    span = ((s < m) & upto).to(dtype).reshape(L * L, L)
    keep = s[..., 0] <= t[..., 0] if inclusive else s[..., 0] < t[..., 0]
    mask = torch.zeros(L, L, 1, dtype=dtype, device=device).masked_fill(~keep[..., None], float("-inf"))
    return span, mask


def _pairwise_decay(lw: Tensor, inclusive: bool) -> Tensor:
    """Masked pairwise decay of a chunk: ``lw`` [.., L, K] -> ``P`` [.., L(t), L(s), K] with

    ``P[t, s] = exp(sum_{s<m<t} lw_m)`` for s < t (``inclusive``: ``exp(sum_{s<m<=t} lw_m)`` for s <= t),
    and exactly 0 elsewhere.

    The exponent is the sum over the span itself (a product with a constant 0/1 matrix), not the
    difference ``A_t - A_s`` of two prefix sums. Both are <= 0 and cannot overflow, but the
    difference loses digits to the size of the prefix sums under strong decay, and its gradient
    for ``lw`` is a difference of large, nearly equal sums (measured in fp32 with 10x decay: 5e-6
    on wkv6's and 3e-5 on wkv5's decay gradient, against 2e-7 with span sums). With the span sum
    each ``lw_m`` only receives gradient from the pairs around it.
    """
    L = lw.shape[-2]
    span, mask = _causal_consts(L, inclusive, lw.dtype, lw.device)
    exponent = torch.matmul(span, lw).unflatten(-2, (L, L))
    return torch.exp(exponent + mask)


def _span_sums(lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chunk-local sums of log decay ``lw`` [.., L, K] (time on dim -2).

    Returns ``A_exc`` (``sum_{m<t} lw_m``), ``A_inc`` (``sum_{m<=t} lw_m``) and ``tail``
    (``sum_{m>s} lw_m``: the decay from token s to the chunk end), each [.., L, K]. The tail is a
    reversed cumulative sum rather than ``A_inc[-1] - A_inc[s]``, so it is rounded relative to itself.
    """
    A_inc = lw.cumsum(-2)
    A_exc = F.pad(A_inc[..., :-1, :], (0, 0, 1, 0))
    tail = F.pad(lw[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))
    return A_exc, A_inc, tail


def _rowdot(x: Tensor, P: Tensor, *ys: Tensor) -> list[Tensor]:
    """``out[t, s] = sum_k x[t, k] * P[t, s, k] * y[s, k]`` for each ``y``.

    ``x`` [.., L, K], ``P`` [.., L, L, K], each ``y`` [.., L, K] -> [.., L, L]. Elementwise products and
    a sum (on a CPU this beats ``einsum``, which would permute the big tensor); ``x * P`` is shared.
    """
    xP = x[..., :, None, :] * P
    return [(xP * y[..., None, :, :]).sum(-1) for y in ys]


def _heads_first(x: Tensor, cd: torch.dtype) -> Tensor:
    """[B, T, H, N] -> [B, H, T, N] in the compute dtype, contiguous so that chunk views are free."""
    return x.to(cd).transpose(1, 2).contiguous()


def _chunked(x: Tensor, L: int) -> Tensor:
    """[.., T, N] -> [.., T/L, L, N] (T a multiple of L)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // L, L, x.shape[-1])


# ---------------------------------------------------------------------------------------------------
# RWKV-5 / RWKV-6


def _wkv6_segment(r: Tensor, k: Tensor, v: Tensor, lw: Tensor, u: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Whole chunks of v5/v6.

    ``r, k, v`` [B, H, n, L, N]; ``lw`` log decay, broadcastable to that ([1, H, 1, L, N] for v5);
    ``u`` [H, N]; ``S`` [B, H, K, V], the state entering the first chunk. Per chunk, with chunk-local
    ``A_exc_t = sum_{m<t} lw_m`` and ``A_inc_t = A_exc_t + lw_t`` (so ``A_exc_t - A_inc_s`` is the
    decay between s and t, formed as ``sum_{s<m<t} lw_m``):

        y_t = (r_t*exp(A_exc_t))^T S + sum_{s<t} [sum_j r_t[j] k_s[j] exp(A_exc_t[j] - A_inc_s[j])] v_s
              + (r_t . (u*k_t)) v_t
        S'  = exp(A_inc_last) * S + sum_s (exp(A_inc_last - A_inc_s) * k_s) v_s^T

    Returns ``y`` [B, H, n, L, V] and the state after the last chunk.
    """
    B, H, n, _, K = r.shape
    A_exc, A_inc, tail = _span_sums(lw)

    # 1. Within each chunk: attention-like scores (per (t, s) a K-long dot product weighted by the
    # decay between them), with the bonus u on the diagonal: the current token is read undecayed.
    decay = _pairwise_decay(lw, inclusive=False)  # [.., L(t), L(s), K]
    (scores,) = _rowdot(r, decay, k)
    scores = scores + torch.diag_embed((r * u[:, None, None, :] * k).sum(-1))
    y = scores @ v  # [B, H, n, L, V]
    # What each chunk adds to the state, and how much it decays the state that enters it.
    dS = (k * torch.exp(tail)).transpose(-1, -2) @ v  # [B, H, n, K, V]
    g = torch.exp(A_inc[..., -1, :]).expand(B, H, n, K)

    # 2. Across chunks: the state entering each chunk.
    # (unbind, not indexing in the loop: each index would cost a full-size zero gradient in backward)
    entering = []
    for g_c, dS_c in zip(g.unbind(2), dS.unbind(2), strict=True):
        entering.append(S)
        S = g_c[..., None] * S + dS_c
    S_in = torch.stack(entering, 2)  # [B, H, n, K, V]

    # 3. What the entering state contributes: read out through the decay since the chunk start.
    y = y + (r * torch.exp(A_exc)) @ S_in
    return y, S


def _wkv56(r: Tensor, k: Tensor, v: Tensor, lw: Tensor, u: Tensor, state: Tensor, out_dtype) -> tuple[Tensor, Tensor]:
    """Segment loop. ``r, k, v`` [B, H, T, N] in the compute dtype; ``lw`` [B, H, T, N] or [1, H, 1, N]."""
    B, H, T, N = r.shape
    S = state
    ys = []
    for t0, t1, L in _segments(T, CHUNK_LEN, B * H * CHUNK_LEN**2 * N):
        sl = slice(t0, t1)
        if lw.shape[2] == 1:  # v5: one decay for every token, so one chunk's decay serves all chunks
            lw_seg = lw.expand(-1, -1, L, -1)[:, :, None]
        else:
            lw_seg = _chunked(lw[:, :, sl], L)
        y, S = _wkv6_segment(_chunked(r[:, :, sl], L), _chunked(k[:, :, sl], L), _chunked(v[:, :, sl], L), lw_seg, u, S)
        ys.append(y.reshape(B, H, t1 - t0, N))
    y = torch.cat(ys, 2).transpose(1, 2)  # [B, T, H, V]
    return y.to(out_dtype), S


def wkv6_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    """RWKV-6 WKV, chunked.

    ``r, k, v, w`` [B, T, H, N] (``w`` = log decay <= 0), ``u`` [H, N], ``state`` [B, H, K, V].
    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V].
    """
    cd = state_dtype(r.dtype)
    r_, k_, v_, w_ = (_heads_first(x, cd) for x in (r, k, v, w))
    return _wkv56(r_, k_, v_, w_, u.to(cd), state.to(cd), r.dtype)


def wkv5_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    """RWKV-5.2 WKV, chunked: as ``wkv6_chunk`` with ``w`` [H, N] constant over batch and time.

    The decay keeps size-1 batch and chunk dimensions, so the pairwise decay is built once per
    segment and broadcast over sequences and chunks.
    """
    cd = state_dtype(r.dtype)
    r_, k_, v_ = (_heads_first(x, cd) for x in (r, k, v))
    lw = w.to(cd)[None, :, None, :]  # [1, H, 1, N]
    return _wkv56(r_, k_, v_, lw, u.to(cd), state.to(cd), r.dtype)


# ---------------------------------------------------------------------------------------------------
# RWKV-7


def _wkv7_segment(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, Z: Tensor
) -> tuple[Tensor, Tensor]:
    """Whole chunks of v7. ``r, lw, k, v, a, b`` [B, H, n, L, N]; ``Z`` [B, H, K, V] enters the first chunk.

    The step is Z_t = diag(exp(lw_t)) Z_{t-1} + b_t u_t^T + k_t v_t^T with u_t = Z_{t-1}^T a_t, and
    y_t = Z_t^T r_t. With chunk-local G_t = sum_{m<=t} lw_m (G_{-1} = 0) and Z the entering state:

        u_t = Z^T (a_t*exp(G_{t-1})) + sum_{s<t} [(a_t*exp(G_{t-1}-G_s)).b_s] u_s + [(a_t*exp(G_{t-1}-G_s)).k_s] v_s

    a unit-lower-triangular system (I - A_b) U = W Z + A_k V with W = a*exp(G_exc). U is linear in Z:
    U = M Z + U0 with M = (I - A_b)^{-1} W and U0 = (I - A_b)^{-1} A_k V, both independent of Z. Then

        y_t = (r_t*exp(G_t))^T Z + sum_{s<=t} [(r_t*exp(G_t-G_s)).b_s] u_s + [(r_t*exp(G_t-G_s)).k_s] v_s
        Z'  = exp(G_last) * Z + sum_s exp(G_last-G_s) * (b_s u_s^T + k_s v_s^T)

    so only ``U = M Z + U0`` and ``Z'`` need the entering state: two small products per chunk.
    Returns ``y`` [B, H, n, L, V] and the state after the last chunk.
    """
    L, K = r.shape[-2:]
    G_exc, G_inc, tail = _span_sums(lw)

    # 1. Within each chunk.
    decay = _pairwise_decay(lw, inclusive=True)  # exp(G_t - G_s) for s <= t, else 0
    R_b, R_k = _rowdot(r, decay, b, k)  # [B, H, n, L, L], lower triangular with the diagonal
    # exp(G_{t-1} - G_s) for s < t is row t-1 of the same tensor: use it shifted down by one row.
    A_b, A_k = (F.pad(x, (0, 0, 1, 0)) for x in _rowdot(a[..., 1:, :], decay[..., :-1, :, :], b, k))
    # One triangular solve for both parts of U (the diagonal of I - A_b is 1, and is not read).
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    rhs = torch.cat([a * torch.exp(G_exc), A_k @ v], -1)  # [B, H, n, L, K + V]
    MU = torch.linalg.solve_triangular(eye - A_b, rhs, upper=False, unitriangular=True)
    M, U0 = MU[..., :K], MU[..., K:]
    e_tail = torch.exp(tail)  # decay from each token to the chunk end
    be_T = (b * e_tail).transpose(-1, -2)  # [B, H, n, K, L]
    kv = (k * e_tail).transpose(-1, -2) @ v  # [B, H, n, K, V]: the chunk's k v^T share of Z'
    g = torch.exp(G_inc[..., -1, :, None])  # [B, H, n, K, 1]: decay of the whole chunk

    # 2. Across chunks: the removal reads U and the state entering each chunk.
    entering, reads = [], []
    for M_c, U0_c, be_T_c, kv_c, g_c in zip(*(x.unbind(2) for x in (M, U0, be_T, kv, g)), strict=True):
        entering.append(Z)
        U_c = M_c @ Z + U0_c  # [B, H, L, V]
        reads.append(U_c)
        Z = g_c * Z + be_T_c @ U_c + kv_c
    Z_in, U = torch.stack(entering, 2), torch.stack(reads, 2)

    # 3. Outputs: the entering state read through the decay since the chunk start, plus the chunk's
    # own removal and key-value updates.
    y = (r * torch.exp(G_inc)) @ Z_in + R_b @ U + R_k @ v
    return y, Z


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    """RWKV-7 WKV (generalized delta rule), chunked.

    All of ``r, w, k, v, a, b`` [B, T, H, N] (``w`` = log decay <= 0); ``state`` [B, H, K, V].
    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V].
    """
    out_dtype = r.dtype
    cd = state_dtype(out_dtype)
    xs = [_heads_first(x, cd) for x in (r, w, k, v, a, b)]
    Z = state.to(cd)
    B, H, T, N = xs[0].shape
    ys = []
    for t0, t1, L in _segments(T, CHUNK_LEN7, 2 * B * H * CHUNK_LEN7**2 * N):
        y, Z = _wkv7_segment(*(_chunked(x[:, :, t0:t1], L) for x in xs), Z)
        ys.append(y.reshape(B, H, t1 - t0, N))
    y = torch.cat(ys, 2).transpose(1, 2)
    return y.to(out_dtype), Z


# ---------------------------------------------------------------------------------------------------
# RWKV-4


def _wkv4_segment(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, p: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Whole chunks of v4, per channel. ``w, u`` [C]; ``k, v`` [B, n, L, C]; ``a, b, p`` [B, C].

    The state represents numerator ``a*e^p`` and denominator ``b*e^p``. Token t (chunk-local) sees:
    the entering state with exponent ``p + t*w`` (weights a / b), each earlier token s of its chunk
    with ``(t-1-s)*w + k_s`` (weights v_s / 1) and itself with ``u + k_t`` (weights v_t / 1). Sums
    are taken relative to the largest exponent, so every ``exp`` is <= 1.
    """
    L = k.shape[-2]
    pos = torch.arange(L, device=k.device, dtype=k.dtype)

    # 1. Within each chunk. Exponents [B, n, L(t), L(s), C] = table[t, s] + k_s, where the [L, L, C]
    # table holds the decay (t-1-s)*w of earlier tokens, the bonus u of the current one (u + k_t) and
    # -inf for later ones; built once, so the big tensor takes a single pass.
    lag = (pos[:, None] - 1 - pos[None, :])[..., None]  # t - 1 - s
    diag = torch.eye(L, dtype=torch.bool, device=k.device)[..., None]
    table = torch.where(diag, u, lag * w) + _causal_consts(L, True, k.dtype, k.device)[1]
    e_tok = table + k[..., None, :, :]
    # Shifts cancel between numerator and denominator: no gradient needs to flow through them.
    q_tok = e_tok.amax(-2).detach()  # finite: the diagonal is always there
    x_tok = torch.exp(e_tok - q_tok[..., None, :])
    num_tok = (x_tok * v[..., None, :, :]).sum(-2)  # [B, n, L, C], relative to q_tok
    den_tok = x_tok.sum(-2)
    # The chunk's own state (from the zero state): every token decayed to the chunk end, no bonus.
    e_end = (L - 1 - pos)[:, None] * w + k  # [B, n, L, C]
    p_c = e_end.amax(-2)  # part of the returned state: not detached
    x_end = torch.exp(e_end - p_c[..., None, :])
    a_c, b_c = (x_end * v).sum(-2), x_end.sum(-2)

    # 2. Across chunks: merge the decayed entering state with the chunk's own, exactly as the
    # recurrence's running maximum does (p' = max(p + L*w, p_c)).
    entering = []
    for a_cc, b_cc, p_cc in zip(a_c.unbind(1), b_c.unbind(1), p_c.unbind(1), strict=True):
        entering.append((a, b, p))
        p_dec = p + L * w
        p_new = torch.maximum(p_dec, p_cc)
        x_old, x_new = torch.exp(p_dec - p_new), torch.exp(p_cc - p_new)
        a, b, p = x_old * a + x_new * a_cc, x_old * b + x_new * b_cc, p_new
    a_in, b_in, p_in = (torch.stack(s, 1)[:, :, None, :] for s in zip(*entering, strict=True))  # [B, n, 1, C]

    # 3. Outputs: add the entering state's term, everything relative to the larger exponent.
    e_state = p_in + pos[:, None] * w  # [B, n, L, C]
    q = torch.maximum(q_tok, e_state).detach()
    x_t, x_s = torch.exp(q_tok - q), torch.exp(e_state - q)
    y = (num_tok * x_t + a_in * x_s) / (den_tok * x_t + b_in * x_s)
    return y, (a, b, p)


def wkv4_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    """RWKV-4 WKV, chunked.

    ``w`` [C] log decay, ``u`` [C] bonus, ``k, v`` [B, T, C]; ``state`` = ``(a, b, p)`` each [B, C]
    (``p`` may be -1e30 for the zero state). Returns ``y`` [B, T, C] in the input dtype and ``(a, b, p)``.
    """
    out_dtype = k.dtype
    cd = state_dtype(out_dtype)
    a, b, p = (s.to(cd) for s in state)
    w, u, k, v = w.to(cd), u.to(cd), k.to(cd), v.to(cd)
    B, T, C = k.shape
    ys = []
    for t0, t1, L in _segments(T, CHUNK_LEN4, B * CHUNK_LEN4**2 * C):
        n = (t1 - t0) // L
        y, (a, b, p) = _wkv4_segment(w, u, k[:, t0:t1].reshape(B, n, L, C), v[:, t0:t1].reshape(B, n, L, C), a, b, p)
        ys.append(y.reshape(B, t1 - t0, C))
    return torch.cat(ys, 1).to(out_dtype), (a, b, p)
