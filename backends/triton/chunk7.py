"""Chunked (matrix-form) Triton kernel for wkv7, forward and backward (``_kernels7.py``).

One program per (batch, head, block of value columns: ``_bv``) walks the chunks of ``CHUNK`` tokens in
order with its columns of the fp32 [K, V] state in registers; within a chunk the removal reads
u_t = S_{t-1}^T a_t come from one small triangular solve, and everything else is a few matrix products
over chunk-local log-decay spans (every exponent <= 0: no overflow however strong the decay); value
columns are independent, so a block needs only its own columns of v and of the state. For the
backward the forward stores the state entering each chunk (``[B, H, ceil(T / CHUNK), K, V]`` fp32),
and the backward kernel walks the chunks in reverse carrying the state gradient, recomputing each
chunk's tiles from its entering state.

The [L, L, K] pairwise-decay tiles are built ``BK`` channels at a time in a (not unrolled) loop.
Compiled for sm_90 (``python -m rwkv_zoo.backends.triton.aot``), bf16, per thread: N=64 whole head,
forward 40 B of spills and 25 KiB of shared memory, backward 1.9 KiB and 52 KiB; N=64 in blocks of 16
value columns, 0 and 0.5 KiB; N=128 in blocks of 16, 0 and 1.1 KiB. Whole-head tiles, as first
written, needed 109 / 155 KiB of shared memory (fp32 backward: 170 KiB, more than an sm_80 block may
have) and spilled 0.1 / 3.4 KiB (sm_80: 14.7 KiB); an unrolled key loop doubled the shared memory again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .recurrent import _c, _grad_in, one_wave_columns

CHUNK = 16  # tokens per chunk: the smallest tile tl.dot takes, and [L, L, BK] decay tiles stay small
BK = 16  # channels per [L, L, BK] decay tile (4096 fp32: 16 registers a thread with 8 warps)
# Value columns per program (a power of two, 16 to N); None: chosen per call by ``_bv``.
BV: int | None = None
# The most value columns a program takes, per head size: N=128 whole or in halves would spill 2-19 KiB
# per thread in the backward (sm_80/90), in blocks of 16 ~1.3 KiB, as N=64 does whole.
MAX_BV = {16: 16, 32: 32, 64: 64, 128: 16}


def _warps(N: int) -> int:
    return 8 if N >= 64 else 4


def _bv(N: int, programs: int, device: torch.device) -> int:
    """Value columns per program. Splitting a head multiplies the programs by N / BV and shrinks each
    one's share of the state (sm_90, N=64, bf16: backward spills 1.9 KiB per thread whole, 0.5 KiB at
    BV=16; forward 40 B and 0), but every program repeats the key-side work of each chunk (the [L, L]
    products and the solve), and the backward writes each block's share of the key-side gradients for
    the wrapper to add. So heads are split only while the programs still fit in one wave, one per SM:
    then the repeated work runs on SMs that would otherwise idle and each program finishes sooner.
    """
    if BV is not None:
        return min(BV, N)
    return one_wave_columns(MAX_BV[N], programs * (N // MAX_BV[N]), device)


def _k7():
    from . import _kernels7  # imports triton: only when a kernel runs

    return _kernels7


class _WKV7Chunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        r, w, k, v, a, b = (_c(x) for x in (r, w, k, v, a, b))
        s0 = _c(s0.float())
        save = any(ctx.needs_input_grad)
        nc = -(-T // CHUNK)
        y = torch.empty_like(r)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        sc = (torch.empty(B, H, nc, N, N, device=r.device, dtype=torch.float32) if save
              else torch.empty(1, device=r.device, dtype=torch.float32))
        bv = _bv(N, B * H, r.device)
        _k7().wkv7_chunk_fwd_kernel[(B * H, N // bv)](r, w, k, v, a, b, s0, y, sT, sc, T, H=H, N=N, L=CHUNK,
                                                      BK=min(BK, N), BV=bv, SAVE=save, num_warps=_warps(N))
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, sc)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, sc = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = _grad_in(dy, r)
        dsT = _grad_in(dsT, sc[:, :, 0]).float()
        f32 = dict(device=r.device, dtype=torch.float32)
        bv = _bv(N, B * H, r.device)
        # Each value block's share of the key-side gradients (one share: no sum).
        dr, dw, dk, da, db = (torch.empty(N // bv, B, T, H, N, **f32) for _ in range(5))
        dv = torch.empty(B, T, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32)
        _k7().wkv7_chunk_bwd_kernel[(B * H, N // bv)](r, w, k, v, a, b, sc, dy, dsT, dr, dw, dk, dv, da, db, ds0,
                                                      T, H=H, N=N, L=CHUNK, BK=min(BK, N), BV=bv,
                                                      num_warps=_warps(N))
        dr, dw, dk, da, db = (x[0] if x.shape[0] == 1 else x.sum(0) for x in (dr, dw, dk, da, db))
        return (dr.to(r.dtype), dw.to(w.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype),
                db.to(b.dtype), ds0)


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    """RWKV-7 WKV, chunked: ``r, w, k, v, a, b`` [B, T, H, N] (``w`` log decay <= 0), ``state`` [B, H, K, V].

    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V] in fp32.
    """
    return _WKV7Chunk.apply(r, w, k, v, a, b, state)
