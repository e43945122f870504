"""Chunked (matrix-form) Triton kernels for wkv6 and wkv5, forward and backward.

Programs walk the chunks of ``CHUNK`` tokens in order, their share of the fp32 [K, V] state in
registers; inside a chunk everything is a few small matrix products (fp32, ieee precision) over
chunk-local log-decay spans (see ``_kernels.wkv6_chunk_fwd_kernel``). For the backward the forward
stores the state entering each chunk (``[B, H, ceil(T / CHUNK), K, V]`` fp32, 1/CHUNK of what a
per-step store would), and ``wkv6_chunk_bwd_kernel`` walks the chunks in reverse carrying the
state gradient. wkv5 is wkv6 with its decay broadcast outside the Function (autograd sums it back).

Heads are split (``blocks``): the forward runs one program per (batch, head, block of value
columns), the backward one per (batch, head, block of keys), and the [L, L, K] pairwise-decay tiles
are built 16 keys at a time, so they stop growing with the head size (16 to 256; see ``BLOCKS``
for the register spill counts behind the choice).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .recurrent import _grad_in, _k, one_wave_columns

CHUNK = 16  # tokens per chunk (the smallest tile tl.dot takes)


class Blocks(NamedTuple):
    bk: int  # keys per [L, L, BK] decay tile, and per backward program
    bv: int  # value columns per forward program
    fwd_warps: int
    bwd_warps: int


# Per head size, the split with the fewest register spills found by compiling both kernels for sm_90
# (Triton 3.9 to PTX, then `ptxas -v`; no GPU needed) over BK, BV in {16, 32, 64, N} and 4/8/16 warps.
# Spilled bytes per thread (stores), forward / backward:
#   whole head, 4 warps (the earlier kernels): N=32 0 / 1496, N=64 2144 / 17184 (the backward left at
#   32 registers: its tiles live in local memory), N=128 (never registered) 41704 / 57664.
#   chosen (below):                            N=16 0 / 0, N=32 0 / 4, N=64 0 / 464, N=128 436 / 1800,
#                                              N=256 972 / 4052.
# What drives it: the backward's [16, 16, BK] fp32 tiles (E, W, G and its scan C: 4096 elements each at
# BK=16, 16 registers per thread per tile with 8 warps) and the [BK, N] rows of S and dS; the forward's
# [N, BV] state share and its [16, 16, BK] tile. Spills are a proxy: time on a GPU decides between
# neighbours (e.g. N=128 BV=16 spills nothing but computes the key-side decay tiles eight times per head).
BLOCKS = {
    16: Blocks(16, 16, 4, 4),
    32: Blocks(16, 32, 4, 8),
    64: Blocks(16, 64, 8, 8),
    128: Blocks(16, 32, 8, 8),
    256: Blocks(16, 16, 8, 8),
}


def blocks(N: int) -> Blocks:
    """How the chunk kernels split a head of size ``N`` (a power of two, 16 to 256; see ``BLOCKS``).

    The forward runs one program per (batch, head, block of ``bv`` value columns): value columns are
    independent, but each program builds the decay tiles of every key, so a split repeats that work.
    The backward runs one per (batch, head, block of ``bk`` keys): key rows are independent except in
    dv, whose per-block shares the wrapper adds. Both build the [L, L, K] decay tiles ``bk`` keys at a
    time: held whole at N=128 they would be 32768 fp32, 256 registers per thread with 4 warps, more
    than a thread has, so a whole-head kernel could only run out of local memory.
    """
    return BLOCKS[N]


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
        bl = blocks(N)
        # Narrower value blocks while the programs still fit one per SM (see recurrent.one_wave_columns).
        bv = one_wave_columns(bl.bv, B * H * (N // bl.bv), r.device)
        _k().wkv6_chunk_fwd_kernel[(B * H, N // bv)](r, k, v, w, u, s0, y, sT, sc, T, H=H, N=N, L=CHUNK,
                                                     BK=bl.bk, BV=bv, SAVE=save, num_warps=bl.fwd_warps)
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
        bl = blocks(N)
        dr, dk, dw = (torch.empty(B, T, H, N, **f32) for _ in range(3))
        dvp = torch.empty(N // bl.bk, B, T, H, N, **f32)  # each key block's share of dv
        du = torch.empty(B, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32)
        _k().wkv6_chunk_bwd_kernel[(B * H, N // bl.bk)](r, k, v, w, u, sc, dy, dsT, dr, dk, dvp, dw, du, ds0, T,
                                                        H=H, N=N, L=CHUNK, BK=bl.bk, num_warps=bl.bwd_warps)
        dv = dvp[0] if dvp.shape[0] == 1 else dvp.sum(0)
        return dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), du.sum(0).to(u.dtype), ds0


def wkv6_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _WKV6Chunk.apply(r, k, v, w, u, state)


def wkv5_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    B, T = r.shape[:2]
    return _WKV6Chunk.apply(r, k, v, w.expand(B, T, *w.shape), u, state)
