"""Chunked WKV kernels in plain PyTorch matrix form: exact to rounding, the fast default on a CPU.

The sequence is cut into chunks of ``CHUNK_LEN`` tokens (``CHUNK_LEN7`` for v7; the last chunk may be
shorter). Chunks run one after another, carrying the state; everything inside a chunk is a handful of
batched tensor ops, so there is no Python loop over time.

Numerics. The decay enters in log space. A product of decays over a span of tokens is ``exp`` of a sum
of log decays, and that sum is always formed for the span itself, never as a difference of two
prefix sums that are each large:

- prefix sums from the chunk start (``A_exc``, ``A_inc``) and suffix sums to the chunk end are
  cumulative sums of the span they describe;
- the pairwise exponents ``D[t, s] = sum_{s < m < t} lw_m`` (shape ``[.., L, L, K]``) are a masked
  cumulative sum per source token ``s``, so a strongly decayed channel early in the chunk cannot cost
  digits later in it;
- entries outside the causal mask get ``-inf`` in the exponent (``torch.where`` before ``exp``), so
  nothing overflows and gradients there are exactly zero. ``exp(A_t - A_s)`` is never factored into
  ``exp(A_t) * exp(-A_s)``, which overflows for strong decay.

Dtypes and conventions are those of the recurrent kernels (``recurrent.py``): arithmetic in fp64 for
fp64 inputs, else fp32; ``y`` in the input dtype; the state in fp32 (fp64). Autograd runs through
every input, the initial state included.

Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``N`` head size (K = V = N), ``C`` channels, ``L`` chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_zoo.ops import state_dtype

# Tokens per chunk. The pairwise decay tensor is [B, H, L, L, K]: 32 keeps it in cache-sized pieces
# on a CPU while the per-chunk Python overhead stays small next to the tensor work.
CHUNK_LEN = 32
# v7 solves a unit-lower-triangular L x L system per chunk and builds two pairwise tensors; 16 is
# cheaper and keeps the triangular solve well conditioned.
CHUNK_LEN7 = 16

__all__ = ["CHUNK_LEN", "CHUNK_LEN7", "wkv4_chunk", "wkv5_chunk", "wkv6_chunk", "wkv7_chunk"]


# ---------------------------------------------------------------------------------------------------
# Log-decay bookkeeping shared by v5, v6 and v7


def _causal_masks(L: int, device) -> tuple[Tensor, Tensor]:
    """``(strict, inclusive)`` [L, L, 1] boolean masks over (target t, source s): s < t and s <= t."""
    t = torch.arange(L, device=device)
    strict = (t[:, None] > t[None, :])[..., None]
    inclusive = (t[:, None] >= t[None, :])[..., None]
    return strict, inclusive


def _span_sums(lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk sums of log decay ``lw`` [.., L, K] (time on dim -2).

    Returns ``A_exc`` (``sum_{m<t} lw_m``), ``A_inc`` (``sum_{m<=t} lw_m``), each [.., L, K], and
    ``tail`` [.., L, K] (``sum_{m>s} lw_m``: the decay from token ``s`` to the chunk end). ``A_inc[-1]``
    is the decay of the whole chunk.
    """
    A_inc = lw.cumsum(-2)
    A_exc = F.pad(A_inc[..., :-1, :], (0, 0, 1, 0))
    # A reversed cumulative sum, not A_inc[-1] - A_inc[s], so its rounding is relative to itself.
    tail = F.pad(lw[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))
    return A_exc, A_inc, tail


def _pairwise_inclusive(lw: Tensor) -> Tensor:
    """``C[t, s] = sum_{s < m <= t} lw_m`` as [.., L(t), L(s), K]; meaningful where s <= t.

    One cumulative sum over t per source column s, so each entry is rounded relative to its own
    (small) span rather than to the chunk's whole decay.
    """
    L = lw.shape[-2]
    t = torch.arange(L, device=lw.device)
    after = (t[:, None] > t[None, :])[..., None]  # [L(m), L(s), 1]: token m lies after source s
    return torch.where(after, lw[..., :, None, :], 0.0).cumsum(-3)


def _shift_down(C: Tensor) -> Tensor:
    """``C[t-1, s]`` at row t (row 0 gets zeros): turns ``sum_{s<m<=t}`` into ``sum_{s<m<t}``."""
    return F.pad(C[..., :-1, :, :], (0, 0, 0, 0, 1, 0))


def _masked_exp(exponent: Tensor, mask: Tensor) -> Tensor:
    """``exp(exponent)`` where ``mask``, exactly 0 elsewhere (with zero gradient, never inf/NaN)."""
    return torch.exp(torch.where(mask, exponent, float("-inf")))


def _heads_first(x: Tensor, cd: torch.dtype) -> Tensor:
    """[B, T, H, N] -> [B, H, T, N] in the compute dtype, contiguous so chunk slices are cheap."""
    return x.to(cd).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------
# RWKV-5 / RWKV-6


def _wkv6_one_chunk(r: Tensor, k: Tensor, v: Tensor, lw: Tensor, u: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of v5/v6. ``r, k, v`` [B, H, L, N]; ``lw`` [B or 1, H, L, N]; ``u`` [H, N]; ``S`` [B, H, K, V].

    y_t = (r_t*exp(A_exc_t))^T S + sum_{s<t} [sum_j r_t[j] k_s[j] exp(D[t,s,j])] v_s + (r_t.(u*k_t)) v_t
    S' = exp(A_inc_last) * S + sum_s (exp(tail_s) * k_s) v_s^T,   with D[t, s] = sum_{s<m<t} lw_m.
    """
    L = r.shape[-2]
    strict, _ = _causal_masks(L, r.device)
    A_exc, A_inc, tail = _span_sums(lw)
    decay = _masked_exp(_shift_down(_pairwise_inclusive(lw)), strict)  # [B|1, H, L, L, K]
    # Attention-like scores: per (t, s) a K-long dot product weighted by the pairwise decay.
    scores = torch.einsum("bhtsk,bhsk->bhts", r[..., :, None, :] * decay, k)
    # The current token reads its own k v^T through the bonus u instead of a decay (the diagonal).
    bonus = torch.einsum("bhtk,hk,bhtk->bht", r, u, k)
    scores = scores + torch.diag_embed(bonus)
    y = (r * torch.exp(A_exc)) @ S + scores @ v
    S = torch.exp(A_inc[..., -1, :, None]) * S + (k * torch.exp(tail)).transpose(-1, -2) @ v
    return y, S


def _wkv56_chunked(r: Tensor, k: Tensor, v: Tensor, lw: Tensor, u: Tensor, state: Tensor):
    """Shared chunk loop. ``lw`` is [B, H, T, N] (v6) or [1, H, T, N] (v5: shared over the batch)."""
    out_dtype = r.dtype
    cd = state_dtype(out_dtype)
    r, k, v = (_heads_first(x, cd) for x in (r, k, v))
    u, S = u.to(cd), state.to(cd)
    T = r.shape[2]
    ys = []
    for t0 in range(0, T, CHUNK_LEN):
        sl = slice(t0, t0 + CHUNK_LEN)
        y, S = _wkv6_one_chunk(r[:, :, sl], k[:, :, sl], v[:, :, sl], lw[:, :, sl], u, S)
        ys.append(y)
    y = torch.cat(ys, 2).transpose(1, 2)  # [B, T, H, V]
    return y.to(out_dtype), S


def wkv6_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    """RWKV-6 WKV, chunked.

    ``r, k, v, w`` [B, T, H, N] (``w`` = log decay <= 0), ``u`` [H, N], ``state`` [B, H, K, V].
    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V].
    """
    cd = state_dtype(r.dtype)
    return _wkv56_chunked(r, k, v, _heads_first(w, cd), u, state)


def wkv5_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    """RWKV-5.2 WKV, chunked: as ``wkv6_chunk`` with ``w`` [H, N] constant over batch and time.

    The decay is kept with a batch dimension of 1, so the pairwise decay tensor is built once per
    chunk for all sequences and broadcast.
    """
    cd = state_dtype(r.dtype)
    T = r.shape[1]
    lw = w.to(cd)[None, :, None, :].expand(1, -1, T, -1)  # [1, H, T, N]
    return _wkv56_chunked(r, k, v, lw, u, state)


# ---------------------------------------------------------------------------------------------------
# RWKV-7


def _wkv7_one_chunk(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, Z: Tensor
) -> tuple[Tensor, Tensor]:
    """One chunk of v7. All of ``r, lw, k, v, a, b`` [B, H, L, N]; ``Z`` [B, H, K, V].

    The step is Z_t = diag(exp(lw_t)) Z_{t-1} + b_t u_t^T + k_t v_t^T with u_t = Z_{t-1}^T a_t, y_t = Z_t^T r_t.
    Unrolled with G_t = sum_{m<=t} lw_m (so G_{t-1} = A_exc_t):
      u_t = Z^T (a_t*exp(G_{t-1})) + sum_{s<t} [(a_t*exp(G_{t-1}-G_s)).b_s] u_s + [(a_t*exp(G_{t-1}-G_s)).k_s] v_s
    which is a unit-lower-triangular system for U = [u_0 .. u_{L-1}]; then
      y_t = (r_t*exp(G_t))^T Z + sum_{s<=t} [(r_t*exp(G_t-G_s)).b_s] u_s + [(r_t*exp(G_t-G_s)).k_s] v_s
      Z'  = exp(G_last) * Z + sum_s exp(G_last-G_s) * (b_s u_s^T + k_s v_s^T).
    """
    L = r.shape[-2]
    strict, inclusive = _causal_masks(L, r.device)
    G_exc, G_inc, tail = _span_sums(lw)
    C = _pairwise_inclusive(lw)  # C[t, s] = G_t - G_s, formed as a span sum
    decay_inc = _masked_exp(C, inclusive)  # exp(G_t - G_s), s <= t
    decay_exc = _masked_exp(_shift_down(C), strict)  # exp(G_{t-1} - G_s), s < t

    # Solve for the "removal" reads u_t = Z_{t-1}^T a_t of the whole chunk at once.
    a_dec = a[..., :, None, :] * decay_exc  # [B, H, L, L, K]
    A_b = torch.einsum("bhtsk,bhsk->bhts", a_dec, b)
    A_k = torch.einsum("bhtsk,bhsk->bhts", a_dec, k)
    rhs = (a * torch.exp(G_exc)) @ Z + A_k @ v  # [B, H, L, V]
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    U = torch.linalg.solve_triangular(eye - A_b, rhs, upper=False, unitriangular=True)

    # Read out after each update (no bonus in v7).
    r_dec = r[..., :, None, :] * decay_inc
    R_b = torch.einsum("bhtsk,bhsk->bhts", r_dec, b)
    R_k = torch.einsum("bhtsk,bhsk->bhts", r_dec, k)
    y = (r * torch.exp(G_inc)) @ Z + R_b @ U + R_k @ v

    # Carry the state to the chunk end: each token's rank-2 update decays by the rest of the chunk.
    e = torch.exp(tail)  # [B, H, L, K]
    Z = torch.exp(G_inc[..., -1, :, None]) * Z + (b * e).transpose(-1, -2) @ U + (k * e).transpose(-1, -2) @ v
    return y, Z


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    """RWKV-7 WKV (generalized delta rule), chunked.

    All of ``r, w, k, v, a, b`` [B, T, H, N] (``w`` = log decay <= 0); ``state`` [B, H, K, V].
    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V].
    """
    out_dtype = r.dtype
    cd = state_dtype(out_dtype)
    r, w, k, v, a, b = (_heads_first(x, cd) for x in (r, w, k, v, a, b))
    Z = state.to(cd)
    T = r.shape[2]
    ys = []
    for t0 in range(0, T, CHUNK_LEN7):
        sl = slice(t0, t0 + CHUNK_LEN7)
        y, Z = _wkv7_one_chunk(r[:, :, sl], w[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], b[:, :, sl], Z)
        ys.append(y)
    y = torch.cat(ys, 2).transpose(1, 2)
    return y.to(out_dtype), Z


# ---------------------------------------------------------------------------------------------------
# RWKV-4


def _wkv4_one_chunk(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, p: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One chunk of v4, per channel. ``w, u`` [C]; ``k, v`` [B, L, C]; ``a, b, p`` [B, C].

    The state represents numerator ``a*e^p`` and denominator ``b*e^p``. Token t (chunk-local) sees:
    the initial state with exponent ``p + t*w`` (weights a / b), each earlier token s with
    ``(t-1-s)*w + k_s`` (weights v_s / 1) and itself with ``u + k_t`` (weights v_t / 1). Both sums are
    taken relative to the largest exponent so that every ``exp`` is <= 1.
    """
    L = k.shape[1]
    pos = torch.arange(L, device=k.device, dtype=k.dtype)
    strict, _ = _causal_masks(L, k.device)  # [L, L, 1]
    diag = torch.eye(L, dtype=torch.bool, device=k.device)[..., None]

    # Exponents of the output, [B, L(t), L(s), C]: past tokens decay, the current one gets the bonus.
    lag = (pos[:, None] - 1 - pos[None, :])[..., None]  # t - 1 - s
    e_tok = torch.where(diag, (u + k)[:, :, None, :], lag * w + k[:, None, :, :])
    e_tok = torch.where(strict | diag, e_tok, float("-inf"))
    e_state = p[:, None, :] + pos[:, None] * w  # [B, L, C]
    # The shift cancels between numerator and denominator: no gradient needs to flow through it.
    q = torch.maximum(e_tok.amax(2), e_state).detach()
    x_tok = torch.exp(e_tok - q[:, :, None, :])
    x_state = torch.exp(e_state - q)
    num = torch.einsum("btsc,bsc->btc", x_tok, v) + x_state * a[:, None, :]
    den = x_tok.sum(2) + x_state * b[:, None, :]
    y = num / den

    # New state after L steps: every token decays to the chunk end without the bonus, and p is the
    # largest exponent (what the recurrence's running maximum computes), part of the returned state.
    e_tok_end = (L - 1 - pos)[:, None] * w + k  # [B, L, C]
    e_state_end = p + L * w  # [B, C]
    p_new = torch.maximum(e_tok_end.amax(1), e_state_end)
    x_tok_end = torch.exp(e_tok_end - p_new[:, None, :])
    x_state_end = torch.exp(e_state_end - p_new)
    a_new = (x_tok_end * v).sum(1) + x_state_end * a
    b_new = x_tok_end.sum(1) + x_state_end * b
    return y, (a_new, b_new, p_new)


def wkv4_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    """RWKV-4 WKV, chunked.

    ``w`` [C] log decay, ``u`` [C] bonus, ``k, v`` [B, T, C]; ``state`` = ``(a, b, p)`` each [B, C]
    (``p`` may be -1e30 for the zero state). Returns ``y`` [B, T, C] in the input dtype and ``(a, b, p)``.
    """
    out_dtype = k.dtype
    cd = state_dtype(out_dtype)
    a, b, p = (s.to(cd) for s in state)
    w, u, k, v = w.to(cd), u.to(cd), k.to(cd), v.to(cd)
    T = k.shape[1]
    ys = []
    for t0 in range(0, T, CHUNK_LEN):
        sl = slice(t0, t0 + CHUNK_LEN)
        y, (a, b, p) = _wkv4_one_chunk(w, u, k[:, sl], v[:, sl], a, b, p)
        ys.append(y)
    return torch.cat(ys, 1).to(out_dtype), (a, b, p)
