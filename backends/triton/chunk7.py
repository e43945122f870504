"""Chunked (matrix-form) Triton kernel for wkv7, forward and backward (``_kernels7.py``).

One program per (batch, head) walks the chunks of ``CHUNK`` tokens in order with the fp32 [K, V] state
in registers; within a chunk the removal reads u_t = S_{t-1}^T a_t come from one small triangular
solve, and everything else is a few matrix products over chunk-local log-decay spans (every exponent
<= 0: no overflow however strong the decay). For the backward the forward stores the state entering
each chunk (``[B, H, ceil(T / CHUNK), K, V]`` fp32), and the backward kernel walks the chunks in
reverse carrying the state gradient, recomputing each chunk's tiles from its entering state.

The [L, L, K] pairwise-decay tiles are built ``BK`` channels at a time in a (not unrolled) loop.
Compiled for sm_90 (``python -m rwkv_zoo.backends.triton.aot``), N=64, bf16: forward 255 registers,
24 bytes of spills, 25 KiB of shared memory; backward 1.9 KiB of spills, 52 KiB. Whole-head tiles, as
first written, needed 109 / 155 KiB (fp32 backward: 170 KiB, more than an sm_80 block may have) and
spilled 0.1 / 3.4 KiB (sm_80: 14.7 KiB); an unrolled key loop doubled the shared memory again.
Head sizes stop at 64: at N=128 the backward would spill ~18 KiB per thread (two [128, 128] fp32
states per program), so dispatch runs such calls on the recurrent kernel, and says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .recurrent import _c, _grad_in

CHUNK = 16  # tokens per chunk: the smallest tile tl.dot takes, and [L, L, BK] decay tiles stay small
BK = 16  # channels per [L, L, BK] decay tile (4096 fp32: 16 registers a thread with 8 warps)


def _warps(N: int) -> int:
    return 8 if N >= 64 else 4


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
        _k7().wkv7_chunk_fwd_kernel[(B * H,)](r, w, k, v, a, b, s0, y, sT, sc, T, H=H, N=N, L=CHUNK,
                                              BK=min(BK, N), SAVE=save, num_warps=_warps(N))
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
        dr, dw, dk, dv, da, db = (torch.empty(B, T, H, N, **f32) for _ in range(6))
        ds0 = torch.empty(B, H, N, N, **f32)
        _k7().wkv7_chunk_bwd_kernel[(B * H,)](r, w, k, v, a, b, sc, dy, dsT, dr, dw, dk, dv, da, db, ds0, T,
                                              H=H, N=N, L=CHUNK, BK=min(BK, N), num_warps=_warps(N))
        return (dr.to(r.dtype), dw.to(w.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype),
                db.to(b.dtype), ds0)


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    """RWKV-7 WKV, chunked: ``r, w, k, v, a, b`` [B, T, H, N] (``w`` log decay <= 0), ``state`` [B, H, K, V].

    Returns ``y`` [B, T, H, N] in the input dtype and the final state [B, H, K, V] in fp32.
    """
    return _WKV7Chunk.apply(r, w, k, v, a, b, state)
