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
        lib.rz_head_norm_fwd.argtypes = [P, P, P, ctypes.c_float, P, P, P, I, I, I, INT]
        lib.rz_head_norm_bwd.argtypes = [P] * 8 + [I, I, I, INT]
        lib.rz_tanh_fwd.argtypes = [P, P, I, INT]
        lib.rz_tanh_fwd.restype = None
        for fn in (lib.rz_shift_mix_fwd, lib.rz_shift_mix_bwd, lib.rz_relu_sq_fwd, lib.rz_relu_sq_bwd,
                   lib.rz_head_norm_fwd, lib.rz_head_norm_bwd):
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
        dw = torch.empty_like(w) if ctx.per_token else torch.empty(B, H, N, dtype=torch.float32)
        du = torch.empty(B, H, N, dtype=torch.float32)
        ds0 = torch.empty(B, H, N, N, dtype=torch.float32)
        _lib().rz_wkv6_bwd(r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), int(ctx.per_token), u.data_ptr(),
                           ckpt.data_ptr(), dy.data_ptr(), _ptr(dsT), dr.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                           dw.data_ptr(), du.data_ptr(), ds0.data_ptr(), B, T, H, N, CKPT_LEN,
                           torch.get_num_threads())
        # Shared parameters: the kernel wrote one partial sum per (batch, head).
        if not ctx.per_token:
            dw = dw.sum(0)
        return dr, dk, dv, dw, du.sum(0), ds0, None


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


def _stack(mixes) -> Tensor:
    """Per-channel parameters (each C values, any shape) as one [M, C] fp32 tensor. Called inside an
    autograd.Function's forward: the caller's tensors go in as they are, and the backward hands each its
    row of the gradient (``_unstack``), so autograd adds no stack and reshape nodes."""
    return torch.stack([m.reshape(-1) for m in mixes])


def _unstack(dmix: Tensor, mixes_shapes) -> tuple[Tensor, ...]:
    return tuple(d.view(shape) for d, shape in zip(dmix.unbind(0), mixes_shapes, strict=True))


def _project(xs, ws) -> tuple[Tensor, ...]:
    """``x W^T`` for each (x, W), the x itself where W is None."""
    return tuple(x if w is None else torch.mm(x.view(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])
                 for x, w in zip(xs, ws, strict=True))


def _kept(xs, ws) -> list[Tensor | None]:
    """What ``_project_bwd`` needs saved: the inputs of the projected outputs."""
    return [x if w is not None else None for x, w in zip(xs, ws, strict=True)]


def _project_bwd(gs, xs, ws) -> tuple[list[Tensor], list[Tensor | None]]:
    """(gradients of the xs, of the Ws) of ``_project`` for the upstream gradients ``gs``."""
    gx, dw = [], []
    for g, x, w in zip(gs, xs, ws, strict=True):
        g = _c(g.float())
        if w is None:
            gx.append(g)
            dw.append(None)
        else:
            g2 = g.view(-1, w.shape[0])
            gx.append(torch.mm(g2, w).view(x.shape))
            dw.append(torch.mm(g2.t(), x.view(-1, x.shape[-1])))
    return gx, dw


class _ShiftMix(torch.autograd.Function):
    # F separate outputs (not one [F, B, T, C] tensor the caller unbinds): autograd then hands the
    # backward the F upstream gradients as they are, where unbind's backward would stack them (a copy).
    # rest: the F mixes, then F weights (None: that output is the mixed input itself).
    @staticmethod
    def forward(ctx, x, shift, dyn, form: int, *rest):
        F_ = len(rest) // 2
        mixes, ws = rest[:F_], rest[F_:]
        mix = _stack(mixes)
        xs = _shift_mix_fwd(x, shift, mix, dyn, form)
        ctx.save_for_backward(x, shift, mix, dyn, *ws, *_kept(xs, ws))
        ctx.form, ctx.shapes = form, [m.shape for m in mixes]
        return _project(xs, ws)

    @staticmethod
    def backward(ctx, *gs):
        x, shift, mix, dyn, *rest = ctx.saved_tensors
        F_ = len(gs)
        gx, dws = _project_bwd(gs, rest[F_:], rest[:F_])
        dx, dshift, dmix, ddyn = _shift_mix_bwd(gx, x, shift, mix, dyn, ctx.form)
        return dx, dshift, ddyn, None, *_unstack(dmix, ctx.shapes), *dws


def _fusable(*xs: Tensor | None) -> bool:
    return all(x is None or (x.device.type == "cpu" and x.dtype == torch.float32) for x in xs) and \
        cpu_kernels.load_wkv_train()[0] is not None


# The cpu backend's ``layer_ops`` (rwkv_zoo.layerops defines them and falls back to PyTorch on
# NotImplemented: other devices and dtypes, or no compiler).


def shift_mix(x: Tensor, shift: Tensor, mixes, dyn: Tensor | None, form: str, weights=None):
    weights = [None] * len(mixes) if weights is None else [None if w is None else _c(w) for w in weights]
    if not _fusable(x, shift, dyn, *mixes, *weights):
        return NotImplemented
    return _ShiftMix.apply(_c(x), _c(shift), None if dyn is None else _c(dyn), 0 if form == "delta" else 1, *mixes,
                           *weights)


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


# ------------------------------------------------------------------------------------------------
# Whole sub-paths of a block as one autograd node each: the forward runs the same GEMMs and
# elementwise kernels as the PyTorch definition (rwkv_zoo.layerops), the backward is written out, so
# autograd keeps one node and the few tensors the backward needs instead of a dozen nodes, each with
# its own saved inputs and Python-side dispatch (most of a step's time at the ablation shapes).

_sigmoid_bwd = torch.ops.aten.sigmoid_backward
_tanh_bwd = torch.ops.aten.tanh_backward


def _shift_mix_fwd(x: Tensor, shift: Tensor, mix: Tensor, dyn: Tensor | None, form: int) -> tuple[Tensor, ...]:
    B, T, C = x.shape
    outs = tuple(torch.empty(B, T, C, dtype=torch.float32) for _ in range(mix.shape[0]))
    _lib().rz_shift_mix_fwd(x.data_ptr(), shift.data_ptr(), mix.data_ptr(), _ptr(dyn), _ptrs(outs), form,
                            mix.shape[0], B, T, C, torch.get_num_threads())
    return outs


def _shift_mix_bwd(gs, x: Tensor, shift: Tensor, mix: Tensor, dyn: Tensor | None, form: int):
    """(dx, dshift, dmix [M, C], ddyn or None) of ``_shift_mix_fwd`` for upstream gradients ``gs``."""
    B, T, C = x.shape
    M = mix.shape[0]
    dx, dshift = torch.empty_like(x), torch.empty_like(shift)
    dmix = torch.empty(B, M, C, dtype=torch.float32)
    ddyn = None if dyn is None else torch.empty_like(dyn)
    _lib().rz_shift_mix_bwd(_ptrs(gs), x.data_ptr(), shift.data_ptr(), mix.data_ptr(), _ptr(dyn), form,
                            dx.data_ptr(), dshift.data_ptr(), dmix.data_ptr(), _ptr(ddyn), M, B, T, C,
                            torch.get_num_threads())
    return dx, dshift, dmix.sum(0), ddyn


def _tanh_(x: Tensor) -> Tensor:
    """tanh in place (x contiguous fp32): the C++ one, several times faster than torch.tanh here."""
    _lib().rz_tanh_fwd(x.data_ptr(), x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


def _relu_sq(k: Tensor) -> Tensor:
    kk = torch.empty_like(k)
    _lib().rz_relu_sq_fwd(k.data_ptr(), kk.data_ptr(), k.numel(), torch.get_num_threads())
    return kk


class _ChannelMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, wk, wv, wr, form: int, *mixes):
        B, T, C = x.shape
        mix = _stack(mixes)
        xs = _shift_mix_fwd(x, shift, mix, None, form)
        k = torch.mm(xs[0].view(B * T, C), wk.t())  # [B*T, F]
        kk = _relu_sq(k)
        v = torch.mm(kk, wv.t())  # [B*T, C]
        if wr is None:
            r, out = None, v
        else:
            r = torch.mm(xs[1].view(B * T, C), wr.t()).sigmoid_()
            out = r * v
        ctx.save_for_backward(x, shift, mix, wk, wv, wr, k, kk, r, None if wr is None else v, *xs)
        ctx.form, ctx.shapes = form, [m.shape for m in mixes]
        return out.view(B, T, C)

    @staticmethod
    def backward(ctx, g):
        x, shift, mix, wk, wv, wr, k, kk, r, v, *xs = ctx.saved_tensors
        B, T, C = x.shape
        g = _c(g.float()).view(B * T, C)
        if wr is None:
            gv, dwr, gs = g, None, []
        else:
            gv = g * r
            gr = _sigmoid_bwd(g * v, r)
            dwr = torch.mm(gr.t(), xs[1].view(B * T, C))
            gs = [torch.mm(gr, wr).view(B, T, C)]
        dwv = torch.mm(gv.t(), kk)
        dkk = torch.mm(gv, wv)
        dk = torch.empty_like(k)
        _lib().rz_relu_sq_bwd(k.data_ptr(), dkk.data_ptr(), dk.data_ptr(), k.numel(), torch.get_num_threads())
        dwk = torch.mm(dk.t(), xs[0].view(B * T, C))
        gs.insert(0, torch.mm(dk, wk).view(B, T, C))
        dx, dshift, dmix, _ = _shift_mix_bwd(gs, x, shift, mix, None, ctx.form)
        return dx, dshift, dwk, dwv, dwr, None, *_unstack(dmix, ctx.shapes)


def channel_mix(x: Tensor, shift: Tensor, mixes, key: Tensor, value: Tensor, receptance: Tensor | None, form: str):
    if not _fusable(x, shift, key, value, receptance, *mixes) or len(mixes) != (1 if receptance is None else 2):
        return NotImplemented
    return _ChannelMix.apply(_c(x), _c(shift), _c(key), _c(value), None if receptance is None else _c(receptance),
                             0 if form == "delta" else 1, *mixes)


class _DDLerp(torch.autograd.Function):
    @staticmethod
    # rest: maa_x, the M row mixes, then M weights (None: that row is returned unprojected).
    def forward(ctx, x, shift, w1, w2, *rest):
        B, T, C = x.shape
        M, D, _ = w2.shape
        maas, ws = rest[:M + 1], rest[M + 1:]
        mix = _stack(maas)  # [1 + M, C]: maa_x, then the M rows'
        maa_x, maa = mix[:1], mix[1:]
        (xx,) = _shift_mix_fwd(x, shift, maa_x, None, 0)
        h = _tanh_(torch.mm(xx.view(B * T, C), w1))  # [B*T, M*D]
        m = torch.bmm(h.view(B * T, M, D).transpose(0, 1), w2)  # [M, B*T, C]
        xs = _shift_mix_fwd(x, shift, maa, m, 0)
        ctx.save_for_backward(x, shift, maa_x, maa, w1, w2, xx, h, m, *ws, *_kept(xs, ws))
        ctx.shapes = [m.shape for m in maas]
        return _project(xs, ws)

    @staticmethod
    def backward(ctx, *gs):
        x, shift, maa_x, maa, w1, w2, xx, h, m, *rest = ctx.saved_tensors
        B, T, C = x.shape
        M, D, _ = w2.shape
        gs, dws = _project_bwd(gs, rest[M:], rest[:M])
        dx, dshift, dmaa, dm = _shift_mix_bwd(gs, x, shift, maa, m, 0)
        hm = h.view(B * T, M, D).transpose(0, 1)  # [M, B*T, D]
        dw2 = torch.bmm(hm.transpose(1, 2), dm)  # [M, D, C]
        dh = torch.bmm(dm, w2.transpose(1, 2)).transpose(0, 1).reshape(B * T, M * D)
        dh = _tanh_bwd(dh, h)
        dw1 = torch.mm(xx.view(B * T, C).t(), dh)  # [C, M*D]
        dxx = torch.mm(dh, w1.t()).view(B, T, C)
        dx2, dshift2, dmaa_x, _ = _shift_mix_bwd([dxx], x, shift, maa_x, None, 0)
        return (dx.add_(dx2), dshift.add_(dshift2), dw1, dw2, *_unstack(torch.cat([dmaa_x, dmaa]), ctx.shapes),
                *dws)


def ddlerp(x: Tensor, shift: Tensor, maa_x: Tensor, maas, w1: Tensor, w2: Tensor, weights=None):
    weights = [None] * len(maas) if weights is None else [None if w is None else _c(w) for w in weights]
    if not _fusable(x, shift, maa_x, w1, w2, *maas, *weights) or w2.dim() != 3 or w2.shape[0] != len(maas):
        return NotImplemented
    return _DDLerp.apply(_c(x), _c(shift), _c(w1), _c(w2), maa_x, *maas, *weights)


class _LoraDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, decay, w1, w2):
        B, T, C = x.shape
        h = _tanh_(torch.mm(x.view(B * T, C), w1))  # [B*T, D]
        e = torch.mm(h, w2).add_(decay.reshape(C)).exp_()  # [B*T, C]: decay + h W2, as the definition adds them
        ctx.save_for_backward(x, w1, w2, h, e)
        ctx.shape = decay.shape
        return e.neg().view(B, T, C)

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, h, e = ctx.saved_tensors
        B, T, C = x.shape
        dz = _c(g.float()).view(B * T, C).neg() * e  # through -exp(z): -g exp(z)
        dw2 = torch.mm(h.t(), dz)
        dh = _tanh_bwd(torch.mm(dz, w2.t()), h)
        return torch.mm(dh, w1.t()).view(B, T, C), dz.sum(0).view(ctx.shape), torch.mm(x.view(B * T, C).t(), dh), dw2


def lora_decay(x: Tensor, decay: Tensor, w1: Tensor, w2: Tensor):
    if not _fusable(x, decay, w1, w2):
        return NotImplemented
    return _LoraDecay.apply(_c(x), decay, _c(w1), _c(w2))


class _Linears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n: int, *xw):
        xs, ws = xw[:n], xw[n:]
        ctx.save_for_backward(*xs, *ws)
        ctx.n = n
        return tuple(torch.mm(x.view(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])
                     for x, w in zip(xs, ws, strict=True))

    @staticmethod
    def backward(ctx, *gs):
        saved = ctx.saved_tensors
        n = ctx.n
        dxs, dws = [], []
        for x, w, g in zip(saved[:n], saved[n:], gs, strict=True):
            g = _c(g.float()).view(-1, w.shape[0])
            dxs.append(torch.mm(g, w).view(x.shape))
            dws.append(torch.mm(g.t(), x.view(-1, x.shape[-1])))
        return (None, *dxs, *dws)


def linears(xs: list[Tensor], weights: list[Tensor]):
    if not _fusable(*xs, *weights) or any(x.dim() < 2 for x in xs):
        return NotImplemented
    return _Linears.apply(len(xs), *(_c(x) for x in xs), *(_c(w) for w in weights))
