"""The small per-layer ops the blocks share, each defined here in PyTorch and made faster by backends.

A block spends much of a small training step in memory-bound elementwise ops and their autograd nodes
(a dozen for the token shift and lerps of one v6 block). These functions are what the versions call:

- ``shift_mix(x, shift, mixes, dyn=None, form="delta")``: token shift and F lerps in one op (F tensors);
- ``relu_sq(x)``: the channel-mix activation ``relu(x) ** 2``;
- ``head_group_norm(y, ln_x)``: GroupNorm over each head of ``y`` [B, T, H, N] (``ln_x`` of v5-v7);
- ``channel_mix(x, shift, mixes, key, value, receptance, form)``: the whole v4-v6 channel mix
  ``sigmoid(x_r W_r) * (relu(x_k W_k)^2 W_v)`` with its token shift (v7's without the receptance);
- ``ddlerp(x, shift, maa_x, maas, w1, w2)``: v6's data-dependent token shift (LoRA mix and five lerps);
- ``lora_decay(x, decay, w1, w2)``: v6's data-dependent log-decay ``-exp(decay + tanh(x W1) W2)``;
- ``linears(xs, weights)``: several bias-free projections ``x_i W_i^T`` of a block (its r, k, v, g).

The last three are a block's whole sub-path: one op where PyTorch runs a dozen, so a backend can give
each a single autograd node with a hand-written backward (at the ablation shapes a step's time was
mostly the per-op and per-node overhead of such paths, not their arithmetic).

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
import torch.nn.functional as F
from torch import Tensor

from rwkv_zoo import dispatch
from rwkv_zoo.model import head_group_norm as _head_group_norm_torch

__all__ = [
    "LAYER_OPS",
    "LAYER_OP_SIGNATURES",
    "channel_mix",
    "ddlerp",
    "head_group_norm",
    "linear_weights",
    "linears",
    "lora_decay",
    "project",
    "relu_sq",
    "shift_mix",
]

# What a backend's version receives. Per-channel parameters (``mixes``, ``decay``) come as the caller's
# tensors, [1, 1, C] in the built-in blocks: stacking or reshaping them here would add autograd nodes.
LAYER_OP_SIGNATURES = {
    "shift_mix": "(x [B, T, C], shift [B, C], mixes F x [..., C], dyn [F, B, T, C] or None, form, weights F x "
                 "([O, C] or None) or None) -> F x [B, T, C or O]",
    "relu_sq": "(x [...]) -> [...]",
    "head_group_norm": "(y [B, T, H, N], weight [H*N], bias [H*N], eps float) -> [B, T, H*N] fp32",
    "channel_mix": "(x [B, T, C], shift [B, C], mixes M x [..., C], key [F, C], value [C, F], receptance [C, C] "
                   "or None, form) -> [B, T, C]",
    "ddlerp": "(x [B, T, C], shift [B, C], maa_x [..., C], maas M x [..., C], w1 [C, M*D], w2 [M, D, C], "
              "weights M x ([O, C] or None) or None) -> M x [B, T, C or O]",
    "lora_decay": "(x [B, T, C], decay [..., C], w1 [C, D], w2 [D, C]) -> [B, T, C] fp32",
    "linears": "(xs M x [B, T, C], weights M x [O, C]) -> M x [B, T, O]",
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
              backend: str | None = None, project: list | None = None) -> tuple[Tensor, ...]:
    """Token shift and F lerps in one op: F tensors [B, T, C] from ``x`` [B, T, C] and ``shift`` [B, C].

    With ``prev`` the previous token's ``x`` (``shift`` at t = 0) and ``m`` mix f (each [..., C], plus
    ``dyn[f]`` [F, B, T, C] when given): ``form="delta"`` (v6, v7) is ``x + (prev - x) * m``,
    ``form="lerp"`` (v4, v5; no ``dyn``) ``x * m + prev * (1 - m)``. The new shift state is ``x[:, -1]``.
    A tuple rather than one [F, B, T, C] tensor: callers use the F results separately, and unbinding a
    tensor costs autograd a stack (a copy of all F gradients) in the backward.

    ``project``: F modules (or None) applied to the F results, ``project[f](out_f)``, in the same op
    where all are plain ``nn.Linear`` (``linear_weights``).
    """
    weights = _weights(project)
    if weights is not False:
        for fn in implementations("shift_mix", backend):
            out = fn(x, shift, mixes, dyn, form, weights)
            if out is not NotImplemented:
                return out
    if project is not None:
        return _apply(project, shift_mix(x, shift, mixes, dyn, form, backend))
    C = x.shape[-1]
    mix = torch.stack([m.reshape(C) for m in mixes])  # [F, C]
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


def head_group_norm(y: Tensor, ln_x: torch.nn.GroupNorm, backend: str | None = None) -> Tensor:
    """GroupNorm over each head of ``y`` [B, T, H, N] in fp32; returns [B, T, H * N] fp32."""
    for fn in implementations("head_group_norm", backend):
        out = fn(y, ln_x.weight, ln_x.bias, float(ln_x.eps))
        if out is not NotImplemented:
            return out
    return _head_group_norm_torch(y, ln_x)


def linear_weights(*mods: torch.nn.Module) -> tuple[Tensor, ...] | None:
    """The weights of plain bias-free ``nn.Linear`` layers without hooks, or None when any is something
    else (a peft LoRA wrapper, a quantized inference layer): ops that take weights would skip what such a
    module adds, so a block calls its modules instead."""
    for m in mods:
        if type(m) is not torch.nn.Linear or m.bias is not None or m._forward_hooks or m._forward_pre_hooks:
            return None
    return tuple(m.weight for m in mods)


def _weights(modules: list | None) -> list | bool | None:
    """The weights of ``project`` modules (None where a module is None), or False when one is not a
    plain ``nn.Linear``."""
    if modules is None:
        return None
    ws = [None if m is None else linear_weights(m) for m in modules]
    return False if any(w is None and m is not None for w, m in zip(ws, modules, strict=True)) else \
        [None if w is None else w[0] for w in ws]


def _apply(modules: list, xs) -> tuple[Tensor, ...]:
    return tuple(x if m is None else m(x) for m, x in zip(modules, xs, strict=True))


def linears(xs: list[Tensor], weights: list[Tensor], backend: str | None = None) -> tuple[Tensor, ...]:
    """``F.linear(xs[i], weights[i])`` for each i (``nn.Linear`` weights [O, C], no bias): a block's
    independent projections as one op."""
    for fn in implementations("linears", backend):
        out = fn(xs, weights)
        if out is not NotImplemented:
            return out
    return tuple(F.linear(x, w) for x, w in zip(xs, weights, strict=True))


def project(modules: list[torch.nn.Module], xs: list[Tensor], backend: str | None = None) -> tuple[Tensor, ...]:
    """``modules[i](xs[i])`` for each i: through ``linears`` (one op) when all are plain ``nn.Linear``
    (``linear_weights``), else each module's own forward."""
    weights = linear_weights(*modules)
    if weights is None:
        return tuple(m(x) for m, x in zip(modules, xs, strict=True))
    return linears(xs, list(weights), backend=backend)


def channel_mix(x: Tensor, shift: Tensor, mixes: list[Tensor], key: Tensor, value: Tensor,
                receptance: Tensor | None, form: str = "lerp", backend: str | None = None) -> Tensor:
    """The channel mix with its token shift: ``sigmoid(x_r R^T) * (relu(x_k K^T) ** 2 V^T)`` [B, T, C].

    ``x_k, x_r = shift_mix(x, shift, mixes, form=form)``; ``key`` [F, C], ``value`` [C, F] and
    ``receptance`` [C, C] are ``nn.Linear`` weights. ``receptance=None`` (and one mix): the gate-less
    ``relu(x_k K^T) ** 2 V^T`` of v7. The new shift state is ``x[:, -1]``, as for ``shift_mix``.
    """
    for fn in implementations("channel_mix", backend):
        out = fn(x, shift, mixes, key, value, receptance, form)
        if out is not NotImplemented:
            return out
    xs = shift_mix(x, shift, mixes, form=form, backend=backend)
    v = F.linear(relu_sq(F.linear(xs[0], key), backend=backend), value)
    return v if receptance is None else torch.sigmoid(F.linear(xs[1], receptance)) * v


def ddlerp(x: Tensor, shift: Tensor, maa_x: Tensor, maas: list[Tensor], w1: Tensor, w2: Tensor,
           backend: str | None = None, project: list | None = None) -> tuple[Tensor, ...]:
    """v6's data-dependent token shift: M tensors [B, T, C] (v6: M = 5, rows w, k, v, r, g).

    ``xx = x + (prev - x) * maa_x``, ``h = tanh(xx W1)`` [B, T, M*D] split into M rows of D, and row
    f's lerp weight ``maas[f] + h_f W2[f]`` (``w1`` [C, M*D], ``w2`` [M, D, C]) in ``shift_mix``'s
    delta form. ``project``: M modules (or None) applied to the M rows, as in ``shift_mix``.
    """
    weights = _weights(project)
    if weights is not False:
        for fn in implementations("ddlerp", backend):
            out = fn(x, shift, maa_x, maas, w1, w2, weights)
            if out is not NotImplemented:
                return out
    if project is not None:
        return _apply(project, ddlerp(x, shift, maa_x, maas, w1, w2, backend))
    B, T, _ = x.shape
    xx = shift_mix(x, shift, [maa_x], backend=backend)[0]
    h = torch.tanh(xx @ w1).view(B, T, len(maas), -1).transpose(1, 2)  # [B, M, T, D]
    m = torch.einsum("bftd,fdc->fbtc", h, w2)  # [M, B, T, C]
    return shift_mix(x, shift, maas, m, backend=backend)


def lora_decay(x: Tensor, decay: Tensor, w1: Tensor, w2: Tensor, backend: str | None = None) -> Tensor:
    """v6's log-decay per token and channel, fp32 [B, T, C]: ``-exp(decay + tanh(x W1) W2)``
    (``decay`` C values, ``w1`` [C, D], ``w2`` [D, C]); the decay itself is ``exp`` of it."""
    for fn in implementations("lora_decay", backend):
        out = fn(x, decay, w1, w2)
        if out is not NotImplemented:
            return out
    return -torch.exp(decay.float() + (torch.tanh(x @ w1) @ w2).float())
