"""The small per-layer ops the blocks share, each defined here in PyTorch and made faster by backends.

A block spends much of a small training step in memory-bound elementwise ops and their autograd nodes
(a dozen for the token shift and lerps of one v6 block). These functions are what the versions call:

- ``shift_mix(x, shift, mixes, dyn=None, form="delta")``: token shift and F lerps in one op (F tensors);
- ``relu_sq(x)``: the channel-mix activation ``relu(x) ** 2``;
- ``tanh(x)``: the activation of v6's LoRA paths;
- ``head_group_norm(y, ln_x)``: GroupNorm over each head of ``y`` [B, T, H, N] (``ln_x`` of v5-v7);
- ``channel_mix(x, shift, mix_k, mix_r, key, value, receptance, form)``: the whole channel-mix of v4-v7,
  ``sigmoid(receptance(xr)) * value(relu(key(xk)) ** 2)`` (no receptance: v7), token shift included;
- ``ddlerp(x, shift, maa_x, maa, w1, w2, decay, dw1, dw2)``: v6's data-dependent token shift (five LoRA
  lerps) and decay.

Speed is a backend's business: a backend lists faster versions in ``Backend.layer_ops`` (name -> function
with the signature of ``LAYER_OP_SIGNATURES``), each returning ``NotImplemented`` for a call it cannot run
(another device or dtype, its library not built), and must give the same values and gradients as the
definition here (tests/kernels compare them). Which backend runs follows dispatch's explicit choice
(``backend=``, ``use_backend()``, ``RWKV_ZOO_BACKEND``): ``reference`` is plain PyTorch, a named backend
uses its own version where it has one, and with no choice the available backends are asked in priority
order. The first one that does not answer ``NotImplemented`` runs the call; none: the definition here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rwkv_zoo import dispatch
from rwkv_zoo.model import head_group_norm as _head_group_norm_torch

__all__ = ["LAYER_OPS", "LAYER_OP_SIGNATURES", "channel_mix", "ddlerp", "head_group_norm", "relu_sq", "shift_mix",
           "tanh"]

# What a backend's version receives (already stacked and checked by the function here).
LAYER_OP_SIGNATURES = {
    "shift_mix": "(x [B, T, C], shift [B, C], mix [F, C], dyn [F, B, T, C] or None, form) -> F x [B, T, C]",
    "relu_sq": "(x [...]) -> [...]",
    "tanh": "(x [...]) -> [...]",
    "head_group_norm": "(y [B, T, H, N], weight [H*N], bias [H*N], eps float) -> [B, T, H*N] fp32",
    "channel_mix": "(x [B, T, C], shift [B, C], mix_k [..., C], mix_r [..., C] or None, key, value, receptance "
                   "or None: modules (a backend may use .weight of a plain bias-free nn.Linear), form) -> [B, T, C]",
    "ddlerp": "(x [B, T, C], shift [B, C], maa_x [..., C], maa 5 x [..., C], w1 [C, 5 Dm], w2 [5, Dm, C], "
              "decay [..., C], dw1 [C, Dd], dw2 [Dd, C]) -> (w fp32, x_k, x_v, x_r, x_g) [B, T, C]",
}
LAYER_OPS = tuple(LAYER_OP_SIGNATURES)

_cache: dict[tuple, tuple[Callable, ...]] = {}


def implementations(name: str, backend: str | None = None) -> tuple[Callable, ...]:
    """The backends' versions of layer op ``name`` to try, in order, for this explicit choice (cached
    per backend-registry generation; availability is judged once per generation)."""
    chosen = dispatch.explicit_backend(backend)
    backends = dispatch.get_backends()
    key = (name, chosen, dispatch.backends_generation())
    fns = _cache.get(key)
    if fns is None:
        if chosen == "reference":
            fns = ()
        else:
            cands = [backends[chosen]] if chosen in backends else [] if chosen else \
                sorted(backends.values(), key=lambda b: (-b.priority, b.name))
            fns = tuple(b.layer_ops[name] for b in cands if name in b.layer_ops and b.unavailable_reason() is None)
        if len(_cache) > 64:  # stale generations
            _cache.clear()
        _cache[key] = fns
    return fns


def shift_mix(x: Tensor, shift: Tensor, mixes: list[Tensor], dyn: Tensor | None = None, form: str = "delta",
              backend: str | None = None) -> tuple[Tensor, ...]:
    """Token shift and F lerps in one op: F tensors [B, T, C] from ``x`` [B, T, C] and ``shift`` [B, C].

    With ``prev`` the previous token's ``x`` (``shift`` at t = 0) and ``m`` mix f (each [..., C], plus
    ``dyn[f]`` [F, B, T, C] when given): ``form="delta"`` (v6, v7) is ``x + (prev - x) * m``,
    ``form="lerp"`` (v4, v5; no ``dyn``) ``x * m + prev * (1 - m)``. The new shift state is ``x[:, -1]``.
    A tuple rather than one [F, B, T, C] tensor: callers use the F results separately, and unbinding a
    tensor costs autograd a stack (a copy of all F gradients) in the backward.
    """
    C = x.shape[-1]
    mix = torch.stack([m.reshape(C) for m in mixes])  # [F, C]
    for fn in implementations("shift_mix", backend):
        out = fn(x, shift, mix, dyn, form)
        if out is not NotImplemented:
            return out
    prev = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
    mix = mix.view(-1, 1, 1, C)
    if form == "delta":
        return (x + (prev - x) * (mix if dyn is None else mix + dyn)).unbind(0)
    return (x * mix + prev * (1 - mix)).unbind(0)


def relu_sq(x: Tensor, backend: str | None = None) -> Tensor:
    """``relu(x) ** 2``, the channel-mix activation."""
    for fn in implementations("relu_sq", backend):
        out = fn(x)
        if out is not NotImplemented:
            return out
    return torch.relu(x).square()


def tanh(x: Tensor, backend: str | None = None) -> Tensor:
    """``torch.tanh(x)``, the activation of v6's LoRA paths."""
    for fn in implementations("tanh", backend):
        out = fn(x)
        if out is not NotImplemented:
            return out
    return torch.tanh(x)


def head_group_norm(y: Tensor, ln_x: torch.nn.GroupNorm, backend: str | None = None) -> Tensor:
    """GroupNorm over each head of ``y`` [B, T, H, N] in fp32; returns [B, T, H * N] fp32."""
    for fn in implementations("head_group_norm", backend):
        out = fn(y, ln_x.weight, ln_x.bias, float(ln_x.eps))
        if out is not NotImplemented:
            return out
    return _head_group_norm_torch(y, ln_x)


def channel_mix(x: Tensor, shift: Tensor, mix_k: Tensor, mix_r: Tensor | None, key: Callable, value: Callable,
                receptance: Callable | None = None, form: str = "lerp", backend: str | None = None) -> Tensor:
    """The channel-mix of v4-v7 on ``x`` [B, T, C] after ``shift`` [B, C]: with ``xk``, ``xr`` the token
    shift and lerps of ``x`` (``shift_mix`` with ``mix_k``, ``mix_r`` and ``form``), ``value(relu(key(xk))
    ** 2)``, times ``sigmoid(receptance(xr))`` when there is a receptance (v4-v6; v7 has none).

    ``key``, ``value``, ``receptance`` are the block's modules, called as they are here, so a wrapped one
    (a LoRA adapter, a hook) keeps working: a backend runs the whole op only for plain bias-free
    ``nn.Linear`` modules and answers ``NotImplemented`` otherwise. One op because at small widths the
    dozen memory-bound passes between the three products cost a training step more than the products.
    """
    for fn in implementations("channel_mix", backend):
        out = fn(x, shift, mix_k, mix_r, key, value, receptance, form)
        if out is not NotImplemented:
            return out
    mixes = [mix_k] if receptance is None else [mix_k, mix_r]
    xs = shift_mix(x, shift, mixes, form=form, backend=backend)
    kv = value(relu_sq(key(xs[0]), backend=backend))
    return kv if receptance is None else torch.sigmoid(receptance(xs[1])) * kv


def ddlerp(x: Tensor, shift: Tensor, maa_x: Tensor, maa: list[Tensor], w1: Tensor, w2: Tensor, decay: Tensor,
           dw1: Tensor, dw2: Tensor, backend: str | None = None) -> tuple[Tensor, ...]:
    """v6's data-dependent token shift and decay ("ddlerp", SPEC §5): with ``prev`` the previous token,
    ``xx = x + (prev - x) * maa_x`` and ``h = tanh(xx @ w1)`` split into five [.., Dm] parts, the lerps
    ``x_f = x + (prev - x) * (maa_f + h_f @ w2[f])`` for f = w, k, v, r, g (``maa`` in that order), and the
    log-decay ``w = -exp(decay + tanh(x_w @ dw1) @ dw2)`` in fp32. Returns ``(w, x_k, x_v, x_r, x_g)``."""
    for fn in implementations("ddlerp", backend):
        out = fn(x, shift, maa_x, maa, w1, w2, decay, dw1, dw2)
        if out is not NotImplemented:
            return out
    B, T, _ = x.shape
    xx = shift_mix(x, shift, [maa_x], backend=backend)[0]
    h = tanh(xx @ w1, backend=backend)  # [B, T, 5*Dm]
    # m[f] = h[..., f, :] @ w2[f], [5, B, T, C]. One bmm over a strided view of h ([5, B*T, Dm]): the same
    # products as einsum("bftd,fdc->fbtc"), without the copies einsum made of h and of the gradients.
    m = torch.bmm(h.view(B * T, 5, -1).transpose(0, 1), w2).view(5, B, T, -1)
    xw, xk, xv, xr, xg = shift_mix(x, shift, maa, m, backend=backend)
    ww = decay.float() + (tanh(xw @ dw1, backend=backend) @ dw2).float()
    return -torch.exp(ww), xk, xv, xr, xg
