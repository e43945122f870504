"""Training on the CPU: the C++ WKV forward and backward of ``csrc/cpu_wkv_train.cpp`` as autograd functions.

The ``cpu`` backend's kernels call ``wkv7`` / ``wkv6`` / ``wkv5`` here when a call needs gradients
(``needs_grad``); calls without gradients keep the inference kernels of ``csrc/cpu_wkv.cpp``.

The forward stores the state entering every chunk of ``CKPT_LEN`` tokens ([B, H, ceil(T / L), K, V]
fp32: 1/L of what storing every state would cost); the backward recomputes each chunk's states from
its checkpoint, last chunk first. Every input gets its gradient, the initial state included, and the
gradient that flows into the final state (infctx chunking, a loss on the state) is taken into account.
Casts and ``.contiguous()`` happen outside the ``autograd.Function``, so autograd brings each gradient
back to its input's dtype and layout.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from rwkv_zoo.backends.cpu import kernels as cpu_kernels

# Tokens between checkpointed states. The backward keeps L + 1 states per thread (272 KiB at N = 64,
# within L2) and recomputes L - 1 steps per chunk; 16 measured as fast as 32 and 64 with less memory.
CKPT_LEN = 16


def _lib():
    lib = cpu_kernels.load_wkv_train()[0]
    if lib is not None and not getattr(lib, "_rz_shift_mix_typed", False):
        P, I, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.rz_shift_mix_fwd.argtypes = [P] * 5 + [INT] + [I] * 4 + [INT]
        lib.rz_shift_mix_bwd.argtypes = [P] * 5 + [INT] + [P] * 4 + [I] * 4 + [INT]
        lib.rz_relu_sq_fwd.argtypes = [P, P, I, INT]
        lib.rz_relu_sq_bwd.argtypes = [P, P, P, I, INT]
        lib.rz_tanh_fwd.argtypes = [P, P, I, INT]
        lib.rz_tanh_bwd.argtypes = [P, P, P, I, INT]
        lib.rz_head_norm_fwd.argtypes = [P, P, P, ctypes.c_float, P, P, P, I, I, I, INT]
        lib.rz_head_norm_bwd.argtypes = [P] * 8 + [I, I, I, INT]
        lib.rz_channel_mix_fwd.argtypes = [P] * 4 + [INT] + [P] * 7 + [I] * 4 + [INT]
        lib.rz_channel_mix_bwd.argtypes = [P] * 4 + [INT] + [P] * 18 + [I] * 4 + [INT]
        lib.rz_ddlerp_fwd.argtypes = [P] * 13 + [I] * 5 + [INT]
        lib.rz_ddlerp_bwd.argtypes = [P] * 23 + [I] * 5 + [INT]
        for fn in (lib.rz_shift_mix_fwd, lib.rz_shift_mix_bwd, lib.rz_relu_sq_fwd, lib.rz_relu_sq_bwd,
                   lib.rz_tanh_fwd, lib.rz_tanh_bwd, lib.rz_head_norm_fwd, lib.rz_head_norm_bwd,
                   lib.rz_channel_mix_fwd, lib.rz_channel_mix_bwd, lib.rz_ddlerp_fwd, lib.rz_ddlerp_bwd):
            fn.restype = None
        lib._rz_shift_mix_typed = True
    return lib


def unavailable_reason() -> str | None:
    return cpu_kernels.load_wkv_train()[1]


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _c(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _ckpt(B: int, T: int, H: int, N: int) -> Tensor:
    return torch.empty(B, H, -(-T // CKPT_LEN), N, N, dtype=torch.float32)


class _WKV6(torch.autograd.Function):
    """wkv6 (``per_token``) or wkv5 (``w`` [H, N]): inputs fp32 and contiguous."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, per_token: bool):
        B, T, H, N = r.shape
        y, sT, ckpt = torch.empty_like(r), torch.empty_like(s0), _ckpt(B, T, H, N)
        _lib().rz_wkv6_fwd(r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), int(per_token), u.data_ptr(),
                           s0.data_ptr(), y.data_ptr(), sT.data_ptr(), ckpt.data_ptr(), B, T, H, N, CKPT_LEN,
                           torch.get_num_threads())
        ctx.save_for_backward(r, k, v, w, u, ckpt)
        ctx.per_token = per_token
        ctx.set_materialize_grads(False)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, k, v, w, u, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else _c(dy.float())
        dsT = None if dsT is None else _c(dsT.float())
        dr, dk, dv = torch.empty_like(r), torch.empty_like(k), torch.empty_like(v)
        # The kernel sums the shared parameters' gradients (u, and wkv5's w) over the batch.
        dw, du = torch.empty_like(w), torch.empty_like(u)
        ds0 = torch.empty(B, H, N, N, dtype=torch.float32)
        _lib().rz_wkv6_bwd(r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), int(ctx.per_token), u.data_ptr(),
                           ckpt.data_ptr(), dy.data_ptr(), _ptr(dsT), dr.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                           dw.data_ptr(), du.data_ptr(), ds0.data_ptr(), B, T, H, N, CKPT_LEN,
                           torch.get_num_threads())
        return dr, dk, dv, dw, du, ds0, None


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        y, sT, ckpt = torch.empty_like(r), torch.empty_like(s0), _ckpt(B, T, H, N)
        _lib().rz_wkv7_fwd(r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(),
                           s0.data_ptr(), y.data_ptr(), sT.data_ptr(), ckpt.data_ptr(), B, T, H, N, CKPT_LEN,
                           torch.get_num_threads())
        ctx.save_for_backward(r, w, k, v, a, b, ckpt)
        ctx.set_materialize_grads(False)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else _c(dy.float())
        dsT = None if dsT is None else _c(dsT.float())
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
        ds0 = torch.empty(B, H, N, N, dtype=torch.float32)
        _lib().rz_wkv7_bwd(*(x.data_ptr() for x in (r, w, k, v, a, b, ckpt, dy)), _ptr(dsT),
                           *(g.data_ptr() for g in grads), ds0.data_ptr(), B, T, H, N, CKPT_LEN,
                           torch.get_num_threads())
        return (*grads, ds0)


def _f32(*xs: Tensor) -> list[Tensor]:
    return [_c(x.float()) for x in xs]


def wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _WKV6.apply(*_f32(r, k, v, w, u, state), True)


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _WKV6.apply(*_f32(r, k, v, w, u, state), False)


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    return _WKV7.apply(*_f32(r, w, k, v, a, b, state))


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, a0, b0, p0):
        B, T, C = k.shape
        y = torch.empty_like(k)
        aT, bT, pT = torch.empty_like(a0), torch.empty_like(b0), torch.empty_like(p0)
        states = [torch.empty_like(k) for _ in range(3)]  # (a, b, p) entering every token
        _lib().rz_wkv4_fwd(*(x.data_ptr() for x in (w, u, k, v, a0, b0, p0, y, aT, bT, pT, *states)), B, T, C,
                           torch.get_num_threads())
        ctx.save_for_backward(w, u, k, v, *states)
        ctx.set_materialize_grads(False)
        return y, aT, bT, pT

    @staticmethod
    def backward(ctx, dy, daT, dbT, dpT):
        w, u, k, v, sa, sb, sp = ctx.saved_tensors
        B, T, C = k.shape
        dy = torch.zeros_like(k) if dy is None else _c(dy.float())
        ends = [None if g is None else _c(g.float()) for g in (daT, dbT, dpT)]
        dw, du = torch.empty(B, C), torch.empty(B, C)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        da0, db0, dp0 = torch.empty(B, C), torch.empty(B, C), torch.empty(B, C)
        _lib().rz_wkv4_bwd(*(x.data_ptr() for x in (w, u, k, v, sa, sb, sp, dy)), *(_ptr(g) for g in ends),
                           *(x.data_ptr() for x in (dw, du, dk, dv, da0, db0, dp0)), B, T, C, torch.get_num_threads())
        return dw.sum(0), du.sum(0), dk, dv, da0, db0, dp0


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    y, a, b, p = _WKV4.apply(*_f32(w, u, k, v, *state))
    return y, (a, b, p)


# ------------------------------------------------------------------------------------------------
# Token shift and the lerps of a block in one C++ pass (csrc/cpu_wkv_train.cpp ``shift_mix``).


def _ptrs(ts) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts))


class _ShiftMix(torch.autograd.Function):
    # F separate outputs (not one [F, B, T, C] tensor the caller unbinds): autograd then hands the
    # backward the F upstream gradients as they are, where unbind's backward would stack them (a copy).
    @staticmethod
    def forward(ctx, x, shift, mix, dyn, form: int):
        B, T, C = x.shape
        F_ = mix.shape[0]
        outs = tuple(torch.empty(B, T, C, dtype=torch.float32) for _ in range(F_))
        _lib().rz_shift_mix_fwd(x.data_ptr(), shift.data_ptr(), mix.data_ptr(), _ptr(dyn), _ptrs(outs), form,
                                F_, B, T, C, torch.get_num_threads())
        ctx.save_for_backward(x, shift, mix, dyn)
        ctx.form = form
        return outs

    @staticmethod
    def backward(ctx, *gs):
        x, shift, mix, dyn = ctx.saved_tensors
        B, T, C = x.shape
        F_ = mix.shape[0]
        gs = [_c(g.float()) for g in gs]
        dx, dshift = torch.empty_like(x), torch.empty_like(shift)
        dmix = torch.empty(B, F_, C, dtype=torch.float32)
        ddyn = None if dyn is None else torch.empty_like(dyn)
        _lib().rz_shift_mix_bwd(_ptrs(gs), x.data_ptr(), shift.data_ptr(), mix.data_ptr(), _ptr(dyn), ctx.form,
                                dx.data_ptr(), dshift.data_ptr(), dmix.data_ptr(), _ptr(ddyn), F_, B, T, C,
                                torch.get_num_threads())
        return dx, dshift, dmix.sum(0), ddyn, None


def _fusable(*xs: Tensor | None) -> bool:
    return all(x is None or (x.device.type == "cpu" and x.dtype == torch.float32) for x in xs) and \
        cpu_kernels.load_wkv_train()[0] is not None


# The cpu backend's ``layer_ops`` (rwkv_zoo.layerops defines them and falls back to PyTorch on
# NotImplemented: other devices and dtypes, or no compiler).


def shift_mix(x: Tensor, shift: Tensor, mix: Tensor, dyn: Tensor | None, form: str):
    if not _fusable(x, shift, mix, dyn):
        return NotImplemented
    return _ShiftMix.apply(_c(x), _c(shift), mix, None if dyn is None else _c(dyn), 0 if form == "delta" else 1)


class _ChannelMix(torch.autograd.Function):
    # x [B, T, C], shift [B, C], mk / mr [C], wk [F, C], wv [C, F], wr [C, C]; mr and wr None: no receptance.
    @staticmethod
    def forward(ctx, x, shift, mk, mr, wk, wv, wr, form: int):
        B, T, C = x.shape
        F_ = wk.shape[0]
        out = torch.empty(B, T, C, dtype=torch.float32)
        kpre = torch.empty(B * T, F_)
        r, kv = (None, None) if wr is None else (torch.empty(B * T, C), torch.empty(B * T, C))
        # The forward multiplies by the transposes (rows of B in the kernel's products); [F, C] and [C, F]
        # copies are small next to the [B T, F] activations.
        wkT, wvT = wk.t().contiguous(), wv.t().contiguous()
        wrT = None if wr is None else wr.t().contiguous()
        _lib().rz_channel_mix_fwd(x.data_ptr(), shift.data_ptr(), mk.data_ptr(), _ptr(mr), form, wkT.data_ptr(),
                                  wvT.data_ptr(), _ptr(wrT), out.data_ptr(), kpre.data_ptr(), _ptr(r), _ptr(kv),
                                  B, T, C, F_, torch.get_num_threads())
        ctx.save_for_backward(x, shift, mk, mr, wk, wv, wr, kpre, r, kv)
        ctx.form = form
        return out

    @staticmethod
    def backward(ctx, g):
        x, shift, mk, mr, wk, wv, wr, kpre, r, kv = ctx.saved_tensors
        B, T, C = x.shape
        F_ = wk.shape[0]
        n = torch.get_num_threads()
        g = _c(g.float())
        dx, dshift = torch.empty_like(x), torch.empty_like(shift)
        dmk, dwk, dwv = torch.empty_like(mk), torch.empty_like(wk), torch.empty_like(wv)
        dmr = None if mr is None else torch.empty_like(mr)
        dwr = None if wr is None else torch.empty_like(wr)
        part = torch.empty(max(n - 1, 0) * (2 * F_ * C + (0 if wr is None else C * C)))
        dxk = torch.empty(B * T, C)
        dxr = None if wr is None else torch.empty(B * T, C)
        dmix = torch.empty(B, 1 if wr is None else 2, C)
        _lib().rz_channel_mix_bwd(*(t.data_ptr() for t in (x, shift, mk)), _ptr(mr), ctx.form,
                                  wk.data_ptr(), wv.data_ptr(), _ptr(wr), g.data_ptr(), kpre.data_ptr(), _ptr(r),
                                  _ptr(kv), dx.data_ptr(), dshift.data_ptr(), dmk.data_ptr(), _ptr(dmr),
                                  dwk.data_ptr(), dwv.data_ptr(), _ptr(dwr), part.data_ptr(), dxk.data_ptr(),
                                  _ptr(dxr), dmix.data_ptr(), B, T, C, F_, n)
        return dx, dshift, dmk, dmr, dwk, dwv, dwr, None


def _plain_linear(m) -> bool:
    """A bias-free ``nn.Linear`` whose forward is ``x @ weight.T``: not a subclass or a wrapper (peft's
    LoRA layers, parametrized weights), no hooks of its own or global ones."""
    hooks = torch.nn.modules.module
    return type(m) is torch.nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks \
        and not hooks._global_forward_hooks and not hooks._global_forward_pre_hooks


def channel_mix(x: Tensor, shift: Tensor, mix_k: Tensor, mix_r: Tensor | None, key, value, receptance, form: str):
    mods = (key, value) if receptance is None else (key, value, receptance)
    if not all(_plain_linear(m) for m in mods) or torch.is_autocast_enabled("cpu"):
        return NotImplemented
    ws = [m.weight for m in mods]
    if x.dim() != 3 or not _fusable(x, shift, mix_k, mix_r, *ws):
        return NotImplemented
    C = x.shape[-1]
    # Up to 192 x 768 weights the op's own products (no packing, rows in L1/L2-sized blocks) win: forward +
    # backward 1.47x the PyTorch ops at 64 x 256, 1.48x at 128 x 512, 1.19x at 192 x 768 (one thread); at
    # 256 x 1024 MKL's packed GEMMs are faster (0.83-0.90x, 1 and 2 threads), so the modules run there.
    if C * ws[0].shape[0] > 192 * 768:
        return NotImplemented
    mr = None if receptance is None else mix_r.reshape(C)
    wr = None if receptance is None else _c(ws[2])
    return _ChannelMix.apply(_c(x), _c(shift), mix_k.reshape(C), mr, _c(ws[0]), _c(ws[1]), wr,
                             0 if form == "delta" else 1)


class _DDLerp(torch.autograd.Function):
    # x [B, T, C], shift [B, C], maa_x and the five maa_f [C] (w, k, v, r, g), w1 [C, 5 Dm], w2 [5, Dm, C],
    # decay [C], dw1 [C, Dd], dw2 [Dd, C] -> w, x_k, x_v, x_r, x_g [B, T, C].
    @staticmethod
    def forward(ctx, x, shift, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, decay, dw1, dw2):
        B, T, C = x.shape
        Dm, Dd = w2.shape[1], dw1.shape[1]
        w = torch.empty(B, T, C, dtype=torch.float32)
        outs = tuple(torch.empty(B, T, C, dtype=torch.float32) for _ in range(4))
        hs, hds = torch.empty(B * T, 5 * Dm), torch.empty(B * T, Dd)
        maa = (maa_w, maa_k, maa_v, maa_r, maa_g)
        _lib().rz_ddlerp_fwd(x.data_ptr(), shift.data_ptr(), maa_x.data_ptr(), _ptrs(maa), w1.data_ptr(), w2.data_ptr(),
                             decay.data_ptr(), dw1.data_ptr(), dw2.data_ptr(), w.data_ptr(), _ptrs(outs),
                             hs.data_ptr(), hds.data_ptr(), B, T, C, Dm, Dd, torch.get_num_threads())
        ctx.save_for_backward(x, shift, maa_x, *maa, w1, w2, dw1, dw2, w, hs, hds)
        return (w, *outs)

    @staticmethod
    def backward(ctx, *grads):
        x, shift, maa_x, *maa, w1, w2, dw1, dw2, w, hs, hds = ctx.saved_tensors
        B, T, C = x.shape
        Dm, Dd = w2.shape[1], dw1.shape[1]
        n = torch.get_num_threads()
        gs = [_c(g.float()) for g in grads]
        dx, dshift, dprev = torch.empty_like(x), torch.empty_like(shift), torch.empty_like(x)
        g_maa_x, g_maa, g_decay = torch.empty(C), torch.empty(5, C), torch.empty(C)
        g_w1, g_w2, g_dw1, g_dw2 = (torch.empty_like(t) for t in (w1, w2, dw1, dw2))
        part = torch.empty(max(n - 1, 0) * (7 * C + 10 * C * Dm + 2 * C * Dd))
        _lib().rz_ddlerp_bwd(x.data_ptr(), shift.data_ptr(), maa_x.data_ptr(), _ptrs(maa), w1.data_ptr(),
                             w2.data_ptr(), dw1.data_ptr(), dw2.data_ptr(), w.data_ptr(), hs.data_ptr(), hds.data_ptr(),
                             _ptrs(gs), dx.data_ptr(), dshift.data_ptr(), dprev.data_ptr(), g_maa_x.data_ptr(),
                             g_maa.data_ptr(), g_w1.data_ptr(), g_w2.data_ptr(), g_decay.data_ptr(), g_dw1.data_ptr(),
                             g_dw2.data_ptr(), part.data_ptr(), B, T, C, Dm, Dd, n)
        return dx, dshift, g_maa_x, *g_maa.unbind(0), g_w1, g_w2, g_decay, g_dw1, g_dw2


def ddlerp(x: Tensor, shift: Tensor, maa_x: Tensor, maa: list[Tensor], w1: Tensor, w2: Tensor, decay: Tensor,
           dw1: Tensor, dw2: Tensor):
    if x.dim() != 3 or len(maa) != 5 or torch.is_autocast_enabled("cpu") or \
            not _fusable(x, shift, maa_x, *maa, w1, w2, decay, dw1, dw2):
        return NotImplemented
    C = x.shape[-1]
    return _DDLerp.apply(_c(x), _c(shift), maa_x.reshape(C), *(m.reshape(C) for m in maa), _c(w1), _c(w2),
                         decay.reshape(C), _c(dw1), _c(dw2))


class _ReluSq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        _lib().rz_relu_sq_fwd(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = _c(g.float())
        dx = torch.empty_like(x)
        _lib().rz_relu_sq_bwd(x.data_ptr(), g.data_ptr(), dx.data_ptr(), x.numel(), torch.get_num_threads())
        return dx


def relu_sq(x: Tensor):
    return _ReluSq.apply(_c(x)) if _fusable(x) else NotImplemented


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        _lib().rz_tanh_fwd(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        g = _c(g.float())
        dx = torch.empty_like(y)
        _lib().rz_tanh_bwd(y.data_ptr(), g.data_ptr(), dx.data_ptr(), y.numel(), torch.get_num_threads())
        return dx


def tanh(x: Tensor):
    return _Tanh.apply(_c(x)) if _fusable(x) else NotImplemented


class _HeadNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, eps: float):
        B, T, H, N = y.shape
        out = torch.empty(B, T, H * N, dtype=torch.float32)
        mean, rstd = torch.empty(B * T * H), torch.empty(B * T * H)
        _lib().rz_head_norm_fwd(y.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps, out.data_ptr(),
                                mean.data_ptr(), rstd.data_ptr(), B * T, H, N, torch.get_num_threads())
        ctx.save_for_backward(y, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        y, weight, mean, rstd = ctx.saved_tensors
        B, T, H, N = y.shape
        g = _c(g.float())
        n = torch.get_num_threads()
        dy = torch.empty_like(y)
        dw, db = torch.empty(n, H * N), torch.empty(n, H * N)
        _lib().rz_head_norm_bwd(y.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), g.data_ptr(),
                                dy.data_ptr(), dw.data_ptr(), db.data_ptr(), B * T, H, N, n)
        return dy, dw.sum(0), db.sum(0), None


def head_group_norm(y: Tensor, weight: Tensor, bias: Tensor, eps: float):
    if not _fusable(y, weight, bias):
        return NotImplemented
    return _HeadNorm.apply(_c(y), _c(weight), _c(bias), eps)
