"""``torch.autograd.Function`` wrappers around the recurrent Triton kernels (``_kernels.py``).

Each wrapper makes its inputs contiguous, runs the forward kernel (storing, only when some input needs
a gradient, the state entering every ``CKPT``-th step for wkv5-7, or every step's state for wkv4), and
in ``backward`` runs the reverse-time kernel (wkv5-7 recompute each block of ``CKPT`` states from its
checkpoint into a small per-program scratch). Gradients come out of the kernels in fp32 and go back in
each input's own dtype; the gradients of the parameters shared across the batch (wkv6's ``u``, wkv4's
``w`` and ``u``) are written per batch row (and head) by the kernel and summed here. wkv5 is wkv6 with
its constant decay broadcast over (B, T) outside the Function, so autograd sums its gradient back.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK4 = 64  # wkv4 channels per program
# wkv5-7 backward: one stored state per CKPT steps, and a per-program scratch of CKPT recomputed states.
# Memory per head is (T / CKPT + CKPT) * K * V fp32, smallest near CKPT = sqrt(T); 16 keeps the scratch
# (16 KiB per state at N=64, 256 KiB per program) small enough to stay in a GPU's L2 cache, where it is
# written and read right back, while already cutting the stored states 16-fold.
CKPT = 16


def _warps(N: int, backward: bool) -> int:
    """Warps per program for the wkv5-7 kernels: enough that the [K, V] tensors fit in registers.

    From compiling for sm_90 (Triton to PTX, ``ptxas -v``; no GPU needed), bytes spilled per thread:
    the N=64 backward spills 156 (wkv6) / 84 (wkv7) with 4 warps and nothing with 8 (the forward
    spills nothing with 4); N <= 32 spills nothing with 4; at N=128 (a 16384-element state) 8 warps
    spill least overall (backward 2744 / 2128; 16 warps: 1644 / 3028).
    """
    most = 32 if backward else 64  # the largest head size that fits with 4 warps
    return 8 if most < N else 4


def _k():
    from . import _kernels  # imports triton: only when a kernel runs

    return _kernels


def _c(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _grad_in(g: Tensor | None, like: Tensor) -> Tensor:
    """An upstream gradient as a contiguous tensor shaped like ``like`` (zeros when autograd gave None)."""
    return torch.zeros_like(like) if g is None else _c(g)


def one_wave_columns(widest: int, programs: int, device: torch.device) -> int:
    """Value columns per program: ``widest`` halved (down to 16, tl.dot's smallest tile) while the
    programs, ``programs`` at ``widest``, would still run in one wave of one program per SM of
    ``device`` (no split off a GPU)."""
    if device.type != "cuda":
        return widest
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bv = widest
    while bv // 2 >= 16 and programs * (widest // (bv // 2)) <= sms:
        bv //= 2
    return bv


def _checkpoints(B: int, H: int, T: int, N: int, device, save: bool) -> Tensor:
    """The forward's checkpoint buffer: the state entering every CKPT-th step, [B, H, ceil(T / CKPT), K, V]."""
    shape = (B, H, -(-T // CKPT), N, N) if save else (1,)
    return torch.empty(shape, device=device, dtype=torch.float32)


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, s0):
        B, T, H, N = r.shape
        r, k, v, w, u, s0 = (_c(x) for x in (r, k, v, w, u, s0))
        s0 = s0.float()
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(r)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        ck = _checkpoints(B, H, T, N, r.device, save)
        _k().wkv6_fwd_kernel[(B * H,)](r, k, v, w, u, s0, y, sT, ck, T, H=H, N=N, CK=CKPT, SAVE=save,
                                       num_warps=_warps(N, False))
        if save:
            ctx.save_for_backward(r, k, v, w, u, ck)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, k, v, w, u, ck = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = _grad_in(dy, r)
        dsT = _grad_in(dsT, ck[:, :, 0]).float()
        scr = torch.empty(B, H, CKPT, N, N, device=r.device, dtype=torch.float32)
        f32 = dict(device=r.device, dtype=torch.float32)
        dr, dk, dv, dw = (torch.empty(B, T, H, N, **f32) for _ in range(4))
        du = torch.empty(B, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32)
        _k().wkv6_bwd_kernel[(B * H,)](r, k, v, w, u, ck, scr, dy, dsT, dr, dk, dv, dw, du, ds0, T,
                                       H=H, N=N, CK=CKPT, num_warps=_warps(N, True))
        return dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), du.sum(0).to(u.dtype), ds0


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        r, w, k, v, a, b, s0 = (_c(x) for x in (r, w, k, v, a, b, s0))
        s0 = s0.float()
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(r)
        sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        ck = _checkpoints(B, H, T, N, r.device, save)
        _k().wkv7_fwd_kernel[(B * H,)](r, w, k, v, a, b, s0, y, sT, ck, T, H=H, N=N, CK=CKPT, SAVE=save,
                                       num_warps=_warps(N, False))
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, ck)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ck = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = _grad_in(dy, r)
        dsT = _grad_in(dsT, ck[:, :, 0]).float()
        scr = torch.empty(B, H, CKPT, N, N, device=r.device, dtype=torch.float32)
        f32 = dict(device=r.device, dtype=torch.float32)
        dr, dw, dk, dv, da, db = (torch.empty(B, T, H, N, **f32) for _ in range(6))
        ds0 = torch.empty(B, H, N, N, **f32)
        _k().wkv7_bwd_kernel[(B * H,)](r, w, k, v, a, b, ck, scr, dy, dsT, dr, dw, dk, dv, da, db, ds0, T,
                                       H=H, N=N, CK=CKPT, num_warps=_warps(N, True))
        return (dr.to(r.dtype), dw.to(w.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype),
                db.to(b.dtype), ds0)


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, a0, b0, p0):
        B, T, C = k.shape
        w, u, k, v = (_c(x) for x in (w, u, k, v))
        a0, b0, p0 = (_c(x.float()) for x in (a0, b0, p0))
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(k)
        aT, bT, pT = (torch.empty(B, C, device=k.device, dtype=torch.float32) for _ in range(3))
        shape = (B, T, C) if save else (1,)
        sa, sb, sp = (torch.empty(shape, device=k.device, dtype=torch.float32) for _ in range(3))
        grid = (B, triton_cdiv(C, BLOCK4))
        _k().wkv4_fwd_kernel[grid](w, u, k, v, a0, b0, p0, y, aT, bT, pT, sa, sb, sp, T, C,
                                   BLOCK=BLOCK4, SAVE=save)
        if save:
            ctx.save_for_backward(w, u, k, v, sa, sb, sp)
        return y, aT, bT, pT

    @staticmethod
    def backward(ctx, dy, daT, dbT, dpT):
        w, u, k, v, sa, sb, sp = ctx.saved_tensors
        B, T, C = k.shape
        like = sa[:, 0]
        dy = _grad_in(dy, k)
        daT, dbT, dpT = (_grad_in(g, like).float() for g in (daT, dbT, dpT))
        f32 = dict(device=k.device, dtype=torch.float32)
        dk, dv = (torch.empty(B, T, C, **f32) for _ in range(2))
        dw, du, da0, db0, dp0 = (torch.empty(B, C, **f32) for _ in range(5))
        grid = (B, triton_cdiv(C, BLOCK4))
        _k().wkv4_bwd_kernel[grid](w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT, dk, dv, dw, du, da0, db0, dp0,
                                   T, C, BLOCK=BLOCK4)
        return dw.sum(0).to(w.dtype), du.sum(0).to(u.dtype), dk.to(k.dtype), dv.to(v.dtype), da0, db0, dp0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wkv6_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _WKV6.apply(r, k, v, w, u, state)


def wkv5_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    B, T = r.shape[:2]
    return _WKV6.apply(r, k, v, w.expand(B, T, *w.shape), u, state)


def wkv7_recurrent(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    return _WKV7.apply(r, w, k, v, a, b, state)


def wkv4_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    y, a, b, p = _WKV4.apply(w, u, k, v, *state)
    return y, (a, b, p)
