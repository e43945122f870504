"""Chunked (matrix-form) Triton kernels for wkv6 and wkv5, forward and backward.

One program per (batch, head) walks the chunks of ``CHUNK`` tokens in order, the fp32 [K, V] state in
registers; inside a chunk everything is a few small matrix products (fp32, ieee precision) over
chunk-local log-decay spans (see ``_kernels.wkv6_chunk_fwd_kernel``). For the backward the forward
stores the state entering each chunk (``[B, H, ceil(T / CHUNK), K, V]`` fp32, 1/CHUNK of what the
recurrent kernels store), and ``wkv6_chunk_bwd_kernel`` walks the chunks in reverse carrying the
state gradient. wkv5 is wkv6 with its decay broadcast outside the Function (autograd sums it back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .recurrent import _grad_in, _k

CHUNK = 16  # tokens per chunk (the smallest tile tl.dot takes)


class _WKV6Chunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, s0):
        B, T, H, N = r.shape
        r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
        s0 = s0.float().contiguous()
        save = any(ctx.needs_input_grad)
        nc = -(-T // CHUNK)
        y = torch.empty_like(r)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        sc = (torch.empty(B, H, nc, N, N, device=r.device, dtype=torch.float32) if save
              else torch.empty(1, device=r.device, dtype=torch.float32))
        _k().wkv6_chunk_fwd_kernel[(B * H,)](r, k, v, w, u, s0, y, sT, sc, T, H=H, N=N, L=CHUNK, SAVE=save)
        if save:
            ctx.save_for_backward(r, k, v, w, u, sc)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, k, v, w, u, sc = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = _grad_in(dy, r)
        dsT = _grad_in(dsT, sc[:, :, 0]).float()
        f32 = dict(device=r.device, dtype=torch.float32)
        dr, dk, dv, dw = (torch.empty(B, T, H, N, **f32) for _ in range(4))
        du = torch.empty(B, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32)
        _k().wkv6_chunk_bwd_kernel[(B * H,)](r, k, v, w, u, sc, dy, dsT, dr, dk, dv, dw, du, ds0, T,
                                             H=H, N=N, L=CHUNK)
        return dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), du.sum(0).to(u.dtype), ds0


def wkv6_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _WKV6Chunk.apply(r, k, v, w, u, state)


def wkv5_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    B, T = r.shape[:2]
    return _WKV6Chunk.apply(r, k, v, w.expand(B, T, *w.shape), u, state)
