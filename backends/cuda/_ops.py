"""The CUDA kernels as ``torch.library`` custom ops, with autograd and fake (meta) implementations.

Ops (namespace ``rwkv_zoo_cuda``): ``wkv4_fwd``/``wkv4_bwd``, ``wkv6_fwd``/``wkv6_bwd`` (wkv5 is
wkv6 with the decay's batch and time strides 0), ``wkv7_fwd``/``wkv7_bwd`` and
``wkv7_chunk_fwd``/``wkv7_chunk_bwd``. The forward ops return what the backward needs besides the
inputs (wkv4: the state entering each step; wkv7: ``a^T S`` per step and state checkpoints; chunk:
the state entering each chunk), empty when no gradient is needed. ``register_autograd`` wires each
forward to its backward op, and ``register_fake`` gives shapes to ``torch.compile`` without running
anything, so a compiled model traces through them.

On CUDA tensors the ops call the compiled extension; on CPU tensors they call the CPU emulator of the
same kernels (``emulate.py``), which is how the glue here is tested without a GPU. Importing this
module defines the ops; it is imported on the first kernel call, never at plugin load.

Kernel inputs: activations contiguous in one dtype (fp32, bf16 or fp16), decay ``w`` and bonus ``u``
and states fp32; the kernel functions below cast and make contiguous before calling the ops, so
autograd converts the gradients back to the caller's dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_zoo.backends.cuda.emulate import EMULATOR

WKV6_CK = WKV7_CK = 16  # csrc/wkv_math.cuh: the backward kernels' checkpoint intervals
F32 = torch.float32


def _impl(t: Tensor):
    if t.device.type == "cuda":
        from rwkv_zoo.backends.cuda.loader import extension

        return extension()
    return EMULATOR


def _c(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _g(g: Tensor | None, like: Tensor) -> Tensor:
    """An upstream gradient in fp32, contiguous, zeros when autograd gave None."""
    return torch.zeros(like.shape, device=like.device, dtype=F32) if g is None else _c(g.to(F32))


def _empty(*shape, like: Tensor, dtype=F32) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# wkv4


@torch.library.custom_op("rwkv_zoo_cuda::wkv4_fwd", mutates_args=())
def wkv4_fwd(w: Tensor, u: Tensor, k: Tensor, v: Tensor, a0: Tensor, b0: Tensor, p0: Tensor,
             save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, C = k.shape
    y = torch.empty_like(k)
    aT, bT, pT = (_empty(B, C, like=k) for _ in range(3))
    shape = (B, T, C) if save else (0,)
    sa, sb, sp = (_empty(*shape, like=k) for _ in range(3))
    _impl(k).wkv4_fwd(w, u, k, v, a0, b0, p0, y, aT, bT, pT, sa, sb, sp, save)
    return y, aT, bT, pT, sa, sb, sp


@wkv4_fwd.register_fake
def _(w, u, k, v, a0, b0, p0, save):
    B, T, C = k.shape
    shape = (B, T, C) if save else (0,)
    return (torch.empty_like(k), *(k.new_empty(B, C, dtype=F32) for _ in range(3)),
            *(k.new_empty(shape, dtype=F32) for _ in range(3)))


@torch.library.custom_op("rwkv_zoo_cuda::wkv4_bwd", mutates_args=())
def wkv4_bwd(w: Tensor, u: Tensor, k: Tensor, v: Tensor, sa: Tensor, sb: Tensor, sp: Tensor, dy: Tensor,
             daT: Tensor, dbT: Tensor, dpT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, C = k.shape
    dk, dv = (_empty(B, T, C, like=k) for _ in range(2))
    dw, du, da0, db0, dp0 = (_empty(B, C, like=k) for _ in range(5))
    _impl(k).wkv4_bwd(w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT, dk, dv, dw, du, da0, db0, dp0)
    return dk, dv, dw, du, da0, db0, dp0


@wkv4_bwd.register_fake
def _(w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT):
    B, T, C = k.shape
    return (*(k.new_empty(B, T, C, dtype=F32) for _ in range(2)), *(k.new_empty(B, C, dtype=F32) for _ in range(5)))


def _wkv4_setup(ctx, inputs, output):
    w, u, k, v, *_ = inputs
    ctx.save_for_backward(w, u, k, v, *output[4:])


def _wkv4_backward(ctx, dy, daT, dbT, dpT, *_):
    w, u, k, v, sa, sb, sp = ctx.saved_tensors
    if sa.numel() == 0:
        raise RuntimeError("rwkv_zoo cuda wkv4: backward through a forward that ran without saving (save=False)")
    like = sa[:, 0]
    dk, dv, dw, du, da0, db0, dp0 = wkv4_bwd(w, u, k, v, sa, sb, sp, _g(dy, k), _g(daT, like), _g(dbT, like),
                                             _g(dpT, like))
    return dw.sum(0), du.sum(0), dk.to(k.dtype), dv.to(v.dtype), da0, db0, dp0, None


wkv4_fwd.register_autograd(_wkv4_backward, setup_context=_wkv4_setup)


# ---------------------------------------------------------------------------------------------------
# wkv5 / wkv6


@torch.library.custom_op("rwkv_zoo_cuda::wkv6_fwd", mutates_args=())
def wkv6_fwd(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    B, _, H, N = r.shape
    y = torch.empty_like(r)
    sT = _empty(B, H, N, N, like=r)
    _impl(r).wkv6_fwd(r, k, v, w, *_w_strides(w, r), u, s0, y, sT)
    return y, sT


def _w_strides(w: Tensor, r: Tensor) -> tuple[int, int]:
    """Decay strides (batch, time): [B, T, H, N] per token (wkv6) or [H, N] constant (wkv5)."""
    _, T, H, N = r.shape
    return (T * H * N, H * N) if w.dim() == 4 else (0, 0)


@wkv6_fwd.register_fake
def _(r, k, v, w, u, s0):
    B, _, H, N = r.shape
    return torch.empty_like(r), r.new_empty(B, H, N, N, dtype=F32)


@torch.library.custom_op("rwkv_zoo_cuda::wkv6_bwd", mutates_args=())
def wkv6_bwd(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, dy: Tensor,
             dsT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    dr, dk, dv, dw = (_empty(B, T, H, N, like=r) for _ in range(4))
    du = _empty(B, H, N, like=r)
    ds0 = _empty(B, H, N, N, like=r)
    ck = _empty(B, H, -(-T // WKV6_CK), N, N, like=r)  # the kernel's checkpoint scratch
    _impl(r).wkv6_bwd(r, k, v, w, *_w_strides(w, r), u, s0, dy, dsT, dr, dk, dv, dw, du, ds0, ck)
    return dr, dk, dv, dw, du, ds0


@wkv6_bwd.register_fake
def _(r, k, v, w, u, s0, dy, dsT):
    B, T, H, N = r.shape
    return (*(r.new_empty(B, T, H, N, dtype=F32) for _ in range(4)), r.new_empty(B, H, N, dtype=F32),
            r.new_empty(B, H, N, N, dtype=F32))


def _wkv6_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _wkv6_backward(ctx, dy, dsT):
    r, k, v, w, u, s0 = ctx.saved_tensors
    dr, dk, dv, dw, du, ds0 = wkv6_bwd(r, k, v, w, u, s0, _g(dy, r), _g(dsT, s0))
    if w.dim() == 2:  # wkv5: one decay per (head, channel), shared over batch and time
        dw = dw.sum((0, 1))
    return dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw, du.sum(0), ds0


wkv6_fwd.register_autograd(_wkv6_backward, setup_context=_wkv6_setup)


# ---------------------------------------------------------------------------------------------------
# wkv7


@torch.library.custom_op("rwkv_zoo_cuda::wkv7_fwd", mutates_args=())
def wkv7_fwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor,
             save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    y = torch.empty_like(r)
    sT = _empty(B, H, N, N, like=r)
    sa = _empty(*((B, T, H, N) if save else (0,)), like=r)
    ck = _empty(*((B, H, -(-T // WKV7_CK), N, N) if save else (0,)), like=r)
    _impl(r).wkv7_fwd(r, w, k, v, a, b, s0, y, sT, sa, ck, save)
    return y, sT, sa, ck


@wkv7_fwd.register_fake
def _(r, w, k, v, a, b, s0, save):
    B, T, H, N = r.shape
    sa = r.new_empty((B, T, H, N) if save else (0,), dtype=F32)
    ck = r.new_empty((B, H, -(-T // WKV7_CK), N, N) if save else (0,), dtype=F32)
    return torch.empty_like(r), r.new_empty(B, H, N, N, dtype=F32), sa, ck


@torch.library.custom_op("rwkv_zoo_cuda::wkv7_bwd", mutates_args=())
def wkv7_bwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, sa: Tensor, ck: Tensor, sT: Tensor,
             dy: Tensor, dsT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    grads = [_empty(B, T, H, N, like=r) for _ in range(6)]
    ds0 = _empty(B, H, N, N, like=r)
    _impl(r).wkv7_bwd(r, w, k, v, a, b, sa, ck, sT, dy, dsT, *grads, ds0)
    return (*grads, ds0)


@wkv7_bwd.register_fake
def _(r, w, k, v, a, b, sa, ck, sT, dy, dsT):
    B, T, H, N = r.shape
    return (*(r.new_empty(B, T, H, N, dtype=F32) for _ in range(6)), r.new_empty(B, H, N, N, dtype=F32))


def _wkv7_setup(ctx, inputs, output):
    r, w, k, v, a, b = inputs[:6]
    _, sT, sa, ck = output
    ctx.save_for_backward(r, w, k, v, a, b, sa, ck, sT)


def _wkv7_backward(ctx, dy, dsT, *_):
    r, w, k, v, a, b, sa, ck, sT = ctx.saved_tensors
    if sa.numel() == 0:
        raise RuntimeError("rwkv_zoo cuda wkv7: backward through a forward that ran without saving (save=False)")
    dr, dw, dk, dv, da, db, ds0 = wkv7_bwd(r, w, k, v, a, b, sa, ck, sT, _g(dy, r), _g(dsT, sT))
    return dr.to(r.dtype), dw, dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), db.to(b.dtype), ds0, None


wkv7_fwd.register_autograd(_wkv7_backward, setup_context=_wkv7_setup)


# ---------------------------------------------------------------------------------------------------
# wkv7 chunked: forward on tensor cores, backward in fp32 (csrc/wkv7_chunk_bwd.cuh); the forward keeps
# the state entering each 16-step chunk when a gradient will be taken.

C7_L = 16


@torch.library.custom_op("rwkv_zoo_cuda::wkv7_chunk_fwd", mutates_args=())
def wkv7_chunk_fwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor,
                   save: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    y = torch.empty_like(r)
    sT = _empty(B, H, N, N, like=r)
    ck = _empty(*((B, H, -(-T // C7_L), N, N) if save else (0,)), like=r)
    _impl(r).wkv7_chunk_fwd(r, w, k, v, a, b, s0, y, sT, ck)
    return y, sT, ck


@wkv7_chunk_fwd.register_fake
def _(r, w, k, v, a, b, s0, save):
    B, T, H, N = r.shape
    ck = r.new_empty((B, H, -(-T // C7_L), N, N) if save else (0,), dtype=F32)
    return torch.empty_like(r), r.new_empty(B, H, N, N, dtype=F32), ck


@torch.library.custom_op("rwkv_zoo_cuda::wkv7_chunk_bwd", mutates_args=())
def wkv7_chunk_bwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, ck: Tensor, dy: Tensor,
                   dsT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    grads = [_empty(B, T, H, N, like=r) for _ in range(6)]
    ds0 = _empty(B, H, N, N, like=r)
    _impl(r).wkv7_chunk_bwd(r, w, k, v, a, b, ck, dy, dsT, *grads, ds0)
    return (*grads, ds0)


@wkv7_chunk_bwd.register_fake
def _(r, w, k, v, a, b, ck, dy, dsT):
    B, T, H, N = r.shape
    return (*(r.new_empty(B, T, H, N, dtype=F32) for _ in range(6)), r.new_empty(B, H, N, N, dtype=F32))


def _wkv7_chunk_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], output[2], output[1])


def _wkv7_chunk_backward(ctx, dy, dsT, *_):
    r, w, k, v, a, b, ck, sT = ctx.saved_tensors
    if ck.numel() == 0:
        raise RuntimeError("rwkv_zoo cuda wkv7 chunk: backward through a forward that ran without saving")
    dr, dw, dk, dv, da, db, ds0 = wkv7_chunk_bwd(r, w, k, v, a, b, ck, _g(dy, r), _g(dsT, sT))
    return dr.to(r.dtype), dw, dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), db.to(b.dtype), ds0, None


wkv7_chunk_fwd.register_autograd(_wkv7_chunk_backward, setup_context=_wkv7_chunk_setup)
